"""Per-layer activation checkpointing (every k-th, selective) and regional torch.compile.

Fast tier: checkpointing every k-th layer recomputes exactly those layers; the
'save_matmuls' policy recomputes no matmul; both give the eager gradients; settings
are checked. Integration tier (inductor's C++ compile takes ~30-60 s here):
compiled training equals eager within 1e-5 for 2 steps, alone and under
checkpointing, without recompiling when a row's segments change; through the CLI
with sequence parallelism on 2 processes (DDP over both ranks).
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest
import torch
from tiny import save_tiny_llama, tiny_llama_config, write_config, write_corpus
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import LlamaForCausalLM

from evotune.config.validate import validate
from evotune.errors import ConfigError
from evotune.model.attention import attention_name, register_attention
from evotune.model.layers import decoder_layers
from evotune.model.loss import packed_loss
from evotune.parallel.parallelize import prepare_decoder_layers

EXACT = {"atol": 1e-5, "rtol": 1e-5}


def _rows():
    from test_precision import ROWS

    return ROWS


def _model(layers: int = 4) -> LlamaForCausalLM:
    register_attention()
    torch.manual_seed(0)
    model = LlamaForCausalLM(tiny_llama_config(num_hidden_layers=layers))
    model.config._attn_implementation = attention_name("sdpa")
    return model.train()


def _gradients(model, batch) -> dict[str, torch.Tensor]:
    model.zero_grad(set_to_none=True)
    packed_loss(model, batch, 64).loss_sum.backward()
    return {name: p.grad.clone() for name, p in model.named_parameters()}


def _count_layer_runs(model) -> Counter:
    runs: Counter = Counter()
    for index, layer in enumerate(decoder_layers(model)):
        layer.self_attn.register_forward_hook(
            lambda *_, index=index: runs.update([index])  # type: ignore[misc]
        )
    return runs


def test_decoder_layers_are_the_checkpointable_blocks():
    model = _model()
    assert decoder_layers(model) == list(model.model.layers)


@pytest.mark.parametrize("every", [1, 2, 3])
def test_every_kth_layer_is_recomputed_and_gradients_are_unchanged(every):
    batch = _rows()[0]
    reference = _gradients(_model(), batch)
    model = _model()
    names = list(model.state_dict())
    prepare_decoder_layers(model, checkpoint_every=every)
    assert list(model.state_dict()) == names  # no wrapper module: checkpoints keep their names
    runs = _count_layer_runs(model)
    gradients = _gradients(model, batch)
    assert runs == Counter({i: 2 if i % every == 0 else 1 for i in range(4)})
    for name, expected in reference.items():
        torch.testing.assert_close(gradients[name], expected, **EXACT, msg=name)


class CountMatmuls(TorchDispatchMode):
    MATMULS = frozenset({torch.ops.aten.mm, torch.ops.aten.addmm, torch.ops.aten.bmm})

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += func.overloadpacket in self.MATMULS
        return func(*args, **(kwargs or {}))


def _backward_matmuls(model, batch) -> tuple[int, dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    loss = packed_loss(model, batch, 64).loss_sum
    with CountMatmuls() as counter:
        loss.backward()
    return counter.count, {name: p.grad.clone() for name, p in model.named_parameters()}


def test_save_matmuls_recomputes_no_matmul():
    batch = _rows()[1]
    plain, reference = _backward_matmuls(_model(), batch)
    full_model = _model()
    prepare_decoder_layers(full_model, checkpoint_every=1, policy="full")
    full, _ = _backward_matmuls(full_model, batch)
    selective_model = _model()
    prepare_decoder_layers(selective_model, checkpoint_every=1, policy="save_matmuls")
    runs = _count_layer_runs(selective_model)
    selective, gradients = _backward_matmuls(selective_model, batch)
    assert full > plain  # full checkpointing runs every projection again in the backward
    assert selective == plain  # the policy saved them
    assert runs == Counter({i: 2 for i in range(4)})  # the rest of each layer was recomputed
    for name, expected in reference.items():
        torch.testing.assert_close(gradients[name], expected, **EXACT, msg=name)


def test_evaluation_runs_layers_without_checkpointing():
    model = _model()
    prepare_decoder_layers(model, checkpoint_every=1)
    runs = _count_layer_runs(model)
    with torch.no_grad():
        packed_loss(model, _rows()[0], 64)
    assert runs == Counter({i: 1 for i in range(4)})


def _settings(**values):
    base = dict(pretrained_model_name_or_path="m", dataset_folder="d")
    return validate(Path("config.py"), base | values)


def test_layer_settings_are_checked():
    settings = _settings(gradient_checkpointing=True, activation_checkpointing_every=2)
    assert settings.activation_checkpointing_every == 2
    with pytest.raises(ConfigError, match="activation_checkpointing_every: must be >= 1"):
        _settings(gradient_checkpointing=True, activation_checkpointing_every=0)
    with pytest.raises(ConfigError, match="applies with gradient_checkpointing=True"):
        _settings(activation_checkpointing_every=2)
    with pytest.raises(ConfigError, match="activation_checkpointing_policy: applies with"):
        _settings(activation_checkpointing_policy="save_matmuls")
    with pytest.raises(
        ConfigError, match="compile: regional compilation runs with the torch engine and FSDP2"
    ):
        _settings(compile=True, deepspeed="deepspeed_zero2")
    with pytest.raises(ConfigError, match="'save_matmuls' does not compose with compile"):
        _settings(
            compile=True,
            gradient_checkpointing=True,
            activation_checkpointing_policy="save_matmuls",
        )
    with pytest.raises(ValueError, match="does not compose with compile"):
        prepare_decoder_layers(_model(), checkpoint_every=1, policy="save_matmuls", compile=True)


# -- compiled (integration: inductor compiles C++ on this machine) -----------------------------


def _train_two_steps(model) -> tuple[list[float], dict[str, torch.Tensor]]:
    from test_precision import _engine, _train

    engine = _engine(model, "fp32")
    losses = _train(engine, range(2))
    engine.forward_backward(_rows()[2], 0.01, 0.0, sync=True)
    return losses, {name: p.grad.clone() for name, p in model.named_parameters()}


@pytest.mark.integration
@pytest.mark.parametrize("checkpoint_every", [None, 1, 2])
def test_compiled_training_equals_eager(checkpoint_every):
    from torch._dynamo.utils import counters

    reference_losses, reference = _train_two_steps(_model())
    model = _model()
    prepare_decoder_layers(model, checkpoint_every=checkpoint_every, compile=True)
    with torch.profiler.profile() as profile:
        losses, gradients = _train_two_steps(model)
    regions = [event.name for event in profile.events() if "Compiled" in event.name]
    assert regions, "the layers did not run compiled"
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(reference_losses), **EXACT)
    for name, expected in reference.items():
        torch.testing.assert_close(gradients[name], expected, **EXACT, msg=name)
    # rows of one length with other segments (fixed-length packs) reuse the graphs
    graphs = None
    for segments in ([64], [1, 2, 61], [30, 30, 4], [7] * 9 + [1]):
        model.zero_grad(set_to_none=True)
        packed_loss(model, _row_of(segments), 64).loss_sum.backward()
        if segments == [64]:
            graphs = counters["stats"]["unique_graphs"]
    assert counters["stats"]["unique_graphs"] == graphs


def _row_of(segments):
    from evotune.data import PackedBatch

    generator = torch.Generator().manual_seed(len(segments))
    ids = torch.randint(1, 128, (1, sum(segments)), generator=generator)
    positions = torch.cat([torch.arange(n) for n in segments]).unsqueeze(0)
    cu = torch.tensor([0, *torch.tensor(segments).cumsum(0).tolist()], dtype=torch.int32)
    labels = torch.roll(ids, -1, dims=1)
    return PackedBatch(ids, labels, positions, cu, max(segments), torch.zeros_like(ids), 1)


@pytest.mark.integration
def test_cli_compile_with_checkpointing_and_sequence_parallel_matches_eager(tmp_path):
    """Compiled layers under DDP and under FSDP2's hooks, both with SP=2 and checkpointing."""
    from runner import losses, run_train

    model = save_tiny_llama(tmp_path / "model")
    data = write_corpus(tmp_path / "data", samples=60)
    common = dict(total_steps=3, gradient_checkpointing=True, accumulative_counts=1)
    eager = write_config(tmp_path / "eager.py", model, data, sequence_parallel_size=2, **common)
    compiled = write_config(
        tmp_path / "compiled.py", model, data, sequence_parallel_size=2, compile=True, **common
    )
    results = {}
    runs = (("eager", eager, ()), ("compiled", compiled, ()), ("fsdp2", compiled, ("--fsdp",)))
    for name, config, extra in runs:
        logs = {"TORCH_LOGS": "recompiles"}
        result = run_train(config, tmp_path / name, *extra, nproc=2, env=logs, timeout=900)
        assert result.returncode == 0, result.stderr[-3000:]
        results[name] = losses(tmp_path / name)
        # the attention stays outside the graphs: no guard on a row's segments
        assert "attention_metadata" not in result.stderr, name
    for name in ("compiled", "fsdp2"):
        log = (tmp_path / name / "train.log").read_text()
        assert "decoder layers: 2, compiled: all, activation-checkpointed: 2 (full)" in log
        torch.testing.assert_close(
            torch.tensor(results[name]), torch.tensor(results["eager"]), **EXACT, msg=name
        )


@pytest.mark.integration
@pytest.mark.parametrize(
    "name, settings, extra",
    [
        ("fsdp_every_2", {"engine": "fsdp2", "activation_checkpointing_every": 2}, []),
        (
            "zero3_save_matmuls",
            {"activation_checkpointing_policy": "save_matmuls"},
            ["--deepspeed", "deepspeed_zero3"],
        ),
    ],
)
def test_selective_checkpointing_under_sharded_engines(tmp_path, name, settings, extra):
    """Per-layer checkpointing under FSDP2's and ZeRO-3's hooks: the losses of no checkpointing."""
    from runner import losses, run_train

    model = save_tiny_llama(tmp_path / "model", num_hidden_layers=4)
    data = write_corpus(tmp_path / "data", samples=60)
    common = dict(total_steps=3, accumulative_counts=1)
    engine = {key: value for key, value in settings.items() if key == "engine"}
    plain = write_config(tmp_path / "plain.py", model, data, **engine, **common)
    checkpointed = write_config(
        tmp_path / f"{name}.py", model, data, gradient_checkpointing=True, **settings, **common
    )
    for config, work in ((plain, "plain"), (checkpointed, name)):
        result = run_train(config, tmp_path / work, *extra, nproc=2)
        assert result.returncode == 0, result.stderr[-3000:]
    torch.testing.assert_close(
        torch.tensor(losses(tmp_path / name)), torch.tensor(losses(tmp_path / "plain")), **EXACT
    )
    assert "activation-checkpointed:" in (tmp_path / name / "train.log").read_text()
