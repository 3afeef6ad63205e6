"""Pack orders: InternEvo's StaticBatchSampler and XTuner's samplers (data.md 4-6).

A sampler yields the pack indices one data-parallel rank consumes, in order.
All ranks of one sequence-parallel group share a DP rank and so get the same
packs. ``set_epoch(e)`` gives epoch e's order whatever ran before (the shuffles
are replayed from the seed), and ``state_dict`` / ``load_state_dict`` carry the
position inside an epoch for exact resume.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch

from .ftdp import DataError
from .packing import PackedDataset

SamplerOrder = Literal["internevo", "xtuner"]


@dataclass(frozen=True)
class Subset:
    """Packs selected by one dataset_weights key (or the unweighted rest)."""

    key: str
    weight: float
    packs: np.ndarray  # global pack indices, ascending
    tokens: int


def mixture_subsets(
    dataset: PackedDataset, dataset_weights: Mapping[str, float] | None
) -> list[Subset]:
    """Group packs by their longest matching dataset_weights key (data.md section 6)."""
    weights = dict(dataset_weights or {})
    for key, weight in weights.items():
        if weight < 0 or not math.isfinite(weight):
            raise DataError(f"dataset_weights[{key!r}] = {weight}: weights must be finite and >= 0")
    keys = sorted(weights, key=len, reverse=True)
    shard_key: list[str | None] = []
    matched: set[str] = set()
    for plan in dataset.plans:
        relative = plan.shard.relative_path
        key = next((k for k in keys if _is_under(relative, k)), None)
        shard_key.append(key)
        if key is not None:
            matched.add(key)
    unmatched = [k for k in weights if k not in matched]
    if unmatched:
        raise DataError(
            f"dataset_weights key {unmatched[0]!r} matches no shard under {dataset.corpus.folder}; "
            "keys are folder paths relative to the dataset folder (e.g. 'en/wiki')"
        )
    pack_shards = dataset.pack_shard_ids()
    subsets = []
    for key in [*sorted(matched), None]:
        shard_ids = [i for i, k in enumerate(shard_key) if k == key]
        packs = np.flatnonzero(np.isin(pack_shards, shard_ids)).astype(np.int64)
        if key is None and len(packs) == 0:
            continue
        subsets.append(
            Subset(
                key=key if key is not None else "(unweighted)",
                weight=weights[key] if key is not None else 1.0,
                packs=packs,
                tokens=len(packs) * dataset.packed_length,
            )
        )
    return subsets


def _is_under(relative_path: str, key: str) -> bool:
    key = key.strip("/")
    return key == "" or relative_path == key or relative_path.startswith(key + "/")


def draw_mixture(subsets: list[Subset], rng: np.random.RandomState) -> np.ndarray:
    """One epoch's packs: floor(w*k) per subset plus one more with probability frac(w*k)."""
    chosen = []
    for subset in subsets:
        available = len(subset.packs)
        if subset.weight == 1.0:
            chosen.append(subset.packs)
            continue
        expected = subset.weight * available
        count = math.floor(expected)
        if rng.random_sample() < expected - count:
            count += 1
        repeats, remainder = divmod(count, available) if available else (0, 0)
        parts = [subset.packs] * repeats
        if remainder:
            parts.append(np.sort(rng.choice(subset.packs, size=remainder, replace=False)))
        chosen.extend(parts)
    return np.concatenate(chosen) if chosen else np.zeros(0, dtype=np.int64)


class _ResumableSampler:
    """The epoch / position protocol shared by evotune's samplers.

    Subclasses define ``rank_indices(epoch)`` (this DP rank's order for an epoch) and
    ``fingerprint()`` (what must not change across a resume).
    """

    dataset: PackedDataset
    epoch: int
    start: int

    def rank_indices(self, epoch: int) -> np.ndarray:
        raise NotImplementedError

    def fingerprint(self) -> dict[str, Any]:
        raise NotImplementedError

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        """Iterate epoch ``epoch`` from its ``start``-th pack (0: from the beginning)."""
        self.epoch = epoch
        self.start = start

    def __iter__(self) -> Iterator[int]:
        indices = self.rank_indices(self.epoch)
        start, self.start = self.start, 0
        return iter(indices[start:].tolist())

    def __len__(self) -> int:
        return len(self.rank_indices(self.epoch)) - self.start

    def state_dict(self, consumed: int | None = None) -> dict[str, Any]:
        return {
            "epoch": self.epoch,
            "consumed": self.start if consumed is None else consumed,
            "fingerprint": self.fingerprint(),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if state.get("fingerprint") != self.fingerprint():
            raise DataError(
                "sampler state does not match this run (dataset size, seed, order, dp size or "
                f"weights changed): saved {state.get('fingerprint')}, now {self.fingerprint()}"
            )
        self.epoch = int(state["epoch"])
        self.start = int(state["consumed"])

    def mixture_table(self) -> list[dict[str, Any]]:
        return []


class InternRepoSampler(_ResumableSampler):
    """This DP rank's pack indices, in consumption order (InternEvo's or XTuner's order).

    ``micro_num`` is the number of packs one rank consumes per optimizer step
    (InternEvo's micro_num; evotune passes accumulative_counts * batch_size).
    ``dp_size``/``dp_rank`` None means a single data-parallel rank unless the
    trainer fills them in from the run's parallel layout.
    """

    def __init__(
        self,
        dataset: PackedDataset,
        shuffle: bool = True,
        seed: int = 1024,
        order: SamplerOrder = "internevo",
        micro_num: int = 1,
        dp_size: int | None = None,
        dp_rank: int | None = None,
        dataset_weights: Mapping[str, float] | None = None,
    ):
        if order not in ("internevo", "xtuner"):
            raise DataError(f"InternRepoSampler order={order!r}: choose 'internevo' or 'xtuner'")
        self.dataset = dataset
        self.shuffle = shuffle
        self.seed = seed
        self.order = order
        self.micro_num = micro_num
        self.dp_size = 1 if dp_size is None else dp_size
        self.dp_rank = 0 if dp_rank is None else dp_rank
        if not 0 <= self.dp_rank < self.dp_size:
            raise DataError(f"dp_rank={self.dp_rank} must be in [0, dp_size={self.dp_size})")
        self.dataset_weights = dict(dataset_weights) if dataset_weights else None
        self.subsets = mixture_subsets(dataset, self.dataset_weights) if dataset_weights else []
        self.epoch = 0
        self.start = 0
        self._cache: tuple[int, np.ndarray] | None = None

    # -- orders ----------------------------------------------------------------

    def _candidates(self, rng: np.random.RandomState) -> np.ndarray:
        if self.dataset_weights is None:
            return np.arange(len(self.dataset), dtype=np.int64)
        return draw_mixture(self.subsets, rng)

    def global_order(self, epoch: int) -> np.ndarray:
        """Epoch ``epoch``'s order over all ranks, truncated as InternEvo/XTuner truncate."""
        if self.order == "internevo":
            # One RandomState for the whole run: epoch e is the (e+1)-th shuffle.
            rng = np.random.RandomState(self.seed)
            for _ in range(epoch + 1):
                order = self._candidates(rng)
                if self.shuffle:
                    rng.shuffle(order)
            unit = self.micro_num * self.dp_size
        else:
            rng = np.random.RandomState(self.seed + epoch)
            order = self._candidates(rng)
            if self.shuffle:
                rng.shuffle(order)
            unit = self.dp_size
        return order[: len(order) // unit * unit]

    def rank_indices(self, epoch: int) -> np.ndarray:
        if self._cache is None or self._cache[0] != epoch:
            self._cache = (epoch, self.global_order(epoch)[self.dp_rank :: self.dp_size])
        return self._cache[1]

    def fingerprint(self) -> dict[str, Any]:
        return {
            "num_packs": len(self.dataset),
            "seed": self.seed,
            "order": self.order,
            "shuffle": self.shuffle,
            "micro_num": self.micro_num,
            "dp_size": self.dp_size,
            "dataset_weights": self.dataset_weights,
        }

    def mixture_table(self) -> list[dict[str, Any]]:
        """Realised mixture per subset: packs and tokens per epoch and their share."""
        rows = []
        expected = [s.weight * len(s.packs) for s in self.subsets]
        total = sum(expected) or 1.0
        for subset, packs in zip(self.subsets, expected, strict=True):
            rows.append(
                {
                    "subset": subset.key,
                    "weight": subset.weight,
                    "available_packs": len(subset.packs),
                    "packs_per_epoch": round(packs, 2),
                    "tokens_per_epoch": round(packs * self.dataset.packed_length),
                    "share": packs / total,
                }
            )
        return rows


class SequenceParallelSampler(_ResumableSampler):
    """XTuner's seeded sampler over data-parallel ranks (torch.randperm, seed + epoch).

    Ranks of one sequence-parallel group share a DP rank, so they read the same
    packs. The order is padded by repetition to a multiple of dp_size (round_up).
    """

    def __init__(
        self,
        dataset: PackedDataset,
        shuffle: bool = True,
        seed: int | None = None,
        round_up: bool = True,
        dp_size: int | None = None,
        dp_rank: int | None = None,
    ):
        self.dataset = dataset
        self.shuffle = shuffle
        self.seed = 0 if seed is None else seed
        self.round_up = round_up
        self.dp_size = 1 if dp_size is None else dp_size
        self.dp_rank = 0 if dp_rank is None else dp_rank
        self.epoch = 0
        self.start = 0

    def rank_indices(self, epoch: int) -> np.ndarray:
        count = len(self.dataset)
        if self.shuffle:
            generator = torch.Generator()
            generator.manual_seed(self.seed + epoch)
            order = torch.randperm(count, generator=generator).numpy().astype(np.int64)
        else:
            order = np.arange(count, dtype=np.int64)
        if self.round_up:
            total = math.ceil(count / self.dp_size) * self.dp_size
            order = np.resize(order, total)
        else:
            total = count
        return order[self.dp_rank : total : self.dp_size]

    def fingerprint(self) -> dict[str, Any]:
        return {
            "num_packs": len(self.dataset),
            "seed": self.seed,
            "shuffle": self.shuffle,
            "dp_size": self.dp_size,
        }
