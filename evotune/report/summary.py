"""``evotune report``: one screen that says where a run stands and how it went.

Everything comes from files the run leaves in its work dir: metrics.jsonl (one
record per step, replayed steps resolved as in records.py), the newest
checkpoint's trainer_state.json, train.log (the step total while no checkpoint
exists yet), the checkpoint folders and the ``.lock`` file a live run holds.
"""

from __future__ import annotations

import json
import os
import re
import socket
import statistics
import time
from pathlib import Path
from typing import Any

from .records import METRICS_FILE, RunRecords, read_records

LOCK_FILE = ".lock"
LOG_FILE = "train.log"
LAST_WINDOW = 50  # steps averaged for "the loss now": one step alone is too noisy to compare
_LOG_PROGRESS = re.compile(r"step (\d+)/(\d+)")
_LOG_TOTAL = re.compile(r"(\d+) optimizer steps from step \d+")


def summarize(work_dir: Path, verify: bool = False) -> dict[str, Any]:
    """The run's state as a JSON-ready dict; ``verify`` checks every checkpoint's manifest."""
    work_dir = Path(work_dir)
    started = any((work_dir / name).exists() for name in (LOCK_FILE, LOG_FILE, "config.py"))
    if started and not (work_dir / METRICS_FILE).exists():
        run = RunRecords(work_dir=work_dir)  # a run that has not finished its first step
    else:
        run = read_records(work_dir)
    last = run.train[-1] if run.train else {}
    checkpoints = _checkpoints(work_dir, verify)
    total = _total_steps(work_dir, checkpoints)
    done = last.get("step", 0)
    step_times = _values(run, "step_time_s")
    summary: dict[str, Any] = {
        "work_dir": str(work_dir),
        "status": _status(work_dir, done, total),
        "steps": {
            "done": done,
            "total": total,
            "epoch": last.get("epoch"),
            "skipped": sum(1 for row in run.train if row.get("skipped")),
            "skipped_at": [row["step"] for row in run.train if row.get("skipped")][:20],
        },
        "tokens": {
            "total": sum(row.get("tokens") or 0 for row in run.train),
            "trainable": sum(row.get("trainable_tokens") or 0 for row in run.train),
        },
        "time": {
            "in_steps_s": sum(step_times),
            "wall_s": _wall_time(run),
            "eta_s": (total - done) * statistics.median(step_times)
            if total and step_times and done < total
            else None,
        },
        "throughput": {
            "tokens_per_s_median": _median(run, "tokens_per_s"),
            "step_time_s_median": _median(run, "step_time_s"),
            "tflops_per_rank_median": _median(run, "tflops_per_rank"),
            "mfu_median": _median(run, "mfu"),
            "hfu_median": _median(run, "hfu"),
            "peak_memory_mib": max(_values(run, "peak_memory_mib"), default=None),
        },
        "loss": _training_loss(run),
        "validation": _validation(run),
        "checkpoints": checkpoints,
        "records": {
            "steps": len(run.train),
            "evals": len(run.evals),
            "run_segments": run.segments,
            "superseded": run.superseded,
            "unreadable": run.unreadable,
        },
    }
    return summary


def format_summary(summary: dict[str, Any]) -> str:
    """The summary as at most about 25 lines of text."""
    steps, tokens, times = summary["steps"], summary["tokens"], summary["time"]
    speed, loss, status = summary["throughput"], summary["loss"], summary["status"]
    total = steps["total"]
    progress = f"{steps['done']}/{total}" if total else f"{steps['done']}/?"
    if total:
        progress += f" ({100 * steps['done'] / total:.1f}%)"
    lines = [
        f"run       {summary['work_dir']}",
        f"status    {status['text']}",
        f"steps     {progress}, epoch {steps['epoch']}, skipped {steps['skipped']}"
        + (f" (at {', '.join(map(str, steps['skipped_at']))})" if steps["skipped"] else "")
        if steps["done"]
        else f"steps     {progress}: no step finished yet",
        f"tokens    {_count(tokens['total'])} ({_count(tokens['trainable'])} trained on)",
        "time      "
        + ", ".join(
            part
            for part in (
                f"{_duration(times['wall_s'])} wall" if times["wall_s"] is not None else None,
                f"{_duration(times['in_steps_s'])} in steps",
                f"ETA {_duration(times['eta_s'])}" if times["eta_s"] is not None else None,
            )
            if part
        ),
        "speed     "
        + ", ".join(
            part
            for part in (
                f"{_number(speed['tokens_per_s_median'])} tokens/s (median)",
                f"{speed['step_time_s_median']:.3g} s/step"
                if speed["step_time_s_median"] is not None
                else None,
                f"{speed['tflops_per_rank_median']:.3g} TFLOP/s per rank"
                if speed["tflops_per_rank_median"] is not None
                else None,
                f"MFU {100 * speed['mfu_median']:.1f}%"
                if speed["mfu_median"] is not None
                else None,
                f"HFU {100 * speed['hfu_median']:.1f}%"
                if speed["hfu_median"] is not None
                else None,
                f"peak memory {speed['peak_memory_mib']:.0f} MiB"
                if speed["peak_memory_mib"] is not None
                else None,
            )
            if part
        ),
        f"loss      last {LAST_WINDOW}-step mean {_loss(loss['last_mean'])}"
        f" (first {_loss(loss['first_mean'])}, lowest step {_loss(loss['min'])})",
    ]
    for name, value in loss["by_type_last_mean"].items():
        lines.append(f"  {name:<14}{_loss(value)}")
    validation = summary["validation"]
    if validation is None:
        lines.append("validation none recorded")
    else:
        lines.append(f"validation {'':<13}{'best':>8} {'at step':>8} {'last':>8} {'at step':>8}")
        for name, row in {"overall": validation["overall"], **validation["by_type"]}.items():
            lines.append(
                f"  {name:<21}{_loss(row['best']):>8} {row['best_step']:>8} "
                f"{_loss(row['last']):>8} {row['last_step']:>8}"
            )
    checkpoints = summary["checkpoints"]
    complete = checkpoints["complete"]
    if complete:
        newest = complete[-1]
        lines.append(
            f"checkpoints {len(complete)} complete, {_size(sum(c['bytes'] for c in complete))}; "
            f"newest {newest['name']} ({_size(newest['bytes'])})"
        )
        for entry in complete[-4:]:
            lines.append(f"  {entry['name']}  {_size(entry['bytes']):>9}  {_integrity(entry)}")
    else:
        lines.append("checkpoints none complete yet")
    if checkpoints["incomplete"]:
        lines.append(f"  unfinished (never loaded): {', '.join(checkpoints['incomplete'])}")
    records = summary["records"]
    notes = []
    if records["run_segments"] > 1:
        notes.append(
            f"resumed {records['run_segments'] - 1}x; {records['superseded']} replayed "
            "records superseded by the resumed run"
        )
    if records["unreadable"]:
        notes.append(f"{records['unreadable']} unreadable line(s) skipped")
    if notes:
        lines.append(f"records   {'; '.join(notes)}")
    return "\n".join(lines)


# -- parts -----------------------------------------------------------------------------


def _values(run: RunRecords, key: str) -> list[float]:
    return run.series(key)[1]


def _median(run: RunRecords, key: str) -> float | None:
    values = _values(run, key)
    return statistics.median(values) if values else None


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def _training_loss(run: RunRecords) -> dict[str, Any]:
    losses = _values(run, "loss")
    by_type = {}
    for name in run.type_names("loss_by_type"):
        values = run.typed_series("loss_by_type", name)[1]
        by_type[name] = _mean(values[-LAST_WINDOW:])
    return {
        "last": losses[-1] if losses else None,
        "last_mean": _mean(losses[-LAST_WINDOW:]),
        "first_mean": _mean(losses[:LAST_WINDOW]),
        "min": min(losses, default=None),
        "by_type_last_mean": by_type,
    }


def _validation(run: RunRecords) -> dict[str, Any] | None:
    if not run.evals:
        return None
    overall = _best_and_last(*run.series("val_loss", "eval"))
    by_type = {
        name: _best_and_last(*run.typed_series("val_loss_by_type", name, "eval"))
        for name in run.type_names("val_loss_by_type", "eval")
    }
    return {"overall": overall, "by_type": by_type}


def _best_and_last(steps: list[int], values: list[float]) -> dict[str, Any]:
    if not steps:
        return {"best": None, "best_step": "-", "last": None, "last_step": "-"}
    best = min(range(len(values)), key=values.__getitem__)
    return {
        "best": values[best],
        "best_step": steps[best],
        "last": values[-1],
        "last_step": steps[-1],
    }


def _wall_time(run: RunRecords) -> float | None:
    """From the start of the first kept step to the last record, pauses between resumes included.

    Needs a ``time`` stamp (seconds since the epoch) in the records; None without one.
    """
    stamped = [row for row in run.train if isinstance(row.get("time"), int | float)]
    if not stamped:
        return None
    first, last = stamped[0], stamped[-1]
    return float(last["time"] - first["time"] + (first.get("step_time_s") or 0.0))


def _total_steps(work_dir: Path, checkpoints: dict[str, Any]) -> int | None:
    for entry in reversed(checkpoints["complete"]):
        state = Path(entry["path"]) / "trainer_state.json"
        try:
            total = json.loads(state.read_text()).get("total_steps")
        except (OSError, ValueError):
            continue
        if isinstance(total, int):
            return total
    log = work_dir / LOG_FILE
    if log.is_file():
        total = None  # the last one named: a resumed run appends to the same log
        with open(log, encoding="utf-8", errors="replace") as handle:
            for line in handle:
                if match := _LOG_PROGRESS.search(line):
                    total = int(match[2])
                elif match := _LOG_TOTAL.search(line):
                    total = int(match[1])
        return total
    return None


def _checkpoints(work_dir: Path, verify: bool) -> dict[str, Any]:
    from ..train import checkpoint as ckpt

    complete = []
    for path in ckpt.complete_checkpoints(work_dir):
        entry: dict[str, Any] = {
            "name": path.name,
            "path": str(path),
            "step": ckpt.checkpoint_step(path),
            "bytes": _folder_bytes(path),
            "manifest": (path / ckpt.MANIFEST_FILE).is_file(),
        }
        if verify:
            entry["problems"] = ckpt.verify_checkpoint(path)
        complete.append(entry)
    incomplete = sorted(p.name for p in work_dir.glob(".checkpoint-*.tmp"))
    incomplete += sorted(
        p.name
        for p in work_dir.glob("checkpoint-*")
        if p.is_dir() and not (p / ckpt.COMPLETE_MARKER).is_file()
    )
    return {
        "complete": complete,
        "newest": complete[-1]["path"] if complete else None,
        "incomplete": incomplete,
    }


def _folder_bytes(folder: Path) -> int:
    return sum(
        os.path.getsize(os.path.join(directory, name))
        for directory, _, files in os.walk(folder)
        for name in files
    )


def read_lock(work_dir: Path) -> dict[str, Any] | None:
    """The holder of ``work_dir/.lock`` (JSON or ``key=value``/``host pid`` text), if any."""
    path = Path(work_dir) / LOCK_FILE
    try:
        text = path.read_text().strip()
    except FileNotFoundError:
        return None
    except OSError as error:
        return {"raw": f"unreadable: {error}"}
    holder: dict[str, Any] = {}
    try:
        parsed = json.loads(text)
        if isinstance(parsed, dict):
            holder = dict(parsed)
    except ValueError:
        pairs = re.findall(r"(\w+)\s*[=:]\s*(\S+)", text)
        if pairs:
            holder = dict(pairs)
        else:
            words = text.split()
            if len(words) >= 2 and words[1].isdigit():
                holder = {"host": words[0], "pid": words[1]}
    host = holder.get("host", holder.get("hostname"))
    pid = holder.get("pid")
    return {
        "host": None if host is None else str(host),
        "pid": int(str(pid)) if str(pid).isdigit() else None,
        "raw": text[:200],
    }


def _status(work_dir: Path, done: int, total: int | None) -> dict[str, Any]:
    lock = read_lock(work_dir)
    metrics = work_dir / METRICS_FILE
    idle_s = time.time() - metrics.stat().st_mtime if metrics.exists() else None
    finished = total is not None and done >= total
    since = f"; last record {_duration(idle_s)} ago" if idle_s is not None else ""
    if lock is not None:
        holder = f"host {lock['host']} pid {lock['pid']}"
        alive = _alive(lock)
        if alive is True:
            return {"state": "running", "lock": lock, "text": f"running ({holder}){since}"}
        if alive is None:
            return {
                "state": "running",
                "lock": lock,
                "text": f"running on another host? lock held by {holder} "
                f"(cannot check from {socket.gethostname()}){since}",
            }
        state = "finished" if finished else "stopped"
        return {
            "state": state,
            "lock": lock,
            "text": f"{state}; stale lock from {holder} (process gone){since}",
        }
    if finished:
        return {"state": "finished", "lock": None, "text": f"finished{since}"}
    return {
        "state": "stopped",
        "lock": None,
        "text": f"not finished, no lock held (stopped, or run by an evotune without locks){since}",
    }


def _alive(lock: dict[str, Any]) -> bool | None:
    """True/False for a process of this host; None when the lock names another host."""
    if lock["host"] not in (None, socket.gethostname()) or lock["pid"] is None:
        return None
    try:
        os.kill(lock["pid"], 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by another user
    return True


def _integrity(entry: dict[str, Any]) -> str:
    if "problems" in entry:
        return "verified" if not entry["problems"] else "BROKEN: " + "; ".join(entry["problems"])
    return "manifest" if entry["manifest"] else "no manifest (older run)"


def _loss(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


def _count(value: float) -> str:
    for unit, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if value >= scale:
            return f"{value / scale:.2f}{unit}"
    return f"{value:.0f}"


def _number(value: float | None) -> str:
    return "-" if value is None else _count(value)


def _size(value: float) -> str:
    for unit, scale in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if value >= scale:
            return f"{value / scale:.1f} {unit}"
    return f"{value:.0f} B"


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    seconds = max(0.0, seconds)
    if seconds < 60:
        return f"{seconds:.1f}s"
    minutes, secs = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    days, hours = divmod(hours, 24)
    if days:
        return f"{days}d{hours:02d}h{minutes:02d}m"
    if hours:
        return f"{hours}h{minutes:02d}m"
    return f"{minutes}m{secs:02d}s"
