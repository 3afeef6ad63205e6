"""Stop requests: a signal means "finish this step, save, exit"; a second one, "now".

Slurm and Kubernetes send SIGTERM before preemption, a terminal sends SIGINT. The
handler only records the signal. The trainer folds the flag into the step's one
reduction, so every rank sees the request at the same step, finishes it, saves one
checkpoint, and the run exits with 128 + the signal's number (143 for SIGTERM,
130 for SIGINT) after a line saying how to continue.
"""

from __future__ import annotations

import os
import signal
import sys
from collections.abc import Callable
from pathlib import Path
from types import FrameType

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


class Preempted(Exception):
    """The run stopped on a signal after saving ``checkpoint``."""

    def __init__(self, signal_number: int, step: int, checkpoint: Path | None):
        name = signal.Signals(signal_number).name
        where = f"saved {checkpoint}" if checkpoint else "nothing to save"
        super().__init__(
            f"stopped by {name} after step {step}; {where}; continue with --resume auto"
        )
        self.exit_code = 128 + signal_number


class StopRequest:
    """Records the first stop signal; a second one aborts the process at once."""

    def __init__(self) -> None:
        self.signal_number: int | None = None

    @property
    def requested(self) -> bool:
        return self.signal_number is not None

    def install(self) -> Callable[[], None]:
        """Install the handlers (main thread only); returns a function that restores them."""
        previous = {number: signal.getsignal(number) for number in STOP_SIGNALS}
        for number in STOP_SIGNALS:
            signal.signal(number, self._on_signal)

        def restore() -> None:
            for number, handler in previous.items():
                signal.signal(number, handler)

        return restore

    def _on_signal(self, number: int, frame: FrameType | None) -> None:
        if self.signal_number is not None:
            print(
                f"evotune: {signal.Signals(number).name} again: aborting without saving",
                file=sys.stderr,
                flush=True,
            )
            os._exit(128 + number)
        self.signal_number = number
        print(
            f"evotune: {signal.Signals(number).name} received: finishing this step and saving "
            "(send it again to abort at once)",
            file=sys.stderr,
            flush=True,
        )
