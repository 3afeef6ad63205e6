"""``evotune data check``: every line of every shard against the vocabulary and its .meta.

Training reads a line only when a pack needs it, so a bad line can stop a run hours
in. This check reads everything up front, in parallel processes:

* Work is cut into byte ranges of about ``unit_bytes`` at line starts (a line
  belongs to the range its first byte lies in), so one huge shard is spread over
  the workers as well as many small ones.
* A worker parses its lines (``decode_tokens``, the loader's own rules), checks
  ``abs(id) < vocab_size`` with one vectorised test per range, and returns each
  line's start offset and token count.
* The parent compares those with the shard's ``.meta`` in one vectorised step:
  row count = line count, every offset, every length. So the index is checked
  exactly against the file, not sampled.

Problems are one line each, ``file:line: what is wrong; what to do``, in shard and
line order, at most ``max_problems_per_shard`` per shard (the rest are counted).
Legal but unusual cases (an empty shard, a sample with no tokens, a last line
without a newline, a .meta without its shard) are notes, not problems.
"""

from __future__ import annotations

import mmap
import os
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import ConfigError
from .ftdp import (
    DataError,
    TokenLineError,
    decode_canonical_lines,
    decode_tokens,
    discover_shards,
    read_meta,
    vocab_problem,
)

UNIT_BYTES = 32 << 20
BLOCK_BYTES = 128 << 10  # lines parsed together: enough to amortise numpy calls, fits the cache
MAX_PROBLEMS_PER_SHARD = 20


@dataclass(frozen=True)
class Problem:
    """One thing wrong in a shard; ``line`` is 1-based, None for the whole file."""

    path: str
    line: int | None
    message: str

    def __str__(self) -> str:
        where = self.path if self.line is None else f"{self.path}:{self.line}"
        return f"{where}: {self.message}"


@dataclass
class CheckReport:
    """What ``check_folder`` found and how fast it read."""

    folder: str
    vocab_size: int
    workers: int
    shards: int = 0
    samples: int = 0
    tokens: int = 0
    bytes: int = 0
    seconds: float = 0.0
    problem_count: int = 0
    problems: list[Problem] = field(default_factory=list)  # the ones listed (capped per shard)
    notes: list[str] = field(default_factory=list)

    @property
    def megabytes_per_second(self) -> float:
        return self.bytes / 1e6 / max(self.seconds, 1e-9)

    def summary(self) -> str:
        verdict = (
            "no problems"
            if not self.problem_count
            else f"{self.problem_count} problem{'s' if self.problem_count != 1 else ''}"
        )
        return (
            f"{self.folder}: {self.shards} shards, {self.samples} samples, {self.tokens} tokens, "
            f"{self.bytes / 1e6:.1f} MB checked against vocab size {self.vocab_size} in "
            f"{self.seconds:.1f} s ({self.megabytes_per_second:.0f} MB/s, {self.workers} "
            f"worker{'s' if self.workers != 1 else ''}): {verdict}"
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "folder": self.folder,
            "vocab_size": self.vocab_size,
            "shards": self.shards,
            "samples": self.samples,
            "tokens": self.tokens,
            "bytes": self.bytes,
            "seconds": self.seconds,
            "mb_per_s": self.megabytes_per_second,
            "workers": self.workers,
            "problem_count": self.problem_count,
            "problems": [str(problem) for problem in self.problems],
            "notes": self.notes,
        }


@dataclass(frozen=True)
class _Unit:
    """Lines of ``path`` whose first byte lies in [start, stop)."""

    shard: int
    path: str
    start: int
    stop: int
    vocab_size: int


@dataclass
class _UnitResult:
    shard: int
    line_starts: np.ndarray  # int64 byte offset of every line
    token_counts: np.ndarray  # int64 tokens per line, -1 where the line holds no token list
    problems: list[tuple[int, str]]  # (0-based line index within the unit, reason)
    tokens: int
    empty_samples: int
    unterminated: bool  # the file's last line has no newline


def check_folder(
    folder: str | os.PathLike[str],
    vocab_size: int,
    workers: int = 1,
    file_type: str = ".bin",
    emit: Callable[[str], None] | None = None,
    unit_bytes: int = UNIT_BYTES,
    max_problems_per_shard: int = MAX_PROBLEMS_PER_SHARD,
) -> CheckReport:
    """Check every line of every ``*file_type`` shard under ``folder``.

    ``emit`` receives each problem line as soon as its shard is done (shard order).
    """
    if vocab_size < 1:
        raise ConfigError(f"--vocab-size must be >= 1, got {vocab_size}")
    if workers < 1:
        raise ConfigError(f"--workers must be >= 1, got {workers}")
    root = Path(folder)
    if not root.is_dir():
        raise DataError(f"{root}: dataset folder not found")
    relative_paths = discover_shards(root, file_type)
    if not relative_paths:
        raise DataError(f"{root}: no '*{file_type}' shard in this folder (or set --file-type)")
    started = time.perf_counter()
    report = CheckReport(folder=str(root), vocab_size=vocab_size, workers=workers)
    shards = [_ShardCheck(root, relative) for relative in relative_paths]
    units = [
        _Unit(index, shard.resolved, start, stop, vocab_size)
        for index, shard in enumerate(shards)
        for start, stop in _ranges(shard.size, unit_bytes)
    ]
    for shard, results in zip(shards, _grouped(_run(units, workers), shards), strict=True):
        problems = shard.finish(results)
        report.shards += 1
        report.samples += shard.lines
        report.tokens += shard.tokens
        report.bytes += shard.size
        report.notes.extend(shard.notes)
        report.problem_count += len(problems)
        listed = problems[:max_problems_per_shard]
        lines = [str(problem) for problem in listed]
        if len(problems) > len(listed):
            lines.append(f"{shard.display}: ... and {len(problems) - len(listed)} more problems")
        report.problems.extend(listed)
        if emit is not None:
            for line in lines:
                emit(line)
    report.notes.extend(_orphan_metas(root, file_type))
    report.seconds = time.perf_counter() - started
    return report


def _ranges(size: int, unit_bytes: int) -> list[tuple[int, int]]:
    if size == 0:
        return [(0, 0)]
    return [(start, min(start + unit_bytes, size)) for start in range(0, size, unit_bytes)]


def _run(units: list[_Unit], workers: int) -> Iterator[_UnitResult]:
    if workers == 1 or len(units) == 1:
        yield from map(_check_unit, units)
        return
    with ProcessPoolExecutor(max_workers=min(workers, len(units))) as pool:
        yield from pool.map(_check_unit, units)


def _grouped(
    results: Iterator[_UnitResult], shards: list[_ShardCheck]
) -> Iterator[list[_UnitResult]]:
    """Results of consecutive units, one list per shard (units come in shard order)."""
    pending: list[_UnitResult] = []
    current = 0
    for result in results:
        while result.shard != current:
            yield pending
            pending, current = [], current + 1
        pending.append(result)
    while current < len(shards):
        yield pending
        pending, current = [], current + 1


def _check_unit(unit: _Unit) -> _UnitResult:
    empty = _UnitResult(unit.shard, np.zeros(0, np.int64), np.zeros(0, np.int64), [], 0, 0, False)
    if unit.stop == unit.start:
        return empty
    with (
        open(unit.path, "rb") as handle,
        mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as mapped,
    ):
        size = len(mapped)
        if unit.start == 0:
            first = 0
        else:
            newline = mapped.find(b"\n", unit.start - 1, unit.stop)
            if newline == -1:
                return empty  # one line covers the whole range; an earlier unit owns it
            first = newline + 1
        if first >= unit.stop:
            return empty
        newline = mapped.find(b"\n", unit.stop - 1)
        end = size if newline == -1 else newline + 1
        data = mapped[first:end]
    newlines = np.flatnonzero(np.frombuffer(data, dtype=np.uint8) == 0x0A)
    unterminated = not data.endswith(b"\n")
    line_ends = np.append(newlines, len(data)) if unterminated else newlines
    line_starts = np.concatenate(([0], newlines + 1))[: len(line_ends)].astype(np.int64)
    counts = np.full(len(line_ends), -1, dtype=np.int64)
    problems: list[tuple[int, str]] = []
    pieces: list[np.ndarray] = []  # the ids of every readable line, in line order
    for low, high in _blocks(line_starts, BLOCK_BYTES):
        block = data[line_starts[low] : line_ends[high - 1]] + b"\n"
        fast = decode_canonical_lines(block)
        if fast is not None:
            pieces.append(fast[0])
            counts[low:high] = fast[1]
            continue
        for index in range(low, high):
            line = data[line_starts[index] : line_ends[index]]
            if not line.strip():
                problems.append(
                    (index, "empty line; every line must be a JSON object with 'tokens'")
                )
                continue
            try:
                tokens = decode_tokens(line)
            except TokenLineError as error:
                problems.append((index, str(error)))
                continue
            counts[index] = len(tokens)
            pieces.append(tokens)
    ids = np.concatenate(pieces) if pieces else np.zeros(0, np.int64)
    outside = np.flatnonzero((ids >= unit.vocab_size) | (ids <= -unit.vocab_size))
    if len(outside):
        line_ends_in_ids = np.cumsum(np.maximum(counts, 0))
        for index in np.unique(np.searchsorted(line_ends_in_ids, outside, side="right")):
            tokens = ids[line_ends_in_ids[index] - counts[index] : line_ends_in_ids[index]]
            reason = vocab_problem(tokens, unit.vocab_size)
            assert reason is not None
            problems.append((int(index), reason))
    return _UnitResult(
        shard=unit.shard,
        line_starts=first + line_starts,
        token_counts=counts,
        problems=problems,
        tokens=len(ids),
        empty_samples=int((counts == 0).sum()),
        unterminated=unterminated,
    )


def _blocks(line_starts: np.ndarray, block_bytes: int) -> list[tuple[int, int]]:
    """[low, high) line ranges of about ``block_bytes`` each (at least one line)."""
    cuts = np.searchsorted(line_starts, np.arange(block_bytes, line_starts[-1] + 1, block_bytes))
    bounds = np.unique(np.concatenate(([0], cuts, [len(line_starts)])))
    return list(zip(bounds[:-1].tolist(), bounds[1:].tolist(), strict=True))


class _ShardCheck:
    """One shard's meta and the comparison of its lines with it."""

    def __init__(self, root: Path, relative: str):
        self.display = str(root / relative)
        self.resolved = os.path.realpath(root / relative)
        self.size = os.path.getsize(self.resolved)
        self.relative = relative
        self.lines = 0
        self.tokens = 0
        self.notes: list[str] = []

    def finish(self, results: list[_UnitResult]) -> list[Problem]:
        problems: list[Problem] = []
        if "/" not in self.relative:
            problems.append(
                Problem(
                    self.display,
                    None,
                    "every shard must lie under a top-level type folder (cn/, en/, ...); move it",
                )
            )
        starts, counts, line_problems = self._merge(results)
        self.lines = len(starts)
        self.tokens = sum(result.tokens for result in results)
        problems.extend(Problem(self.display, line + 1, reason) for line, reason in line_problems)
        meta = self._read_meta(problems)
        if meta is not None:
            problems.extend(self._compare(meta, starts, counts))
        if self.size == 0 and self.lines == 0 and (meta is None or len(meta) == 0):
            self.notes.append(f"{self.display}: empty shard (0 samples)")
        empty_samples = sum(result.empty_samples for result in results)
        if empty_samples:
            self.notes.append(f"{self.display}: {empty_samples} samples with no tokens")
        if any(result.unterminated for result in results):
            self.notes.append(f"{self.display}: the last line has no newline")
        problems.sort(key=lambda problem: problem.line or 0)
        return problems

    @staticmethod
    def _merge(results: list[_UnitResult]) -> tuple[np.ndarray, np.ndarray, list[tuple[int, str]]]:
        line_problems: list[tuple[int, str]] = []
        offset = 0
        for result in results:
            line_problems.extend((offset + line, reason) for line, reason in result.problems)
            offset += len(result.line_starts)
        starts = (
            np.concatenate([r.line_starts for r in results]) if results else np.zeros(0, np.int64)
        )
        counts = (
            np.concatenate([r.token_counts for r in results]) if results else np.zeros(0, np.int64)
        )
        return starts, counts, line_problems

    def _read_meta(self, problems: list[Problem]) -> np.ndarray | None:
        meta_path = self.resolved + ".meta"
        if not os.path.exists(meta_path):
            problems.append(
                Problem(
                    self.display,
                    None,
                    f"missing index {meta_path}; rebuild it with 'evotune data tokenize'",
                )
            )
            return None
        try:
            return read_meta(meta_path)
        except DataError as error:
            problems.append(Problem(self.display, None, str(error)))
            return None

    def _compare(self, meta: np.ndarray, starts: np.ndarray, counts: np.ndarray) -> list[Problem]:
        problems = []
        rows = len(meta)
        if rows != len(starts):
            problems.append(
                Problem(
                    self.display,
                    None,
                    f"the .meta has {rows} rows but the file has "
                    f"{len(starts)} lines; rebuild the .meta",
                )
            )
        shared = min(rows, len(starts))
        offsets = meta[:shared, 0].astype(np.int64)
        lengths = meta[:shared, -1].astype(np.int64)
        for row in np.flatnonzero(offsets != starts[:shared]):
            problems.append(
                Problem(
                    self.display,
                    int(row) + 1,
                    f"the .meta row says offset {offsets[row]} but "
                    f"the line starts at byte {starts[row]}; rebuild the .meta",
                )
            )
        parsed = counts[:shared]
        for row in np.flatnonzero((parsed >= 0) & (parsed != lengths)):
            problems.append(
                Problem(
                    self.display,
                    int(row) + 1,
                    f"{parsed[row]} tokens but the meta says {lengths[row]}; rebuild the .meta",
                )
            )
        return problems


def _orphan_metas(root: Path, file_type: str) -> list[str]:
    notes = []
    for directory, _, files in os.walk(root, followlinks=True):
        present = set(files)
        for name in sorted(files):
            if name.endswith(file_type + ".meta") and name[: -len(".meta")] not in present:
                notes.append(f"{os.path.join(directory, name)}: a .meta without its shard")
    return notes
