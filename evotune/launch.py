"""Launching many processes the way XTuner does (training.md section 6).

* ``evotune train CONFIG`` with NPROC_PER_NODE > 1 or NNODES > 1 re-runs itself
  under torchrun (NNODES, NODE_RANK, NPROC_PER_NODE, ADDR, PORT) and returns
  torchrun's result. Under an existing torchrun (RANK/LOCAL_RANK set) it just runs.
* ``--launcher slurm``: one process per srun task; rank, world size and local
  rank come from SLURM_PROCID / SLURM_NTASKS / SLURM_LOCALID, MASTER_ADDR from the
  first host of SLURM_NODELIST unless set, MASTER_PORT defaults to 29500.

A rank that fails writes its one-line cause to ``$EVOTUNE_ERROR_DIR/rank<N>``;
torchrun then stops the other ranks and the launching process prints the first
cause and exits with that rank's exit code.
"""

from __future__ import annotations

import contextlib
import logging
import os
import random
import re
import socket
import subprocess
import sys
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path

logger = logging.getLogger("evotune")

ERROR_DIR_VARIABLE = "EVOTUNE_ERROR_DIR"


def under_torchrun(environ: Mapping[str, str] = os.environ) -> bool:
    return "LOCAL_RANK" in environ and "WORLD_SIZE" in environ


def wants_relaunch(environ: Mapping[str, str] = os.environ) -> bool:
    if under_torchrun(environ):
        return False
    return int(environ.get("NPROC_PER_NODE", "1")) > 1 or int(environ.get("NNODES", "1")) > 1


def free_port() -> int:
    """A random free port in 20000-29999 (XTuner's range)."""
    for _ in range(100):
        port = random.randint(20000, 29999)
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
            try:
                probe.bind(("", port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free port found in 20000-29999; set PORT")


def torchrun_command(argv: Sequence[str], environ: Mapping[str, str] = os.environ) -> list[str]:
    port = environ.get("PORT")
    if port is None:
        port = str(free_port())
        logger.warning("PORT is not set; using random port %s (set PORT on every node)", port)
    return [
        sys.executable, "-m", "torch.distributed.run",
        "--nnodes", environ.get("NNODES", "1"),
        "--node_rank", environ.get("NODE_RANK", "0"),
        "--nproc_per_node", environ.get("NPROC_PER_NODE", "1"),
        "--master_addr", environ.get("ADDR", "127.0.0.1"),
        "--master_port", port,
        "-m", "evotune.cli", *argv,
    ]  # fmt: skip


def relaunch(argv: Sequence[str]) -> int:
    """Run ``evotune <argv>`` under torchrun; return the failing rank's exit code."""
    with tempfile.TemporaryDirectory(prefix="evotune-errors-") as error_dir:
        environ = dict(os.environ, **{ERROR_DIR_VARIABLE: error_dir})
        command = torchrun_command(argv, environ)
        completed = subprocess.run(command, env=environ, check=False)
        if completed.returncode == 0:
            return 0
        failures = sorted(Path(error_dir).glob("rank*"), key=lambda p: int(p.name[4:]))
        if failures:
            code, _, cause = failures[0].read_text().partition(" ")
            print(f"evotune: error: {failures[0].name}: {cause.strip()}", file=sys.stderr)
            return int(code)
        print(f"evotune: error: torchrun exited with {completed.returncode}", file=sys.stderr)
        return completed.returncode or 1


def record_failure(exit_code: int, cause: str, environ: Mapping[str, str] = os.environ) -> None:
    """Leave this rank's cause where the launching process finds it."""
    error_dir = environ.get(ERROR_DIR_VARIABLE)
    if not error_dir:
        return
    rank = environ.get("RANK", "0")
    with contextlib.suppress(OSError):
        Path(error_dir, f"rank{rank}").write_text(f"{exit_code} {cause}")


def apply_slurm_environment(environ: dict[str, str] | None = None) -> None:
    """Translate SLURM_* into the variables torch.distributed reads (in place)."""
    env = os.environ if environ is None else environ
    required = ("SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID", "SLURM_NODELIST")
    missing = [name for name in required if name not in env]
    if missing:
        raise RuntimeError(
            f"--launcher slurm: {', '.join(missing)} not set; start evotune with srun"
        )
    env["RANK"] = env["SLURM_PROCID"]
    env["WORLD_SIZE"] = env["SLURM_NTASKS"]
    env["LOCAL_RANK"] = env["SLURM_LOCALID"]
    env.setdefault("MASTER_ADDR", first_host(env["SLURM_NODELIST"]))
    env.setdefault("MASTER_PORT", env.get("PORT", "29500"))


def first_host(nodelist: str) -> str:
    """First host of a Slurm node list such as 'gpu[003-005,007],cpu01' -> 'gpu003'."""
    head = nodelist.split(",")[0] if "[" not in nodelist.split(",")[0] else nodelist
    match = re.match(r"^([^\[,]+)(?:\[([^\]]+)\])?", head)
    if match is None:
        raise RuntimeError(f"cannot parse SLURM_NODELIST={nodelist!r}; set MASTER_ADDR")
    prefix, ranges = match.groups()
    if not ranges:
        return prefix
    first = ranges.split(",")[0].split("-")[0]
    return prefix + first
