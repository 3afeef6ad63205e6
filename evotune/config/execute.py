"""Run a config file (and the base files it imports) with ``--cfg-options`` applied.

A config file is executed as a Python module, with two additions made on its
syntax tree before it runs:

* **Overrides hold from the first binding on.** After every statement that binds an
  overridden top-level name, however it binds it (``x = ...``, ``a, x = ...``,
  ``x *= 2``, ``x: int = ...``, ``for x in ...``, ``with ... as x``, an import),
  the override is bound again. Later lines that read the name, such as
  ``packed_length=max_length`` inside a component, see the override, and the
  file's last word on the name is the override. Statements nested in ``if``,
  ``for``, ``while``, ``with`` and ``try`` at top level count too; function and
  class bodies are their own scopes and do not.
* **Base files.** A relative import at top level, ``from .base import *`` or
  ``from ..common.llama import lr, max_length``, runs the named file next to the
  config (``./base.py``, ``../common/llama.py``) the same way, overrides
  included, and binds the imported names. So ``--cfg-options max_length=4096``
  reaches ``max_length`` wherever a base defines or uses it.
"""

from __future__ import annotations

import ast
import copy
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import ConfigError

_REBIND = "__evotune_rebind__"
_IMPORT_BASE = "__evotune_import_base__"
_INJECTED = frozenset({_REBIND, _IMPORT_BASE, "__builtins__", "__file__", "__name__"})


@dataclass
class ConfigRun:
    """One execution of a config and its bases; records what the files bind and read."""

    overrides: Mapping[str, Any]
    files: list[Path] = field(default_factory=list)
    bound_names: set[str] = field(default_factory=set)
    """Every top-level name a file of the run binds (settings and helpers alike)."""
    read_names: set[str] = field(default_factory=set)
    """Every name a file of the run reads: a name read somewhere is a helper, not a typo."""
    _stack: list[Path] = field(default_factory=list)

    def execute(self, source: Path) -> dict[str, Any]:
        """The file's top-level namespace after it ran (code objects included)."""
        resolved = source.resolve()
        if resolved in self._stack:
            chain = " -> ".join(p.name for p in [*self._stack, resolved])
            raise ConfigError(f"{source}: base files import each other in a cycle ({chain})")
        tree = _parse(source)
        self.files.append(source)
        self.read_names.update(_read_names(tree))
        tree.body = _Instrument(set(self.overrides)).block(tree.body)
        ast.fix_missing_locations(tree)
        namespace: dict[str, Any] = {"__file__": str(resolved), "__name__": "__evotune_config__"}
        namespace[_REBIND] = lambda *names: self._rebind(namespace, names)
        namespace[_IMPORT_BASE] = lambda module, level, names, line: self._import_base(
            source, namespace, module, level, names, line
        )
        self._stack.append(resolved)
        try:
            exec(compile(tree, str(source), "exec"), namespace)
        except ConfigError:
            raise
        except Exception as error:
            where = _innermost_config_line(error, self.files) or f"{source}"
            raise ConfigError(
                f"{where}: the config raised {type(error).__name__}: {error}"
            ) from error
        finally:
            self._stack.pop()
        for name in _INJECTED:
            namespace.pop(name, None)
        self.bound_names.update(namespace)
        return namespace

    def _rebind(self, namespace: dict[str, Any], names: tuple[str, ...]) -> None:
        for name in names:
            if name in namespace:  # a '*' import or an empty loop may leave it unbound
                namespace[name] = copy.deepcopy(self.overrides[name])

    def _import_base(
        self,
        source: Path,
        namespace: dict[str, Any],
        module: str | None,
        level: int,
        names: list[tuple[str, str | None]],
        line: int,
    ) -> None:
        if module is None:
            raise ConfigError(
                f"{source}:{line}: 'from {'.' * level} import ...' imports no file; write "
                f"'from {'.' * level}base import *' to use ./base.py as a base config"
            )
        folder = source.parent
        for _ in range(level - 1):
            folder = folder.parent
        base = folder.joinpath(*module.split(".")).with_suffix(".py")
        if not base.is_file():
            raise ConfigError(
                f"{source}:{line}: base config {base} not found; 'from {'.' * level}{module} "
                "import ...' reads a file relative to this config"
            )
        base_namespace = self.execute(base)
        for name, alias in names:
            if name == "*":
                namespace.update({k: v for k, v in base_namespace.items() if not k.startswith("_")})
            elif name in base_namespace:
                namespace[alias or name] = base_namespace[name]
            else:
                raise ConfigError(f"{source}:{line}: base config {base} defines no {name!r}")


def _parse(source: Path) -> ast.Module:
    try:
        return ast.parse(source.read_text(), filename=str(source))
    except SyntaxError as error:
        raise ConfigError(f"{source}:{error.lineno}: syntax error: {error.msg}") from None


def _read_names(tree: ast.Module) -> set[str]:
    return {n.id for n in ast.walk(tree) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Load)}


def _innermost_config_line(error: BaseException, files: list[Path]) -> str:
    paths = {str(p) for p in files}
    where = ""
    frame = error.__traceback__
    while frame is not None:
        filename = frame.tb_frame.f_code.co_filename
        if filename in paths:
            where = f"{filename}:{frame.tb_lineno}"
        frame = frame.tb_next
    return where


class _Instrument:
    """Rewrites a module body: overrides re-bound after each binding, base imports run."""

    _SCOPES = (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)

    def __init__(self, overridden: set[str]):
        self.overridden = overridden

    def block(self, body: list[ast.stmt]) -> list[ast.stmt]:
        out: list[ast.stmt] = []
        for statement in body:
            bound = self._bound_here(statement)
            if isinstance(statement, ast.ImportFrom) and statement.level > 0:
                statement = self._base_import(statement)
            elif not isinstance(statement, self._SCOPES):
                self._nested(statement)
            out.append(statement)
            if bound:
                out.append(self._rebind(bound, statement))
        return out

    def _nested(self, statement: ast.stmt) -> None:
        for name in ("body", "orelse", "finalbody"):
            inner = getattr(statement, name, None)
            if isinstance(inner, list) and inner:
                setattr(statement, name, self.block(inner))
        for handler in getattr(statement, "handlers", []):
            handler.body = self.block(handler.body)
        for case in getattr(statement, "cases", []):
            case.body = self.block(case.body)
        # a loop or with target is bound before its body runs
        target_names: set[str] = set()
        if isinstance(statement, ast.For | ast.AsyncFor):
            target_names = set(_target_names(statement.target))
        elif isinstance(statement, ast.With | ast.AsyncWith):
            for item in statement.items:
                if item.optional_vars is not None:
                    target_names.update(_target_names(item.optional_vars))
        hit = sorted(target_names & self.overridden)
        if hit:
            statement.body.insert(0, self._rebind(hit, statement))  # type: ignore[attr-defined]

    def _bound_here(self, statement: ast.stmt) -> list[str]:
        """Overridden names this statement (not its nested blocks) leaves bound."""
        names: set[str] = set()
        if isinstance(statement, ast.Assign):
            for target in statement.targets:
                names.update(_target_names(target))
        elif isinstance(statement, ast.AugAssign | ast.AnnAssign):
            if not isinstance(statement, ast.AnnAssign) or statement.value is not None:
                names.update(_target_names(statement.target))
        elif isinstance(statement, ast.For | ast.AsyncFor):
            names.update(_target_names(statement.target))
        elif isinstance(statement, ast.Import):
            names.update((a.asname or a.name).split(".")[0] for a in statement.names)
        elif isinstance(statement, ast.ImportFrom):
            for alias in statement.names:
                # '*' may bind any name
                names.update(self.overridden if alias.name == "*" else {alias.asname or alias.name})
        elif isinstance(statement, self._SCOPES):
            names.add(statement.name)
        if not isinstance(statement, self._SCOPES):
            names.update(_walrus_names(statement))
        return sorted(names & self.overridden)

    @staticmethod
    def _rebind(names: list[str], at: ast.stmt) -> ast.stmt:
        call = ast.Call(
            func=ast.Name(id=_REBIND, ctx=ast.Load()),
            args=[ast.Constant(value=name) for name in names],
            keywords=[],
        )
        return ast.copy_location(ast.Expr(value=call), at)

    @staticmethod
    def _base_import(statement: ast.ImportFrom) -> ast.stmt:
        names = ast.List(
            elts=[
                ast.Tuple(elts=[ast.Constant(a.name), ast.Constant(a.asname)], ctx=ast.Load())
                for a in statement.names
            ],
            ctx=ast.Load(),
        )
        call = ast.Call(
            func=ast.Name(id=_IMPORT_BASE, ctx=ast.Load()),
            args=[
                ast.Constant(statement.module),
                ast.Constant(statement.level),
                names,
                ast.Constant(statement.lineno),
            ],
            keywords=[],
        )
        return ast.copy_location(ast.Expr(value=call), statement)


def _target_names(target: ast.expr) -> Iterator[str]:
    if isinstance(target, ast.Name):
        yield target.id
    elif isinstance(target, ast.Tuple | ast.List):
        for element in target.elts:
            yield from _target_names(element)
    elif isinstance(target, ast.Starred):
        yield from _target_names(target.value)


def _walrus_names(statement: ast.stmt) -> Iterator[str]:
    for node in ast.walk(statement):
        if isinstance(node, ast.NamedExpr):
            yield node.target.id
