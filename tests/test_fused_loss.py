"""The fused LM head + cross-entropy equals the checkpointed chunks it replaced.

fp32 loss and every gradient within 1e-5 for chunk sizes 1, 7 and the whole row,
with and without a bias, through every family logit transform (scale, divide,
softcap, all three), any callable transform, tied embeddings in a real model, with
and without skipping ignored rows; bf16 autocast within bf16 tolerance.
"""

from __future__ import annotations

import pytest
import torch
from tiny import tiny_llama_config
from transformers import LlamaForCausalLM

from evotune.data import PackedBatch
from evotune.model.attention import AttentionMetadata, attention_name, register_attention
from evotune.model.families import LogitTransform
from evotune.model.loss import (
    checkpointed_cross_entropy,
    chunked_cross_entropy_sum,
    fusable_head,
    fused_cross_entropy_sum,
    packed_loss,
)

TOKENS, HIDDEN, VOCAB = 23, 16, 50
TRANSFORMS = {
    "none": None,
    "identity": LogitTransform(),
    "multiply": LogitTransform(multiply=0.0625),
    "divide": LogitTransform(divide=8.0),
    "softcap": LogitTransform(softcap=1.5),
    "all": LogitTransform(multiply=3.0, divide=2.0, softcap=2.0),
    "callable": lambda logits: torch.sin(logits) + logits * logits,
}
EXACT = {"atol": 1e-5, "rtol": 1e-5}


def _inputs(bias: bool, seed: int = 0):
    torch.manual_seed(seed)
    head = torch.nn.Linear(HIDDEN, VOCAB, bias=bias)
    hidden = torch.randn(TOKENS, HIDDEN, requires_grad=True)
    labels = torch.randint(0, VOCAB, (TOKENS,))
    labels[[0, 4, 5, 22]] = -100
    return head, hidden, labels


def _loss_and_grads(loss_fn, head, hidden, labels, scale=1.0):
    for tensor in (hidden, *head.parameters()):
        tensor.grad = None
    loss = loss_fn()
    (loss * scale).backward()
    grads = [hidden.grad.clone()] + [p.grad.clone() for p in head.parameters()]
    return loss.detach(), grads


@pytest.mark.parametrize("transform", list(TRANSFORMS))
@pytest.mark.parametrize("chunk", [1, 7, TOKENS])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("skip_ignored", [False, True])
def test_fused_equals_checkpointed_chunks(transform, chunk, bias, skip_ignored):
    head, hidden, labels = _inputs(bias)
    fn = TRANSFORMS[transform]
    expected = _loss_and_grads(
        lambda: checkpointed_cross_entropy(hidden, head, labels, chunk, fn)[0],
        head,
        hidden,
        labels,
        scale=2.5,
    )
    fused = _loss_and_grads(
        lambda: fused_cross_entropy_sum(
            hidden, head.weight, labels, chunk, fn, head.bias, skip_ignored=skip_ignored
        ),
        head,
        hidden,
        labels,
        scale=2.5,
    )
    torch.testing.assert_close(fused[0], expected[0], **EXACT)
    for ours, reference in zip(fused[1], expected[1], strict=True):
        torch.testing.assert_close(ours, reference, **EXACT)
    assert fused[1][0][labels == -100].abs().max() == 0  # no target, no gradient


def test_the_inputs_tell_a_missing_derivative_apart():
    """The comparison above can fail: without the transform's derivative the gradient differs."""
    head, hidden, labels = _inputs(bias=False)
    for name in ("multiply", "divide", "softcap", "all"):
        transform = TRANSFORMS[name]
        loss = checkpointed_cross_entropy(hidden, head, labels, 7, transform)[0]
        (correct,) = torch.autograd.grad(loss, hidden)
        transformed = transform(head(hidden).detach())
        keep = labels != -100
        probabilities = torch.softmax(transformed, dim=-1)
        probabilities[torch.arange(TOKENS), labels.clamp_min(0)] -= 1
        no_chain = (probabilities * keep.unsqueeze(1)) @ head.weight.detach()
        assert (correct - no_chain).abs().max() > 1e-3, name


def test_chunked_entry_point_picks_the_fused_path_for_plain_linear_heads():
    head, hidden, labels = _inputs(bias=False)
    assert fusable_head(head)
    loss = chunked_cross_entropy_sum(hidden, head, labels, 7)
    assert type(loss.grad_fn).__name__.startswith("FusedLinearCrossEntropy")

    class ScaledHead(torch.nn.Linear):  # a subclass may change the forward: checkpointed
        def forward(self, x):
            return super().forward(x) * 2

    assert not fusable_head(ScaledHead(HIDDEN, VOCAB))
    partitioned = torch.nn.Linear(HIDDEN, VOCAB)
    partitioned.weight.ds_id = 3  # a DeepSpeed ZeRO-3 partition: gathered by module hooks
    assert not fusable_head(partitioned)


def test_scaling_and_accumulation_follow_the_incoming_gradient():
    head, hidden, labels = _inputs(bias=True)
    once = _loss_and_grads(
        lambda: fused_cross_entropy_sum(hidden, head.weight, labels, 7, bias=head.bias),
        head,
        hidden,
        labels,
    )
    for tensor in (hidden, *head.parameters()):
        tensor.grad = None
    for scale in (0.25, 0.75):  # two micro-batches accumulate into .grad
        (fused_cross_entropy_sum(hidden, head.weight, labels, 7, bias=head.bias) * scale).backward()
    for ours, reference in zip(
        [hidden.grad, *(p.grad for p in head.parameters())], once[1], strict=True
    ):
        torch.testing.assert_close(ours, reference, **EXACT)


def test_no_trainable_label_and_no_grad_mode():
    head, hidden, labels = _inputs(bias=False)
    ignored = torch.full_like(labels, -100)
    loss = fused_cross_entropy_sum(hidden, head.weight, ignored, 7)
    loss.backward()
    assert loss.detach().item() == 0.0
    assert hidden.grad.abs().max() == 0 and head.weight.grad.abs().max() == 0
    with torch.no_grad():
        value = fused_cross_entropy_sum(hidden, head.weight, labels, 7)
        reference = checkpointed_cross_entropy(hidden, head, labels, 7)[0]
    assert value.grad_fn is None
    torch.testing.assert_close(value, reference, **EXACT)


def test_a_second_backward_is_refused():
    head, hidden, labels = _inputs(bias=False)
    loss = fused_cross_entropy_sum(hidden, head.weight, labels, 7)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="backward ran twice"):
        loss.backward()


def test_bf16_autocast_tracks_fp32_within_bf16_tolerance():
    head, hidden, labels = _inputs(bias=True)
    reference = _loss_and_grads(
        lambda: checkpointed_cross_entropy(hidden, head, labels, 7)[0], head, hidden, labels
    )

    def autocast_fused():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return fused_cross_entropy_sum(hidden, head.weight, labels, 7, bias=head.bias)

    fused = _loss_and_grads(autocast_fused, head, hidden, labels)
    assert fused[0].dtype == torch.float32
    torch.testing.assert_close(fused[0], reference[0], atol=0.05, rtol=0.01)
    for ours, expected in zip(fused[1], reference[1], strict=True):
        assert ours.dtype == expected.dtype
        torch.testing.assert_close(ours, expected, atol=0.02, rtol=0.05)


def _model_row(tied: bool):
    register_attention()
    torch.manual_seed(0)
    model = LlamaForCausalLM(tiny_llama_config(tie_word_embeddings=tied))
    model.config._attn_implementation = attention_name("sdpa")
    lengths = [5, 9, 1, 7, 3]
    ids = torch.randint(1, 128, (1, sum(lengths)))
    labels = torch.roll(ids, -1, dims=1)
    labels[0, [0, 1, 6, 14]] = -100
    positions = torch.cat([torch.arange(n) for n in lengths]).unsqueeze(0)
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    batch = PackedBatch(ids, labels, positions, cu, max(lengths), torch.zeros_like(ids), 1)
    return model, batch


@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("chunk", [1, 7, 25])
def test_model_gradients_equal_the_checkpointed_path(tied, chunk):
    model, batch = _model_row(tied)
    assert (model.lm_head.weight is model.model.embed_tokens.weight) == tied
    packed_loss(model, batch, chunk_size=chunk).loss_sum.backward()
    fused = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    metadata = AttentionMetadata("sdpa", batch.segment_bounds, "cpu")
    hidden = model.model(
        input_ids=batch.input_ids,
        position_ids=batch.position_ids,
        use_cache=False,
        attention_metadata=metadata,
    ).last_hidden_state[0]
    checkpointed_cross_entropy(hidden, model.lm_head, batch.labels[0], chunk)[0].backward()
    for name, parameter in model.named_parameters():
        torch.testing.assert_close(fused[name], parameter.grad, **EXACT, msg=name)
