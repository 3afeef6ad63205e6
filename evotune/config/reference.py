"""The README's settings reference, generated from TrainConfig's attribute docstrings.

    python -m evotune.config.reference            rewrite the block in README.md
    python -m evotune.config.reference --check    exit 1 if the block is out of date

The block sits between ``<!-- settings-reference:start -->`` and
``<!-- settings-reference:end -->``; everything outside the markers is left alone.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import inspect
import re
import sys
import types
import typing
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

from .schema import TrainConfig, setting_docs

START = "<!-- settings-reference:start -->"
END = "<!-- settings-reference:end -->"
README = Path(__file__).resolve().parents[2] / "README.md"

INTRO = """\
Generated from the docstrings of `evotune.config.TrainConfig` by
`python -m evotune.config.reference`; a test fails when this block is out of date.

A config's top-level names are **settings** (below); **components**, the
`dict(type=f, ...)` values of `train_dataset` and `train_dataloader`, which evotune
builds with the arguments it owns (the dataset, ranks, `dataset_weights`) filled in;
**helper variables**, names some line of the config reads (`min_length` used inside
`train_dataset`) or that start with `_`; and imports. Any other name stops the run,
all of them named in one line. XTuner sections evotune does not read
(`optim_wrapper`, `param_scheduler`, `model`, `train_cfg`, `default_hooks`, ...) are
refused with the settings that replace them.

`--cfg-options name=value` sets any top-level name the file binds, however it binds it
(`a, b = ...`, `x *= 2`, inside `if`, from a base): the value is bound again after each
statement that binds the name, so every later line that reads it sees the override.
`--cfg-options train_dataset.seed=7` sets one key of a component.

A config may start from a base config with a relative import: `from .base import *`
runs `./base.py` (with the same `--cfg-options`) and binds its public names;
`from ..common.base import max_length` takes one name.
"""

_SECTION = re.compile(r"#\s*--\s*(\w[\w ]*?)\s*-+\s*$")


def settings_reference() -> str:
    """The Markdown block: the introduction and one table of settings per section."""
    docs = setting_docs()
    hints = typing.get_type_hints(TrainConfig)
    built = TrainConfig()  # default_factory fields too
    defaults = {f.name: getattr(built, f.name) for f in dataclasses.fields(TrainConfig)}
    lines = [INTRO.rstrip()]
    for section, names in _sections().items():
        lines += ["", f"**{section.capitalize()}**", ""]
        lines += ["| Setting | Type | Default | Meaning |", "| --- | --- | --- | --- |"]
        for name in names:
            default = "required" if name == "pretrained_model_name_or_path" else None
            cells = [
                f"`{name}`",
                _code(_type_text(hints[name])),
                default or _code(_value_text(defaults[name])),
                docs[name],
            ]
            lines.append("| " + " | ".join(cell.replace("|", "\\|") for cell in cells) + " |")
    return "\n".join(lines) + "\n"


def replace_block(text: str, block: str) -> str:
    """``text`` with the content between the markers replaced by ``block``."""
    start, end = text.find(START), text.find(END)
    if start < 0 or end < start:
        raise ValueError(f"no '{START}' ... '{END}' block to replace")
    return text[: start + len(START)] + "\n" + block + text[end:]


def _sections() -> dict[str, list[str]]:
    """Setting names grouped by the ``# -- section ---`` comments in TrainConfig."""
    source = inspect.getsource(TrainConfig)
    headings = [
        (number, match.group(1))
        for number, line in enumerate(source.splitlines(), start=1)
        if (match := _SECTION.match(line.strip()))
    ]
    body = ast.parse(source).body[0].body  # type: ignore[attr-defined]
    sections: dict[str, list[str]] = {}
    for statement in body:
        if isinstance(statement, ast.AnnAssign) and isinstance(statement.target, ast.Name):
            above = [title for number, title in headings if number < statement.lineno]
            sections.setdefault(above[-1] if above else "settings", []).append(statement.target.id)
    return sections


def _code(text: str) -> str:
    return f"`{text}`"


def _value_text(value: Any) -> str:
    if isinstance(value, str):
        return f'"{value}"'
    return repr(value)


def _type_text(hint: Any) -> str:
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin is Literal:
        return " | ".join(_value_text(a) for a in args)
    if origin in (typing.Union, types.UnionType):
        return " | ".join(_type_text(a) for a in args)
    if hint is type(None):
        return "None"
    if origin is tuple:
        return "(" + ", ".join(_type_text(a) for a in args) + ")"
    if origin is list:
        return f"list[{_type_text(args[0])}]"
    if origin is dict:
        return "dict" if args[1] is Any else f"dict[{_type_text(args[0])}, {_type_text(args[1])}]"
    return getattr(hint, "__name__", str(hint))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m evotune.config.reference")
    parser.add_argument("readme", nargs="?", type=Path, default=README)
    parser.add_argument("--check", action="store_true", help="exit 1 if the block is stale")
    args = parser.parse_args(argv)
    text = args.readme.read_text()
    updated = replace_block(text, settings_reference())
    if args.check:
        if updated != text:
            print(f"{args.readme}: settings reference out of date; run {parser.prog}")
            return 1
        return 0
    if updated != text:
        args.readme.write_text(updated)
        print(f"{args.readme}: settings reference updated")
    return 0


if __name__ == "__main__":
    sys.exit(main())
