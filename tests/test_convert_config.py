"""InternEvo config -> evotune config, then the result loads and trains."""

from __future__ import annotations

import subprocess
import sys

import pytest
from tiny import save_tiny_llama, write_corpus

from evotune.config import load_config
from evotune.convert.internevo_config import convert_internevo_config
from evotune.convert.internlm2 import ConversionError
from evotune.train.trainer import Trainer

# Modelled on InternEvo's configs/7B_sft.py (keys in docs/migration-internevo.md).
INTERNEVO_7B_SFT = """
JOB_NAME = "7b_train"
DO_ALERT = False
SEQ_LEN = 64
HIDDEN_SIZE = 64
NUM_ATTENTION_HEAD = 4
MLP_RATIO = 2
NUM_LAYER = 2
VOCAB_SIZE = 128
MODEL_ONLY_FOLDER = "local:llm_ckpts/xxxx"
SAVE_CKPT_FOLDER = "local:llm_ckpts"
LOAD_CKPT_FOLDER = "local:llm_ckpts/49"
CHECKPOINT_EVERY = 50
ckpt = dict(
    enable_save_ckpt=False,
    save_ckpt_folder=SAVE_CKPT_FOLDER,
    load_ckpt_info=dict(path=MODEL_ONLY_FOLDER, content=("model",), ckpt_type="internevo"),
    auto_resume=True,
    checkpoint_every=CHECKPOINT_EVERY,
    async_upload=True,
)
TRAIN_FOLDER = {train_folder!r}
data = dict(
    seq_len=SEQ_LEN,
    micro_num=2,
    micro_bsz=2,
    valid_micro_num=4,
    valid_every=50,
    pack_sample_into_one=False,
    total_steps=3,
    skip_batches="",
    rampup_batch_size="",
    min_length=5,
    train_folder=TRAIN_FOLDER,
    valid_folder=None,
    empty_cache_and_diag_interval=200,
    diag_outlier_ratio=1.1,
)
grad_scaler = dict(fp16=dict(initial_scale=2**16, min_scale=1, growth_interval=1000),
                   growth_factor=2, backoff_factor=0.5, max_scale=2**24, hysteresis=2)
hybrid_zero_optimizer = dict(overlap_sync_grad=True, overlap_sync_param=False,
                             reduce_bucket_size=512 * 1024 * 1024, clip_grad_norm=1.0)
loss = dict(label_smoothing=0)
adam = dict(lr=1e-4, adam_beta1=0.9, adam_beta2=0.95, adam_beta2_c=0, adam_eps=1e-8,
            weight_decay=0.01)
lr_scheduler = dict(total_steps=data["total_steps"], init_steps=0, warmup_ratio=0.01,
                    eta_min=1e-5, last_epoch=-1)
beta2_scheduler = dict(init_beta2=adam["adam_beta2"], c=adam["adam_beta2_c"], cur_iter=-1)
model = dict(checkpoint=False, num_attention_heads=NUM_ATTENTION_HEAD, embed_split_hidden=True,
             vocab_size=VOCAB_SIZE, embed_grad_scale=1, parallel_output=True,
             hidden_size=HIDDEN_SIZE, num_layers=NUM_LAYER, mlp_ratio=MLP_RATIO,
             apply_post_layer_norm=False, dtype="torch.bfloat16", norm_type="rmsnorm",
             layer_norm_epsilon=1e-5, use_flash_attn=True, num_chunks=1)
parallel = dict(zero1=dict(size=8), tensor=dict(size={tp}, mode="mtp"), pipeline=dict(size=1),
                weight=dict(size=1))
cudnn_deterministic = False
cudnn_benchmark = False
"""


@pytest.fixture
def assets(tmp_path):
    model = save_tiny_llama(tmp_path / "model")
    data = write_corpus(tmp_path / "data", shards=2, samples=60)
    return model, data


def _write(tmp_path, data, tp=1, extra=""):
    path = tmp_path / "7B_sft.py"
    path.write_text(INTERNEVO_7B_SFT.format(train_folder=str(data), tp=tp) + extra)
    return path


@pytest.mark.integration
def test_converted_config_loads_and_trains(tmp_path, assets):
    model, data = assets
    source = _write(tmp_path, data)
    report = convert_internevo_config(source, tmp_path / "run.py", world_size=1, model=str(model))
    assert "data.micro_num" in report and "accumulative_counts" in report
    assert "grad_scaler" in report and "no effect in bf16" in report
    loaded = load_config(tmp_path / "run.py", ["dtype=float32", "deepspeed=None"])
    s = loaded.settings
    assert (s.max_length, s.accumulative_counts, s.total_steps) == (128, 2, 3)
    assert s.train_dataset["max_length_per_sample"] == 64
    assert s.train_dataset["dataset_cfg"]["min_length"] == 5
    assert (s.warmup_ratio, s.eta_min, s.max_norm, s.weight_decay_scope) == (0.01, 1e-5, 1.0, "all")
    assert s.loss_reduction == "pack" and s.lr_schedule == "internevo"
    result = Trainer(loaded, tmp_path / "work", show_progress=False).train()
    assert len(result.losses) == 3


def test_sequence_parallel_keeps_internevo_dp(tmp_path, assets):
    model, data = assets
    source = _write(tmp_path, data, tp=2)
    report = convert_internevo_config(source, tmp_path / "run.py", world_size=8, model=str(model))
    assert load_config(tmp_path / "run.py").settings.sequence_parallel_size == 2
    assert "dp = 4" in report
    source = _write(tmp_path, data, tp=8)  # 8 does not divide the 4 heads
    report = convert_internevo_config(source, tmp_path / "run8.py", world_size=8, model=str(model))
    assert load_config(tmp_path / "run8.py").settings.sequence_parallel_size == 1
    assert "does not divide" in report


def test_math_changing_keys_need_allow_approximate(tmp_path, assets):
    model, data = assets
    source = _write(
        tmp_path,
        data,
        extra='\ndata["skip_batches"] = "100-200"\nbeta2_scheduler = dict(init_beta2=0.95)\n',
    )
    with pytest.raises(ConversionError, match=r"skip_batches.*beta2"):
        convert_internevo_config(source, tmp_path / "run.py", world_size=1, model=str(model))
    assert not (tmp_path / "run.py").exists()
    convert_internevo_config(
        source, tmp_path / "run.py", world_size=1, model=str(model), allow_approximate=True
    )
    assert "NOT REPRODUCED" not in (tmp_path / "run.py").read_text()
    assert "skip_batches" in (tmp_path / "run.py").read_text()


@pytest.mark.integration
def test_unresolvable_base_import_then_internevo_root(tmp_path, assets):
    model, data = assets
    text = "from configs._base_.default_runtime import *\nmicro = MICRO_NUM\n"
    source = _write(tmp_path, data, extra="\n" + text)
    cli = [
        sys.executable,
        "-m",
        "evotune.cli",
        "convert",
        "internevo-config",
        str(source),
        "-o",
        str(tmp_path / "run.py"),
        "--world-size",
        "1",
        "--model",
        str(model),
    ]
    result = subprocess.run(cli, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "could not read: 7B_sft.py" in result.stdout and "ModuleNotFoundError" in result.stdout
    root = tmp_path / "internevo"
    (root / "configs" / "_base_").mkdir(parents=True)
    for folder in (root / "configs", root / "configs" / "_base_"):
        (folder / "__init__.py").write_text("")
    (root / "configs" / "_base_" / "default_runtime.py").write_text("MICRO_NUM = 2\n")
    result = subprocess.run(
        [
            *cli[:-4],
            "-o",
            str(tmp_path / "run2.py"),
            "--world-size",
            "1",
            "--model",
            str(model),
            "--internevo-root",
            str(root),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert "could not read" not in result.stdout
    assert "micro" in result.stdout  # the imported value reached the config and is reported
