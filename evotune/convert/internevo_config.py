"""``evotune convert internevo-config``: an InternEvo config -> an evotune config.

The InternEvo file is executed statement by statement (as InternEvo executes it,
with its ``configs._base_`` imports resolved when the InternEvo tree is given);
a statement that fails (typically such an import without the tree) is reported
and the rest is still read. Every key is accounted for in the printed table:
mapped, ignored with the reason, or not reproducible. A key that changes the
training math and cannot be honoured stops the conversion unless
``allow_approximate``.
"""

from __future__ import annotations

import ast
import os
import sys
from pathlib import Path
from typing import Any

from .internlm2 import ConversionError
from .key_report import KeyReport

_SECTION_KEYS = {
    "data",
    "model",
    "parallel",
    "hybrid_zero_optimizer",
    "adam",
    "lr_scheduler",
    "beta2_scheduler",
    "loss",
    "grad_scaler",
    "ckpt",
}


def read_internevo_config(
    path: Path, internevo_root: str | None = None
) -> tuple[dict[str, Any], list[str]]:
    """Top-level entries of an InternEvo config, and the statements that could not run."""
    try:
        tree = ast.parse(path.read_text(), filename=str(path))
    except SyntaxError as error:
        raise ConversionError(f"{path}:{error.lineno}: syntax error: {error.msg}") from None
    namespace: dict[str, Any] = {
        "__file__": str(path.resolve()),
        "__name__": "__internevo_config__",
    }
    failures = []
    added_path = None
    if internevo_root:
        added_path = str(Path(internevo_root).resolve())
        sys.path.insert(0, added_path)
    try:
        for statement in tree.body:
            module = ast.Module(body=[statement], type_ignores=[])
            try:
                exec(compile(module, str(path), "exec"), namespace)
            except Exception as error:
                source = ast.get_source_segment(path.read_text(), statement) or ""
                failures.append(
                    f"{path.name}:{statement.lineno}: {source.splitlines()[0][:60]} "
                    f"({type(error).__name__}: {error})"
                )
    finally:
        if added_path is not None:
            sys.path.remove(added_path)
    entries = {
        name: value
        for name, value in namespace.items()
        if not name.startswith("__")
        and not callable(value)
        and not hasattr(value, "__path__")
        and type(value).__name__ != "module"
    }
    return entries, failures


def _size(value: Any) -> int:
    if isinstance(value, dict):
        return int(value.get("size", 1))
    return int(value or 1)


def _dtype_name(value: Any) -> str:
    return str(value).replace("torch.", "")


def convert_internevo_config(
    source: Path,
    output: Path,
    world_size: int = 8,
    internevo_root: str | None = None,
    model: str | None = None,
    allow_approximate: bool = False,
) -> str:
    """Write the evotune config; returns the printed report (table and notes)."""
    if not source.is_file():
        raise ConversionError(f"{source}: InternEvo config not found")
    entries, failures = read_internevo_config(source, internevo_root)
    mapping = KeyReport("InternEvo", unreadable=failures)
    settings: dict[str, Any] = {}
    comments: list[str] = []

    data = dict(entries.get("data") or {})
    for required in ("seq_len", "micro_bsz", "total_steps"):
        if required not in data:
            raise ConversionError(
                f"{source}: data.{required} is required by InternEvo and missing"
                + (f" (unreadable statements: {failures[0]})" if failures else "")
            )
    seq_len, micro_bsz = int(data["seq_len"]), int(data["micro_bsz"])
    into_one = bool(data.get("pack_sample_into_one", False))
    packed_length = seq_len * micro_bsz
    mapping.mapped("data.seq_len", seq_len, "max_length_per_sample", "InternEvo's segment limit")
    mapping.mapped(
        "data.micro_bsz",
        micro_bsz,
        "max_length",
        f"packed_length = micro_bsz*seq_len = {packed_length}",
    )
    mapping.mapped(
        "data.pack_sample_into_one",
        into_one,
        "pack_mode, use_varlen_attn",
        "internevo_into_one, windows of seq_len" if into_one else "internevo, varlen",
    )
    settings.update(max_length=packed_length, use_varlen_attn=not into_one, batch_size=1)
    if "packed_length" in data and int(data["packed_length"]) != packed_length:
        mapping.ignored(
            "data.packed_length", data["packed_length"], "InternEvo forces micro_bsz*seq_len"
        )
    micro_num = int(data.get("micro_num", 1))
    mapping.mapped("data.micro_num", micro_num, "accumulative_counts")
    settings["accumulative_counts"] = micro_num
    if "gradient_accumulation" in data:
        mapping.ignored(
            "data.gradient_accumulation",
            data["gradient_accumulation"],
            "dead alias of micro_num in InternEvo",
        )
    settings["total_steps"] = int(data["total_steps"])
    mapping.mapped("data.total_steps", data["total_steps"], "total_steps")
    folder = data.get("train_folder")
    if folder is None:
        mapping.approximate(
            "data.train_folder", None, "InternEvo trains on random data without a folder"
        )
        folder = "/path/to/ftdp/train"
    else:
        mapping.mapped("data.train_folder", folder, "dataset_folder")
    settings["dataset_folder"] = str(folder)
    min_length = int(data.get("min_length", 0))
    mapping.mapped("data.min_length", min_length, "train_dataset.dataset_cfg.min_length")
    min_length_dict = data.get("min_length_dict")
    if min_length_dict:
        mapping.mapped(
            "data.min_length_dict", min_length_dict, "train_dataset.dataset_cfg.min_length_dict"
        )
    sampler_seed = int(data.get("seed", 1024))
    mapping.mapped("data.seed", sampler_seed, "sampler seed (order='internevo')")
    if data.get("dataset_weights"):
        settings["dataset_weights"] = dict(data["dataset_weights"])
        mapping.mapped(
            "data.dataset_weights",
            data["dataset_weights"],
            "dataset_weights",
            "keys must be folders relative to dataset_folder; check them",
        )
    if data.get("num_worker") is not None:
        settings["num_workers"] = int(data["num_worker"])
        mapping.mapped("data.num_worker", data["num_worker"], "num_workers")
    for key, reason in (
        ("skip_batches", "evotune has no batch skipping"),
        ("rampup_batch_size", "evotune has no batch-size ramp-up"),
    ):
        if data.get(key):
            mapping.approximate(f"data.{key}", data[key], reason)
    if data.get("use_packed_dataset", True) is False:
        mapping.approximate("data.use_packed_dataset", False, "evotune always packs")
    for key in ("valid_folder", "valid_every", "valid_micro_num"):
        if key in data:
            mapping.ignored(f"data.{key}", data[key], "no evaluation loop in evotune yet")
    handled = {
        "seq_len",
        "micro_bsz",
        "pack_sample_into_one",
        "packed_length",
        "micro_num",
        "gradient_accumulation",
        "total_steps",
        "train_folder",
        "min_length",
        "min_length_dict",
        "seed",
        "dataset_weights",
        "num_worker",
        "skip_batches",
        "rampup_batch_size",
        "use_packed_dataset",
        "valid_folder",
        "valid_every",
        "valid_micro_num",
    }
    for key in sorted(set(data) - handled):
        mapping.ignored(f"data.{key}", data[key], "no effect on the math (cache/diagnostics)")

    model_section = dict(entries.get("model") or {})
    dtype = _dtype_name(model_section.get("dtype", "torch.bfloat16"))
    if dtype in ("bfloat16", "float32", "tf32"):
        settings["dtype"] = "float32" if dtype == "tf32" else dtype
        mapping.mapped("model.dtype", model_section.get("dtype", "torch.bfloat16"), "dtype")
    else:
        settings["dtype"] = "bfloat16"
        mapping.approximate("model.dtype", dtype, "evotune trains in bfloat16 or float32")
    checkpoint = model_section.get("checkpoint", False)
    settings["gradient_checkpointing"] = bool(checkpoint)
    mapping.mapped(
        "model.checkpoint",
        checkpoint,
        "gradient_checkpointing",
        "every layer recomputed (same math)"
        if isinstance(checkpoint, float) and 0 < checkpoint < 1
        else "",
    )
    heads = model_section.get("num_attention_heads")
    for key in sorted(model_section):
        if key not in ("dtype", "checkpoint"):
            mapping.ignored(f"model.{key}", model_section[key], "read from the HF model folder")

    parallel = dict(entries.get("parallel") or {})
    tp, pp = _size(parallel.get("tensor", 1)), _size(parallel.get("pipeline", 1))
    sp = tp * pp
    if sp > 1 and (world_size % sp or (heads is not None and int(heads) % sp)):
        comments.append(
            f"InternEvo ran tensor={tp} x pipeline={pp}; sequence_parallel_size={sp} would keep its "
            f"data-parallel size but does not divide the world size {world_size} or the "
            f"{heads} attention heads, so evotune uses sp=1 (dp={world_size}): the global batch "
            f"is {sp}x InternEvo's; divide accumulative_counts by {sp} where it divides"
        )
        sp = 1
    settings["sequence_parallel_size"] = sp
    mapping.mapped(
        "parallel.tensor/pipeline",
        f"{tp}/{pp}",
        "sequence_parallel_size",
        f"dp = {world_size // sp} = InternEvo's world/(tp*pp)" if sp == tp * pp else "see comment",
    )
    zero1 = parallel.get("zero1", 1)
    zero1_size = _size(zero1)
    if zero1_size != 1:
        fsdp = isinstance(zero1, dict) and zero1.get("fsdp")
        settings["deepspeed"] = "deepspeed_zero3" if fsdp else "deepspeed_zero1"
        mapping.mapped("parallel.zero1", zero1, "deepspeed", "optimizer state sharding (same math)")

    optimizer = dict(entries.get("hybrid_zero_optimizer") or {})
    settings["max_norm"] = float(optimizer.get("clip_grad_norm", 0.0))
    mapping.mapped(
        "hybrid_zero_optimizer.clip_grad_norm",
        optimizer.get("clip_grad_norm", 0.0),
        "max_norm",
        "0 disables clipping (InternEvo's default when missing)",
    )

    adam = dict(entries.get("adam") or {})
    settings["lr"] = float(adam.get("lr", 1e-4))
    settings["betas"] = (float(adam.get("adam_beta1", 0.9)), float(adam.get("adam_beta2", 0.95)))
    settings["eps"] = float(adam.get("adam_eps", 1e-8))
    settings["weight_decay"] = float(adam.get("weight_decay", 0.01))
    settings["weight_decay_scope"] = "all"
    for key in ("lr", "adam_beta1", "adam_beta2", "adam_eps", "weight_decay"):
        if key in adam:
            mapping.mapped(
                f"adam.{key}",
                adam[key],
                {"lr": "lr", "adam_eps": "eps", "weight_decay": "weight_decay"}.get(key, "betas"),
            )
    beta2_scheduler = entries.get("beta2_scheduler")
    beta2_c = float(adam.get("adam_beta2_c", 0) or 0)
    if beta2_scheduler is not None and float(dict(beta2_scheduler).get("c", 0.8)) != 0:
        beta2_c = float(dict(beta2_scheduler).get("c", 0.8))
    if beta2_c:
        mapping.approximate(
            "adam.adam_beta2_c / beta2_scheduler.c", beta2_c, "evotune keeps beta2 constant"
        )

    scheduler = dict(entries.get("lr_scheduler") or {})
    settings.update(
        lr_schedule="internevo",
        warmup_ratio=float(scheduler.get("warmup_ratio", 0.0)),
        eta_min=float(scheduler.get("eta_min", 0.0)),
        init_steps=int(scheduler.get("init_steps", 0)),
    )
    for key in ("warmup_ratio", "eta_min", "init_steps"):
        if key in scheduler:
            mapping.mapped(f"lr_scheduler.{key}", scheduler[key], key, "InternEvo closed form")
    if "total_steps" in scheduler and int(scheduler["total_steps"]) != settings["total_steps"]:
        mapping.approximate(
            "lr_scheduler.total_steps",
            scheduler["total_steps"],
            "evotune schedules over data.total_steps",
        )

    loss = dict(entries.get("loss") or {})
    if float(loss.get("label_smoothing", 0) or 0):
        mapping.approximate("loss.label_smoothing", loss["label_smoothing"], "not supported")
    if "moe_loss_coeff" in loss:
        mapping.ignored("loss.moe_loss_coeff", loss["moe_loss_coeff"], "dense models only")
    settings["loss_reduction"] = "pack"
    if "grad_scaler" in entries:
        mapping.ignored("grad_scaler", "{...}", "fp16 loss scaling has no effect in bf16/fp32")

    ckpt = dict(entries.get("ckpt") or {})
    if ckpt.get("checkpoint_every"):
        settings["save_steps"] = int(ckpt["checkpoint_every"])
        mapping.mapped("ckpt.checkpoint_every", ckpt["checkpoint_every"], "save_steps")
    if ckpt.get("save_ckpt_folder"):
        mapping.ignored("ckpt.save_ckpt_folder", ckpt["save_ckpt_folder"], "use --work-dir")
    if ckpt.get("load_ckpt_info") or ckpt.get("load_ckpt_folder"):
        mapping.ignored(
            "ckpt.load_ckpt_info",
            ckpt.get("load_ckpt_info") or ckpt.get("load_ckpt_folder"),
            "convert it: evotune convert internevo-ckpt, then pass --model",
        )
    if "auto_resume" in ckpt:
        mapping.ignored("ckpt.auto_resume", ckpt["auto_resume"], "use evotune train --resume auto")
    for key in sorted(set(entries) - _SECTION_KEYS):
        mapping.ignored(key, entries[key], "no evotune equivalent")

    if model is None:
        comments.append(
            "set pretrained_model_name_or_path (convert InternEvo weights with "
            "'evotune convert internevo-ckpt')"
        )
    settings = {"pretrained_model_name_or_path": model or "/path/to/hf/model", **settings}
    if mapping.approximations and not allow_approximate:
        raise ConversionError(
            f"{source}: cannot reproduce exactly: {'; '.join(mapping.approximations)}; pass "
            "--allow-approximate to write the config anyway"
        )
    text = _render(
        source,
        settings,
        comments,
        mapping,
        min_length,
        min_length_dict,
        seq_len,
        into_one,
        sampler_seed,
    )
    temporary = output.with_name(output.name + ".tmp")
    temporary.write_text(text)
    os.replace(temporary, output)
    return mapping.table() + ("\n" + "\n".join(f"note: {c}" for c in comments) if comments else "")


def _render(
    source: Path,
    settings: dict[str, Any],
    comments: list[str],
    mapping: KeyReport,
    min_length: int,
    min_length_dict: Any,
    seq_len: int,
    into_one: bool,
    sampler_seed: int,
) -> str:
    lines = [
        f"# evotune config converted from the InternEvo config {source.name}",
        "# by 'evotune convert internevo-config'. Settings not reproduced:",
        *([f"#   {a}" for a in mapping.approximations] or ["#   none"]),
        *[f"# NOTE: {c}" for c in comments],
        "from evotune.data import InternRepoSampler, build_packed_dataset, "
        "load_intern_repo_tokenized_dataset",
        "",
        "#" * 71,
        "#" + "PART 1  Settings".center(69) + "#",
        "#" * 71,
    ]
    for key, value in settings.items():
        lines.append(f"{key} = {value!r}")
    dataset_cfg = [
        "        type=load_intern_repo_tokenized_dataset,",
        "        folder=dataset_folder,",
        f"        min_length={min_length!r},",
        f"        min_length_dict={dict(min_length_dict) if min_length_dict else None!r},",
        "        data_order_path=None,",
        "        file_type='.bin',",
    ]
    lines += [
        "",
        "#" * 71,
        "#" + "PART 2  Dataset & Sampler".center(69) + "#",
        "#" * 71,
        "train_dataset = dict(",
        "    type=build_packed_dataset,",
        "    dataset_cfg=dict(",
        *dataset_cfg,
        "    ),",
        "    packed_length=max_length,",
        f"    max_length_per_sample={seq_len!r},",
        f"    pack_mode={'internevo_into_one' if into_one else 'internevo'!r},",
        "    seed=1024,",
        ")",
        "train_dataloader = dict(",
        f"    sampler=dict(type=InternRepoSampler, shuffle=True, seed={sampler_seed!r}, order='internevo'),",
        ")",
    ]
    return "\n".join(lines) + "\n"
