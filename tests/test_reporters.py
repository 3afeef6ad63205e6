"""TensorBoard and W&B reporters, report_to, and the dataset lines of the start banner."""

from __future__ import annotations

import json
import sys

import pytest
from runner import records, run_train
from tiny import save_tiny_llama, write_config, write_corpus

from evotune.config import ConfigError, load_config
from evotune.data import build_packed_dataset, load_intern_repo_tokenized_dataset
from evotune.train.reporters import (
    TENSORBOARD_FOLDER,
    WANDB_RUN_ID_FILE,
    Reporters,
    TensorBoardReporter,
    dataset_lines,
    resolve_report_to,
    scalars,
)


def _accumulator(folder):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    accumulator = EventAccumulator(str(folder), size_guidance={"scalars": 0})
    accumulator.Reload()
    return accumulator


def _values(accumulator, tag):
    return [(event.step, event.value) for event in accumulator.Scalars(tag)]


def _same_series(got, expected):
    """Steps equal; values equal up to TensorBoard's float32."""
    assert [step for step, _ in got] == [step for step, _ in expected]
    assert [value for _, value in got] == pytest.approx([v for _, v in expected], rel=1e-6)
    return True


def test_scalars_flatten_numbers_and_dicts():
    train = {"step": 3, "loss": 2.5, "skipped": False, "mfu": None, "loss_by_type": {"en": 2.0}}
    assert scalars(train) == {"train/loss": 2.5, "train/skipped": 0.0, "train/loss_by_type/en": 2.0}
    evaluated = {"kind": "eval", "step": 3, "val_loss": 1.5, "val_loss_by_type": {"cn": 1.0}}
    assert scalars(evaluated) == {"eval/val_loss": 1.5, "eval/val_loss_by_type/cn": 1.0}


def test_tensorboard_events_read_back(tmp_path):
    pytest.importorskip("tensorboard")
    reporter = TensorBoardReporter(tmp_path, start_step=0)
    written = [{"step": s, "loss": 1.0 / s, "loss_by_type": {"en": 2.0 / s}} for s in (1, 2, 3)]
    for record in written:
        reporter.write(record)
    reporter.write({"kind": "eval", "step": 3, "val_loss": 0.75})
    reporter.close()
    accumulator = _accumulator(tmp_path / TENSORBOARD_FOLDER)
    assert _same_series(_values(accumulator, "train/loss"), [(1, 1.0), (2, 0.5), (3, 1 / 3)])
    assert _same_series(_values(accumulator, "train/loss_by_type/en")[-1:], [(3, 2 / 3)])
    assert _values(accumulator, "eval/val_loss") == [(3, 0.75)]


def test_resumed_tensorboard_hides_the_replayed_steps(tmp_path):
    pytest.importorskip("tensorboard")
    first = TensorBoardReporter(tmp_path, start_step=0)
    for step in (1, 2, 3, 4):
        first.write({"step": step, "loss": float(step)})
    first.close()
    resumed = TensorBoardReporter(tmp_path, start_step=2)  # the checkpoint was at step 2
    for step in (3, 4):
        resumed.write({"step": step, "loss": 10.0 * step})
    resumed.close()
    assert _values(_accumulator(tmp_path / TENSORBOARD_FOLDER), "train/loss") == [
        (1, 1.0),
        (2, 2.0),
        (3, 30.0),
        (4, 40.0),
    ]


def test_report_to_names_are_checked(monkeypatch):
    with pytest.raises(ConfigError, match="report_to: unknown reporter 'tensorbord'"):
        resolve_report_to(["tensorbord"])
    with pytest.raises(ConfigError, match="report_to: a list of"):
        resolve_report_to(3)
    assert resolve_report_to("none") == [] and resolve_report_to([]) == []
    monkeypatch.setitem(sys.modules, "wandb", None)  # not importable, as when not installed
    with pytest.raises(ConfigError, match="'wandb' is asked for but the wandb package is not"):
        resolve_report_to(["tensorboard", "wandb"], "cfg.py")
    monkeypatch.setitem(sys.modules, "tensorboard", None)
    assert resolve_report_to("auto") == []
    with pytest.raises(ConfigError, match=r"pip install 'evotune\[tensorboard\]'"):
        resolve_report_to("tensorboard")


def test_only_the_main_rank_reports(tmp_path):
    config = write_config(tmp_path / "c.py", tmp_path, tmp_path, report_to=["tensorboard"])
    settings = load_config(config).settings
    assert Reporters.build(settings, tmp_path, is_main=False).reporters == []
    assert not (tmp_path / TENSORBOARD_FOLDER).exists()


def test_wandb_offline_run(tmp_path, monkeypatch):
    wandb = pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    config = write_config(tmp_path / "c.py", tmp_path, tmp_path, report_to=["wandb"])
    settings = load_config(config).settings
    work = tmp_path / "work"
    work.mkdir()
    reporters = Reporters.build(settings, work, is_main=True)
    reporters.write({"step": 1, "loss": 2.0, "loss_by_type": {"en": 2.5}})
    reporters.write({"kind": "eval", "step": 1, "val_loss": 1.5})
    reporters.close()
    run_id = (work / WANDB_RUN_ID_FILE).read_text().strip()
    offline = list((work / "wandb").glob(f"offline-run-*-{run_id}"))
    assert len(offline) == 1 and any(offline[0].glob("*.wandb"))
    assert wandb.run is None  # finished


def test_dataset_lines_give_every_type(tmp_path):
    data = write_corpus(tmp_path / "data", shards=3, samples=30)
    dataset = build_packed_dataset(load_intern_repo_tokenized_dataset(data), packed_length=64)
    lines = dataset_lines("data", dataset)
    corpus = dataset.corpus
    assert [line.split("'")[1] for line in lines] == ["cn", "en"]
    en = [s for s in corpus.shards if corpus.type_names[s.type_id] == "en"]
    assert f"{len(en)} shards, {sum(s.num_samples for s in en)} samples" in lines[1]
    packs = [int(line.split(" tokens, ")[1].split()[0]) for line in lines]
    assert sum(packs) == len(dataset)


@pytest.mark.integration
def test_a_run_writes_every_metric_to_tensorboard(tmp_path):
    pytest.importorskip("tensorboard")
    model = save_tiny_llama(tmp_path / "model")
    data = write_corpus(tmp_path / "data", shards=3, samples=40)
    val = write_corpus(tmp_path / "val", seed=3, shards=2, samples=20)
    config = write_config(
        tmp_path / "c.py",
        model,
        data,
        total_steps=3,
        val_dataset_folder=str(val),
        eval_steps=2,
        report_to=["tensorboard"],
    )
    result = run_train(config, tmp_path / "w")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "data type 'cn': 1 shards" in result.stderr
    assert "validation: " in result.stderr and "eval step 2 | val_loss" in result.stderr
    accumulator = _accumulator(tmp_path / "w" / TENSORBOARD_FOLDER)
    rows = records(tmp_path / "w")
    train = [r for r in rows if r.get("kind") != "eval"]
    evals = [r for r in rows if r.get("kind") == "eval"]
    assert [r["step"] for r in evals] == [2, 3]
    for key in ("loss", "lr", "grad_norm", "tokens_per_s"):
        assert _same_series(
            _values(accumulator, f"train/{key}"), [(r["step"], r[key]) for r in train]
        ), key
    assert _same_series(
        _values(accumulator, "eval/val_loss"), [(r["step"], r["val_loss"]) for r in evals]
    )
    for name in evals[0]["val_loss_by_type"]:
        assert _same_series(
            _values(accumulator, f"eval/val_loss_by_type/{name}"),
            [(r["step"], r["val_loss_by_type"][name]) for r in evals],
        )
    json.dumps(rows)
