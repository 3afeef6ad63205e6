"""Pack orders, exact resume, SP groups, dataset_weights (docs/sampling.md)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from ftdp_factory import write_shard
from hypothesis import given, settings
from hypothesis import strategies as st

from evotune.data import (
    InternRepoSampler,
    SequenceParallelSampler,
    build_packed_dataset,
    load_intern_repo_tokenized_dataset,
)
from evotune.data.ftdp import DataError


def _dataset(folder, packed_length=4):
    cfg = dict(type=load_intern_repo_tokenized_dataset, folder=str(folder))
    return build_packed_dataset(cfg, packed_length=packed_length)


@pytest.fixture
def thirteen_packs(tmp_path):
    write_shard(tmp_path / "en" / "a.bin", [[i + 1] * 4 for i in range(7)])
    write_shard(tmp_path / "en" / "b.bin", [[i + 11] * 4 for i in range(6)])
    dataset = _dataset(tmp_path)
    assert len(dataset) == 13
    return dataset


def _steps(sampler, epoch, micro_num=2):
    sampler.set_epoch(epoch)
    indices = list(sampler)
    return [indices[i : i + micro_num] for i in range(0, len(indices), micro_num)]


def test_internevo_worked_example(thirteen_packs):
    ranks = [InternRepoSampler(thirteen_packs, micro_num=2, dp_size=2, dp_rank=r) for r in (0, 1)]
    assert ranks[0].global_order(0).tolist() == [4, 8, 6, 2, 3, 7, 9, 0, 10, 5, 12, 1]
    assert _steps(ranks[0], 0) == [[4, 6], [3, 9], [10, 12]]
    assert _steps(ranks[1], 0) == [[8, 2], [7, 0], [5, 1]]
    assert _steps(ranks[0], 1) == [[6, 0], [5, 2], [7, 9]]
    assert _steps(ranks[1], 1) == [[4, 12], [3, 1], [10, 11]]
    # set_epoch(e) gives epoch e whatever was iterated before
    fresh = InternRepoSampler(thirteen_packs, micro_num=2, dp_size=2, dp_rank=1)
    assert _steps(fresh, 1) == [[4, 12], [3, 1], [10, 11]]


def test_xtuner_order(thirteen_packs):
    sampler = InternRepoSampler(thirteen_packs, order="xtuner", micro_num=5, dp_size=2, dp_rank=1)
    for epoch in (0, 1):
        expected = np.arange(13)
        np.random.RandomState(1024 + epoch).shuffle(expected)
        sampler.set_epoch(epoch)
        assert list(sampler) == expected[:12][1::2].tolist()  # truncated to a multiple of dp only
    unshuffled = InternRepoSampler(thirteen_packs, shuffle=False, order="xtuner", dp_size=2)
    assert list(unshuffled) == [0, 2, 4, 6, 8, 10]


def test_state_dict_resumes_mid_epoch(thirteen_packs):
    sampler = InternRepoSampler(thirteen_packs, micro_num=2, dp_size=2, dp_rank=0)
    sampler.set_epoch(1)
    full = list(sampler)
    state = sampler.state_dict(consumed=2)
    resumed = InternRepoSampler(thirteen_packs, micro_num=2, dp_size=2, dp_rank=0)
    resumed.load_state_dict(state)
    assert list(resumed) == full[2:]
    other_dp = InternRepoSampler(thirteen_packs, micro_num=2, dp_size=1, dp_rank=0)
    with pytest.raises(DataError, match="dp size"):
        other_dp.load_state_dict(state)


def test_sequence_parallel_sampler_matches_xtuner(thirteen_packs):
    sampler = SequenceParallelSampler(thirteen_packs, seed=7, dp_size=3, dp_rank=2)
    generator = torch.Generator()
    generator.manual_seed(7)
    order = torch.randperm(13, generator=generator).tolist()
    padded = (order * 2)[:15]
    assert list(sampler) == padded[2:15:3]


@settings(max_examples=40, deadline=None)
@given(
    n=st.integers(1, 200),
    dp=st.integers(1, 8),
    micro=st.integers(1, 4),
    order=st.sampled_from(["internevo", "xtuner"]),
    epoch=st.integers(0, 3),
)
def test_ranks_partition_the_order(n, dp, micro, order, epoch):
    class Sized:
        def __init__(self, count):
            self.count = count
            self.plans = ()
            self.packed_length = 1

        def __len__(self):
            return self.count

    data = Sized(n)
    samplers = [
        InternRepoSampler(data, order=order, micro_num=micro, dp_size=dp, dp_rank=r)
        for r in range(dp)
    ]
    per_rank = [s.rank_indices(epoch).tolist() for s in samplers]
    flat = [i for indices in per_rank for i in indices]
    assert len(set(flat)) == len(flat)  # no pack twice in an epoch
    assert len({len(indices) for indices in per_rank}) == 1  # equal work per rank
    unit = micro * dp if order == "internevo" else dp
    assert len(flat) == n // unit * unit
    assert set(flat) <= set(range(n))


@pytest.fixture
def mixture_folder(tmp_path):
    rng = np.random.default_rng(0)
    for sub, shards in (("en/wiki", 2), ("en/web", 3), ("code/py", 1)):
        for k in range(shards):
            write_shard(
                tmp_path / sub / f"{k}.bin", [rng.integers(1, 50, 8).tolist() for _ in range(50)]
            )
    return tmp_path


def test_dataset_weights_realised_shares(mixture_folder):
    dataset = _dataset(mixture_folder, packed_length=8)
    weights = {"en/wiki": 0.5, "en": 2.0, "code": 0.25}  # longest key wins for en/wiki
    sampler = InternRepoSampler(dataset, dataset_weights=weights)
    shard_subset = {"en/wiki": 0, "en/web": 1, "code/py": 2}
    pack_shards = dataset.pack_shard_ids()
    subset_of_pack = np.array(
        [
            shard_subset["/".join(dataset.plans[s].shard.relative_path.split("/")[:2])]
            for s in pack_shards
        ]
    )
    available = np.bincount(subset_of_pack, minlength=3)
    assert available.tolist() == [100, 150, 50]
    counts = np.zeros(3)
    epochs = 40
    for epoch in range(epochs):
        order = sampler.global_order(epoch)
        counts += np.bincount(subset_of_pack[order], minlength=3)
        # w <= 1 draws without replacement: no pack twice within an epoch
        wiki = order[subset_of_pack[order] == 0]
        assert len(set(wiki.tolist())) == len(wiki)
    expected = np.array([0.5 * 100, 2.0 * 150, 0.25 * 50])
    np.testing.assert_allclose(counts / epochs, expected, rtol=0.02)
    table = {row["subset"]: row for row in sampler.mixture_table()}
    assert table["en"]["packs_per_epoch"] == 300
    assert table["en/wiki"]["share"] == pytest.approx(50 / 362.5)
    # deterministic under the seed
    again = InternRepoSampler(dataset, dataset_weights=weights)
    assert again.global_order(3).tolist() == sampler.global_order(3).tolist()


def test_dataset_weights_unmatched_key(mixture_folder):
    dataset = _dataset(mixture_folder, packed_length=8)
    with pytest.raises(DataError, match="dataset_weights key 'en/books' matches no shard"):
        InternRepoSampler(dataset, dataset_weights={"en/books": 1.0})
