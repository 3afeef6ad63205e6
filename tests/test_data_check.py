"""``evotune data check``: every problem named with file:line, the meta checked exactly, exit codes."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
from ftdp_factory import random_samples, write_shard
from hypothesis import given, settings
from hypothesis import strategies as st

from evotune.cli import main
from evotune.data import check
from evotune.data.check import check_folder
from evotune.data.ftdp import (
    BadSampleError,
    ShardReader,
    TokenLineError,
    decode_canonical_lines,
    decode_tokens,
    index_shard,
)
from evotune.errors import ConfigError, DataError

VOCAB = 50


def _write_meta(path, rows):
    buffer = io.BytesIO()
    np.save(buffer, np.asarray(rows, dtype=np.int64).reshape(-1, 2))
    (path.parent / (path.name + ".meta")).write_bytes(buffer.getvalue())


def _lines_shard(path, lines, lengths=None):
    """A shard holding ``lines`` verbatim; the meta gives true offsets and ``lengths``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    offsets, body = [], b""
    for line in lines:
        offsets.append(len(body))
        body += line + b"\n"
    path.write_bytes(body)
    if lengths is None:
        lengths = [len(json.loads(line)["tokens"]) for line in lines]
    _write_meta(path, list(zip(offsets, lengths, strict=True)))
    return path


def _clean_corpus(folder, seed=0):
    rng = np.random.default_rng(seed)
    samples = {}
    for relative in ("en/a/x.bin", "en/b.bin", "cn/y.bin"):
        samples[relative] = random_samples(rng, 30, VOCAB, low=1, high=40)
        write_shard(folder / relative, samples[relative])
    return samples


def _messages(report):
    return [str(problem) for problem in report.problems]


def test_clean_corpus_counts_everything(tmp_path):
    samples = _clean_corpus(tmp_path)
    report = check_folder(tmp_path, VOCAB)
    assert report.problem_count == 0 and not report.problems
    assert report.shards == 3
    assert report.samples == sum(len(s) for s in samples.values())
    assert report.tokens == sum(len(t) for s in samples.values() for t in s)
    assert report.bytes == sum(p.stat().st_size for p in tmp_path.rglob("*.bin"))
    assert "no problems" in report.summary() and "MB/s" in report.summary()


def test_every_bad_line_is_named(tmp_path):
    good = [json.dumps({"tokens": [1, 2, 3]}).encode()] * 2
    lines = [
        good[0],
        b"not json",
        b"",
        b'{"text": "x"}',
        b'{"tokens": [1, 2.5]}',
        b'{"tokens": [1, false]}',
        json.dumps({"tokens": [1, VOCAB, 2]}).encode(),
        json.dumps({"tokens": [1, -VOCAB - 7]}).encode(),
        json.dumps({"tokens": [4, 5, 6, 7]}).encode(),
        good[1],
    ]
    lengths = [3, 2, 0, 1, 2, 2, 3, 2, 3, 3]  # line 9 holds 4 tokens, the meta says 3
    path = _lines_shard(tmp_path / "en" / "a.bin", lines, lengths)
    report = check_folder(tmp_path, VOCAB)
    where = str(tmp_path / "en" / "a.bin")
    messages = _messages(report)
    assert messages[0].startswith(f"{where}:2: not a JSON line (")
    assert messages[0].endswith("); fix or drop the line")
    assert messages[1:] == [
        f"{where}:3: empty line; every line must be a JSON object with 'tokens'",
        f"{where}:4: the JSON object has no 'tokens' key",
        f"{where}:5: 'tokens' must be a list of integers",
        f"{where}:6: 'tokens' must be a list of integers",
        f"{where}:7: token id {VOCAB} >= the model's vocab size {VOCAB}; "
        "the data was tokenized for another model",
        f"{where}:8: token id {VOCAB + 7} >= the model's vocab size {VOCAB}; "
        "the data was tokenized for another model",
        f"{where}:9: 4 tokens but the meta says 3; rebuild the .meta",
    ]
    assert report.problem_count == 8
    # the loader's reader agrees line for line
    shard = index_shard(tmp_path, "en/a.bin", ["en"])
    reader, refused = ShardReader(), []
    for sample in range(shard.num_samples):
        try:
            reader.read(shard, sample, vocab_size=VOCAB)
        except BadSampleError as error:
            refused.append(error.line)
    assert refused == [problem.line for problem in report.problems]
    assert path.exists()


def test_meta_against_the_file(tmp_path):
    lines = [json.dumps({"tokens": [1] * n}).encode() for n in (2, 3, 4)]
    path = _lines_shard(tmp_path / "en" / "rows.bin", lines)
    _write_meta(path, [[0, 2], [len(lines[0]) + 1, 3]])  # a row short
    shifted = _lines_shard(tmp_path / "en" / "shift.bin", lines)
    _write_meta(shifted, [[0, 2], [len(lines[0]) + 3, 3], [len(lines[0]) + len(lines[1]) + 2, 4]])
    report = check_folder(tmp_path, VOCAB)
    assert _messages(report) == [
        f"{tmp_path}/en/rows.bin: the .meta has 2 rows but the file has 3 lines; rebuild the .meta",
        f"{tmp_path}/en/shift.bin:2: the .meta row says offset {len(lines[0]) + 3} but the line "
        f"starts at byte {len(lines[0]) + 1}; rebuild the .meta",
    ]


def test_missing_or_unreadable_meta_and_loose_shard(tmp_path):
    write_shard(tmp_path / "en" / "a.bin", [[1, 2]])
    (tmp_path / "en" / "a.bin.meta").unlink()
    write_shard(tmp_path / "en" / "b.bin", [[1, 2]])
    (tmp_path / "en" / "b.bin.meta").write_bytes(b"garbage")
    write_shard(tmp_path / "loose.bin", [[1, 2]])
    messages = _messages(check_folder(tmp_path, VOCAB))
    assert messages[0].startswith(f"{tmp_path}/en/a.bin: missing index ")
    assert (
        messages[1].startswith(f"{tmp_path}/en/b.bin: ") and "not a NumPy .npy index" in messages[1]
    )
    assert messages[2] == (
        f"{tmp_path}/loose.bin: every shard must lie under a top-level type folder "
        "(cn/, en/, ...); move it"
    )


def test_legal_oddities_are_notes(tmp_path):
    write_shard(tmp_path / "en" / "empty.bin", [])
    (tmp_path / "en" / "zero.bin").write_bytes(b"")
    (tmp_path / "en" / "zero.bin.meta").write_bytes(b"")
    path = _lines_shard(tmp_path / "en" / "odd.bin", [b'{"tokens": []}', b'{"tokens": [1, 2]}'])
    path.write_bytes(path.read_bytes()[:-1])  # no newline after the last line
    write_shard(tmp_path / "en" / "gone.bin", [[1]])
    (tmp_path / "en" / "gone.bin").unlink()
    report = check_folder(tmp_path, VOCAB)
    assert report.problem_count == 0, _messages(report)
    assert report.samples == 2 and report.tokens == 2
    notes = "\n".join(report.notes)
    assert "empty.bin: empty shard (0 samples)" in notes
    assert "zero.bin: empty shard (0 samples)" in notes
    assert "odd.bin: 1 samples with no tokens" in notes
    assert "odd.bin: the last line has no newline" in notes
    assert "gone.bin.meta: a .meta without its shard" in notes


@pytest.mark.parametrize("unit_bytes", [1, 7, 64, 1000])
def test_work_units_cut_inside_shards_give_the_same_answer(tmp_path, unit_bytes):
    _clean_corpus(tmp_path)
    path = tmp_path / "en" / "b.bin"
    lines = path.read_bytes().split(b"\n")
    lines[17] = b"not json"
    lines[25] = json.dumps({"tokens": [VOCAB + 1]}).encode()
    path.write_bytes(b"\n".join(lines))
    whole = check_folder(tmp_path, VOCAB, unit_bytes=1 << 30)
    cut = check_folder(tmp_path, VOCAB, unit_bytes=unit_bytes)
    assert _messages(cut) == _messages(whole)
    assert (cut.samples, cut.tokens, cut.bytes) == (whole.samples, whole.tokens, whole.bytes)
    assert [p.line for p in whole.problems if "b.bin" in p.path and "vocab" in p.message] == [26]
    assert any(p.line == 18 and "not a JSON line" in p.message for p in whole.problems)


def test_worker_processes_and_problem_cap(tmp_path):
    rng = np.random.default_rng(1)
    samples = random_samples(rng, 40, VOCAB)
    samples = [[*s, VOCAB + 3] for s in samples]
    write_shard(tmp_path / "en" / "a.bin", samples)
    _clean_corpus(tmp_path / "more")
    emitted = []
    report = check_folder(
        tmp_path, VOCAB, workers=2, unit_bytes=256, max_problems_per_shard=5, emit=emitted.append
    )
    assert report.problem_count == 40 and len(report.problems) == 5
    assert emitted[-1] == f"{tmp_path}/en/a.bin: ... and 35 more problems"
    assert [p.line for p in report.problems] == [1, 2, 3, 4, 5]
    assert report.shards == 4 and report.workers == 2


def test_refusals(tmp_path):
    with pytest.raises(DataError, match=r"no '\*\.bin' shard"):
        check_folder(tmp_path, VOCAB)
    with pytest.raises(ConfigError, match="--vocab-size must be >= 1"):
        check_folder(tmp_path, 0)


def test_cli_exit_codes_and_json(tmp_path, capsys):
    _clean_corpus(tmp_path)
    assert main(["data", "check", str(tmp_path), "--vocab-size", str(VOCAB), "--workers", "1"]) == 0
    out = capsys.readouterr().out
    assert out.strip().endswith("no problems") and "3 shards" in out
    assert main(["data", "check", str(tmp_path), "--vocab-size", "10", "--json"]) == 2
    result = json.loads(capsys.readouterr().out)
    assert result["problem_count"] > 0 and result["shards"] == 3
    assert all(":" in line and "vocab size 10" in line for line in result["problems"])


# -- the vectorised reader of canonical lines -----------------------------------------

_NUMBERS = st.integers(-(10**8) + 1, 10**8 - 1)


@st.composite
def _canonical_line(draw):
    tokens = draw(st.lists(_NUMBERS, max_size=12))
    separator = draw(st.sampled_from([",", ", "]))
    prefix = draw(st.sampled_from(['{"tokens":[', '{"tokens": [']))
    return (prefix + separator.join(map(str, tokens)) + "]}").encode()


@st.composite
def _mutated_line(draw):
    line = bytearray(draw(_canonical_line()))
    for _ in range(draw(st.integers(1, 3))):
        position = draw(st.integers(0, len(line)))
        byte = draw(st.sampled_from(b'0123456789-, []{}":.eE+\tx'))
        action = draw(st.sampled_from(["insert", "replace", "delete"]))
        if action == "insert":
            line.insert(position, byte)
        elif position < len(line):
            if action == "replace":
                line[position] = byte
            else:
                del line[position]
    return bytes(line)


def _one_by_one(lines):
    """decode_tokens per line: the reference; None if any line is refused."""
    try:
        return [decode_tokens(line).tolist() for line in lines]
    except TokenLineError:
        return None


@settings(max_examples=400, deadline=None)
@given(st.lists(st.one_of(_canonical_line(), _mutated_line()), min_size=1, max_size=6))
def test_fast_reader_accepts_only_what_decode_tokens_reads_the_same(lines):
    fast = decode_canonical_lines(b"\n".join(lines) + b"\n")
    if fast is None:
        return  # the caller falls back to decode_tokens line by line
    reference = _one_by_one(lines)
    assert reference is not None, lines
    ids, counts = fast
    assert counts.tolist() == [len(tokens) for tokens in reference]
    assert ids.tolist() == [token for tokens in reference for token in tokens]


@settings(max_examples=200, deadline=None)
@given(st.lists(_canonical_line(), min_size=1, max_size=6))
def test_fast_reader_reads_every_canonical_line(lines):
    fast = decode_canonical_lines(b"\n".join(lines) + b"\n")
    assert fast is not None, lines
    assert fast[0].tolist() == [t for tokens in _one_by_one(lines) for t in tokens]


def test_canonical_corpus_is_checked_without_per_line_parsing(tmp_path, monkeypatch):
    samples = _clean_corpus(tmp_path)
    bad = samples["en/b.bin"]
    bad[7] = [*bad[7], VOCAB + 2]
    write_shard(tmp_path / "en" / "b.bin", bad)

    def refuse(line):
        raise AssertionError(f"read line by line: {line[:40]!r}")

    monkeypatch.setattr(check, "decode_tokens", refuse)
    report = check_folder(tmp_path, VOCAB, unit_bytes=500)
    assert _messages(report) == [
        f"{tmp_path}/en/b.bin:8: token id {VOCAB + 2} >= the model's vocab size {VOCAB}; "
        "the data was tokenized for another model"
    ]
