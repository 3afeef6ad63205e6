"""Never lose a run: exact resume after kill -9, torn checkpoints, skipped steps, refusals."""

from __future__ import annotations

import contextlib
import json
import random
import signal
import subprocess
import sys
import time

import psutil
import pytest
import torch
from runner import final_weights, records, run_train, start_train
from safetensors.torch import load_file
from tiny import save_tiny_llama, write_config, write_corpus

from evotune.train.checkpoint import complete_checkpoints

STEPS = 8

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("resume")
    model = save_tiny_llama(root / "model")
    data = write_corpus(root / "data", shards=3, samples=60)
    return root, model, data


def _config(root, name, model, data, **settings):
    values = dict(accumulative_counts=2, total_steps=STEPS, save_steps=2, save_total_limit=-1)
    values.update(settings)
    return write_config(root / f"{name}.py", model, data, **values)


@pytest.fixture(scope="module")
def straight(setup):
    root, model, data = setup
    runs = {}
    for nproc in (1, 2):
        config = _config(
            root, f"straight{nproc}", model, data, accumulative_counts=2 if nproc == 1 else 1
        )
        result = run_train(config, root / f"straight{nproc}", nproc=nproc)
        assert result.returncode == 0, result.stderr[-3000:]
        runs[nproc] = root / f"straight{nproc}"
    return runs


def _last_by_step(work_dir):
    by_step = {}
    for line in (work_dir / "metrics.jsonl").read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut by kill -9
        by_step[row["step"]] = row
    return by_step


def _bitwise_equal(a, b):
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


def test_same_config_twice_is_deterministic(setup, straight, tmp_path):
    root, model, data = setup
    config = _config(root, "again", model, data)
    result = run_train(config, tmp_path / "again")
    assert result.returncode == 0, result.stderr[-2000:]
    assert [r["loss"] for r in records(tmp_path / "again")] == [
        r["loss"] for r in records(straight[1])
    ]


@pytest.mark.parametrize("nproc", [1, 2])
def test_kill9_then_resume_auto_is_bit_identical(setup, straight, tmp_path, nproc):
    root, model, data = setup
    config = _config(
        root, f"killed{nproc}", model, data, accumulative_counts=2 if nproc == 1 else 1
    )
    work = tmp_path / "killed"
    kill_after = random.Random(nproc).randint(3, STEPS - 1)  # a save (every 2 steps) came first
    process = start_train(
        config,
        work,
        nproc=nproc,
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + 240
    metrics = work / "metrics.jsonl"
    while time.time() < deadline and process.poll() is None:
        if metrics.exists() and len(metrics.read_text().splitlines()) >= kill_after:
            break
        time.sleep(0.05)
    tree = [process, *psutil.Process(process.pid).children(recursive=True)]
    for member in tree:  # torchrun's workers live in sessions of their own
        with contextlib.suppress(psutil.NoSuchProcess):
            member.send_signal(signal.SIGKILL) if isinstance(
                member, psutil.Process
            ) else member.kill()
    process.wait()
    saved = complete_checkpoints(work)
    assert saved, "no checkpoint was complete before the kill"
    resume_step = int(saved[-1].name.split("-")[1])
    assert resume_step < STEPS

    result = run_train(config, work, "--resume", "auto", nproc=nproc)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"resumed from {saved[-1]} at step {resume_step}" in result.stderr
    expected, got = _last_by_step(straight[nproc]), _last_by_step(work)
    for step in range(resume_step + 1, STEPS + 1):
        assert got[step]["loss"] == expected[step]["loss"], step
        assert got[step]["grad_norm"] == expected[step]["grad_norm"], step
    _bitwise_equal(final_weights(work), final_weights(straight[nproc]))


def test_abort_during_checkpoint_write(setup, straight, tmp_path):
    root, model, data = setup
    config = _config(root, "torn", model, data)
    work = tmp_path / "torn"
    result = run_train(config, work, env={"EVOTUNE_FAULT": "abort_in_save@4"})
    assert result.returncode == 137
    assert (work / ".checkpoint-0000004.tmp").is_dir()  # torn write left behind, never loaded
    assert [p.name for p in complete_checkpoints(work)] == ["checkpoint-0000002"]
    result = run_train(config, work, "--resume", "auto")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "at step 2" in result.stderr
    assert not (work / ".checkpoint-0000004.tmp").exists()
    _bitwise_equal(final_weights(work), final_weights(straight[1]))


def test_non_finite_step_is_skipped_and_counted(setup, tmp_path):
    root, model, data = setup
    config = _config(root, "nan", model, data)
    result = run_train(config, tmp_path / "nan", env={"EVOTUNE_FAULT": "nan_loss@3"})
    assert result.returncode == 0, result.stderr[-3000:]
    rows = records(tmp_path / "nan")
    assert [r["skipped"] for r in rows] == [False, False, True] + [False] * (STEPS - 3)
    assert rows[2]["loss"] is None
    assert rows[3]["lr"] == rows[2]["lr"]  # the schedule does not advance on a skipped step
    assert "step 3: non-finite loss" in result.stderr
    assert len(rows) == STEPS


def test_too_many_consecutive_skips_stop_with_a_checkpoint(setup, tmp_path):
    root, model, data = setup
    config = _config(root, "nans", model, data, max_consecutive_skipped_steps=3, save_steps=100)
    work = tmp_path / "nans"
    result = run_train(config, work, env={"EVOTUNE_FAULT": "nan_loss@2,3,4"})
    assert result.returncode == 1
    last = result.stderr.strip().splitlines()[-1]
    assert "3 consecutive steps had a non-finite loss" in last
    saved = complete_checkpoints(work)
    assert [p.name for p in saved] == ["checkpoint-0000004"]
    state = json.loads((saved[0] / "trainer_state.json").read_text())["state"]
    assert state["updates"] == 1 and state["skipped_steps"] == 3


def test_resume_refuses_changed_layout(setup, straight, tmp_path):
    root, model, data = setup
    checkpoint = complete_checkpoints(straight[1])[0]
    config = _config(root, "other", model, data, accumulative_counts=1)
    result = run_train(config, tmp_path / "w", "--resume", str(checkpoint), nproc=2)
    assert result.returncode == 2
    assert "saved with data-parallel size 1, now 2" in result.stderr.strip().splitlines()[-1]
    changed = _config(root, "changed", model, data, max_length=32)
    result = run_train(changed, tmp_path / "w2", "--resume", str(checkpoint))
    assert result.returncode == 2
    assert "the dataset or packing changed" in result.stderr.strip().splitlines()[-1]


def test_export(setup, straight, tmp_path):
    checkpoint = complete_checkpoints(straight[1])[-1]
    out = tmp_path / "exported"
    result = subprocess.run(
        [sys.executable, "-m", "evotune.cli", "export", str(checkpoint), "-o", str(out)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    _bitwise_equal(
        load_file(str(out / "model.safetensors")),
        load_file(str(checkpoint / "hf" / "model.safetensors")),
    )
    again = subprocess.run(
        [sys.executable, "-m", "evotune.cli", "export", str(checkpoint), "-o", str(out)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert again.returncode == 2 and "not empty" in again.stderr


def test_unwritable_work_dir_fails_at_start(setup, tmp_path):
    root, model, data = setup
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    result = run_train(_config(root, "unwritable", model, data), blocker / "work")
    assert result.returncode == 2
    assert "not writable" in result.stderr.strip().splitlines()[-1]


def test_deepspeed_zero3_resume_after_torn_save(setup, tmp_path):
    """DeepSpeed's own partitioned checkpoint inside evotune's atomic folder."""
    root, model, data = setup
    config = _config(root, "ds", model, data, accumulative_counts=1, total_steps=6)
    straight_run = run_train(
        config, tmp_path / "straight", "--deepspeed", "deepspeed_zero3", nproc=2
    )
    assert straight_run.returncode == 0, straight_run.stderr[-3000:]
    work = tmp_path / "torn"
    torn = run_train(
        config,
        work,
        "--deepspeed",
        "deepspeed_zero3",
        nproc=2,
        env={"EVOTUNE_FAULT": "abort_in_save@4"},
    )
    assert torn.returncode != 0
    assert [p.name for p in complete_checkpoints(work)] == ["checkpoint-0000002"]
    assert (complete_checkpoints(work)[0] / "deepspeed").is_dir()
    resumed = run_train(config, work, "--deepspeed", "deepspeed_zero3", "--resume", "auto", nproc=2)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    expected, got = _last_by_step(tmp_path / "straight"), _last_by_step(work)
    for step in range(3, 7):
        assert got[step]["loss"] == pytest.approx(expected[step]["loss"], rel=1e-6), step
    reference, final = final_weights(tmp_path / "straight"), final_weights(work)
    for name in reference:
        torch.testing.assert_close(final[name], reference[name], rtol=0, atol=1e-6, msg=name)
