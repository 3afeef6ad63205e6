"""Chunked fp32 cross-entropy on pre-shifted labels.

The LM head and the softmax run on ``chunk_size`` positions at a time under
activation checkpointing, so a long row never holds full fp32 logits: only one
chunk's logits exist at any moment, in the forward and in the backward.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from ..data.packing import IGNORE_INDEX


def _chunk_loss_sum(
    lm_head: torch.nn.Module, hidden: torch.Tensor, labels: torch.Tensor, softcap: float | None
) -> torch.Tensor:
    logits = lm_head(hidden).float()
    if softcap:
        logits = softcap * torch.tanh(logits / softcap)
    return F.cross_entropy(logits, labels, ignore_index=IGNORE_INDEX, reduction="sum")


def chunked_cross_entropy_sum(
    hidden: torch.Tensor,
    lm_head: torch.nn.Module,
    labels: torch.Tensor,
    chunk_size: int = 4096,
    logit_softcap: float | None = None,
) -> torch.Tensor:
    """Sum of fp32 token cross-entropies over positions whose label is not -100.

    ``hidden``: (tokens, hidden_size) final hidden states; ``labels``: (tokens,)
    targets already aligned with positions (labels[t] is the target of position t).
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
                logit_softcap,
                use_reentrant=False,
            )
        else:
            total = total + _chunk_loss_sum(lm_head, chunk_hidden, chunk_labels, logit_softcap)
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
    batch,
    chunk_size: int = 4096,
    sequence_parallel=None,
) -> PackedLoss:
    """Forward one packed row; the loss sum and the model's auxiliary loss, if any."""
    return PackedLoss(packed_loss_sum(model, batch, chunk_size, sequence_parallel))


def packed_loss_sum(
    model: torch.nn.Module,
    batch,
    chunk_size: int = 4096,
    sequence_parallel=None,
) -> torch.Tensor:
    """Forward one packed row and return the fp32 loss sum over its trainable labels.

    The base model runs without labels (so transformers never shifts them again)
    and with the row's segment boundaries, which reach evotune's attention function.
    """
    base_model = getattr(model, model.base_model_prefix)
    outputs = base_model(
        input_ids=batch.input_ids,
        position_ids=batch.position_ids,
        use_cache=False,
        cu_seq_lens_q=batch.cu_seqlens,
        max_length_q=batch.max_seqlen,
        sequence_parallel=sequence_parallel,
    )
    softcap = getattr(model.config, "final_logit_softcapping", None)
    return chunked_cross_entropy_sum(
        outputs.last_hidden_state[0],
        model.get_output_embeddings(),
        batch.labels[0],
        chunk_size=chunk_size,
        logit_softcap=softcap,
    )
