"""Variable-length attention plugged into transformers' attention interface.

evotune registers one attention function per kernel ("evotune_sdpa", ...). The
model's forward receives the row's segment boundaries as keyword arguments
(``cu_seq_lens_q``/``max_length_q``, the names transformers' flash-attention
path uses) and transformers hands them to the attention function untouched, so
no global state and no monkey-patching is involved. Every kernel attends causally
inside each segment and never across segments. An optional ``sequence_parallel``
keyword wraps the kernel in Ulysses all-to-alls (evotune.parallel.sequence).

Without ``cu_seq_lens_q`` (generation, evaluation by other code) the functions
fall back to plain causal SDPA with transformers' own mask.
"""

from __future__ import annotations

import functools
import importlib.util
import itertools
import warnings
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward

KERNELS = ("sdpa", "flex_attention", "eager", "flash_attention_2")

# q, k, v: (heads, tokens, head_dim) for one row; returns (tokens, heads, head_dim)
Kernel = Callable[
    [torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, int, float], torch.Tensor
]


def flash_attn_available() -> bool:
    return torch.cuda.is_available() and importlib.util.find_spec("flash_attn") is not None


def resolve_kernel(requested: str, device: torch.device, training: bool = True) -> str:
    """'auto' -> flash-attn varlen on CUDA when installed, else SDPA."""
    if requested == "flex_attention" and device.type == "cpu" and training:
        raise ValueError(
            "attn_implementation='flex_attention': FlexAttention has no backward on CPU in "
            "PyTorch; train on CPU with 'sdpa' (flex works on CUDA)"
        )
    if requested == "auto":
        return "flash_attention_2" if device.type == "cuda" and flash_attn_available() else "sdpa"
    if requested == "flash_attention_2" and not flash_attn_available():
        raise ValueError(
            "attn_implementation='flash_attention_2' needs a CUDA device and the flash-attn "
            "package; install flash-attn or use 'sdpa'"
        )
    if requested not in KERNELS:
        raise ValueError(f"attn_implementation={requested!r}: choose auto or one of {KERNELS}")
    return requested


def attention_name(kernel: str) -> str:
    return f"evotune_{kernel}"


def _expand_kv(
    key: torch.Tensor, value: torch.Tensor, heads: int
) -> tuple[torch.Tensor, torch.Tensor]:
    groups = heads // key.shape[0]
    if groups == 1:
        return key, value
    return key.repeat_interleave(groups, dim=0), value.repeat_interleave(groups, dim=0)


def sdpa_kernel(q, k, v, cu_seqlens, max_seqlen, scale):
    """SDPA per segment: O(segment^2) memory, exact, any device."""
    k, v = _expand_kv(k, v, q.shape[0])
    bounds = cu_seqlens.tolist()
    outputs = []
    for start, end in itertools.pairwise(bounds):
        outputs.append(
            F.scaled_dot_product_attention(
                q[:, start:end], k[:, start:end], v[:, start:end], is_causal=True, scale=scale
            )
        )
    return torch.cat(outputs, dim=1).transpose(0, 1)


def eager_kernel(q, k, v, cu_seqlens, max_seqlen, scale):
    """Reference: one masked softmax over the whole row (O(T^2) memory)."""
    k, v = _expand_kv(k, v, q.shape[0])
    tokens = q.shape[1]
    segment = _segment_ids(cu_seqlens, tokens)
    index = torch.arange(tokens, device=q.device)
    allowed = (segment[:, None] == segment[None, :]) & (index[:, None] >= index[None, :])
    scores = torch.matmul(q, k.transpose(-1, -2)).float() * scale
    scores = scores.masked_fill(~allowed, float("-inf"))
    probabilities = torch.softmax(scores, dim=-1).to(v.dtype)
    return torch.matmul(probabilities, v).transpose(0, 1)


@functools.cache
def _compiled_flex() -> Callable[..., torch.Tensor]:
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=True)


def flex_kernel(q, k, v, cu_seqlens, max_seqlen, scale):
    """FlexAttention with a same-segment causal block mask (compiled on CUDA)."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    tokens = q.shape[1]
    segment = _segment_ids(cu_seqlens, tokens)

    def same_segment_causal(batch, head, q_index, kv_index):
        return (segment[q_index] == segment[kv_index]) & (q_index >= kv_index)

    on_cuda = q.device.type == "cuda"
    block_mask = create_block_mask(
        same_segment_causal, None, None, tokens, tokens, device=q.device, _compile=on_cuda
    )
    attend = _compiled_flex() if on_cuda else flex_attention
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*flex_attention called without torch.compile.*")
        warnings.filterwarnings("ignore", category=UserWarning, module=".*flex_attention.*")
        output = attend(
            q.unsqueeze(0),
            k.unsqueeze(0),
            v.unsqueeze(0),
            block_mask=block_mask,
            scale=scale,
            enable_gqa=q.shape[0] != k.shape[0],
        )
    return output.squeeze(0).transpose(0, 1)


def flash_kernel(q, k, v, cu_seqlens, max_seqlen, scale):
    from flash_attn import flash_attn_varlen_func

    cu = cu_seqlens.to(torch.int32)
    return flash_attn_varlen_func(
        q.transpose(0, 1).contiguous(),
        k.transpose(0, 1).contiguous(),
        v.transpose(0, 1).contiguous(),
        cu,
        cu,
        max_seqlen,
        max_seqlen,
        causal=True,
        softmax_scale=scale,
    )


def _segment_ids(cu_seqlens: torch.Tensor, tokens: int) -> torch.Tensor:
    lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).to(torch.long)
    return torch.repeat_interleave(torch.arange(len(lengths), device=cu_seqlens.device), lengths)[
        :tokens
    ]


KERNEL_FUNCTIONS: dict[str, Kernel] = {
    "sdpa": sdpa_kernel,
    "eager": eager_kernel,
    "flex_attention": flex_kernel,
    "flash_attention_2": flash_kernel,
}


def _make_attention(kernel: Kernel) -> Callable[..., tuple[torch.Tensor, None]]:
    def attention(
        module: torch.nn.Module,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: torch.Tensor | None,
        scaling: float | None = None,
        dropout: float = 0.0,
        cu_seq_lens_q: torch.Tensor | None = None,
        max_length_q: int | None = None,
        sequence_parallel: Any = None,
        **kwargs: Any,
    ) -> tuple[torch.Tensor, None]:
        if cu_seq_lens_q is None:
            return sdpa_attention_forward(
                module,
                query,
                key,
                value,
                attention_mask,
                scaling=scaling,
                dropout=dropout,
                **kwargs,
            )
        if query.shape[0] != 1:
            raise ValueError("evotune varlen attention expects one flattened row (batch size 1)")
        if dropout:
            raise ValueError("attention dropout is not supported with varlen packing; set it to 0")
        scale = scaling if scaling is not None else query.shape[-1] ** -0.5
        q, k, v = query[0], key[0], value[0]  # (heads, tokens, head_dim)
        if sequence_parallel is not None:
            output = sequence_parallel.attention(
                kernel, q, k, v, cu_seq_lens_q, max_length_q, scale
            )
        else:
            output = kernel(q, k, v, cu_seq_lens_q, int(max_length_q or q.shape[1]), scale)
        return output.unsqueeze(0), None

    return attention


def register_attention() -> None:
    """Register evotune's varlen functions with transformers (idempotent)."""
    for kernel_name, kernel in KERNEL_FUNCTIONS.items():
        AttentionInterface.register(attention_name(kernel_name), _make_attention(kernel))
