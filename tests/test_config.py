"""Config loading: settings, components, overrides, errors."""

from __future__ import annotations

import pytest

from evotune.config import ConfigError, build_component, load_config
from evotune.data import PackedDataset

CONFIG = """
from evotune.data import build_packed_dataset, load_intern_repo_tokenized_dataset

pretrained_model_name_or_path = '/models/tiny'
dataset_folder = {folder!r}
max_length = 64
lr = 1e-4
betas = (0.9, 0.95)
train_dataset = dict(
    type=build_packed_dataset,
    dataset_cfg=dict(type=load_intern_repo_tokenized_dataset, folder=dataset_folder, min_length=0),
    packed_length=max_length,
    seed=1024,
)
"""


@pytest.fixture
def config_file(tmp_path):
    from ftdp_factory import write_shard

    write_shard(tmp_path / "data" / "en" / "a.bin", [[1, 2, 3, 4, 5]] * 40)
    path = tmp_path / "cfg.py"
    path.write_text(CONFIG.format(folder=str(tmp_path / "data")))
    return path


def test_settings_and_defaults(config_file):
    settings = load_config(config_file).settings
    assert settings.max_length == 64 and settings.lr == 1e-4
    assert settings.betas == (0.9, 0.95)
    assert settings.loss_reduction == "pack" and settings.lr_schedule == "internevo"


def test_top_level_override_reaches_components(config_file):
    settings = load_config(config_file, ["max_length=32", "lr=3e-4"]).settings
    assert settings.max_length == 32 and settings.lr == 3e-4
    assert settings.train_dataset["packed_length"] == 32
    dataset = build_component(settings.train_dataset)
    assert isinstance(dataset, PackedDataset) and dataset.packed_length == 32


def test_dotted_override(config_file):
    settings = load_config(
        config_file, ["train_dataset.seed=7", "train_dataset.dataset_cfg.min_length=3"]
    ).settings
    assert settings.train_dataset["seed"] == 7
    assert settings.train_dataset["dataset_cfg"]["min_length"] == 3


def test_unknown_setting_suggests_nearest(config_file):
    config_file.write_text(config_file.read_text() + "\nmax_lenght = 3\n")
    with pytest.raises(
        ConfigError, match=r"unknown setting 'max_lenght' \(did you mean 'max_length'\?\)"
    ):
        load_config(config_file)


def test_unknown_override_key(config_file):
    with pytest.raises(
        ConfigError, match=r"accumulative_count.*did you mean 'accumulative_counts'"
    ):
        load_config(config_file, ["accumulative_count=2"])


def test_wrong_type_names_key(config_file):
    with pytest.raises(ConfigError, match=r"'max_length' = 'long' should be a int"):
        load_config(config_file, ["max_length=long"])
    with pytest.raises(
        ConfigError, match=r"'dtype' = 'fp16' should be one of 'float32', 'bfloat16'"
    ):
        load_config(config_file, ["dtype=fp16"])


def test_bad_component_argument(config_file):
    config_file.write_text(config_file.read_text().replace("seed=1024", "sed=1024"))
    with pytest.raises(
        ConfigError,
        match=r"train_dataset.sed: build_packed_dataset has no argument 'sed' \(did you mean 'seed'\?\)",
    ):
        load_config(config_file)


def test_config_exception_names_line(tmp_path):
    path = tmp_path / "broken.py"
    path.write_text("pretrained_model_name_or_path = 'x'\nmax_length = 1 / 0\n")
    with pytest.raises(ConfigError, match=r"broken.py:2: the config raised ZeroDivisionError"):
        load_config(path)


def test_impossible_values(config_file):
    with pytest.raises(ConfigError, match="batch_size: must be >= 1"):
        load_config(config_file, ["batch_size=0"])
    with pytest.raises(ConfigError, match="pack_to_max_length"):
        load_config(config_file, ["pack_to_max_length=False"])


def test_render_round_trips(config_file, tmp_path):
    loaded = load_config(config_file, ["max_length=32"])
    saved = tmp_path / "resolved.py"
    saved.write_text(loaded.render())
    again = load_config(saved).settings
    assert again == loaded.settings
