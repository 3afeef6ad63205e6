"""XTuner's data formats in ``data tokenize``: ids and loss masks as XTuner makes them.

The expected ids are written here from XTuner v0.1.23's documented template
strings (xtuner/utils/templates.py) and its encode_fn rules, each piece tokenized
on its own with the demo tokenizer: BOS only where the previous turn ended with
EOS, the prompt untrained, output + SUFFIX trained, EOS (trained) unless SUFFIX
acts as EOS, SEP untrained.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
from runner import run_cli
from transformers import AutoTokenizer

from evotune.data import load_intern_repo_tokenized_dataset
from evotune.data.ftdp import ShardReader
from evotune.data.provenance import check_provenance, read_provenance, sidecar_path
from evotune.data.templates import PROMPT_TEMPLATES, get_template
from evotune.data.tokenize import Turn, conversation_turns, openai_turns, xtuner_encode
from evotune.data.tools import tokenize_files
from evotune.errors import ConfigError, DataError, OutputExistsError

ROOT = Path(__file__).resolve().parent.parent
DEMO = ROOT / "demo" / "model"
IGNORE = -100


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(DEMO)


def _expected(tokenizer, pieces):
    """XTuner's input_ids and labels from (text or special id, trained) pieces."""
    ids, labels = [], []
    for piece, trained in pieces:
        encoded = (
            [piece] if isinstance(piece, int) else tokenizer.encode(piece, add_special_tokens=False)
        )
        ids += encoded
        labels += encoded if trained else [IGNORE] * len(encoded)
    return ids, labels


def _labels(ids, trained):
    return [t if keep else IGNORE for t, keep in zip(ids, trained, strict=True)]


CONVERSATIONS = [
    # single turn with a system message
    {
        "conversation": [
            {"system": "You are concise.", "input": "What is 2+2?", "output": "4."},
        ]
    },
    # two turns; the second has no system, the first an empty one
    {
        "conversation": [
            {"system": "", "input": "Name a prime.", "output": "Seven."},
            {"input": "And an even one?", "output": "Two, the only even prime."},
        ]
    },
    # incremental pre-training style: no input
    {"conversation": [{"input": "", "output": "def f():\n    return 1"}]},
]


def _internlm2_expected(tokenizer):
    bos = tokenizer.bos_token_id
    return [
        _expected(
            tokenizer,
            [
                (bos, False),
                (
                    "<|im_start|>system\nYou are concise.<|im_end|>\n"
                    "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n",
                    False,
                ),
                ("4.<|im_end|>", True),
                ("\n", False),
            ],
        ),
        _expected(
            tokenizer,
            [
                (bos, False),
                ("<|im_start|>user\nName a prime.<|im_end|>\n<|im_start|>assistant\n", False),
                ("Seven.<|im_end|>", True),
                ("\n", False),
                # SUFFIX_AS_EOS: no EOS, so no BOS before the second turn
                ("<|im_start|>user\nAnd an even one?<|im_end|>\n<|im_start|>assistant\n", False),
                ("Two, the only even prime.<|im_end|>", True),
                ("\n", False),
            ],
        ),
        _expected(
            tokenizer,
            [
                (bos, False),
                ("<|im_start|>user\n<|im_end|>\n<|im_start|>assistant\n", False),
                ("def f():\n    return 1<|im_end|>", True),
                ("\n", False),
            ],
        ),
    ]


def test_internlm2_chat_ids_and_mask_equal_xtuner(tokenizer):
    template = get_template("internlm2_chat")
    for record, (ids, labels) in zip(CONVERSATIONS, _internlm2_expected(tokenizer), strict=True):
        turns = conversation_turns(record["conversation"], "test")
        got_ids, trained = xtuner_encode(tokenizer, turns, template)
        assert got_ids == ids
        assert _labels(got_ids, trained) == labels


def test_internlm2_chat_through_a_json_file(tmp_path, tokenizer):
    """A .json list file (process_hf_dataset's input) -> one shard, signs = XTuner's labels."""
    source = tmp_path / "train.json"
    source.write_text(json.dumps(CONVERSATIONS, ensure_ascii=False))
    rows = tokenize_files(
        [source],
        tmp_path / "out",
        str(DEMO),
        input_format="xtuner",
        prompt_template="internlm2_chat",
    )
    assert rows[0]["samples"] == 3 and rows[0]["dropped"] == 0
    shard = load_intern_repo_tokenized_dataset(tmp_path / "out").shards[0]
    reader = ShardReader()
    for index, (ids, labels) in enumerate(_internlm2_expected(tokenizer)):
        stored = reader.read(shard, index).tolist()
        assert [abs(t) for t in stored] == ids
        assert [t if t > 0 else IGNORE for t in stored] == labels
    record = read_provenance(shard.path)
    assert record["template"]["name"] == "internlm2_chat"
    assert record["template"]["strings"]["suffix"] == "<|im_end|>"


def test_eos_templates_put_bos_and_eos_on_every_turn(tokenizer):
    """mistral: no SUFFIX, so EOS (trained) ends each reply and BOS opens the next turn."""
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    turns = [
        Turn("Hi", "Hello!", system="Be kind."),
        Turn("Bye", "Goodbye.", output_with_loss=False),
    ]
    ids, trained = xtuner_encode(tokenizer, turns, get_template("mistral"))
    assert (ids, _labels(ids, trained)) == _expected(
        tokenizer,
        [
            (bos, False),
            ("[INST] Be kind. [/INST]\n[INST] Hi [/INST]", False),
            ("Hello!", True),
            (eos, True),
            ("\n", False),
            (bos, False),
            ("[INST] Bye [/INST]", False),
            ("Goodbye.", False),  # "loss": false keeps the reply and its EOS untrained
            (eos, False),
            ("\n", False),
        ],
    )
    # chatglm2 numbers the rounds
    ids, _ = xtuner_encode(tokenizer, [Turn("a", "b"), Turn("c", "d")], get_template("chatglm2"))
    assert tokenizer.decode(ids).count("[Round 2]") == 1


def test_openai_messages_follow_xtuners_map(tokenizer):
    messages = [
        {"role": "assistant", "content": "ignored leading reply"},
        {"role": "system", "content": "S"},
        {"role": "user", "content": "part one, "},
        {"role": "user", "content": "part two"},
        {"role": "assistant", "content": "R1", "loss": "False"},
        {"role": "user", "content": "next"},
        {"role": "assistant", "content": "R2", "loss": True},
        {"role": "user", "content": "dropped: no reply follows"},
    ]
    assert openai_turns(messages, "x") == [
        Turn("part one, part two", "R1", "S", False),
        Turn("next", "R2", "", True),
    ]
    with pytest.raises(DataError, match="x: role 'human'"):
        openai_turns([{"role": "human", "content": "hi"}], "x")


def test_truncation_and_dropped_samples_as_xtuner(tmp_path, tokenizer):
    source = tmp_path / "data.jsonl"
    long_output = "word " * 50
    lines = [
        {"conversation": [{"input": "q", "output": long_output}]},
        {"messages": [{"role": "user", "content": "only a question"}]},  # no reply: dropped
        {
            "messages": [
                {"role": "user", "content": "q"},
                {"role": "assistant", "content": "a", "loss": "false"},
            ]
        },  # no loss: dropped
        {"conversation": [{"input": "x " * 40, "output": "cut away"}]},  # reply truncated away
    ]
    source.write_text("\n".join(json.dumps(line) for line in lines) + "\n")
    full_ids, full_trained = xtuner_encode(
        tokenizer, [Turn("q", long_output)], get_template("internlm2_chat")
    )
    cut = full_trained.index(True) + 6  # the prompt and six reply tokens
    rows = tokenize_files(
        [source],
        tmp_path / "out",
        str(DEMO),
        input_format="xtuner",
        prompt_template="internlm2_chat",
        max_length=cut,
    )
    # every sample but the question-only one runs past the cut
    assert rows[0]["samples"] == 1 and rows[0]["dropped"] == 3 and rows[0]["truncated"] == 3
    shard = load_intern_repo_tokenized_dataset(tmp_path / "out").shards[0]
    kept = ShardReader().read(shard, 0).tolist()
    assert [abs(t) for t in kept] == full_ids[:cut]
    assert [t > 0 for t in kept] == full_trained[:cut]


def test_untokenized_internevo_folder_layout(tmp_path, tokenizer):
    """load_intern_repo_untokenized_dataset's layout: *.json files, a messages list per line."""
    source = tmp_path / "processed"
    (source / "cn" / "legal").mkdir(parents=True)
    (source / "en").mkdir()
    conversation = [
        {"role": "system", "content": "S", "loss": "false"},
        {"role": "user", "content": "Q"},
        {"role": "assistant", "content": "A", "loss": "true"},
    ]
    (source / "cn" / "legal" / "part-0.json").write_text(json.dumps(conversation) + "\n")
    (source / "en" / "part-1.json").write_text(
        json.dumps(conversation) + "\n" + json.dumps(conversation) + "\n"
    )
    (source / "top.json").write_text(json.dumps(conversation) + "\n")
    (source / "en" / "notes.txt").write_text("not data")
    rows = tokenize_files(
        [source],
        tmp_path / "tokenized",
        str(DEMO),
        input_format="internevo-untokenized",
        prompt_template="internlm2_chat",
    )
    shards = sorted(Path(r["shard"]).relative_to(tmp_path / "tokenized").as_posix() for r in rows)
    assert shards == ["cn/legal/part-0.bin", "en/part-1.bin", "en/top.bin"]
    corpus = load_intern_repo_tokenized_dataset(tmp_path / "tokenized")
    sample = ShardReader().read(corpus.shards[0], 0).tolist()
    ids, trained = xtuner_encode(tokenizer, [Turn("Q", "A", "S")], get_template("internlm2_chat"))
    assert [abs(t) for t in sample] == ids and [t > 0 for t in sample] == trained


def test_tokenizers_own_chat_template(tmp_path):
    tokenizer_dir = tmp_path / "tok"
    shutil.copytree(DEMO, tokenizer_dir)
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    tokenizer.chat_template = (
        "{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}</s>{% endfor %}"
        "{% if add_generation_prompt %}<s>assistant: {% endif %}"
    )
    tokenizer.save_pretrained(tokenizer_dir)
    source = tmp_path / "chat.json"
    source.write_text(json.dumps(CONVERSATIONS[:1]))
    tokenize_files(
        [source],
        tmp_path / "out",
        str(tokenizer_dir),
        input_format="xtuner",
        prompt_template="tokenizer",
    )
    stored = ShardReader().read(load_intern_repo_tokenized_dataset(tmp_path / "out").shards[0], 0)
    stored = stored.tolist()
    messages = [
        {"role": "system", "content": "You are concise."},
        {"role": "user", "content": "What is 2+2?"},
        {"role": "assistant", "content": "4."},
    ]
    rendered = tokenizer.apply_chat_template(messages, tokenize=True)
    rendered = list(rendered["input_ids"] if hasattr(rendered, "keys") else rendered)
    assert [abs(t) for t in stored] == rendered
    assert tokenizer.decode([t for t in stored if t > 0]).strip() == "4.</s>"
    assert (
        read_provenance(Path(str(tmp_path / "out" / "en" / "chat.bin")))["template"][
            "chat_template"
        ]
        == tokenizer.chat_template
    )


def test_provenance_check(tmp_path, tokenizer):
    source = tmp_path / "plain.jsonl"
    source.write_text(json.dumps({"text": "hello world"}) + "\n")
    tokenize_files([source], tmp_path / "data", str(DEMO))
    assert sidecar_path(tmp_path / "data" / "en" / "plain.bin").is_file()
    assert check_provenance(tmp_path / "data", tokenizer) is None
    # another tokenizer of the same size: two ids swapped in its vocabulary
    other_dir = tmp_path / "other"
    shutil.copytree(DEMO, other_dir)
    spec = json.loads((other_dir / "tokenizer.json").read_text())
    vocab = spec["model"]["vocab"]
    vocab["¤"], vocab["¥"] = vocab["¥"], vocab["¤"]
    (other_dir / "tokenizer.json").write_text(json.dumps(spec))
    other = AutoTokenizer.from_pretrained(other_dir)
    assert len(other) == len(tokenizer)
    with pytest.raises(DataError, match=r"plain\.bin: tokenized with .* vocabulary sha256"):
        check_provenance(tmp_path / "data", other)
    other.add_tokens(["<extra>"])
    with pytest.raises(DataError, match=r"2048 tokens.* has 2049 tokens"):
        check_provenance(tmp_path / "data", other)
    # InternEvo's own data: no sidecar, a warning, no error
    shutil.copytree(tmp_path / "data", tmp_path / "bare")
    os.remove(sidecar_path(tmp_path / "bare" / "en" / "plain.bin"))
    warning = check_provenance(tmp_path / "bare", tokenizer)
    assert warning is not None and "no tokenizer provenance" in warning
    # the sidecar does not change what the loader sees
    corpus = load_intern_repo_tokenized_dataset(tmp_path / "data")
    assert [s.relative_path for s in corpus.shards] == ["en/plain.bin"]


def test_existing_shards_are_not_overwritten(tmp_path):
    source = tmp_path / "plain.jsonl"
    source.write_text(json.dumps({"text": "one"}) + "\n")
    tokenize_files([source], tmp_path / "out", str(DEMO))
    source.write_text(json.dumps({"text": "two two"}) + "\n")
    with pytest.raises(OutputExistsError, match=r"plain\.bin: exists; pass --overwrite"):
        tokenize_files([source], tmp_path / "out", str(DEMO))
    rows = tokenize_files([source], tmp_path / "out", str(DEMO), overwrite=True)
    assert rows[0]["tokens"] == 2 + len(
        AutoTokenizer.from_pretrained(DEMO).encode("two two", add_special_tokens=False)
    )
    umask = os.umask(0)
    os.umask(umask)
    for name in ("plain.bin", "plain.bin.meta", "plain.bin.provenance.json"):
        assert (tmp_path / "out" / "en" / name).stat().st_mode & 0o777 == 0o666 & ~umask


def test_bad_options_are_one_line_errors(tmp_path):
    source = tmp_path / "c.json"
    source.write_text("[]")
    with pytest.raises(ConfigError, match="needs --prompt-template"):
        tokenize_files([source], tmp_path / "o", str(DEMO), input_format="xtuner")
    with pytest.raises(ConfigError, match="unknown prompt template 'internlm3'"):
        tokenize_files(
            [source], tmp_path / "o", str(DEMO), input_format="xtuner", prompt_template="internlm3"
        )
    with pytest.raises(DataError, match=r"--tokenizer .*nowhere: no such folder"):
        tokenize_files([source], tmp_path / "o", str(tmp_path / "nowhere"))
    assert "internlm2_chat" in PROMPT_TEMPLATES and "llama3_chat" in PROMPT_TEMPLATES


@pytest.mark.integration
def test_cli_warns_about_untrained_roles_and_bad_tokenizer(tmp_path):
    source = tmp_path / "sharegpt.jsonl"
    messages = [{"role": "human", "content": "hi"}, {"role": "gpt", "content": "hello"}]
    source.write_text(json.dumps({"messages": messages}) + "\n")
    result = run_cli(
        "data", "tokenize", str(source), "-o", str(tmp_path / "out"), "--tokenizer", str(DEMO)
    )
    assert result.returncode == 0, result.stderr
    assert "zero trainable tokens" in result.stderr
    assert "roles gpt, human are never trained" in result.stderr
    assert "--trained-roles" in result.stderr
    result = run_cli(
        "data",
        "tokenize",
        str(source),
        "-o",
        str(tmp_path / "out"),
        "--tokenizer",
        str(DEMO),
        "--trained-roles",
        "gpt",
    )
    assert result.returncode == 2 and "pass --overwrite" in result.stderr
    result = run_cli(
        "data",
        "tokenize",
        str(source),
        "-o",
        str(tmp_path / "out2"),
        "--tokenizer",
        "./no/such/tokenizer",
    )
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0 and "Traceback" not in result.stderr
    result = run_cli(
        "data",
        "tokenize",
        str(source),
        "-o",
        str(tmp_path / "out3"),
        "--tokenizer",
        str(DEMO),
        "--format",
        "xtuner",
        "--prompt-template",
        "internlm2_chat",
        "--max-length",
        "64",
    )
    assert result.returncode == 2 and "sharegpt.jsonl:1: role 'human'" in result.stderr
