"""evotune data order / inspect / tokenize."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from ftdp_factory import write_shard
from runner import run_cli
from transformers import AutoTokenizer

from evotune.data import load_intern_repo_tokenized_dataset
from evotune.data.tools import inspect_folder, tokenize_files

ROOT = Path(__file__).resolve().parent.parent
DEMO_TOKENIZER = ROOT / "demo" / "model"


@pytest.mark.integration
def test_order_tool_round_trip(tmp_path):
    for relative in ["en/x.bin", "en/a/y.bin", "cn/z.bin"]:
        write_shard(tmp_path / "data" / relative, [[1, 2, 3]])
    result = run_cli("data", "order", str(tmp_path / "data"), "-o", str(tmp_path / "order.txt"))
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "order.txt").read_text().split() == ["cn/z.bin", "en/a/y.bin", "en/x.bin"]
    corpus = load_intern_repo_tokenized_dataset(
        tmp_path / "data", data_order_path=tmp_path / "order.txt"
    )
    assert [s.relative_path for s in corpus.shards] == ["cn/z.bin", "en/a/y.bin", "en/x.bin"]


@pytest.mark.integration
def test_inspect_counts(tmp_path):
    write_shard(tmp_path / "en" / "wiki" / "a.bin", [[1, 2, 3, 4], [-5, 6]])
    write_shard(tmp_path / "cn" / "b.bin", [[-1, -2, 3, 4, 5, 6, 7]])
    report = inspect_folder(tmp_path, packed_length=4)
    total = report["groups"]["total"]
    assert total["samples"] == 3 and total["tokens"] == 13
    assert total["packs"] == 1 + 1 and total["tail_tokens_lost"] == 2 + 3
    # targets: every positive token that is not a sample's first
    assert total["trainable_share"] == pytest.approx((3 + 1 + 5) / 13)
    assert report["groups"]["subset en/wiki"]["length_p100"] == 4
    result = run_cli(
        "data",
        "inspect",
        str(tmp_path),
        "--packed-length",
        "4",
        "--json",
        "--plot",
        str(tmp_path / "h.png"),
    )
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout.split("\nwrote")[0])["groups"]["type cn"]["tokens"] == 7
    assert (tmp_path / "h.png").stat().st_size > 1000


@pytest.fixture
def raw_inputs(tmp_path):
    text = tmp_path / "plain.jsonl"
    text.write_text(json.dumps({"text": "Return the absolute path."}) + "\n\n")
    chat = tmp_path / "chat.jsonl"
    chat.write_text(
        json.dumps(
            {
                "messages": [
                    {"role": "system", "content": "Be brief."},
                    {"role": "user", "content": "What does os.sep hold?"},
                    {"role": "assistant", "content": "The path separator."},
                ]
            }
        )
        + "\n"
    )
    return [text, chat]


def test_tokenize_without_template(tmp_path, raw_inputs):
    rows = tokenize_files(raw_inputs, tmp_path / "out", str(DEMO_TOKENIZER), workers=2)
    assert [r["samples"] for r in rows] == [1, 1]
    tokenizer = AutoTokenizer.from_pretrained(DEMO_TOKENIZER)
    corpus = load_intern_repo_tokenized_dataset(tmp_path / "out")
    from evotune.data.ftdp import ShardReader

    reader = ShardReader()
    chat_shard, plain_shard = corpus.shards
    plain = reader.read(plain_shard, 0).tolist()
    assert plain[0] == tokenizer.bos_token_id and plain[-1] == tokenizer.eos_token_id
    assert tokenizer.decode(plain[1:-1]) == "Return the absolute path."
    chat = reader.read(chat_shard, 0).tolist()
    trained = tokenizer.decode([t for t in chat if t > 0])
    untrained = tokenizer.decode([-t for t in chat if t < 0])
    assert trained == "The path separator.\n</s>"
    assert "What does os.sep hold?" in untrained and "<|assistant|>" in untrained


def test_tokenize_with_chat_template(tmp_path, raw_inputs):
    tokenizer_dir = tmp_path / "tok"
    shutil.copytree(DEMO_TOKENIZER, tokenizer_dir)
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    tokenizer.chat_template = (
        "{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}</s>{% endfor %}"
        "{% if add_generation_prompt %}<s>assistant: {% endif %}"
    )
    tokenizer.save_pretrained(tokenizer_dir)
    tokenize_files(raw_inputs[1:], tmp_path / "out", str(tokenizer_dir))
    from evotune.data.ftdp import ShardReader

    shard = load_intern_repo_tokenized_dataset(tmp_path / "out").shards[0]
    chat = ShardReader().read(shard, 0).tolist()
    assert tokenizer.decode([t for t in chat if t > 0]).strip() == "The path separator.</s>"
    full = tokenizer.apply_chat_template(
        json.loads(raw_inputs[1].read_text())["messages"], tokenize=True
    )
    full = list(full["input_ids"] if hasattr(full, "keys") else full)
    assert [abs(t) for t in chat] == full


@pytest.mark.integration
def test_tokenize_bad_line(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{"prompt": 3}\n')
    result = run_cli(
        "data",
        "tokenize",
        str(bad),
        "-o",
        str(tmp_path / "out"),
        "--tokenizer",
        str(DEMO_TOKENIZER),
    )
    assert result.returncode == 2
    assert "bad.jsonl:2: expected" in result.stderr
    assert not (tmp_path / "out" / "en" / "bad.bin").exists()
