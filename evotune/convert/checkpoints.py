"""``evotune convert internevo-ckpt`` and ``evotune convert internlm2-to-llama``.

InternEvo checkpoint folder (save_ckpt_folder/<step>/): model_tp{t}_pp{p}.pt shards
(keys prefixed 'model.', layer numbers local to each pipeline stage) and
model_config.pt. Tensor-parallel shards are concatenated along each tensor's split
dimension, pipeline stages are renumbered, and the result is written as a Llama
folder (config.json + model.safetensors) that transformers loads natively.
Every .pt file is read with weights_only=True.
"""

from __future__ import annotations

import json
import re
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from transformers import LlamaConfig, LlamaForCausalLM

from ..fileio import atomic_folder
from .internlm2 import (
    LAYER_KEY,
    V1_EMBEDDINGS,
    ConversionError,
    Shape,
    internlm1_to_llama,
    internlm2_to_llama,
)

SHARD_NAME = re.compile(r"^model_tp(\d+)_pp(\d+)\.pt$")

# dimension along which InternEvo splits each tensor over tensor-parallel ranks
_TP_SPLIT = {
    "attention.wqkv.weight": 0,
    "attention.wq.weight": 0,
    "attention.wk.weight": 0,
    "attention.wv.weight": 0,
    "attention.wo.weight": 1,
    "feed_forward.w1.weight": 0,
    "feed_forward.w3.weight": 0,
    "feed_forward.w2.weight": 1,
    "output.weight": 0,
    "mixer.out_proj.weight": 1,  # InternLM v1
    "mlp.w1.weight": 0,
    "head.weight": 0,
}


def safe_load(path: Path) -> Any:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # pickle errors come in many types
        raise ConversionError(
            f"{path}: cannot be loaded with weights_only=True ({type(error).__name__}); "
            "evotune refuses to unpickle arbitrary objects"
        ) from None


def _shard_grid(folder: Path) -> tuple[int, int]:
    found = {}
    for entry in folder.iterdir():
        match = SHARD_NAME.match(entry.name)
        if match:
            found[(int(match.group(1)), int(match.group(2)))] = entry
    if not found:
        raise ConversionError(f"{folder}: no model_tp*_pp*.pt shard; point at a step folder")
    tp = max(t for t, _ in found) + 1
    pp = max(p for _, p in found) + 1
    missing = [f"model_tp{t}_pp{p}.pt" for t in range(tp) for p in range(pp) if (t, p) not in found]
    if missing:
        raise ConversionError(f"{folder}: missing shards {missing}")
    return tp, pp


def _merge_tensor_parallel(
    rest: str, tensors: list[torch.Tensor], embed_split_hidden: bool, head_dim: int, hidden: int
) -> tuple[str, torch.Tensor]:
    """One tensor from its tensor-parallel shards; returns its (possibly renamed) key."""
    if rest in ("mixer.Wqkv.weight", "mixer.Wqkv.bias"):
        # InternLM v1: every shard is [q; k; v] for its own heads
        per_shard = [t.reshape(3, -1, head_dim, *t.shape[1:]) for t in tensors]
        merged = torch.cat(per_shard, dim=1)
        return rest, merged.reshape(-1, *tensors[0].shape[1:])
    if rest in ("mlp.w2.weight", "mlp.w3.weight"):
        # InternLM v1 swapped w2/w3 in Feb 2024: the (hidden, inter/tp) tensor is down_proj
        rows, columns = tensors[0].shape
        if (rows == hidden) == (columns == hidden):
            raise ConversionError(
                f"{rest}: shard shape {tuple(tensors[0].shape)} does not tell up_proj from "
                "down_proj (intermediate/tp equals hidden)"
            )
        if rows == hidden:
            return "mlp.down.weight", torch.cat(tensors, dim=1)
        return "mlp.up.weight", torch.cat(tensors, dim=0)
    if len(tensors) == 1:
        return rest, tensors[0]
    if rest in V1_EMBEDDINGS:
        return rest, torch.cat(tensors, dim=1 if embed_split_hidden else 0)
    if rest in _TP_SPLIT:
        return rest, torch.cat(tensors, dim=_TP_SPLIT[rest])
    for other in tensors[1:]:  # replicated (norms, output biases)
        if not torch.equal(other, tensors[0]):
            raise ConversionError(f"{rest}: tensor-parallel copies of a replicated tensor differ")
    return rest, tensors[0]


def merge_internevo_shards(
    folder: Path, embed_split_hidden: bool, head_dim: int, hidden: int
) -> dict[str, torch.Tensor]:
    """All shards of one checkpoint step -> one state dict with global layer numbers."""
    tp, pp = _shard_grid(folder)
    merged: dict[str, torch.Tensor] = {}
    offset = 0
    for stage in range(pp):
        shards = [safe_load(folder / f"model_tp{t}_pp{stage}.pt") for t in range(tp)]
        local_layers = set()
        for name in shards[0]:
            if name.endswith("inv_freq"):
                continue
            tensors = [shard[name] for shard in shards]
            bare = name.removeprefix("model.")
            match = LAYER_KEY.match(bare)
            rest = match.group(2) if match else bare
            rest, tensor = _merge_tensor_parallel(
                rest, tensors, embed_split_hidden, head_dim, hidden
            )
            if match:
                local_layers.add(int(match.group(1)))
                word = bare.split(".", 1)[0]  # 'layers' (InternLM2, LLAMA2) or 'blocks' (v1)
                rest = f"{word}.{int(match.group(1)) + offset}.{rest}"
            merged[rest] = tensor
        offset += len(local_layers)
    return merged


def read_model_config(folder: Path) -> dict[str, Any]:
    """model_config.pt, or the ``model`` dict of the config text saved as config_file.pt."""
    path = folder / "model_config.pt"
    if path.is_file():
        config = safe_load(path)
        if not isinstance(config, dict):
            raise ConversionError(f"{path}: expected a dict of model settings")
        return config
    text_path = folder / "config_file.pt"
    if not text_path.is_file():
        raise ConversionError(
            f"{folder}: neither model_config.pt nor config_file.pt (InternEvo writes both)"
        )
    text = safe_load(text_path)
    if not isinstance(text, str):
        raise ConversionError(f"{text_path}: expected the config file's text")
    from .internevo_config import read_internevo_config

    with tempfile.TemporaryDirectory() as scratch:
        source = Path(scratch) / "config_file.py"
        source.write_text(text)
        entries, _ = read_internevo_config(source)
    model = entries.get("model")
    if not isinstance(model, dict) or "hidden_size" not in model:
        raise ConversionError(f"{text_path}: the saved config has no usable model dict")
    return dict(model)


def llama_config_for(model: dict[str, Any], weights: dict[str, torch.Tensor]) -> LlamaConfig:
    hidden = int(model["hidden_size"])
    heads = int(model["num_attention_heads"])
    return LlamaConfig(
        vocab_size=int(weights["model.embed_tokens.weight"].shape[0]),
        hidden_size=hidden,
        intermediate_size=int(weights["model.layers.0.mlp.gate_proj.weight"].shape[0]),
        num_hidden_layers=int(model["num_layers"]),
        num_attention_heads=heads,
        num_key_value_heads=int(model.get("num_kv_attention_heads", heads)),
        max_position_embeddings=int(model.get("max_position_embeddings", 2048)),
        rms_norm_eps=float(model.get("layer_norm_epsilon", 1e-5)),
        rope_theta=float(model.get("rope_base", 10000)),
        tie_word_embeddings=False,
        attention_bias=False,
    )


def write_llama_folder(
    config: LlamaConfig,
    weights: dict[str, torch.Tensor],
    output: Path,
    dtype: torch.dtype | None = None,
    extra_files: Sequence[Path] = (),
) -> Path:
    """Check names and shapes against LlamaForCausalLM, then write atomically."""
    with torch.device("meta"):
        expected = {k: v.shape for k, v in LlamaForCausalLM(config).state_dict().items()}
    missing = sorted(set(expected) - set(weights))
    extra = sorted(set(weights) - set(expected))
    if missing or extra:
        raise ConversionError(
            f"weights do not fit a Llama model: missing {missing[:4]}, unexpected {extra[:4]}"
        )
    for name, shape in expected.items():
        if weights[name].shape != shape:
            raise ConversionError(
                f"{name}: shape {tuple(weights[name].shape)}, expected {tuple(shape)}"
            )
    dtype = dtype or next(iter(weights.values())).dtype
    config.torch_dtype = dtype
    with atomic_folder(output) as temporary:
        config.save_pretrained(temporary)
        save_file(
            {k: v.to(dtype).contiguous() for k, v in weights.items()},
            str(temporary / "model.safetensors"),
            metadata={"format": "pt"},
        )
        for extra in extra_files:
            shutil.copy2(extra, temporary / extra.name)
    return output


def _detect_model_type(merged: dict[str, torch.Tensor]) -> str:
    if any(k.endswith("mixer.Wqkv.weight") for k in merged):
        return "INTERNLM"
    if any(k.endswith("attention.wq.weight") for k in merged):
        return "LLAMA2"
    if any(k.endswith("attention.wqkv.weight") for k in merged):
        return "INTERNLM2_PUBLIC"
    raise ConversionError("tensor names match none of INTERNLM, INTERNLM2_PUBLIC, LLAMA2")


def convert_internevo_checkpoint(folder: Path, output: Path, model_type: str | None = None) -> Path:
    model = read_model_config(folder)
    hidden, heads = int(model["hidden_size"]), int(model["num_attention_heads"])
    merged = merge_internevo_shards(
        folder, bool(model.get("embed_split_hidden", False)), hidden // heads, hidden
    )
    detected = _detect_model_type(merged)
    if model_type is not None and model_type != detected:
        raise ConversionError(f"--model-type {model_type}: the tensors look like {detected}")
    shape = Shape(
        hidden, int(model["num_layers"]), heads, int(model.get("num_kv_attention_heads", heads))
    )
    if detected == "INTERNLM":
        weights = internlm1_to_llama(merged, shape)
    else:
        weights = internlm2_to_llama(
            merged, shape, interleaved_rotary=not model.get("adapt_hf", True)
        )
    config = llama_config_for(model, weights)
    config.attention_bias = detected == "INTERNLM"
    return write_llama_folder(config, weights, output)


def convert_internlm2_hf(folder: Path, output: Path) -> Path:
    """A remote-code InternLM2 HF folder -> a native Llama folder (tokenizer files copied)."""
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise ConversionError(f"{folder}: no config.json")
    source = json.loads(config_path.read_text())
    if source.get("model_type") != "internlm2":
        raise ConversionError(
            f"{config_path}: model_type is {source.get('model_type')!r}, not 'internlm2'"
        )
    if source.get("bias", False):
        raise ConversionError(f"{config_path}: bias=True InternLM2 models have no Llama equivalent")
    weights: dict[str, torch.Tensor] = {}
    files = sorted(folder.glob("*.safetensors")) or sorted(folder.glob("pytorch_model*.bin"))
    if not files:
        raise ConversionError(f"{folder}: no weights (*.safetensors or pytorch_model*.bin)")
    for file in files:
        weights.update(load_file(str(file)) if file.suffix == ".safetensors" else safe_load(file))
    heads = int(source["num_attention_heads"])
    shape = Shape(
        int(source["hidden_size"]),
        int(source["num_hidden_layers"]),
        heads,
        int(source.get("num_key_value_heads", heads)),
    )
    converted = internlm2_to_llama(weights, shape, interleaved_rotary=False)
    rope_scaling = source.get("rope_scaling")
    config = LlamaConfig(
        vocab_size=int(source["vocab_size"]),
        hidden_size=shape.hidden_size,
        intermediate_size=int(source["intermediate_size"]),
        num_hidden_layers=shape.num_layers,
        num_attention_heads=heads,
        num_key_value_heads=shape.num_kv_heads,
        max_position_embeddings=int(source.get("max_position_embeddings", 2048)),
        rms_norm_eps=float(source.get("rms_norm_eps", 1e-6)),
        rope_theta=float(source.get("rope_theta", 10000)),
        rope_scaling=rope_scaling,
        tie_word_embeddings=bool(source.get("tie_word_embeddings", False)),
        bos_token_id=source.get("bos_token_id"),
        eos_token_id=source.get("eos_token_id"),
        pad_token_id=source.get("pad_token_id"),
    )
    if config.tie_word_embeddings:
        converted.pop("lm_head.weight", None)
    carried = (
        "tokenizer.model",
        "tokenizer.json",
        "tokenizer_config.json",
        "special_tokens_map.json",
        "generation_config.json",
    )
    extra_files = [folder / name for name in carried if (folder / name).is_file()]
    return write_llama_folder(config, converted, output, extra_files=extra_files)
