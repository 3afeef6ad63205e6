"""Per-type training loss in every step record: sums by type id, one reduction per step."""

from __future__ import annotations

import math

import pytest
from runner import records, run_train
from tiny import save_tiny_llama, write_config, write_corpus

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("types")
    model = save_tiny_llama(root / "model")
    data = write_corpus(root / "data", shards=3, samples=40)  # types cn and en
    return root, model, data


def _run(root, model, data, name, nproc=1, args=(), **settings):
    values = dict(total_steps=3, max_length=70, loss_reduction="token", batch_size=1)
    values.update(settings)
    config = write_config(root / f"{name}.py", model, data, **values)
    result = run_train(config, root / name, *args, nproc=nproc)
    assert result.returncode == 0, result.stderr[-3000:]
    return records(root / name)


def test_type_means_weighted_by_tokens_are_the_token_loss(setup):
    root, model, data = setup
    steps = _run(root, model, data, "single", accumulative_counts=4)
    for record in steps:
        by_type, counts = record["loss_by_type"], record["trainable_tokens_by_type"]
        assert set(by_type) == set(counts) and set(by_type) <= {"cn", "en"}
        assert sum(counts.values()) == record["trainable_tokens"]
        # 'token' reduction: the step loss is the token-weighted mean of the type means
        weighted = sum(by_type[name] * counts[name] for name in by_type)
        assert math.isclose(weighted / record["trainable_tokens"], record["loss"], rel_tol=1e-6)
    assert any(len(r["loss_by_type"]) == 2 for r in steps)  # steps that mix the types


@pytest.mark.parametrize(
    "name, nproc, args, settings",
    [
        ("ddp", 2, (), {"accumulative_counts": 2}),
        ("sp2", 2, (), {"accumulative_counts": 4, "sequence_parallel_size": 2}),
        ("zero3", 2, ("--deepspeed", "deepspeed_zero3"), {"accumulative_counts": 2}),
    ],
)
def test_type_losses_do_not_depend_on_the_layout(setup, name, nproc, args, settings):
    root, model, data = setup
    single = records(root / "single") if (root / "single").exists() else None
    if single is None:
        single = _run(root, model, data, "single", accumulative_counts=4)
    got = _run(root, model, data, name, nproc, args, **settings)
    for mine, reference in zip(got, single, strict=True):
        assert mine["loss_by_type"].keys() == reference["loss_by_type"].keys()
        for key, value in reference["loss_by_type"].items():
            assert math.isclose(mine["loss_by_type"][key], value, rel_tol=1e-5), (name, key)
