"""Elastic resume: an FSDP2 checkpoint continues on another number of processes.

The data position is the whole job's: the packs of the epoch's global order
consumed by all ranks are neither repeated nor skipped, and the rest of the epoch
is split over the new layout (evotune/data/sampler.py). The fast tests check the
sampler's re-split on many layouts; the integration tests run one epoch of 2
processes, abort in a save, and resume on 2 processes (bit-identical), then on
1 process, and from that run's later checkpoint on 2 processes again. The packs
each part consumed are computed with the sampler API from the saved sampler
states; the losses after every resume match the uninterrupted run's, which they
could not if a step had other packs.
"""

from __future__ import annotations

import json
import shutil
from collections import Counter

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from runner import final_weights, run_train
from tiny import save_tiny_llama, write_config, write_corpus

from evotune.data import (
    InternRepoSampler,
    SequenceParallelSampler,
    build_packed_dataset,
    load_intern_repo_tokenized_dataset,
)
from evotune.errors import ConfigError
from evotune.train.checkpoint import checkpoint_name, complete_checkpoints
from evotune.train.checkpoint_manager import _check_same_run


class Packs:
    """A dataset of ``count`` packs, enough for the sampler."""

    plans = ()
    packed_length = 1

    def __init__(self, count: int):
        self.count = count

    def __len__(self) -> int:
        return self.count


def _consume(samplers, epoch, per_rank):
    """The packs each rank reads first, as the trainer would consume them."""
    taken = []
    for sampler in samplers:
        sampler.set_epoch(epoch, start=0)
        taken.extend(list(sampler)[:per_rank])
    return taken


def _flat(lists):
    return [pack for part in lists for pack in part]


def _interleave(lists):
    """Rank lists back into the global order they were split from (equal lengths)."""
    return [pack for row in zip(*lists, strict=True) for pack in row]


# -- the sampler's re-split ----------------------------------------------------------


@settings(max_examples=40, deadline=None)
@given(
    count=st.integers(1, 120),
    before=st.tuples(st.integers(1, 4), st.integers(1, 3)),  # (dp_size, micro_num)
    after=st.tuples(st.integers(1, 4), st.integers(1, 3)),
    order=st.sampled_from(["internevo", "xtuner"]),
    steps=st.integers(0, 40),
    epoch=st.integers(0, 2),
)
def test_resplit_neither_repeats_nor_skips(count, before, after, order, steps, epoch):
    data = Packs(count)
    (dp_a, micro_a), (dp_b, micro_b) = before, after
    old = [
        InternRepoSampler(data, order=order, micro_num=micro_a, dp_size=dp_a, dp_rank=r)
        for r in range(dp_a)
    ]
    per_rank = min(steps * micro_a, len(old[0].rank_indices(epoch)))
    consumed = _consume(old, epoch, per_rank)
    state = old[0].state_dict(consumed=per_rank)
    assert state["global_consumed"] == per_rank * dp_a

    new = [
        InternRepoSampler(data, order=order, micro_num=micro_b, dp_size=dp_b, dp_rank=r)
        for r in range(dp_b)
    ]
    for sampler in new:
        sampler.load_state_dict(state, relayout=True)
        # the same layout keeps its position; another one restarts in its new list
        assert (sampler.epoch, sampler.start) == (epoch, per_rank if before == after else 0)
    rest = [list(sampler) for sampler in new]
    assert len({len(part) for part in rest}) == 1  # equal work per rank: no rank waits

    global_order = new[0].epoch_order(epoch).tolist()
    position = len(consumed)
    assert sorted(consumed) == sorted(global_order[:position])  # the job's prefix
    # the rest is the same global order from there, cut to the new unit, split round-robin
    unit_a, unit_b = (micro_a * dp_a, micro_b * dp_b) if order == "internevo" else (dp_a, dp_b)
    kept = (count - position) // unit_b * unit_b
    assert _interleave(rest) == global_order[position : position + kept]
    if unit_a == unit_b:
        # the same unit: exactly the epoch an uninterrupted run reads
        assert Counter(consumed + _flat(rest)) == Counter(old[0].global_order(epoch).tolist())


@settings(max_examples=25, deadline=None)
@given(
    count=st.integers(1, 60), dp_a=st.integers(1, 4), dp_b=st.integers(1, 4), k=st.integers(0, 20)
)
def test_sequence_parallel_sampler_resplit(count, dp_a, dp_b, k):
    data = Packs(count)
    old = [SequenceParallelSampler(data, seed=3, dp_size=dp_a, dp_rank=r) for r in range(dp_a)]
    per_rank = min(k, len(old[0].rank_indices(0)))
    consumed = _consume(old, 0, per_rank)
    state = old[0].state_dict(consumed=per_rank)
    new = [SequenceParallelSampler(data, seed=3, dp_size=dp_b, dp_rank=r) for r in range(dp_b)]
    for sampler in new:
        sampler.load_state_dict(state, relayout=True)
    rest = [list(sampler) for sampler in new]
    assert len({len(part) for part in rest}) == 1
    order = new[0].epoch_order(0).tolist()
    position = len(consumed)
    assert sorted(consumed) == sorted(np.resize(order, position).tolist())
    padding = -(count - position) % dp_b
    expected = order[position:] + np.resize(order, padding).tolist() if position < count else []
    assert _interleave(rest) == expected  # padded from the epoch's start, as XTuner pads
    assert set(consumed + _flat(rest)) == set(range(count))  # every pack is read


def test_same_layout_keeps_the_saved_split_and_position():
    data = Packs(50)
    sampler = InternRepoSampler(data, micro_num=2, dp_size=2, dp_rank=1)
    sampler.set_epoch(1)
    full = list(sampler)
    state = sampler.state_dict(consumed=4)
    again = InternRepoSampler(data, micro_num=2, dp_size=2, dp_rank=1)
    again.load_state_dict(state, relayout=True)
    assert again.start == 4 and list(again) == full[4:]


def test_a_resplit_epoch_resumes_exactly_and_resplits_again():
    """2 ranks -> 3 ranks (re-split at 8) -> save after 2 more each -> 1 rank."""
    data = Packs(41)
    two = [InternRepoSampler(data, micro_num=1, dp_size=2, dp_rank=r) for r in (0, 1)]
    first = _consume(two, 0, 4)
    state = two[0].state_dict(consumed=4)
    three = [InternRepoSampler(data, micro_num=1, dp_size=3, dp_rank=r) for r in range(3)]
    for sampler in three:
        sampler.load_state_dict(state, relayout=True)
    lists = [sampler.rank_indices(0).tolist() for sampler in three]
    second = [pack for part in lists for pack in part[:2]]
    saved = three[2].state_dict(consumed=2)
    assert saved["global_consumed"] == 8 + 2 * 3 and saved["resplit"] == [0, 8]
    # the same layout again continues each rank's list where it stopped
    same = InternRepoSampler(data, micro_num=1, dp_size=3, dp_rank=2)
    same.load_state_dict(saved, relayout=True)
    assert list(same) == lists[2][2:]
    # another layout splits what is left after 14 packs
    one = InternRepoSampler(data, micro_num=1, dp_size=1, dp_rank=0)
    one.load_state_dict(saved, relayout=True)
    third = list(one)
    order = one.epoch_order(0).tolist()
    assert sorted(first + second) == sorted(order[:14]) and third == order[14:]
    assert len(one.rank_indices(1)) == 41  # the next epoch is split from its start


def test_strict_load_refuses_another_layout():
    data = Packs(20)
    state = InternRepoSampler(data, micro_num=2, dp_size=2).state_dict(consumed=2)
    with pytest.raises(Exception, match="dp size"):
        InternRepoSampler(data, micro_num=2, dp_size=1).load_state_dict(state)
    seeded = InternRepoSampler(data, micro_num=2, dp_size=1, seed=5)
    with pytest.raises(Exception, match="does not match"):
        seeded.load_state_dict(state, relayout=True)  # another order is never re-split


def test_only_elastic_engines_change_the_data_parallel_size(tmp_path):
    saved = {"engine": "torch", "dp_size": 1, "dataset": {"packs": 3}}
    now = {"engine": "torch", "dp_size": 2, "dataset": {"packs": 3}}
    with pytest.raises(ConfigError, match=r"saved with data-parallel size 1, now 2.*--fsdp"):
        _check_same_run(tmp_path, saved, now)
    elastic_saved = saved | {"engine": "fsdp2"}
    _check_same_run(tmp_path, elastic_saved, now | {"engine": "fsdp2"}, elastic=True)
    with pytest.raises(ConfigError, match="saved by the 'torch' engine"):
        _check_same_run(tmp_path, saved, now | {"engine": "fsdp2"}, elastic=True)


# -- 2 -> 2, 2 -> 1 -> 2 processes -----------------------------------------------------

SAVE_STEPS = 4


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("elastic")
    model = save_tiny_llama(root / "model")
    data = write_corpus(root / "data", shards=3, samples=30)  # 43 packs: one is truncated
    configs = {
        nproc: write_config(
            root / f"epoch{nproc}.py",
            model,
            data,
            accumulative_counts=2 // nproc,  # the same global batch of 2 packs
            total_steps=None,
            max_epochs=1,
            save_steps=SAVE_STEPS,
            save_total_limit=-1,
        )
        for nproc in (1, 2)
    }
    dataset = build_packed_dataset(load_intern_repo_tokenized_dataset(data), packed_length=64)
    return root, configs, dataset


@pytest.fixture(scope="module")
def straight(setup):
    root, configs, _dataset = setup
    result = run_train(configs[2], root / "straight", "--fsdp", nproc=2)
    assert result.returncode == 0, result.stderr[-3000:]
    return root / "straight"


@pytest.fixture(scope="module")
def torn(setup):
    """2 processes that die while writing checkpoint 8: checkpoint 4 is the last one."""
    root, configs, _dataset = setup
    work = root / "torn"
    result = run_train(
        configs[2],
        work,
        "--fsdp",
        nproc=2,
        env={"EVOTUNE_FAULT": f"abort_in_save@{2 * SAVE_STEPS}"},
    )
    assert result.returncode != 0
    assert [p.name for p in complete_checkpoints(work)] == [checkpoint_name(SAVE_STEPS)]
    return work


def _by_step(work):
    rows = {}
    for line in (work / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        rows[row["step"]] = row
    return rows


def _copy_until(source, target, step):
    """A copy of a work dir as it was when checkpoint ``step`` was its newest."""
    shutil.copytree(source, target)
    for checkpoint in complete_checkpoints(target):
        if int(checkpoint.name.split("-")[1]) > step:
            shutil.rmtree(checkpoint)
    for temporary in target.glob(".checkpoint-*"):
        shutil.rmtree(temporary)
    metrics = target / "metrics.jsonl"
    kept = [line for line in metrics.read_text().splitlines() if json.loads(line)["step"] <= step]
    metrics.write_text("".join(line + "\n" for line in kept))


def _sampler_state(work, step):
    saved = json.loads((work / checkpoint_name(step) / "trainer_state.json").read_text())
    return saved["sampler"]


def _assert_continues(reference, work, first_step, exact):
    expected, got = _by_step(reference), _by_step(work)
    assert sorted(got) == sorted(expected)  # every step of the epoch, none added
    for step in range(first_step, max(expected) + 1):
        for field in ("loss", "grad_norm"):
            if exact:
                assert got[step][field] == expected[step][field], (step, field)
            else:
                assert got[step][field] == pytest.approx(expected[step][field], rel=1e-5), step
        for field in ("tokens", "trainable_tokens"):  # the whole job's packs of the step
            assert got[step][field] == expected[step][field], (step, field)
    weights, final = final_weights(reference), final_weights(work)
    for name in weights:
        if exact:
            assert torch.equal(final[name], weights[name]), name
        else:
            torch.testing.assert_close(final[name], weights[name], rtol=0, atol=2e-5, msg=name)


@pytest.mark.integration
def test_same_layout_resume_is_bit_identical(setup, straight, torn):
    root, configs, _dataset = setup
    work = root / "same"
    _copy_until(torn, work, SAVE_STEPS)
    result = run_train(configs[2], work, "--fsdp", "--resume", "auto", nproc=2)
    assert result.returncode == 0, result.stderr[-3000:]
    # the base model is not read: the checkpoint fills the shards (and must fill all)
    assert (
        "fsdp2: parameters built on the meta device; their shards come from the checkpoint"
        in result.stderr
    )
    _assert_continues(straight, work, SAVE_STEPS + 1, exact=True)


@pytest.mark.integration
def test_two_to_one_to_two_processes(setup, straight, torn):
    root, configs, dataset = setup
    one = root / "one"
    _copy_until(torn, one, SAVE_STEPS)
    result = run_train(configs[1], one, "--fsdp", "--resume", "auto")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "resuming on data-parallel size 1 (saved with 2)" in result.stderr
    _assert_continues(straight, one, SAVE_STEPS + 1, exact=False)

    again = root / "again"
    later = 2 * SAVE_STEPS
    _copy_until(one, again, later)
    result = run_train(configs[2], again, "--fsdp", "--resume", "auto", nproc=2)
    assert result.returncode == 0, result.stderr[-3000:]
    _assert_continues(straight, again, later + 1, exact=False)

    # the packs of each part, from the sampler API and the saved positions
    first_state, second_state = _sampler_state(one, SAVE_STEPS), _sampler_state(again, later)
    two = [InternRepoSampler(dataset, micro_num=1, dp_size=2, dp_rank=r) for r in (0, 1)]
    part1 = _consume(two, 0, first_state["consumed"])
    single = InternRepoSampler(dataset, micro_num=2, dp_size=1)
    single.load_state_dict(first_state, relayout=True)
    part2 = list(single)[: second_state["consumed"]]
    part3 = []
    for rank in (0, 1):
        sampler = InternRepoSampler(dataset, micro_num=1, dp_size=2, dp_rank=rank)
        sampler.load_state_dict(second_state, relayout=True)
        part3.extend(list(sampler))
    assert second_state["resplit"] == [0, 2 * SAVE_STEPS]
    assert second_state["global_consumed"] == 4 * SAVE_STEPS
    uninterrupted = two[0].global_order(0).tolist()
    assert len(uninterrupted) == len(dataset) - 1  # 43 packs, a global batch of 2
    assert Counter(part1 + part2 + part3) == Counter(uninterrupted)
    assert len(part1 + part2 + part3) == 2 * len(_by_step(again))
    assert sorted(part1 + part2) == sorted(uninterrupted[: 4 * SAVE_STEPS])


@pytest.mark.integration
def test_a_changed_global_batch_with_max_epochs_is_refused(setup, torn):
    """max_epochs sizes the run by the global batch: a new one would change the run length."""
    root, configs, _dataset = setup
    work = root / "halved"
    _copy_until(torn, work, SAVE_STEPS)
    result = run_train(
        configs[1], work, "--fsdp", "--resume", "auto", "--cfg-options", "accumulative_counts=1"
    )
    assert result.returncode == 2, result.stderr[-3000:]
    last = result.stderr.strip().splitlines()[-1]
    assert "max_epochs makes 21 steps at the saved global batch but 43" in last
