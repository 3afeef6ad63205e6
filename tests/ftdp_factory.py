"""Write tiny ftdp folders the way InternEvo's tokenizer does (tests build their own data)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np


def write_shard(path: Path, samples: Sequence[Sequence[int]], meta_dtype=np.int64) -> Path:
    """Write ``path`` (.bin JSON lines) and ``path.meta`` (offset, length rows)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    offsets, lengths = [], []
    with open(path, "wb") as handle:
        for tokens in samples:
            offsets.append(handle.tell())
            lengths.append(len(tokens))
            handle.write(json.dumps({"tokens": [int(t) for t in tokens]}).encode() + b"\n")
    meta = np.array(list(zip(offsets, lengths, strict=True)), dtype=meta_dtype).reshape(-1, 2)
    with open(str(path) + ".meta", "wb") as handle:
        np.save(handle, meta)
    return path


def random_samples(
    rng: np.random.Generator,
    count: int,
    vocab: int,
    low: int = 2,
    high: int = 40,
    masked_prefix: bool = True,
) -> list[list[int]]:
    samples = []
    for _ in range(count):
        length = int(rng.integers(low, high + 1))
        tokens = rng.integers(1, vocab, size=length).tolist()
        if masked_prefix and length > 2:
            prompt = int(rng.integers(0, length // 2 + 1))
            tokens = [-t for t in tokens[:prompt]] + tokens[prompt:]
        samples.append(tokens)
    return samples
