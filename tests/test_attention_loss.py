"""Varlen attention (no attention across segments, metadata built once), chunked loss, LR
schedules."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from tiny import tiny_llama_config
from transformers import LlamaForCausalLM

from evotune.data import PackedBatch
from evotune.model.attention import (
    AttentionMetadata,
    AttentionNeeds,
    MissingAttentionMetadata,
    attention_name,
    kernel_problem,
    register_attention,
    resolve_kernel,
)
from evotune.model.loss import chunked_cross_entropy_sum, packed_loss, packed_loss_sum
from evotune.train.schedule import internevo_lr, xtuner_lr

SEGMENTS = [5, 9, 1, 7, 3]
BACKENDS = ["sdpa", "eager", "flex_attention"]


def _row(lengths, vocab=128, seed=0):
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, vocab, (1, sum(lengths)), generator=generator)
    positions = torch.cat([torch.arange(n) for n in lengths]).unsqueeze(0)
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    return ids, positions, cu


@pytest.fixture(scope="module")
def reference_model():
    torch.manual_seed(0)
    model = LlamaForCausalLM(tiny_llama_config())
    model.config._attn_implementation = "eager"
    return model.eval()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("training", [False, True])
def test_packed_row_equals_segments_alone(reference_model, backend, training):
    register_attention()
    model = LlamaForCausalLM(tiny_llama_config())
    model.load_state_dict(reference_model.state_dict())
    model.config._attn_implementation = attention_name(backend)
    model.train(training)
    ids, positions, cu = _row(SEGMENTS)
    metadata = AttentionMetadata(backend, cu.tolist(), "cpu")
    with torch.no_grad():  # FlexAttention has no backward on CPU
        packed = model(
            input_ids=ids, position_ids=positions, use_cache=False, attention_metadata=metadata
        ).logits[0]
    start = 0
    for length in SEGMENTS:
        alone = reference_model(input_ids=ids[:, start : start + length], use_cache=False).logits[0]
        torch.testing.assert_close(packed[start : start + length], alone, atol=1e-5, rtol=1e-5)
        start += length


def test_packed_row_differs_without_boundaries(reference_model):
    """Sanity check of the test above: one segment over the row gives other logits."""
    register_attention()
    ids, positions, _ = _row(SEGMENTS)
    model = LlamaForCausalLM(tiny_llama_config())
    model.load_state_dict(reference_model.state_dict())
    model.config._attn_implementation = attention_name("sdpa")
    whole = AttentionMetadata("sdpa", [0, sum(SEGMENTS)], "cpu")
    logits = model(
        input_ids=ids, position_ids=positions, use_cache=False, attention_metadata=whole
    ).logits[0]
    alone = reference_model(input_ids=ids[:, 5:14], use_cache=False).logits[0]
    assert not torch.allclose(logits[5:14], alone, atol=1e-3)


def test_flex_refused_for_cpu_training():
    with pytest.raises(ValueError, match="no backward on CPU"):
        resolve_kernel("flex_attention", torch.device("cpu"), training=True)
    assert resolve_kernel("flex_attention", torch.device("cpu"), training=False) == "flex_attention"
    assert resolve_kernel("auto", torch.device("cpu")) == "sdpa"


def test_kernels_are_picked_by_capability():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    with pytest.raises(ValueError, match="'varlen' runs on cuda only"):
        resolve_kernel("varlen", cpu)
    bf16 = torch.bfloat16
    assert "softcapping" in kernel_problem("varlen", cuda, AttentionNeeds(softcap=True), bf16)
    assert "sinks" in kernel_problem("flash_attention_2", cuda, AttentionNeeds(sinks=True), bf16)
    assert "float16/bfloat16" in kernel_problem("varlen", cuda, AttentionNeeds(), torch.float32)
    assert "head size" in kernel_problem("varlen", cuda, AttentionNeeds(head_dim=320), bf16)
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="needs a CUDA GPU"):
            resolve_kernel("varlen", cuda, compute_dtype=bf16)
    for kernel in ("sdpa", "eager"):  # exact for every feature, on any device
        needs = AttentionNeeds(windows=frozenset({None, 4}), softcap=True, sinks=True)
        assert kernel_problem(kernel, cpu, needs, torch.float32) is None


class HostReadForbidden(torch.Tensor):
    """cu_seqlens that fails the test if anything reads it back to the host."""

    FORBIDDEN = frozenset(
        {"tolist", "item", "numpy", "__int__", "__index__", "__bool__", "__float__"}
    )

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        if getattr(func, "__name__", None) in cls.FORBIDDEN:
            raise AssertionError(
                f"cu_seqlens read on the host inside the forward ({func.__name__})"
            )
        return super().__torch_function__(func, types, args, kwargs or {})


def _forbid(*args, **kwargs):
    raise AssertionError("attention metadata or a mask was built inside the forward")


def test_the_host_read_guard_works():
    guarded = torch.tensor([0, 3, 5], dtype=torch.int32).as_subclass(HostReadForbidden)
    for read in (
        lambda t: t.tolist(),
        lambda t: int(t[-1]),
        lambda t: [int(x) for x in t],
        lambda t: t.item(),
    ):
        with pytest.raises(AssertionError, match="read on the host"):
            read(guarded)


@pytest.mark.parametrize("kernel", ["sdpa", "eager", "flex_attention"])
def test_metadata_is_built_once_and_never_read_back(reference_model, kernel, monkeypatch):
    register_attention()
    model = LlamaForCausalLM(tiny_llama_config())
    model.load_state_dict(reference_model.state_dict())
    model.config._attn_implementation = attention_name(kernel)
    ids, positions, cu = _row(SEGMENTS)
    labels = torch.roll(ids, -1, dims=1)
    batch = PackedBatch(
        ids,
        labels,
        positions,
        cu.as_subclass(HostReadForbidden),
        max(SEGMENTS),
        torch.zeros_like(ids),
        1,
        segment_bounds=tuple(cu.tolist()),
    )
    import torch.nn.attention.flex_attention as flex

    from evotune.model import loss as loss_module

    built = []
    original = AttentionMetadata.for_batch.__func__

    def counting(cls, *args, **kwargs):
        metadata = original(cls, *args, **kwargs)
        assert isinstance(metadata.cu_seqlens, HostReadForbidden)
        built.append(metadata)
        # from here on, nothing may build metadata or masks
        monkeypatch.setattr(AttentionMetadata, "__init__", _forbid)
        monkeypatch.setattr(flex, "create_block_mask", _forbid)
        return metadata

    monkeypatch.setattr(loss_module.AttentionMetadata, "for_batch", classmethod(counting))
    with torch.set_grad_enabled(kernel != "flex_attention"):  # no flex backward on CPU
        result = packed_loss(model, batch, chunk_size=4)
        if kernel != "flex_attention":
            result.loss_sum.backward()
    assert len(built) == 1


def test_a_kernel_without_prepared_metadata_refuses(reference_model):
    register_attention()
    model = LlamaForCausalLM(tiny_llama_config())
    model.load_state_dict(reference_model.state_dict())
    model.config._attn_implementation = attention_name("sdpa")
    ids, positions, cu = _row(SEGMENTS)
    with pytest.raises(MissingAttentionMetadata, match="needs attention_metadata="):
        model(input_ids=ids, position_ids=positions, use_cache=False)
    eager_metadata = AttentionMetadata("eager", cu.tolist(), "cpu")
    with pytest.raises(ValueError, match="built for 'eager' reached the 'sdpa' kernel"):
        model(input_ids=ids, position_ids=positions, attention_metadata=eager_metadata)
    no_window = AttentionMetadata("sdpa", cu.tolist(), "cpu")
    model.config.sliding_window = 3  # Llama ignores it; ask the kernel directly instead
    from evotune.model.attention import AttentionCall, sdpa_kernel

    q = torch.randn(1, 4, sum(SEGMENTS), 16)
    with pytest.raises(ValueError, match="asked for sliding_window=3"):
        sdpa_kernel(q, q, q, no_window, AttentionCall(scale=0.25, window=3))


@pytest.mark.parametrize("chunk", [1, 3, 7, 1000])
def test_chunked_loss_equals_full_cross_entropy(chunk):
    torch.manual_seed(0)
    head = torch.nn.Linear(16, 50, bias=False)
    hidden = torch.randn(23, 16, requires_grad=True)
    labels = torch.randint(0, 50, (23,))
    labels[[0, 4, 5, 22]] = -100
    ours = chunked_cross_entropy_sum(hidden, head, labels, chunk_size=chunk)
    ours.backward()
    grad_hidden, grad_weight = hidden.grad.clone(), head.weight.grad.clone()
    hidden.grad = None
    head.weight.grad = None
    reference = F.cross_entropy(head(hidden).float(), labels, ignore_index=-100, reduction="sum")
    reference.backward()
    torch.testing.assert_close(ours, reference)
    torch.testing.assert_close(grad_hidden, hidden.grad)
    torch.testing.assert_close(grad_weight, head.weight.grad)


def test_packed_loss_uses_labels_without_shifting(reference_model):
    register_attention()
    model = LlamaForCausalLM(tiny_llama_config())
    model.load_state_dict(reference_model.state_dict())
    model.config._attn_implementation = attention_name("sdpa")
    ids, positions, cu = _row([6, 4])
    labels = torch.full_like(ids, -100)
    labels[0, 2] = 17  # the target of position 2 is 17
    batch = PackedBatch(ids, labels, positions, cu, 6, torch.zeros_like(ids), 1)
    assert batch.segment_bounds == (0, 6, 10)  # read on the host once, at construction
    loss = packed_loss_sum(model, batch, chunk_size=3)
    logits = reference_model(input_ids=ids[:, :6], use_cache=False).logits[0, 2]
    expected = F.cross_entropy(logits[None].float(), torch.tensor([17]))
    torch.testing.assert_close(loss, expected, atol=1e-5, rtol=1e-5)


def test_internevo_schedule_closed_form():
    base, eta = 1e-3, 1e-5
    lr = [internevo_lr(k, base, 100, 0.1, eta) for k in range(100)]
    assert lr[0] == pytest.approx(base / 10)
    assert lr[9] == pytest.approx(base)
    assert lr[10] == pytest.approx(base)  # the peak is used twice
    assert lr[55] == pytest.approx(eta + (base - eta) * (1 + math.cos(math.pi * 45 / 90)) / 2)
    assert lr[99] == pytest.approx(eta + (base - eta) * (1 + math.cos(math.pi * 89 / 90)) / 2)
    with_init = [internevo_lr(k, base, 100, 0.1, eta, init_steps=5) for k in range(20)]
    assert with_init[:5] == [0.0] * 5 and with_init[5] == pytest.approx(base / 10)


def test_xtuner_schedule_closed_form():
    base = 2e-4
    eta = 0.15 * base
    lr = [xtuner_lr(k, base, 200, 0.025, eta) for k in range(200)]
    assert lr[0] == pytest.approx(base / 40)
    assert lr[4] == pytest.approx(base)
    assert lr[5] == pytest.approx(base)
    assert lr[199] > eta and lr[199] == pytest.approx(
        eta + (base - eta) * (1 + math.cos(math.pi * 194 / 195)) / 2
    )


def test_loaded_model_trains_with_active_checkpointing(tmp_path):
    from tiny import save_tiny_llama

    from evotune.model.load import load_model

    model = load_model(str(save_tiny_llama(tmp_path / "m")), gradient_checkpointing=True)
    assert model.training
    layer = model.model.layers[0]
    assert layer.training and getattr(layer, "gradient_checkpointing", False)
