"""Bad ftdp input: each case fails with one line naming the file (and line) and the fix."""

from __future__ import annotations

import io
import json
import logging
import pickle

import numpy as np
import pytest
from ftdp_factory import write_shard
from torch.utils.data import DataLoader

from evotune.data import PackCollator, build_packed_dataset, load_intern_repo_tokenized_dataset
from evotune.data.ftdp import DataError


def _load(folder, **kwargs):
    return load_intern_repo_tokenized_dataset(folder, **kwargs)


def _packs(folder, packed_length=4, **kwargs):
    dataset = build_packed_dataset(_load(folder, **kwargs), packed_length=packed_length, seed=0)
    return [dataset[i] for i in range(len(dataset))]


def _write_meta(path, rows):
    buffer = io.BytesIO()
    np.save(buffer, np.asarray(rows, dtype=np.int64))
    (path.parent / (path.name + ".meta")).write_bytes(buffer.getvalue())


def _one_line(error):
    assert "\n" not in str(error.value)


def test_missing_meta(tmp_path):
    shard = write_shard(tmp_path / "en" / "a.bin", [[1, 2, 3]])
    (tmp_path / "en" / "a.bin.meta").unlink()
    with pytest.raises(DataError, match=r"a.bin: missing index .*a.bin.meta") as error:
        _load(tmp_path)
    _one_line(error)
    assert shard.exists()


def test_meta_with_fewer_rows_than_lines(tmp_path):
    shard = write_shard(tmp_path / "en" / "a.bin", [[1, 2], [3, 4], [5, 6]])
    _write_meta(shard, [[0, 2], [len(json.dumps({"tokens": [1, 2]})) + 1, 2]])
    with pytest.raises(DataError, match=r"has 2 rows but .*a.bin has at least 3 lines"):
        _load(tmp_path)


def test_offset_past_end(tmp_path):
    shard = write_shard(tmp_path / "en" / "a.bin", [[1, 2], [3, 4]])
    _write_meta(shard, [[0, 2], [10_000, 2]])
    with pytest.raises(DataError, match=r"row 1 offset 10000 is past the end"):
        _load(tmp_path)


def test_offset_mid_line(tmp_path):
    shard = write_shard(tmp_path / "en" / "a.bin", [[1, 2, 3, 4], [5, 6, 7, 8], [9, 9, 9, 9]])
    second = len(json.dumps({"tokens": [1, 2, 3, 4]})) + 1
    third = second + len(json.dumps({"tokens": [5, 6, 7, 8]})) + 1
    _write_meta(shard, [[0, 4], [second + 3, 4], [third, 4]])
    with pytest.raises(
        DataError, match=r"a.bin:2: meta offset \d+ points into the middle of a line"
    ):
        _packs(tmp_path)


@pytest.mark.parametrize(
    "line, message",
    [
        (b"not json at all", "not a JSON line"),
        (b'{"text": "hello"}', "the JSON object has no 'tokens' key"),
        (b'{"tokens": [1, "2", 3]}', "'tokens' must be a list of integers"),
        (b'{"tokens": [1, 2.5, 3]}', "'tokens' must be a list of integers"),
        (b'{"tokens": [1, true, 3]}', "'tokens' must be a list of integers"),
        (b'{"tokens": [[1], 2, 3]}', "'tokens' must be a list of integers"),
        (b'{"tokens": "1 2 3"}', "'tokens' must be a list of integers"),
        (
            b'{"tokens": [1, 9223372036854775808, 3]}',
            "'tokens' holds an integer outside the 64-bit range",
        ),
    ],
)
def test_bad_lines(tmp_path, line, message):
    path = tmp_path / "en" / "a.bin"
    write_shard(path, [[1, 2, 3]])
    good = path.read_bytes()
    path.write_bytes(good + line + b"\n")
    _write_meta(path, [[0, 3], [len(good), 3]])
    with pytest.raises(DataError, match=rf"a.bin:2: {message}"):
        _packs(tmp_path, packed_length=6)


def test_token_count_disagrees_with_meta(tmp_path):
    path = write_shard(tmp_path / "en" / "a.bin", [[1, 2, 3], [4, 5, 6]])
    _write_meta(path, [[0, 3], [len(json.dumps({"tokens": [1, 2, 3]})) + 1, 5]])
    with pytest.raises(DataError, match=r"a.bin:2: 3 tokens but the meta says 5"):
        _packs(tmp_path, packed_length=8)


def test_token_id_beyond_vocab(tmp_path):
    write_shard(tmp_path / "en" / "a.bin", [[1, 2, 3], [4, -500, 6]])
    dataset = build_packed_dataset(_load(tmp_path), packed_length=6, seed=0)
    dataset.vocab_size = 100
    with pytest.raises(DataError, match=r"a.bin:2: token id 500 >= the model's vocab size 100"):
        dataset[0]


def test_empty_folder_and_wrong_suffix(tmp_path):
    with pytest.raises(DataError, match=r"no '\*.bin' shard"):
        _load(tmp_path)
    write_shard(tmp_path / "en" / "a.bin", [[1, 2, 3]])
    with pytest.raises(DataError, match=r"no '\*.jsonl' shard"):
        _load(tmp_path, file_type=".jsonl")


def test_min_length_removes_everything(tmp_path):
    write_shard(tmp_path / "en" / "a.bin", [[1, 2, 3]])
    with pytest.raises(DataError, match=r"every sample was removed \(min_length=10\)"):
        _load(tmp_path, min_length=10)


def test_min_length_dict(tmp_path):
    write_shard(tmp_path / "en" / "wiki" / "a.bin", [[1, 2, 3], [1, 2, 3, 4, 5]])
    write_shard(tmp_path / "en" / "web" / "b.bin", [[1, 2, 3], [1, 2, 3, 4, 5]])
    corpus = _load(tmp_path, min_length_dict={"wiki": 4})
    assert [s.num_samples for s in corpus.shards] == [2, 1]  # web keeps both, wiki one
    with pytest.raises(DataError, match="at most one key may match"):
        _load(tmp_path, min_length_dict={"en": 4, "wiki": 2})


def test_shard_outside_type_folder(tmp_path):
    write_shard(tmp_path / "loose.bin", [[1, 2, 3]])
    with pytest.raises(DataError, match="must lie under a top-level type folder"):
        _load(tmp_path)


def test_empty_shards_and_small_files_are_legal(tmp_path, caplog):
    write_shard(tmp_path / "en" / "empty.bin", [])
    (tmp_path / "en" / "zero.bin").write_bytes(b"")
    (tmp_path / "en" / "zero.bin.meta").write_bytes(b"")
    write_shard(tmp_path / "en" / "small.bin", [[1, 2]])
    write_shard(tmp_path / "en" / "big.bin", [[1, 2, 3, 4]] * 3)
    with caplog.at_level(logging.INFO):
        dataset = build_packed_dataset(_load(tmp_path), packed_length=4)
    assert len(dataset) == 3
    assert [p.shard.relative_path for p in dataset.plans] == ["en/big.bin", "en/small.bin"]
    assert "fewer than one pack" in caplog.text and "skipped" in caplog.text


def test_data_order_omitting_files_warns(tmp_path, caplog):
    write_shard(tmp_path / "en" / "a.bin", [[1, 2, 3]])
    write_shard(tmp_path / "en" / "b.bin", [[1, 2, 3]])
    order = tmp_path / "order.txt"
    order.write_text("en/b.bin\n")
    with caplog.at_level(logging.WARNING):
        corpus = _load(tmp_path, data_order_path=order)
    assert [s.relative_path for s in corpus.shards] == ["en/b.bin"]
    assert "1 other '*.bin' files" in caplog.text


def test_dataset_pickles_for_workers(tmp_path):
    rng = np.random.default_rng(0)
    for k in range(3):
        write_shard(
            tmp_path / "en" / f"{k}.bin", [rng.integers(1, 50, 9).tolist() for _ in range(20)]
        )
    dataset = build_packed_dataset(_load(tmp_path), packed_length=16)
    expected = [dataset[i]["input_ids"].tolist() for i in range(len(dataset))]
    clone = pickle.loads(pickle.dumps(dataset))
    assert [clone[i]["input_ids"].tolist() for i in range(len(clone))] == expected
    loader = DataLoader(dataset, batch_size=2, num_workers=2, collate_fn=PackCollator())
    streamed = np.concatenate([batch.input_ids[0].numpy() for batch in loader])
    assert streamed.tolist() == np.concatenate(expected).tolist()
