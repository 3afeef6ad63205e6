"""A checkpoint's HF folder, written while the weights stream in one decoder layer at a time.

The engines hand the full weights over in groups (engine.hf_weight_groups): one
decoder layer, then the remaining parameters (embeddings, final norm, LM head).
Only the main rank writes; it never holds more than one safetensors shard plus
one group in host memory, so a model larger than any rank's memory is still
exported. The folder is what ``save_pretrained`` would write and
``from_pretrained`` reads:

* tensor names in the model's on-disk format: transformers 5 loads some families
  (MoE experts) into fused tensors and reverts that when saving; the same
  reversion is applied to each group, which holds every tensor of a conversion;
* tied weights once, under the name that owns them (the engines yield each
  tensor once, in registration order: ``embed_tokens`` before ``lm_head``);
* ``model.safetensors`` when it fits one shard, else ``model-0000i-of-0000N``
  shards with ``model.safetensors.index.json``;
* config.json with ``dtype`` set to the saved dtype, and generation_config.json.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from transformers import PreTrainedModel

DEFAULT_SHARD_BYTES = 5 * 1024**3  # 5 GiB, about what most hub checkpoints use
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"


class HFFolderWriter:
    """Collects weight groups into safetensors shards of at most ``max_shard_bytes``.

    A tensor larger than the limit gets a shard of its own, as in save_pretrained.
    """

    def __init__(
        self,
        folder: Path,
        model: PreTrainedModel,
        dtype: torch.dtype,
        max_shard_bytes: int = DEFAULT_SHARD_BYTES,
    ):
        self.folder = folder
        self.model = model
        self.dtype = dtype
        self.max_shard_bytes = max_shard_bytes
        self.pending: dict[str, torch.Tensor] = {}
        self.pending_bytes = 0
        self.shards: list[list[str]] = []  # tensor names of each shard written so far
        self.total_bytes = 0
        self.total_parameters = 0
        self.renamed = False  # some in-memory tensor is not on disk under its own name
        folder.mkdir(parents=True, exist_ok=True)

    def add(self, group: dict[str, torch.Tensor]) -> None:
        """One group of full weights (in-memory names), in any dtype, on the CPU."""
        ignored = set(getattr(self.model, "_keys_to_ignore_on_save", None) or ()) & set(group)
        kept = {name: tensor for name, tensor in group.items() if name not in ignored}
        on_disk = _on_disk_format(self.model, kept)
        if ignored or set(on_disk) != set(kept):
            self.renamed = True
        for name, tensor in sorted(on_disk.items()):
            tensor = tensor.detach().to(self.dtype).contiguous()
            size = tensor.numel() * tensor.element_size()
            if self.pending and self.pending_bytes + size > self.max_shard_bytes:
                self._flush()
            self.pending[name] = tensor
            self.pending_bytes += size
            self.total_bytes += size
            self.total_parameters += tensor.numel()

    def finish(self) -> None:
        """Write the last shard, name the shards, write the index and the configs."""
        if self.pending or not self.shards:
            self._flush()
        count = len(self.shards)
        if count == 1:
            self._shard_path(0).rename(self.folder / SINGLE_FILE)
        else:
            weight_map = {}
            for index, names in enumerate(self.shards):
                final = f"model-{index + 1:05d}-of-{count:05d}.safetensors"
                self._shard_path(index).rename(self.folder / final)
                weight_map.update(dict.fromkeys(names, final))
            index_payload = {
                "metadata": {
                    "total_parameters": self.total_parameters,
                    "total_size": self.total_bytes,
                },
                "weight_map": dict(sorted(weight_map.items())),
            }
            text = json.dumps(index_payload, indent=2, sort_keys=True) + "\n"
            (self.folder / INDEX_FILE).write_text(text)
        self._write_configs()

    def _flush(self) -> None:
        save_file(self.pending, str(self._shard_path(len(self.shards))), metadata={"format": "pt"})
        self.shards.append(list(self.pending))
        self.pending, self.pending_bytes = {}, 0

    def _shard_path(self, index: int) -> Path:
        return self.folder / f".shard-{index:05d}.safetensors"

    def _write_configs(self) -> None:
        config = self.model.config
        saved_dtype, config.dtype = config.dtype, str(self.dtype).removeprefix("torch.")
        try:
            config.architectures = [type(self.model).__name__]
            config.save_pretrained(self.folder)
        finally:
            config.dtype = saved_dtype
        if self.model.can_generate() and self.model.generation_config is not None:
            self.model.generation_config.save_pretrained(self.folder)


def write_hf_folder(
    folder: Path,
    model: PreTrainedModel,
    groups: Iterable[dict[str, torch.Tensor]],
    dtype: torch.dtype,
    max_shard_bytes: int = DEFAULT_SHARD_BYTES,
) -> HFFolderWriter:
    """Consume ``groups`` into ``folder``; returns the writer (``renamed`` tells the format)."""
    writer = HFFolderWriter(folder, model, dtype, max_shard_bytes)
    for group in groups:
        writer.add(group)
    writer.finish()
    return writer


def read_hf_weights(folder: Path) -> dict[str, torch.Tensor]:
    """All tensors of an HF folder, single-file or sharded, by their on-disk names."""
    single = folder / SINGLE_FILE
    if single.is_file():
        return load_file(str(single))
    index = folder / INDEX_FILE
    if not index.is_file():
        raise FileNotFoundError(f"{folder}: neither {SINGLE_FILE} nor {INDEX_FILE}")
    weights: dict[str, torch.Tensor] = {}
    for shard in sorted(set(json.loads(index.read_text())["weight_map"].values())):
        weights.update(load_file(str(folder / shard)))
    return weights


def _on_disk_format(
    model: PreTrainedModel, group: dict[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """Undo transformers' load-time conversions (fused MoE experts, renamings) on ``group``."""
    from transformers.core_model_loading import revert_weight_conversion

    return revert_weight_conversion(model, group)
