"""Validation: per-token losses against the training loss, per-type sums, settings, layouts.

The layout test trains 2 steps and validates after each one on 1 process, on 2
processes (DDP, ZeRO-3, FSDP2) and with sequence parallelism 2. The numbers are
sums of the same per-token fp32 losses reduced in float64, so they differ only
by the fp32 rounding of forwards and of the 2 training steps (the 1e-5 relative
tolerance of tests/test_distributed.py).
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from runner import records, run_train
from tiny import save_tiny_llama, write_config, write_corpus
from transformers import AutoModelForCausalLM

from evotune.config import ConfigError, load_config
from evotune.data import (
    PackCollator,
    build_packed_dataset,
    load_intern_repo_tokenized_dataset,
)
from evotune.errors import DataError
from evotune.model.attention import attention_name, register_attention
from evotune.model.loss import packed_loss
from evotune.parallel.dims import ParallelDims
from evotune.train.evaluation import (
    Validation,
    add_type_sums,
    build_val_dataset,
    evaluation_mode,
    token_losses,
)


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    model = save_tiny_llama(root / "model")
    train = write_corpus(root / "train", seed=0, shards=3, samples=40)
    val = write_corpus(root / "val", seed=7, shards=3, samples=20)  # types cn and en
    return root, model, train, val


def _model(path):
    register_attention()
    return AutoModelForCausalLM.from_pretrained(path, attn_implementation=attention_name("sdpa"))


def _dataset(folder, length=64):
    return build_packed_dataset(load_intern_repo_tokenized_dataset(folder), packed_length=length)


def test_token_losses_sum_to_the_training_loss_and_types_add_up(assets):
    _root, model_path, _train, val = assets
    model = _model(model_path)
    dataset = _dataset(val)
    types = {int(dataset[i]["type_ids"][0]) for i in range(len(dataset))}
    assert types == {0, 1}  # both types present, so the per-type split is tested
    rows = [[0, len(dataset) - 1], [1, 2, 3]]  # rows that mix the two types
    collate = PackCollator()
    sums = torch.zeros((2, 2), dtype=torch.float64)
    expected_total, expected_tokens = 0.0, 0
    with torch.no_grad():
        for row in rows:
            batch = collate([dataset[i] for i in row])
            losses = token_losses(model, batch, chunk_size=16)  # several chunks per row
            reference = packed_loss(model, batch, chunk_size=4096).loss_sum
            torch.testing.assert_close(losses.sum(), reference, rtol=1e-6, atol=1e-5)
            assert torch.all(losses[batch.labels[0] == -100] == 0)
            add_type_sums(sums, losses, batch.labels, batch.type_ids)
            expected_total += float(reference)
            expected_tokens += batch.num_trainable
    assert sums[:, 1].sum().item() == expected_tokens
    assert math.isclose(sums[:, 0].sum().item(), expected_total, rel_tol=1e-6)
    assert (sums[:, 1] > 0).all()


def test_evaluation_mode_restores_every_module_and_the_rng(assets):
    _root, model_path, _train, _val = assets
    model = _model(model_path).train()
    frozen = model.model.layers[0]
    frozen.eval()  # a module the user keeps in eval mode must stay there
    before = {name: m.training for name, m in model.named_modules()}
    rng = torch.get_rng_state()
    with evaluation_mode(model, torch.device("cpu")):
        assert not any(m.training for m in model.modules())
        assert not torch.is_grad_enabled()
        torch.rand(5)  # consumes random numbers inside
    assert {name: m.training for name, m in model.named_modules()} == before
    assert torch.equal(torch.get_rng_state(), rng)
    assert torch.is_grad_enabled()


def test_validation_single_process_matches_an_independent_sum(assets, tmp_path):
    _root, model_path, train, val = assets
    config = write_config(
        tmp_path / "c.py", model_path, train, val_dataset_folder=str(val), batch_size=2
    )
    settings = load_config(config).settings
    validation = Validation.build(settings, ParallelDims(), str(config))
    assert validation is not None
    model = _model(model_path)
    result = validation.run(model, engine=None, step=5)
    dataset = _dataset(val)
    collate = PackCollator()
    total, tokens = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(dataset), 2):
            batch = collate([dataset[i] for i in range(start, min(start + 2, len(dataset)))])
            total += float(packed_loss(model, batch).loss_sum)
            tokens += batch.num_trainable
    assert result.tokens == tokens
    assert math.isclose(result.loss, total / tokens, rel_tol=1e-6)
    assert set(result.by_type) == {"cn", "en"}
    weighted = sum(loss * count for loss, count in result.by_type.values())
    assert math.isclose(weighted, result.loss * result.tokens, rel_tol=1e-9)
    record = result.record(5)
    assert record["kind"] == "eval" and record["step"] == 5
    assert math.isclose(record["val_ppl"], math.exp(record["val_loss"]))
    json.dumps(record)  # a metrics.jsonl line


def test_max_eval_batches_takes_the_first_rows(assets, tmp_path):
    _root, model_path, train, val = assets
    config = write_config(
        tmp_path / "c.py",
        model_path,
        train,
        val_dataset_folder=str(val),
        batch_size=2,
        max_eval_batches=3,
        eval_steps=2,
    )
    validation = Validation.build(load_config(config).settings, ParallelDims(), str(config))
    assert validation.rows == [[0, 1], [2, 3], [4, 5]]
    assert [validation.due(step, last=False) for step in range(5)] == [
        False,
        False,
        True,
        False,
        True,
    ]
    assert validation.due(5, last=True)


def test_val_folder_is_packed_like_the_training_data(assets, tmp_path):
    _root, model_path, train, val = assets
    config = tmp_path / "c.py"
    config.write_text(
        "from evotune.data import build_packed_dataset, load_intern_repo_tokenized_dataset\n"
        f"pretrained_model_name_or_path = {str(model_path)!r}\n"
        "max_length = 64\n"
        f"val_dataset_folder = {str(val)!r}\n"
        "train_dataset = dict(type=build_packed_dataset, dataset_cfg=dict("
        f"type=load_intern_repo_tokenized_dataset, folder={str(train)!r}, min_length=10), "
        "packed_length=max_length, pack_mode='xtuner', seed=5)\n"
    )
    dataset = build_val_dataset(load_config(config).settings)
    assert dataset.pack_mode == "xtuner" and dataset.seed == 5
    assert dataset.corpus.folder == str(val)
    assert min(s.lengths.min() for s in dataset.corpus.shards) >= 10


@pytest.mark.parametrize(
    "settings, error, message",
    [
        ({"eval_steps": 0}, ConfigError, "eval_steps: must be >= 1"),
        ({"max_eval_batches": 0}, ConfigError, "max_eval_batches: must be >= 1"),
        ({"val_dataset_folder": "/no/such/val"}, DataError, "val_dataset_folder: /no/such/val"),
    ],
)
def test_bad_validation_settings_are_one_line_errors(assets, tmp_path, settings, error, message):
    _root, model_path, train, val = assets
    values = {"val_dataset_folder": str(val), **settings}
    config = write_config(tmp_path / "c.py", model_path, train, **values)
    with pytest.raises(error, match=message) as raised:
        Validation.build(load_config(config).settings, ParallelDims(), str(config))
    assert "\n" not in str(raised.value)


def test_eval_steps_without_a_validation_set_is_refused(assets, tmp_path):
    _root, model_path, train, _val = assets
    config = write_config(tmp_path / "c.py", model_path, train, eval_steps=10)
    with pytest.raises(ConfigError, match="eval_steps: there is no validation set"):
        Validation.build(load_config(config).settings, ParallelDims(), str(config))


# -- whole runs: the CLI and the layouts ---------------------------------------------------


@pytest.mark.integration
@pytest.mark.parametrize(
    "settings, message",
    [
        ({"val_dataset_folder": "nope"}, "val_dataset_folder: "),
        ({"eval_steps": 0}, "eval_steps: must be >= 1"),
    ],
)
def test_bad_validation_input_exits_2_with_one_line(assets, tmp_path, settings, message):
    _root, model_path, train, val = assets
    values = {"val_dataset_folder": str(val), **settings}
    if values["val_dataset_folder"] == "nope":
        values["val_dataset_folder"] = str(tmp_path / "nope")
    config = write_config(tmp_path / "c.py", model_path, train, **values)
    result = run_train(config, tmp_path / "w")
    assert result.returncode == 2, result.stderr[-2000:]
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("evotune: error: ") and message in last


LAYOUTS = {
    "ddp": dict(nproc=2, args=(), settings={}),
    "sp2": dict(nproc=2, args=(), settings={"sequence_parallel_size": 2}),
    "zero3": dict(nproc=2, args=("--deepspeed", "deepspeed_zero3"), settings={}),
    "fsdp2": dict(nproc=2, args=("--fsdp",), settings={}),
}


@pytest.fixture(scope="module")
def single_run(assets):
    root, model_path, train, val = assets
    return _layout_run(root, model_path, train, val, "single", nproc=1, args=(), settings={})


def _layout_run(root, model_path, train, val, name, nproc, args, settings):
    # the same global batch everywhere: dp x accumulative_counts = 2 packs per step
    accumulative = 2 if nproc == 1 or settings.get("sequence_parallel_size") == 2 else 1
    config = write_config(
        root / f"{name}.py",
        model_path,
        train,
        total_steps=2,
        accumulative_counts=accumulative,
        batch_size=1,
        max_length=70,  # odd: sequence parallelism pads its slices
        val_dataset_folder=str(val),
        eval_steps=1,
        **settings,
    )
    result = run_train(config, root / name, *args, nproc=nproc)
    assert result.returncode == 0, result.stderr[-3000:]
    return [r for r in records(root / name) if r.get("kind") == "eval"]


@pytest.mark.integration
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_validation_does_not_depend_on_the_layout(assets, single_run, layout):
    root, model_path, train, val = assets
    spec = LAYOUTS[layout]
    evals = _layout_run(root, model_path, train, val, layout, **spec)
    assert [r["step"] for r in evals] == [r["step"] for r in single_run] == [1, 2]
    for got, expected in zip(evals, single_run, strict=True):
        assert got["val_tokens"] == expected["val_tokens"]
        assert got["val_tokens_by_type"] == expected["val_tokens_by_type"]
        assert math.isclose(got["val_loss"], expected["val_loss"], rel_tol=1e-5)
        for name, loss in expected["val_loss_by_type"].items():
            assert math.isclose(got["val_loss_by_type"][name], loss, rel_tol=1e-5), name
