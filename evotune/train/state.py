"""Where a run is: the counters that, with the sampler and RNG states, define it.

This module sits below the trainer, the checkpoint manager and the metrics
component, so all three can share these types without importing each other.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class DataPosition:
    """How far this data-parallel rank has read: epoch, and packs consumed in it.

    Travels with every micro-batch: the position *after* that micro-batch, so the
    state after a step is the position of its last micro-batch.
    """

    epoch: int = 0
    consumed_in_epoch: int = 0


@dataclass
class TrainState:
    """Counters of a run; saved in every checkpoint and restored on resume."""

    step: int = 0  # optimizer steps taken, skipped ones included
    updates: int = 0  # successful updates: drives the LR schedule
    epoch: int = 0
    # packs this DP rank consumed since the epoch's start (or its re-split point, after an
    # elastic resume on another layout)
    consumed_in_epoch: int = 0
    tokens_seen: int = 0
    skipped_steps: int = 0
    consecutive_skips: int = 0

    @property
    def position(self) -> DataPosition:
        return DataPosition(self.epoch, self.consumed_in_epoch)

    def advance(self, position: DataPosition, tokens: int, applied: bool) -> None:
        """Account for one finished optimizer step that read up to ``position``."""
        self.step += 1
        self.epoch, self.consumed_in_epoch = position.epoch, position.consumed_in_epoch
        self.tokens_seen += tokens
        if applied:
            self.updates += 1
            self.consecutive_skips = 0
        else:
            self.skipped_steps += 1
            self.consecutive_skips += 1


class TrainingError(RuntimeError):
    """Training cannot go on (e.g. too many consecutive non-finite steps)."""
