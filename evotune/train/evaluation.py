"""Validation: the held-out loss of a run, overall and per data type, on any layout.

``val_dataset`` (or ``val_dataset_folder``) is packed exactly like the training
data, read in dataset order (never shuffled) and grouped into rows of
``batch_size`` packs like a training micro-batch; ``max_eval_batches`` keeps
the first rows only. Row ``i`` belongs to data-parallel replica ``i % dp``, and
the ranks of a sequence-parallel group share it, each holding its slice.

Every token's cross-entropy is computed in fp32 (the family's logit transform
included, the LM head in chunks, as in training), then summed per type id on
the device; one all-reduce at the end sums those sums over every rank. The
mean token loss is (loss sum) / (trainable tokens) over the whole set, so it is
the same number whatever the layout (1 process, DDP, ZeRO, FSDP2, SP): only the
order of fp32 additions inside a row's forward differs.

Engines that shard parameters (ZeRO-3, FSDP2) gather them inside each forward,
which is collective, so every rank runs the same number of forwards: a replica
short of a row runs its first row again and drops the result.

The model runs in eval mode under ``torch.no_grad``, then every module goes back
to the mode it had; the RNG state is left as it was, so evaluation never changes
the training run (tests/test_evaluation.py).
"""

from __future__ import annotations

import contextlib
import copy
import logging
import math
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..config import TrainConfig, build_component
from ..data import (
    IGNORE_INDEX,
    PackCollator,
    PackedBatch,
    PackedDataset,
    build_packed_dataset,
    load_intern_repo_tokenized_dataset,
)
from ..errors import ConfigError, DataError
from ..model.attention import AttentionMetadata, kernel_of
from ..model.families import attention_needs, logit_transform
from ..parallel.dims import ParallelDims

logger = logging.getLogger("evotune")

EVAL_KIND = "eval"  # the "kind" of validation records in metrics.jsonl


# -- settings ---------------------------------------------------------------------------


def check_settings(settings: TrainConfig, source: str = "config") -> None:
    """Ranges of the validation settings; one line naming the key and the fix."""
    s = settings
    if s.val_dataset is not None and s.val_dataset_folder is not None:
        raise ConfigError(
            f"{source}: val_dataset_folder: set either val_dataset_folder or val_dataset, not both"
        )
    if s.eval_steps is not None and s.eval_steps < 1:
        raise ConfigError(
            f"{source}: eval_steps: must be >= 1 (or None to validate only at the end), "
            f"got {s.eval_steps}"
        )
    if s.max_eval_batches is not None and s.max_eval_batches < 1:
        raise ConfigError(
            f"{source}: max_eval_batches: must be >= 1 (or None for the whole validation set), "
            f"got {s.max_eval_batches}"
        )
    has_val = s.val_dataset is not None or s.val_dataset_folder is not None
    if not has_val and (s.eval_steps is not None or s.max_eval_batches is not None):
        key = "eval_steps" if s.eval_steps is not None else "max_eval_batches"
        raise ConfigError(
            f"{source}: {key}: there is no validation set to evaluate; set val_dataset_folder "
            "(or val_dataset), or remove the setting"
        )


def build_val_dataset(settings: TrainConfig) -> PackedDataset | None:
    """The validation packs, packed like the training data; None when none is configured."""
    s = settings
    spec = s.val_dataset
    key = "val_dataset"
    if spec is None:
        if s.val_dataset_folder is None:
            return None
        spec = _folder_spec(s)
        key = "val_dataset_folder"
    given = spec.get("on_bad_sample") if isinstance(spec, dict) else None
    on_bad_sample = given if given is not None else s.on_bad_sample
    try:
        dataset = build_component(spec, on_bad_sample=on_bad_sample)
    except DataError as error:
        raise DataError(f"{key}: {error}") from None
    if not isinstance(dataset, PackedDataset):
        raise ConfigError(f"{key} must build a packed dataset (type=build_packed_dataset)")
    if dataset.packed_length != s.max_length:
        raise ConfigError(
            f"{key}: packed_length={dataset.packed_length} differs from max_length="
            f"{s.max_length}; use packed_length=max_length"
        )
    if len(dataset) == 0:
        raise DataError(
            f"{dataset.corpus.folder}: the validation data holds {dataset.corpus.num_tokens} "
            f"tokens, less than one pack of max_length={s.max_length}; add data or lower "
            "max_length"
        )
    return dataset


def _folder_spec(settings: TrainConfig) -> dict[str, Any]:
    """val_dataset_folder with train_dataset's packing arguments, or the defaults."""
    folder = settings.val_dataset_folder
    train = settings.train_dataset
    if train is None:
        return dict(
            type=build_packed_dataset,
            dataset_cfg=dict(type=load_intern_repo_tokenized_dataset, folder=folder),
            packed_length=settings.max_length,
        )
    spec = copy.deepcopy(train)
    corpus = spec.get("dataset_cfg")
    if not isinstance(corpus, dict) or "folder" not in corpus:
        raise ConfigError(
            "val_dataset_folder: train_dataset.dataset_cfg has no folder= to replace; define "
            "val_dataset = dict(type=build_packed_dataset, ...) instead"
        )
    corpus["folder"] = folder
    corpus.pop("data_order_path", None)  # an order file lists the training folder's shards
    return spec


# -- per-token losses -------------------------------------------------------------------


def token_losses(
    model: nn.Module, batch: PackedBatch, chunk_size: int, sequence_parallel: Any = None
) -> torch.Tensor:
    """fp32 cross-entropy of every position of ``batch`` (0 where the label is -100).

    The same computation as evotune.model.loss.packed_loss (base model with the row's
    attention metadata, the LM head and the family's logit transform in chunks), kept
    per token instead of summed.
    """
    hf: Any = model  # a transformers PreTrainedModel
    config = hf.config
    metadata = AttentionMetadata.for_batch(batch, kernel_of(config), attention_needs(config))
    base_model = getattr(hf, hf.base_model_prefix)
    outputs = base_model(
        input_ids=batch.input_ids,
        position_ids=batch.position_ids,
        use_cache=False,
        attention_metadata=metadata,
        sequence_parallel=sequence_parallel,
    )
    hidden = outputs.last_hidden_state[0]
    labels = batch.labels[0]
    head = hf.get_output_embeddings()
    transform = logit_transform(config)
    pieces = []
    for start in range(0, labels.shape[0], chunk_size):
        logits = transform(head(hidden[start : start + chunk_size]).float())
        pieces.append(
            F.cross_entropy(
                logits,
                labels[start : start + chunk_size],
                ignore_index=IGNORE_INDEX,
                reduction="none",
            )
        )
    return torch.cat(pieces)


def add_type_sums(
    sums: torch.Tensor, losses: torch.Tensor, labels: torch.Tensor, type_ids: torch.Tensor
) -> None:
    """sums[t] += (loss sum, trainable tokens) of the positions of type t (in place, float64).

    No boolean indexing (its size would be read back from the device): positions
    without a target, or sequence-parallel padding (type -1), add zeros.
    """
    types = type_ids.reshape(-1)
    trainable = ((labels.reshape(-1) != IGNORE_INDEX) & (types >= 0)).double()
    types = types.clamp(min=0)
    sums[:, 0].index_add_(0, types, losses.reshape(-1).double() * trainable)
    sums[:, 1].index_add_(0, types, trainable)


class TypeLosses:
    """Loss sums and trainable tokens per data type, kept on the device until reduced.

    ``add`` bins one row's per-token losses by type id (no host sync); ``flat`` is
    the one host copy, to be summed over every rank (each rank holds its own rows,
    or its own slice of a sequence-parallel row); ``means`` turns the summed values
    into each type's mean token loss and token count.
    """

    def __init__(self, type_names: Sequence[str], device: torch.device):
        self.names = tuple(type_names)
        self.sums = torch.zeros((len(self.names), 2), dtype=torch.float64, device=device)

    def add(self, losses: torch.Tensor, labels: torch.Tensor, type_ids: torch.Tensor) -> None:
        add_type_sums(self.sums, losses, labels, type_ids)

    def add_typed(self, losses: torch.Tensor, types: torch.Tensor) -> None:
        """Per-token losses with their type ids, -1 where a position has no target."""
        types = types.reshape(-1)
        counted = (types >= 0).double()
        types = types.clamp(min=0)
        self.sums[:, 0].index_add_(0, types, losses.reshape(-1).double() * counted)
        self.sums[:, 1].index_add_(0, types, counted)

    def flat(self) -> list[float]:
        return self.sums.flatten().tolist()

    def means(self, summed: Sequence[float]) -> dict[str, tuple[float, int]]:
        """Type name -> (mean token loss, tokens) for the types that had trainable tokens."""
        pairs = zip(summed[0::2], summed[1::2], strict=True)
        return {
            name: (loss / count, int(count))
            for name, (loss, count) in zip(self.names, pairs, strict=True)
            if count > 0
        }


# -- the model in eval mode, then exactly as it was -------------------------------------


@contextlib.contextmanager
def evaluation_mode(model: nn.Module, device: torch.device) -> Iterator[None]:
    """Eval mode and no autograd inside; every module's mode and the RNG state restored."""
    modes = [(module, module.training) for module in model.modules()]
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices, device_type=device.type):
        model.eval()
        try:
            with torch.no_grad():
                yield
        finally:
            for module, training in modes:
                module.training = training


@contextlib.contextmanager
def gathered_root(engine: Any) -> Iterator[None]:
    """Under FSDP2, gather the wrapper's own parameters (embeddings, norm, LM head); collective.

    evotune calls the base model and the LM head below the wrapper, whose forward
    hook would otherwise gather them; decoder layers gather their own in their hooks.
    ZeRO-3 gathers every module's parameters in its hooks: nothing to do here.
    """
    from torch.distributed.fsdp import FSDPModule

    root = getattr(engine, "module", None)
    if not isinstance(root, FSDPModule):
        yield
        return
    # FSDP2 makes the first module that runs forward its root; before the first training
    # step (answers of the untrained model) the decoder layers would run first
    root._get_fsdp_state()._lazy_init()
    root.unshard()
    try:
        yield
    finally:
        root.reshard()


def compute_context(engine: Any, device: torch.device) -> contextlib.AbstractContextManager[Any]:
    """The training forward's precision: the engine's autocast dtype, if it has one."""
    dtype = getattr(engine, "autocast_dtype", None)
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


# -- the validation pass ----------------------------------------------------------------


@dataclass
class EvalResult:
    loss: float
    tokens: int
    by_type: dict[str, tuple[float, int]]  # type name -> (mean loss, tokens)
    rows: int
    seconds: float

    def record(self, step: int) -> dict[str, Any]:
        """The metrics.jsonl record of this validation (``"kind": "eval"``)."""
        return {
            "kind": EVAL_KIND,
            "step": step,
            "val_loss": self.loss,
            "val_ppl": perplexity(self.loss),
            "val_loss_by_type": {name: loss for name, (loss, _) in self.by_type.items()},
            "val_tokens": self.tokens,
            "val_tokens_by_type": {name: tokens for name, (_, tokens) in self.by_type.items()},
            "val_batches": self.rows,
            "eval_time_s": self.seconds,
        }

    def line(self, step: int) -> str:
        parts = [
            f"eval step {step}",
            f"val_loss {self.loss:.4f}",
            f"ppl {perplexity(self.loss):.2f}",
        ]
        if len(self.by_type) > 1:
            parts += [f"{name} {loss:.4f}" for name, (loss, _) in self.by_type.items()]
        parts += [f"{self.tokens} tokens", f"{self.seconds:.1f}s"]
        return " | ".join(parts)


def perplexity(loss: float) -> float:
    return math.exp(loss) if loss < 700 else math.inf


class Validation:
    """Evaluates the validation set every ``eval_steps`` steps and at the end."""

    def __init__(
        self,
        dataset: PackedDataset,
        collator: PackCollator,
        dims: ParallelDims,
        batch_size: int,
        eval_steps: int | None,
        max_eval_batches: int | None,
        chunk_size: int,
    ):
        self.dataset = dataset
        self.collator = collator
        self.dims = dims
        self.eval_steps = eval_steps
        self.chunk_size = chunk_size
        packs = len(dataset)
        if max_eval_batches is not None:
            packs = min(packs, max_eval_batches * batch_size)
        self.rows = [
            list(range(start, min(start + batch_size, packs)))
            for start in range(0, packs, batch_size)
        ]
        self.last_step: int | None = None

    @classmethod
    def build(
        cls, settings: TrainConfig, dims: ParallelDims, source: str = "config"
    ) -> Validation | None:
        """The validation of the run, or None; a missing folder or bad setting stops it here."""
        check_settings(settings, source)
        dataset = build_val_dataset(settings)
        if dataset is None:
            return None
        windows = None if settings.use_varlen_attn else dataset.attention_windows()
        return cls(
            dataset,
            PackCollator(windows),
            dims,
            settings.batch_size,
            settings.eval_steps,
            settings.max_eval_batches,
            settings.loss_chunk_size,
        )

    def describe(self) -> str:
        d = self.dataset.describe()
        packs = sum(len(row) for row in self.rows)
        return (
            f"validation: {self.dataset.corpus.folder}: {d['shards']} shards, {d['samples']} "
            f"samples, {d['tokens']} tokens -> {d['packs']} packs; evaluating {packs} packs in "
            f"{len(self.rows)} batches "
            + (f"every {self.eval_steps} steps and " if self.eval_steps else "")
            + "at the end"
        )

    def due(self, step: int, last: bool) -> bool:
        if step == 0 or step == self.last_step:
            return False
        return last or (self.eval_steps is not None and step % self.eval_steps == 0)

    def run(self, model: nn.Module, engine: Any, step: int) -> EvalResult:
        """Evaluate every row of this replica; collective over all ranks."""
        started = time.perf_counter()
        config: Any = model.config
        self.dataset.vocab_size = config.vocab_size  # ids are checked as packs are read
        dims = self.dims
        device = dims.device
        sums = TypeLosses(self.dataset.corpus.type_names, device)
        mine = self.rows[dims.dp_rank :: dims.dp_size]
        turns = -(-len(self.rows) // dims.dp_size)  # every rank runs as many forwards
        sequence_parallel = getattr(engine, "sequence_parallel", None)
        with evaluation_mode(model, device), gathered_root(engine):
            for turn in range(turns):
                counted = turn < len(mine)
                # a replica short of a row repeats one (its own first, or the set's) unseen
                row = mine[turn] if counted else (mine or self.rows)[0]
                batch = self.collator([self.dataset[index] for index in row])
                if sequence_parallel is not None:
                    batch = sequence_parallel.split(batch)
                batch = batch.to(device)
                with compute_context(engine, device):
                    losses = token_losses(model, batch, self.chunk_size, sequence_parallel)
                if counted:
                    sums.add(losses, batch.labels, batch.type_ids)
        totals = dims.all_reduce_sum(sums.flat())
        loss_sum, tokens = sum(totals[0::2]), int(sum(totals[1::2]))
        self.last_step = step
        return EvalResult(
            loss=loss_sum / tokens if tokens else math.nan,
            tokens=tokens,
            by_type=sums.means(totals),
            rows=len(self.rows),
            seconds=time.perf_counter() - started,
        )
