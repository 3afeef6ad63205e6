"""Write ftdp shards: JSON-lines tokens plus the .bin.meta index InternEvo reads.

A sample is BOS + tokens + EOS as InternEvo's tokenizer writes them; tokens that
carry no loss (prompts, non-assistant turns) are stored negated.
"""

from __future__ import annotations

import io
import os
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import orjson


def write_ftdp_shard(path: str | os.PathLike[str], samples: Iterable[Sequence[int]]) -> int:
    """Write ``path`` and ``path.meta`` atomically; returns the number of samples."""
    destination = Path(path)
    destination.parent.mkdir(parents=True, exist_ok=True)
    temporary = destination.with_name(destination.name + ".tmp")
    rows: list[tuple[int, int]] = []
    with open(temporary, "wb") as handle:
        for tokens in samples:
            rows.append((handle.tell(), len(tokens)))
            handle.write(orjson.dumps({"tokens": [int(t) for t in tokens]}) + b"\n")
    meta = np.asarray(rows, dtype=np.int64).reshape(-1, 2)
    buffer = io.BytesIO()
    np.save(buffer, meta)
    meta_temporary = destination.with_name(destination.name + ".meta.tmp")
    meta_temporary.write_bytes(buffer.getvalue())
    os.replace(temporary, destination)
    os.replace(meta_temporary, str(destination) + ".meta")
    return len(rows)


def sft_sample(
    prompt_ids: Sequence[int], response_ids: Sequence[int], bos_id: int | None, eos_id: int | None
) -> list[int]:
    """BOS and prompt negated (no loss), response and EOS trained.

    Token id 0 cannot be negated; it is never a training target anyway.
    """
    head = ([bos_id] if bos_id is not None else []) + list(prompt_ids)
    tail = list(response_ids) + ([eos_id] if eos_id is not None else [])
    return [-t for t in head] + tail
