"""What a run reports: step records, FLOPs, MFU/HFU, the console and metrics.jsonl.

``RunLogger`` turns each optimizer step into one record (written to
WORK_DIR/metrics.jsonl on the main rank, the ground truth for every plot and
report), drives the progress bar on a terminal and writes a log line every
``log_interval`` steps (always to train.log; to the console when there is no bar).

FLOPs count what the model needs: each segment's own causal attention, real K/V
widths, real tokens. MFU uses the model's FLOPs only; HFU adds the forward that
activation checkpointing recomputes.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import statistics
import time
from collections import deque
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from ..parallel.dims import ParallelDims
from .reporters import Reporters, dataset_lines
from .state import TrainState

logger = logging.getLogger("evotune")
# step lines: always in train.log; on the console only when no progress bar is shown
step_logger = logging.getLogger("evotune.steps")

# dense bf16 peak per device (FLOP/s), by a substring of torch.cuda.get_device_name()
PEAK_BF16_FLOPS = {
    "H200": 989e12,
    "H100": 989e12,
    "H800": 989e12,
    "A100": 312e12,
    "A800": 312e12,
    "L40S": 362e12,
    "4090": 165e12,
}


def peak_flops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((flops for key, flops in PEAK_BF16_FLOPS.items() if key in name), None)


def peak_memory_mib(device: torch.device) -> float:
    """Peak GPU memory allocated by torch, or the process's peak RSS on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def recomputed_fraction(settings: Any, num_layers: int) -> float:
    """Share of the decoder's forward FLOPs that activation checkpointing runs again.

    Every k-th layer is checkpointed (ceil(L/k) of L); the 'save_matmuls' policy keeps
    matmul outputs, so it recomputes (almost) no FLOPs.
    """
    if not settings.gradient_checkpointing or settings.activation_checkpointing_policy != "full":
        return 0.0
    every = settings.activation_checkpointing_every
    return -(-num_layers // every) / num_layers


def transformer_flops(config: Any, segment_lengths: list[int], recomputed: float = 0.0) -> float:
    """Training FLOPs of one packed row for a Llama-style decoder.

    Linear layers: 2 FLOPs per weight per token with the real K/V width (GQA).
    Attention: causal work of each segment alone, 2 matmuls of 2*h*L(L+1)/2.
    Backward = 2x forward; ``recomputed`` adds that share of one more forward (HFU).
    """
    hidden = config.hidden_size
    layers = config.num_hidden_layers
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or hidden // heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    intermediate = config.intermediate_size
    vocab = config.vocab_size
    tokens = sum(segment_lengths)
    q_width, kv_width = heads * head_dim, kv_heads * head_dim
    linear_weights_per_layer = hidden * (2 * q_width + 2 * kv_width) + 3 * hidden * intermediate
    linear = 2 * tokens * (layers * linear_weights_per_layer + hidden * vocab)
    causal_pairs = sum(length * (length + 1) // 2 for length in segment_lengths)
    attention = layers * 2 * (2 * q_width * causal_pairs)
    forward = linear + attention
    return forward * (3 + recomputed)


class MetricsLog:
    """One JSON object per optimizer step in WORK_DIR/metrics.jsonl (main rank only)."""

    def __init__(self, path: Path | None):
        self.path = path
        # held open for the whole run, closed by close()
        self._handle = open(path, "a", buffering=1) if path is not None else None  # noqa: SIM115

    def write(self, record: dict[str, Any]) -> None:
        if self._handle is None:
            return
        clean = {
            k: (None if isinstance(v, float) and not math.isfinite(v) else v)
            for k, v in record.items()
        }
        self._handle.write(json.dumps(clean) + "\n")

    def close(self) -> None:
        if self._handle is not None:
            self._handle.close()
            self._handle = None


class RunLogger:
    """Step records, the progress bar and the periodic log line of one run."""

    def __init__(
        self,
        work_dir: Path,
        dims: ParallelDims,
        model_config: Any,
        total_steps: int,
        start_step: int,
        log_interval: int,
        recomputed: float,
        show_progress: bool,
        reporters: Reporters | None = None,
    ):
        self.dims = dims
        self.reporters = reporters or Reporters()  # TensorBoard / W&B: the same records
        self.model_config = model_config
        self.total_steps = total_steps
        self.log_interval = log_interval
        self.recomputed = recomputed  # share of the forward run again (HFU counts it)
        self.peak_flops = peak_flops(dims.device)
        self.jsonl = MetricsLog(work_dir / "metrics.jsonl" if dims.is_main else None)
        self.recent_losses: deque[float] = deque(maxlen=log_interval)
        self.started = time.perf_counter()
        self.start_step = start_step
        columns = shutil.get_terminal_size((100, 20)).columns
        self.progress = tqdm(
            total=total_steps,
            initial=start_step,
            disable=not (show_progress and dims.is_main),
            ncols=None if columns >= 40 else 100,  # a 0-column terminal would show nothing
            dynamic_ncols=columns >= 40,
            desc="train",
        )

    def record(
        self,
        state: TrainState,
        *,
        loss: float,
        aux_loss: float | None,
        loss_by_type: dict[str, tuple[float, int]] | None = None,
        lr: float,
        grad_norm: float,
        applied: bool,
        segment_lengths: list[list[int]],
        tokens: int,
        trainable: int,
        elapsed: float,
    ) -> dict[str, Any]:
        """One step's record; ``tokens``/``trainable`` count the whole step over all ranks."""
        sp = self.dims.sp_size
        row_tokens = sum(sum(lengths) for lengths in segment_lengths)
        model_flops = sum(
            transformer_flops(self.model_config, lengths) for lengths in segment_lengths
        )
        hardware_flops = sum(
            transformer_flops(self.model_config, lengths, self.recomputed)
            for lengths in segment_lengths
        )
        tflops = model_flops / elapsed / 1e12 / sp  # an SP group shares each row's work
        record: dict[str, Any] = {
            "step": state.step,
            "epoch": state.epoch,
            "loss": loss,
            "lr": lr,
            "grad_norm": grad_norm,
            "skipped": not applied,
            "micro_batches": len(segment_lengths),
            "tokens": tokens,
            "trainable_tokens": trainable,
            "tokens_per_s": tokens / elapsed,
            "tokens_per_s_per_rank": row_tokens / sp / elapsed,
            "tflops_per_rank": tflops,
            "mfu": self._utilisation(model_flops / sp, elapsed),
            "hfu": self._utilisation(hardware_flops / sp, elapsed),
            "step_time_s": elapsed,
            "peak_memory_mib": peak_memory_mib(self.dims.device),
            "time": time.time(),
        }
        if aux_loss is not None:
            record["aux_loss"] = aux_loss
        if loss_by_type:  # token mean loss and trainable tokens of each data type in the step
            record["loss_by_type"] = {name: mean for name, (mean, _) in loss_by_type.items()}
            record["trainable_tokens_by_type"] = {
                name: count for name, (_, count) in loss_by_type.items()
            }
        return record

    def _utilisation(self, flops: float, elapsed: float) -> float | None:
        return flops / elapsed / self.peak_flops if self.peak_flops else None

    def log(self, record: dict[str, Any]) -> None:
        self.write(record)
        self.recent_losses.append(record["loss"])
        self.progress.update(1)
        self.progress.set_postfix(
            loss=f"{record['loss']:.4f}",
            lr=f"{record['lr']:.2e}",
            gnorm=f"{record['grad_norm']:.3f}",
            tok_s=f"{record['tokens_per_s']:.0f}",
            refresh=False,
        )
        step = record["step"]
        if self.dims.is_main and (step % self.log_interval == 0 or step == 1):
            step_logger.info(self._line(record))

    def _line(self, record: dict[str, Any]) -> str:
        step = record["step"]
        done = step - self.start_step
        per_step = (time.perf_counter() - self.started) / max(done, 1)
        eta = _duration(per_step * (self.total_steps - step))
        finite = [loss for loss in self.recent_losses if math.isfinite(loss)]
        smoothed = statistics.fmean(finite) if finite else float("nan")
        parts = [
            f"step {step}/{self.total_steps}",
            f"epoch {record['epoch']}",
            f"loss {record['loss']:.4f} (mean of last {len(self.recent_losses)}: {smoothed:.4f})",
            f"lr {record['lr']:.3e}",
            f"grad_norm {record['grad_norm']:.3f}",
            f"tokens/s {record['tokens_per_s']:.0f}",
        ]
        if record["mfu"] is not None:
            parts.append(f"mfu {100 * record['mfu']:.1f}%")
        parts += [f"peak_mem {record['peak_memory_mib']:.0f} MiB", f"eta {eta}"]
        return " | ".join(parts)

    def write(self, record: dict[str, Any]) -> None:
        """Any record (a step's, a validation's): metrics.jsonl, then the reporters."""
        self.jsonl.write(record)
        self.reporters.write(record)

    def close(self) -> None:
        self.progress.close()
        self.jsonl.close()
        self.reporters.close()


def _duration(seconds: float) -> str:
    seconds = max(0, int(seconds))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}"


def log_start_banner(
    settings: Any,
    dims: ParallelDims,
    dataset: Any,
    tokenizer: Any,
    sampler: Any,
    *,
    engine: str,
    total_steps: int,
    start_step: int,
    validation: str | None,
) -> None:
    """What the run reads and how it is laid out, before the first step (main rank)."""
    s = settings
    described = dataset.describe()
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
    for line in dataset_lines("data", dataset, tokenizer):
        logger.info("%s", line)
    if validation is not None:
        logger.info("%s", validation)
    logger.info(
        "layout: world %d = dp %d x sp %d; engine %s",
        dims.world_size,
        dims.dp_size,
        dims.sp_size,
        engine,
    )
    logger.info(
        "global batch = dp %d x accumulative_counts %d x batch_size %d = %d packs "
        "(%d tokens); %d optimizer steps from step %d",
        dims.dp_size,
        s.accumulative_counts,
        s.batch_size,
        global_batch,
        global_batch * s.max_length,
        total_steps,
        start_step,
    )
    for row in sampler.mixture_table():
        logger.info(
            "mixture: %-24s weight %.3g  packs/epoch %10.2f  tokens/epoch %12d  share %.2f%%",
            row["subset"],
            row["weight"],
            row["packs_per_epoch"],
            row["tokens_per_epoch"],
            100 * row["share"],
        )
