"""Atomic checkpoints: written to a hidden temporary folder, renamed when complete.

Layout of ``WORK_DIR/checkpoint-<step>/``::

    hf/                 config.json, model.safetensors, tokenizer files (from_pretrained-ready)
    trainer_state.json  step, updates, counters, sampler position, config fingerprint
    optimizer.pt        optimizer state (torch engine; DeepSpeed keeps its own under ds/)
    rng.pt              python / numpy / torch RNG states
    COMPLETE            written last, inside the temporary folder, before the rename

A folder without COMPLETE is never loaded, and the rename makes a half-written
checkpoint invisible under its final name.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import ConfigError
from ..fileio import atomic_folder

CHECKPOINT_PATTERN = re.compile(r"^checkpoint-(\d+)$")
COMPLETE_MARKER = "COMPLETE"


def checkpoint_name(step: int) -> str:
    return f"checkpoint-{step:07d}"


def complete_checkpoints(work_dir: Path) -> list[Path]:
    """Complete checkpoint folders, oldest first."""
    if not work_dir.is_dir():
        return []
    found = []
    for entry in work_dir.iterdir():
        match = CHECKPOINT_PATTERN.match(entry.name)
        if match and (entry / COMPLETE_MARKER).is_file():
            found.append((int(match.group(1)), entry))
    return [path for _, path in sorted(found)]


def latest_checkpoint(work_dir: Path) -> Path | None:
    found = complete_checkpoints(work_dir)
    return found[-1] if found else None


def temporary_folder(work_dir: Path, step: int) -> Path:
    return work_dir / f".{checkpoint_name(step)}.tmp"


def prepare_folder(temporary: Path) -> None:
    if temporary.exists():
        shutil.rmtree(temporary)
    temporary.mkdir(parents=True)


def publish(temporary: Path, final: Path) -> None:
    """Mark ``temporary`` complete, flush it to disk, and rename it to ``final``."""
    (temporary / COMPLETE_MARKER).write_text(final.name)
    _fsync_tree(temporary)
    if final.exists():
        shutil.rmtree(final)
    os.replace(temporary, final)
    _fsync_directory(final.parent)


def prune_checkpoints(work_dir: Path, keep: int) -> list[Path]:
    """Keep the newest ``keep`` complete checkpoints (-1 keeps all); remove stale temp folders."""
    removed = []
    for stale in work_dir.glob(".checkpoint-*.tmp"):
        shutil.rmtree(stale, ignore_errors=True)
    if keep < 0:
        return removed
    complete = complete_checkpoints(work_dir)
    for path in complete[: max(0, len(complete) - keep)]:
        shutil.rmtree(path, ignore_errors=True)
        removed.append(path)
    return removed


def rng_state() -> dict[str, Any]:
    return {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
    }


def restore_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def write_json(path: Path, payload: dict[str, Any]) -> None:
    path.write_text(json.dumps(payload, indent=2, sort_keys=True, default=str) + "\n")


def read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text())


def _fsync_tree(root: Path) -> None:
    for directory, _, files in os.walk(root):
        for name in files:
            with open(os.path.join(directory, name), "rb") as handle:
                os.fsync(handle.fileno())
        _fsync_directory(Path(directory))


def _fsync_directory(path: Path) -> None:
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def export_hf(checkpoint: Path, output: Path) -> Path:
    """Copy a checkpoint's HF folder to ``output`` atomically and check it loads."""
    from transformers import AutoConfig

    source = checkpoint / "hf"
    if not (checkpoint / COMPLETE_MARKER).is_file() or not (source / "config.json").is_file():
        raise ConfigError(
            f"{checkpoint}: not a complete evotune checkpoint (expected COMPLETE and hf/config.json)"
        )
    with atomic_folder(output) as temporary:
        shutil.copytree(source, temporary, dirs_exist_ok=True)
        AutoConfig.from_pretrained(temporary)
    return output
