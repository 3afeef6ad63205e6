"""Build ``dict(type=f, **kwargs)`` components, nested specs first.

Only the trainer builds (datasets, samplers); the checks in ``validate.py`` read
signatures and never import this module.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any


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
