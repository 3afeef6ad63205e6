"""Load a Hugging Face causal LM for packed training, or refuse it before any weight is read.

Order: find config.json (local folder or Hub) -> an InternLM2 folder becomes the
equivalent native Llama in memory (no trust_remote_code, no files written) ->
other remote code (``auto_map`` with a model type transformers does not ship) is
refused -> the family check (families.check_model) -> the attention kernel is
chosen by what the model's layers need (attention.resolve_kernel) -> weights.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    GenerationConfig,
    LlamaForCausalLM,
    PreTrainedModel,
)
from transformers.models.auto.configuration_auto import CONFIG_MAPPING

from ..errors import ConfigError, ConversionError
from .attention import attention_name, register_attention, resolve_kernel
from .families import attention_needs, check_model

logger = logging.getLogger(__name__)

KEY = "pretrained_model_name_or_path"
# what an InternLM2 folder needs from the Hub to be loaded as Llama (no remote code runs)
INTERNLM2_FILES = ["*.json", "*.safetensors", "*.bin", "tokenizer.model", "*.py"]


def check_model_source(name_or_path: str) -> None:
    """A path-like value must exist locally; hub ids are left to transformers."""
    looks_local = name_or_path.startswith((".", "/", "~")) or os.sep in name_or_path.rstrip(os.sep)
    path = Path(name_or_path).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise ConfigError(
                f"{KEY}: {path} has no config.json; point it at a Hugging Face model folder"
            )
        return
    if looks_local and name_or_path.count("/") != 1:
        raise ConfigError(f"{KEY}: {name_or_path} does not exist; fix the path")


def _unreachable(name_or_path: str, error: Exception) -> ConfigError:
    reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    return ConfigError(
        f"{KEY}: cannot load {name_or_path!r} ({reason}); give a local model folder or a "
        "hub id reachable from this machine"
    )


def read_config_json(name_or_path: str) -> dict[str, Any]:
    """config.json as a plain dict, before transformers interprets (or refuses) it."""
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        config_path = path / "config.json"
    else:
        from transformers.utils import cached_file

        try:
            found = cached_file(name_or_path, "config.json")
        except (OSError, ValueError) as error:
            raise _unreachable(name_or_path, error) from None
        if found is None:
            raise _unreachable(name_or_path, FileNotFoundError("no config.json"))
        config_path = Path(found)
    try:
        return json.loads(config_path.read_text())
    except (OSError, ValueError) as error:
        raise ConfigError(f"{KEY}: {config_path} is not valid JSON ({error})") from None


def refuse_remote_code(raw: dict[str, Any], name_or_path: str) -> None:
    """Remote code (auto_map) for a model type transformers does not ship is refused."""
    model_type = raw.get("model_type")
    if model_type in CONFIG_MAPPING:
        return
    if "auto_map" in raw:
        raise ConfigError(
            f"{KEY}: {name_or_path} is remote code (config.json auto_map, model_type "
            f"{model_type!r} unknown to transformers); evotune trains transformers' own model "
            "classes only (InternLM2 is converted to Llama in memory); convert it to a native "
            "architecture first"
        )
    raise ConfigError(
        f"{KEY}: {name_or_path} has model_type {model_type!r}, which this transformers does not "
        "know; upgrade transformers or use a supported model"
    )


def _local_folder(name_or_path: str) -> Path:
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return path
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(name_or_path, allow_patterns=INTERNLM2_FILES))
    except Exception as error:  # the Hub client raises many error types
        raise _unreachable(name_or_path, error) from None


def load_config(
    name_or_path: str, allow_unverified_model: bool = False, with_weights: bool = True
) -> tuple[Any, dict | None]:
    """(config, weights) where weights is an in-memory state dict for InternLM2, else None
    (``{}`` for InternLM2 without ``with_weights``: a meta-device build reads none).

    Refuses remote code and unverified or inexact families with one-line ConfigErrors.
    """
    raw = read_config_json(name_or_path)
    weights = None
    if raw.get("model_type") == "internlm2":
        from ..convert.checkpoints import read_internlm2_hf

        try:
            config, weights = read_internlm2_hf(
                _local_folder(name_or_path), source=name_or_path, with_weights=with_weights
            )
        except ConversionError as error:
            raise ConfigError(
                f"{KEY}: InternLM2 folder cannot be loaded as Llama: {error}"
            ) from None
        logger.info("%s: InternLM2 loaded as the equivalent Llama, in memory", name_or_path)
    else:
        refuse_remote_code(raw, name_or_path)
        try:
            config = AutoConfig.from_pretrained(name_or_path)
        except (OSError, ValueError) as error:
            raise _unreachable(name_or_path, error) from None
    check_model(config, allow_unverified_model)
    return config, weights


def load_model(
    name_or_path: str,
    attn_implementation: str = "auto",
    device: torch.device | str = "cpu",
    gradient_checkpointing: bool = False,
    dtype: torch.dtype = torch.float32,
    *,
    allow_unverified_model: bool = False,
    compute_dtype: torch.dtype | None = None,
    placement: str | None = None,
) -> PreTrainedModel:
    """from_pretrained with evotune's varlen attention, no KV cache, optional checkpointing.

    ``dtype`` is the storage dtype of the parameters (fp32 master weights unless an
    engine keeps its own master copy); ``compute_dtype`` is the dtype activations
    reach attention in (bfloat16 under autocast), which decides whether the flash
    kernels can run. ``allow_unverified_model`` trains a model type that is not in
    evotune.model.families.FAMILIES, with a warning. ``placement`` puts the model
    somewhere else than the ``device`` it will train on (which chooses the attention
    kernel): "cpu", or "meta" for the structure without reading any weight: its
    parameters on the meta device, its buffers computed on the CPU as from_pretrained
    computes them (for an engine that shards first and fills in the weights afterwards).
    """
    check_model_source(name_or_path)
    register_attention()
    config, weights = load_config(
        name_or_path, allow_unverified_model, with_weights=placement != "meta"
    )
    device = torch.device(device)
    try:
        kernel = resolve_kernel(
            attn_implementation, device, True, attention_needs(config), compute_dtype or dtype
        )
    except ValueError as error:
        raise ConfigError(f"attn_implementation: {error}") from None
    logger.info("attention kernel: %s (attn_implementation=%s)", kernel, attn_implementation)
    implementation = attention_name(kernel)
    model: Any
    try:
        if placement == "meta":
            with parameters_on_meta():
                model = AutoModelForCausalLM.from_config(
                    config, dtype=dtype, attn_implementation=implementation
                )
            if weights is None:  # from_pretrained would read it too (what the HF folder saves)
                with contextlib.suppress(OSError):
                    model.generation_config = GenerationConfig.from_pretrained(name_or_path)
        elif weights is not None:
            model = LlamaForCausalLM.from_pretrained(
                None,
                config=config,
                state_dict=weights,
                dtype=dtype,
                attn_implementation=implementation,
            )
        else:
            model = AutoModelForCausalLM.from_pretrained(
                name_or_path, config=config, dtype=dtype, attn_implementation=implementation
            )
    except OSError as error:
        raise _unreachable(name_or_path, error) from None
    model.config.use_cache = False
    if gradient_checkpointing:
        # non-reentrant checkpointing passes keyword arguments (metadata, SP) through
        checkpointing = {"use_reentrant": False}
        if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.24
            model.activation_checkpointing_enable(activation_checkpointing_kwargs=checkpointing)
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=checkpointing)
    # from_pretrained returns eval mode, where activation checkpointing is inactive
    if placement == "meta":
        return model.train()  # the engine allocates the parameters and moves the buffers
    return model.to(placement or device).train()


@contextlib.contextmanager
def parameters_on_meta() -> Iterator[None]:
    """Modules built inside get their parameters on the meta device, their buffers as usual.

    Each parameter moves to meta as it is registered, before its module initialises it,
    so building costs no memory and no initialisation; buffers (rotary frequencies,
    embedding scales) are computed exactly as in any build.
    """
    register = nn.Module.register_parameter

    def register_on_meta(module: nn.Module, name: str, parameter: nn.Parameter | None) -> None:
        register(module, name, parameter)
        if parameter is not None and not parameter.is_meta:
            kind = type(parameter)
            values = vars(parameter)
            moved = kind(parameter.to("meta"), requires_grad=parameter.requires_grad)
            vars(moved).update(values)
            module._parameters[name] = moved

    nn.Module.register_parameter = register_on_meta  # type: ignore[method-assign,assignment]
    try:
        yield
    finally:
        nn.Module.register_parameter = register  # type: ignore[method-assign]
