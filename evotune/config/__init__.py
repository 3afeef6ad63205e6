"""XTuner-style Python config files -> one typed, validated TrainConfig.

The package has one room per concern, and imports run one way:

* ``schema``    TrainConfig (every setting, documented under its field) and the choices
* ``validate``  types, ranges and consistency; component arguments by signature
* ``load``      execute a config file, apply ``--cfg-options``, validate
* ``build``     build ``dict(type=...)`` components (the trainer's side)
* ``render``    write a TrainConfig back as a loadable Python file
* ``reference`` the Markdown settings reference in the README, from the docstrings
"""

from __future__ import annotations

from ..errors import ConfigError
from .build import build_component
from .load import LoadedConfig, load_config
from .render import render_config
from .schema import (
    ATTN_IMPLEMENTATIONS,
    COMPONENT_NAMES,
    DATALOADER_KEYS,
    DTYPES,
    LOSS_REDUCTIONS,
    LR_SCHEDULES,
    SETTING_NAMES,
    WEIGHT_DECAY_SCOPES,
    XTUNER_SECTIONS,
    AttnImplementation,
    DType,
    LossReduction,
    LRSchedule,
    TrainConfig,
    WeightDecayScope,
    choices,
    setting_docs,
)

__all__ = [
    "ATTN_IMPLEMENTATIONS",
    "COMPONENT_NAMES",
    "DATALOADER_KEYS",
    "DTYPES",
    "LOSS_REDUCTIONS",
    "LR_SCHEDULES",
    "SETTING_NAMES",
    "WEIGHT_DECAY_SCOPES",
    "XTUNER_SECTIONS",
    "AttnImplementation",
    "ConfigError",
    "DType",
    "LRSchedule",
    "LoadedConfig",
    "LossReduction",
    "TrainConfig",
    "WeightDecayScope",
    "build_component",
    "choices",
    "load_config",
    "render_config",
    "setting_docs",
]
