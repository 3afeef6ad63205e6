"""Pack orders: InternEvo's StaticBatchSampler and XTuner's samplers (docs/sampling.md).

A sampler yields the pack indices one data-parallel rank consumes, in order.
All ranks of one sequence-parallel group share a DP rank and so get the same
packs. ``set_epoch(e)`` gives epoch e's order whatever ran before (the shuffles
are replayed from the seed), and ``state_dict`` / ``load_state_dict`` carry the
position inside an epoch for exact resume.

Positions and re-splitting (elastic resume)
-------------------------------------------
Epoch e has one *global order* ``epoch_order(e)``: the seeded shuffle of its packs
(dataset_weights draws included), which depends on no layout. A layout
(``dp_size``, ``micro_num``) reads it from a global offset ``G`` (0 when the epoch
starts): the *rest* ``epoch_order(e)[G:]`` is cut to the layout's unit (InternEvo
order: truncated to a multiple of ``micro_num * dp_size``; XTuner order: of
``dp_size``; SequenceParallelSampler: padded to a multiple of ``dp_size`` by
repeating the epoch's order from its start, or left as is without round_up), and
rank r reads ``rest[r::dp_size]``. Every rank consumes its list in lockstep, so
after each rank consumed c packs the whole job has consumed exactly the first
``G + c * dp_size`` packs of the global order: that number, ``global_consumed``,
is saved with every state.

Loading a state saved under another layout (``relayout=True``, used by engines
whose checkpoints reshard) re-splits the epoch at ``G = global_consumed``: the
packs already consumed by the whole job are neither repeated nor skipped, the
global order stays the same and only the split of the rest over the new ranks
changes; this rank's position restarts at 0 in its new list. The unit cut then
applies to what is left, so at most unit-1 packs at the very end of that epoch
differ from an uninterrupted run when the unit changed (none when it is the same:
for the InternEvo order the same global batch ``micro_num * dp_size``, as when
moving from 2 processes x accumulative_counts 1 to 1 process x 2; for the XTuner
order the same ``dp_size``). Later epochs are split
from their start as usual. Under an unchanged layout the rest from G is exactly
the uninterrupted run's list, so a same-layout resume keeps its old position.
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
    """Group packs by their longest matching key (docs/sampling.md#dataset_weights)."""
    weights = dict(dataset_weights or {})
    for key, weight in weights.items():
        if weight < 0 or not math.isfinite(weight):
            raise DataError(f"dataset_weights[{key!r}] = {weight}: weights must be finite and >= 0")
    keys = sorted(weights, key=len, reverse=True)
    shard_key: list[str | None] = []
    matched: set[str] = set()
    for plan in dataset.plans:
        relative = plan.shard.relative_path
        found = next((k for k in keys if _is_under(relative, k)), None)
        shard_key.append(found)
        if found is not None:
            matched.add(found)
    unmatched = [k for k in weights if k not in matched]
    if unmatched:
        raise DataError(
            f"dataset_weights key {unmatched[0]!r} matches no shard under {dataset.corpus.folder}; "
            "keys are folder paths relative to the dataset folder (e.g. 'en/wiki')"
        )
    pack_shards = dataset.pack_shard_ids()
    subsets = []
    subset_keys: list[str | None] = [*sorted(matched), None]
    for subset_key in subset_keys:
        shard_ids = [i for i, k in enumerate(shard_key) if k == subset_key]
        packs = np.flatnonzero(np.isin(pack_shards, shard_ids)).astype(np.int64)
        if subset_key is None and len(packs) == 0:
            continue
        subsets.append(
            Subset(
                key=subset_key if subset_key is not None else "(unweighted)",
                weight=weights[subset_key] if subset_key is not None else 1.0,
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


LAYOUT_KEYS = ("dp_size", "micro_num")
"""Fingerprint entries that describe the layout: a re-split may change them."""


class _ResumableSampler:
    """The epoch / position protocol shared by evotune's samplers.

    Subclasses define ``epoch_order(epoch)`` (the layout-free global order),
    ``_rest(order, offset)`` (what this layout reads of it from a global offset)
    and ``fingerprint()`` (what must not change across a resume).
    """

    dataset: PackedDataset
    dp_size: int
    dp_rank: int
    epoch: int
    start: int
    resplit: tuple[int, int] | None = None  # (epoch, global offset) of a re-split
    _cache: tuple[tuple[int, int], np.ndarray] | None = None  # (epoch, offset) -> rank list

    def epoch_order(self, epoch: int) -> np.ndarray:
        raise NotImplementedError

    def _rest(self, order: np.ndarray, offset: int) -> np.ndarray:
        raise NotImplementedError

    def fingerprint(self) -> dict[str, Any]:
        raise NotImplementedError

    def offset(self, epoch: int) -> int:
        """Global offset where this layout's split of ``epoch`` starts (0 unless re-split)."""
        return self.resplit[1] if self.resplit is not None and self.resplit[0] == epoch else 0

    def layout_order(self, epoch: int) -> np.ndarray:
        """The packs of ``epoch`` this layout reads, over all ranks, in global order."""
        return self._rest(self.epoch_order(epoch), self.offset(epoch))

    def rank_indices(self, epoch: int) -> np.ndarray:
        """This DP rank's packs of ``epoch``, in consumption order."""
        key = (epoch, self.offset(epoch))
        if self._cache is None or self._cache[0] != key:
            self._cache = (key, self.layout_order(epoch)[self.dp_rank :: self.dp_size])
        return self._cache[1]

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

    def global_consumed(self, epoch: int, consumed: int) -> int:
        """Packs of ``epoch``'s global order the whole job consumed when each rank consumed
        ``consumed`` of its list (ranks advance in lockstep)."""
        return self.offset(epoch) + consumed * self.dp_size

    def state_dict(self, consumed: int | None = None) -> dict[str, Any]:
        consumed = self.start if consumed is None else consumed
        return {
            "epoch": self.epoch,
            "consumed": consumed,
            "global_consumed": self.global_consumed(self.epoch, consumed),
            "resplit": list(self.resplit) if self.resplit is not None else None,
            "fingerprint": self.fingerprint(),
        }

    def load_state_dict(self, state: Mapping[str, Any], relayout: bool = False) -> None:
        """Continue from ``state``; with ``relayout`` the layout (dp size, micro_num) may
        differ, and the epoch is then re-split at the saved global position."""
        saved, now = dict(state.get("fingerprint") or {}), self.fingerprint()
        compared = _without_layout if relayout else dict
        if compared(saved) != compared(now):
            raise DataError(
                "sampler state does not match this run (dataset size, seed, order, dp size or "
                f"weights changed): saved {state.get('fingerprint')}, now {now}"
            )
        self.epoch = int(state["epoch"])
        if saved == now:
            resplit = state.get("resplit")
            self.resplit = (int(resplit[0]), int(resplit[1])) if resplit else None
            self.start = int(state["consumed"])
            return
        # another layout: split the rest of the epoch at the whole job's position
        if "global_consumed" in state:
            position = int(state["global_consumed"])
        else:  # a state from before global positions were saved (never re-split)
            position = int(state["consumed"]) * int(saved.get("dp_size", 1))
        self.resplit = (self.epoch, position)
        self.start = 0

    def mixture_table(self) -> list[dict[str, Any]]:
        return []


def _without_layout(fingerprint: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in fingerprint.items() if k not in LAYOUT_KEYS}


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

    # -- orders ----------------------------------------------------------------

    def _candidates(self, rng: np.random.RandomState) -> np.ndarray:
        if self.dataset_weights is None:
            return np.arange(len(self.dataset), dtype=np.int64)
        return draw_mixture(self.subsets, rng)

    def epoch_order(self, epoch: int) -> np.ndarray:
        """Epoch ``epoch``'s shuffled packs over all ranks, before any truncation."""
        if self.order == "internevo":
            # One RandomState for the whole run: epoch e is the (e+1)-th shuffle.
            rng = np.random.RandomState(self.seed)
            for _ in range(epoch + 1):
                order = self._candidates(rng)
                if self.shuffle:
                    rng.shuffle(order)
        else:
            rng = np.random.RandomState(self.seed + epoch)
            order = self._candidates(rng)
            if self.shuffle:
                rng.shuffle(order)
        return order

    def _rest(self, order: np.ndarray, offset: int) -> np.ndarray:
        unit = self.micro_num * self.dp_size if self.order == "internevo" else self.dp_size
        rest = order[offset:]
        return rest[: len(rest) // unit * unit]

    def global_order(self, epoch: int) -> np.ndarray:
        """Epoch ``epoch``'s order over all ranks, truncated as InternEvo/XTuner truncate."""
        return self.layout_order(epoch)

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

    def epoch_order(self, epoch: int) -> np.ndarray:
        count = len(self.dataset)
        if not self.shuffle:
            return np.arange(count, dtype=np.int64)
        generator = torch.Generator()
        generator.manual_seed(self.seed + epoch)
        return torch.randperm(count, generator=generator).numpy().astype(np.int64)

    def _rest(self, order: np.ndarray, offset: int) -> np.ndarray:
        rest = order[offset:]
        if not self.round_up or len(rest) == 0:
            return rest
        # padding repeats the epoch's order from its start, as XTuner pads the whole order
        padding = -len(rest) % self.dp_size
        return np.concatenate([rest, np.resize(order, padding)])

    def fingerprint(self) -> dict[str, Any]:
        return {
            "num_packs": len(self.dataset),
            "seed": self.seed,
            "shuffle": self.shuffle,
            "dp_size": self.dp_size,
        }
