"""The run's inputs, in data-flow order: tokenizer, dataset, sampler, micro-batches.

``micro_batches`` yields each micro-batch with the data position *after* it, so
the trainer's state is updated from what it was handed, never inside the
generator; resuming is starting the generator from a saved position.
"""

from __future__ import annotations

import logging
import math
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from torch.utils.data import DataLoader
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from ..config import TrainConfig, build_component
from ..data import (
    InternRepoSampler,
    PackCollator,
    PackedBatch,
    PackedDataset,
    build_packed_dataset,
    load_intern_repo_tokenized_dataset,
)
from ..errors import ConfigError, DataError
from ..parallel.dims import ParallelDims
from .schedule import LRSchedule, xtuner_warmup_micro_batches
from .state import DataPosition
from .stopping import STOP_SIGNALS

logger = logging.getLogger("evotune")


def load_tokenizer(settings: TrainConfig) -> PreTrainedTokenizerBase | None:
    source = settings.tokenizer_name_or_path or settings.pretrained_model_name_or_path
    try:
        return AutoTokenizer.from_pretrained(source)
    except (OSError, ValueError) as error:
        if settings.tokenizer_name_or_path:
            raise ConfigError(
                f"tokenizer_name_or_path: cannot load a tokenizer from {source!r} ({error})"
            ) from None
        logger.warning("no tokenizer found in %s; checkpoints will hold weights only", source)
        return None


def build_dataset(settings: TrainConfig) -> PackedDataset:
    spec = settings.train_dataset
    if spec is None:
        spec = dict(
            type=build_packed_dataset,
            dataset_cfg=dict(
                type=load_intern_repo_tokenized_dataset, folder=settings.dataset_folder
            ),
            packed_length=settings.max_length,
        )
    given = spec.get("on_bad_sample") if isinstance(spec, dict) else None
    if given is not None and given != settings.on_bad_sample:
        raise ConfigError(
            f"train_dataset.on_bad_sample={given!r} contradicts the setting on_bad_sample="
            f"{settings.on_bad_sample!r}; set it once, as the setting"
        )
    dataset = build_component(spec, on_bad_sample=settings.on_bad_sample)
    if not isinstance(dataset, PackedDataset):
        raise ConfigError("train_dataset must build a packed dataset (type=build_packed_dataset)")
    if dataset.packed_length != settings.max_length:
        raise ConfigError(
            f"train_dataset.packed_length={dataset.packed_length} differs from max_length="
            f"{settings.max_length}; use packed_length=max_length in the config"
        )
    return dataset


def build_sampler(
    settings: TrainConfig, dataset: PackedDataset, dims: ParallelDims
) -> InternRepoSampler:
    loader_spec = settings.train_dataloader or {}
    spec = loader_spec.get("sampler") or dict(type=InternRepoSampler)
    sampler: InternRepoSampler = build_component(
        spec,
        dataset=dataset,
        micro_num=settings.accumulative_counts * settings.batch_size,
        dp_size=dims.dp_size,
        dp_rank=dims.dp_rank,
        dataset_weights=settings.dataset_weights,
    )
    return sampler


def build_collator(settings: TrainConfig, dataset: PackedDataset) -> PackCollator:
    return PackCollator(None if settings.use_varlen_attn else dataset.attention_windows())


def plan_total_steps(
    settings: TrainConfig, dataset: PackedDataset, sampler: Any, dims: ParallelDims
) -> int:
    """total_steps when set (InternEvo), else every micro-batch of max_epochs (XTuner)."""
    if micro_batches_in_epoch(settings, sampler, 0) == 0:
        raise DataError(
            f"{dataset.corpus.folder}: {len(dataset)} packs of {settings.max_length} tokens give "
            f"no micro-batch of {settings.batch_size} pack(s) per rank at data-parallel size "
            f"{dims.dp_size}; add data or lower max_length/batch_size"
        )
    if settings.total_steps is not None:
        return settings.total_steps
    return math.ceil(micro_batches_in_run(settings, sampler) / settings.accumulative_counts)


def micro_batches_in_epoch(settings: TrainConfig, sampler: Any, epoch: int) -> int:
    """This rank's micro-batches in ``epoch``."""
    return len(sampler.rank_indices(epoch)) // settings.batch_size


def micro_batches_in_run(settings: TrainConfig, sampler: Any) -> int:
    """This rank's micro-batches over max_epochs."""
    return sum(micro_batches_in_epoch(settings, sampler, e) for e in range(settings.max_epochs))


def build_schedule(settings: TrainConfig, sampler: Any, total_steps: int) -> LRSchedule:
    """The LR closed form; an epoch-based XTuner run counts its lengths in micro-batches."""
    s = settings
    by_epochs = s.total_steps is None
    warmup = xtuner_warmup_micro_batches(
        s.warmup_ratio, s.max_epochs, micro_batches_in_epoch(s, sampler, 0)
    )
    try:
        return LRSchedule(
            s.lr_schedule,
            s.lr,
            total_steps,
            s.warmup_ratio,
            s.resolved_eta_min(),
            s.init_steps,
            warmup_start_factor=s.warmup_start_factor,
            step_unit=s.lr_step_unit,
            accumulative_counts=s.accumulative_counts,
            warmup_micro_batches=warmup if by_epochs else None,
            total_micro_batches=micro_batches_in_run(s, sampler) if by_epochs else None,
        )
    except ValueError as error:
        raise ConfigError(f"lr_schedule: {error}") from None


def micro_batches(
    settings: TrainConfig,
    dataset: PackedDataset,
    sampler: Any,
    collator: PackCollator,
    start: DataPosition,
) -> Iterator[tuple[PackedBatch, DataPosition]]:
    """This rank's micro-batches from ``start``, epoch after epoch, each with its position."""
    epoch, consumed = start.epoch, start.consumed_in_epoch
    while settings.total_steps is not None or epoch < settings.max_epochs:
        sampler.set_epoch(epoch, start=consumed)
        loader: DataLoader[PackedBatch] = DataLoader(
            dataset,  # type: ignore[arg-type]  # a map-style dataset of dicts
            batch_size=settings.batch_size,
            sampler=sampler,
            collate_fn=collator,
            num_workers=settings.num_workers,
            drop_last=True,
            persistent_workers=False,
            worker_init_fn=_ignore_stop_signals if settings.num_workers else None,
        )
        for batch in loader:
            consumed += settings.batch_size
            yield batch, DataPosition(epoch, consumed)
        epoch, consumed = epoch + 1, 0


def check_tokenizer_provenance(
    dataset: PackedDataset, tokenizer: PreTrainedTokenizerBase | None
) -> None:
    """Shards tokenized by another tokenizer stop the run; shards without a record warn."""
    from ..data.provenance import check_provenance

    warning = check_provenance(Path(dataset.corpus.folder), tokenizer)
    if warning:
        logger.warning("%s", warning)


def report_bad_samples(dataset: PackedDataset) -> None:
    for path, count in sorted(dataset.bad_sample_counts().items()):
        logger.warning(
            "on_bad_sample='skip': %d bad sample(s) trained as ignored tokens in %s", count, path
        )


def _ignore_stop_signals(worker_id: int) -> None:
    """A stop signal is the training process's to handle: a worker killed by it would end
    the rank before it can save."""
    for number in STOP_SIGNALS:
        signal.signal(number, signal.SIG_IGN)


def check_model_fits_data(
    model_config: Any,
    dataset: PackedDataset,
    tokenizer: PreTrainedTokenizerBase | None,
) -> None:
    dataset.vocab_size = model_config.vocab_size
    if tokenizer is not None and len(tokenizer) > model_config.vocab_size:
        raise ConfigError(
            f"tokenizer has {len(tokenizer)} tokens but the model's embeddings hold "
            f"{model_config.vocab_size}; resize the model or use its own tokenizer"
        )
    longest = dataset.segment_limit
    positions = getattr(model_config, "max_position_embeddings", None)
    if positions is not None and longest > positions and not _has_rope_scaling(model_config):
        raise ConfigError(
            f"max_length / max_length_per_sample allows segments of {longest} tokens but the "
            f"model has max_position_embeddings={positions} and no rope scaling; lower "
            "max_length_per_sample or use a long-context model"
        )


def _has_rope_scaling(config: Any) -> bool:
    rope = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    return rope.get("rope_type", rope.get("type", "default")) != "default"


def one_line_cause(error: BaseException) -> str:
    """The cause of a data error, also when a DataLoader worker re-raised it with a traceback."""
    text = str(error)
    if "Original Traceback" in text:
        text = text.strip().splitlines()[-1].split(": ", 1)[-1]
    return " ".join(text.split())
