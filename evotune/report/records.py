"""Read a work dir's metrics.jsonl the way every reader must: one record per step.

A run appends one JSON line per optimizer step (and, with validation, lines with
``"kind": "eval"``). Two things make the raw file unfit to plot as is:

* a run that is still going, or was killed, can end in a half-written line;
* after ``--resume auto`` the file holds the killed run's lines for the steps it
  took after the checkpoint, followed by the resumed run's lines for the same
  steps. When a step number does not increase, a new run segment began there: its
  lines replace every earlier line at that step or later (train and eval alike),
  so each step keeps the record of the run that the checkpoints continue.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import ConfigError

METRICS_FILE = "metrics.jsonl"
EVAL_KIND = "eval"


@dataclass
class RunRecords:
    """The step records of one work dir after replayed steps were resolved."""

    work_dir: Path
    train: list[dict[str, Any]] = field(default_factory=list)  # one per step, ascending
    evals: list[dict[str, Any]] = field(default_factory=list)  # one per step, ascending
    superseded: int = 0  # lines replaced by a later run segment (resume replays)
    unreadable: int = 0  # lines that are not JSON (a torn write), skipped
    segments: int = 0  # run segments: 1 for a run never resumed

    def series(self, key: str, records: str = "train") -> tuple[list[int], list[float]]:
        """Steps and finite values of ``key`` (records without it or non-finite are left out)."""
        rows = self.train if records == "train" else self.evals
        steps, values = [], []
        for row in rows:
            value = row.get(key)
            if isinstance(value, bool) or not isinstance(value, int | float):
                continue
            if math.isfinite(value):
                steps.append(row["step"])
                values.append(float(value))
        return steps, values

    def type_names(self, key: str, records: str = "train") -> list[str]:
        """Names found in the per-type dicts ``key`` (e.g. loss_by_type), in first-seen order."""
        rows = self.train if records == "train" else self.evals
        names: dict[str, None] = {}
        for row in rows:
            for name in row.get(key) or {}:
                names[name] = None
        return list(names)

    def typed_series(
        self, key: str, name: str, records: str = "train"
    ) -> tuple[list[int], list[float]]:
        rows = self.train if records == "train" else self.evals
        steps, values = [], []
        for row in rows:
            value = (row.get(key) or {}).get(name)
            if isinstance(value, int | float) and math.isfinite(value):
                steps.append(row["step"])
                values.append(float(value))
        return steps, values


def read_records(work_dir: Path) -> RunRecords:
    """Parse ``work_dir/metrics.jsonl``; a running or killed run's torn line is skipped."""
    work_dir = Path(work_dir)
    path = work_dir / METRICS_FILE
    if not path.is_file():
        hint = "" if work_dir.is_dir() else " (the folder does not exist)"
        raise ConfigError(
            f"{path}: no metrics file{hint}; pass the work dir of an evotune run "
            "(it holds metrics.jsonl once the first step is done)"
        )
    run = RunRecords(work_dir=work_dir)
    train: dict[int, dict[str, Any]] = {}
    evals: dict[int, dict[str, Any]] = {}
    last_train_step: int | None = None
    with open(path, encoding="utf-8", errors="replace") as handle:
        for line in handle:
            record = _parse(line)
            if record is None:
                run.unreadable += bool(line.strip())
                continue
            step = record["step"]
            if record.get("kind", "train") == EVAL_KIND:
                if step in evals:
                    run.superseded += 1
                evals[step] = record
                continue
            if last_train_step is None or step <= last_train_step:
                run.segments += 1
                if last_train_step is not None:
                    run.superseded += _drop_from(train, step) + _drop_from(evals, step)
            train[step] = record
            last_train_step = step
    run.train = [train[step] for step in sorted(train)]
    run.evals = [evals[step] for step in sorted(evals)]
    return run


def _parse(line: str) -> dict[str, Any] | None:
    try:
        record = json.loads(line)
    except json.JSONDecodeError:
        return None
    if not isinstance(record, dict) or not isinstance(record.get("step"), int):
        return None
    return record


def _drop_from(by_step: dict[int, dict[str, Any]], first: int) -> int:
    stale = [step for step in by_step if step >= first]
    for step in stale:
        del by_step[step]
    return len(stale)


def run_label(work_dir: Path, others: list[Path]) -> str:
    """The shortest tail of ``work_dir``'s path that tells it apart from ``others``."""
    parts = Path(work_dir).resolve().parts
    other_parts = [Path(o).resolve().parts for o in others if Path(o) != Path(work_dir)]
    for depth in range(1, len(parts) + 1):
        tail = parts[-depth:]
        if all(o[-depth:] != tail for o in other_parts):
            return "/".join(tail)
    return str(work_dir)
