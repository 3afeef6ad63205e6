"""Packing against docs/packing.md: the worked example, the three modes, invariants, bad samples."""

from __future__ import annotations

import json

import numpy as np
import pytest
from ftdp_factory import random_samples, write_shard
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.utils.data import DataLoader

from evotune.data import IGNORE_INDEX, build_packed_dataset, load_intern_repo_tokenized_dataset
from evotune.data.ftdp import BadSampleError, DataError
from evotune.errors import ConfigError

WORKED_EXAMPLE = [
    [11, 12],
    [-21, -22, 23, 24, 25, 26, 27],
    [31, 32, 33],
    [41, 42, 43, 44],
    [51, 52, 53, 54, 55],
]


def _dataset(folder, **kwargs):
    cfg = dict(type=load_intern_repo_tokenized_dataset, folder=str(folder))
    return build_packed_dataset(cfg, **kwargs)


@pytest.fixture
def worked_folder(tmp_path):
    write_shard(tmp_path / "en" / "a.bin", WORKED_EXAMPLE)
    return tmp_path


def test_worked_example_internevo(worked_folder):
    ds = _dataset(worked_folder, packed_length=6, max_length_per_sample=3)
    assert len(ds) == 3
    p0, p1 = ds[0], ds[1]
    assert p0["input_ids"].tolist() == [31, 32, 33, 11, 12, 51]
    assert p0["labels"].tolist() == [32, 33, -100, 12, -100, 52]
    assert p0["cu_seqlens"].tolist() == [0, 3, 5, 6]
    assert p0["position_ids"].tolist() == [0, 1, 2, 0, 1, 0]
    assert p1["input_ids"].tolist() == [52, 53, 54, 55, 21, 22]
    assert p1["labels"].tolist() == [53, 54, 55, -100, -100, 23]
    assert p1["cu_seqlens"].tolist() == [0, 3, 4, 6]
    assert p1["position_ids"].tolist() == [0, 1, 2, 0, 0, 1]
    assert p0["type_ids"].tolist() == [0] * 6


def test_worked_example_into_one(worked_folder):
    ds = _dataset(
        worked_folder, packed_length=6, max_length_per_sample=3, pack_mode="internevo_into_one"
    )
    p0 = ds[0]
    assert p0["input_ids"].tolist() == [31, 32, 33, 11, 12, 51]
    assert p0["labels"].tolist() == [32, 33, -100, 12, -100, -100]
    assert p0["cu_seqlens"].tolist() == [0, 3, 6]
    assert p0["position_ids"].tolist() == [0, 1, 2, 0, 1, 2]


def test_worked_example_xtuner(worked_folder):
    ds = _dataset(worked_folder, packed_length=6, max_length_per_sample=3, pack_mode="xtuner")
    p0, p1 = ds[0], ds[1]
    # one segment per fragment, no S limit; row-wide shift across fragment edges
    assert p0["cu_seqlens"].tolist() == [0, 3, 5, 6]
    assert p0["labels"].tolist() == [32, 33, 11, 12, 51, -100]
    assert p1["input_ids"].tolist() == [52, 53, 54, 55, 21, 22]
    assert p1["cu_seqlens"].tolist() == [0, 4, 6]
    assert p1["labels"].tolist() == [53, 54, 55, -100, -100, -100]
    assert p1["position_ids"].tolist() == [0, 1, 2, 3, 0, 1]


def test_last_pack_of_file_keeps_true_next_token(worked_folder):
    # pack 2: 23..27 then 41 (cut); 42 is its target although 42-44 are dropped
    ds = _dataset(worked_folder, packed_length=6, max_length_per_sample=3)
    p2 = ds[2]
    assert p2["input_ids"].tolist() == [23, 24, 25, 26, 27, 41]
    assert p2["labels"].tolist() == [24, 25, 26, 27, -100, 42]
    assert p2["cu_seqlens"].tolist() == [0, 3, 5, 6]


def test_segment_multiple_of_limit_has_no_empty_segment(tmp_path):
    write_shard(tmp_path / "en" / "a.bin", [[1, 2, 3, 4, 5, 6], [7, 8, 9, 10, 11, 12]])
    ds = _dataset(tmp_path, packed_length=12, max_length_per_sample=3, seed=0)
    cu = ds[0]["cu_seqlens"]
    assert np.all(np.diff(cu) > 0)
    assert cu.tolist() == [0, 3, 6, 9, 12]


def test_min_length_and_type_ids(tmp_path):
    (tmp_path / "README.txt").write_text("stray top-level file takes type id 0")
    write_shard(tmp_path / "cn" / "x" / "a.bin", [[1, 2, 3, 4], [5, 6], [7, 8, 9, 10]])
    write_shard(tmp_path / "en" / "b.bin", [[1, 2, 3, 4, 5, 6, 7, 8]], meta_dtype=np.int32)
    corpus = load_intern_repo_tokenized_dataset(tmp_path, min_length=3)
    assert [s.relative_path for s in corpus.shards] == ["cn/x/a.bin", "en/b.bin"]
    assert [s.type_id for s in corpus.shards] == [1, 2]
    assert corpus.shards[0].line_numbers.tolist() == [0, 2]
    assert corpus.num_tokens == 16


def test_default_order_is_string_order_of_relative_paths(tmp_path):
    for relative in ["en/x.bin", "en/a/y.bin", "cn/z.bin"]:
        write_shard(tmp_path / relative, [[1, 2, 3]])
    corpus = load_intern_repo_tokenized_dataset(tmp_path)
    assert [s.relative_path for s in corpus.shards] == ["cn/z.bin", "en/a/y.bin", "en/x.bin"]


def test_data_order_file(tmp_path):
    for relative in ["en/x.bin", "en/a/y.bin", "cn/z.bin"]:
        write_shard(tmp_path / relative, [[1, 2, 3]])
    order = tmp_path / "order.txt"
    order.write_text("en/x.bin\n\ncn/z.bin\n")
    corpus = load_intern_repo_tokenized_dataset(tmp_path, data_order_path=order)
    assert [s.relative_path for s in corpus.shards] == ["en/x.bin", "cn/z.bin"]
    order.write_text("en/x.bin\nen/missing.bin\n")
    with pytest.raises(DataError, match=r"order.txt:2: 'en/missing.bin' does not exist"):
        load_intern_repo_tokenized_dataset(tmp_path, data_order_path=order)


def _reference_internevo(samples, seed, packed, limit):
    """A direct, loop-based transcription of docs/packing.md#mode-internevo (one file)."""
    perm = np.random.RandomState(seed).permutation(len(samples))
    stream, labels, sample_edges = [], [], []
    for k in perm:
        s = samples[k]
        stream.extend(s)
        labels.extend([*list(s[1:]), IGNORE_INDEX])
        sample_edges.append(len(stream))
    packs = []
    for p in range(len(stream) // packed):
        lo, hi = p * packed, (p + 1) * packed
        tok = stream[lo:hi]
        lab = [t if t > 0 else IGNORE_INDEX for t in labels[lo:hi]]
        edges = sorted({e - lo for e in sample_edges if lo < e < hi} | {packed})
        cu, start = [0], 0
        for e in edges:
            while e - start > limit:
                start += limit
                cu.append(start)
            cu.append(e)
            start = e
        packs.append((np.abs(tok).tolist(), lab, cu))
    return packs


@settings(max_examples=40, deadline=None)
@given(
    lengths=st.lists(st.integers(1, 30), min_size=1, max_size=25),
    packed=st.integers(1, 40),
    limit_fraction=st.floats(0.05, 1.0),
    seed=st.integers(0, 2**31 - 1),
)
def test_internevo_matches_reference(tmp_path_factory, lengths, packed, limit_fraction, seed):
    folder = tmp_path_factory.mktemp("prop")
    rng = np.random.default_rng(seed)
    samples = [
        [int(x) * (1 if rng.random() < 0.7 else -1) for x in rng.integers(1, 99, n)]
        for n in lengths
    ]
    write_shard(folder / "en" / "a.bin", samples)
    limit = max(1, int(packed * limit_fraction))
    ds = _dataset(folder, packed_length=packed, max_length_per_sample=limit, seed=seed)
    expected = _reference_internevo(samples, seed, packed, limit)
    assert len(ds) == len(expected)
    for i, (tok, lab, cu) in enumerate(expected):
        item = ds[i]
        assert item["input_ids"].tolist() == tok
        assert item["labels"].tolist() == lab
        assert item["cu_seqlens"].tolist() == cu
        seg = np.diff(item["cu_seqlens"])
        assert seg.max() <= limit and seg.min() >= 1
        assert item["position_ids"].tolist() == [j for n in seg for j in range(n)]


@settings(max_examples=30, deadline=None)
@given(
    seed=st.integers(0, 1000),
    packed=st.integers(2, 64),
    mode=st.sampled_from(["internevo", "internevo_into_one", "xtuner"]),
)
def test_pack_invariants(tmp_path_factory, seed, packed, mode):
    folder = tmp_path_factory.mktemp("inv")
    rng = np.random.default_rng(seed)
    write_shard(folder / "en" / "a.bin", random_samples(rng, 20, 50))
    write_shard(folder / "en" / "b.bin", random_samples(rng, 7, 50))
    ds = _dataset(folder, packed_length=packed, seed=seed, pack_mode=mode)
    total = sum(p.shard.num_tokens // packed for p in ds.plans)
    assert len(ds) == total
    for i in range(len(ds)):
        item = ds[i]
        assert all(len(item[k]) == packed for k in ("input_ids", "labels", "position_ids"))
        cu = item["cu_seqlens"]
        assert cu[0] == 0 and cu[-1] == packed and np.all(np.diff(cu) > 0)
        assert np.all(item["input_ids"] > 0)
        trained = item["labels"][item["labels"] != IGNORE_INDEX]
        assert np.all(trained > 0)


# -- on_bad_sample ---------------------------------------------------------------------

VOCAB = 60


def _write_lines(path, lines, lengths):
    """A shard whose .bin holds ``lines`` as given and whose meta claims ``lengths``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    offsets, body = [], b""
    for line in lines:
        offsets.append(len(body))
        body += line + b"\n"
    path.write_bytes(body)
    with open(str(path) + ".meta", "wb") as handle:
        np.save(handle, np.array(list(zip(offsets, lengths, strict=True)), dtype=np.int64))


def _corrupt(samples):
    """Bad versions of some samples by line index: each kind the reader must catch."""
    return {
        1: b"not json at all",
        4: b'{"text": "no tokens here"}',
        6: b'{"tokens": [1, true, 3]}',
        9: json.dumps({"tokens": [*samples[9][:-1], VOCAB + 5]}).encode(),  # id >= vocab
        12: json.dumps({"tokens": samples[12][:-1]}).encode(),  # one token short of the meta
    }


def _folders(tmp_path):
    rng = np.random.default_rng(3)
    shards = {name: random_samples(rng, 16, VOCAB, low=3, high=25) for name in ("a", "b")}
    bad_lines = {"a": _corrupt(shards["a"]), "b": {}}  # b is clean: all its packs unchanged
    for variant in ("clean", "bad", "zeros"):
        for name, samples in shards.items():
            lines, lengths = [], []
            for index, tokens in enumerate(samples):
                bad = bad_lines[name].get(index)
                if bad is not None and variant == "bad":
                    lines.append(bad)
                elif bad is not None and variant == "zeros":
                    lines.append(json.dumps({"tokens": [0] * len(tokens)}).encode())
                else:
                    lines.append(json.dumps({"tokens": tokens}).encode())
                lengths.append(len(tokens))
            _write_lines(tmp_path / variant / "en" / f"{name}.bin", lines, lengths)
    return tmp_path, bad_lines


@pytest.mark.parametrize("mode", ["internevo", "internevo_into_one", "xtuner"])
def test_skip_bad_samples_keeps_every_other_pack_identical(tmp_path, mode):
    root, bad_lines = _folders(tmp_path)

    def dataset(variant, **kwargs):
        ds = _dataset(
            root / variant, packed_length=16, max_length_per_sample=8, pack_mode=mode, **kwargs
        )
        ds.vocab_size = VOCAB
        return ds

    clean, skip, zeros = dataset("clean"), dataset("bad", on_bad_sample="skip"), dataset("zeros")
    assert len(clean) == len(skip) == len(zeros)
    # the packs that hold a token of a bad sample, from the plan (stream positions)
    touched = set()
    plan = skip.plans[0]
    for position, sample in enumerate(plan.stream_order):
        if int(sample) in bad_lines["a"]:
            end = int(plan.stream_ends[position])
            begin = end - int(plan.shard.lengths[sample])
            touched.update(range(begin // 16, (end - 1) // 16 + 1))
    touched &= set(range(plan.num_packs))
    assert touched and len(touched) < len(skip)  # the test sees both kinds of pack
    keys = ("input_ids", "labels", "position_ids", "cu_seqlens", "type_ids")
    for index in range(len(skip)):
        item, expected = skip[index], zeros[index]
        for key in keys:  # a skipped sample reads exactly as zeros of its meta length
            assert item[key].tobytes() == expected[key].tobytes(), (index, key)
        if index not in touched:
            for key in keys:
                assert item[key].tobytes() == clean[index][key].tobytes(), (index, key)
        assert bool(item["bad_samples"]) == (index in touched)
    path = str((root / "bad" / "en" / "a.bin").resolve())
    assert skip.bad_sample_counts() == {path: len(bad_lines["a"])}
    reasons = {line: reason for _, line, reason in skip.bad_samples()}
    assert sorted(reasons) == [index + 1 for index in sorted(bad_lines["a"])]
    assert "not a JSON line" in reasons[2]
    assert "no 'tokens' key" in reasons[5]
    assert "list of integers" in reasons[7]
    assert f"token id {VOCAB + 5} >= the model's vocab size {VOCAB}" in reasons[10]
    assert "tokens but the meta says" in reasons[13]


def test_error_is_the_default_and_names_file_line(tmp_path):
    root, _ = _folders(tmp_path)
    ds = _dataset(root / "bad", packed_length=16)
    with pytest.raises(BadSampleError, match=r"a\.bin:\d+: "):
        for index in range(len(ds)):
            ds[index]


def test_skip_counts_reach_the_main_process_through_workers(tmp_path):
    root, bad_lines = _folders(tmp_path)
    ds = _dataset(root / "bad", packed_length=16, on_bad_sample="skip")
    ds.vocab_size = VOCAB
    loader = DataLoader(ds, batch_size=None, num_workers=2)
    for item in loader:
        ds.note_bad_samples(item["bad_samples"])
    assert list(ds.bad_sample_counts().values()) == [len(bad_lines["a"])]


def test_skip_does_not_hide_a_broken_index(tmp_path):
    _write_lines(tmp_path / "en" / "a.bin", [b'{"tokens": [1, 2, 3]}'] * 3, [3, 3, 3])
    meta = np.load(str(tmp_path / "en" / "a.bin.meta"))
    meta[1, 0] += 2  # points into the middle of line 2
    with open(str(tmp_path / "en" / "a.bin.meta"), "wb") as handle:
        np.save(handle, meta)
    ds = _dataset(tmp_path, packed_length=9, on_bad_sample="skip")
    with pytest.raises(DataError, match="points into the middle of a line"):
        ds[0]


def test_on_bad_sample_choices(tmp_path):
    write_shard(tmp_path / "en" / "a.bin", [[1, 2, 3]])
    with pytest.raises(ConfigError, match="on_bad_sample='ignore': choose one of error, skip"):
        _dataset(tmp_path, packed_length=3, on_bad_sample="ignore")
