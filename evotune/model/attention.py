"""Variable-length attention plugged into transformers' attention interface.

evotune registers one attention function per kernel ("evotune_sdpa", ...). A
packed row's attention metadata is built ONCE per micro-batch, on the host,
before the forward (``AttentionMetadata.for_batch``): int32 cu_seqlens and
max_seqlen for the varlen kernels, the segment bounds as Python ints for the
per-segment SDPA kernel, and one mask per sliding window for the kernels that
take masks (the FlexAttention BlockMask, the eager row mask). It reaches every
layer as one forward keyword (``attention_metadata=``), which transformers hands
to the attention function untouched: no global state, no monkey-patching, and no
kernel reads cu_seqlens back to the host (no device sync inside the model).

Every kernel attends causally inside each segment and never across segments,
and honours what the layer asks for through transformers' keywords:
``scaling``; ``sliding_window`` (Hugging Face's meaning: a query sees itself
and the ``sliding_window - 1`` tokens before it, ``q - kv < window``);
``softcap`` (attention logit softcapping, Gemma 2); ``s_aux`` (learned
attention sinks, gpt-oss). A kernel that cannot honour a request is refused
when the kernel is chosen (``resolve_kernel``) and again if a layer asks for it.

Kernels (q, k, v: (1, heads, tokens, head_dim) -> (1, tokens, heads, head_dim)):

* sdpa: one 4-D SDPA call per segment (4-D so PyTorch's CPU flash kernel runs;
  3-D input falls back to the math kernel). Windows shorter than a segment use a
  band mask; softcapping and sinks use an exact per-segment softmax. Any device.
* eager: one masked softmax over the whole row; the reference (O(T^2) memory).
* flex_attention: FlexAttention with one BlockMask per window (compiled on CUDA;
  PyTorch has no FlexAttention backward on CPU).
* varlen: ``torch.nn.attention.varlen.varlen_attn`` (flash-attention inside
  PyTorch >= 2.10 CUDA builds), one call per layer; the CUDA default.
* flash_attention_2: the flash-attn package's ``flash_attn_varlen_func``.
"""

from __future__ import annotations

import functools
import importlib.util
import itertools
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from transformers import AttentionInterface

from ..config.schema import ATTN_IMPLEMENTATIONS

KERNELS = tuple(name for name in ATTN_IMPLEMENTATIONS if name != "auto")
NAME_PREFIX = "evotune_"


class MissingAttentionMetadata(RuntimeError):
    """evotune's attention ran without the per-micro-batch metadata."""


# -- what a layer asks for and what a model needs ------------------------------------------


@dataclass(frozen=True)
class AttentionCall:
    """One layer's request, from the keywords transformers passes to the function."""

    scale: float
    window: int | None = None  # HF sliding_window: q sees kv when 0 <= q - kv < window
    softcap: float | None = None
    sinks: torch.Tensor | None = None  # (heads,) learned sink logits, one per query head


@dataclass(frozen=True)
class AttentionNeeds:
    """What a model's layers will ask the kernel for (derived from its config)."""

    windows: frozenset[int | None] = frozenset({None})
    softcap: bool = False
    sinks: bool = False
    head_dim: int = 64  # the larger of the query/key and value head sizes


@dataclass(frozen=True)
class KernelSupport:
    devices: frozenset[str]
    softcap: bool
    sinks: bool
    half_precision_only: bool = False  # flash kernels: fp16/bf16 inputs only
    max_head_dim: int | None = None
    cpu_backward: bool = True


SUPPORT = {
    "sdpa": KernelSupport(frozenset({"cpu", "cuda"}), softcap=True, sinks=True),
    "eager": KernelSupport(frozenset({"cpu", "cuda"}), softcap=True, sinks=True),
    "flex_attention": KernelSupport(
        frozenset({"cpu", "cuda"}), softcap=True, sinks=True, cpu_backward=False
    ),
    "varlen": KernelSupport(
        frozenset({"cuda"}), softcap=False, sinks=False, half_precision_only=True, max_head_dim=256
    ),
    "flash_attention_2": KernelSupport(
        frozenset({"cuda"}), softcap=True, sinks=False, half_precision_only=True, max_head_dim=256
    ),
}


def flash_attn_available() -> bool:
    return torch.cuda.is_available() and importlib.util.find_spec("flash_attn") is not None


def varlen_attn_available() -> bool:
    """torch.nn.attention.varlen (PyTorch >= 2.10) on a GPU with flash-attention (sm80+)."""
    if not torch.cuda.is_available():
        return False
    try:
        from torch.nn.attention.varlen import varlen_attn  # noqa: F401
    except ImportError:
        return False
    return torch.cuda.get_device_capability() >= (8, 0)


def _unavailable(kernel: str) -> str | None:
    if kernel == "varlen" and not varlen_attn_available():
        return (
            "needs a CUDA GPU with compute capability >= 8.0 and PyTorch >= 2.10 "
            "(torch.nn.attention.varlen)"
        )
    if kernel == "flash_attention_2" and not flash_attn_available():
        return "needs a CUDA device and the flash-attn package"
    return None


def kernel_problem(
    kernel: str,
    device: torch.device,
    needs: AttentionNeeds,
    compute_dtype: torch.dtype | None,
    training: bool = True,
) -> str | None:
    """Why ``kernel`` cannot run this model exactly here, or None when it can."""
    support = SUPPORT[kernel]
    if device.type not in support.devices:
        return f"runs on {' or '.join(sorted(support.devices))} only, not {device.type}"
    if needs.softcap and not support.softcap:
        return "cannot apply attention logit softcapping (the model sets attn_logit_softcapping)"
    if needs.sinks and not support.sinks:
        return "cannot apply learned attention sinks (the model's attention has sinks)"
    if support.half_precision_only and compute_dtype not in (torch.float16, torch.bfloat16):
        return f"needs float16/bfloat16 activations, not {compute_dtype}; use dtype='bfloat16'"
    if support.max_head_dim is not None and (
        needs.head_dim > support.max_head_dim or needs.head_dim % 8
    ):
        return f"needs a head size that is a multiple of 8 and <= 256, not {needs.head_dim}"
    missing = _unavailable(kernel)
    if missing:
        return missing
    if training and device.type == "cpu" and not support.cpu_backward:
        return "has no backward on CPU in PyTorch; train on CPU with 'sdpa' (flex works on CUDA)"
    return None


def resolve_kernel(
    requested: str,
    device: torch.device,
    training: bool = True,
    needs: AttentionNeeds | None = None,
    compute_dtype: torch.dtype | None = None,
) -> str:
    """The kernel to use. 'auto': varlen, then flash-attn, then SDPA on CUDA; SDPA on CPU.

    Raises ValueError with the reason when an explicitly requested kernel cannot run.
    """
    needs = needs or AttentionNeeds()
    compute_dtype = compute_dtype or torch.float32
    if requested == "auto":
        order = ("varlen", "flash_attention_2", "sdpa") if device.type == "cuda" else ("sdpa",)
        for kernel in order:
            if kernel_problem(kernel, device, needs, compute_dtype, training) is None:
                return kernel
        return "eager"
    if requested not in KERNELS:
        raise ValueError(f"attn_implementation={requested!r}: choose auto or one of {KERNELS}")
    problem = kernel_problem(requested, device, needs, compute_dtype, training)
    if problem:
        raise ValueError(f"attn_implementation={requested!r} {problem}")
    return requested


def attention_name(kernel: str) -> str:
    return f"{NAME_PREFIX}{kernel}"


def kernel_of(model_config: Any) -> str:
    """The evotune kernel a model was loaded with (from config._attn_implementation)."""
    name = getattr(model_config, "_attn_implementation", None) or ""
    kernel = name.removeprefix(NAME_PREFIX)
    if not name.startswith(NAME_PREFIX) or kernel not in KERNELS:
        raise ValueError(
            f"the model uses attn_implementation={name!r}, not one of evotune's varlen kernels; "
            "load it with evotune.model.load_model (or set config._attn_implementation to "
            "attention_name(kernel) after register_attention())"
        )
    return kernel


# -- metadata: built once per micro-batch -----------------------------------------------------


def _band(size: int, window: int | None) -> np.ndarray:
    """(size, size) causal mask, limited to the last ``window`` keys when given."""
    index = np.arange(size)
    distance = index[:, None] - index[None, :]
    allowed = distance >= 0
    if window is not None:
        allowed &= distance < window
    return allowed


class AttentionMetadata:
    """Everything the kernels need about one packed row; built on the host, once.

    ``cu_seqlens``: int32 on the device; ``max_seqlen``: int; ``segments``: the
    (start, end) pairs as Python ints; per window, the mask the kernel consumes
    (the same-segment causal BlockMask for flex, a (T, T) boolean mask for eager,
    a (max_seqlen, max_seqlen) band for SDPA segments that need one).
    """

    def __init__(
        self,
        kernel: str,
        bounds: Sequence[int],
        device: torch.device | str,
        needs: AttentionNeeds | None = None,
        cu_seqlens: torch.Tensor | None = None,
    ):
        if kernel not in KERNELS:
            raise ValueError(f"unknown kernel {kernel!r}")
        needs = needs or AttentionNeeds()
        self.kernel = kernel
        self.device = torch.device(device)
        self.bounds = tuple(int(b) for b in bounds)
        self.segments = tuple(
            (start, end) for start, end in itertools.pairwise(self.bounds) if end > start
        )
        self.num_tokens = self.bounds[-1]
        self.max_seqlen = max((end - start for start, end in self.segments), default=0)
        if cu_seqlens is None:
            cu_seqlens = torch.tensor(self.bounds, dtype=torch.int32)
        self.cu_seqlens = cu_seqlens.to(device=self.device, dtype=torch.int32, non_blocking=True)
        self.windows = frozenset(needs.windows)
        self._masks: dict[int | None, Any] = {}
        if kernel == "eager":
            self._masks = {w: self._row_mask(w) for w in self.windows}
        elif kernel == "flex_attention":
            self._masks = {w: self._block_mask(w) for w in self.windows}
        elif kernel == "sdpa":
            dense = needs.softcap or needs.sinks
            for window in self.windows:
                if dense or (window is not None and self.max_seqlen > window):
                    band = _band(self.max_seqlen, window)
                    self._masks[window] = torch.from_numpy(band).to(self.device)

    @classmethod
    def for_batch(
        cls, batch: Any, kernel: str, needs: AttentionNeeds | None = None
    ) -> AttentionMetadata:
        """From a PackedBatch already on its device; bounds come from the host copy."""
        bounds = batch.segment_bounds
        if bounds is None:  # built by hand on the device: one read, before the forward
            bounds = tuple(batch.cu_seqlens.tolist())
        return cls(kernel, bounds, batch.input_ids.device, needs, cu_seqlens=batch.cu_seqlens)

    def mask(self, window: int | None) -> Any:
        if window not in self.windows:
            raise ValueError(
                f"a layer asked for sliding_window={window} but the attention metadata was "
                f"built for windows {sorted(self.windows, key=str)}; build it with the model's "
                "AttentionNeeds (evotune.model.families.attention_needs)"
            )
        return self._masks.get(window)

    def _segment_ids(self) -> np.ndarray:
        lengths = [end - start for start, end in itertools.pairwise(self.bounds)]
        return np.repeat(np.arange(len(lengths)), lengths)

    def _row_mask(self, window: int | None) -> torch.Tensor:
        segment = self._segment_ids()
        same = segment[:, None] == segment[None, :]
        return torch.from_numpy(same & _band(self.num_tokens, window)).to(self.device)

    def _block_mask(self, window: int | None) -> Any:
        from torch.nn.attention.flex_attention import create_block_mask

        segment = torch.from_numpy(self._segment_ids()).to(self.device)

        def same_segment_causal(batch, head, q_index, kv_index):
            allowed = (segment[q_index] == segment[kv_index]) & (q_index >= kv_index)
            if window is not None:
                allowed = allowed & (q_index - kv_index < window)
            return allowed

        tokens = self.num_tokens
        on_cuda = self.device.type == "cuda"
        return create_block_mask(
            same_segment_causal, None, None, tokens, tokens, device=self.device, _compile=on_cuda
        )


# -- kernels --------------------------------------------------------------------------------


def _repeat_kv(x: torch.Tensor, heads: int) -> torch.Tensor:
    groups = heads // x.shape[1]
    return x if groups == 1 else x.repeat_interleave(groups, dim=1)


def masked_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, allowed: torch.Tensor, call: AttentionCall
) -> torch.Tensor:
    """Exact softmax attention with softcap and sinks; (1, H, L, D) -> (1, H, L, Dv)."""
    k, v = _repeat_kv(k, q.shape[1]), _repeat_kv(v, q.shape[1])
    scores = torch.matmul(q, k.transpose(-1, -2)) * call.scale
    if call.softcap:
        scores = call.softcap * torch.tanh(scores / call.softcap)
    scores = scores.masked_fill(~allowed, float("-inf"))
    if call.sinks is not None:
        sink = call.sinks.to(scores.dtype).reshape(1, -1, 1, 1).expand(*scores.shape[:-1], 1)
        scores = torch.cat([scores, sink], dim=-1)
    probabilities = torch.softmax(scores, dim=-1, dtype=torch.float32).to(v.dtype)
    if call.sinks is not None:
        probabilities = probabilities[..., :-1]
    return torch.matmul(probabilities, v)


def sdpa_kernel(q, k, v, metadata: AttentionMetadata, call: AttentionCall) -> torch.Tensor:
    """One 4-D SDPA call per segment: O(segment^2) memory, exact, any device."""
    band = metadata.mask(call.window)
    exact_softmax = bool(call.softcap) or call.sinks is not None
    gqa = q.shape[1] != k.shape[1]
    outputs = []
    for start, end in metadata.segments:
        length = end - start
        qs, ks, vs = q[:, :, start:end], k[:, :, start:end], v[:, :, start:end]
        if exact_softmax:
            outputs.append(masked_attention(qs, ks, vs, band[:length, :length], call))
        elif call.window is not None and length > call.window:
            outputs.append(
                F.scaled_dot_product_attention(
                    qs, ks, vs, attn_mask=band[:length, :length], scale=call.scale, enable_gqa=gqa
                )
            )
        else:
            outputs.append(
                F.scaled_dot_product_attention(
                    qs, ks, vs, is_causal=True, scale=call.scale, enable_gqa=gqa
                )
            )
    return torch.cat(outputs, dim=2).transpose(1, 2)


def eager_kernel(q, k, v, metadata: AttentionMetadata, call: AttentionCall) -> torch.Tensor:
    """Reference: one masked softmax over the whole row (O(T^2) memory)."""
    return masked_attention(q, k, v, metadata.mask(call.window), call).transpose(1, 2)


@functools.cache
def _compiled_flex() -> Callable[..., torch.Tensor]:
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=True)


def flex_kernel(q, k, v, metadata: AttentionMetadata, call: AttentionCall) -> torch.Tensor:
    """FlexAttention with the row's prepared BlockMask (compiled on CUDA)."""
    from torch.nn.attention.flex_attention import flex_attention

    score_mod = None
    if call.softcap:
        cap = call.softcap

        def score_mod(score, batch, head, q_index, kv_index):
            return cap * torch.tanh(score / cap)

    attend: Callable[..., Any] = _compiled_flex() if q.device.type == "cuda" else flex_attention  # type: ignore[assignment]
    sink_options: dict[str, Any] = {}
    if call.sinks is not None:  # the row's log-sum-exp rescales the output for the sinks
        try:
            from torch.nn.attention.flex_attention import AuxRequest

            sink_options = {"return_aux": AuxRequest(lse=True)}
        except ImportError:  # PyTorch < 2.9
            sink_options = {"return_lse": True}
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*flex_attention called without torch.compile.*")
        warnings.filterwarnings("ignore", category=UserWarning, module=".*flex_attention.*")
        result = attend(
            q,
            k,
            v,
            score_mod=score_mod,
            block_mask=metadata.mask(call.window),
            scale=call.scale,
            enable_gqa=q.shape[1] != k.shape[1],
            **sink_options,
        )
    if call.sinks is None:
        return result.transpose(1, 2)
    output, aux = result
    lse = aux if isinstance(aux, torch.Tensor) else aux.lse
    # a sink adds exp(sink) to each row's softmax denominator: rescale by Z / (Z + e^sink)
    keep = torch.sigmoid(lse.float() - call.sinks.float().reshape(1, -1, 1))
    return (output * keep.unsqueeze(-1).to(output.dtype)).transpose(1, 2)


def _flat(x: torch.Tensor, head_dim: int | None = None) -> torch.Tensor:
    """(1, H, T, D) -> contiguous (T, H, D), zero-padded to ``head_dim`` when given."""
    flat = x[0].transpose(0, 1)
    if head_dim is not None and flat.shape[-1] < head_dim:
        flat = F.pad(flat, (0, head_dim - flat.shape[-1]))
    return flat.contiguous()


def _check_half_precision(q: torch.Tensor, kernel: str) -> None:
    if q.dtype not in (torch.float16, torch.bfloat16):
        raise ValueError(
            f"attn_implementation={kernel!r} needs float16/bfloat16 activations, got {q.dtype}; "
            "train with dtype='bfloat16' or use 'sdpa'"
        )


def varlen_kernel(q, k, v, metadata: AttentionMetadata, call: AttentionCall) -> torch.Tensor:
    """torch.nn.attention.varlen.varlen_attn: one flash-attention call for the row."""
    from torch.nn.attention.varlen import varlen_attn

    _check_half_precision(q, "varlen")
    if call.softcap or call.sinks is not None:
        raise ValueError(
            "attn_implementation='varlen' cannot apply attention softcapping or sinks; "
            "use 'flash_attention_2', 'flex_attention' or 'sdpa'"
        )
    head_dim, value_dim = q.shape[-1], v.shape[-1]
    # flash wants one head size; MLA's smaller value heads are zero-padded, then cut
    window = (-1, 0) if call.window is None else (call.window - 1, 0)
    output: torch.Tensor = varlen_attn(  # type: ignore[assignment]  # a tensor without return_aux
        _flat(q),
        _flat(k),
        _flat(v, head_dim),
        metadata.cu_seqlens,
        metadata.cu_seqlens,
        metadata.max_seqlen,
        metadata.max_seqlen,
        scale=call.scale,
        window_size=window,
        enable_gqa=q.shape[1] != k.shape[1],
    )
    return output[..., :value_dim].unsqueeze(0)


def flash_kernel(q, k, v, metadata: AttentionMetadata, call: AttentionCall) -> torch.Tensor:
    """flash-attn's flash_attn_varlen_func (GQA native, windows and softcapping)."""
    from flash_attn import flash_attn_varlen_func

    _check_half_precision(q, "flash_attention_2")
    if call.sinks is not None:
        raise ValueError(
            "attn_implementation='flash_attention_2' cannot apply attention sinks; "
            "use 'flex_attention' or 'sdpa'"
        )
    head_dim, value_dim = q.shape[-1], v.shape[-1]
    window = (-1, -1) if call.window is None else (call.window - 1, 0)
    output = flash_attn_varlen_func(
        _flat(q),
        _flat(k),
        _flat(v, head_dim),
        metadata.cu_seqlens,
        metadata.cu_seqlens,
        metadata.max_seqlen,
        metadata.max_seqlen,
        causal=True,
        softmax_scale=call.scale,
        window_size=window,
        softcap=call.softcap or 0.0,
    )
    return output[..., :value_dim].unsqueeze(0)


Kernel = Callable[
    [torch.Tensor, torch.Tensor, torch.Tensor, AttentionMetadata, AttentionCall], torch.Tensor
]

KERNEL_FUNCTIONS: dict[str, Kernel] = {
    "sdpa": sdpa_kernel,
    "eager": eager_kernel,
    "flex_attention": flex_kernel,
    "varlen": varlen_kernel,
    "flash_attention_2": flash_kernel,
}


def _make_attention(kernel_name: str) -> Callable[..., tuple[torch.Tensor, None]]:
    kernel = KERNEL_FUNCTIONS[kernel_name]

    def attention(
        module: torch.nn.Module,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: torch.Tensor | None,
        scaling: float | None = None,
        dropout: float = 0.0,
        sliding_window: int | None = None,
        softcap: float | None = None,
        s_aux: torch.Tensor | None = None,
        attention_metadata: AttentionMetadata | None = None,
        sequence_parallel: Any = None,
        **kwargs: Any,
    ) -> tuple[torch.Tensor, None]:
        if attention_metadata is None:
            raise MissingAttentionMetadata(
                f"evotune's {kernel_name!r} attention needs attention_metadata= in the model's "
                "forward (evotune.model.loss.packed_loss builds it once per micro-batch); to "
                "generate or evaluate, load the model with a transformers attention instead"
            )
        if attention_metadata.kernel != kernel_name:
            raise ValueError(
                f"attention metadata built for {attention_metadata.kernel!r} reached the "
                f"{kernel_name!r} kernel; build it with kernel_of(model.config)"
            )
        if kwargs.get("is_causal") is False:
            raise ValueError("evotune's varlen attention is causal; this layer is bidirectional")
        if query.shape[0] != 1:
            raise ValueError("evotune varlen attention expects one flattened row (batch size 1)")
        if dropout:
            raise ValueError("attention dropout is not supported with varlen packing; set it to 0")
        call = AttentionCall(
            scale=scaling if scaling is not None else query.shape[-1] ** -0.5,
            window=sliding_window,
            softcap=softcap or None,
            sinks=s_aux,
        )
        if sequence_parallel is not None:
            output = sequence_parallel.attention(
                kernel, query[0], key[0], value[0], attention_metadata, call
            )
            return output.unsqueeze(0), None
        return kernel(query, key, value, attention_metadata, call), None

    return attention


def register_attention() -> None:
    """Register evotune's varlen functions with transformers (idempotent).

    A registration already made is kept: regional compilation replaces it with a
    wrapper that stays outside the compiled graphs, and a later model load (FSDP2
    loads the weights separately from the model it shards) must not undo that.
    """
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    for kernel_name in KERNEL_FUNCTIONS:
        name = attention_name(kernel_name)
        if name not in ALL_ATTENTION_FUNCTIONS:
            AttentionInterface.register(name, _make_attention(kernel_name))


__all__ = [
    "KERNELS",
    "AttentionCall",
    "AttentionMetadata",
    "AttentionNeeds",
    "MissingAttentionMetadata",
    "attention_name",
    "kernel_of",
    "masked_attention",
    "register_attention",
    "resolve_kernel",
]
