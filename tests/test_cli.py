"""End to end through the console script: the demo trains, errors exit non-zero."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from runner import run_cli
from transformers import AutoModelForCausalLM, AutoTokenizer

ROOT = Path(__file__).resolve().parent.parent


def test_help():
    assert run_cli("--help").returncode == 0
    result = run_cli("train", "--help")
    assert result.returncode == 0 and "--cfg-options" in result.stdout


@pytest.mark.integration
def test_demo_trains_and_exports(tmp_path):
    work = tmp_path / "demo"
    result = run_cli("train", "configs/demo.py", "--work-dir", str(work))
    assert result.returncode == 0, result.stderr[-3000:]
    lines = (work / "metrics.jsonl").read_text().splitlines()
    records = [r for r in map(json.loads, lines) if r.get("kind") != "eval"]
    assert {"step", "loss", "lr", "grad_norm", "tokens_per_s"} <= set(records[0])
    tenth = len(records) // 10
    first = sum(r["loss"] for r in records[:tenth]) / tenth
    last = sum(r["loss"] for r in records[-tenth:]) / tenth
    assert last < 0.8 * first, (first, last)
    checkpoints = sorted(work.glob("checkpoint-*"))
    assert len(checkpoints) == 2  # save_total_limit
    hf = checkpoints[-1] / "hf"
    model = AutoModelForCausalLM.from_pretrained(hf)
    tokenizer = AutoTokenizer.from_pretrained(hf)
    ids = tokenizer("Explain os.path.join:\n", return_tensors="pt").input_ids
    with torch.no_grad():
        assert torch.isfinite(model(ids).logits).all()
    assert (work / "config.py").is_file()
    saved = json.loads((hf / "config.json").read_text())
    assert "evotune" not in json.dumps(saved)


@pytest.mark.integration
def test_config_error_is_one_line_and_exit_2(tmp_path):
    config = tmp_path / "bad.py"
    config.write_text("pretrained_model_name_or_path = 'x'\nlearning_rate = 1e-4\n")
    result = run_cli("train", str(config), "--work-dir", str(tmp_path / "w"))
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "unknown setting 'learning_rate'" in lines[0]


@pytest.mark.integration
def test_missing_model_folder(tmp_path):
    result = run_cli(
        "train",
        "configs/demo.py",
        "--work-dir",
        str(tmp_path / "w"),
        "--cfg-options",
        f"pretrained_model_name_or_path={tmp_path / 'nope'}",
    )
    assert result.returncode == 2
    assert "pretrained_model_name_or_path" in result.stderr and "does not exist" in result.stderr


@pytest.mark.integration
@pytest.mark.parametrize(
    "override, message",
    [
        ("max_length=100000", "max_position_embeddings=1024"),
        ("dataset_folder=/nonexistent/data", "dataset folder not found"),
    ],
)
def test_data_and_model_mismatch_errors(tmp_path, override, message):
    # the demo config builds train_dataset from dataset_folder and max_length
    result = run_cli(
        "train",
        "configs/demo.py",
        "--work-dir",
        str(tmp_path / "w"),
        "--cfg-options",
        override,
        "val_dataset_folder=None",  # the small demo validation set would fail first
        "eval_steps=None",
    )
    assert result.returncode == 2, result.stderr[-2000:]
    assert message in result.stderr.strip().splitlines()[-1]


@pytest.mark.integration
def test_tokenizer_larger_than_embeddings(tmp_path):
    import shutil

    from transformers import AutoTokenizer

    tokenizer_dir = tmp_path / "tok"
    shutil.copytree(ROOT / "demo" / "model", tokenizer_dir)
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    tokenizer.add_tokens([f"<extra_{i}>" for i in range(10)])
    tokenizer.save_pretrained(tokenizer_dir)
    result = run_cli(
        "train",
        "configs/demo.py",
        "--work-dir",
        str(tmp_path / "w"),
        "--cfg-options",
        f"tokenizer_name_or_path={tokenizer_dir}",
    )
    assert result.returncode == 2
    assert "tokenizer has 2058 tokens but the model's embeddings hold 2048" in result.stderr
