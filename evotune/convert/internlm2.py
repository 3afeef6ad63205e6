"""InternLM2 / InternEvo weights <-> HF Llama (docs/migration-internevo.md).

InternLM2 maps one-to-one onto Llama: the fused ``wqkv`` is grouped per KV head as
(kv_heads, q_per_kv + 2, head_dim, hidden), so splitting it per group gives
q_proj / k_proj / v_proj; w1 is gate, w3 up, w2 down. Checkpoints written with
InternEvo's ``adapt_hf=False`` store every q/k head with interleaved rotary pairs;
``interleaved_rotary=True`` permutes each head to HF's half-split layout.
``llama_to_internlm2`` is the exact inverse for HF InternLM2 folders.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass

import torch

from ..errors import ConversionError

LAYER_KEY = re.compile(r"^(?:model\.)?(?:layers|blocks)\.(\d+)\.(.+)$")


@dataclass(frozen=True)
class Shape:
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads


def deinterleave_rotary(weight: torch.Tensor, heads: int) -> torch.Tensor:
    """Rows of each head from (x0, y0, x1, y1, ...) to (x0, x1, ..., y0, y1, ...)."""
    rows, columns = weight.shape
    head_dim = rows // heads
    per_head = weight.reshape(heads, head_dim, columns)
    return torch.cat([per_head[:, 0::2], per_head[:, 1::2]], dim=1).reshape(rows, columns)


def split_wqkv(wqkv: torch.Tensor, shape: Shape) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    groups = shape.num_heads // shape.num_kv_heads
    expected = (shape.num_kv_heads * (groups + 2) * shape.head_dim, shape.hidden_size)
    if tuple(wqkv.shape) != expected:
        raise ConversionError(
            f"wqkv has shape {tuple(wqkv.shape)}, expected {expected}; is a tensor-parallel "
            "shard missing, or does model_config.pt belong to another model?"
        )
    grouped = wqkv.reshape(shape.num_kv_heads, groups + 2, shape.head_dim, shape.hidden_size)
    q = grouped[:, :groups].reshape(-1, shape.hidden_size)
    k = grouped[:, groups].reshape(-1, shape.hidden_size)
    v = grouped[:, groups + 1].reshape(-1, shape.hidden_size)
    return q, k, v


def fuse_wqkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, shape: Shape) -> torch.Tensor:
    """Inverse of ``split_wqkv``: q/k/v rows grouped per KV head into one wqkv."""
    groups = shape.num_heads // shape.num_kv_heads
    head_dim, hidden = shape.head_dim, shape.hidden_size
    return torch.cat(
        [
            q.reshape(shape.num_kv_heads, groups, head_dim, hidden),
            k.reshape(shape.num_kv_heads, 1, head_dim, hidden),
            v.reshape(shape.num_kv_heads, 1, head_dim, hidden),
        ],
        dim=1,
    ).reshape(-1, hidden)


_LLAMA_TO_INTERNLM2_LAYER = {
    "self_attn.o_proj.weight": "attention.wo.weight",
    "input_layernorm.weight": "attention_norm.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "mlp.gate_proj.weight": "feed_forward.w1.weight",
    "mlp.up_proj.weight": "feed_forward.w3.weight",
    "mlp.down_proj.weight": "feed_forward.w2.weight",
}


def llama_to_internlm2(
    weights: Mapping[str, torch.Tensor], shape: Shape
) -> dict[str, torch.Tensor]:
    """LlamaForCausalLM names -> the HF InternLM2 layout (model.tok_embeddings, output, wqkv)."""
    top = {
        "model.embed_tokens.weight": "model.tok_embeddings.weight",
        "model.norm.weight": "model.norm.weight",
        "lm_head.weight": "output.weight",
    }
    converted: dict[str, torch.Tensor] = {}
    projections: dict[int, dict[str, torch.Tensor]] = {}
    for name, tensor in weights.items():
        if name.endswith("inv_freq"):
            continue
        if name in top:
            converted[top[name]] = tensor
            continue
        match = LAYER_KEY.match(name.removeprefix("model."))
        if match is None:
            raise ConversionError(f"unexpected tensor {name!r} for an InternLM2 layout")
        layer, rest = int(match.group(1)), match.group(2)
        if rest in (
            "self_attn.q_proj.weight",
            "self_attn.k_proj.weight",
            "self_attn.v_proj.weight",
        ):
            projections.setdefault(layer, {})[rest.split(".")[1][0]] = tensor
        elif rest in _LLAMA_TO_INTERNLM2_LAYER:
            converted[f"model.layers.{layer}.{_LLAMA_TO_INTERNLM2_LAYER[rest]}"] = tensor
        else:
            raise ConversionError(f"{name}: InternLM2 has no place for this tensor")
    for layer, parts in sorted(projections.items()):
        if sorted(parts) != ["k", "q", "v"]:
            raise ConversionError(f"layer {layer}: q_proj, k_proj and v_proj are not all present")
        converted[f"model.layers.{layer}.attention.wqkv.weight"] = fuse_wqkv(
            parts["q"], parts["k"], parts["v"], shape
        )
    return converted


def internlm2_to_llama(
    weights: Mapping[str, torch.Tensor], shape: Shape, interleaved_rotary: bool = False
) -> dict[str, torch.Tensor]:
    """InternLM2 names (with or without a 'model.' prefix) -> LlamaForCausalLM names."""
    converted: dict[str, torch.Tensor] = {}
    for name, tensor in weights.items():
        if name.endswith("inv_freq"):
            continue
        bare = name.removeprefix("model.")
        match = LAYER_KEY.match(bare)
        if match is None:
            top = {
                "tok_embeddings.weight": "model.embed_tokens.weight",
                "norm.weight": "model.norm.weight",
                "output.weight": "lm_head.weight",
            }
            if bare not in top:
                raise ConversionError(f"unexpected tensor {name!r}")
            converted[top[bare]] = tensor
            continue
        layer, rest = int(match.group(1)), match.group(2)
        prefix = f"model.layers.{layer}."
        if rest == "attention.wqkv.weight":
            q, k, v = split_wqkv(tensor, shape)
            if interleaved_rotary:
                q = deinterleave_rotary(q, shape.num_heads)
                k = deinterleave_rotary(k, shape.num_kv_heads)
            converted[prefix + "self_attn.q_proj.weight"] = q
            converted[prefix + "self_attn.k_proj.weight"] = k
            converted[prefix + "self_attn.v_proj.weight"] = v
            continue
        if rest in ("attention.wq.weight", "attention.wk.weight"):  # LLAMA2 layout
            heads = shape.num_heads if rest.endswith("wq.weight") else shape.num_kv_heads
            tensor = deinterleave_rotary(tensor, heads) if interleaved_rotary else tensor
        simple = {
            "attention.wq.weight": "self_attn.q_proj.weight",
            "attention.wk.weight": "self_attn.k_proj.weight",
            "attention.wv.weight": "self_attn.v_proj.weight",
            "attention.wo.weight": "self_attn.o_proj.weight",
            "attention_norm.weight": "input_layernorm.weight",
            "ffn_norm.weight": "post_attention_layernorm.weight",
            "feed_forward.w1.weight": "mlp.gate_proj.weight",
            "feed_forward.w3.weight": "mlp.up_proj.weight",
            "feed_forward.w2.weight": "mlp.down_proj.weight",
        }
        if rest not in simple:
            raise ConversionError(f"unexpected tensor {name!r}")
        converted[prefix + simple[rest]] = tensor
    return converted


_V1_LAYER = {
    "mixer.out_proj.weight": "self_attn.o_proj.weight",
    "mixer.out_proj.bias": "self_attn.o_proj.bias",
    "norm1.weight": "input_layernorm.weight",
    "norm2.weight": "post_attention_layernorm.weight",
    "mlp.w1.weight": "mlp.gate_proj.weight",
    "mlp.up.weight": "mlp.up_proj.weight",
    "mlp.down.weight": "mlp.down_proj.weight",
}
V1_EMBEDDINGS = ("embedding.word_embeddings.weight", "embedding.weight", "tok_embeddings.weight")


def internlm1_to_llama(
    weights: Mapping[str, torch.Tensor], shape: Shape
) -> dict[str, torch.Tensor]:
    """InternLM v1 (merged: Wqkv as (3, heads, head_dim, hidden), MLP roles resolved) -> Llama."""
    converted: dict[str, torch.Tensor] = {}
    for name, tensor in weights.items():
        bare = name.removeprefix("model.")
        match = LAYER_KEY.match(bare)
        if match is None:
            if bare in V1_EMBEDDINGS:
                converted["model.embed_tokens.weight"] = tensor
            elif bare in ("norm.weight", "head.weight"):
                converted["model.norm.weight" if bare == "norm.weight" else "lm_head.weight"] = (
                    tensor
                )
            else:
                raise ConversionError(f"unexpected tensor {name!r}")
            continue
        prefix = f"model.layers.{int(match.group(1))}."
        rest = match.group(2)
        if rest in ("mixer.Wqkv.weight", "mixer.Wqkv.bias"):
            kind = rest.rsplit(".", 1)[1]
            for part, projection in zip(
                tensor.reshape(3, -1, *tensor.shape[1:]), "qkv", strict=True
            ):
                converted[prefix + f"self_attn.{projection}_proj.{kind}"] = part
            continue
        if rest not in _V1_LAYER:
            raise ConversionError(f"unexpected tensor {name!r}")
        converted[prefix + _V1_LAYER[rest]] = tensor
    del shape
    return converted
