"""One packed row's loss: evotune's forward of the base model, then the family's head.

The base model runs once per micro-batch with the row's attention metadata (built
here, on the host, before the forward; see attention.py). The LM head, the
family's logit transform (families.py) and an fp32 cross-entropy then run on
``chunk_size`` positions at a time under activation checkpointing, so a long row
never holds full fp32 logits: only one chunk's logits exist at any moment, in the
forward and in the backward. Labels are pre-shifted (labels[t] is the target of
position t), so nothing is shifted again here. MoE families add their router
load-balancing term (families.router_aux_loss) as ``PackedLoss.aux_loss``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from ..data.packing import IGNORE_INDEX
from .attention import AttentionMetadata, kernel_of
from .families import attention_needs, logit_transform, router_aux_loss, router_loss_of

LogitFn = Callable[[torch.Tensor], torch.Tensor]


def _chunk_loss_sum(
    lm_head: torch.nn.Module,
    hidden: torch.Tensor,
    labels: torch.Tensor,
    transform: LogitFn | None,
) -> torch.Tensor:
    logits = lm_head(hidden).float()
    if transform is not None:
        logits = transform(logits)
    return F.cross_entropy(logits, labels, ignore_index=IGNORE_INDEX, reduction="sum")


def chunked_cross_entropy_sum(
    hidden: torch.Tensor,
    lm_head: torch.nn.Module,
    labels: torch.Tensor,
    chunk_size: int = 4096,
    logit_transform: LogitFn | None = None,
) -> torch.Tensor:
    """Sum of fp32 token cross-entropies over positions whose label is not -100.

    ``hidden``: (tokens, hidden_size) final hidden states; ``labels``: (tokens,)
    targets already aligned with positions (labels[t] is the target of position t);
    ``logit_transform``: applied to the fp32 logits before the softmax.
    """
    hidden = hidden.reshape(-1, hidden.shape[-1])
    labels = labels.reshape(-1)
    total = hidden.new_zeros((), dtype=torch.float32)
    for start in range(0, labels.shape[0], chunk_size):
        chunk_labels = labels[start : start + chunk_size]
        chunk_hidden = hidden[start : start + chunk_size]
        if torch.is_grad_enabled() and chunk_hidden.requires_grad:
            total = total + checkpoint(
                _chunk_loss_sum,
                lm_head,
                chunk_hidden,
                chunk_labels,
                logit_transform,
                use_reentrant=False,
            )
        else:
            total = total + _chunk_loss_sum(lm_head, chunk_hidden, chunk_labels, logit_transform)
    return total


class PackedLoss(NamedTuple):
    """What one micro-batch's forward hands the engine.

    ``loss_sum``: fp32 sum of token cross-entropies over the row's trainable labels
    (this rank's slice under sequence parallelism). ``aux_loss``: a term added to
    the objective as is (already multiplied by its coefficient, e.g. an MoE router
    load-balancing loss), or None for dense models.
    """

    loss_sum: torch.Tensor
    aux_loss: torch.Tensor | None = None


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
    loss_sum = chunked_cross_entropy_sum(
        outputs.last_hidden_state[0],
        hf.get_output_embeddings(),
        batch.labels[0],
        chunk_size=chunk_size,
        logit_transform=transform,
    )
    aux_loss = None
    if router is not None:
        aux_loss = router_aux_loss(
            outputs.router_logits, router, batch.type_ids[0] >= 0, sequence_parallel
        )
    return PackedLoss(loss_sum, aux_loss)


def packed_loss_sum(
    model: torch.nn.Module,
    batch: Any,
    chunk_size: int = 4096,
    sequence_parallel: Any = None,
) -> torch.Tensor:
    """The fp32 loss sum of one packed row (``packed_loss`` without the auxiliary term)."""
    return packed_loss(model, batch, chunk_size, sequence_parallel).loss_sum
