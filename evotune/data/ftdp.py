"""InternEvo tokenized ("ftdp") shards: discovery, .meta indexes, lazy token reads.

Startup reads only the ``.bin.meta`` files. Token lines are parsed when a pack
that needs them is built, from a memory map of the shard, so any rank (or
DataLoader worker) can build the index independently in seconds.
"""

from __future__ import annotations

import logging
import mmap
import os
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import orjson

from ..errors import DataError

logger = logging.getLogger(__name__)


class BadSampleError(DataError):
    """One sample that cannot be used as written, while its shard's index is sound.

    Raised for a line that is not JSON, has no ``"tokens"`` list of integers, holds a
    different number of tokens than its meta row, or an id outside the vocabulary.
    ``on_bad_sample="skip"`` catches exactly these; a broken index (an offset past the
    end or inside a line) stays a plain DataError because no sample can be trusted.
    """

    def __init__(self, path: str, line: int, reason: str):
        super().__init__(f"{path}:{line}: {reason}")
        self.path = path
        self.line = line
        self.reason = reason


class TokenLineError(ValueError):
    """Why one ``.bin`` line holds no token list; the message carries no location."""


def decode_tokens(raw: bytes) -> np.ndarray:
    """The token ids (int64, signs kept) of one ``.bin`` line; TokenLineError if there are none.

    JSON ``true``/``false``, floats and strings are refused, not converted: the type test
    is one C-level pass (``set(map(type, ...))``), not a Python loop per token, which made
    up more than half of a pack's build time.
    """
    try:
        record = orjson.loads(raw)
    except orjson.JSONDecodeError as error:
        raise TokenLineError(f"not a JSON line ({error}); fix or drop the line") from None
    if type(record) is not dict or "tokens" not in record:
        raise TokenLineError("the JSON object has no 'tokens' key")
    tokens = record["tokens"]
    if type(tokens) is not list or (tokens and set(map(type, tokens)) != {int}):
        raise TokenLineError("'tokens' must be a list of integers")
    try:
        return np.asarray(tokens, dtype=np.int64)
    except OverflowError:
        raise TokenLineError("'tokens' holds an integer outside the 64-bit range") from None


_TOKENS_PREFIX = np.frombuffer(b'{"tokens":', dtype=np.uint8)
_DIGIT_NIBBLES = np.uint64(0x0F0F0F0F0F0F0F0F)


def decode_canonical_lines(buffer: bytes) -> tuple[np.ndarray, np.ndarray] | None:
    """Token ids of many ``.bin`` lines in one vectorised pass; None unless all are canonical.

    ``buffer`` holds whole lines, each ending with a newline. Canonical means exactly
    ``{"tokens":[...]}`` or ``{"tokens": [...]}`` holding JSON integers of at most 8
    digits separated by ``,`` or ``, `` (what InternEvo's and evotune's writers
    produce): a strict subset of JSON, so every accepted line is one that
    ``decode_tokens`` accepts with the same ids. Anything else (other keys, other
    spacing, a bad line) gives None and the caller reads those lines one by one.
    Returns (the ids of all lines concatenated, int64; the number of ids per line).
    No Python object is made per token, which is what makes ``data check`` fast.
    """
    data = np.frombuffer(buffer, dtype=np.uint8)
    if sys.byteorder != "little" or len(data) < 14 or data[-1] != 0x0A:
        return None
    ends = np.flatnonzero(data == 0x0A)
    starts = np.concatenate(([0], ends[:-1] + 1))
    if np.any(ends - starts < 13):
        return None
    spaced = data[starts + 10] == 0x20
    if not (
        np.all(data[starts[:, None] + np.arange(10)] == _TOKENS_PREFIX)
        and np.all(data[starts + 10 + spaced] == 0x5B)  # [
        and np.all(data[ends - 2] == 0x5D)  # ]
        and np.all(data[ends - 1] == 0x7D)  # }
    ):
        return None
    digit = (data >= 0x30) & (data <= 0x39)
    minus, comma, space = data == 0x2D, data == 0x2C, data == 0x20
    # the 14 wrapper bytes of every line, just verified, are the only other bytes
    if len(data) - np.count_nonzero(digit | minus | comma | space) != 14 * len(ends):
        return None
    space[starts[spaced] + 10] = False  # the wrapper's own space; the rest lie in bodies
    opening = data == 0x5B
    here, before, after = slice(1, -1), slice(None, -2), slice(2, None)
    misplaced = minus[here] & ~(digit[after] & (comma[before] | space[before] | opening[before]))
    misplaced |= comma[here] & ~(digit[before] & (digit[after] | minus[after] | space[after]))
    misplaced |= space[here] & ~(comma[before] & (digit[after] | minus[after]))
    if misplaced.any():
        return None
    edges = np.flatnonzero(digit[1:] != digit[:-1]) + 1  # digit runs: start, end, start, ...
    run_starts, run_ends = edges[0::2], edges[1::2]
    widths = run_ends - run_starts
    if len(widths) and (widths.max() > 8 or np.any((data[run_starts] == 0x30) & (widths > 1))):
        return None  # more than 8 digits, or a leading zero (not JSON): read line by line
    # each id's last 8 bytes as one little-endian word; keep its digits' low nibbles and
    # combine them pairwise (SWAR): 8 digits -> 4 two-digit -> 2 four-digit -> 1 number
    words = np.ndarray(shape=(len(data) - 7,), dtype=np.uint64, buffer=buffer, strides=(1,))
    value = words[run_ends - 8] & (_DIGIT_NIBBLES << ((8 - widths) * 8).astype(np.uint64))
    value = ((value * np.uint64(10 * 256 + 1)) >> np.uint64(8)) & np.uint64(0x00FF00FF00FF00FF)
    value = ((value * np.uint64(100 * 65536 + 1)) >> np.uint64(16)) & np.uint64(0x0000FFFF0000FFFF)
    value = (value * np.uint64(10000 * 2**32 + 1)) >> np.uint64(32)
    ids = value.view(np.int64)
    ids = np.where(data[run_starts - 1] == 0x2D, -ids, ids)
    counts = np.diff(np.searchsorted(run_starts, np.concatenate(([0], ends))))
    return ids, counts


def vocab_problem(tokens: np.ndarray, vocab_size: int) -> str | None:
    """A reason when some ``abs(id) >= vocab_size`` (the model input is ``abs(id)``), else None."""
    if len(tokens) == 0 or (tokens.max() < vocab_size and tokens.min() > -vocab_size):
        return None
    largest = int(np.abs(tokens).max())
    return (
        f"token id {largest} >= the model's vocab size {vocab_size}; "
        "the data was tokenized for another model"
    )


@dataclass(frozen=True)
class ShardIndex:
    """The kept samples of one shard, in file order.

    ``line_numbers`` are 0-based line (= meta row) indices of the kept samples;
    ``offsets`` their byte offsets; ``lengths`` their token counts.
    """

    relative_path: str
    path: str
    type_id: int
    line_numbers: np.ndarray  # int32
    offsets: np.ndarray  # int64
    lengths: np.ndarray  # int32

    @property
    def num_samples(self) -> int:
        return len(self.lengths)

    @property
    def num_tokens(self) -> int:
        return int(self.lengths.sum())


@dataclass(frozen=True)
class TokenizedCorpus:
    """What ``load_intern_repo_tokenized_dataset`` returns: the indexed shards of a folder."""

    folder: str
    shards: tuple[ShardIndex, ...]
    type_names: tuple[str, ...]

    @property
    def num_samples(self) -> int:
        return sum(s.num_samples for s in self.shards)

    @property
    def num_tokens(self) -> int:
        return sum(s.num_tokens for s in self.shards)


def load_intern_repo_tokenized_dataset(
    folder: str | os.PathLike[str],
    min_length: int = 0,
    data_order_path: str | os.PathLike[str] | None = None,
    file_type: str = ".bin",
    min_length_dict: Mapping[str, int] | None = None,
) -> TokenizedCorpus:
    """Discover and index the shards of an ftdp folder (docs/data-format.md)."""
    root = Path(folder)
    if not root.is_dir():
        raise DataError(f"{root}: dataset folder not found; check dataset_folder / folder=")
    if min_length < 0:
        raise DataError(f"min_length must be >= 0, got {min_length}")
    if data_order_path is not None:
        relative_paths = read_data_order(data_order_path, root, file_type)
    else:
        relative_paths = discover_shards(root, file_type)
    if not relative_paths:
        raise DataError(
            f"{root}: no '*{file_type}' shard in this folder; point dataset_folder at an ftdp "
            "folder (or set file_type=)"
        )
    type_names = tuple(sorted(os.listdir(root)))
    shards = []
    for relative in relative_paths:
        threshold = _min_length_for(relative, min_length, min_length_dict)
        shard = index_shard(root, relative, type_names, threshold)
        if shard.num_samples == 0:
            logger.info("%s: no sample of length >= %d; skipped", shard.path, threshold)
            continue
        shards.append(shard)
    if not shards:
        raise DataError(
            f"{root}: every sample was removed (min_length={min_length}"
            f"{', min_length_dict=' + repr(dict(min_length_dict)) if min_length_dict else ''}); "
            "lower min_length"
        )
    return TokenizedCorpus(folder=str(root), shards=tuple(shards), type_names=type_names)


def discover_shards(root: Path, file_type: str = ".bin") -> list[str]:
    """Relative '/'-joined shard paths in string order (docs/data-format.md#default-order)."""
    found = []
    for directory, _, files in os.walk(root, followlinks=True):
        for name in files:
            if name.endswith(file_type):
                relative = os.path.relpath(os.path.join(directory, name), root)
                found.append(relative.replace(os.sep, "/"))
    return sorted(found)


def read_data_order(
    order_path: str | os.PathLike[str], root: Path, file_type: str = ".bin"
) -> list[str]:
    """XTuner's data-order file: one relative shard path per line, blank lines ignored.

    A listed file that does not exist is an error; shards that are not listed are
    not loaded (and the count is logged as a warning).
    """
    order_file = Path(order_path)
    if not order_file.is_file():
        raise DataError(
            f"{order_file}: data_order_path not found; write one with 'evotune data order'"
        )
    listed: list[str] = []
    seen: set[str] = set()
    for number, line in enumerate(order_file.read_text().splitlines(), start=1):
        relative = line.strip()
        if not relative:
            continue
        if not (root / relative).is_file():
            raise DataError(
                f"{order_file}:{number}: {relative!r} does not exist under {root}; "
                "regenerate the order file or fix the path"
            )
        if relative in seen:
            raise DataError(f"{order_file}:{number}: {relative!r} is listed twice")
        seen.add(relative)
        listed.append(relative)
    unlisted = len(set(discover_shards(root, file_type)) - seen)
    if unlisted:
        logger.warning(
            "%s lists %d shards; %d other '*%s' files under %s are not loaded",
            order_file,
            len(listed),
            unlisted,
            file_type,
            root,
        )
    return listed


def write_data_order(
    folder: str | os.PathLike[str], output: str | os.PathLike[str], file_type: str = ".bin"
) -> int:
    """Write the default shard order of a folder as a data-order file; returns the count."""
    relative_paths = discover_shards(Path(folder), file_type)
    if not relative_paths:
        raise DataError(f"{folder}: no '*{file_type}' shard to list")
    destination = Path(output)
    temporary = destination.with_name(destination.name + ".tmp")
    temporary.write_text("".join(p + "\n" for p in relative_paths))
    temporary.replace(destination)
    return len(relative_paths)


def _min_length_for(relative: str, default: int, by_substring: Mapping[str, int] | None) -> int:
    if not by_substring:
        return default
    matches = [key for key in by_substring if key in relative]
    if len(matches) > 1:
        raise DataError(
            f"min_length_dict: keys {matches} all match {relative!r}; at most one key may match a file"
        )
    return by_substring[matches[0]] if matches else default


def read_meta(meta_path: str) -> np.ndarray:
    """The (rows, columns) index of a shard; 0 bytes or 0 rows mean an empty shard."""
    if os.path.getsize(meta_path) == 0:
        return np.zeros((0, 2), dtype=np.int64)
    try:
        meta = np.load(meta_path, allow_pickle=False)
    except (ValueError, OSError, EOFError) as error:
        raise DataError(
            f"{meta_path}: not a NumPy .npy index ({error}); rebuild the .meta"
        ) from None
    if meta.size == 0:
        return np.zeros((0, 2), dtype=np.int64)
    if meta.ndim != 2 or meta.shape[1] < 2 or not np.issubdtype(meta.dtype, np.integer):
        raise DataError(
            f"{meta_path}: expected a 2-D integer array (offset, ..., length), got "
            f"shape {meta.shape} dtype {meta.dtype}; rebuild the .meta"
        )
    return meta


def index_shard(
    root: Path, relative: str, type_names: Sequence[str], min_length: int = 0
) -> ShardIndex:
    path = root / relative
    top_level = relative.split("/")[0]
    if "/" not in relative:
        raise DataError(
            f"{path}: every shard must lie under a top-level type folder (cn/, en/, ...); move it"
        )
    resolved = os.path.realpath(path)
    meta_path = resolved + ".meta"
    if not os.path.exists(meta_path):
        raise DataError(
            f"{path}: missing index {meta_path}; rebuild it with 'evotune data tokenize'"
        )
    meta = read_meta(meta_path)
    offsets = meta[:, 0].astype(np.int64)
    lengths = meta[:, -1].astype(np.int64)
    _check_meta_against_file(resolved, meta_path, offsets, lengths)
    keep = np.flatnonzero(lengths >= min_length) if min_length > 0 else np.arange(len(lengths))
    return ShardIndex(
        relative_path=relative,
        path=resolved,
        type_id=type_names.index(top_level),
        line_numbers=keep.astype(np.int32),
        offsets=offsets[keep],
        lengths=lengths[keep].astype(np.int32),
    )


def _check_meta_against_file(
    path: str, meta_path: str, offsets: np.ndarray, lengths: np.ndarray
) -> None:
    """Cheap startup checks (O(1) reads): the meta fits the file and ends on its last line.

    Full per-line checks happen as lines are read; ``evotune data check``
    reads every line.
    """
    if len(offsets) == 0:
        return
    size = os.path.getsize(path)
    if np.any(lengths < 0) or np.any(offsets < 0):
        raise DataError(f"{meta_path}: negative offset or length; rebuild the .meta")
    if len(offsets) > 1 and np.any(np.diff(offsets) <= 0):
        row = int(np.flatnonzero(np.diff(offsets) <= 0)[0]) + 1
        raise DataError(f"{meta_path}: row {row}: offsets must increase; rebuild the .meta")
    if offsets[0] != 0:
        raise DataError(f"{meta_path}: row 0 offset is {offsets[0]}, expected 0; rebuild the .meta")
    last = int(offsets[-1])
    if last >= size:
        raise DataError(
            f"{meta_path}: row {len(offsets) - 1} offset {last} is past the end of {path} "
            f"({size} bytes); the meta does not belong to this .bin"
        )
    with open(path, "rb") as handle:
        handle.seek(last - 1 if last > 0 else 0)
        tail = handle.read(size - last + 1 if last > 0 else size)
    body = tail[1:] if last > 0 else tail
    if last > 0 and tail[:1] != b"\n":
        raise DataError(
            f"{meta_path}: row {len(offsets) - 1} offset {last} points into the middle of a line "
            f"of {path}; rebuild the .meta"
        )
    newline = body.find(b"\n")
    if newline != -1 and newline != len(body) - 1:
        lines_after = body.count(b"\n", newline + 1) + (0 if body.endswith(b"\n") else 1)
        raise DataError(
            f"{meta_path}: has {len(offsets)} rows but {path} has at least "
            f"{len(offsets) + lines_after} lines; rebuild the .meta"
        )


class ShardReader:
    """Reads samples of shards through per-process memory maps; safe to pickle."""

    def __init__(self) -> None:
        self._maps: dict[str, mmap.mmap] = {}

    def __getstate__(self) -> dict[str, object]:
        return {}

    def __setstate__(self, state: dict[str, object]) -> None:
        self._maps = {}

    def _map(self, path: str) -> mmap.mmap:
        mapped = self._maps.get(path)
        if mapped is None:
            with open(path, "rb") as handle:
                mapped = mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ)
            self._maps[path] = mapped
        return mapped

    def read(self, shard: ShardIndex, sample: int, vocab_size: int | None = None) -> np.ndarray:
        """Tokens (int64, sign kept) of the shard's ``sample``-th kept sample, checked.

        BadSampleError for a bad line (see there), with ``vocab_size`` also for an id
        outside the vocabulary; DataError when the meta offset cannot be a line start.
        """
        mapped = self._map(shard.path)
        offset = int(shard.offsets[sample])
        line = int(shard.line_numbers[sample]) + 1
        if offset >= len(mapped):
            raise DataError(
                f"{shard.path}:{line}: meta offset {offset} is past the end of the file; "
                "rebuild the .meta"
            )
        if offset > 0 and mapped[offset - 1] != 0x0A:
            raise DataError(
                f"{shard.path}:{line}: meta offset {offset} points into the middle of a line; "
                "rebuild the .meta"
            )
        end = mapped.find(b"\n", offset)
        try:
            tokens = decode_tokens(mapped[offset : end if end != -1 else len(mapped)])
        except TokenLineError as error:
            raise BadSampleError(shard.path, line, str(error)) from None
        expected = int(shard.lengths[sample])
        if len(tokens) != expected:
            raise BadSampleError(
                shard.path,
                line,
                f"{len(tokens)} tokens but the meta says {expected}; rebuild the .meta",
            )
        if vocab_size is not None:
            problem = vocab_problem(tokens, vocab_size)
            if problem is not None:
                raise BadSampleError(shard.path, line, problem)
        return tokens

    def read_many(
        self,
        shard: ShardIndex,
        samples: Sequence[int] | np.ndarray,
        vocab_size: int | None = None,
    ) -> list[np.ndarray] | None:
        """``read`` for several samples in one vectorised pass; None if any needs ``read``.

        None whenever a line is not canonical (``decode_canonical_lines``), holds another
        number of ids than its meta row or an id outside the vocabulary, or its offset
        is not a line start: the caller then reads sample by sample and gets ``read``'s
        exact errors. Same ids as ``read`` otherwise.
        """
        mapped = self._map(shard.path)
        lines = []
        for sample in samples:
            offset = int(shard.offsets[sample])
            if offset >= len(mapped) or (offset > 0 and mapped[offset - 1] != 0x0A):
                return None
            end = mapped.find(b"\n", offset)
            lines.append(mapped[offset : end if end != -1 else len(mapped)])
        decoded = decode_canonical_lines(b"\n".join(lines) + b"\n")
        if decoded is None:
            return None
        ids, counts = decoded
        if not np.array_equal(counts, shard.lengths[np.asarray(samples, dtype=np.int64)]):
            return None
        if vocab_size is not None and vocab_problem(ids, vocab_size) is not None:
            return None
        return np.split(ids, np.cumsum(counts)[:-1])

    def close(self) -> None:
        for mapped in self._maps.values():
            mapped.close()
        self._maps.clear()
