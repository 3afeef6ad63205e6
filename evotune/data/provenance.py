"""Which tokenizer made a shard: the sidecar ``data tokenize`` writes, and the check at start.

Shards hold bare token ids, so data tokenized by another tokenizer of the same
size trains silently on garbage. ``evotune data tokenize`` writes
``<shard>.bin.provenance.json`` beside each shard: the tokenizer's name, class,
size, a sha256 of its vocabulary (every token and id, sorted by id), its special
token ids, and the chat or prompt template used. ``check_provenance`` compares the
sidecars of a dataset folder with the tokenizer of the model about to train:

* a sidecar that disagrees is a DataError naming the shard and what differs;
* shards without a sidecar (InternEvo's own data, older evotune) give a warning
  string, since nothing can be checked;
* None when every shard was made by this tokenizer.

The sidecar sits in the shard's own folder and does not end with the shard suffix,
so it changes neither shard discovery nor type ids (only top-level entries count).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

from ..errors import DataError
from .ftdp import discover_shards

SIDECAR_SUFFIX = ".provenance.json"
FORMAT = "evotune-tokenizer-provenance/1"
_COMPARED = ("vocab_size", "vocab_sha256", "special_token_ids")


def sidecar_path(shard: str | os.PathLike[str]) -> Path:
    return Path(str(shard) + SIDECAR_SUFFIX)


def tokenizer_fingerprint(tokenizer: Any) -> dict[str, Any]:
    """What identifies a tokenizer's ids: vocabulary hash, size and special ids (+ its name)."""
    vocab = tokenizer.get_vocab()
    ordered = sorted(vocab.items(), key=lambda item: (item[1], item[0]))
    digest = hashlib.sha256(json.dumps(ordered, ensure_ascii=False).encode("utf-8")).hexdigest()
    special = {
        name: getattr(tokenizer, f"{name}_token_id", None) for name in ("bos", "eos", "pad", "unk")
    }
    extra = sorted(
        (token, tokenizer.convert_tokens_to_ids(token))
        for token in getattr(tokenizer, "all_special_tokens", [])
    )
    special["all"] = {token: int(index) for token, index in extra if index is not None}
    return {
        "name_or_path": str(getattr(tokenizer, "name_or_path", "")),
        "class": type(tokenizer).__name__,
        "vocab_size": len(tokenizer),
        "vocab_sha256": digest,
        "special_token_ids": special,
    }


def write_provenance(
    shard: str | os.PathLike[str],
    fingerprint: dict[str, Any],
    template: dict[str, Any],
    source: str,
) -> Path:
    """Write the sidecar of ``shard`` (atomically, with the process umask)."""
    record = {
        "format": FORMAT,
        "written_by": "evotune data tokenize",
        "source": source,
        "tokenizer": fingerprint,
        "template": template,
    }
    path = sidecar_path(shard)
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_text(json.dumps(record, indent=2, ensure_ascii=False) + "\n")
    os.replace(temporary, path)
    return path


def read_provenance(shard: str | os.PathLike[str]) -> dict[str, Any] | None:
    path = sidecar_path(shard)
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise DataError(f"{path}: unreadable provenance sidecar ({error}); delete it") from None
    if not isinstance(record, dict) or record.get("format") != FORMAT:
        raise DataError(f"{path}: not an evotune provenance sidecar ({FORMAT}); delete it")
    return record


def check_provenance(folder: Path, tokenizer: Any, file_type: str = ".bin") -> str | None:
    """Compare every shard's sidecar with ``tokenizer``; raise on a mismatch, warn if unknown."""
    root = Path(folder)
    shards = discover_shards(root, file_type)
    if tokenizer is None:
        return f"{root}: no tokenizer to compare the shards' provenance with; not checked"
    expected = tokenizer_fingerprint(tokenizer)
    missing = 0
    for relative in shards:
        record = read_provenance(root / relative)
        if record is None:
            missing += 1
            continue
        recorded = record.get("tokenizer", {})
        for key in _COMPARED:
            if recorded.get(key) != expected[key]:
                raise DataError(
                    f"{root / relative}: tokenized with {recorded.get('name_or_path')!r} "
                    f"({_describe(key, recorded.get(key))}) but the model's tokenizer "
                    f"{expected['name_or_path']!r} has {_describe(key, expected[key])}; "
                    "re-tokenize with this tokenizer (evotune data tokenize --tokenizer ...) "
                    "or train the model the data was made for"
                )
    if missing == len(shards):
        return (
            f"{root}: no tokenizer provenance beside the shards (InternEvo's own data?); "
            "cannot check they were tokenized with the model's tokenizer"
        )
    if missing:
        return (
            f"{root}: {missing} of {len(shards)} shards have no tokenizer provenance; not checked"
        )
    return None


def _describe(key: str, value: Any) -> str:
    if key == "vocab_sha256":
        return f"vocabulary sha256 {str(value)[:12]}"
    if key == "vocab_size":
        return f"{value} tokens"
    return f"special token ids {value}"
