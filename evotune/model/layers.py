"""The model's repeated blocks, and its weights grouped by them.

Sharding (FSDP2), activation checkpointing, regional compilation and the
streamed HF export all work one decoder layer at a time; this is the one
definition of what a decoder layer is.
"""

from __future__ import annotations

import torch
from torch import nn


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The repeated blocks, in order: HF's checkpointable layers (GradientCheckpointingLayer)."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    layers: list[nn.Module] = []
    inside: set[nn.Module] = set()
    for module in model.modules():
        if isinstance(module, GradientCheckpointingLayer) and module not in inside:
            layers.append(module)
            inside.update(module.modules())
    return layers


def weight_groups(model: nn.Module) -> list[dict[str, torch.Tensor]]:
    """The model's saved tensors by name, each once: one group per decoder layer, then the rest.

    The tensors are the model's own parameters and persistent buffers (DTensors or
    ZeRO-3 partitions under those engines), not copies. A tied alias is listed
    once, under the name registered first (``embed_tokens`` before ``lm_head``),
    as save_pretrained does.
    """
    layers = decoder_layers(model)
    layer_of: dict[int, int] = {}
    for index, layer in enumerate(layers):
        for tensor in layer.state_dict(keep_vars=True).values():
            layer_of.setdefault(id(tensor), index)
    groups: list[dict[str, torch.Tensor]] = [{} for _ in range(len(layers) + 1)]
    seen: set[int] = set()
    for name, tensor in model.state_dict(keep_vars=True).items():
        if id(tensor) in seen:
            continue
        seen.add(id(tensor))
        groups[layer_of.get(id(tensor), -1)][name] = tensor
    return [group for group in groups if group]
