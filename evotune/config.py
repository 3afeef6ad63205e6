"""XTuner-style Python config files -> one typed, validated TrainConfig.

A config is a Python file executed as a module. Its plain top-level values are
settings (PART 1 in XTuner's layout); dicts with a ``type`` key are components
that evotune builds lazily, in data-flow order, with arguments it owns (ranks,
the dataset) filled in at build time.

``--cfg-options name=value`` for a top-level name rewrites that name's assignment
in the file before it runs, so every later line that uses the name (for example
``packed_length=max_length`` inside a component) sees the override. Dotted keys
(``train_dataset.seed=7``) set a key of a component after the file ran.
"""

from __future__ import annotations

from .errors import ConfigError

import ast
import dataclasses
import difflib
import inspect
import pprint
import types
import typing
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal




DType = Literal["float32", "bfloat16"]
LossReduction = Literal["pack", "token"]
LRSchedule = Literal["internevo", "xtuner", "constant"]
WeightDecayScope = Literal["all", "no_bias_norm"]
AttnImplementation = Literal["auto", "sdpa", "flex_attention", "eager", "flash_attention_2"]


@dataclass
class TrainConfig:
    """Every setting evotune reads, with InternEvo's behaviour as the default."""

    # model
    pretrained_model_name_or_path: str = ""
    tokenizer_name_or_path: str | None = None
    dtype: DType = "float32"
    attn_implementation: AttnImplementation = "auto"
    gradient_checkpointing: bool = False
    # data
    dataset_folder: str | None = None
    max_length: int = 2048
    pack_to_max_length: bool = True
    use_varlen_attn: bool = True
    batch_size: int = 1
    num_workers: int = 0
    dataset_weights: dict[str, float] | None = None
    train_dataset: dict[str, Any] | None = None
    train_dataloader: dict[str, Any] | None = None
    # optimisation
    accumulative_counts: int = 1
    max_epochs: int = 1
    total_steps: int | None = None
    loss_reduction: LossReduction = "pack"
    loss_chunk_size: int = 4096
    lr: float = 2e-5
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    weight_decay: float = 0.01
    weight_decay_scope: WeightDecayScope = "all"
    max_norm: float = 1.0
    lr_schedule: LRSchedule = "internevo"
    warmup_ratio: float = 0.0
    init_steps: int = 0
    eta_min: float | None = None
    max_consecutive_skipped_steps: int = 10
    # parallelism
    sequence_parallel_size: int = 1
    deepspeed: str | None = None
    # run
    seed: int = 0
    save_steps: int = 500
    save_total_limit: int = 2
    log_interval: int = 1
    work_dir: str | None = None

    def resolved_eta_min(self) -> float:
        if self.eta_min is not None:
            return self.eta_min
        return 0.15 * self.lr if self.lr_schedule == "xtuner" else 0.0


SETTING_NAMES = tuple(f.name for f in dataclasses.fields(TrainConfig))
COMPONENT_NAMES = ("train_dataset", "train_dataloader")
_DATALOADER_KEYS = ("dataset", "sampler", "batch_size", "num_workers")


@dataclass
class LoadedConfig:
    """A validated config plus where it came from (for messages and the saved copy)."""

    settings: TrainConfig
    source: Path
    overrides: list[str] = field(default_factory=list)

    def render(self) -> str:
        return render_config(self.settings, header=f"resolved from {self.source}")


# ---------------------------------------------------------------------------
# loading


def load_config(path: str | Path, overrides: Sequence[str] = ()) -> LoadedConfig:
    """Execute a config file with ``--cfg-options`` applied and validate every setting."""
    source = Path(path)
    if not source.is_file():
        raise ConfigError(f"{source}: config file not found; pass the path of a Python config")
    top_level, dotted = _parse_overrides(source, overrides)
    namespace = _execute(source, top_level)
    for name, value in top_level.items():
        namespace.setdefault(name, value)
    values = _settings_from_namespace(source, namespace)
    for dotted_key, value in dotted.items():
        _set_dotted(source, values, dotted_key, value)
    settings = _validate(source, values)
    return LoadedConfig(settings=settings, source=source, overrides=list(overrides))


def _parse_overrides(
    source: Path, overrides: Sequence[str]
) -> tuple[dict[str, Any], dict[str, Any]]:
    top_level: dict[str, Any] = {}
    dotted: dict[str, Any] = {}
    for item in overrides:
        key, sep, text = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ConfigError(f"--cfg-options {item!r}: expected key=value, e.g. max_length=2048")
        value = _parse_value(text.strip())
        root = key.split(".")[0]
        if root not in SETTING_NAMES:
            raise ConfigError(
                f"--cfg-options {key}: unknown setting {root!r}{_suggest(root, SETTING_NAMES)}"
            )
        (dotted if "." in key else top_level)[key] = value
    return top_level, dotted


def _parse_value(text: str) -> Any:
    """Python literals as written (1e-4, True, (0.9, 0.95), None); anything else is a string."""
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        if text.lower() in ("true", "false"):
            return text.lower() == "true"
        if text.lower() in ("none", "null"):
            return None
        return text


def _execute(source: Path, top_level_overrides: Mapping[str, Any]) -> dict[str, Any]:
    text = source.read_text()
    try:
        tree = ast.parse(text, filename=str(source))
    except SyntaxError as error:
        raise ConfigError(f"{source}:{error.lineno}: syntax error: {error.msg}") from None
    if top_level_overrides:
        tree = _OverrideAssignments(top_level_overrides).visit(tree)
        ast.fix_missing_locations(tree)
    namespace: dict[str, Any] = {
        "__file__": str(source.resolve()),
        "__name__": "__evotune_config__",
    }
    try:
        exec(compile(tree, str(source), "exec"), namespace)
    except Exception as error:
        line = _error_line(error, source)
        raise ConfigError(
            f"{source}{line}: the config raised {type(error).__name__}: {error}"
        ) from error
    return namespace


def _error_line(error: BaseException, source: Path) -> str:
    frame = error.__traceback__
    line = ""
    while frame is not None:
        if frame.tb_frame.f_code.co_filename == str(source):
            line = f":{frame.tb_lineno}"
        frame = frame.tb_next
    return line


class _OverrideAssignments(ast.NodeTransformer):
    """Replace the value of top-level ``name = ...`` for overridden names."""

    def __init__(self, overrides: Mapping[str, Any]):
        self.overrides = overrides

    def visit_Module(self, node: ast.Module) -> ast.Module:
        for statement in node.body:
            targets: list[ast.expr] = []
            if isinstance(statement, ast.Assign):
                targets = statement.targets
            elif isinstance(statement, ast.AnnAssign) and statement.value is not None:
                targets = [statement.target]
            names = [t.id for t in targets if isinstance(t, ast.Name)]
            hit = [n for n in names if n in self.overrides]
            if hit and len(targets) == 1:
                literal = ast.parse(repr(self.overrides[hit[0]]), mode="eval").body
                statement.value = literal
        return node


def _settings_from_namespace(source: Path, namespace: Mapping[str, Any]) -> dict[str, Any]:
    values: dict[str, Any] = {}
    for name, value in namespace.items():
        if name.startswith("_") or _is_code(value):
            continue
        if name not in SETTING_NAMES:
            raise ConfigError(
                f"{source}: unknown setting {name!r}{_suggest(name, SETTING_NAMES)}; "
                "rename it, or prefix a helper variable with '_'"
            )
        values[name] = value
    return values


def _is_code(value: Any) -> bool:
    return isinstance(value, types.ModuleType) or inspect.isclass(value) or callable(value)


def _set_dotted(source: Path, values: dict[str, Any], key: str, value: Any) -> None:
    parts = key.split(".")
    node = values.get(parts[0])
    if not isinstance(node, dict):
        raise ConfigError(
            f"--cfg-options {key}: {parts[0]!r} is not a component dict in {source}; "
            f"override it as {parts[0]}=VALUE"
        )
    for part in parts[1:-1]:
        child = node.get(part)
        if not isinstance(child, dict):
            raise ConfigError(f"--cfg-options {key}: {part!r} is not a dict in {source}")
        node = child
    node[parts[-1]] = value


def _suggest(name: str, choices: Sequence[str]) -> str:
    close = difflib.get_close_matches(name, choices, n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


# ---------------------------------------------------------------------------
# validation


def _validate(source: Path, values: dict[str, Any]) -> TrainConfig:
    hints = typing.get_type_hints(TrainConfig)
    checked: dict[str, Any] = {}
    for name, value in values.items():
        checked[name] = _check_type(source, name, value, hints[name])
    settings = TrainConfig(**checked)
    _check_consistency(source, settings)
    return settings


def _check_type(source: Path, name: str, value: Any, hint: Any) -> Any:
    ok, converted = _coerce(value, hint)
    if not ok:
        raise ConfigError(
            f"{source}: setting {name!r} = {value!r} should be {_describe(hint)}; fix the value"
        )
    return converted


def _coerce(value: Any, hint: Any) -> tuple[bool, Any]:
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin is Literal:
        return value in args, value
    if origin in (typing.Union, types.UnionType):
        for option in args:
            ok, converted = _coerce(value, option)
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
        items = [_coerce(v, a) for v, a in zip(value, args, strict=True)]
        return all(ok for ok, _ in items), tuple(v for _, v in items)
    if origin is dict:
        if not isinstance(value, dict):
            return False, value
        key_type, value_type = args
        items = {k: _coerce(v, value_type) for k, v in value.items()}
        keys_ok = all(_coerce(k, key_type)[0] for k in value)
        return keys_ok and all(ok for ok, _ in items.values()), {
            k: v for k, (_, v) in items.items()
        }
    raise TypeError(f"unsupported type hint {hint}")


def _describe(hint: Any) -> str:
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in args)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(a) for a in args)
    if hint is type(None):
        return "None"
    if origin is tuple:
        return f"a tuple of {len(args)} ({', '.join(_describe(a) for a in args)})"
    if origin is dict:
        return f"a dict of {_describe(args[0])} -> {_describe(args[1])}"
    return f"a {getattr(hint, '__name__', hint)}"


def _check_consistency(source: Path, s: TrainConfig) -> None:
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
    if s.save_total_limit == 0 or s.save_total_limit < -1:
        fail("save_total_limit", "keep N >= 1 newest checkpoints, or -1 to keep all")
    if s.dataset_weights:
        for key, weight in s.dataset_weights.items():
            if weight < 0:
                fail("dataset_weights", f"weight of {key!r} must be >= 0, got {weight}")
    for component in COMPONENT_NAMES:
        _check_component(source, component, getattr(s, component))
    if s.train_dataloader is not None:
        unknown = set(s.train_dataloader) - set(_DATALOADER_KEYS)
        if unknown:
            key = sorted(unknown)[0]
            fail(
                f"train_dataloader.{key}",
                f"not a dataloader key{_suggest(key, _DATALOADER_KEYS)}; "
                f"allowed: {', '.join(_DATALOADER_KEYS)}",
            )
        for key in ("batch_size", "num_workers"):
            if key in s.train_dataloader and s.train_dataloader[key] != getattr(s, key):
                fail(
                    f"train_dataloader.{key}",
                    f"{s.train_dataloader[key]!r} differs from the setting {key}="
                    f"{getattr(s, key)!r}; set it once, in PART 1",
                )


def _check_component(source: Path, key: str, spec: Any) -> None:
    if spec is None or not isinstance(spec, dict):
        return
    if "type" not in spec:
        for name, child in spec.items():
            _check_component(source, f"{key}.{name}", child)
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
                f"{source}: {key}.{name}: {_qualified_name(target)} has no argument {name!r}"
                f"{_suggest(name, list(parameters))}"
            )
    for name, child in kwargs.items():
        _check_component(source, f"{key}.{name}", child)


# ---------------------------------------------------------------------------
# building components


def build_component(spec: Any, **provided: Any) -> Any:
    """Build ``dict(type=f, **kwargs)`` as ``f(**kwargs, **provided)``; nested specs first.

    ``provided`` are the arguments evotune owns (the dataset, ranks). They fill the
    arguments the config left out or set to None, and are dropped when ``f`` does not
    accept them (a sampler without ``micro_num``, say).
    """
    if not isinstance(spec, dict) or "type" not in spec:
        return spec
    target: Callable[..., Any] = spec["type"]
    kwargs = {k: build_component(v) for k, v in spec.items() if k != "type"}
    for name, value in provided.items():
        if kwargs.get(name) is None:
            kwargs[name] = value
    try:
        parameters = inspect.signature(target).parameters
        accepts_all = any(p.kind is p.VAR_KEYWORD for p in parameters.values())
        kwargs = {k: v for k, v in kwargs.items() if accepts_all or k in parameters or k in spec}
    except (TypeError, ValueError):
        pass
    return target(**kwargs)


# ---------------------------------------------------------------------------
# rendering the resolved config back as a loadable Python file


def render_config(settings: TrainConfig, header: str = "") -> str:
    imports: dict[str, set[str]] = {}
    lines = []
    for f in dataclasses.fields(TrainConfig):
        value = getattr(settings, f.name)
        lines.append(f"{f.name} = {_render_value(value, imports, 0)}")
    import_lines = [
        f"from {module} import {', '.join(sorted(names))}"
        for module, names in sorted(imports.items())
    ]
    head = [f"# evotune config, {header}".rstrip(", ")] if header else []
    return "\n".join([*head, *import_lines, "", *lines]) + "\n"


def _render_value(value: Any, imports: dict[str, set[str]], indent: int) -> str:
    if isinstance(value, dict):
        pad = " " * (indent + 4)
        items = []
        for key, item in value.items():
            rendered = _render_value(item, imports, indent + 4)
            items.append(f"{pad}{key}={rendered}," if key.isidentifier() else None)
        if all(item is not None for item in items) and value:
            return "dict(\n" + "\n".join(items) + "\n" + " " * indent + ")"
        inner = ", ".join(f"{k!r}: {_render_value(v, imports, indent)}" for k, v in value.items())
        return "{" + inner + "}"
    if isinstance(value, list | tuple):
        inner = ", ".join(_render_value(v, imports, indent) for v in value)
        return (
            f"[{inner}]"
            if isinstance(value, list)
            else f"({inner}{',' if len(value) == 1 else ''})"
        )
    if callable(value):
        module, name = value.__module__, value.__qualname__
        if "." in name:  # a bound classmethod such as AutoModel.from_pretrained
            owner = name.split(".")[0]
            imports.setdefault(module, set()).add(owner)
        else:
            imports.setdefault(module, set()).add(name)
        return name
    return pprint.pformat(value)


def _qualified_name(target: Any) -> str:
    return getattr(target, "__qualname__", repr(target))
