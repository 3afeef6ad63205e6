"""Config file -> LoadedConfig: execute the file, apply ``--cfg-options``, validate.

A config is a Python file executed as a module. Its plain top-level values are
settings (PART 1 in XTuner's layout); dicts with a ``type`` key are components
that evotune builds later, in data-flow order (``build.py``).

``--cfg-options name=value`` sets any top-level name the file binds, a setting or
a helper: the override is bound again after every statement that binds the name,
so later lines that read it see it (``execute.py``). Dotted keys
(``train_dataset.seed=7``) set a key of a component after the file ran.

Every top-level name must be a setting, a helper that some line of the config reads,
a private ``_name``, or code (imports, functions); the rest are reported together in
one line. XTuner sections evotune does not read (``optim_wrapper``,
``param_scheduler``, ...) are refused with the settings that replace them.
"""

from __future__ import annotations

import ast
import inspect
import types
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import ConfigError
from .execute import ConfigRun
from .render import render_config
from .schema import SETTING_NAMES, XTUNER_SECTIONS, TrainConfig
from .validate import suggest, validate


@dataclass
class LoadedConfig:
    """A validated config plus where it came from (for messages and the saved copy)."""

    settings: TrainConfig
    source: Path
    overrides: list[str] = field(default_factory=list)

    def render(self) -> str:
        return render_config(self.settings, header=f"resolved from {self.source}")


def load_config(path: str | Path, overrides: Sequence[str] = ()) -> LoadedConfig:
    """Execute a config file with ``--cfg-options`` applied and validate every setting."""
    source = Path(path)
    if not source.is_file():
        raise ConfigError(f"{source}: config file not found; pass the path of a Python config")
    top_level, dotted = _parse_overrides(overrides)
    _check_dotted_roots(dotted)
    run = ConfigRun(top_level)
    namespace = run.execute(source)
    _check_override_names(source, top_level, run.bound_names)
    for name, value in top_level.items():
        if name in SETTING_NAMES or name in namespace:
            namespace[name] = value
    values = _settings_from_namespace(source, namespace, run.read_names)
    for dotted_key, value in dotted.items():
        _set_dotted(source, values, dotted_key, value)
    settings = validate(source, values)
    return LoadedConfig(settings=settings, source=source, overrides=list(overrides))


def _parse_overrides(overrides: Sequence[str]) -> tuple[dict[str, Any], dict[str, Any]]:
    top_level: dict[str, Any] = {}
    dotted: dict[str, Any] = {}
    for item in overrides:
        key, sep, text = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ConfigError(f"--cfg-options {item!r}: expected key=value, e.g. max_length=2048")
        root = key.split(".")[0]
        if not root.isidentifier():
            raise ConfigError(f"--cfg-options {key}: {root!r} is not a Python name")
        (dotted if "." in key else top_level)[key] = _parse_value(text.strip())
    return top_level, dotted


def _check_dotted_roots(dotted: Mapping[str, Any]) -> None:
    for key in dotted:
        root = key.split(".")[0]
        if root not in SETTING_NAMES:
            raise ConfigError(
                f"--cfg-options {key}: unknown setting {root!r}{suggest(root, SETTING_NAMES)}; "
                "dotted keys set a key of a component setting (train_dataset.seed=7)"
            )


def _check_override_names(source: Path, top_level: Mapping[str, Any], bound: set[str]) -> None:
    for key in top_level:
        if key not in SETTING_NAMES and key not in bound:
            known = [*SETTING_NAMES, *sorted(n for n in bound if not n.startswith("__"))]
            raise ConfigError(
                f"--cfg-options {key}: {key!r} is neither a setting nor a name {source} "
                f"defines{suggest(key, known)}"
            )


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


def _settings_from_namespace(
    source: Path, namespace: Mapping[str, Any], read_names: set[str]
) -> dict[str, Any]:
    values: dict[str, Any] = {}
    foreign: list[str] = []
    unknown: list[str] = []
    for name, value in namespace.items():
        if name.startswith("_") or _is_code(value):
            continue
        if name in SETTING_NAMES:
            values[name] = value
        elif name in XTUNER_SECTIONS:
            foreign.append(name)
        elif name not in read_names:  # a name some line reads is a helper variable
            unknown.append(name)
    problems = []
    if foreign:
        listed = ", ".join(f"{n} (set {XTUNER_SECTIONS[n]} instead)" for n in foreign)
        problems.append(
            f"XTuner sections evotune does not read: {listed}; remove them, or convert the "
            "file with `evotune convert xtuner-config`"
        )
    if unknown:
        listed = ", ".join(f"{n!r}{suggest(n, SETTING_NAMES)}" for n in unknown)
        plural = "s" if len(unknown) > 1 else ""
        problems.append(
            f"unknown setting{plural} {listed}; rename to a setting (see the settings "
            "reference), use it in the config, or prefix a helper variable with '_'"
        )
    if problems:
        raise ConfigError(f"{source}: " + "; ".join(problems))
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
