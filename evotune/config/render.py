"""TrainConfig -> a Python config file that loads back to the same settings.

The trainer saves this rendering in the work dir: the config that ran, with every
default spelled out and the components' targets imported by name.
"""

from __future__ import annotations

import dataclasses
import pprint
from typing import Any

from .schema import TrainConfig


def render_config(settings: TrainConfig, header: str = "") -> str:
    """Every setting as ``name = value``, with the imports its components need."""
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
        if value and all(isinstance(key, str) and key.isidentifier() for key in value):
            pad = " " * (indent + 4)
            items = [
                f"{pad}{key}={_render_value(item, imports, indent + 4)},"
                for key, item in value.items()
            ]
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
