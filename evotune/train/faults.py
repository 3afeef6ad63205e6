"""Fault injection for evotune's own fault tests (EVOTUNE_FAULT), inert otherwise.

``EVOTUNE_FAULT=nan_loss@3,5`` turns the loss of optimizer steps 3 and 5 into NaN;
``EVOTUNE_FAULT=abort_in_save@4`` kills the process (exit 137, no cleanup) halfway
through writing checkpoint 4, after the weights and before the COMPLETE marker.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

VARIABLE = "EVOTUNE_FAULT"


@dataclass(frozen=True)
class Faults:
    nan_loss_steps: frozenset[int] = field(default_factory=frozenset)
    abort_in_save_steps: frozenset[int] = field(default_factory=frozenset)

    @classmethod
    def from_environment(cls) -> Faults:
        spec = os.environ.get(VARIABLE, "")
        parsed: dict[str, frozenset[int]] = {}
        for item in filter(None, spec.split(";")):
            name, _, steps = item.partition("@")
            parsed[name.strip()] = frozenset(int(s) for s in steps.split(",") if s)
        return cls(parsed.get("nan_loss", frozenset()), parsed.get("abort_in_save", frozenset()))

    def abort_in_save(self, step: int) -> None:
        if step in self.abort_in_save_steps:
            os._exit(137)
