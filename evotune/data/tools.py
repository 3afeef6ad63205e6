"""``evotune data inspect`` and ``evotune data tokenize``."""

from __future__ import annotations

import json
import os
from collections import defaultdict
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import orjson

from .ftdp import DataError, ShardReader, discover_shards, index_shard
from .tokenize import write_ftdp_shard

# ---------------------------------------------------------------------------
# inspect


def inspect_folder(
    folder: str | os.PathLike[str],
    packed_length: int = 4096,
    file_type: str = ".bin",
    read_tokens: bool = True,
) -> dict[str, Any]:
    """Statistics per subset (the shard's parent folder) and per type (top-level folder).

    Lengths come from the .meta files; with ``read_tokens`` every line is also read
    and checked (JSON, token count) and the trainable-token share is measured.
    """
    root = Path(folder)
    relative_paths = discover_shards(root, file_type)
    if not relative_paths:
        raise DataError(f"{root}: no '*{file_type}' shard in this folder")
    type_names = sorted(os.listdir(root))
    reader = ShardReader()
    groups: dict[str, dict[str, Any]] = defaultdict(
        lambda: {"shards": 0, "lengths": [], "trainable": 0, "packs": 0, "tail_tokens": 0}
    )
    for relative in relative_paths:
        shard = index_shard(root, relative, type_names)
        subset = relative.rsplit("/", 1)[0]
        top = relative.split("/")[0]
        trainable = 0
        if read_tokens:
            for sample in range(shard.num_samples):
                trainable += int((reader.read(shard, sample)[1:] > 0).sum())
        packs, tail = divmod(shard.num_tokens, packed_length)
        for key in (f"subset {subset}", f"type {top}", "total"):
            group = groups[key]
            group["shards"] += 1
            group["lengths"].append(shard.lengths)
            group["trainable"] += trainable
            group["packs"] += packs
            group["tail_tokens"] += tail
    reader.close()
    report: dict[str, Any] = {"folder": str(root), "packed_length": packed_length, "groups": {}}
    for key, group in sorted(groups.items(), key=lambda kv: (kv[0] != "total", kv[0])):
        lengths = np.concatenate(group["lengths"]) if group["lengths"] else np.zeros(0)
        tokens = int(lengths.sum())
        row = {
            "shards": group["shards"],
            "samples": len(lengths),
            "tokens": tokens,
            "packs": group["packs"],
            "tail_tokens_lost": group["tail_tokens"],
        }
        if read_tokens:
            # positions with a target: every token but a sample's first can be one
            row["trainable_share"] = group["trainable"] / max(tokens, 1)
        if len(lengths):
            for p in (0, 50, 90, 99, 100):
                row[f"length_p{p}"] = int(np.percentile(lengths, p))
        report["groups"][key] = row
    report["lengths"] = groups["total"]["lengths"]
    return report


def format_report(report: dict[str, Any]) -> str:
    columns = {
        "shards": "shards",
        "samples": "samples",
        "tokens": "tokens",
        "packs": "packs",
        "tail_tokens_lost": "tail lost",
        "trainable_share": "trained",
        "length_p50": "len p50",
        "length_p90": "len p90",
        "length_p99": "len p99",
        "length_p100": "len max",
    }
    header = f"{'group':<28}" + "".join(f"{title:>12}" for title in columns.values())
    lines = [f"{report['folder']} at packed_length={report['packed_length']}", header]
    for key, row in report["groups"].items():
        cells = []
        for column in columns:
            value = row.get(column, "-")
            cells.append(f"{value:>12.3f}" if isinstance(value, float) else f"{value!s:>12}")
        lines.append(f"{key:<28}" + "".join(cells))
    return "\n".join(lines)


def plot_lengths(report: dict[str, Any], output: str | os.PathLike[str]) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise DataError("--plot needs matplotlib: pip install 'evotune[plot]'") from None
    lengths = np.concatenate(report["lengths"])
    figure, axis = plt.subplots(figsize=(7, 4))
    axis.hist(lengths, bins=min(100, max(10, len(np.unique(lengths)))), color="#3b6ea8")
    axis.axvline(report["packed_length"], color="#c44", linestyle="--", label="packed_length")
    axis.set_xlabel("sample length (tokens)")
    axis.set_ylabel("samples")
    axis.set_title(f"{report['folder']}: {len(lengths)} samples")
    axis.legend()
    figure.tight_layout()
    figure.savefig(output, dpi=120)
    plt.close(figure)


# ---------------------------------------------------------------------------
# tokenize


@dataclass(frozen=True)
class TokenizeJob:
    source: str
    destination: str
    tokenizer: str
    text_key: str
    messages_key: str
    trained_roles: tuple[str, ...]


def tokenize_files(
    inputs: Sequence[str | os.PathLike[str]],
    output: str | os.PathLike[str],
    tokenizer: str,
    type_name: str = "en",
    workers: int = 1,
    text_key: str = "text",
    messages_key: str = "messages",
    trained_roles: Sequence[str] = ("assistant",),
) -> list[dict[str, Any]]:
    """Tokenize JSONL files into ``OUTPUT/<type_name>/<stem>.bin`` shards, in parallel."""
    jobs = []
    names: set[str] = set()
    for source in inputs:
        source_path = Path(source)
        if not source_path.is_file():
            raise DataError(f"{source_path}: input file not found")
        stem = source_path.name.split(".")[0]
        if stem in names:
            raise DataError(f"{source_path}: two inputs share the name {stem!r}; rename one")
        names.add(stem)
        destination = Path(output) / type_name / f"{stem}.bin"
        jobs.append(
            TokenizeJob(
                str(source_path),
                str(destination),
                tokenizer,
                text_key,
                messages_key,
                tuple(trained_roles),
            )
        )
    if workers > 1 and len(jobs) > 1:
        with ProcessPoolExecutor(max_workers=workers) as pool:
            return list(pool.map(_tokenize_one, jobs))
    return [_tokenize_one(job) for job in jobs]


def _tokenize_one(job: TokenizeJob) -> dict[str, Any]:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(job.tokenizer)
    samples = []
    with open(job.source, "rb") as handle:
        for number, raw in enumerate(handle, start=1):
            if not raw.strip():
                continue
            where = f"{job.source}:{number}"
            try:
                record = orjson.loads(raw)
            except orjson.JSONDecodeError as error:
                raise DataError(f"{where}: not a JSON line ({error})") from None
            if isinstance(record, dict) and job.messages_key in record:
                samples.append(
                    _chat_tokens(tokenizer, record[job.messages_key], job.trained_roles, where)
                )
            elif isinstance(record, dict) and isinstance(record.get(job.text_key), str):
                samples.append(_text_tokens(tokenizer, record[job.text_key]))
            else:
                raise DataError(
                    f"{where}: expected {{{job.text_key!r}: str}} or {{{job.messages_key!r}: [...]}}"
                )
    write_ftdp_shard(job.destination, samples)
    return _verify_shard(job.destination, samples)


def _text_tokens(tokenizer: Any, text: str) -> list[int]:
    """Pre-training text: BOS + text + EOS, all positive as InternEvo writes it."""
    ids = tokenizer.encode(text, add_special_tokens=False)
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    return bos + ids + eos


def _chat_tokens(
    tokenizer: Any, messages: Any, trained_roles: Sequence[str], where: str
) -> list[int]:
    """Trained roles' turns positive, everything else negated, as InternEvo's SFT data stores it.

    With a chat template the sample is the template's rendering, and a trained
    turn's role header (the generation prompt) stays untrained. Without one, turns
    are ``<|role|>\ncontent\n`` between BOS and EOS.
    """
    if (
        not isinstance(messages, list)
        or not messages
        or not all(
            isinstance(m, dict)
            and isinstance(m.get("role"), str)
            and isinstance(m.get("content"), str)
            for m in messages
        )
    ):
        raise DataError(
            f"{where}: messages must be a non-empty list of {{'role', 'content'}} strings"
        )
    templated = getattr(tokenizer, "chat_template", None) is not None
    if templated:
        return _templated_chat_tokens(tokenizer, messages, trained_roles)
    tokens: list[int] = []
    if tokenizer.bos_token_id is not None:
        tokens.append(-tokenizer.bos_token_id)
    for message in messages:
        trained = message["role"] in trained_roles
        header = tokenizer.encode(f"<|{message['role']}|>\n", add_special_tokens=False)
        body = tokenizer.encode(message["content"] + "\n", add_special_tokens=False)
        tokens.extend(-t for t in header)
        tokens.extend(body if trained else [-t for t in body])
    if tokenizer.eos_token_id is not None:
        trained_last = messages[-1]["role"] in trained_roles
        tokens.append(tokenizer.eos_token_id if trained_last else -tokenizer.eos_token_id)
    return tokens


def _templated_chat_tokens(
    tokenizer: Any, messages: list[dict[str, str]], trained_roles: Sequence[str]
) -> list[int]:
    """Signs per turn from incremental renders; the result renders exactly like the template.

    BPE may merge across a turn edge, so each render is aligned on its longest common
    prefix with what is already there rather than assumed to extend it.
    """
    ids: list[int] = []
    trained_mask: list[bool] = []
    for index, message in enumerate(messages):
        turn = _render(tokenizer, messages[: index + 1], add_generation_prompt=False)
        keep = _common_prefix(ids, turn)
        ids, trained_mask = ids[:keep], trained_mask[:keep]
        if message["role"] in trained_roles:
            prompt = _render(tokenizer, messages[:index], add_generation_prompt=True)
            body_start = max(keep, _common_prefix(prompt, turn))
        else:
            body_start = len(turn)
        for position in range(keep, len(turn)):
            ids.append(turn[position])
            trained_mask.append(position >= body_start)
    return [t if trained else -t for t, trained in zip(ids, trained_mask, strict=True)]


def _common_prefix(first: Sequence[int], second: Sequence[int]) -> int:
    length = 0
    for a, b in zip(first, second, strict=False):
        if a != b:
            break
        length += 1
    return length


def _render(
    tokenizer: Any, messages: list[dict[str, str]], add_generation_prompt: bool
) -> list[int]:
    if not messages and not add_generation_prompt:
        return []
    ids = tokenizer.apply_chat_template(
        messages, tokenize=True, add_generation_prompt=add_generation_prompt
    )
    return list(ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids)


def _verify_shard(path: str, samples: list[list[int]]) -> dict[str, Any]:
    """Read the shard back through the loader and compare every sample."""
    destination = Path(path)
    root = destination.parent.parent
    relative = destination.relative_to(root).as_posix()
    shard = index_shard(root, relative, sorted(os.listdir(root)))
    reader = ShardReader()
    if shard.num_samples != len(samples):
        raise DataError(f"{path}: wrote {len(samples)} samples but read back {shard.num_samples}")
    for index, expected in enumerate(samples):
        if reader.read(shard, index).tolist() != list(expected):
            raise DataError(f"{path}:{index + 1}: read-back differs from what was written")
    reader.close()
    tokens = sum(len(s) for s in samples)
    trainable = sum(sum(1 for t in s if t > 0) for s in samples)
    return {
        "shard": path,
        "samples": len(samples),
        "tokens": tokens,
        "trainable_share": trainable / max(tokens, 1),
    }


def report_json(report: dict[str, Any]) -> str:
    printable = {k: v for k, v in report.items() if k != "lengths"}
    return json.dumps(printable, indent=2)
