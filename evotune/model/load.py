"""Load a Hugging Face causal LM for packed training."""

from __future__ import annotations

import os
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, PreTrainedModel

from ..config import ConfigError
from .attention import attention_name, register_attention, resolve_kernel


def check_model_source(name_or_path: str) -> None:
    """A path-like value must exist locally; hub ids are left to transformers."""
    looks_local = name_or_path.startswith((".", "/", "~")) or os.sep in name_or_path.rstrip(os.sep)
    path = Path(name_or_path).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise ConfigError(
                f"pretrained_model_name_or_path: {path} has no config.json; point it at a "
                "Hugging Face model folder"
            )
        return
    if looks_local and name_or_path.count("/") != 1:
        raise ConfigError(
            f"pretrained_model_name_or_path: {name_or_path} does not exist; fix the path"
        )


def load_model(
    name_or_path: str,
    attn_implementation: str = "auto",
    device: torch.device | str = "cpu",
    gradient_checkpointing: bool = False,
    dtype: torch.dtype = torch.float32,
) -> PreTrainedModel:
    """from_pretrained with evotune's varlen attention, no KV cache, optional checkpointing.

    ``dtype`` is the storage dtype of the parameters (fp32 master weights unless an
    engine such as DeepSpeed keeps its own master copy).
    """
    check_model_source(name_or_path)
    register_attention()
    try:
        kernel = resolve_kernel(attn_implementation, torch.device(device))
    except ValueError as error:
        raise ConfigError(f"attn_implementation: {error}") from None
    try:
        model = AutoModelForCausalLM.from_pretrained(
            name_or_path, dtype=dtype, attn_implementation=attention_name(kernel)
        )
    except OSError as error:
        raise ConfigError(
            f"pretrained_model_name_or_path: cannot load {name_or_path!r} ({error}); "
            "give a local model folder or a hub id reachable from this machine"
        ) from None
    model.config.use_cache = False
    if gradient_checkpointing:
        # non-reentrant checkpointing passes keyword arguments (cu_seqlens, SP) through
        options = {"use_reentrant": False}
        if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.24
            model.activation_checkpointing_enable(activation_checkpointing_kwargs=options)
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=options)
    # from_pretrained returns eval mode, where activation checkpointing is inactive
    return model.to(device).train()
