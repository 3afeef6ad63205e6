"""One packed row's loss: evotune's forward of the base model, then the family's head.

The base model runs once per micro-batch with the row's attention metadata (built
here, on the host, before the forward; see attention.py). The LM head, the
family's logit transform (families.py) and an fp32 cross-entropy then run on
``chunk_size`` positions at a time, so a long row never holds full fp32 logits.
Labels are pre-shifted (labels[t] is the target of position t), so nothing is
shifted again here. MoE families add their router load-balancing term
(families.router_aux_loss) as ``PackedLoss.aux_loss``.

The head and the loss are fused (``FusedLinearCrossEntropy``): while each chunk's
logits exist in the forward, the gradient of the chunk's loss w.r.t. its hidden
states and the head's weight (and bias) is computed too, through the logit
transform's derivative; the backward only scales those stored gradients by the
incoming scalar. Nothing is recomputed and full logits never exist. Positions
without a target are skipped when the labels live on the host (CPU training),
where finding them costs no device sync. It replaces activation-checkpointed
chunks, which ran the LM head twice (benchmarks/results/fused_loss_cpu.json).
The checkpointed chunks remain for heads the fused path cannot read directly: a
head that is not a plain ``nn.Linear``, or DeepSpeed ZeRO-3's partitioned
parameters, which are only gathered by the head module's own forward hooks.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from ..data.packing import IGNORE_INDEX
from .attention import AttentionMetadata, kernel_of
from .families import (
    LogitTransform,
    attention_needs,
    logit_transform,
    router_aux_loss,
    router_loss_of,
)

LogitFn = Callable[[torch.Tensor], torch.Tensor]


# -- the fused head and loss ----------------------------------------------------------------


def _transform_with_derivative(
    logits: torch.Tensor, transform: LogitFn | None
) -> tuple[torch.Tensor, Callable[[torch.Tensor], torch.Tensor]]:
    """(transformed logits, a function mapping d loss/d transformed to d loss/d logits).

    A ``LogitTransform`` (scale, divide, softcap) gets its derivative in closed form,
    applied in the forward's order; any other callable goes through autograd on the chunk.
    """
    if transform is None:
        return logits, lambda grad: grad
    if isinstance(transform, LogitTransform):
        scaled = logits
        if transform.multiply is not None:
            scaled = scaled * transform.multiply
        if transform.divide is not None:
            scaled = scaled / transform.divide
        capped = None
        if transform.softcap:
            capped = torch.tanh(scaled / transform.softcap)
            transformed = transform.softcap * capped
        else:
            transformed = scaled

        def chain(grad: torch.Tensor) -> torch.Tensor:
            if capped is not None:  # d/dx cap*tanh(x/cap) = 1 - tanh(x/cap)^2
                grad = grad * (1 - capped * capped)
            if transform.divide is not None:
                grad = grad / transform.divide
            if transform.multiply is not None:
                grad = grad * transform.multiply
            return grad

        return transformed, chain
    with torch.enable_grad():
        source = logits.detach().requires_grad_(True)
        transformed = transform(source)

    def through_autograd(grad: torch.Tensor) -> torch.Tensor:
        (result,) = torch.autograd.grad(transformed, source, grad)
        return result

    return transformed.detach(), through_autograd


def _compute_dtype(weight: torch.Tensor) -> torch.dtype:
    """The dtype F.linear would compute the head in here (autocast's, if active)."""
    device_type = weight.device.type
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return weight.dtype


class FusedLinearCrossEntropy(torch.autograd.Function):
    """Sum of fp32 cross-entropies of ``hidden @ weight.T + bias`` with gradients made in the forward.

    Per chunk of rows: logits in the compute dtype, cast to fp32, the logit
    transform, log-softmax, the loss sum; then d loss/d logits = softmax - onehot
    (zero for ignored rows) through the transform's derivative, multiplied into the
    chunk's hidden-state gradient and accumulated (fp32) into the weight's and
    bias's. ``backward`` scales them by the incoming scalar gradient, once.
    """

    @staticmethod
    def forward(
        ctx: Any,
        hidden: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        labels: torch.Tensor,
        chunk_size: int,
        transform: LogitFn | None,
        make_grads: bool,
        skip_ignored: bool,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        # needs_input_grad ignores no_grad mode; the caller says whether a backward can come
        needs_hidden, needs_weight, needs_bias = (
            make_grads and needed for needed in ctx.needs_input_grad[:3]
        )
        dtype = _compute_dtype(weight)
        rows = None
        if skip_ignored:
            rows = torch.nonzero(labels != IGNORE_INDEX).squeeze(1)
            if rows.numel() == labels.numel():
                rows = None
        work_hidden = hidden if rows is None else hidden.index_select(0, rows)
        work_labels = labels if rows is None else labels.index_select(0, rows)
        work_hidden = work_hidden.to(dtype)
        weight_c = weight.to(dtype)
        bias_c = None if bias is None else bias.to(dtype)
        grad_hidden = torch.zeros_like(work_hidden) if needs_hidden else None
        grad_weight = (
            torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
            if needs_weight
            else None
        )
        grad_bias = (
            torch.zeros(bias.shape, dtype=torch.float32, device=bias.device)
            if needs_bias and bias is not None
            else None
        )
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        token_losses = torch.zeros(work_labels.shape, dtype=torch.float32, device=hidden.device)
        with torch.autocast(hidden.device.type, enabled=False):
            for start in range(0, work_labels.shape[0], chunk_size):
                chunk_hidden = work_hidden[start : start + chunk_size]
                chunk_labels = work_labels[start : start + chunk_size]
                logits = F.linear(chunk_hidden, weight_c, bias_c).float()
                transformed, chain = _transform_with_derivative(logits, transform)
                log_probs = torch.log_softmax(transformed, dim=-1)
                ignored = chunk_labels == IGNORE_INDEX
                targets = chunk_labels.masked_fill(ignored, 0).unsqueeze(1)
                picked = log_probs.gather(1, targets).squeeze(1).masked_fill(ignored, 0.0)
                token_losses[start : start + chunk_size] = -picked
                total -= picked.sum()
                if grad_hidden is None and grad_weight is None and grad_bias is None:
                    continue
                grad = log_probs.exp_()  # softmax, in place of the log-probabilities
                grad.scatter_add_(1, targets, torch.full_like(picked, -1.0).unsqueeze(1))
                if not skip_ignored:  # selected rows all have a target
                    grad.masked_fill_(ignored.unsqueeze(1), 0.0)
                grad = chain(grad)
                grad_c = grad.to(dtype)
                if grad_hidden is not None:
                    grad_hidden[start : start + chunk_size] = grad_c @ weight_c
                if grad_weight is not None:
                    if dtype == torch.float32:
                        grad_weight.addmm_(grad_c.t(), chunk_hidden)
                    else:
                        grad_weight += (grad_c.t() @ chunk_hidden).float()
                if grad_bias is not None:
                    grad_bias += grad.sum(0)
        if grad_hidden is not None:
            if rows is not None:
                grad_hidden = torch.zeros(
                    hidden.shape, dtype=grad_hidden.dtype, device=hidden.device
                ).index_copy_(0, rows, grad_hidden)
            grad_hidden = grad_hidden.to(hidden.dtype)
        ctx.grads = [
            grad_hidden,
            None if grad_weight is None else grad_weight.to(weight.dtype),
            None if grad_bias is None or bias is None else grad_bias.to(bias.dtype),
        ]
        if rows is not None:
            token_losses = torch.zeros(
                labels.shape, dtype=torch.float32, device=hidden.device
            ).index_copy_(0, rows, token_losses)
        ctx.mark_non_differentiable(token_losses)
        return total, token_losses

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, grad_loss: torch.Tensor, _: torch.Tensor) -> tuple[Any, ...]:
        if ctx.grads is None:
            raise RuntimeError(
                "FusedLinearCrossEntropy: the backward ran twice; its stored gradients are "
                "scaled in place and released by the first"
            )
        grads = [None if g is None else g.mul_(grad_loss.to(g.dtype)) for g in ctx.grads]
        ctx.grads = None
        return grads[0], grads[1], grads[2], None, None, None, None, None


def fusable_head(lm_head: torch.nn.Module) -> bool:
    """Whether the fused path may read the head's parameters directly.

    A plain ``nn.Linear`` whose weight is materialised (not a DeepSpeed ZeRO-3
    partition, which only the module's forward hooks gather).
    """
    if type(lm_head) is not torch.nn.Linear:
        return False
    return not any(hasattr(p, "ds_id") for p in lm_head.parameters(recurse=False))


def fused_cross_entropy_sum(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    chunk_size: int = 4096,
    logit_transform: LogitFn | None = None,
    bias: torch.Tensor | None = None,
    skip_ignored: bool | None = None,
) -> torch.Tensor:
    """Fused LM head + fp32 cross-entropy sum (see FusedLinearCrossEntropy)."""
    return fused_cross_entropy(
        hidden, weight, labels, chunk_size, logit_transform, bias, skip_ignored
    )[0]


def fused_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    chunk_size: int = 4096,
    logit_transform: LogitFn | None = None,
    bias: torch.Tensor | None = None,
    skip_ignored: bool | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fused LM head + fp32 cross-entropy: (the sum, each position's loss, detached).

    ``skip_ignored``: compute the head only on positions with a target; None: when the
    labels are on the host, where finding those positions needs no device sync.
    """
    if skip_ignored is None:
        skip_ignored = labels.device.type == "cpu"
    hidden = hidden.reshape(-1, hidden.shape[-1])
    labels = labels.reshape(-1)
    make_grads = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (hidden, weight, bias)
    )
    loss, token_losses = FusedLinearCrossEntropy.apply(
        hidden, weight, bias, labels, chunk_size, logit_transform, make_grads, skip_ignored
    )
    return loss, token_losses


# -- the checkpointed chunks: any head module -----------------------------------------------


def _chunk_losses(
    lm_head: torch.nn.Module,
    hidden: torch.Tensor,
    labels: torch.Tensor,
    transform: LogitFn | None,
) -> torch.Tensor:
    logits = lm_head(hidden).float()
    if transform is not None:
        logits = transform(logits)
    return F.cross_entropy(logits, labels, ignore_index=IGNORE_INDEX, reduction="none")


def checkpointed_cross_entropy(
    hidden: torch.Tensor,
    lm_head: torch.nn.Module,
    labels: torch.Tensor,
    chunk_size: int = 4096,
    logit_transform: LogitFn | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The loss through the head module, each chunk under activation checkpointing.

    The backward runs the head again per chunk; used for heads ``fusable_head`` refuses.
    Returns the sum and each position's loss (detached; 0 without a target).
    """
    hidden = hidden.reshape(-1, hidden.shape[-1])
    labels = labels.reshape(-1)
    total = hidden.new_zeros((), dtype=torch.float32)
    pieces = []
    for start in range(0, labels.shape[0], chunk_size):
        chunk_labels = labels[start : start + chunk_size]
        chunk_hidden = hidden[start : start + chunk_size]
        if torch.is_grad_enabled() and chunk_hidden.requires_grad:
            losses = checkpoint(
                _chunk_losses,
                lm_head,
                chunk_hidden,
                chunk_labels,
                logit_transform,
                use_reentrant=False,
            )
        else:
            losses = _chunk_losses(lm_head, chunk_hidden, chunk_labels, logit_transform)
        total = total + losses.sum()
        pieces.append(losses.detach())
    return total, torch.cat(pieces) if pieces else labels.new_zeros(0, dtype=torch.float32)


def chunked_cross_entropy_sum(
    hidden: torch.Tensor,
    lm_head: torch.nn.Module,
    labels: torch.Tensor,
    chunk_size: int = 4096,
    logit_transform: LogitFn | None = None,
) -> torch.Tensor:
    """Sum of fp32 token cross-entropies over positions whose label is not -100."""
    return chunked_cross_entropy(hidden, lm_head, labels, chunk_size, logit_transform)[0]


def chunked_cross_entropy(
    hidden: torch.Tensor,
    lm_head: torch.nn.Module,
    labels: torch.Tensor,
    chunk_size: int = 4096,
    logit_transform: LogitFn | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 token cross-entropies: (their sum, each position's loss detached, 0 without target).

    ``hidden``: (tokens, hidden_size) final hidden states; ``labels``: (tokens,)
    targets already aligned with positions (labels[t] is the target of position t);
    ``logit_transform``: applied to the fp32 logits before the softmax. The fused
    head and loss when ``fusable_head(lm_head)``, else checkpointed chunks.
    """
    if isinstance(lm_head, torch.nn.Linear) and fusable_head(lm_head):
        return fused_cross_entropy(
            hidden, lm_head.weight, labels, chunk_size, logit_transform, lm_head.bias
        )
    return checkpointed_cross_entropy(hidden, lm_head, labels, chunk_size, logit_transform)


class PackedLoss(NamedTuple):
    """What one micro-batch's forward hands the engine.

    ``loss_sum``: fp32 sum of token cross-entropies over the row's trainable labels
    (this rank's slice under sequence parallelism). ``aux_loss``: a term added to
    the objective as is (already multiplied by its coefficient, e.g. an MoE router
    load-balancing loss), or None for dense models. ``token_losses`` / ``token_types``:
    each position's loss (detached) and data type id, -1 where there is no target (or SP
    padding), for per-type loss sums without a host sync.
    """

    loss_sum: torch.Tensor
    aux_loss: torch.Tensor | None = None
    token_losses: torch.Tensor | None = None
    token_types: torch.Tensor | None = None


def packed_loss(
    model: torch.nn.Module,
    batch: Any,
    chunk_size: int = 4096,
    sequence_parallel: Any = None,
) -> PackedLoss:
    """Forward one packed row; the loss sum and the model's auxiliary loss, if any.

    The base model runs without labels (so transformers never shifts them again)
    and with the row's attention metadata, which reaches evotune's attention
    function as one keyword.
    """
    hf: Any = model  # a transformers PreTrainedModel
    config = hf.config
    metadata = AttentionMetadata.for_batch(batch, kernel_of(config), attention_needs(config))
    router = router_loss_of(model)
    extra = {"output_router_logits": True} if router is not None else {}
    base_model = getattr(hf, hf.base_model_prefix)
    outputs = base_model(
        input_ids=batch.input_ids,
        position_ids=batch.position_ids,
        use_cache=False,
        attention_metadata=metadata,
        sequence_parallel=sequence_parallel,
        **extra,
    )
    transform = logit_transform(config)
    labels = batch.labels[0]
    loss_sum, token_losses = chunked_cross_entropy(
        outputs.last_hidden_state[0],
        hf.get_output_embeddings(),
        labels,
        chunk_size=chunk_size,
        logit_transform=transform,
    )
    token_types = batch.type_ids[0].masked_fill(labels == IGNORE_INDEX, -1)
    aux_loss = None
    if router is not None:
        aux_loss = router_aux_loss(
            outputs.router_logits, router, batch.type_ids[0] >= 0, sequence_parallel
        )
    return PackedLoss(loss_sum, aux_loss, token_losses, token_types)


def packed_loss_sum(
    model: torch.nn.Module,
    batch: Any,
    chunk_size: int = 4096,
    sequence_parallel: Any = None,
) -> torch.Tensor:
    """The fp32 loss sum of one packed row (``packed_loss`` without the auxiliary term)."""
    return packed_loss(model, batch, chunk_size, sequence_parallel).loss_sum
