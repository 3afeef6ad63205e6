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


# -- overrides reach every way a file binds a name --------------------------------

HEADER = "pretrained_model_name_or_path = '/models/tiny'\ndataset_folder = '/data'\n"


def write(path, text):
    path.write_text(HEADER + text)
    return path


def test_override_reaches_tuple_unpacking(tmp_path):
    path = write(
        tmp_path / "cfg.py",
        "lr, betas, weight_decay, max_norm = 2e-5, (0.9, 0.95), 0.01, 1.0\n"
        "train_dataset = dict(type=dict, peak=lr)\n",
    )
    settings = load_config(path, ["lr=1e-3"]).settings
    assert settings.lr == 1e-3 and settings.train_dataset["peak"] == 1e-3
    assert settings.betas == (0.9, 0.95) and settings.weight_decay == 0.01
    assert load_config(path).settings.lr == 2e-5


def test_override_wins_over_augmented_assignment(tmp_path):
    path = write(
        tmp_path / "cfg.py",
        "sequence_parallel_size = 2\n"
        "accumulative_counts = 3\n"
        "accumulative_counts *= sequence_parallel_size\n"
        "train_dataset = dict(type=dict, micro_num=accumulative_counts)\n",
    )
    assert load_config(path).settings.accumulative_counts == 6
    settings = load_config(path, ["accumulative_counts=4"]).settings
    assert settings.accumulative_counts == 4 and settings.train_dataset["micro_num"] == 4


def test_override_reaches_names_bound_in_blocks(tmp_path):
    path = write(
        tmp_path / "cfg.py",
        "if True:\n"
        "    max_length = 64\n"
        "    train_dataset = dict(type=dict, packed_length=max_length)\n"
        "for max_norm in (0.5, 2.0):\n"
        "    pass\n",
    )
    settings = load_config(path, ["max_length=32", "max_norm=0.25"]).settings
    assert settings.max_length == 32 and settings.train_dataset["packed_length"] == 32
    assert settings.max_norm == 0.25
    assert load_config(path).settings.max_norm == 2.0


def test_override_of_a_helper_variable(tmp_path):
    path = write(
        tmp_path / "cfg.py",
        "_min_length = 50\nmin_length = 7\n"
        "train_dataset = dict(type=dict, min_length=_min_length, other=min_length)\n",
    )
    settings = load_config(path, ["_min_length=0", "min_length=3"]).settings
    assert settings.train_dataset == {"type": dict, "min_length": 0, "other": 3}


def test_override_of_an_undefined_name_is_refused(tmp_path):
    path = write(tmp_path / "cfg.py", "_min_length = 50\ntrain_dataset = dict(type=dict)\n")
    with pytest.raises(
        ConfigError,
        match=r"'_min_lenght' is neither a setting nor a name .*"
        r"did you mean '_min_length'",
    ):
        load_config(path, ["_min_lenght=0"])
    with pytest.raises(ConfigError, match=r"unknown setting '_min_length'.*dotted keys"):
        load_config(path, ["_min_length.x=0"])


# -- base configs -------------------------------------------------------------------

BASE = """
pretrained_model_name_or_path = '/models/tiny'
dataset_folder = '/data'
max_length = 64
_min_length = 50
train_dataset = dict(type=dict, packed_length=max_length, min_length=_min_length)
"""


def test_base_config_star_import_and_overrides(tmp_path):
    (tmp_path / "common").mkdir()
    (tmp_path / "common" / "base.py").write_text(BASE)
    (tmp_path / "runs").mkdir()
    child = tmp_path / "runs" / "child.py"
    child.write_text(
        "from ..common.base import *\n"
        "lr = 1e-4\n"
        "train_dataloader = dict(sampler=dict(type=dict, window=max_length * 2))\n"
    )
    settings = load_config(child).settings
    assert settings.max_length == 64 and settings.lr == 1e-4
    assert settings.train_dataset["packed_length"] == 64
    assert settings.train_dataset["min_length"] == 50
    with pytest.raises(ConfigError, match=r"--cfg-options min_lenght: 'min_lenght' is neither"):
        load_config(child, ["min_lenght=0"])
    settings = load_config(child, ["max_length=32", "_min_length=0"]).settings
    assert settings.max_length == 32
    assert settings.train_dataset["packed_length"] == 32  # used inside the base
    assert settings.train_dataset["min_length"] == 0  # a private helper of the base
    assert settings.train_dataloader["sampler"]["window"] == 64  # used by the child


def test_base_config_named_import_and_errors(tmp_path):
    (tmp_path / "base.py").write_text(BASE)
    child = tmp_path / "child.py"
    child.write_text(
        "from .base import max_length as base_length, pretrained_model_name_or_path\n"
        "dataset_folder = '/data'\n"
        "max_length = base_length // 2\n"
    )
    assert load_config(child).settings.max_length == 32
    child.write_text("from .missing import *\n")
    with pytest.raises(ConfigError, match=r"child.py:1: base config .*missing.py not found"):
        load_config(child)
    child.write_text("from .base import lr\n")
    with pytest.raises(ConfigError, match=r"child.py:1: base config .*base.py defines no 'lr'"):
        load_config(child)
    (tmp_path / "base.py").write_text("from .child import *\n")
    child.write_text("from .base import *\n")
    with pytest.raises(ConfigError, match=r"cycle \(child.py -> base.py -> child.py\)"):
        load_config(child)


def test_error_in_base_names_base_line(tmp_path):
    (tmp_path / "base.py").write_text("x = 1\nmax_length = 1 / 0\n")
    (tmp_path / "child.py").write_text("from .base import *\n")
    with pytest.raises(ConfigError, match=r"base.py:2: the config raised ZeroDivisionError"):
        load_config(tmp_path / "child.py")


# -- helper variables and XTuner sections --------------------------------------------


def test_helpers_read_by_the_file_are_not_settings(tmp_path):
    path = write(
        tmp_path / "cfg.py",
        "min_length = 50\ndata_path = 'x.json'\ndataloader_num_workers = 0\n"
        "train_dataset = dict(type=dict, min_length=min_length)\n"
        "_notes = dict(path=data_path, workers=dataloader_num_workers)\n",
    )
    loaded = load_config(path)
    assert loaded.settings.train_dataset["min_length"] == 50
    rendered = loaded.render()
    assert "\nmin_length =" not in rendered and "\ndata_path" not in rendered


def test_all_unknown_names_reported_at_once(tmp_path):
    path = write(
        tmp_path / "cfg.py",
        "max_lenght = 3\ndataloader_num_workers = 0\nmin_length = 1\n"
        "train_dataset = dict(type=dict, min_length=min_length)\n",
    )
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    message = str(caught.value)
    assert "\n" not in message
    assert "unknown settings 'max_lenght' (did you mean 'max_length'?), " in message
    assert "'dataloader_num_workers'" in message and "'min_length'" not in message


def test_xtuner_sections_point_to_evotune_settings(tmp_path):
    path = write(
        tmp_path / "cfg.py",
        "from torch.optim import AdamW\n"
        "lr = 2e-4\n"
        "optim_type = AdamW\n"
        "optim_wrapper = dict(optimizer=dict(type=optim_type, lr=lr))\n"
        "param_scheduler = [dict(type=dict, eta_min=0.0)]\n"
        "typo_setting = 1\n",
    )
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    message = str(caught.value)
    assert "\n" not in message and "prefix" not in message.split(";")[0]
    assert "optim_wrapper (set lr, betas, eps, weight_decay" in message
    assert "param_scheduler (set lr_schedule, warmup_ratio, eta_min" in message
    assert "evotune convert xtuner-config" in message
    assert "unknown setting 'typo_setting'" in message


# -- provided arguments are never dropped while they carry something ----------------


def _order(dataset, shuffle=True):
    """A user sampler that knows nothing of ranks or weights."""
    return list(range(len(dataset)))


def test_sampler_without_weights_refuses_dataset_weights(config_file):
    from evotune.data import InternRepoSampler, SequenceParallelSampler

    dataset = build_component(load_config(config_file).settings.train_dataset)
    provided = dict(dataset=dataset, micro_num=2, dp_size=2, dp_rank=1)
    spec = dict(type=SequenceParallelSampler, seed=3)
    with pytest.raises(
        ConfigError,
        match=r"SequenceParallelSampler takes no argument 'dataset_weights'.*"
        r"the setting dataset_weights would be ignored",
    ):
        build_component(spec, **provided, dataset_weights={"en": 2.0})
    sampler = build_component(spec, **provided, dataset_weights=None)  # micro_num: a hint
    assert (sampler.dp_size, sampler.dp_rank, sampler.seed) == (2, 1, 3)
    weighted = build_component(
        dict(type=InternRepoSampler), **provided, dataset_weights={"en": 2.0}
    )
    assert weighted.dataset_weights == {"en": 2.0} and weighted.micro_num == 2


def test_sampler_without_ranks_only_when_single_rank(config_file):
    dataset = build_component(load_config(config_file).settings.train_dataset)
    spec = dict(type=_order)
    assert build_component(spec, dataset=dataset, dp_size=1, dp_rank=0) == list(range(len(dataset)))
    with pytest.raises(ConfigError, match=r"_order takes no argument 'dp_size'.*same packs"):
        build_component(spec, dataset=dataset, dp_size=2, dp_rank=0)
    with pytest.raises(ConfigError, match=r"_order takes no argument 'seed'"):
        build_component(spec, dataset=dataset, seed=5)


def test_dataset_weights_with_sequence_parallel_sampler_refused_at_load(config_file):
    config_file.write_text(
        config_file.read_text()
        + "from evotune.data import SequenceParallelSampler\n"
        + "dataset_weights = {'en': 2.0}\n"
        + "train_dataloader = dict(sampler=dict(type=SequenceParallelSampler))\n"
    )
    with pytest.raises(
        ConfigError, match=r"dataset_weights: train_dataloader.sampler SequenceParallelSampler"
    ):
        load_config(config_file)
    assert load_config(config_file, ["dataset_weights=None"]).settings.dataset_weights is None


def test_dataloader_dataset_must_be_train_dataset(config_file):
    text = config_file.read_text()
    config_file.write_text(text + "train_dataloader = dict(dataset=train_dataset)\n")
    settings = load_config(config_file, ["train_dataset.seed=7"]).settings
    assert settings.train_dataloader["dataset"] == settings.train_dataset
    assert settings.train_dataset["seed"] == 7
    config_file.write_text(
        text + "train_dataloader = dict(dataset=dict(train_dataset, packed_length=8))\n"
    )
    with pytest.raises(
        ConfigError,
        match=r"train_dataloader.dataset: evotune builds the dataset from train_dataset",
    ):
        load_config(config_file)


# -- DeepSpeed JSON: a key is used or refused ----------------------------------------


def _deepspeed(tmp_path, **entries):
    import json

    from evotune.config import TrainConfig
    from evotune.parallel.deepspeed_engine import load_deepspeed_config
    from evotune.parallel.dims import ParallelDims

    path = tmp_path / "ds.json"
    path.write_text(json.dumps({"zero_optimization": {"stage": 2}, **entries}))
    settings = TrainConfig(pretrained_model_name_or_path="m", accumulative_counts=3)
    return load_deepspeed_config(str(path), settings, ParallelDims(world_size=4, sp_size=2))


def test_deepspeed_train_batch_size_must_match(tmp_path):
    for accepted in ("auto", 6):  # 2 data-parallel ranks x 3 micro-batches x 1 row
        config = _deepspeed(tmp_path, train_batch_size=accepted)
        assert "train_batch_size" not in config and config["gradient_accumulation_steps"] == 3
    with pytest.raises(
        ConfigError, match=r"train_batch_size=12 contradicts the run \(2 data-parallel ranks"
    ):
        _deepspeed(tmp_path, train_batch_size=12)
    with pytest.raises(ConfigError, match=r"train_micro_batch_size_per_gpu=4 contradicts"):
        _deepspeed(tmp_path, train_micro_batch_size_per_gpu=4)


def test_deepspeed_optimizer_and_scheduler_sections_refused(tmp_path):
    sections = dict(
        optimizer={"type": "AdamW", "params": {"lr": 1e-3}},
        scheduler={"type": "WarmupLR"},
    )
    with pytest.raises(ConfigError) as caught:
        _deepspeed(tmp_path, **sections)
    message = str(caught.value)
    assert "section(s) optimizer, scheduler would not be used" in message
    assert "lr, betas, eps, weight_decay" in message and "lr_schedule, warmup_ratio" in message
    assert "\n" not in message


# -- the settings reference -----------------------------------------------------------


def test_every_setting_has_a_docstring():
    from evotune.config import SETTING_NAMES, setting_docs

    docs = setting_docs()
    assert list(docs) == list(SETTING_NAMES)
    assert all(len(text) > 10 for text in docs.values())
    assert "micro_num" in docs["accumulative_counts"]
    assert "seq_len" in docs["max_length"] and "max_length_per_sample" in docs["max_length"]


def test_readme_settings_reference_in_sync():
    from pathlib import Path

    from evotune.config.reference import replace_block, settings_reference

    readme = Path(__file__).resolve().parents[1] / "README.md"
    text = readme.read_text()
    assert replace_block(text, settings_reference()) == text, (
        "README settings reference is stale: run python -m evotune.config.reference"
    )


def test_settings_reference_check_detects_a_stale_block(tmp_path):
    from evotune.config import XTUNER_SECTIONS
    from evotune.config.reference import END, INTRO, START, main, settings_reference

    readme = tmp_path / "README.md"
    readme.write_text(f"# x\n\n{START}\n| `lr` | old |\n{END}\n\n## Development\n")
    assert main([str(readme), "--check"]) == 1
    assert main([str(readme)]) == 0 and main([str(readme), "--check"]) == 0
    text = readme.read_text()
    assert settings_reference() in text and text.endswith(f"{END}\n\n## Development\n")
    for name in ("optim_wrapper", "param_scheduler", "model", "train_cfg", "default_hooks"):
        assert f"`{name}`" in INTRO and name in XTUNER_SECTIONS


@pytest.mark.integration
def test_cli_refuses_a_dropped_setting_with_exit_2_and_one_line(tmp_path):
    from runner import run_train

    path = write(
        tmp_path / "cfg.py",
        "optim_wrapper = dict(optimizer=dict(lr=1e-3))\ndataloader_num_workers = 0\n",
    )
    result = run_train(path, tmp_path / "work", timeout=120)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "optim_wrapper (set lr" in lines[0]
    assert "'dataloader_num_workers' (did you mean 'num_workers'?)" in lines[0]
