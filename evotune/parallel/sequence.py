"""Ulysses sequence parallelism, exact with packed rows (docs/training.md#sequence-parallelism).

Each rank of a sequence-parallel group keeps one contiguous 1/sp slice of the
row. Labels are already shifted per position, so no target is lost at a slice
edge. Around attention, an all-to-all turns (heads, seq/sp) into (heads/sp, seq);
the kernel then sees the whole row with its GLOBAL segment boundaries, so no
sample attends to another; a second all-to-all turns the output back.

The object travels to the attention function as a forward keyword argument
(``sequence_parallel=``); nothing is global.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import torch
import torch.distributed as dist

from ..config import ConfigError
from ..data.collate import PackedBatch
from ..data.packing import IGNORE_INDEX
from ..data.sampler import SequenceParallelSampler

__all__ = ["SequenceParallel", "SequenceParallelSampler", "check_heads"]

PAD_TOKEN_ID = 0


# -- layout helpers (pure; the all-to-all exchanges dim 0 chunks between ranks) ----------


def seq_to_head_send(x: torch.Tensor, sp: int) -> torch.Tensor:
    """(heads, local_tokens, dim) -> (sp, heads/sp, local_tokens, dim): chunk j goes to rank j."""
    heads, tokens, dim = x.shape
    return x.reshape(sp, heads // sp, tokens, dim).contiguous()


def seq_to_head_receive(received: torch.Tensor) -> torch.Tensor:
    """(sp, heads/sp, local_tokens, dim) from every rank -> (heads/sp, tokens, dim)."""
    sp, heads, tokens, dim = received.shape
    return received.permute(1, 0, 2, 3).reshape(heads, sp * tokens, dim)


def head_to_seq_send(y: torch.Tensor, sp: int) -> torch.Tensor:
    """(heads/sp, tokens, dim) -> (sp, heads/sp, tokens/sp, dim): token slice j goes to rank j."""
    heads, tokens, dim = y.shape
    return y.reshape(heads, sp, tokens // sp, dim).permute(1, 0, 2, 3).contiguous()


def head_to_seq_receive(received: torch.Tensor) -> torch.Tensor:
    """(sp, heads/sp, local_tokens, dim) from every rank -> (heads, local_tokens, dim)."""
    sp, heads, tokens, dim = received.shape
    return received.reshape(sp * heads, tokens, dim)


def _all_to_all(x: torch.Tensor, group: Any) -> torch.Tensor:
    output = torch.empty_like(x)
    dist.all_to_all_single(output, x, group=group)
    return output


class _SeqToHead(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, sp: int, group: Any) -> torch.Tensor:
        ctx.sp, ctx.group = sp, group
        return seq_to_head_receive(_all_to_all(seq_to_head_send(x, sp), group))

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return (
            head_to_seq_receive(_all_to_all(head_to_seq_send(grad, ctx.sp), ctx.group)),
            None,
            None,
        )


class _HeadToSeq(torch.autograd.Function):
    @staticmethod
    def forward(ctx, y: torch.Tensor, sp: int, group: Any) -> torch.Tensor:
        ctx.sp, ctx.group = sp, group
        return head_to_seq_receive(_all_to_all(head_to_seq_send(y, sp), group))

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return (
            seq_to_head_receive(_all_to_all(seq_to_head_send(grad, ctx.sp), ctx.group)),
            None,
            None,
        )


def check_heads(num_heads: int, num_kv_heads: int, sp: int) -> None:
    if sp > 1 and num_heads % sp:
        raise ConfigError(
            f"sequence_parallel_size={sp} must divide the model's num_attention_heads "
            f"({num_heads}); choose a divisor of the head count"
        )
    del num_kv_heads  # fewer KV heads than sp are repeated, any count works


@dataclass
class SequenceParallel:
    """One sequence-parallel group: slices rows and runs attention over the full row."""

    size: int
    rank: int
    group: Any

    def split(self, batch: PackedBatch) -> PackedBatch:
        """Pad the row to a multiple of sp (a segment of ignored tokens) and keep this rank's slice."""
        tokens = batch.num_tokens
        pad = (-tokens) % self.size
        input_ids, labels, positions, types = (
            batch.input_ids,
            batch.labels,
            batch.position_ids,
            batch.type_ids,
        )
        cu_seqlens = batch.cu_seqlens
        bounds = batch.segment_bounds
        if pad:

            def extend(row: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
                return torch.cat([row, values.to(row.dtype).unsqueeze(0)], dim=1)

            input_ids = extend(input_ids, torch.full((pad,), PAD_TOKEN_ID))
            labels = extend(labels, torch.full((pad,), IGNORE_INDEX))
            positions = extend(positions, torch.arange(pad))
            types = extend(types, torch.full((pad,), -1))
            cu_seqlens = torch.cat([cu_seqlens, cu_seqlens.new_tensor([tokens + pad])])
            bounds = None if bounds is None else (*bounds, tokens + pad)
        width = (tokens + pad) // self.size
        window = slice(self.rank * width, (self.rank + 1) * width)
        return PackedBatch(
            input_ids=input_ids[:, window],
            labels=labels[:, window],
            position_ids=positions[:, window],
            cu_seqlens=cu_seqlens,
            max_seqlen=max(batch.max_seqlen, pad),
            type_ids=types[:, window],
            num_packs=batch.num_packs,
            segment_bounds=bounds,
        )

    def attention(
        self,
        kernel: Callable[..., torch.Tensor],
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        metadata: Any,
        call: Any,
    ) -> torch.Tensor:
        """q, k, v: (heads, local_tokens, dim) -> output (local_tokens, heads, dim).

        ``metadata`` describes the whole row (global segment bounds); ``call`` is the
        layer's request (scale, window, softcap, sinks); sinks are per query head, so
        this rank keeps the sinks of its own head slice.
        """
        heads, kv_heads = q.shape[0], k.shape[0]
        if kv_heads % self.size:
            # too few KV heads to split: give every query head its own copy first
            groups = heads // kv_heads
            k, v = k.repeat_interleave(groups, dim=0), v.repeat_interleave(groups, dim=0)
        q_full = _SeqToHead.apply(q, self.size, self.group)
        k_full = _SeqToHead.apply(k, self.size, self.group)
        v_full = _SeqToHead.apply(v, self.size, self.group)
        if call.sinks is not None:
            local_heads = heads // self.size
            sinks = call.sinks[self.rank * local_heads : (self.rank + 1) * local_heads]
            call = replace(call, sinks=sinks)
        output = kernel(q_full[None], k_full[None], v_full[None], metadata, call)[0]
        local = _HeadToSeq.apply(output.transpose(0, 1), self.size, self.group)
        return local.transpose(0, 1)
