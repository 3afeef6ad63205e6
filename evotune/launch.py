"""Launching many processes the way XTuner does (docs/training.md#launch).

* ``evotune train CONFIG`` with NPROC_PER_NODE > 1 or NNODES > 1 re-runs itself
  under torchrun (NNODES, NODE_RANK, NPROC_PER_NODE, ADDR, PORT) and returns
  torchrun's result. Under an existing torchrun (RANK/LOCAL_RANK set) it just runs.
* ``--launcher slurm``: one process per srun task; rank, world size and local
  rank come from SLURM_PROCID / SLURM_NTASKS / SLURM_LOCALID, MASTER_ADDR from the
  first host of SLURM_NODELIST unless set, MASTER_PORT defaults to 29500.

A rank that fails writes its one-line cause to ``$EVOTUNE_ERROR_DIR/rank<N>``;
torchrun then stops the other ranks and the launching process prints the first
cause and exits with that rank's exit code.

Signals (``relaunch``). SIGTERM, SIGINT and SIGHUP to the launching process are
forwarded once, to the torchrun agent only; torchrun (which starts every worker in
a session of its own) passes the signal to each worker's process group and gives
them ``TORCH_ELASTIC_SHUTDOWN_TIMEOUT`` seconds (set to 120 here unless the user
set it) before SIGKILL. So each worker gets exactly one signal from this chain;
signalling torchrun's group as well would deliver a second one, and a second
signal means "abort now". torchrun runs as ``python -m evotune.launch``, which is
torchrun minus the traceback it prints when a signal stops it. The launcher then
exits with 128 + the signal's number
(143 SIGTERM, 130 SIGINT, 129 SIGHUP). A second signal to the launcher kills
torchrun and every worker at once. Nothing outlives the launcher: torchrun runs in
its own session (a terminal's Ctrl-C reaches only the launcher, which forwards it
once) with PR_SET_PDEATHSIG=SIGTERM (if the launcher is killed, torchrun stops the
workers); the launcher is a child subreaper, so workers orphaned by a dead torchrun
are re-parented to it and stopped; and whatever way ``relaunch`` is left, the
torchrun tree is stopped (SIGTERM, then SIGKILL after the grace period).
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import logging
import os
import random
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import FrameType

from .errors import ConfigError

logger = logging.getLogger("evotune")

ERROR_DIR_VARIABLE = "EVOTUNE_ERROR_DIR"
LAUNCHER_PID_VARIABLE = "EVOTUNE_LAUNCHER_PID"  # torchrun's process stops when this one dies
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
SHUTDOWN_TIMEOUT_VARIABLE = "TORCH_ELASTIC_SHUTDOWN_TIMEOUT"  # torchrun's grace before SIGKILL
DEFAULT_SHUTDOWN_TIMEOUT_S = 120  # time to finish a step and save one checkpoint
KILL_MARGIN_S = 30  # after torchrun's own grace, the launcher kills what is left
_PR_SET_PDEATHSIG = 1
_PR_SET_CHILD_SUBREAPER = 36


def under_torchrun(environ: Mapping[str, str] = os.environ) -> bool:
    return "LOCAL_RANK" in environ and "WORLD_SIZE" in environ


def wants_relaunch(environ: Mapping[str, str] = os.environ) -> bool:
    if under_torchrun(environ):
        return False
    return _count(environ, "NPROC_PER_NODE") > 1 or _count(environ, "NNODES") > 1


def _count(environ: Mapping[str, str], name: str) -> int:
    text = environ.get(name, "1")
    if not text.strip().isdigit() or int(text) < 1:
        raise ConfigError(f"{name}={text!r}: must be a whole number >= 1")
    return int(text)


def preflight(
    config: str | Path,
    overrides: Sequence[str],
    environ: Mapping[str, str] = os.environ,
) -> None:
    """Check before torchrun starts anything what would otherwise fail inside every rank.

    The config with its overrides (as ``evotune train`` passes them), the
    ``--deepspeed`` value (a preset name or a readable JSON file) and the
    sequence-parallel size against NPROC_PER_NODE x NNODES. A mistake is one
    ConfigError line (exit 2) in about a second, not after every rank has started.
    """
    from .config import load_config
    from .parallel.deepspeed_engine import PRESETS
    from .parallel.dims import ParallelDims

    settings = load_config(config, overrides).settings
    name = settings.deepspeed
    if name is not None and name not in PRESETS:
        path = Path(name)
        if not path.is_file():
            raise ConfigError(
                f"--deepspeed {name}: not a preset ({', '.join(PRESETS)}) nor a JSON file"
            )
        try:
            json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
            raise ConfigError(f"--deepspeed {path}: invalid JSON ({error})") from None
    world_size = _count(environ, "NPROC_PER_NODE") * _count(environ, "NNODES")
    ParallelDims(world_size=world_size, sp_size=settings.sequence_parallel_size)


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
        sys.executable, "-m", "evotune.launch",  # torchrun, see run_torchrun
        "--nnodes", environ.get("NNODES", "1"),
        "--node_rank", environ.get("NODE_RANK", "0"),
        "--nproc_per_node", environ.get("NPROC_PER_NODE", "1"),
        "--master_addr", environ.get("ADDR", "127.0.0.1"),
        "--master_port", port,
        "-m", "evotune.cli", *argv,
    ]  # fmt: skip


def relaunch(argv: Sequence[str]) -> int:
    """Run ``evotune <argv>`` under torchrun; return the failing rank's exit code.

    Stopped by a signal, the result is 128 + its number (see the module docstring).
    """
    with tempfile.TemporaryDirectory(prefix="evotune-errors-") as error_dir:
        environ = dict(os.environ, **{ERROR_DIR_VARIABLE: error_dir})
        environ.setdefault(SHUTDOWN_TIMEOUT_VARIABLE, str(DEFAULT_SHUTDOWN_TIMEOUT_S))
        supervisor = TorchrunSupervisor(
            torchrun_command(argv, environ),
            environ,
            stop_timeout=float(environ[SHUTDOWN_TIMEOUT_VARIABLE]) + KILL_MARGIN_S,
        )
        returncode = supervisor.run()
        failures = sorted(Path(error_dir).glob("rank*"), key=lambda p: int(p.name[4:]))
        if supervisor.stopped_by is not None:
            name = signal.Signals(supervisor.stopped_by).name
            how = (
                "a second signal killed torchrun and the workers at once"
                if supervisor.aborted
                else f"forwarded once to torchrun and its workers (torchrun exited {returncode})"
            )
            print(f"evotune: stopped by {name}: {how}", file=sys.stderr)
            return 128 + supervisor.stopped_by
        if returncode == 0:
            return 0
        if failures:
            code, _, cause = failures[0].read_text().partition(" ")
            print(f"evotune: error: {failures[0].name}: {cause.strip()}", file=sys.stderr)
            return int(code)
        print(f"evotune: error: torchrun exited with {returncode}", file=sys.stderr)
        return returncode or 1


class TorchrunSupervisor:
    """Runs torchrun, forwards stop signals to it once, and leaves no process behind."""

    def __init__(self, command: Sequence[str], environ: Mapping[str, str], stop_timeout: float):
        self.command = list(command)
        self.environ = dict(environ)
        self.stop_timeout = stop_timeout
        self.process: subprocess.Popen[bytes] | None = None
        self.stopped_by: int | None = None  # the first stop signal received
        self.aborted = False  # a second one arrived: everything was killed at once
        self._deadline: float | None = None

    def run(self) -> int:
        own_children = set(_children_of(os.getpid()))
        previous = {number: signal.getsignal(number) for number in STOP_SIGNALS}
        for number in STOP_SIGNALS:
            signal.signal(number, self._on_signal)
        try:
            _become_subreaper()
            environ = dict(self.environ, **{LAUNCHER_PID_VARIABLE: str(os.getpid())})
            self.process = subprocess.Popen(self.command, env=environ, start_new_session=True)
            if self.stopped_by is not None:  # a signal came while torchrun was starting
                self._forward(self.stopped_by)
            return self._wait()
        finally:
            if self.process is not None and self.process.poll() is None:
                self._forward(signal.SIGTERM)  # the launcher itself failed: stop gracefully
                self._wait()
            self._stop_orphans(own_children)
            for number, handler in previous.items():
                signal.signal(number, handler)

    def _on_signal(self, number: int, frame: FrameType | None) -> None:
        if self.stopped_by is None:
            self.stopped_by = number
            if self.process is not None:
                self._forward(number)
        elif not self.aborted:
            self.aborted = True
            self._kill_everything()

    def _forward(self, number: int) -> None:
        assert self.process is not None
        self._deadline = time.monotonic() + self.stop_timeout
        if self.process.poll() is None:  # not reaped yet, so the pid is still torchrun's
            os.kill(self.process.pid, number)

    def _wait(self) -> int:
        assert self.process is not None
        while True:
            try:
                return self.process.wait(timeout=0.2)
            except subprocess.TimeoutExpired:
                if self._deadline is not None and time.monotonic() > self._deadline:
                    logger.warning(
                        "torchrun did not stop within %.0f s of the signal; killing it",
                        self.stop_timeout,
                    )
                    self._kill_everything()

    def _kill_everything(self) -> None:
        if self.process is not None and self.process.poll() is None:
            _signal_tree(self.process.pid, signal.SIGKILL)

    def _stop_orphans(self, own_children: set[int]) -> None:
        """Stop workers a dead torchrun left behind (re-parented here: we are their subreaper).

        SIGTERM first, so they may save; SIGKILL after the grace period or a second signal.
        """
        terminated_at: float | None = None
        while True:
            orphans = []
            for pid in _children_of(os.getpid()):
                if pid in own_children:
                    continue
                with contextlib.suppress(ChildProcessError):
                    if os.waitpid(pid, os.WNOHANG)[0] == pid:
                        continue  # it had exited: reaped now
                orphans.append(pid)
            if not orphans:
                return
            now = time.monotonic()
            if terminated_at is None:
                logger.warning(
                    "stopping %d process(es) left by torchrun: %s", len(orphans), orphans
                )
                for pid in orphans:
                    _signal_tree(pid, signal.SIGTERM)
                terminated_at = now
            elif self.aborted or now - terminated_at > self.stop_timeout:
                for pid in orphans:
                    _signal_tree(pid, signal.SIGKILL)
            time.sleep(0.1)


def _signal_tree(pid: int, number: int) -> None:
    """Signal ``pid`` (a child of ours, not yet reaped) and all its descendants."""
    for target in [pid, *_descendants(pid)]:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(target, number)


def _become_subreaper() -> None:
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)


def _stop_with_launcher() -> None:
    """In torchrun's process: SIGTERM when the launcher dies (Linux PR_SET_PDEATHSIG)."""
    launcher = os.environ.get(LAUNCHER_PID_VARIABLE)
    if launcher is None or not sys.platform.startswith("linux"):
        return
    ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0)
    if os.getppid() != int(launcher):  # it died before the call above
        sys.exit(128 + signal.SIGTERM)


def _process_table() -> dict[int, list[int]]:
    """Parent pid -> child pids, from /proc (empty where there is no /proc)."""
    children: dict[int, list[int]] = defaultdict(list)
    with contextlib.suppress(OSError):
        for entry in os.scandir("/proc"):
            if not entry.name.isdigit():
                continue
            try:
                with open(os.path.join(entry.path, "stat"), "rb") as handle:
                    stat = handle.read()
            except OSError:
                continue  # exited meanwhile
            # "pid (comm) state ppid ...": comm may hold spaces and parentheses
            parent = int(stat.rsplit(b")", 1)[1].split()[1])
            children[parent].append(int(entry.name))
    return children


def _children_of(pid: int) -> list[int]:
    return _process_table().get(pid, [])


def _descendants(pid: int) -> list[int]:
    table = _process_table()
    found, frontier = [], [pid]
    while frontier:
        children = table.get(frontier.pop(), [])
        found.extend(children)
        frontier.extend(children)
    return found


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


def run_torchrun() -> None:
    """torchrun's main, as the launcher runs it: it stops when the launcher dies, and a
    signal ends it with 128 + the signal's number, without a traceback (the launcher
    prints the one line that says what happened).
    """
    _stop_with_launcher()
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.run import main

    try:
        main()
    except SignalException as stop:
        sys.exit(128 + int(stop.sigval))


if __name__ == "__main__":
    run_torchrun()
