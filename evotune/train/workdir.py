"""One run per work dir: a lock, and no silent mixing with an earlier run's output.

* ``.lock`` holds the host, pid and start time of the run that owns the folder; a
  second run is refused naming them. A lock left by a dead process on this host
  is taken over with a warning.
* A work dir that already holds checkpoints is continued (``--resume``) or
  cleared (``--overwrite``), never both and never silently: otherwise a new run's
  pruning would delete the old run's checkpoints and ``--resume auto`` would
  later pick the wrong run.
* Resuming from a checkpoint older than the newest one is refused: the newer ones
  belong to a timeline the run would abandon.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import socket
import time
from collections.abc import Iterator
from pathlib import Path

from ..errors import ConfigError
from ..parallel.dims import ParallelDims
from . import checkpoint as ckpt

logger = logging.getLogger("evotune")

LOCK_FILE = ".lock"
RUN_OUTPUTS = ("metrics.jsonl", "generations.jsonl", "tensorboard")


@contextlib.contextmanager
def work_dir_lock(work_dir: Path, dims: ParallelDims) -> Iterator[None]:
    """Hold WORK_DIR/.lock for the duration of the block (main rank; every rank agrees)."""
    path = work_dir / LOCK_FILE
    failure = None
    if dims.is_main:
        try:
            _acquire(path)
        except ConfigError as error:
            failure = str(error)
    failure = dims.first_failure(failure)
    if failure is not None:
        raise ConfigError(failure)
    try:
        yield
    finally:
        if dims.is_main:
            with contextlib.suppress(OSError):
                if _read(path).get("pid") == os.getpid():
                    path.unlink()


def _acquire(path: Path) -> None:
    holder = {"host": socket.gethostname(), "pid": os.getpid(), "started": time.time()}
    for _ in range(2):
        try:
            descriptor = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            current = _read(path)
            if current.get("host") == holder["host"] and not _alive(current.get("pid")):
                logger.warning("taking over %s left by pid %s, which is gone", path, current["pid"])
                path.unlink(missing_ok=True)
                continue
            since = time.strftime("%Y-%m-%d %H:%M", time.localtime(current.get("started", 0)))
            raise ConfigError(
                f"{path.parent}: in use by pid {current.get('pid')} on {current.get('host')} "
                f"(since {since}); wait for that run or use another --work-dir (delete {path} "
                "only if no run is active)"
            ) from None
        with os.fdopen(descriptor, "w") as handle:
            json.dump(holder, handle)
        return


def _read(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def _alive(pid: object) -> bool:
    if not isinstance(pid, int):
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def choose_start(
    work_dir: Path, dims: ParallelDims, resume: str | None, overwrite: bool
) -> Path | None:
    """The checkpoint to resume from (None: a fresh start); clears the dir for --overwrite."""
    if resume is not None and overwrite:
        raise ConfigError("--resume and --overwrite contradict each other; choose one")
    existing = ckpt.complete_checkpoints(work_dir)
    if resume is None:
        if existing and not overwrite:
            raise ConfigError(
                f"{work_dir}: holds checkpoints of an earlier run (newest {existing[-1].name}); "
                "continue it with --resume auto, or start over with --overwrite (deletes them)"
            )
        if overwrite:
            dims.barrier()  # every rank has looked before the main rank deletes
            if dims.is_main:
                _clear(work_dir, existing)
            dims.barrier()
        return None
    if resume == "auto":
        latest = ckpt.latest_intact_checkpoint(work_dir)
        if latest is None:
            if existing:
                raise ConfigError(
                    f"--resume auto: no intact checkpoint in {work_dir} (all fail their "
                    "manifest); start over with --overwrite"
                )
            logger.info("--resume auto: no complete checkpoint in %s; starting fresh", work_dir)
        return latest
    path = ckpt.resolve_checkpoint(resume)
    step = ckpt.checkpoint_step(path)
    newer = [p.name for p in existing if (ckpt.checkpoint_step(p) or 0) > (step or 0)]
    if path.parent.resolve() == work_dir.resolve() and newer:
        raise ConfigError(
            f"--resume {resume}: {work_dir} holds newer checkpoints ({', '.join(newer)}) that "
            "this run would abandon; resume from the newest, or copy the checkpoint to a new "
            "--work-dir"
        )
    return path


def _clear(work_dir: Path, checkpoints: list[Path]) -> None:
    for path in checkpoints:
        shutil.rmtree(path)
    for name in RUN_OUTPUTS:
        target = work_dir / name
        if target.is_dir():
            shutil.rmtree(target)
        elif target.exists():
            target.unlink()
    logger.warning(
        "--overwrite: removed %d checkpoint(s) and earlier run outputs", len(checkpoints)
    )


def truncate_records(work_dir: Path, step: int) -> None:
    """After a resume from ``step``, keep only the records of steps up to it (one per step)."""
    for name in ("metrics.jsonl", "generations.jsonl"):
        path = work_dir / name
        if not path.is_file():
            continue
        kept = []
        for line in path.read_text().splitlines():
            try:
                record_step = json.loads(line).get("step", 0)
            except ValueError:
                continue  # a line cut short by the kill that ended the earlier run
            if record_step <= step:
                kept.append(line)
        temporary = path.with_suffix(".tmp")
        temporary.write_text("".join(line + "\n" for line in kept))
        os.replace(temporary, path)
