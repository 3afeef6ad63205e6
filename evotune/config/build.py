"""Build ``dict(type=f, **kwargs)`` components, nested specs first.

Only the trainer builds (datasets, samplers); the checks in ``validate.py`` read
signatures and never import this module.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from ..errors import ConfigError
from .schema import PROVIDED_ARGUMENTS, ProvidedArgument
from .validate import accepted_names, qualified_name

_UNLISTED = ProvidedArgument(neutral=(None,))


def build_component(spec: Any, **provided: Any) -> Any:
    """Build ``dict(type=f, **kwargs)`` as ``f(**kwargs, **provided)``; nested specs first.

    ``provided`` are the arguments evotune owns (the dataset, ranks, dataset_weights).
    They fill the arguments the config left out or set to None. A target that does
    not take one gets it dropped only while its value changes nothing
    (``PROVIDED_ARGUMENTS``); otherwise building stops with a ConfigError, so that a
    setting is never lost without a word.
    """
    if not isinstance(spec, dict) or "type" not in spec:
        return spec
    target: Callable[..., Any] = spec["type"]
    kwargs = {k: build_component(v) for k, v in spec.items() if k != "type"}
    accepted = accepted_names(target)
    for name, value in provided.items():
        if kwargs.get(name) is not None:
            continue  # the config set it
        if accepted is None or name in accepted:
            kwargs[name] = value
        else:
            check_droppable(target, name, value)
    return target(**kwargs)


def check_droppable(target: Any, name: str, value: Any) -> None:
    """Raise unless a target that lacks argument ``name`` may run without ``value``."""
    rule = PROVIDED_ARGUMENTS.get(name, _UNLISTED)
    if rule.neutral is None or any(_same(value, n) for n in rule.neutral):
        return
    raise ConfigError(
        f"{qualified_name(target)} takes no argument {name!r} (evotune passes {name}="
        f"{value!r}): {rule.consequence}; {rule.fix}"
    )


def _same(value: Any, neutral: Any) -> bool:
    if neutral is None:
        return value is None
    return type(value) is type(neutral) and value == neutral
