"""Learning-rate schedules as closed forms (docs/training.md#learning-rate).

``k`` counts successful optimizer updates from 0; skipped (non-finite) steps do
not advance it.

The 'xtuner' schedule is mmengine's ``LinearLR(start_factor, begin=0, end=W)``
followed by ``CosineAnnealingLR(eta_min, begin=W, end=T)``, as XTuner v0.1 configs
chain them. mmengine defines both recursively (each step multiplies the LR the
previous step left); unrolled, with ``n`` the step inside each scheduler's range:

* warm-up, n in [0, W): factor ``s + (1 - s) * n / (W - 1)`` (just ``s`` when W = 1),
  so the last warm-up step runs at the full LR;
* cosine, n in [0, T - W): ``eta_min + (L - eta_min) * (1 + cos(pi * n / (T - W))) / 2``
  where L is the LR the warm-up left: ``base`` when W >= 2 or W = 0, but
  ``base * s`` when W = 1 (the chain starts from the current value, not from base);
* after T the last value stays (mmengine stops updating outside [begin, end)).

XTuner steps its schedulers once per iteration (micro-batch), not once per
optimizer update: with ``step_unit='micro_batch'`` the update k runs at the LR of
iteration ``min((k + 1) * accumulative_counts, T) - 1``, the iteration whose
backward completes the accumulation. Warm-up and total lengths are then counted
in micro-batches, as mmengine's ``convert_to_iter_based`` counts them:
``W = int(warmup_ratio * max_epochs * iterations_per_epoch)``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from ..config.schema import LRStepUnit, choices

XTUNER_START_FACTOR = 1.0 / 40
"""start_factor of the LinearLR warm-up in XTuner's config templates."""

STEP_UNITS = choices(LRStepUnit)


@dataclass(frozen=True)
class LRSchedule:
    """The LR of every optimizer update of a run.

    ``warmup_start_factor``, ``step_unit``, ``accumulative_counts``,
    ``warmup_micro_batches`` and ``total_micro_batches`` apply to kind 'xtuner'
    only. With step_unit 'micro_batch' the two lengths are in micro-batches;
    None derives them from ``total_steps * accumulative_counts`` and
    ``warmup_ratio`` (a run that sets total_steps rather than max_epochs).
    """

    kind: str  # 'internevo' | 'xtuner' | 'constant'
    base_lr: float
    total_steps: int
    warmup_ratio: float = 0.0
    eta_min: float = 0.0
    init_steps: int = 0
    warmup_start_factor: float = XTUNER_START_FACTOR
    step_unit: str = "update"
    accumulative_counts: int = 1
    warmup_micro_batches: int | None = None
    total_micro_batches: int | None = None

    def __post_init__(self) -> None:
        if self.step_unit not in STEP_UNITS:
            raise ValueError(f"step_unit={self.step_unit!r}: choose one of {STEP_UNITS}")
        if self.step_unit == "micro_batch" and self.kind != "xtuner":
            raise ValueError("step_unit='micro_batch' is XTuner's stepping: lr_schedule='xtuner'")
        if not 0.0 <= self.warmup_start_factor <= 1.0:
            raise ValueError(f"warmup_start_factor={self.warmup_start_factor} is not in [0, 1]")
        if self.accumulative_counts < 1:
            raise ValueError(f"accumulative_counts={self.accumulative_counts} must be >= 1")

    def __call__(self, k: int) -> float:
        if self.kind == "internevo":
            return internevo_lr(
                k, self.base_lr, self.total_steps, self.warmup_ratio, self.eta_min, self.init_steps
            )
        if self.kind == "xtuner":
            if self.step_unit == "micro_batch":
                total, warmup = self.micro_batch_lengths()
                iteration = update_iteration(k, self.accumulative_counts, total)
                return xtuner_iteration_lr(
                    iteration, self.base_lr, warmup, total, self.warmup_start_factor, self.eta_min
                )
            return xtuner_lr(
                k,
                self.base_lr,
                self.total_steps,
                self.warmup_ratio,
                self.eta_min,
                self.warmup_start_factor,
            )
        if self.kind == "constant":
            return self.base_lr
        raise ValueError(f"unknown lr_schedule {self.kind!r}")

    def micro_batch_lengths(self) -> tuple[int, int]:
        """(total, warm-up) in micro-batches for step_unit 'micro_batch'."""
        total = self.total_micro_batches
        if total is None:
            total = self.total_steps * self.accumulative_counts
        warmup = self.warmup_micro_batches
        if warmup is None:
            warmup = int(self.warmup_ratio * total)
        return total, warmup


def internevo_lr(
    k: int, base: float, total_steps: int, warmup_ratio: float, eta_min: float, init_steps: int = 0
) -> float:
    """InternEvo FineTuneCosineAnnealingWarmupLR as a closed form."""
    warmup = int(total_steps * warmup_ratio)
    cosine_start = init_steps + warmup
    cosine_steps = total_steps - cosine_start
    if k < init_steps:
        return 0.0
    if k < cosine_start:
        return base * (k + 1 - init_steps) / warmup
    if cosine_steps <= 0:
        return base
    progress = min(k - cosine_start, cosine_steps) / cosine_steps
    return eta_min + (base - eta_min) * (1 + math.cos(math.pi * progress)) / 2


def xtuner_lr(
    k: int,
    base: float,
    total_steps: int,
    warmup_ratio: float,
    eta_min: float,
    start_factor: float = XTUNER_START_FACTOR,
) -> float:
    """XTuner's LinearLR + CosineAnnealingLR counted in optimizer updates (evotune's default)."""
    warmup = int(total_steps * warmup_ratio)
    return xtuner_iteration_lr(k, base, warmup, total_steps, start_factor, eta_min)


def xtuner_iteration_lr(
    iteration: int,
    base: float,
    warmup: int,
    total: int,
    start_factor: float,
    eta_min: float,
) -> float:
    """LR in force during ``iteration`` (from 0) of LinearLR(0, warmup) + Cosine(warmup, total)."""
    if iteration < warmup:
        span = warmup - 1
        factor = start_factor + (1.0 - start_factor) * iteration / span if span else start_factor
        return base * factor
    # The cosine chain starts from the LR the warm-up left behind.
    peak = base * start_factor if warmup == 1 else base
    cosine_steps = total - warmup
    if cosine_steps <= 0:
        return peak
    step = min(iteration - warmup, cosine_steps - 1)
    return eta_min + (peak - eta_min) * (1 + math.cos(math.pi * step / cosine_steps)) / 2


def update_iteration(k: int, accumulative_counts: int, total_micro_batches: int) -> int:
    """The micro-batch (from 0) whose backward completes optimizer update ``k``.

    The last update may accumulate fewer micro-batches: it runs at the run's last one.
    """
    return min((k + 1) * accumulative_counts, max(total_micro_batches, 1)) - 1


def xtuner_warmup_micro_batches(
    warmup_ratio: float, max_epochs: int, micro_batches_per_epoch: int
) -> int:
    """mmengine's ``int(end * epoch_length)`` with XTuner's ``end = warm_up_ratio * max_epochs``.

    The product is evaluated in XTuner's order so the float rounds the same way.
    """
    return int(warmup_ratio * max_epochs * micro_batches_per_epoch)
