"""Step metrics: FLOPs that count what really runs, MFU, JSON-lines log."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch

# dense bf16 peak per device (FLOP/s), by a substring of torch.cuda.get_device_name()
PEAK_BF16_FLOPS = {
    "H200": 989e12,
    "H100": 989e12,
    "H800": 989e12,
    "A100": 312e12,
    "A800": 312e12,
    "L40S": 362e12,
    "4090": 165e12,
}


def peak_flops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((flops for key, flops in PEAK_BF16_FLOPS.items() if key in name), None)


def peak_memory_mib(device: torch.device) -> float:
    """Peak GPU memory allocated by torch, or the process's peak RSS on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def transformer_flops(
    config: Any, segment_lengths: list[int], activation_checkpointing: bool = False
) -> float:
    """Training FLOPs of one packed row for a Llama-style decoder.

    Linear layers: 2 FLOPs per weight per token with the real K/V width (GQA).
    Attention: causal work of each segment alone, 2 matmuls of 2*h*L(L+1)/2.
    Backward = 2x forward; activation checkpointing adds one more forward.
    """
    hidden = config.hidden_size
    layers = config.num_hidden_layers
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or hidden // heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    intermediate = config.intermediate_size
    vocab = config.vocab_size
    tokens = sum(segment_lengths)
    q_width, kv_width = heads * head_dim, kv_heads * head_dim
    linear_weights_per_layer = hidden * (2 * q_width + 2 * kv_width) + 3 * hidden * intermediate
    linear = 2 * tokens * (layers * linear_weights_per_layer + hidden * vocab)
    causal_pairs = sum(length * (length + 1) // 2 for length in segment_lengths)
    attention = layers * 2 * (2 * q_width * causal_pairs)
    forward = linear + attention
    return forward * (4 if activation_checkpointing else 3)


class MetricsLog:
    """One JSON object per optimizer step in WORK_DIR/metrics.jsonl (main rank only)."""

    def __init__(self, path: Path | None):
        self.path = path
        # held open for the whole run, closed by close()
        self._handle = open(path, "a", buffering=1) if path is not None else None  # noqa: SIM115

    def write(self, record: dict[str, Any]) -> None:
        if self._handle is None:
            return
        clean = {
            k: (None if isinstance(v, float) and not math.isfinite(v) else v)
            for k, v in record.items()
        }
        self._handle.write(json.dumps(clean) + "\n")

    def close(self) -> None:
        if self._handle is not None:
            self._handle.close()
            self._handle = None
