"""Never lose a run, part 2: signals, late data errors, one run per work dir, damaged saves."""

from __future__ import annotations

import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
from ftdp_factory import write_shard
from runner import final_weights, records, run_train, start_train
from tiny import save_tiny_llama, write_config, write_corpus

from evotune.train.checkpoint import complete_checkpoints

pytestmark = pytest.mark.integration

STEPS = 8


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("preempt")
    model = save_tiny_llama(root / "model")
    data = write_corpus(root / "data", shards=3, samples=60)
    config = write_config(
        root / "run.py", model, data, total_steps=STEPS, save_steps=100, save_total_limit=-1
    )
    straight = root / "straight"
    result = run_train(config, straight)
    assert result.returncode == 0, result.stderr[-3000:]
    return root, model, data, config, straight


def _start(config: Path, work: Path, *args: str, nproc: int = 1, env: dict | None = None):
    return start_train(
        config, work, *args, nproc=nproc, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True,
    )  # fmt: skip


def _wait_for_steps(work: Path, steps: int, process: subprocess.Popen, timeout: float = 240):
    metrics = work / "metrics.jsonl"
    deadline = time.time() + timeout
    while time.time() < deadline and process.poll() is None:
        if metrics.exists() and len(metrics.read_text().splitlines()) >= steps:
            return
        time.sleep(0.05)
    raise AssertionError(f"the run did not reach step {steps}")


def _slow(seconds: float) -> dict:
    return {"EVOTUNE_FAULT": f"slow_step@{seconds}"}


@pytest.mark.parametrize("nproc", [1, 2])
def test_sigterm_saves_then_resume_is_bit_identical(setup, tmp_path, nproc):
    _root, model, data, config, straight = setup
    if nproc == 2:
        config = write_config(
            tmp_path / "run2.py", model, data, total_steps=STEPS, save_steps=100,
            accumulative_counts=1,
        )  # fmt: skip
        reference = tmp_path / "straight2"
        assert run_train(config, reference, nproc=2).returncode == 0
    else:
        reference = straight
    work = tmp_path / "work"
    process = _start(config, work, nproc=nproc, env=_slow(0.3))
    _wait_for_steps(work, 2, process)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=240)
    assert process.returncode == 143, stderr[-3000:]
    last = stderr.strip().splitlines()[-1]  # the worker's line; with torchrun, the launcher's
    assert "stopped by SIGTERM" in last
    assert "stopped by SIGTERM after step" in stderr and "--resume auto" in stderr
    saved = complete_checkpoints(work)
    assert len(saved) == 1 and int(saved[0].name.split("-")[1]) < STEPS
    resumed = run_train(config, work, "--resume", "auto", nproc=nproc)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert [r["step"] for r in records(work)] == list(range(1, STEPS + 1))  # one record per step
    assert [r["loss"] for r in records(work)] == [r["loss"] for r in records(reference)]
    expected, got = final_weights(reference), final_weights(work)
    for name in expected:
        assert torch.equal(got[name], expected[name]), name


def test_second_sigint_aborts_at_once(setup, tmp_path):
    _, _, _, config, _ = setup
    work = tmp_path / "work"
    process = _start(config, work, env=_slow(3.0))
    _wait_for_steps(work, 1, process)
    process.send_signal(signal.SIGINT)
    time.sleep(0.5)
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 130
    assert "aborting without saving" in stderr
    assert complete_checkpoints(work) == []


def test_one_run_per_work_dir(setup, tmp_path):
    _, _, _, config, _ = setup
    work = tmp_path / "work"
    first = _start(config, work, env=_slow(10.0))
    _wait_for_steps(work, 1, first)
    second = run_train(config, work)
    assert second.returncode == 2
    assert f"in use by pid {first.pid}" in second.stderr.strip().splitlines()[-1]
    first.kill()  # leaves a stale lock and no checkpoint
    first.communicate()
    again = run_train(config, work)  # the stale lock of a dead process is taken over
    assert again.returncode == 0, again.stderr[-3000:]
    assert "taking over" in again.stderr


def test_work_dir_with_checkpoints_needs_resume_or_overwrite(setup, tmp_path):
    _, _, _, config, straight = setup
    work = tmp_path / "work"
    shutil.copytree(straight, work)
    (work / "config.py").unlink()
    refused = run_train(config, work)
    assert refused.returncode == 2
    assert (
        "--resume auto, or start over with --overwrite" in refused.stderr.strip().splitlines()[-1]
    )
    other = write_config(tmp_path / "other.py", *_model_data(setup), max_length=32)
    rejected = run_train(other, work, "--resume", "auto")
    assert rejected.returncode == 2 and "dataset or packing changed" in rejected.stderr
    assert not (work / "config.py").exists()  # a rejected resume writes nothing
    fresh = run_train(config, work, "--overwrite")
    assert fresh.returncode == 0, fresh.stderr[-3000:]
    assert len(records(work)) == STEPS


def _model_data(setup):
    _root, model, data, _, _ = setup
    return model, data


def test_damaged_newest_checkpoint_falls_back(setup, tmp_path):
    _, model, data, _, straight = setup
    config = write_config(
        tmp_path / "c.py", model, data, total_steps=STEPS, save_steps=2, save_total_limit=-1
    )
    work = tmp_path / "work"
    assert run_train(config, work).returncode == 0
    newest = complete_checkpoints(work)[-1]
    weights = newest / "hf" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])  # a copy cut short
    resumed = run_train(config, work, "--resume", "auto")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"{newest.name} is broken" in resumed.stderr and "model.safetensors" in resumed.stderr
    assert "at step 6" in resumed.stderr
    expected, got = final_weights(straight), final_weights(work)
    for name in expected:
        assert torch.equal(got[name], expected[name]), name


def test_late_data_error_saves_the_last_good_state(setup, tmp_path):
    _, model, data, _, _ = setup
    broken = tmp_path / "data"
    shutil.copytree(data, broken)
    write_shard(broken / "en" / "zz" / "bad.bin", [[5, 7, 100_000, 9] * 40] * 4)
    config = write_config(
        tmp_path / "bad.py", model, broken, total_steps=200, max_epochs=1, save_steps=1000
    )
    work = tmp_path / "work"
    result = run_train(config, work)
    assert result.returncode == 2
    assert "token id 100000 >= the model's vocab size" in result.stderr.strip().splitlines()[-1]
    done = len(records(work)) if (work / "metrics.jsonl").exists() else 0
    expected = [f"checkpoint-{done:07d}"] if done else []
    assert [p.name for p in complete_checkpoints(work)] == expected


def test_single_process_deepspeed(setup, tmp_path):
    _, model, data, _, _ = setup
    config = write_config(tmp_path / "ds.py", model, data, total_steps=2)
    result = run_train(config, tmp_path / "work", "--deepspeed", "deepspeed_zero2")
    assert result.returncode == 0, result.stderr[-3000:]
    assert len(records(tmp_path / "work")) == 2
    # same data-parallel size on 2 processes (sp=2): a ZeRO checkpoint is split by world size
    wider = write_config(tmp_path / "sp.py", model, data, total_steps=4, sequence_parallel_size=2)
    refused = run_train(
        wider, tmp_path / "work", "--deepspeed", "deepspeed_zero2", "--resume", "auto", nproc=2
    )
    assert refused.returncode == 2
    assert "a ZeRO checkpoint is partitioned" in refused.stderr.strip().splitlines()[-1]


def test_skipped_bad_samples_are_reported_per_file(setup, tmp_path):
    _, model, data, _, _ = setup
    broken = tmp_path / "data"
    shutil.copytree(data, broken)
    write_shard(broken / "en" / "zz" / "bad.bin", [[5, 7, 100_000, 9] * 40] * 4)
    config = write_config(
        tmp_path / "skip.py",
        model,
        broken,
        total_steps=None,
        max_epochs=1,
        on_bad_sample="skip",
        num_workers=1,  # the counts travel from the worker with each batch
    )
    result = run_train(config, tmp_path / "work")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "bad sample(s) trained as ignored tokens in" in result.stderr
    assert "bad.bin" in result.stderr
