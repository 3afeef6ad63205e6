"""``evotune data inspect`` and ``evotune data tokenize``."""

from __future__ import annotations

import dataclasses
import json
import os
from collections import defaultdict
from collections.abc import Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import orjson

from ..errors import ConfigError, OutputExistsError
from .ftdp import DataError, ShardReader, discover_shards, index_shard
from .provenance import sidecar_path, tokenizer_fingerprint, write_provenance
from .templates import PROMPT_TEMPLATES, PromptTemplate, get_template
from .tokenize import (
    chat_sample,
    check_messages,
    conversation_turns,
    openai_turns,
    signed,
    text_sample,
    turns_as_messages,
    write_ftdp_shard,
    xtuner_encode,
)

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

INPUT_FORMATS = ("jsonl", "xtuner", "internevo-untokenized")
"""jsonl: {"text"} or {"messages"} per line. xtuner: XTuner's {"conversation": [...]} (or
its openai {"messages": [...]}) records in a .json list or .jsonl file. internevo-untokenized:
folders of .json files, one JSON list of messages per line (load_intern_repo_untokenized_dataset)."""
TOKENIZER_TEMPLATE = "tokenizer"
NO_TEMPLATE = "none"
_UNTRAINED_ROLES = ("system", "user")


@dataclass(frozen=True)
class TokenizeJob:
    source: str
    destination: str
    tokenizer: str
    text_key: str
    messages_key: str
    trained_roles: tuple[str, ...]
    input_format: str = "jsonl"
    prompt_template: str | None = None
    max_length: int | None = None


def tokenize_files(
    inputs: Sequence[str | os.PathLike[str]],
    output: str | os.PathLike[str],
    tokenizer: str,
    type_name: str = "en",
    workers: int = 1,
    text_key: str = "text",
    messages_key: str = "messages",
    trained_roles: Sequence[str] = ("assistant",),
    input_format: str = "jsonl",
    prompt_template: str | None = None,
    max_length: int | None = None,
    file_type: str = ".json",
    overwrite: bool = False,
) -> list[dict[str, Any]]:
    """Tokenize inputs into ftdp shards, in parallel; one verified shard (+ sidecar) per input file.

    jsonl and xtuner inputs are files and become ``OUTPUT/<type_name>/<stem>.bin``;
    internevo-untokenized inputs are folders whose ``*<file_type>`` files keep their
    relative paths (``a/b.json`` -> ``OUTPUT/a/b.bin``). XTuner formats need
    ``prompt_template``: an XTuner template name, 'tokenizer' (its chat template) or
    'none'; as XTuner does, samples left without a trained token are dropped and
    ``max_length`` cuts each sample.
    """
    if input_format not in INPUT_FORMATS:
        raise ConfigError(f"--format {input_format!r}: choose one of {', '.join(INPUT_FORMATS)}")
    if max_length is not None and max_length < 1:
        raise ConfigError(f"--max-length {max_length}: must be >= 1")
    loaded = load_tokenizer(tokenizer)
    if input_format == "jsonl":
        if prompt_template is not None:
            raise ConfigError(
                "--prompt-template applies to --format xtuner / internevo-untokenized; jsonl "
                "messages use the tokenizer's chat template"
            )
    elif prompt_template is None:
        raise ConfigError(
            f"--format {input_format} needs --prompt-template: the XTuner config's "
            f"prompt_template name (one of {', '.join(sorted(PROMPT_TEMPLATES))}), "
            f"'{TOKENIZER_TEMPLATE}' or '{NO_TEMPLATE}'"
        )
    elif prompt_template == TOKENIZER_TEMPLATE:
        if getattr(loaded, "chat_template", None) is None:
            raise ConfigError(f"--prompt-template tokenizer: {tokenizer} has no chat template")
    elif prompt_template != NO_TEMPLATE:
        get_template(prompt_template)
    pairs = _plan_outputs(inputs, Path(output), type_name, input_format, file_type)
    if not overwrite:
        for _, destination in pairs:
            for path in (destination, Path(f"{destination}.meta"), sidecar_path(destination)):
                if path.exists():
                    raise OutputExistsError(
                        f"{path}: exists; pass --overwrite to replace it, or choose another -o"
                    )
    jobs = [
        TokenizeJob(
            str(source),
            str(destination),
            tokenizer,
            text_key,
            messages_key,
            tuple(trained_roles),
            input_format,
            prompt_template,
            max_length,
        )
        for source, destination in pairs
    ]
    if workers > 1 and len(jobs) > 1:
        with ProcessPoolExecutor(max_workers=min(workers, len(jobs))) as pool:
            return list(pool.map(_tokenize_one, jobs))
    return [_tokenize_one(job, loaded) for job in jobs]


def load_tokenizer(name_or_path: str) -> Any:
    """A Hugging Face tokenizer, or one DataError line saying why not."""
    from transformers import AutoTokenizer

    looks_local = (
        os.sep in name_or_path or name_or_path.startswith((".", "~")) or name_or_path.count("/") > 1
    )
    if looks_local and not Path(name_or_path).expanduser().is_dir():
        raise DataError(f"--tokenizer {name_or_path}: no such folder; pass a tokenizer folder")
    try:
        return AutoTokenizer.from_pretrained(name_or_path)
    except Exception as error:  # hub ids, missing files, bad JSON: all one line for the user
        reason = " ".join(str(error).split())[:200]
        raise DataError(
            f"--tokenizer {name_or_path}: cannot load a tokenizer ({type(error).__name__}: "
            f"{reason})"
        ) from None


def _plan_outputs(
    inputs: Sequence[str | os.PathLike[str]],
    output: Path,
    type_name: str,
    input_format: str,
    file_type: str,
) -> list[tuple[Path, Path]]:
    pairs: list[tuple[Path, Path]] = []
    taken: dict[Path, Path] = {}
    for item in inputs:
        source = Path(item)
        if input_format == "internevo-untokenized":
            if not source.is_dir():
                raise DataError(
                    f"{source}: --format internevo-untokenized takes folders of '*{file_type}' "
                    "files (XTuner's load_intern_repo_untokenized_dataset layout)"
                )
            relatives = discover_shards(source, file_type)
            if not relatives:
                raise DataError(f"{source}: no '*{file_type}' file in this folder")
            planned = []
            for relative in relatives:
                target = relative[: -len(file_type)] + ".bin"
                if "/" not in target:  # every shard lives under a top-level type folder
                    target = f"{type_name}/{target}"
                planned.append((source / relative, output / target))
        else:
            if not source.is_file():
                raise DataError(f"{source}: input file not found")
            planned = [(source, output / type_name / f"{source.name.split('.')[0]}.bin")]
        for source_file, destination in planned:
            if destination in taken:
                raise DataError(
                    f"{source_file}: would write {destination}, like {taken[destination]}; "
                    "rename one input"
                )
            taken[destination] = source_file
            pairs.append((source_file, destination))
    return pairs


@dataclass
class _Tally:
    """What happened to the samples of one input file."""

    no_loss: int = 0
    dropped: int = 0
    truncated: int = 0
    trained_zero: int = 0
    untrained_roles: set[str] = dataclasses.field(default_factory=set)


def _tokenize_one(job: TokenizeJob, tokenizer: Any = None) -> dict[str, Any]:
    if tokenizer is None:
        tokenizer = load_tokenizer(job.tokenizer)
    template = None
    if job.prompt_template not in (None, TOKENIZER_TEMPLATE, NO_TEMPLATE):
        template = get_template(str(job.prompt_template))
    tally = _Tally()
    samples: list[list[int]] = []
    for where, record in _records(job.source, job.input_format):
        sample: list[int] | None
        if job.input_format == "jsonl":
            sample = _jsonl_sample(tokenizer, record, job, where, tally)
        else:
            sample = _xtuner_sample(tokenizer, record, job, template, where, tally)
        if sample is not None:
            samples.append(sample)
    write_ftdp_shard(job.destination, samples)
    row = _verify_shard(job.destination, samples)
    write_provenance(
        job.destination,
        tokenizer_fingerprint(tokenizer),
        _template_record(tokenizer, job, template),
        source=job.source,
    )
    row.update(
        dropped=tally.dropped,
        truncated=tally.truncated,
        warnings=_warnings(job, row, tally),
    )
    return row


def _records(source: str, input_format: str) -> Iterator[tuple[str, Any]]:
    """(where, record) for every record: JSON lines, or a .json file holding one JSON list."""
    with open(source, "rb") as handle:
        head = handle.read(4096).lstrip()
        handle.seek(0)
        if input_format == "xtuner" and head.startswith(b"["):
            try:
                records = orjson.loads(handle.read())
            except orjson.JSONDecodeError as error:
                raise DataError(f"{source}: not a JSON list of records ({error})") from None
            for number, record in enumerate(records, start=1):
                yield f"{source}: record {number}", record
            return
        for number, raw in enumerate(handle, start=1):
            if not raw.strip():
                continue
            try:
                record = orjson.loads(raw)
            except orjson.JSONDecodeError as error:
                raise DataError(f"{source}:{number}: not a JSON line ({error})") from None
            yield f"{source}:{number}", record


def _jsonl_sample(
    tokenizer: Any, record: Any, job: TokenizeJob, where: str, tally: _Tally
) -> list[int]:
    if isinstance(record, dict) and job.messages_key in record:
        messages = check_messages(record[job.messages_key], where)
        trained = [m["role"] in job.trained_roles for m in messages]
        tally.untrained_roles.update(
            m["role"]
            for m in messages
            if m["role"] not in job.trained_roles and m["role"] not in _UNTRAINED_ROLES
        )
        sample = chat_sample(tokenizer, messages, trained)
        if not any(t > 0 for t in sample):
            tally.no_loss += 1
        return sample
    if isinstance(record, dict) and isinstance(record.get(job.text_key), str):
        return text_sample(tokenizer, record[job.text_key])
    raise DataError(
        f"{where}: expected {{{job.text_key!r}: str}} or {{{job.messages_key!r}: [...]}}"
    )


def _xtuner_sample(
    tokenizer: Any,
    record: Any,
    job: TokenizeJob,
    template: PromptTemplate | None,
    where: str,
    tally: _Tally,
) -> list[int] | None:
    if job.input_format == "internevo-untokenized":
        turns = openai_turns(record, where)
    elif isinstance(record, dict) and "conversation" in record:
        turns = conversation_turns(record["conversation"], where)
    elif isinstance(record, dict) and "messages" in record:
        turns = openai_turns(record["messages"], where)
    else:
        raise DataError(
            f"{where}: expected XTuner's {{'conversation': [{{'system', 'input', 'output'}}, "
            "...]}} or {'messages': [{'role', 'content'}, ...]}"
        )
    if not turns:  # XTuner drops conversations the template map left empty
        tally.dropped += 1
        return None
    if job.prompt_template == TOKENIZER_TEMPLATE:
        messages, flags = turns_as_messages(turns)
        sample = chat_sample(tokenizer, messages, flags)
        ids, trained = [abs(t) for t in sample], [t > 0 for t in sample]
        if job.max_length is not None and len(ids) > job.max_length:
            ids, trained = ids[: job.max_length], trained[: job.max_length]
            tally.truncated += 1
    else:
        full_ids, full_trained = xtuner_encode(tokenizer, turns, template)
        ids, trained = full_ids[: job.max_length], full_trained[: job.max_length]
        tally.truncated += len(ids) < len(full_ids)
    if not any(trained):  # XTuner drops samples without a label >= 0
        tally.dropped += 1
        return None
    tally.trained_zero += sum(1 for t, keep in zip(ids, trained, strict=True) if keep and t == 0)
    return signed(ids, trained)


def _template_record(
    tokenizer: Any, job: TokenizeJob, template: PromptTemplate | None
) -> dict[str, Any]:
    record: dict[str, Any] = {"format": job.input_format, "max_length": job.max_length}
    if template is not None:
        record.update(kind="xtuner", name=template.name, strings=dataclasses.asdict(template))
    elif job.prompt_template == NO_TEMPLATE:
        record.update(kind="none")
    elif job.input_format == "jsonl" and getattr(tokenizer, "chat_template", None) is None:
        record.update(kind="role_headers", trained_roles=list(job.trained_roles))
    else:
        record.update(kind="chat_template", chat_template=tokenizer.chat_template)
        if job.input_format == "jsonl":
            record["trained_roles"] = list(job.trained_roles)
    return record


def _warnings(job: TokenizeJob, row: dict[str, Any], tally: _Tally) -> list[str]:
    shard = job.destination
    warnings = []
    if row["samples"] == 0:
        warnings.append(f"{shard}: no sample left; the shard is empty ({job.source})")
    elif row["trainable_share"] == 0:
        warnings.append(f"{shard}: zero trainable tokens in {row['samples']} samples")
    if tally.no_loss and row["samples"]:
        hint = ""
        if tally.untrained_roles:
            roles = ", ".join(sorted(tally.untrained_roles))
            hint = (
                f"; roles {roles} are never trained with --trained-roles "
                f"{' '.join(job.trained_roles)}: pass --trained-roles with the reply role"
            )
        warnings.append(
            f"{shard}: {tally.no_loss} of {row['samples']} samples have no trained token "
            f"(no turn of a trained role){hint}"
        )
    if tally.trained_zero:
        warnings.append(
            f"{shard}: {tally.trained_zero} trained tokens have id 0, which ftdp cannot mark "
            "as trained (XTuner trains them); they carry no loss"
        )
    return warnings


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
