"""Micro-batch of packs -> one flattened varlen row.

``batch_size`` packs become one row of ``batch_size * packed_length`` tokens whose
segment boundaries (cu_seqlens) keep every pack and segment apart, so micro-batches
larger than one work with variable-length attention.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from .packing import IGNORE_INDEX, positions_from_boundaries


@dataclass
class PackedBatch:
    """One micro-batch row. Tensors have a leading batch dimension of 1 except cu_seqlens."""

    input_ids: torch.Tensor  # (1, T) int64
    labels: torch.Tensor  # (1, T) int64, already shifted, -100 = no target
    position_ids: torch.Tensor  # (1, T) int64
    cu_seqlens: torch.Tensor  # (segments + 1,) int32
    max_seqlen: int
    type_ids: torch.Tensor  # (1, T) int64
    num_packs: int
    # cu_seqlens as Python ints, read on the host once so no kernel syncs with the device
    segment_bounds: tuple[int, ...] | None = None
    # (path, line, reason) of samples trained as ignored tokens (on_bad_sample='skip'):
    # read in DataLoader workers, counted by the trainer in the main process
    bad_samples: tuple[tuple[str, int, str], ...] = ()

    def __post_init__(self) -> None:
        if self.segment_bounds is None and self.cu_seqlens.device.type == "cpu":
            self.segment_bounds = tuple(self.cu_seqlens.tolist())

    @property
    def num_tokens(self) -> int:
        return int(self.input_ids.shape[1])

    @property
    def num_trainable(self) -> int:
        return int((self.labels != IGNORE_INDEX).sum())

    def segment_lengths(self) -> torch.Tensor:
        return self.cu_seqlens[1:] - self.cu_seqlens[:-1]

    def to(self, device: torch.device | str) -> PackedBatch:
        return PackedBatch(
            input_ids=self.input_ids.to(device, non_blocking=True),
            labels=self.labels.to(device, non_blocking=True),
            position_ids=self.position_ids.to(device, non_blocking=True),
            cu_seqlens=self.cu_seqlens.to(device, non_blocking=True),
            max_seqlen=self.max_seqlen,
            type_ids=self.type_ids.to(device, non_blocking=True),
            num_packs=self.num_packs,
            segment_bounds=self.segment_bounds,
            bad_samples=self.bad_samples,
        )


class PackCollator:
    """Concatenate packs into one row.

    With ``attention_windows`` (use_varlen_attn=False) each pack's sample boundaries
    are replaced by fixed windows (InternEvo's seq_len windows; the whole pack when
    there is no per-sample limit), so attention is plain causal inside each window.
    """

    def __init__(self, attention_windows: np.ndarray | None = None):
        self.attention_windows = attention_windows

    def __call__(self, items: Sequence[dict[str, np.ndarray]]) -> PackedBatch:
        boundaries = [np.zeros(1, dtype=np.int64)]
        offset = 0
        for item in items:
            cu = item["cu_seqlens"] if self.attention_windows is None else self.attention_windows
            boundaries.append(cu[1:] + offset)
            offset += len(item["input_ids"])
        cu_seqlens = np.concatenate(boundaries)
        if self.attention_windows is None:
            positions = np.concatenate([item["position_ids"] for item in items])
        else:
            positions = positions_from_boundaries(cu_seqlens)

        def row(key: str) -> torch.Tensor:
            return torch.from_numpy(np.concatenate([item[key] for item in items])).unsqueeze(0)

        return PackedBatch(
            input_ids=row("input_ids"),
            labels=row("labels"),
            position_ids=torch.from_numpy(positions).unsqueeze(0),
            cu_seqlens=torch.from_numpy(cu_seqlens.astype(np.int32)),
            max_seqlen=int(np.diff(cu_seqlens).max()),
            type_ids=row("type_ids"),
            num_packs=len(items),
            segment_bounds=tuple(int(b) for b in cu_seqlens),
            bad_samples=tuple(r for item in items for r in item.get("bad_samples", ())),
        )
