"""The Trainer: builds the parts in data-flow order, then runs one explicit loop.

config -> ParallelDims -> dataset -> sampler -> collate -> model -> engine
       -> for each optimizer step: micro-batches -> loss -> clip -> update -> log/save
"""

from __future__ import annotations

import copy
import logging
import math
import random
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader
from tqdm import tqdm
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from ..config import ConfigError, LoadedConfig, TrainConfig, build_component
from ..data import (
    InternRepoSampler,
    PackCollator,
    PackedBatch,
    PackedDataset,
    build_packed_dataset,
    load_intern_repo_tokenized_dataset,
)
from ..data.ftdp import DataError
from ..model.load import load_model
from ..parallel.dims import ParallelDims
from ..parallel.engine import Engine, TorchEngine
from ..parallel.sequence import SequenceParallel, check_heads
from . import checkpoint as ckpt
from .faults import Faults
from .metrics import MetricsLog, peak_flops, peak_memory_mib, transformer_flops
from .schedule import LRSchedule

logger = logging.getLogger("evotune")

TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


class TrainingError(RuntimeError):
    """Training cannot go on (e.g. too many consecutive non-finite steps)."""


@dataclass
class TrainState:
    """Counters that, with the sampler position and RNG, define where a run is."""

    step: int = 0  # optimizer steps taken, skipped ones included
    updates: int = 0  # successful updates: drives the LR schedule
    epoch: int = 0
    consumed_in_epoch: int = 0  # packs this DP rank consumed in the current epoch
    tokens_seen: int = 0
    skipped_steps: int = 0
    consecutive_skips: int = 0


@dataclass
class TrainResult:
    steps: int
    losses: list[float] = field(default_factory=list)
    last_checkpoint: Path | None = None


class Trainer:
    def __init__(
        self,
        loaded: LoadedConfig,
        work_dir: Path,
        dims: ParallelDims | None = None,
        resume: str | None = None,
        show_progress: bool = True,
    ):
        self.loaded = loaded
        self.settings: TrainConfig = loaded.settings
        self.work_dir = work_dir
        self.work_dir.mkdir(parents=True, exist_ok=True)
        self.dims = dims or ParallelDims()
        self.show_progress = show_progress and self.dims.is_main
        s = self.settings
        _seed_everything(s.seed)

        self.tokenizer = self._load_tokenizer()
        self.dataset = self._build_dataset()
        self.sampler = self._build_sampler()
        self.collator = PackCollator(
            None if s.use_varlen_attn else self.dataset.attention_windows()
        )
        self.sequence_parallel = (
            SequenceParallel(self.dims.sp_size, self.dims.sp_rank, self.dims.sp_group)
            if self.dims.sp_size > 1
            else None
        )
        self.model, self.engine = self._build_model_and_engine()
        self._check_model_fits_data()
        self.total_steps = self._plan_total_steps()
        self.schedule = LRSchedule(
            s.lr_schedule,
            s.lr,
            self.total_steps,
            s.warmup_ratio,
            s.resolved_eta_min(),
            s.init_steps,
        )
        self.state = TrainState()
        if resume is not None:
            self._resume(Path(resume))
        self.peak_flops = peak_flops(self.dims.device)
        self.faults = Faults.from_environment()

    # -- building ----------------------------------------------------------------

    def _load_tokenizer(self) -> PreTrainedTokenizerBase | None:
        source = self.settings.tokenizer_name_or_path or self.settings.pretrained_model_name_or_path
        try:
            return AutoTokenizer.from_pretrained(source)
        except (OSError, ValueError) as error:
            if self.settings.tokenizer_name_or_path:
                raise ConfigError(
                    f"tokenizer_name_or_path: cannot load a tokenizer from {source!r} ({error})"
                ) from None
            logger.warning("no tokenizer found in %s; checkpoints will hold weights only", source)
            return None

    def _build_dataset(self) -> PackedDataset:
        s = self.settings
        spec = s.train_dataset
        if spec is None:
            spec = dict(
                type=build_packed_dataset,
                dataset_cfg=dict(type=load_intern_repo_tokenized_dataset, folder=s.dataset_folder),
                packed_length=s.max_length,
            )
        dataset = build_component(spec)
        if not isinstance(dataset, PackedDataset):
            raise ConfigError(
                "train_dataset must build a packed dataset (type=build_packed_dataset)"
            )
        if dataset.packed_length != s.max_length:
            raise ConfigError(
                f"train_dataset.packed_length={dataset.packed_length} differs from max_length="
                f"{s.max_length}; use packed_length=max_length in the config"
            )
        return dataset

    def _build_sampler(self) -> InternRepoSampler:
        s = self.settings
        loader_spec = s.train_dataloader or {}
        spec = loader_spec.get("sampler") or dict(type=InternRepoSampler)
        return build_component(
            spec,
            dataset=self.dataset,
            micro_num=s.accumulative_counts * s.batch_size,
            dp_size=self.dims.dp_size,
            dp_rank=self.dims.dp_rank,
            dataset_weights=s.dataset_weights,
        )

    def _build_model_and_engine(self) -> tuple[Any, Engine]:
        s, dims = self.settings, self.dims
        if s.deepspeed is None:
            model = load_model(
                s.pretrained_model_name_or_path,
                s.attn_implementation,
                dims.device,
                s.gradient_checkpointing,
            )
            engine = TorchEngine(
                model,
                dims,
                lr=s.lr,
                betas=s.betas,
                eps=s.eps,
                weight_decay=s.weight_decay,
                weight_decay_scope=s.weight_decay_scope,
                autocast_dtype=None if s.dtype == "float32" else TORCH_DTYPES[s.dtype],
                chunk_size=s.loss_chunk_size,
                sequence_parallel=self.sequence_parallel,
            )
            return model, engine
        import deepspeed

        from ..parallel.deepspeed_engine import DeepSpeedEngine, load_deepspeed_config, zero_stage

        # deepspeed.comm must wrap the existing process group before zero.Init reads ranks
        deepspeed.init_distributed(dist_backend="nccl" if dims.device.type == "cuda" else "gloo")
        ds_config = load_deepspeed_config(s.deepspeed, s, dims)
        partitioned_load = None
        if zero_stage(ds_config) == 3:
            # keep a live HfDeepSpeedConfig so from_pretrained loads straight into partitions
            from transformers.integrations import HfDeepSpeedConfig

            partitioned_load = HfDeepSpeedConfig(copy.deepcopy(ds_config))  # it edits its copy
        model = load_model(
            s.pretrained_model_name_or_path,
            s.attn_implementation,
            dims.device,
            s.gradient_checkpointing,
        )
        engine = DeepSpeedEngine(model, dims, ds_config, s, self.sequence_parallel)
        del partitioned_load
        return model, engine

    def _check_model_fits_data(self) -> None:
        config = self.model.config
        check_heads(
            config.num_attention_heads,
            getattr(config, "num_key_value_heads", None) or config.num_attention_heads,
            self.dims.sp_size,
        )
        self.dataset.vocab_size = config.vocab_size
        if self.tokenizer is not None and len(self.tokenizer) > config.vocab_size:
            raise ConfigError(
                f"tokenizer has {len(self.tokenizer)} tokens but the model's embeddings hold "
                f"{config.vocab_size}; resize the model or use its own tokenizer"
            )
        longest = self.dataset.segment_limit
        positions = getattr(config, "max_position_embeddings", None)
        if positions is not None and longest > positions and not _has_rope_scaling(config):
            raise ConfigError(
                f"max_length / max_length_per_sample allows segments of {longest} tokens but the "
                f"model has max_position_embeddings={positions} and no rope scaling; lower "
                "max_length_per_sample or use a long-context model"
            )

    def _plan_total_steps(self) -> int:
        s = self.settings
        per_epoch = self._micro_batches_in_epoch(0)
        if per_epoch == 0:
            raise DataError(
                f"{self.dataset.corpus.folder}: {len(self.dataset)} packs of {s.max_length} tokens "
                f"give no micro-batch of {s.batch_size} pack(s) per rank at data-parallel size "
                f"{self.dims.dp_size}; add data or lower max_length/batch_size"
            )
        if s.total_steps is not None:
            return s.total_steps
        micro_batches = sum(self._micro_batches_in_epoch(e) for e in range(s.max_epochs))
        return math.ceil(micro_batches / s.accumulative_counts)

    def _micro_batches_in_epoch(self, epoch: int) -> int:
        return len(self.sampler.rank_indices(epoch)) // self.settings.batch_size

    # -- the loop ------------------------------------------------------------------

    def train(self) -> TrainResult:
        s = self.settings
        result = TrainResult(steps=self.total_steps)
        self._announce()
        metrics_log = MetricsLog(self.work_dir / "metrics.jsonl" if self.dims.is_main else None)
        progress = tqdm(
            total=self.total_steps,
            initial=self.state.step,
            disable=not self.show_progress,
            dynamic_ncols=True,
            desc="train",
        )
        stream = self._micro_batch_stream()
        try:
            while self.state.step < self.total_steps:
                micro_batches = [
                    b for _, b in zip(range(s.accumulative_counts), stream, strict=False)
                ]
                if not micro_batches:
                    break
                try:
                    record = self.train_step(micro_batches)
                except TrainingError:
                    # skipped steps never touched the weights: save the last good state
                    result.last_checkpoint = self.save_checkpoint()
                    raise
                result.losses.append(record["loss"])
                metrics_log.write(record)
                progress.update(1)
                progress.set_postfix(
                    loss=f"{record['loss']:.4f}",
                    lr=f"{record['lr']:.2e}",
                    gnorm=f"{record['grad_norm']:.3f}",
                    tok_s=f"{record['tokens_per_s']:.0f}",
                    refresh=False,
                )
                if (
                    not self.show_progress
                    and self.dims.is_main
                    and (self.state.step % s.log_interval == 0 or self.state.step == 1)
                ):
                    logger.info(
                        "step %d/%d loss %.4f lr %.3e grad_norm %.3f tokens/s %.0f",
                        self.state.step,
                        self.total_steps,
                        record["loss"],
                        record["lr"],
                        record["grad_norm"],
                        record["tokens_per_s"],
                    )
                last = self.state.step >= self.total_steps
                if self.state.step % s.save_steps == 0 or last:
                    result.last_checkpoint = self.save_checkpoint()
        finally:
            progress.close()
            metrics_log.close()
        return result

    def train_step(self, micro_batches: list[PackedBatch]) -> dict[str, Any]:
        """One optimizer step over this rank's micro-batches (fewer than usual at the end)."""
        s, dims, state = self.settings, self.dims, self.state
        started = time.perf_counter()
        lr = self.schedule(state.updates)
        count = len(micro_batches)
        trainable = [batch.num_trainable for batch in micro_batches]
        # Gradients are averaged over all world ranks (DDP / DeepSpeed); the ranks of one
        # sequence-parallel group hold partial sums of one pack, so scale by world size
        # where the per-rank objective must add up rather than average.
        sp = dims.sp_size
        if s.loss_reduction == "token":
            step_trainable = dims.all_reduce_sum([float(sum(trainable))])[0] / sp
            token_scale = dims.world_size / max(step_trainable, 1.0)
        inject_nan = state.step + 1 in self.faults.nan_loss_steps
        loss_sums = []
        for index, batch in enumerate(micro_batches):
            if s.loss_reduction == "pack":
                # InternEvo: each micro-batch's token mean, divided by the micro-batch count
                scale = sp / (max(trainable[index], 1) * count)
            else:
                scale = token_scale
            if inject_nan:
                scale = float("nan")
            if self.sequence_parallel is not None:
                batch = self.sequence_parallel.split(batch)
            loss_sums.append(
                self.engine.forward_backward(
                    batch.to(dims.device),
                    lambda loss, scale=scale: loss * scale,
                    index == count - 1,
                )
            )
            if inject_nan:
                loss_sums[-1] = float("nan")
        tokens = sum(batch.num_tokens for batch in micro_batches)  # full rows, before SP slicing
        if s.loss_reduction == "pack":
            local = sum(loss / max(n, 1) for loss, n in zip(loss_sums, trainable, strict=True))
            local /= count
        else:
            local = sum(loss_sums)
        # one collective for the loss and the step's counts; SP ranks hold the same rows
        summed_loss, step_tokens, step_trainable = dims.all_reduce_sum(
            [local, float(tokens), float(sum(trainable))]
        )
        step_tokens, step_trainable = step_tokens / sp, step_trainable / sp
        if s.loss_reduction == "pack":
            loss = summed_loss / dims.dp_size
        else:
            loss = summed_loss / max(step_trainable, 1.0)
        grad_norm, finite = self.engine.update(lr, s.max_norm, math.isfinite(loss))
        if finite:
            state.updates += 1
            state.consecutive_skips = 0
        else:
            state.skipped_steps += 1
            state.consecutive_skips += 1
        state.step += 1
        elapsed = time.perf_counter() - started
        state.tokens_seen += int(step_tokens)
        flops = sum(
            transformer_flops(
                self.model.config, batch.segment_lengths().tolist(), s.gradient_checkpointing
            )
            for batch in micro_batches
        )
        tflops = flops / elapsed / 1e12 / sp
        record = {
            "step": state.step,
            "epoch": state.epoch,
            "loss": loss,
            "lr": lr,
            "grad_norm": grad_norm,
            "skipped": not finite,
            "micro_batches": count,
            "tokens": int(step_tokens),
            "trainable_tokens": int(step_trainable),
            "tokens_per_s": step_tokens / elapsed,
            "tokens_per_s_per_rank": tokens / sp / elapsed,
            "tflops_per_rank": tflops,
            "mfu": tflops * 1e12 / self.peak_flops if self.peak_flops else None,
            "step_time_s": elapsed,
            "peak_memory_mib": peak_memory_mib(dims.device),
        }
        if not finite:
            logger.warning(
                "step %d: non-finite loss %s or grad norm %s; update skipped (%d in a row)",
                state.step,
                loss,
                grad_norm,
                state.consecutive_skips,
            )
            if state.consecutive_skips >= s.max_consecutive_skipped_steps:
                raise TrainingError(
                    f"{state.consecutive_skips} consecutive steps had a non-finite loss or gradient "
                    f"norm (max_consecutive_skipped_steps={s.max_consecutive_skipped_steps}); "
                    "lower lr, check the data, or use float32"
                )
        return record

    def _micro_batch_stream(self) -> Iterator[PackedBatch]:
        """This rank's micro-batches from the current position, epoch after epoch."""
        s, state = self.settings, self.state
        while s.total_steps is not None or state.epoch < s.max_epochs:
            self.sampler.set_epoch(state.epoch, start=state.consumed_in_epoch)
            loader = DataLoader(
                self.dataset,
                batch_size=s.batch_size,
                sampler=self.sampler,
                collate_fn=self.collator,
                num_workers=s.num_workers,
                drop_last=True,
                persistent_workers=False,
            )
            for batch in loader:
                state.consumed_in_epoch += s.batch_size
                yield batch
            state.epoch += 1
            state.consumed_in_epoch = 0

    def _announce(self) -> None:
        if not self.dims.is_main:
            return
        s, dims = self.settings, self.dims
        described = self.dataset.describe()
        global_batch = dims.dp_size * s.accumulative_counts * s.batch_size
        logger.info(
            "data: %d shards, %d samples, %d tokens -> %d packs of %d (%s)",
            described["shards"],
            described["samples"],
            described["tokens"],
            described["packs"],
            described["packed_length"],
            described["pack_mode"],
        )
        logger.info(
            "global batch = dp %d x accumulative_counts %d x batch_size %d = %d packs "
            "(%d tokens); %d optimizer steps from step %d",
            dims.dp_size,
            s.accumulative_counts,
            s.batch_size,
            global_batch,
            global_batch * s.max_length,
            self.total_steps,
            self.state.step,
        )
        for row in self.sampler.mixture_table():
            logger.info(
                "mixture: %-24s weight %.3g  packs/epoch %10.2f  tokens/epoch %12d  share %.2f%%",
                row["subset"],
                row["weight"],
                row["packs_per_epoch"],
                row["tokens_per_epoch"],
                100 * row["share"],
            )

    # -- checkpoints -------------------------------------------------------------------

    def save_checkpoint(self) -> Path:
        """checkpoint-<step>, written to a temporary folder by every rank, then published."""
        dims, step = self.dims, self.state.step
        temporary = ckpt.temporary_folder(self.work_dir, step)
        if dims.is_main:
            ckpt.prepare_folder(temporary)
        dims.barrier()
        save_dtype = TORCH_DTYPES[self.settings.dtype]
        weights = self.engine.hf_state_dict()
        if dims.is_main:
            self._write_hf_folder(temporary / "hf", weights, save_dtype)
        self.engine.save_state(temporary, weights_saved_exactly=save_dtype == torch.float32)
        self.faults.abort_in_save(step)
        dims.barrier()
        path = self.work_dir / ckpt.checkpoint_name(step)
        if dims.is_main:
            torch.save(ckpt.rng_state(), temporary / "rng.pt")
            ckpt.write_json(temporary / "trainer_state.json", self._trainer_state())
            (temporary / "config.py").write_text(self.loaded.render())
            ckpt.publish(temporary, path)
            removed = ckpt.prune_checkpoints(self.work_dir, self.settings.save_total_limit)
            logger.info("saved %s%s", path, f" (removed {len(removed)} old)" if removed else "")
        dims.barrier()
        return path

    def _write_hf_folder(
        self, folder: Path, weights: dict[str, torch.Tensor], dtype: torch.dtype
    ) -> None:
        cast = {k: v.detach().to(dtype).contiguous() for k, v in weights.items()}
        self.model.save_pretrained(folder, state_dict=cast)
        _portable_config(folder)
        if self.tokenizer is not None:
            self.tokenizer.save_pretrained(folder)

    def _trainer_state(self) -> dict[str, Any]:
        return {
            "state": asdict(self.state),
            "sampler": self.sampler.state_dict(consumed=self.state.consumed_in_epoch),
            "total_steps": self.total_steps,
            "dp_size": self.dims.dp_size,
            "engine": "torch" if self.settings.deepspeed is None else self.settings.deepspeed,
            "dataset": self._dataset_identity(),
        }

    def _dataset_identity(self) -> dict[str, Any]:
        return dict(self.dataset.describe()) | {"folder": self.dataset.corpus.folder}

    def _resume(self, path: Path) -> None:
        if not (path / ckpt.COMPLETE_MARKER).is_file():
            raise ConfigError(
                f"--resume {path}: not a complete evotune checkpoint (no COMPLETE marker)"
            )
        saved = ckpt.read_json(path / "trainer_state.json")
        engine = "torch" if self.settings.deepspeed is None else self.settings.deepspeed
        if saved["engine"] != engine:
            raise ConfigError(
                f"--resume {path}: saved by the {saved['engine']!r} engine, now {engine!r}; resume "
                "with the same --deepspeed setting (or export the HF folder and start a new run)"
            )
        if saved["dp_size"] != self.dims.dp_size:
            raise ConfigError(
                f"--resume {path}: saved with data-parallel size {saved['dp_size']}, now "
                f"{self.dims.dp_size}; resume with the same number of processes / sp size"
            )
        if saved["dataset"] != self._dataset_identity():
            raise ConfigError(
                f"--resume {path}: the dataset or packing changed ({saved['dataset']} -> "
                f"{self._dataset_identity()}); resume with the original data and packing settings"
            )
        self.sampler.load_state_dict(saved["sampler"])
        self.engine.load_state(path)
        ckpt.restore_rng_state(torch.load(path / "rng.pt", weights_only=False))
        self.state = TrainState(**saved["state"])
        logger.info("resumed from %s at step %d", path, self.state.step)


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _has_rope_scaling(config: Any) -> bool:
    rope = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    return rope.get("rope_type", rope.get("type", "default")) != "default"


def _portable_config(hf_dir: Path) -> None:
    """Saved configs must not name evotune's training-only attention functions."""
    config_path = hf_dir / "config.json"
    config = ckpt.read_json(config_path)
    for key in ("_attn_implementation", "attn_implementation"):
        if str(config.get(key, "")).startswith("evotune_"):
            config.pop(key)
    config["use_cache"] = True  # training turned the cache off; generation wants it back
    ckpt.write_json(config_path, config)
