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
    llama_to_internlm2,
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
    settings: dict[str, Any] = dict(
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
    return LlamaConfig(**settings)


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
    config.dtype = dtype
    with atomic_folder(output) as temporary:
        config.save_pretrained(temporary)
        save_file(
            {k: v.to(dtype).contiguous() for k, v in weights.items()},
            str(temporary / "model.safetensors"),
            metadata={"format": "pt"},
        )
        for carried in extra_files:
            shutil.copy2(carried, temporary / carried.name)
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


INTERNLM2_CONFIG_KEY = "evotune_internlm2"  # Llama config attribute: the InternLM2 origin
INTERNLM2_AUTO_MAP = {
    "AutoConfig": "configuration_internlm2.InternLM2Config",
    "AutoModel": "modeling_internlm2.InternLM2ForCausalLM",
    "AutoModelForCausalLM": "modeling_internlm2.InternLM2ForCausalLM",
}
TOKENIZER_FILES = (
    "tokenizer.model",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "generation_config.json",
)


def _read_weights(folder: Path) -> dict[str, torch.Tensor]:
    files = sorted(folder.glob("*.safetensors")) or sorted(folder.glob("pytorch_model*.bin"))
    if not files:
        raise ConversionError(f"{folder}: no weights (*.safetensors or pytorch_model*.bin)")
    weights: dict[str, torch.Tensor] = {}
    for file in files:
        weights.update(load_file(str(file)) if file.suffix == ".safetensors" else safe_load(file))
    return weights


def read_internlm2_hf(
    folder: Path, source: str | None = None, with_weights: bool = True
) -> tuple[LlamaConfig, dict]:
    """A remote-code InternLM2 HF folder as the equivalent Llama config and weights, in memory.

    The Llama config remembers the InternLM2 config and where it came from (attribute
    ``evotune_internlm2``), so ``export_as_internlm2`` can write the layout back.
    ``with_weights=False`` reads the config only (the weights are then ``{}``).
    """
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise ConversionError(f"{folder}: no config.json")
    source_config = json.loads(config_path.read_text())
    if source_config.get("model_type") != "internlm2":
        raise ConversionError(
            f"{config_path}: model_type is {source_config.get('model_type')!r}, not 'internlm2'"
        )
    if source_config.get("bias", False):
        raise ConversionError(f"{config_path}: bias=True InternLM2 models have no Llama equivalent")
    if source_config.get("hidden_act", "silu") != "silu":
        raise ConversionError(
            f"{config_path}: hidden_act={source_config['hidden_act']!r}; Llama uses 'silu'"
        )
    heads = int(source_config["num_attention_heads"])
    shape = Shape(
        int(source_config["hidden_size"]),
        int(source_config["num_hidden_layers"]),
        heads,
        int(source_config.get("num_key_value_heads", heads)),
    )
    weights = (
        internlm2_to_llama(_read_weights(folder), shape, interleaved_rotary=False)
        if with_weights
        else {}
    )
    settings: dict[str, Any] = dict(
        vocab_size=int(source_config["vocab_size"]),
        hidden_size=shape.hidden_size,
        intermediate_size=int(source_config["intermediate_size"]),
        num_hidden_layers=shape.num_layers,
        num_attention_heads=heads,
        num_key_value_heads=shape.num_kv_heads,
        max_position_embeddings=int(source_config.get("max_position_embeddings", 2048)),
        rms_norm_eps=float(source_config.get("rms_norm_eps", 1e-6)),
        rope_theta=float(source_config.get("rope_theta", 10000)),
        rope_scaling=source_config.get("rope_scaling"),
        tie_word_embeddings=bool(source_config.get("tie_word_embeddings", False)),
        bos_token_id=source_config.get("bos_token_id"),
        eos_token_id=source_config.get("eos_token_id"),
        pad_token_id=source_config.get("pad_token_id"),
    )
    config = LlamaConfig(**settings)
    setattr(
        config,
        INTERNLM2_CONFIG_KEY,
        {"config": source_config, "source": source if source is not None else str(folder)},
    )
    if config.tie_word_embeddings:
        weights.pop("lm_head.weight", None)
    return config, weights


def convert_internlm2_hf(folder: Path, output: Path) -> Path:
    """A remote-code InternLM2 HF folder -> a native Llama folder (tokenizer files copied)."""
    config, weights = read_internlm2_hf(folder)
    extra_files = [folder / name for name in TOKENIZER_FILES if (folder / name).is_file()]
    return write_llama_folder(config, weights, output, extra_files=extra_files)


def _internlm2_config(llama: dict[str, Any], origin: dict[str, Any] | None, dtype: str) -> dict:
    rope = llama.get("rope_parameters") or {}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    rope_scaling = None
    if rope_type != "default":
        rope_scaling = {"type": rope_type, "factor": rope.get("factor")}
    config = dict((origin or {}).get("config") or {})
    config.update(
        architectures=["InternLM2ForCausalLM"],
        model_type="internlm2",
        auto_map=config.get("auto_map", INTERNLM2_AUTO_MAP),
        bias=False,
        hidden_act="silu",
        vocab_size=llama["vocab_size"],
        hidden_size=llama["hidden_size"],
        intermediate_size=llama["intermediate_size"],
        num_hidden_layers=llama["num_hidden_layers"],
        num_attention_heads=llama["num_attention_heads"],
        num_key_value_heads=llama.get("num_key_value_heads", llama["num_attention_heads"]),
        max_position_embeddings=llama["max_position_embeddings"],
        rms_norm_eps=llama["rms_norm_eps"],
        rope_theta=rope.get("rope_theta", llama.get("rope_theta", 10000.0)),
        rope_scaling=rope_scaling,
        tie_word_embeddings=bool(llama.get("tie_word_embeddings", False)),
        bos_token_id=llama.get("bos_token_id"),
        eos_token_id=llama.get("eos_token_id"),
        pad_token_id=llama.get("pad_token_id"),
        torch_dtype=dtype,
    )
    return config


def _remote_code_files(auto_map: dict[str, Any], origin: dict[str, Any] | None) -> tuple:
    """(files to copy, auto_map to write): local InternLM2 code, else Hub references."""
    modules = {str(target).split("--")[-1].split(".")[0] for target in auto_map.values()}
    source = (origin or {}).get("source")
    folder = Path(source) if source else None
    if folder is not None and folder.is_dir():
        files = [folder / f"{module}.py" for module in sorted(modules)]
        if all(file.is_file() for file in files):
            return files + sorted(folder.glob("tokenization_internlm2*.py")), auto_map
    if source and not Path(source).expanduser().exists() and source.count("/") == 1:
        rewritten = {
            key: value if "--" in str(value) else f"{source}--{value}"
            for key, value in auto_map.items()
        }
        return [], rewritten
    return [], auto_map


def export_as_internlm2(llama_folder: Path, output: Path) -> Path:
    """A Llama HF folder (e.g. trained from InternLM2) -> the InternLM2 HF layout, atomically.

    Weights: q/k/v fused into wqkv per KV group, InternLM2 names. config.json: the
    original InternLM2 config when the Llama config remembers it, with every shape,
    rope and token setting taken from the Llama config. Tokenizer files are copied;
    InternLM2's remote code comes from the original folder, or is referenced on the
    Hub (``repo--module.Class``) when the model came from a Hub id.
    """
    config_path = llama_folder / "config.json"
    if not config_path.is_file():
        raise ConversionError(f"{llama_folder}: no config.json")
    llama = json.loads(config_path.read_text())
    if llama.get("model_type") != "llama":
        raise ConversionError(
            f"{config_path}: model_type is {llama.get('model_type')!r}; --format internlm2 "
            "writes Llama-shaped models only"
        )
    heads = int(llama["num_attention_heads"])
    hidden = int(llama["hidden_size"])
    for key, allowed in (("attention_bias", False), ("mlp_bias", False), ("hidden_act", "silu")):
        if llama.get(key, allowed) != allowed:
            raise ConversionError(
                f"{config_path}: {key}={llama[key]!r} has no InternLM2 equivalent"
            )
    if llama.get("head_dim") not in (None, hidden // heads):
        raise ConversionError(
            f"{config_path}: head_dim={llama['head_dim']} != hidden_size / num_attention_heads; "
            "InternLM2 has no such setting"
        )
    shape = Shape(
        hidden,
        int(llama["num_hidden_layers"]),
        heads,
        int(llama.get("num_key_value_heads", heads)),
    )
    weights = _read_weights(llama_folder)
    if "lm_head.weight" not in weights:  # tied embeddings: InternLM2 always stores output
        weights["lm_head.weight"] = weights["model.embed_tokens.weight"]
    converted = llama_to_internlm2(weights, shape)
    dtype = next(iter(converted.values())).dtype
    origin = llama.get(INTERNLM2_CONFIG_KEY)
    config = _internlm2_config(llama, origin, str(dtype).removeprefix("torch."))
    code_files, config["auto_map"] = _remote_code_files(config["auto_map"], origin)
    carried = [llama_folder / n for n in TOKENIZER_FILES if (llama_folder / n).is_file()]
    source = Path((origin or {}).get("source") or llama_folder)
    if source.is_dir():  # tokenizer files the Llama folder lacks come from the original
        have = {file.name for file in carried}
        carried += [source / n for n in TOKENIZER_FILES if n not in have and (source / n).is_file()]
    with atomic_folder(output) as temporary:
        (temporary / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        save_file(
            {name: tensor.contiguous() for name, tensor in converted.items()},
            str(temporary / "model.safetensors"),
            metadata={"format": "pt"},
        )
        for file in [*carried, *code_files]:
            shutil.copy2(file, temporary / file.name)
    return output


def export_checkpoint_as_internlm2(checkpoint: Path, output: Path) -> Path:
    """``evotune export --format internlm2``: the verified HF folder, then the InternLM2 layout."""
    from ..train.checkpoint import export_hf

    output.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=output.parent, prefix=f".{output.name}.") as scratch:
        llama = export_hf(checkpoint, Path(scratch) / "llama")
        return export_as_internlm2(llama, output)
