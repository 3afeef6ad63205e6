"""Settings values -> a checked TrainConfig: types, ranges, consistency, component arguments.

Checks read the schema and the signatures of the components' targets; they never
build anything (the builder lives in ``build.py`` and is not imported here).
"""

from __future__ import annotations

import difflib
import inspect
import types
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

from ..errors import ConfigError
from .schema import COMPONENT_NAMES, DATALOADER_KEYS, PROVIDED_ARGUMENTS, TrainConfig


def suggest(name: str, choices: Sequence[str]) -> str:
    """' (did you mean 'x'?)' for the closest choice, or ''."""
    close = difflib.get_close_matches(name, choices, n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


def validate(source: Path, values: dict[str, Any]) -> TrainConfig:
    """Type-check and coerce each value, build the TrainConfig, check it as a whole."""
    hints = typing.get_type_hints(TrainConfig)
    checked = {
        name: _check_type(source, name, value, hints[name]) for name, value in values.items()
    }
    settings = TrainConfig(**checked)
    check_consistency(source, settings)
    return settings


def _check_type(source: Path, name: str, value: Any, hint: Any) -> Any:
    ok, converted = coerce(value, hint)
    if not ok:
        raise ConfigError(
            f"{source}: setting {name!r} = {value!r} should be {describe(hint)}; fix the value"
        )
    return converted


def coerce(value: Any, hint: Any) -> tuple[bool, Any]:
    """(whether ``value`` fits ``hint``, the value converted: int -> float, list -> tuple)."""
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin is Literal:
        return value in args, value
    if origin in (typing.Union, types.UnionType):
        for option in args:
            ok, converted = coerce(value, option)
            if ok:
                return True, converted
        return False, value
    if hint is Any:
        return True, value
    if hint is type(None):
        return value is None, value
    if hint is bool:
        return isinstance(value, bool), value
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool), value
    if hint is float:
        ok = isinstance(value, int | float) and not isinstance(value, bool)
        return ok, float(value) if ok else value
    if hint is str:
        return isinstance(value, str | Path), str(value) if isinstance(value, Path) else value
    if origin is tuple:
        if not isinstance(value, list | tuple) or len(value) != len(args):
            return False, value
        items = [coerce(v, a) for v, a in zip(value, args, strict=True)]
        return all(ok for ok, _ in items), tuple(v for _, v in items)
    if origin is list:
        if not isinstance(value, list | tuple):
            return False, value
        elements = [coerce(v, args[0]) for v in value]
        return all(ok for ok, _ in elements), [v for _, v in elements]
    if origin is dict:
        if not isinstance(value, dict):
            return False, value
        key_type, value_type = args
        entries = {k: coerce(v, value_type) for k, v in value.items()}
        keys_ok = all(coerce(k, key_type)[0] for k in value)
        values_ok = all(ok for ok, _ in entries.values())
        return keys_ok and values_ok, {k: v for k, (_, v) in entries.items()}
    raise TypeError(f"unsupported type hint {hint}")


def describe(hint: Any) -> str:
    """A type hint in words: 'one of 'pack', 'token'', 'a int or None'."""
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in args)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(describe(a) for a in args)
    if hint is type(None):
        return "None"
    if origin is tuple:
        return f"a tuple of {len(args)} ({', '.join(describe(a) for a in args)})"
    if origin is list:
        return f"a list of {describe(args[0])}"
    if origin is dict:
        return f"a dict of {describe(args[0])} -> {describe(args[1])}"
    return f"a {getattr(hint, '__name__', hint)}"


def check_consistency(source: Path, s: TrainConfig) -> None:
    """Ranges and combinations no single type can express."""

    def fail(key: str, message: str) -> None:
        raise ConfigError(f"{source}: {key}: {message}")

    if not s.pretrained_model_name_or_path:
        fail("pretrained_model_name_or_path", "required: a local HF model folder or a hub id")
    if s.train_dataset is None and not s.dataset_folder:
        fail("dataset_folder", "set dataset_folder, or define train_dataset = dict(type=...)")
    if not s.pack_to_max_length:
        fail("pack_to_max_length", "ftdp datasets are always packed; set it to True")
    positive = {
        "max_length": s.max_length,
        "batch_size": s.batch_size,
        "accumulative_counts": s.accumulative_counts,
        "max_epochs": s.max_epochs,
        "loss_chunk_size": s.loss_chunk_size,
        "save_steps": s.save_steps,
        "log_interval": s.log_interval,
        "sequence_parallel_size": s.sequence_parallel_size,
        "max_consecutive_skipped_steps": s.max_consecutive_skipped_steps,
    }
    for key, value in positive.items():
        if value < 1:
            fail(key, f"must be >= 1, got {value}")
    if not 0.0 <= s.warmup_start_factor <= 1.0:
        fail("warmup_start_factor", f"must be in [0, 1], got {s.warmup_start_factor}")
    if s.lr_step_unit == "micro_batch" and s.lr_schedule != "xtuner":
        fail("lr_step_unit", "'micro_batch' is XTuner's stepping: set lr_schedule = 'xtuner'")
    for key in ("eval_steps", "max_eval_batches", "evaluation_freq"):
        value = getattr(s, key)
        if value is not None and value < 1:
            fail(key, f"must be >= 1 (or None), got {value}")
    if s.max_new_tokens < 1:
        fail("max_new_tokens", f"must be >= 1, got {s.max_new_tokens}")
    if s.prompt_template is not None:
        from ..data.templates import PROMPT_TEMPLATES

        if s.prompt_template not in PROMPT_TEMPLATES:
            fail(
                "prompt_template",
                f"unknown template {s.prompt_template!r}{suggest(s.prompt_template, sorted(PROMPT_TEMPLATES))}; "
                f"choose one of {', '.join(sorted(PROMPT_TEMPLATES))}, or None for the tokenizer's",
            )
    if s.cpu_threads is not None and s.cpu_threads < 1:
        fail(
            "cpu_threads",
            f"must be >= 1 (or None to use the cores this process may use), got {s.cpu_threads}",
        )
    if s.mixed_precision != "bf16_params" and s.dtype != "bfloat16":
        fail("mixed_precision", f"{s.mixed_precision!r} applies to dtype='bfloat16' only")
    other_engine = s.deepspeed is not None or s.engine != "torch"
    if s.mixed_precision == "autocast" and other_engine:
        fail(
            "mixed_precision", "'autocast' is the torch engine's; DeepSpeed/FSDP2 keep bf16 params"
        )
    if s.activation_checkpointing_every < 1:
        fail(
            "activation_checkpointing_every",
            f"must be >= 1, got {s.activation_checkpointing_every}",
        )
    selective = s.activation_checkpointing_every != 1 or s.activation_checkpointing_policy != "full"
    if selective and not s.gradient_checkpointing:
        fail(
            "activation_checkpointing_every"
            if s.activation_checkpointing_every != 1
            else "activation_checkpointing_policy",
            "applies with gradient_checkpointing=True; set it, or remove this setting",
        )
    if s.compile and s.deepspeed is not None:
        fail("compile", "regional compilation runs with the torch engine and FSDP2, not DeepSpeed")
    if s.compile and s.gradient_checkpointing and s.activation_checkpointing_policy != "full":
        fail(
            "activation_checkpointing_policy",
            "'save_matmuls' does not compose with compile=True (torch's selective checkpoint "
            "rejects compiled layers); use 'full' with activation_checkpointing_every instead",
        )
    if s.reduce_dtype != "float32" and s.deepspeed is not None:
        fail(
            "reduce_dtype",
            "set for the torch and FSDP2 engines; DeepSpeed reads communication_data_type "
            "from its JSON",
        )
    if s.total_steps is not None and s.total_steps < 1:
        fail("total_steps", f"must be >= 1 (or None to use max_epochs), got {s.total_steps}")
    if s.lr <= 0:
        fail("lr", f"must be > 0, got {s.lr}")
    if not 0.0 <= s.warmup_ratio < 1.0:
        fail("warmup_ratio", f"must be in [0, 1), got {s.warmup_ratio}")
    if s.max_norm < 0:
        fail("max_norm", f"must be >= 0 (0 disables clipping), got {s.max_norm}")
    if s.weight_decay < 0:
        fail("weight_decay", f"must be >= 0, got {s.weight_decay}")
    if s.num_workers < 0:
        fail("num_workers", f"must be >= 0, got {s.num_workers}")
    if s.init_steps < 0:
        fail("init_steps", f"must be >= 0, got {s.init_steps}")
    if not s.save_shard_size_mb > 0:
        fail("save_shard_size_mb", f"must be > 0 (MiB), got {s.save_shard_size_mb}")
    if s.save_total_limit == 0 or s.save_total_limit < -1:
        fail("save_total_limit", "keep N >= 1 newest checkpoints, or -1 to keep all")
    if s.dataset_weights:
        for key, weight in s.dataset_weights.items():
            if weight < 0:
                fail("dataset_weights", f"weight of {key!r} must be >= 0, got {weight}")
    for component in COMPONENT_NAMES:
        check_component(source, component, getattr(s, component))
    _check_sampler_takes_weights(source, s)
    if s.train_dataloader is not None:
        unknown = set(s.train_dataloader) - set(DATALOADER_KEYS)
        if unknown:
            key = sorted(unknown)[0]
            fail(
                f"train_dataloader.{key}",
                f"not a dataloader key{suggest(key, DATALOADER_KEYS)}; "
                f"allowed: {', '.join(DATALOADER_KEYS)}",
            )
        if "dataset" in s.train_dataloader and (
            s.train_dataset is None or s.train_dataloader["dataset"] != s.train_dataset
        ):
            fail(
                "train_dataloader.dataset",
                "evotune builds the dataset from train_dataset and never reads this key; "
                "define train_dataset = dict(type=build_packed_dataset, ...) and write "
                "dataset=train_dataset here, or remove the key",
            )
        for key in ("batch_size", "num_workers"):
            if key in s.train_dataloader and s.train_dataloader[key] != getattr(s, key):
                fail(
                    f"train_dataloader.{key}",
                    f"{s.train_dataloader[key]!r} differs from the setting {key}="
                    f"{getattr(s, key)!r}; set it once, in PART 1",
                )


def check_component(source: Path, key: str, spec: Any) -> None:
    """Every ``type`` is callable and takes every argument the config gives it."""
    if spec is None or not isinstance(spec, dict):
        return
    if "type" not in spec:
        for name, child in spec.items():
            check_component(source, f"{key}.{name}", child)
        return
    target = spec["type"]
    if not callable(target):
        raise ConfigError(
            f"{source}: {key}.type = {target!r} is not callable; import the function or class "
            "in the config and pass it (type=build_packed_dataset)"
        )
    kwargs = {k: v for k, v in spec.items() if k != "type"}
    try:
        signature = inspect.signature(target)
    except (TypeError, ValueError):
        return
    parameters = signature.parameters
    takes_kwargs = any(p.kind is p.VAR_KEYWORD for p in parameters.values())
    for name in kwargs:
        if name not in parameters and not takes_kwargs:
            raise ConfigError(
                f"{source}: {key}.{name}: {qualified_name(target)} has no argument {name!r}"
                f"{suggest(name, list(parameters))}"
            )
    for name, child in kwargs.items():
        check_component(source, f"{key}.{name}", child)


def qualified_name(target: Any) -> str:
    return getattr(target, "__qualname__", repr(target))


def _check_sampler_takes_weights(source: Path, s: TrainConfig) -> None:
    """dataset_weights reach the sampler as a provided argument: it must take them."""
    sampler = (s.train_dataloader or {}).get("sampler")
    if not s.dataset_weights or not isinstance(sampler, dict) or "type" not in sampler:
        return
    accepted = accepted_names(sampler["type"])
    if accepted is None or "dataset_weights" in accepted or "dataset_weights" in sampler:
        return
    rule = PROVIDED_ARGUMENTS["dataset_weights"]
    raise ConfigError(
        f"{source}: dataset_weights: train_dataloader.sampler "
        f"{qualified_name(sampler['type'])} takes no dataset_weights, so {rule.consequence}; "
        f"{rule.fix}"
    )


def accepted_names(target: Any) -> Mapping[str, Any] | None:
    """The target's parameter names, or None when it takes any keyword (or has no signature)."""
    try:
        parameters = inspect.signature(target).parameters
    except (TypeError, ValueError):
        return None
    if any(p.kind is p.VAR_KEYWORD for p in parameters.values()):
        return None
    return parameters
