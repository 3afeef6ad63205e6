"""Every config the project ships, and the README's example, loads and validates."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from evotune.config import load_config, render_config

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = sorted((ROOT / "configs").glob("*.py"))


def readme_example() -> str:
    """The ```python block under '## Config files' in the README."""
    text = (ROOT / "README.md").read_text()
    section = text.split("\n## Config files\n", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", section, flags=re.DOTALL)
    assert len(blocks) == 1, "expected one python block under '## Config files'"
    return blocks[0]


def test_configs_are_shipped():
    assert SHIPPED, "configs/ holds no config"


@pytest.mark.parametrize("path", SHIPPED, ids=[p.name for p in SHIPPED])
def test_shipped_config_loads(path, tmp_path):
    loaded = load_config(path)
    assert loaded.settings.pretrained_model_name_or_path
    resolved = tmp_path / "resolved.py"
    resolved.write_text(loaded.render())
    assert load_config(resolved).settings == loaded.settings


def test_readme_example_loads_and_takes_overrides(tmp_path):
    path = tmp_path / "readme_example.py"
    path.write_text(readme_example())
    settings = load_config(path).settings
    assert settings.max_length == 32768 and settings.accumulative_counts == 4
    assert settings.train_dataset["packed_length"] == settings.max_length
    assert (settings.lr, settings.betas, settings.max_norm) == (2e-5, (0.9, 0.95), 1.0)
    # the example sets lr by tuple unpacking: an override must still reach it
    overridden = load_config(path, ["lr=1e-3", "max_length=4096"]).settings
    assert overridden.lr == 1e-3 and overridden.betas == (0.9, 0.95)
    assert overridden.train_dataset["packed_length"] == 4096
    assert "lr = 0.001" in render_config(overridden)
