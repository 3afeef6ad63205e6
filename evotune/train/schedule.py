"""Learning-rate schedules as closed forms of the update count (training.md section 3).

``k`` counts successful optimizer updates from 0; skipped (non-finite) steps do
not advance it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class LRSchedule:
    kind: str  # 'internevo' | 'xtuner' | 'constant'
    base_lr: float
    total_steps: int
    warmup_ratio: float = 0.0
    eta_min: float = 0.0
    init_steps: int = 0

    def __call__(self, k: int) -> float:
        if self.kind == "internevo":
            return internevo_lr(
                k, self.base_lr, self.total_steps, self.warmup_ratio, self.eta_min, self.init_steps
            )
        if self.kind == "xtuner":
            return xtuner_lr(k, self.base_lr, self.total_steps, self.warmup_ratio, self.eta_min)
        if self.kind == "constant":
            return self.base_lr
        raise ValueError(f"unknown lr_schedule {self.kind!r}")


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


def xtuner_lr(k: int, base: float, total_steps: int, warmup_ratio: float, eta_min: float) -> float:
    """XTuner's template: linear warm-up from base/40, then cosine down to eta_min."""
    warmup = int(total_steps * warmup_ratio)
    if k < warmup:
        start_factor = 1.0 / 40
        fraction = k / (warmup - 1) if warmup > 1 else 1.0
        return base * (start_factor + (1 - start_factor) * fraction)
    cosine_steps = total_steps - warmup
    if cosine_steps <= 0:
        return base
    progress = min(k - warmup, cosine_steps) / cosine_steps
    return eta_min + (base - eta_min) * (1 + math.cos(math.pi * progress)) / 2
