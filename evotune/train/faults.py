"""Fault injection for evotune's own fault tests (EVOTUNE_FAULT), built only when asked.

``EVOTUNE_FAULT=nan_loss@3,5`` turns the loss of optimizer steps 3 and 5 into NaN;
``EVOTUNE_FAULT=abort_in_save@4`` kills the process (exit 137, no cleanup) halfway
through writing checkpoint 4, after the engine state and before the COMPLETE marker;
``EVOTUNE_FAULT=slow_step@0.5`` makes every micro-batch take 0.5 s longer (time for
a test to send a signal mid-run). Items are separated by ``;``.
Without the variable the trainer uses its engine as is: nothing here is on the
hot path.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..data.collate import PackedBatch
from ..model.loss import PackedLoss
from ..parallel.engine import Engine

VARIABLE = "EVOTUNE_FAULT"


@dataclass(frozen=True)
class Faults:
    nan_loss_steps: frozenset[int] = field(default_factory=frozenset)
    abort_in_save_steps: frozenset[int] = field(default_factory=frozenset)
    step_delay_s: float = 0.0

    @classmethod
    def from_environment(cls) -> Faults | None:
        spec = os.environ.get(VARIABLE, "")
        if not spec:
            return None
        parsed: dict[str, str] = {}
        for item in filter(None, spec.split(";")):
            name, _, value = item.partition("@")
            parsed[name.strip()] = value

        def steps(name: str) -> frozenset[int]:
            return frozenset(int(s) for s in parsed.get(name, "").split(",") if s)

        delay = float(parsed.get("slow_step", 0.0))
        return cls(steps("nan_loss"), steps("abort_in_save"), delay)


class FaultInjectingEngine:
    """An engine that misbehaves at chosen steps; everything else goes to the real one."""

    def __init__(self, engine: Engine, faults: Faults, current_step: Callable[[], int]):
        self._engine = engine
        self._faults = faults
        self._current_step = current_step  # optimizer steps finished so far

    def __getattr__(self, name: str) -> Any:
        return getattr(self._engine, name)

    def forward_backward(
        self, batch: PackedBatch, weight: float, aux_weight: float, sync: bool
    ) -> PackedLoss:
        time.sleep(self._faults.step_delay_s)
        if self._current_step() + 1 not in self._faults.nan_loss_steps:
            return self._engine.forward_backward(batch, weight, aux_weight, sync)
        self._engine.forward_backward(batch, float("nan"), aux_weight, sync)
        return PackedLoss(torch.tensor(float("nan")))

    def save_state(self, folder: Path, weights_saved_exactly: bool) -> None:
        self._engine.save_state(folder, weights_saved_exactly)
        if self._current_step() in self._faults.abort_in_save_steps:
            os._exit(137)
