"""Every verified model family: a packed row == each sample through the model's own forward.

Tiny random models (2 layers, fp32). A packed row of several samples, three of
them longer than the sliding window, goes through evotune's forward (varlen
attention, the family's logit transform, the router loss); the reference is the
family's own ``ForCausalLM.forward`` with labels and transformers' eager
attention. Dense families: the loss sum and every gradient equal the sum over
samples run alone. MoE families with a router loss: they equal one padded batch
of the same samples with an attention mask (the router loss pools its
statistics over the batch, so it is not a sum over samples).
"""

from __future__ import annotations

import copy
import json
import logging
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from runner import free_port
from transformers import AutoConfig, AutoModelForCausalLM

from evotune.data import PackedBatch
from evotune.errors import ConfigError
from evotune.model.attention import attention_name, register_attention
from evotune.model.families import FAMILIES, check_model
from evotune.model.loss import packed_loss
from evotune.parallel.sequence import SequenceParallel

WINDOW = 4
SAMPLES = [9, 3, 12, 1, 7]  # three samples longer than the window, one without a target
SLIDING_THEN_FULL = ["sliding_attention", "full_attention"]
COMMON = dict(
    vocab_size=96,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
    initializer_range=0.2,  # large enough that windows, softcaps and scales change the loss
)
MOE = dict(num_experts_per_tok=2, output_router_logits=True, router_aux_loss_coef=0.1)

CASES: dict[str, dict] = {
    "llama": {},
    "internlm3": {"head_dim": 16},
    "mistral": {"sliding_window": WINDOW},
    "ministral": {"sliding_window": WINDOW, "head_dim": 16},
    "qwen2": {"use_sliding_window": True, "sliding_window": WINDOW, "max_window_layers": 1},
    "qwen3": {
        "use_sliding_window": True,
        "sliding_window": WINDOW,
        "max_window_layers": 1,
        "head_dim": 16,
    },
    "phi3": {"sliding_window": WINDOW},
    "phi": {"partial_rotary_factor": 0.5},
    "starcoder2": {"sliding_window": WINDOW},
    "gemma": {"head_dim": 16},
    "gemma2": {
        "head_dim": 16,
        "query_pre_attn_scalar": 8,
        "sliding_window": WINDOW,
        "layer_types": SLIDING_THEN_FULL,
        "attn_logit_softcapping": 1.0,
        "final_logit_softcapping": 2.0,
    },
    "gemma3_text": {
        "head_dim": 16,
        "query_pre_attn_scalar": 8,
        "sliding_window": WINDOW,
        "layer_types": SLIDING_THEN_FULL,
        "final_logit_softcapping": 2.0,
    },
    "granite": {
        "logits_scaling": 4.0,
        "attention_multiplier": 0.3,
        "embedding_multiplier": 2.0,
        "residual_multiplier": 0.5,
    },
    "cohere": {"logit_scale": 0.5},
    "cohere2": {"logit_scale": 0.5, "sliding_window": WINDOW, "layer_types": SLIDING_THEN_FULL},
    "olmo": {},
    "olmo2": {},
    "olmo3": {"sliding_window": WINDOW, "layer_types": SLIDING_THEN_FULL},
    "glm": {"head_dim": 16},
    "glm4": {"head_dim": 16},
    "smollm3": {"no_rope_layers": [1, 0]},
    "deepseek_v3": {
        "q_lora_rank": 32,
        "kv_lora_rank": 16,
        "qk_rope_head_dim": 8,
        "qk_nope_head_dim": 8,
        "v_head_dim": 8,
        "head_dim": 8,
        "n_routed_experts": 4,
        "num_experts_per_tok": 2,
        "n_group": 1,
        "topk_group": 1,
        "first_k_dense_replace": 1,
        "moe_intermediate_size": 32,
        "n_shared_experts": 1,
        "num_key_value_heads": 4,  # MLA: one key/value head per query head
    },
    "qwen2_moe": {**MOE, "num_experts": 4, "moe_intermediate_size": 32},
    "qwen3_moe": {**MOE, "num_experts": 4, "moe_intermediate_size": 32, "head_dim": 16},
    "mixtral": {**MOE, "num_local_experts": 4, "sliding_window": WINDOW},
    "olmoe": {**MOE, "num_experts": 4},
    "granitemoe": {**MOE, "num_local_experts": 4, "logits_scaling": 4.0},
    "gpt_oss": {
        **MOE,
        "num_local_experts": 4,
        "head_dim": 16,
        "sliding_window": WINDOW,
        "layer_types": SLIDING_THEN_FULL,
    },
}


def tiny_model(model_type: str, **extra) -> torch.nn.Module:
    """The family's own model with transformers' eager attention (the reference)."""
    config = AutoConfig.for_model(model_type, **{**COMMON, **CASES[model_type], **extra})
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="eager")
    if model_type == "gpt_oss":  # sinks start at zero; give each head its own
        with torch.no_grad():
            for layer in model.model.layers:
                layer.self_attn.sinks.normal_(0.0, 1.0)
    return model.train()


def evotune_copy(reference: torch.nn.Module, kernel: str = "sdpa") -> torch.nn.Module:
    register_attention()
    model = copy.deepcopy(reference)
    model.config._attn_implementation = attention_name(kernel)
    return model


def samples(
    lengths: list[int] = SAMPLES, vocab: int = 96
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(input ids, pre-shifted labels) per sample; a masked prompt in the second sample."""
    generator = torch.Generator().manual_seed(1)
    out = []
    for index, length in enumerate(lengths):
        ids = torch.randint(3, vocab, (length,), generator=generator)
        labels = torch.cat([ids[1:], torch.tensor([-100])])
        if index == 1:
            labels[:1] = -100
        out.append((ids, labels))
    return out


def packed_row(lengths: list[int] = SAMPLES) -> PackedBatch:
    parts = samples(lengths)
    ids = torch.cat([i for i, _ in parts]).unsqueeze(0)
    labels = torch.cat([label for _, label in parts]).unsqueeze(0)
    positions = torch.cat([torch.arange(len(i)) for i, _ in parts]).unsqueeze(0)
    bounds = [0]
    for i, _ in parts:
        bounds.append(bounds[-1] + len(i))
    cu = torch.tensor(bounds, dtype=torch.int32)
    return PackedBatch(ids, labels, positions, cu, max(lengths), torch.zeros_like(ids), 1)


def _hf_labels(labels: torch.Tensor) -> torch.Tensor:
    """Pre-shifted targets -> transformers' unshifted labels (it shifts them back)."""
    return torch.cat([torch.tensor([-100]), labels[:-1]])


def reference_objective(model: torch.nn.Module) -> torch.Tensor:
    """Mean token loss (+ router loss for MoE) through the model's own forward."""
    parts = samples()
    trainable = sum(int((label != -100).sum()) for _, label in parts)
    if getattr(model.config, "output_router_logits", False):
        longest = max(SAMPLES)
        ids = torch.zeros(len(parts), longest, dtype=torch.long)
        labels = torch.full((len(parts), longest), -100)
        mask = torch.zeros(len(parts), longest, dtype=torch.long)
        for row, (sample_ids, sample_labels) in enumerate(parts):
            ids[row, : len(sample_ids)] = sample_ids
            labels[row, : len(sample_ids)] = _hf_labels(sample_labels)
            mask[row, : len(sample_ids)] = 1
        return model(input_ids=ids, attention_mask=mask, labels=labels, use_cache=False).loss
    total = torch.zeros(())
    for sample_ids, sample_labels in parts:
        count = int((sample_labels != -100).sum())
        if count:
            output = model(
                input_ids=sample_ids[None], labels=_hf_labels(sample_labels)[None], use_cache=False
            )
            total = total + output.loss * count
    return total / trainable


def evotune_objective(model: torch.nn.Module) -> torch.Tensor:
    batch = packed_row()
    parts = packed_loss(model, batch, chunk_size=8)  # several loss chunks
    objective = parts.loss_sum / batch.num_trainable
    return objective if parts.aux_loss is None else objective + parts.aux_loss


def _compare(reference: torch.nn.Module, ours: torch.nn.Module) -> tuple[float, float]:
    """(relative loss difference, worst relative gradient difference over parameters)."""
    expected = reference_objective(reference)
    expected.backward()
    got = evotune_objective(ours)
    got.backward()
    loss_diff = abs(float(got.detach() - expected.detach())) / abs(float(expected.detach()))
    worst = 0.0
    for (name, p), q in zip(ours.named_parameters(), reference.parameters(), strict=True):
        if q.grad is None:
            assert p.grad is None or not p.grad.any(), name
            continue
        scale = float(q.grad.abs().max().clamp_min(1e-12))
        worst = max(worst, float((p.grad - q.grad).abs().max()) / scale)
    return loss_diff, worst


@pytest.mark.parametrize("model_type", sorted(CASES))
def test_packed_row_equals_the_models_own_forward(model_type):
    reference = tiny_model(model_type)
    kernels = ["sdpa"]
    config = reference.config
    if getattr(config, "sliding_window", None) or getattr(config, "attn_logit_softcapping", None):
        kernels.append("eager")
    for kernel in kernels:
        reference.zero_grad(set_to_none=True)
        loss_diff, grad_diff = _compare(reference, evotune_copy(reference, kernel))
        assert loss_diff < 1e-5, (kernel, loss_diff)
        assert grad_diff < 1e-4, (kernel, grad_diff)


def _narrow_window(model):
    model.config.sliding_window = WINDOW + 1


def _no_attention_softcap(model):
    for layer in model.model.layers:
        layer.self_attn.attn_logit_softcapping = None
    model.config.attn_logit_softcapping = None


def _no_final_softcap(model):
    model.config.final_logit_softcapping = None


def _no_logits_scaling(model):
    model.config.logits_scaling = 1.0


def _no_logit_scale(model):
    model.config.logit_scale = 1.0


def _no_router_loss(model):
    model.config.output_router_logits = False


def _no_sinks(model):
    for layer in model.model.layers:
        layer.self_attn.sinks.data.fill_(float("-inf"))


@pytest.mark.parametrize(
    "model_type, break_it",
    [
        ("mistral", _narrow_window),
        ("gemma2", _no_attention_softcap),
        ("gemma2", _no_final_softcap),
        ("granite", _no_logits_scaling),
        ("cohere", _no_logit_scale),
        ("mixtral", _no_router_loss),
        ("gpt_oss", _no_sinks),
    ],
)
def test_the_check_fails_when_evotune_misses_a_feature(model_type, break_it):
    reference = tiny_model(model_type)
    ours = evotune_copy(reference)
    break_it(ours)
    loss_diff, _ = _compare(reference, ours)
    assert loss_diff > 1e-3, loss_diff


def test_flex_kernel_honours_softcap_sinks_and_windows():
    """FlexAttention has no CPU backward: its forward against the eager kernel."""
    for model_type in ("gemma2", "gpt_oss", "mistral"):
        reference = tiny_model(model_type).eval()
        batch = packed_row()
        with torch.no_grad():
            expected = packed_loss(evotune_copy(reference, "eager"), batch).loss_sum
            got = packed_loss(evotune_copy(reference, "flex_attention"), batch).loss_sum
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=0)


def test_every_verified_family_is_tested():
    assert set(FAMILIES) <= set(CASES)


@pytest.mark.parametrize("model_type", sorted(FAMILIES))
def test_every_family_builds_with_parameters_on_meta_and_the_same_buffers(model_type):
    """FSDP2's build: no parameter memory, buffers exactly those of an ordinary build."""
    from evotune.model.load import parameters_on_meta

    config = AutoConfig.for_model(model_type, **{**COMMON, **CASES[model_type]})
    with parameters_on_meta():
        skeleton = AutoModelForCausalLM.from_config(config)
    reference = AutoModelForCausalLM.from_config(config)
    assert all(parameter.is_meta for parameter in skeleton.parameters())
    assert [name for name, _ in skeleton.named_parameters()] == [
        name for name, _ in reference.named_parameters()
    ]
    expected = dict(reference.named_buffers())
    assert sorted(dict(skeleton.named_buffers())) == sorted(expected)
    for name, buffer in skeleton.named_buffers():
        assert not buffer.is_meta and torch.equal(buffer, expected[name]), name
    if config.tie_word_embeddings:
        assert skeleton.get_output_embeddings().weight is skeleton.get_input_embeddings().weight


@pytest.mark.parametrize(
    "model_type, settings, missing",
    [
        ("falcon", {}, "attention interface"),
        ("qwen3_next", {}, "linear_attention"),
        ("llama4_text", {"attention_chunk_size": 8}, "chunked attention"),
        ("llama", {"attention_dropout": 0.1}, "attention_dropout=0.1"),
    ],
)
def test_inexact_features_are_refused_in_one_line(model_type, settings, missing):
    config = AutoConfig.for_model(model_type, **settings)
    for allow in (False, True):
        with pytest.raises(ConfigError, match=missing) as error:
            check_model(config, allow_unverified_model=allow)
        message = str(error.value)
        assert "\n" not in message and repr(model_type) in message


def test_unverified_family_is_refused_unless_allowed(caplog):
    config = AutoConfig.for_model("stablelm")
    with pytest.raises(ConfigError, match=r"'stablelm' is not verified.*allow_unverified_model"):
        check_model(config)
    with caplog.at_level(logging.WARNING, logger="evotune.model.families"):
        check_model(config, allow_unverified_model=True)
    assert "UNVERIFIED MODEL" in caplog.text


def _sequence_parallel_worker(rank: int, world: int, port: int, output: str) -> None:
    """One rank: the whole row vs this rank's Ulysses slice, for families with sinks and MoE."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    sp = SequenceParallel(world, rank, dist.group.WORLD)
    results = {}
    for model_type in ("gpt_oss", "mixtral"):
        reference = tiny_model(model_type)
        whole, sliced = evotune_copy(reference), evotune_copy(reference)
        batch = packed_row([*SAMPLES, 1])  # 33 tokens: sp=2 pads one ignored token
        trainable = batch.num_trainable
        expected = packed_loss(whole, batch)
        (expected.loss_sum / trainable + expected.aux_loss).backward()
        local = packed_loss(sliced, sp.split(batch), sequence_parallel=sp)
        (local.loss_sum / trainable + local.aux_loss).backward()
        parts = torch.stack([local.loss_sum.detach(), local.aux_loss.detach()])
        dist.all_reduce(parts)  # the group's sums are the row's loss sum and router term
        worst = 0.0
        for p, q in zip(sliced.parameters(), whole.parameters(), strict=True):
            grad = p.grad if p.grad is not None else torch.zeros_like(p)
            dist.all_reduce(grad)
            scale = float(q.grad.abs().max().clamp_min(1e-12))
            worst = max(worst, float((grad - q.grad).abs().max()) / scale)
        results[model_type] = {
            "loss_rel": float(
                abs(parts[0] - expected.loss_sum.detach()) / expected.loss_sum.detach()
            ),
            "aux_rel": float(abs(parts[1] - expected.aux_loss.detach()) / expected.aux_loss),
            "grad_rel": worst,
        }
    if rank == 0:
        with open(output, "w") as handle:
            json.dump(results, handle)
    dist.destroy_process_group()


@pytest.mark.integration
def test_sequence_parallel_keeps_sinks_windows_and_router_loss_exact(tmp_path):
    output = tmp_path / "sp.json"
    mp.spawn(_sequence_parallel_worker, args=(2, free_port(), str(output)), nprocs=2)
    for model_type, row in json.loads(output.read_text()).items():
        assert row["loss_rel"] < 1e-5, (model_type, row)
        assert row["aux_rel"] < 1e-5, (model_type, row)
        assert row["grad_rel"] < 1e-4, (model_type, row)


def test_load_model_applies_the_family_check(tmp_path, caplog):
    from evotune.model.load import load_model

    config = AutoConfig.for_model("stablelm", **COMMON)
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path / "stablelm")
    with pytest.raises(ConfigError, match="'stablelm' is not verified"):
        load_model(str(tmp_path / "stablelm"))
    with caplog.at_level(logging.WARNING, logger="evotune.model.families"):
        model = load_model(str(tmp_path / "stablelm"), allow_unverified_model=True)
    assert "UNVERIFIED MODEL" in caplog.text and model.config.model_type == "stablelm"
