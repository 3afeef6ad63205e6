"""Atomic checkpoints: written to a hidden temporary folder, renamed when complete.

Layout of ``WORK_DIR/checkpoint-<step>/``::

    hf/                 config.json, model.safetensors (or shards and an index), tokenizer
                        files: from_pretrained-ready (model/hf_folder.py)
    trainer_state.json  step, updates, counters, sampler position, engine, dp size,
                        dataset identity
    config.py           the resolved config of the run
    optimizer.pt        optimizer state (torch engine)
    deepspeed/          DeepSpeed's own checkpoint (DeepSpeed engine)
    fsdp/               every rank's shards of weights and AdamW state (FSDP2 engine, DCP)
    master_weights.safetensors  the exact weights when hf/ cannot hold them: bf16 there,
                        or names changed on save (torch engine)
    rng.pt              python / numpy / torch RNG states
    MANIFEST.json       size and sha256 of every file above (verified at resume and export)
    COMPLETE            written last, inside the temporary folder, before the rename

A folder without COMPLETE is never loaded, and the rename makes a half-written
checkpoint invisible under its final name. The manifest catches what the rename
cannot: a file damaged after the save (a full disk, a copy cut short, bit rot).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from ..errors import ConfigError
from ..fileio import atomic_folder, honour_umask

logger = logging.getLogger("evotune")

CHECKPOINT_PATTERN = re.compile(r"^checkpoint-(\d+)$")
COMPLETE_MARKER = "COMPLETE"
MANIFEST_FILE = "MANIFEST.json"
MANIFEST_VERSION = 1
HASH_CHUNK_BYTES = 8 << 20
HASH_THREADS = 8  # hashlib releases the GIL: DeepSpeed's per-rank files hash in parallel


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


def checkpoint_step(path: Path) -> int | None:
    match = CHECKPOINT_PATTERN.match(Path(path).name)
    return int(match.group(1)) if match else None


def latest_intact_checkpoint(work_dir: Path, checksums: bool = True) -> Path | None:
    """The newest complete checkpoint whose files match its manifest; warns about newer broken ones."""
    for path in reversed(complete_checkpoints(Path(work_dir))):
        problems = verify_checkpoint(path, checksums=checksums)
        if not problems:
            return path
        logger.warning(
            "%s is broken, trying an older checkpoint: %s", path.name, "; ".join(problems)
        )
    return None


def resolve_checkpoint(spec: str | Path, step: int | None = None) -> Path:
    """A complete checkpoint folder from what a user types.

    ``WORK/checkpoint-0000082``, ``WORK/checkpoint-82``, ``WORK/82``, ``WORK`` with
    ``step=82``, or ``WORK`` alone (its newest intact checkpoint). When it does not
    exist, the error lists the checkpoints that do.
    """
    path = Path(spec)
    if step is not None:
        work_dir, wanted = path, step
    elif (path / COMPLETE_MARKER).is_file():
        return path
    elif match := CHECKPOINT_PATTERN.match(path.name):
        work_dir, wanted = path.parent, int(match.group(1))
    elif path.is_dir() and complete_checkpoints(path):
        newest = latest_intact_checkpoint(path)
        if newest is None:
            raise ConfigError(f"{path}: every checkpoint is broken (see the warnings above)")
        return newest
    elif path.name.isdigit():
        work_dir, wanted = path.parent, int(path.name)
    elif path.is_dir():
        raise ConfigError(
            f"{path}: not a complete evotune checkpoint and no complete checkpoint-* inside "
            "(a checkpoint folder holds COMPLETE and hf/config.json)"
        )
    else:
        raise ConfigError(f"{path}: no such checkpoint folder")
    candidate = work_dir / checkpoint_name(wanted)
    if (candidate / COMPLETE_MARKER).is_file():
        return candidate
    torn = temporary_folder(work_dir, wanted)
    if torn.exists() or candidate.exists():
        unfinished = torn if torn.exists() else candidate
        reason = f"the save of step {wanted} never finished ({unfinished.name} has no COMPLETE)"
    else:
        reason = f"no checkpoint of step {wanted}"
    raise ConfigError(f"{spec}: {reason}; {_available(work_dir)}")


def _available(work_dir: Path) -> str:
    if not work_dir.is_dir():
        return f"the folder {work_dir} does not exist"
    found = complete_checkpoints(work_dir)
    if not found:
        return f"{work_dir} holds no complete checkpoint"
    shown = found[-8:]
    names = ", ".join(p.name for p in shown)
    more = f" and {len(found) - len(shown)} older" if len(found) > len(shown) else ""
    return (
        f"complete checkpoints in {work_dir}: {names}{more} "
        f"(pass one, its step number, or the work dir for the newest)"
    )


def temporary_folder(work_dir: Path, step: int) -> Path:
    return work_dir / f".{checkpoint_name(step)}.tmp"


def prepare_folder(temporary: Path) -> None:
    if temporary.exists():
        shutil.rmtree(temporary)
    temporary.mkdir(parents=True)


def publish(temporary: Path, final: Path) -> None:
    """Mark ``temporary`` complete, flush it to disk, and rename it to ``final``."""
    honour_umask(temporary)
    write_manifest(temporary)
    (temporary / COMPLETE_MARKER).write_text(final.name)
    _fsync_tree(temporary)
    if final.exists():
        shutil.rmtree(final)
    os.replace(temporary, final)
    _fsync_directory(final.parent)


def prune_checkpoints(work_dir: Path, keep: int) -> list[Path]:
    """Keep the newest ``keep`` complete checkpoints (-1 keeps all); remove stale temp folders."""
    removed: list[Path] = []
    for stale in work_dir.glob(".checkpoint-*.tmp"):
        shutil.rmtree(stale, ignore_errors=True)
    if keep < 0:
        return removed
    complete = complete_checkpoints(work_dir)
    for path in complete[: max(0, len(complete) - keep)]:
        shutil.rmtree(path, ignore_errors=True)
        removed.append(path)
    return removed


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
    """Copy a checkpoint's HF folder to ``output`` atomically, after verifying it, and check it loads."""
    from transformers import AutoConfig

    checkpoint = resolve_checkpoint(checkpoint)
    source = checkpoint / "hf"
    if not (source / "config.json").is_file():
        raise ConfigError(f"{checkpoint}: no hf/config.json; not an evotune checkpoint")
    problems = verify_checkpoint(checkpoint, under="hf")
    if problems:
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise ConfigError(
            f"{checkpoint}: broken, not exported: {problems[0]}{more}; "
            f"export an older checkpoint ({_available(checkpoint.parent)})"
        )
    with atomic_folder(output) as temporary:
        shutil.copytree(source, temporary, dirs_exist_ok=True)
        AutoConfig.from_pretrained(temporary)
    return output


# -- manifest -----------------------------------------------------------------------------


def write_manifest(folder: Path) -> Path:
    """Record the size and sha256 of every file under ``folder`` in MANIFEST.json."""
    started = time.perf_counter()
    files = _manifest_candidates(folder)
    with ThreadPoolExecutor(HASH_THREADS) as pool:
        digests = list(pool.map(_sha256, [folder / name for name in files]))
    sizes = [(folder / name).stat().st_size for name in files]
    entries = {
        name: {"bytes": size, "sha256": digest}
        for name, size, digest in zip(files, sizes, digests, strict=True)
    }
    path = folder / MANIFEST_FILE
    write_json(path, {"version": MANIFEST_VERSION, "algorithm": "sha256", "files": entries})
    total = sum(sizes)
    logger.debug(
        "%s: %d files, %.2f GB hashed in %.2f s",
        path,
        len(entries),
        total / 1e9,
        time.perf_counter() - started,
    )
    return path


def verify_checkpoint(folder: Path, under: str | None = None, checksums: bool = True) -> list[str]:
    """Problems of ``folder`` against its manifest, each naming the file; [] when intact.

    ``under`` limits the check to one subfolder (export reads only hf/); without
    ``checksums`` only presence and sizes are compared (instant, catches truncation).
    A checkpoint saved before manifests existed has nothing to compare: a warning,
    no problem.
    """
    folder = Path(folder)
    if not (folder / COMPLETE_MARKER).is_file():
        return [f"{folder / COMPLETE_MARKER}: missing (the save never finished)"]
    manifest_path = folder / MANIFEST_FILE
    if not manifest_path.is_file():
        logger.warning(
            "%s has no %s (saved by an older evotune): its files cannot be verified",
            folder,
            MANIFEST_FILE,
        )
        return []
    try:
        entries = read_json(manifest_path)["files"]
    except (OSError, ValueError, KeyError, TypeError) as error:
        return [f"{manifest_path}: unreadable ({type(error).__name__}: {error})"]
    prefix = None if under is None else under.rstrip("/") + "/"
    problems: list[str] = []
    to_hash: list[tuple[str, str]] = []
    for name, entry in sorted(entries.items()):
        if prefix is not None and not name.startswith(prefix):
            continue
        path = folder / name
        if not path.is_file():
            problems.append(f"{path}: missing")
            continue
        size = path.stat().st_size
        if size != entry["bytes"]:
            problems.append(
                f"{path}: {size} bytes, the manifest says {entry['bytes']} "
                f"({'truncated' if size < entry['bytes'] else 'grown'})"
            )
        elif checksums:
            to_hash.append((name, entry["sha256"]))
    with ThreadPoolExecutor(HASH_THREADS) as pool:
        digests = pool.map(_sha256, [folder / name for name, _ in to_hash])
        for (name, expected), digest in zip(to_hash, digests, strict=True):
            if digest != expected:
                problems.append(f"{folder / name}: sha256 differs from the manifest (corrupted)")
    return problems


def _manifest_candidates(folder: Path) -> list[str]:
    names = []
    for directory, subfolders, files in os.walk(folder):
        subfolders.sort()
        for name in sorted(files):
            relative = os.path.relpath(os.path.join(directory, name), folder)
            if relative not in (MANIFEST_FILE, COMPLETE_MARKER):
                names.append(Path(relative).as_posix())
    return names


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    buffer = bytearray(HASH_CHUNK_BYTES)
    view = memoryview(buffer)
    with open(path, "rb", buffering=0) as handle:
        while read := handle.readinto(buffer):
            digest.update(view[:read])
    return digest.hexdigest()
