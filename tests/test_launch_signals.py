"""The `evotune` launcher under signals and bad options: nothing outlives it, errors come early."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import psutil
import pytest
from runner import free_port, run_train
from tiny import save_tiny_llama, write_config, write_corpus

from evotune.errors import ConfigError
from evotune.launch import preflight

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("signals")
    model = save_tiny_llama(root / "model")
    data = write_corpus(root / "data", shards=3, samples=60)
    config = write_config(
        root / "long.py", model, data, accumulative_counts=1, total_steps=100_000, save_steps=10**6
    )
    return root, config


def _start(config, work_dir, log):
    environ = {
        k: v
        for k, v in os.environ.items()
        if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
    }
    environ.update(NPROC_PER_NODE="2", PORT=str(free_port()), OMP_NUM_THREADS="1")
    command = [sys.executable, "-m", "evotune.cli", "train", str(config)]
    command += ["--work-dir", str(work_dir), "--no-progress"]
    return subprocess.Popen(command, env=environ, stdout=log, stderr=subprocess.STDOUT)


def _wait_until_training(launcher, work_dir, timeout=240):
    """The launcher's tree once both workers have logged a step."""
    deadline = time.monotonic() + timeout
    metrics = work_dir / "metrics.jsonl"
    while time.monotonic() < deadline:
        assert launcher.poll() is None, "the run ended before it was signalled"
        if metrics.exists() and metrics.read_text().count("\n") >= 2:
            tree = psutil.Process(launcher.pid).children(recursive=True)
            workers = [p for p in tree if p.cmdline()[1:4] == ["-u", "-m", "evotune.cli"]]
            if len(workers) == 2:
                return tree
        time.sleep(0.5)
    log = work_dir.parent / "log.txt"
    raise AssertionError(f"training did not start in time: {log.read_text()[-3000:]}")


def _alive(processes):
    _, alive = psutil.wait_procs(processes, timeout=90)
    return [(p.pid, p.cmdline()) for p in alive]


@pytest.mark.parametrize(
    "signals, expected_code",
    [
        ([signal.SIGTERM], 128 + signal.SIGTERM),
        ([signal.SIGINT, signal.SIGINT], 128 + signal.SIGINT),  # the second aborts at once
        ([signal.SIGKILL], -signal.SIGKILL),  # the launcher dies: torchrun follows it
    ],
    ids=["sigterm", "sigint-twice", "launcher-killed"],
)
def test_signal_to_the_launcher_leaves_no_process(setup, tmp_path, signals, expected_code):
    _, config = setup
    with open(tmp_path / "log.txt", "wb") as log:
        launcher = _start(config, tmp_path / "run", log)
        try:
            tree = _wait_until_training(launcher, tmp_path / "run")
            assert len(tree) >= 3  # torchrun and two workers
            started = time.monotonic()
            for number in signals:
                os.kill(launcher.pid, number)
                time.sleep(0.3)
            code = launcher.wait(timeout=150)
            elapsed = time.monotonic() - started
        finally:
            if launcher.poll() is None:
                launcher.kill()
    output = (tmp_path / "log.txt").read_text(errors="replace")
    assert code == expected_code, output[-3000:]
    assert elapsed < 120, elapsed
    assert _alive(tree) == [], output[-3000:]
    if expected_code > 0:
        assert f"evotune: stopped by {signal.Signals(signals[0]).name}" in output
    if signals == [signal.SIGTERM]:
        assert "Traceback" not in output, output[-3000:]


def test_workers_left_by_a_killed_torchrun_are_stopped(setup, tmp_path):
    _, config = setup
    with open(tmp_path / "log.txt", "wb") as log:
        launcher = _start(config, tmp_path / "run", log)
        try:
            tree = _wait_until_training(launcher, tmp_path / "run")
            agent = next(p for p in tree if "evotune.launch" in p.cmdline())
            agent.kill()  # SIGKILL: torchrun cannot stop its workers
            code = launcher.wait(timeout=150)
        finally:
            if launcher.poll() is None:
                launcher.kill()
    output = (tmp_path / "log.txt").read_text(errors="replace")
    assert code != 0
    assert _alive(tree) == [], output[-3000:]
    assert "left by torchrun" in output


def test_bad_deepspeed_preset_fails_before_any_process_starts(setup, tmp_path):
    _, config = setup
    started = time.monotonic()
    result = run_train(config, tmp_path / "run", "--deepspeed", "deepspeed_zero9", nproc=2)
    elapsed = time.monotonic() - started
    assert result.returncode == 2, result.stderr[-2000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("evotune: error:")]
    assert errors == [
        "evotune: error: --deepspeed deepspeed_zero9: not a preset (deepspeed_zero1, "
        "deepspeed_zero2, deepspeed_zero2_offload, deepspeed_zero3, deepspeed_zero3_offload) "
        "nor a JSON file"
    ]
    assert "torch.distributed" not in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "run").exists()
    assert elapsed < 30, elapsed  # was 124 s inside the ranks


def test_preflight(setup, tmp_path):
    _, config = setup
    preflight(config, ["deepspeed=deepspeed_zero2"])  # a preset: fine
    good = tmp_path / "ds.json"
    good.write_text('{"zero_optimization": {"stage": 2}}')
    preflight(config, [f"deepspeed={good}"])
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ConfigError, match=r"--deepspeed .*bad\.json: invalid JSON"):
        preflight(config, [f"deepspeed={bad}"])
    with pytest.raises(ConfigError, match="no_such_setting: 'no_such_setting' is neither"):
        preflight(config, ["no_such_setting=1"])
    with pytest.raises(ConfigError, match=r"sequence_parallel_size=4 must divide .*\(2\)"):
        preflight(config, ["sequence_parallel_size=4"], {"NPROC_PER_NODE": "2"})
    with pytest.raises(ConfigError, match="NPROC_PER_NODE='two': must be a whole number >= 1"):
        preflight(config, [], {"NPROC_PER_NODE": "two"})
