"""Online packing of ftdp shards into fixed-length rows (docs/packing.md).

Every shard is packed on its own: its kept samples are permuted with
``RandomState(seed)``, concatenated into one stream and cut into packs of
``packed_length`` tokens (the tail is dropped). The plan is a few numpy arrays
per shard (byte offsets and cumulative lengths in stream order); building a pack
parses only the lines it touches.

Labels are stored already shifted in every mode: ``labels[t]`` is the target of
position ``t`` (-100: none), so the loss never shifts again.

Bad samples (``on_bad_sample``). The plan reads only the ``.meta`` files, so a line
that turns out to be bad is found when a pack that needs it is built:

* ``"error"`` (default): BadSampleError naming ``file:line`` and the reason.
* ``"skip"``: the sample keeps its place and its meta length in the file's stream,
  but every one of its tokens becomes 0: input id 0 and never a target (its own
  labels are -100, and in xtuner mode the position before it loses the target it
  had, the sample's first token). Pack boundaries, cu_seqlens, position ids,
  type ids and every other token are those of the clean run; packs that hold none
  of its tokens are byte-identical. The first meeting of each bad sample is logged
  as a warning; ``bad_sample_counts()`` gives the distinct bad samples met per
  file. In this mode each item also carries ``"bad_samples"``: the
  ``(path, line, reason)`` records met while building it, so a process that reads
  through DataLoader workers can count them with ``note_bad_samples``.
  A broken index (an offset past the end or inside a line) is an error in both
  modes: no sample of that file can be trusted.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from ..config.schema import OnBadSample, choices
from ..errors import ConfigError
from .ftdp import BadSampleError, DataError, ShardIndex, ShardReader, TokenizedCorpus

logger = logging.getLogger(__name__)

IGNORE_INDEX = -100
PACKING_SEED = 1024
PackMode = Literal["internevo", "internevo_into_one", "xtuner"]
PACK_MODES: tuple[str, ...] = ("internevo", "internevo_into_one", "xtuner")
ON_BAD_SAMPLE = choices(OnBadSample)
BadSampleRecord = tuple[str, int, str]  # (shard path, 1-based line, reason)


@dataclass(frozen=True)
class ShardPlan:
    """One shard's samples in stream order and the packs they fill."""

    shard: ShardIndex
    stream_order: np.ndarray  # index into the shard's kept samples, int32
    stream_ends: np.ndarray  # cumulative token count after each sample, int64
    num_packs: int


class PackedDataset:
    """Packs of an ftdp corpus; item i is a dict of int64 numpy arrays (docs/packing.md).

    Keys: input_ids, labels (shifted), position_ids, type_ids (length packed_length)
    and cu_seqlens (segment boundaries from 0 to packed_length); with
    ``on_bad_sample="skip"`` also bad_samples (see the module docstring).
    """

    def __init__(
        self,
        corpus: TokenizedCorpus,
        packed_length: int,
        seed: int = PACKING_SEED,
        pack_mode: PackMode = "internevo",
        max_length_per_sample: int | None = None,
        on_bad_sample: OnBadSample = "error",
    ):
        if on_bad_sample not in ON_BAD_SAMPLE:
            raise ConfigError(
                f"on_bad_sample={on_bad_sample!r}: choose one of {', '.join(ON_BAD_SAMPLE)}"
            )
        if pack_mode not in PACK_MODES:
            raise DataError(f"pack_mode={pack_mode!r}: choose one of {', '.join(PACK_MODES)}")
        if packed_length < 1:
            raise DataError(f"packed_length must be >= 1, got {packed_length}")
        segment_limit = packed_length if max_length_per_sample is None else max_length_per_sample
        if segment_limit < 1 or segment_limit > packed_length:
            raise DataError(
                f"max_length_per_sample={max_length_per_sample} must be in [1, packed_length="
                f"{packed_length}]"
            )
        if pack_mode == "internevo_into_one" and packed_length % segment_limit:
            raise DataError(
                f"pack_mode='internevo_into_one' needs packed_length ({packed_length}) to be a "
                f"multiple of max_length_per_sample ({segment_limit}): InternEvo packs micro_bsz "
                "windows of seq_len"
            )
        self.corpus = corpus
        self.packed_length = packed_length
        self.seed = seed
        self.pack_mode: PackMode = pack_mode
        self.segment_limit = packed_length if pack_mode == "xtuner" else segment_limit
        self.plans = tuple(self._plan(shard) for shard in corpus.shards)
        self.pack_starts = np.cumsum([0] + [p.num_packs for p in self.plans], dtype=np.int64)
        self.vocab_size: int | None = None  # set by the trainer from the model's embeddings
        self.on_bad_sample: OnBadSample = on_bad_sample
        self._bad_samples: dict[str, dict[int, str]] = {}
        self._reader = ShardReader()
        for plan in self.plans:
            if plan.num_packs == 0:
                logger.info(
                    "%s: %d tokens, fewer than one pack of %d; contributes nothing",
                    plan.shard.path,
                    plan.shard.num_tokens,
                    packed_length,
                )

    def _plan(self, shard: ShardIndex) -> ShardPlan:
        order = np.random.RandomState(self.seed).permutation(shard.num_samples).astype(np.int32)
        ends = np.cumsum(shard.lengths[order], dtype=np.int64)
        total = int(ends[-1]) if len(ends) else 0
        return ShardPlan(shard, order, ends, total // self.packed_length)

    # -- sizes -----------------------------------------------------------------

    def __len__(self) -> int:
        return int(self.pack_starts[-1])

    @property
    def num_tokens(self) -> int:
        return len(self) * self.packed_length

    def shard_of_pack(self, index: int) -> int:
        return int(np.searchsorted(self.pack_starts, index, side="right") - 1)

    def pack_shard_ids(self) -> np.ndarray:
        """Shard index of every pack (int32, length len(self))."""
        counts = [p.num_packs for p in self.plans]
        return np.repeat(np.arange(len(self.plans), dtype=np.int32), counts)

    def index_bytes(self) -> int:
        """Bytes held by the index and pack plan (numpy arrays only)."""
        total = 0
        for plan in self.plans:
            shard = plan.shard
            total += shard.line_numbers.nbytes + shard.offsets.nbytes + shard.lengths.nbytes
            total += plan.stream_order.nbytes + plan.stream_ends.nbytes
        return total + self.pack_starts.nbytes

    # -- items -----------------------------------------------------------------

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        if not 0 <= index < len(self):
            raise IndexError(f"pack {index} out of range [0, {len(self)})")
        shard_id = self.shard_of_pack(index)
        plan = self.plans[shard_id]
        pack = index - int(self.pack_starts[shard_id])
        return self.build_pack(plan, pack)

    def build_pack(self, plan: ShardPlan, pack: int) -> dict[str, np.ndarray]:
        length = self.packed_length
        start, stop = pack * length, (pack + 1) * length
        first = int(np.searchsorted(plan.stream_ends, start, side="right"))
        last = int(np.searchsorted(plan.stream_ends, stop, side="left"))
        tokens = np.empty(length, dtype=np.int64)
        labels = np.empty(length, dtype=np.int64)
        fragment_ends = []
        bad_samples: list[BadSampleRecord] = []
        cursor = 0
        samples = self._read_samples(plan.shard, plan.stream_order[first : last + 1], bad_samples)
        for position, sample in zip(range(first, last + 1), samples, strict=True):
            sample_end = int(plan.stream_ends[position])
            sample_start = sample_end - len(sample)
            low = max(start, sample_start) - sample_start
            high = min(stop, sample_end) - sample_start
            size = high - low
            tokens[cursor : cursor + size] = sample[low:high]
            if self.pack_mode == "internevo":
                # Targets run inside the sample: a fragment cut at the pack edge keeps
                # the sample's true next token as its last target.
                targets = sample[low + 1 : high + 1]
                labels[cursor : cursor + len(targets)] = targets
                labels[cursor + len(targets) : cursor + size] = IGNORE_INDEX
            elif self.pack_mode == "internevo_into_one":
                labels[cursor : cursor + size - 1] = sample[low + 1 : high]
                labels[cursor + size - 1] = IGNORE_INDEX
            cursor += size
            fragment_ends.append(cursor)
        assert cursor == length, (cursor, length)
        if self.pack_mode == "xtuner":
            trainable = np.where(tokens > 0, tokens, IGNORE_INDEX)
            labels[:-1] = trainable[1:]
            labels[-1] = IGNORE_INDEX
        else:
            labels = np.where(labels > 0, labels, IGNORE_INDEX)
        cu_seqlens = self._segment_boundaries(fragment_ends)
        item: dict[str, Any] = {
            "input_ids": np.abs(tokens),
            "labels": labels,
            "position_ids": positions_from_boundaries(cu_seqlens),
            "cu_seqlens": cu_seqlens,
            "type_ids": np.full(length, plan.shard.type_id, dtype=np.int64),
        }
        if self.on_bad_sample == "skip":
            item["bad_samples"] = tuple(bad_samples)
        return item

    def _read_samples(
        self, shard: ShardIndex, sample_indices: np.ndarray, bad_samples: list[BadSampleRecord]
    ) -> list[np.ndarray]:
        together = self._reader.read_many(shard, sample_indices, self.vocab_size)
        if together is not None:
            return together
        # some line needs a closer look: one by one, with read's exact errors
        return [self._read(shard, int(index), bad_samples) for index in sample_indices]

    def _read(
        self, shard: ShardIndex, sample_index: int, bad_samples: list[BadSampleRecord]
    ) -> np.ndarray:
        try:
            return self._reader.read(shard, sample_index, self.vocab_size)
        except BadSampleError as error:
            if self.on_bad_sample == "error":
                raise
            record = (error.path, error.line, error.reason)
            bad_samples.append(record)
            self.note_bad_samples([record])
            # same length as its meta row, so the plan and every other token stay put
            return np.zeros(int(shard.lengths[sample_index]), dtype=np.int64)

    def note_bad_samples(self, records: Iterable[BadSampleRecord]) -> None:
        """Count bad samples (each distinct file:line once); log the first meeting of each."""
        for path, line, reason in records:
            seen = self._bad_samples.setdefault(path, {})
            if line not in seen:
                seen[line] = reason
                logger.warning("%s:%d: %s; skipped (on_bad_sample='skip')", path, line, reason)

    def bad_sample_counts(self) -> dict[str, int]:
        """Distinct bad samples met so far, per shard path (only files that had one)."""
        return {path: len(lines) for path, lines in self._bad_samples.items()}

    def bad_samples(self) -> list[BadSampleRecord]:
        """Every distinct bad sample met so far as (path, line, reason), in file and line order."""
        return sorted(
            (path, line, reason)
            for path, lines in self._bad_samples.items()
            for line, reason in lines.items()
        )

    def _segment_boundaries(self, fragment_ends: list[int]) -> np.ndarray:
        limit = self.segment_limit
        if self.pack_mode == "internevo_into_one":
            return np.arange(0, self.packed_length + 1, limit, dtype=np.int64)
        boundaries = [0]
        for end in fragment_ends:
            begin = boundaries[-1]
            boundaries.extend(range(begin + limit, end, limit))
            boundaries.append(end)
        return np.asarray(boundaries, dtype=np.int64)

    def attention_windows(self) -> np.ndarray:
        """Boundaries used when use_varlen_attn=False: fixed windows, no sample edges."""
        return np.arange(0, self.packed_length + 1, self.segment_limit, dtype=np.int64)

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_reader"] = ShardReader()
        return state

    def describe(self) -> Mapping[str, Any]:
        return {
            "shards": len(self.plans),
            "samples": self.corpus.num_samples,
            "tokens": self.corpus.num_tokens,
            "packs": len(self),
            "packed_length": self.packed_length,
            "pack_mode": self.pack_mode,
            "max_length_per_sample": self.segment_limit,
        }


def positions_from_boundaries(cu_seqlens: np.ndarray) -> np.ndarray:
    """Position ids that restart at 0 at every segment start."""
    lengths = np.diff(cu_seqlens)
    starts = np.repeat(cu_seqlens[:-1], lengths)
    return np.arange(int(cu_seqlens[-1]), dtype=np.int64) - starts


def build_packed_dataset(
    dataset_cfg: Mapping[str, Any] | TokenizedCorpus,
    packed_length: int,
    seed: int = PACKING_SEED,
    pack_mode: PackMode = "internevo",
    max_length_per_sample: int | None = None,
    on_bad_sample: OnBadSample = "error",
) -> PackedDataset:
    """Index an ftdp folder and plan its packs (the name XTuner configs use).

    ``on_bad_sample``: "error" or "skip", defined in this module's docstring.
    """
    from ..config import build_component

    corpus = build_component(dataset_cfg) if isinstance(dataset_cfg, Mapping) else dataset_cfg
    if not isinstance(corpus, TokenizedCorpus):
        raise DataError(
            "build_packed_dataset(dataset_cfg=...) must be "
            "dict(type=load_intern_repo_tokenized_dataset, folder=...)"
        )
    return PackedDataset(
        corpus, packed_length, seed, pack_mode, max_length_per_sample, on_bad_sample
    )
