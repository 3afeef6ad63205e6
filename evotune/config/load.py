"""Config file -> LoadedConfig: execute the file, apply ``--cfg-options``, validate.

A config is a Python file executed as a module. Its plain top-level values are
settings (PART 1 in XTuner's layout); dicts with a ``type`` key are components
that evotune builds later, in data-flow order (``build.py``).

``--cfg-options name=value`` for a top-level name rewrites that name's assignment
in the file before it runs, so every later line that uses the name (for example
``packed_length=max_length`` inside a component) sees the override. Dotted keys
(``train_dataset.seed=7``) set a key of a component after the file ran.
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
from .render import render_config
from .schema import SETTING_NAMES, TrainConfig
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
    top_level, dotted = _parse_overrides(source, overrides)
    namespace = _execute(source, top_level)
    for name, value in top_level.items():
        namespace.setdefault(name, value)
    values = _settings_from_namespace(source, namespace)
    for dotted_key, value in dotted.items():
        _set_dotted(source, values, dotted_key, value)
    settings = validate(source, values)
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
                f"--cfg-options {key}: unknown setting {root!r}{suggest(root, SETTING_NAMES)}"
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
                f"{source}: unknown setting {name!r}{suggest(name, SETTING_NAMES)}; "
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
