"""evotune plot / report: one record per step after a resume, finished and running work dirs."""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time

import pytest
from runner import run_cli, run_train, start_train
from tiny import save_tiny_llama, write_config, write_corpus

from evotune.errors import ConfigError
from evotune.report import format_summary, read_records, summarize
from evotune.report.plot import ema, plot_runs
from evotune.train import checkpoint as ckpt

TYPES = ("en", "cn")


def _record(step, loss, **extra):
    row = {
        "step": step,
        "epoch": 0,
        "loss": loss,
        "lr": 1e-3,
        "grad_norm": 1.0,
        "skipped": False,
        "tokens": 1000,
        "trainable_tokens": 600,
        "tokens_per_s": 5000.0 + step,
        "step_time_s": 0.2,
        "loss_by_type": None if loss is None else {"en": loss - 0.5, "cn": loss + 0.5},
    }
    row.update(extra)
    return json.dumps(row)


def _eval(step, loss):
    by_type = {"en": loss - 0.25, "cn": loss + 0.25}
    return json.dumps({"kind": "eval", "step": step, "val_loss": loss, "val_loss_by_type": by_type})


def _write(work, lines, torn_tail=False):
    work.mkdir(parents=True, exist_ok=True)
    text = "\n".join(lines) + "\n"
    if torn_tail:
        text += '{"step": 61, "loss": 3.'  # a line the running process is still writing
    (work / "metrics.jsonl").write_text(text)
    return work


def _resumed_run(work, killed_until=56, resumed_until=60, resume_from=40):
    killed = [_record(s, 100.0 + s) for s in range(1, killed_until + 1)]
    killed.insert(50, _eval(50, 99.0))  # the killed run's eval after step 50
    killed.insert(20, _eval(20, 8.0))
    resumed = [_record(s, float(s)) for s in range(resume_from + 1, resumed_until + 1)]
    if resumed_until >= 50:
        resumed.insert(50 - resume_from, _eval(50, 7.0))
    return _write(work, killed + resumed, torn_tail=True)


def test_resumed_run_keeps_one_record_per_step_the_last(tmp_path):
    run = read_records(_resumed_run(tmp_path))
    assert [r["step"] for r in run.train] == list(range(1, 61))
    assert [r["loss"] for r in run.train[40:]] == [float(s) for s in range(41, 61)]
    assert [(r["step"], r["val_loss"]) for r in run.evals] == [(20, 8.0), (50, 7.0)]
    assert run.segments == 2
    assert run.superseded == 16 + 1  # steps 41-56 and the eval after step 50
    assert run.unreadable == 1


def test_resumed_run_behind_the_killed_one_drops_the_killed_future(tmp_path):
    run = read_records(_resumed_run(tmp_path, resumed_until=45))
    assert [r["step"] for r in run.train] == list(range(1, 46))
    assert run.train[-1]["loss"] == 45.0
    assert [r["step"] for r in run.evals] == [20]


def test_series_skip_missing_and_non_finite(tmp_path):
    work = _write(tmp_path, [_record(1, 2.0), _record(2, None, skipped=True), _record(3, 1.5)])
    run = read_records(work)
    assert run.series("loss") == ([1, 3], [2.0, 1.5])
    assert run.type_names("loss_by_type") == ["en", "cn"]
    assert run.series("mfu") == ([], [])


def test_ema():
    assert ema([3.0, 3.0, 3.0], 10) == pytest.approx([3.0, 3.0, 3.0])
    assert ema([1.0, 2.0], 1) == [1.0, 2.0]
    smoothed = ema([0.0] * 50 + [1.0] * 50, 9)
    assert smoothed[0] == 0.0 and 0.0 < smoothed[55] < 1.0 and smoothed[-1] > 0.99


def test_missing_metrics_file_is_one_line(tmp_path):
    with pytest.raises(ConfigError, match=r"metrics\.jsonl: no metrics file"):
        read_records(tmp_path)


def _finished_run(work, total=60):
    lines = [_record(s, 4.0 - s / 30, mfu=0.4, hfu=0.5) for s in range(1, total + 1)]
    lines[6] = _record(7, None, skipped=True)
    for step, loss in ((20, 3.6), (40, 3.1), (60, 3.3)):
        lines.insert(step, _eval(step, loss))
    _write(work, lines)
    for step in (40, 60):
        temporary = ckpt.temporary_folder(work, step)
        ckpt.prepare_folder(temporary)
        (temporary / "optimizer.pt").write_bytes(b"x" * 2048)
        ckpt.write_json(temporary / "trainer_state.json", {"total_steps": total})
        ckpt.publish(temporary, work / ckpt.checkpoint_name(step))
    return work


def test_report_of_a_finished_run(tmp_path):
    summary = summarize(_finished_run(tmp_path), verify=True)
    assert summary["status"]["state"] == "finished"
    assert summary["steps"] | {"epoch": None} == {
        "done": 60,
        "total": 60,
        "epoch": None,
        "skipped": 1,
        "skipped_at": [7],
    }
    assert summary["tokens"] == {"total": 60_000, "trainable": 36_000}
    assert summary["time"]["in_steps_s"] == pytest.approx(12.0)
    assert summary["time"]["eta_s"] is None
    assert summary["throughput"]["tokens_per_s_median"] == pytest.approx(5030.5)
    assert summary["throughput"]["mfu_median"] == 0.4 and summary["throughput"]["hfu_median"] == 0.5
    validation = summary["validation"]
    assert validation["overall"] == {"best": 3.1, "best_step": 40, "last": 3.3, "last_step": 60}
    assert validation["by_type"]["cn"]["best"] == pytest.approx(3.35)
    names = [c["name"] for c in summary["checkpoints"]["complete"]]
    assert names == ["checkpoint-0000040", "checkpoint-0000060"]
    assert all(
        c["problems"] == [] and c["bytes"] > 2048 for c in summary["checkpoints"]["complete"]
    )
    text = format_summary(summary)
    assert len(text.splitlines()) <= 30
    for expected in ("60/60 (100.0%)", "skipped 1 (at 7)", "MFU 40.0%", "HFU 50.0%", "finished"):
        assert expected in text, expected
    json.dumps(summary)  # --json prints it


def test_report_names_a_broken_checkpoint(tmp_path):
    work = _finished_run(tmp_path)
    (work / "checkpoint-0000060" / "optimizer.pt").write_bytes(b"")
    text = format_summary(summarize(work, verify=True))
    assert f"BROKEN: {work / 'checkpoint-0000060' / 'optimizer.pt'}" in text


def _lock(work, host, pid):
    (work / ".lock").write_text(json.dumps({"host": host, "pid": pid}))


def test_report_of_a_running_run(tmp_path):
    work = _write(tmp_path, [_record(s, 3.0) for s in range(1, 4)], torn_tail=True)
    (work / "train.log").write_text("12:00:00 INFO step 1/100 loss 3.0\n12:00:01 INFO step 3/100\n")
    _lock(work, socket.gethostname(), os.getpid())
    summary = summarize(work)
    assert summary["status"]["state"] == "running"
    assert f"pid {os.getpid()}" in summary["status"]["text"]
    assert summary["steps"]["total"] == 100
    assert summary["time"]["eta_s"] == pytest.approx(97 * 0.2)
    assert summary["validation"] is None and summary["checkpoints"]["complete"] == []
    text = format_summary(summary)
    assert "3/100 (3.0%)" in text and "ETA" in text and "none complete yet" in text


def test_wall_time_needs_time_stamps(tmp_path):
    work = _write(tmp_path, [_record(s, 3.0, time=1000.0 + 10 * s) for s in range(1, 7)])
    summary = summarize(work)
    assert summary["time"]["wall_s"] == pytest.approx(50.2)  # step 1 began 0.2 s early
    assert "50.2s wall, 1.2s in steps" in format_summary(summary)
    _write(tmp_path, [_record(s, 3.0) for s in range(1, 7)])
    summary = summarize(work)
    assert summary["time"]["wall_s"] is None and " wall," not in format_summary(summary)


def test_report_before_the_first_step(tmp_path):
    (tmp_path / "config.py").write_text("lr = 1e-3\n")  # what a run writes before its first step
    summary = summarize(tmp_path)
    assert summary["steps"]["done"] == 0 and summary["loss"]["last"] is None
    assert "no step finished yet" in format_summary(summary)


def test_report_of_a_stale_or_remote_lock(tmp_path):
    work = _write(tmp_path, [_record(1, 3.0)])
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    (work / ".lock").write_text(f"{socket.gethostname()} {gone.pid}\n")
    status = summarize(work)["status"]
    assert status["state"] == "stopped" and "stale lock" in status["text"]
    _lock(work, "some-other-node", 1234)
    status = summarize(work)["status"]
    assert "some-other-node" in status["text"] and "cannot check" in status["text"]


def test_plot_two_runs_one_still_running(tmp_path):
    first = _finished_run(tmp_path / "a" / "run")
    second = _resumed_run(tmp_path / "b" / "run")
    output = tmp_path / "curves.png"
    runs = plot_runs([first, second], output)
    assert output.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and output.stat().st_size > 20_000
    assert [r.train[-1]["step"] for r in runs] == [60, 60]


def test_plot_leaves_out_a_run_without_steps(tmp_path, caplog):
    ready = _write(tmp_path / "ready", [_record(1, 3.0), _record(2, 2.9)])
    waiting = _write(tmp_path / "waiting", ['{"step": 1, "lo'])
    with caplog.at_level(logging.WARNING, logger="evotune"):
        runs = plot_runs([ready, waiting], tmp_path / "x.svg", smooth=1, x_axis="tokens")
    assert len(runs) == 1 and "waiting: no step finished yet" in caplog.text
    with pytest.raises(ConfigError, match="no step finished yet"):
        plot_runs([waiting], tmp_path / "y.png")
    with pytest.raises(ConfigError, match="--smooth 0"):
        plot_runs([ready], tmp_path / "y.png", smooth=0)


def test_plot_without_matplotlib_is_one_line(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # what an install without it raises
    work = _write(tmp_path, [_record(1, 3.0)])
    with pytest.raises(ConfigError, match=r"pip install 'evotune\[plot\]'"):
        plot_runs([work], tmp_path / "x.png")


# -- through the CLI, on real runs -----------------------------------------------------------


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("report")
    return root, save_tiny_llama(root / "model"), write_corpus(root / "data", samples=60)


@pytest.mark.integration
def test_report_and_plot_after_a_crash_and_resume(tiny, tmp_path):
    root, model, data = tiny
    config = write_config(root / "c.py", model, data, total_steps=8, save_steps=2)
    work = tmp_path / "work"
    crashed = run_train(config, work, env={"EVOTUNE_FAULT": "abort_in_save@4"})
    assert crashed.returncode == 137
    resumed = run_train(config, work, "--resume", "auto")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    raw = [json.loads(line)["step"] for line in (work / "metrics.jsonl").read_text().splitlines()]
    # the resume truncated the killed run's records past its checkpoint: one record per step
    assert raw == list(range(1, 9))
    run = read_records(work)
    assert [r["step"] for r in run.train] == list(range(1, 9)) and run.superseded == 0

    report = run_cli("report", str(work))
    assert report.returncode == 0, report.stderr
    assert "8/8 (100.0%)" in report.stdout and "finished" in report.stdout
    summary = json.loads(run_cli("report", str(work), "--json", "--verify").stdout)
    newest = summary["checkpoints"]["complete"][-1]
    assert newest["name"] == "checkpoint-0000008" and newest["problems"] == []
    plot = run_cli("plot", str(work), "-o", str(tmp_path / "curves.png"))
    assert plot.returncode == 0, plot.stderr
    assert (tmp_path / "curves.png").stat().st_size > 20_000


@pytest.mark.integration
def test_report_and_plot_while_training(tiny, tmp_path):
    root, model, data = tiny
    config = write_config(root / "long.py", model, data, total_steps=10_000, save_steps=3)
    work = tmp_path / "running"
    process = start_train(
        config,
        work,
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.time() + 180
        while time.time() < deadline and not ckpt.complete_checkpoints(work):
            assert process.poll() is None, "training ended early"
            time.sleep(0.1)
        process.send_signal(signal.SIGSTOP)  # hold it mid-run while both commands read
        summary = json.loads(run_cli("report", str(work), "--json").stdout)
        assert summary["status"]["state"] in ("running", "stopped")  # "running" once it locks
        if (work / ".lock").exists():
            assert summary["status"]["state"] == "running"
            assert f"pid {summary['status']['lock']['pid']}" in summary["status"]["text"]
        assert 3 <= summary["steps"]["done"] < summary["steps"]["total"] == 10_000
        assert summary["time"]["eta_s"] > 0
        plot = run_cli("plot", str(work), "-o", str(tmp_path / "now.png"))
        assert plot.returncode == 0, plot.stderr
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait()


@pytest.mark.integration
@pytest.mark.parametrize("command", ["data", "report"])
def test_closed_pipe_ends_quietly(tiny, tmp_path, command):
    _, _, data = tiny
    if command == "data":
        args = ["data", "inspect", str(data), "--json"]
    else:
        args = ["report", str(_finished_run(tmp_path)), "--json"]
    process = subprocess.Popen(
        [sys.executable, "-m", "evotune.cli", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=dict(os.environ, OMP_NUM_THREADS="1"),
    )
    process.stdout.close()  # the reader is gone before evotune prints (`| head -0`)
    stderr = process.stderr.read().decode()
    assert process.wait(timeout=120) == 141
    assert "Traceback" not in stderr and "BrokenPipe" not in stderr, stderr
