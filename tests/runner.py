"""Run evotune as a user would (console entry point, torchrun via NPROC_PER_NODE)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


REPO_ROOT = Path(__file__).resolve().parents[1]


def run_cli(
    *args: str, cwd: Path | None = None, timeout: int = 600, **kwargs
) -> subprocess.CompletedProcess:
    """``evotune ARGS`` in a fresh interpreter, from the repository root unless told."""
    return subprocess.run(
        [sys.executable, "-m", "evotune.cli", *args],
        capture_output=True,
        text=True,
        cwd=cwd or REPO_ROOT,
        timeout=timeout,
        # one intra-op thread: pytest-xdist already runs two workers on the CI's two cores
        env=dict(os.environ, OMP_NUM_THREADS="1"),
        **kwargs,
    )


def _train_call(
    config: Path, work_dir: Path, args: tuple[str, ...], nproc: int, env: dict[str, str] | None
) -> tuple[list[str], dict[str, str]]:
    """``evotune train`` as a user types it, in an environment free of an outer torchrun."""
    environ = {
        k: v
        for k, v in os.environ.items()
        if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
    }
    environ.update({"NPROC_PER_NODE": str(nproc), "PORT": str(free_port()), "OMP_NUM_THREADS": "1"})
    environ.update(env or {})
    command = [sys.executable, "-m", "evotune.cli", "train", str(config)]
    return [*command, "--work-dir", str(work_dir), "--no-progress", *args], environ


def run_train(
    config: Path,
    work_dir: Path,
    *args: str,
    nproc: int = 1,
    env: dict[str, str] | None = None,
    timeout: int = 300,
) -> subprocess.CompletedProcess:
    command, environ = _train_call(config, work_dir, args, nproc, env)
    return subprocess.run(command, capture_output=True, text=True, env=environ, timeout=timeout)


def start_train(
    config: Path,
    work_dir: Path,
    *args: str,
    nproc: int = 1,
    env: dict[str, str] | None = None,
    **popen: Any,
) -> subprocess.Popen:
    """The same run in the background (to signal, stop or kill it mid-training)."""
    command, environ = _train_call(config, work_dir, args, nproc, env)
    return subprocess.Popen(command, env=environ, **popen)


def losses(work_dir: Path) -> list[float]:
    return [
        json.loads(line)["loss"] for line in (work_dir / "metrics.jsonl").read_text().splitlines()
    ]


def records(work_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (work_dir / "metrics.jsonl").read_text().splitlines()]


def final_weights(work_dir: Path) -> dict[str, torch.Tensor]:
    latest = sorted(work_dir.glob("checkpoint-*"))[-1]
    return load_file(str(latest / "hf" / "model.safetensors"))
