"""XTuner v0.1 config -> evotune config: every PART-1 setting and the schedule kept.

The XTuner files are written here in XTuner's layout (PART 1..5, imports from
mmengine/xtuner/torch, ``accumulative_counts *= sequence_parallel_size``,
optim_wrapper, a param_scheduler list, train_cfg, custom/default hooks,
randomness) for the variants of XTuner v0.1.23's build_packed_dataset and
custom-dataset configs: InternLM, InternLM2, InternLM2.5 and Mistral over
tokenized, InternEvo, untokenized and JSON data. mmengine and xtuner are not
installed: the converter reads the files without running them.
"""

from __future__ import annotations

import dataclasses
import json
import shlex
from pathlib import Path

import pytest
from runner import losses, run_cli, run_train

from evotune.config import SETTING_NAMES
from evotune.convert.xtuner_config import convert_xtuner_config, read_xtuner_config
from evotune.errors import ConversionError

ROOT = Path(__file__).resolve().parent.parent
DEMO_MODEL = ROOT / "demo" / "model"
DEMO_DATA = ROOT / "demo" / "data"

# Settings the converted configs use that TrainConfig must know for them to load.
NEW_SETTINGS = (
    "warmup_start_factor",
    "lr_step_unit",
    "evaluation_inputs",
    "evaluation_freq",
    "prompt_template",
    "SYSTEM",
)
_MISSING = [name for name in NEW_SETTINGS if name not in SETTING_NAMES]
needs_new_settings = pytest.mark.skipif(
    bool(_MISSING), reason=f"TrainConfig lacks {_MISSING} (see the converter's report)"
)


@dataclasses.dataclass
class Variant:
    """One XTuner config family: what differs between XTuner's files."""

    name: str
    model: str = "internlm/internlm2-7b"
    data: str = "tokenized"  # tokenized | untokenized | json
    template: str = "internlm2_chat"
    max_length: int = 32768
    sequence_parallel: int | None = 1  # None: no sequence_parallel_size line
    accumulative_counts: int = 1
    num_workers: int = 4
    lr: float = 4e-5
    betas: tuple[float, float] = (0.9, 0.95)
    weight_decay: float = 0.01
    ratio_name: str = "warm_up_ratio"
    warmup_ratio: float = 0.025
    start_factor: str = "1 / 40"
    eta_min: str = "lr * 0.15"
    linear_type: str = "'LinearLR'"
    logger_interval: int = 1
    mistral_extras: bool = False  # torch_dtype=bfloat16, flash_attention_2
    new_tokenizer: bool = False  # model.tokenizer: XTuner grows the embeddings
    qlora: bool = False
    openai: bool = False  # dataset_map_fn=openai_map_fn
    max_epochs: int = 1
    approximate: bool = False  # needs --allow-approximate


VARIANTS = [
    Variant("internlm2_7b_w_tokenized_dataset"),
    Variant("internlm2_7b_w_internevo_dataset", sequence_parallel=None),
    Variant("internlm2_7b_w_untokenized_dataset", data="untokenized"),
    Variant(
        "internlm_7b_full_intern_repo_dataset_template",
        model="/path/to/your/base/model",
        template="internlm_chat",
        max_length=8192,
        sequence_parallel=None,
        accumulative_counts=4,
        logger_interval=10,
    ),
    Variant(
        "mistral_7b_w_tokenized_dataset",
        model="mistralai/Mistral-7B-v0.1",
        num_workers=0,
        mistral_extras=True,
        new_tokenizer=True,
        approximate=True,
    ),
    Variant(
        "mistral_7b_w_untokenized_dataset",
        model="mistralai/Mistral-7B-v0.1",
        data="untokenized",
        template="mistral",
        num_workers=0,
        mistral_extras=True,
    ),
    Variant("internlm2_7b_full_finetune_custom_dataset_e1", data="json"),
    Variant(
        "internlm2_7b_full_finetune_custom_dataset_e1_sequence_parallel_4",
        data="json",
        sequence_parallel=4,
    ),
    Variant(
        "internlm2_20b_full_finetune_custom_dataset_e1", model="internlm/internlm2-20b", data="json"
    ),
    Variant(
        "internlm2_5_chat_7b_full_finetune_custom_dataset_e1",
        model="internlm/internlm2_5-7b-chat",
        data="json",
    ),
    Variant(
        "internlm2_chat_7b_full_finetune_custom_dataset_e1",
        model="internlm/internlm2-chat-7b",
        data="json",
    ),
    Variant(
        "internlm2_chat_20b_full_finetune_custom_dataset_e1",
        model="internlm/internlm2-chat-20b",
        data="json",
    ),
    Variant(
        "mistral_7b_full_finetune_custom_dataset_e1",
        model="mistralai/Mistral-7B-v0.1",
        data="json",
        template="mistral",
        mistral_extras=True,
    ),
    Variant(
        "mistral_7b_full_finetune_custom_sft_e1",
        model="mistralai/Mistral-7B-v0.1",
        data="json",
        template="mistral",
        sequence_parallel=None,
        accumulative_counts=16,
        num_workers=0,
        lr=2e-4,
        betas=(0.9, 0.999),
        weight_decay=0,
        ratio_name="warmup_ratio",
        warmup_ratio=0.03,
        start_factor="1e-5",
        eta_min="0.0",
        linear_type="LinearLR",
        mistral_extras=True,
        qlora=True,
        openai=True,
        approximate=True,
    ),
]


def xtuner_config(v: Variant, dataset_path: str = "/path/to/sft/data/folder") -> str:
    """An XTuner v0.1 config of variant ``v``, in XTuner's five-part layout."""
    dataset_import = {
        "tokenized": "from xtuner.dataset.intern_repo import (build_packed_dataset,\n"
        "                                        load_intern_repo_tokenized_dataset)",
        "untokenized": "from xtuner.dataset.intern_repo import (build_packed_dataset,\n"
        "                                        load_intern_repo_untokenized_dataset)\n"
        "from xtuner.dataset.map_fns import template_map_fn_factory",
        "json": "from datasets import load_dataset\nfrom xtuner.dataset import process_hf_dataset\n"
        + (
            "from xtuner.dataset.map_fns import openai_map_fn, template_map_fn_factory"
            if v.openai
            else "from xtuner.dataset.map_fns import template_map_fn_factory"
        ),
    }[v.data]
    scheduler_import = (
        "from mmengine.optim import AmpOptimWrapper, CosineAnnealingLR, LinearLR"
        if v.linear_type == "LinearLR"
        else "from mmengine.optim import AmpOptimWrapper, CosineAnnealingLR"
    )
    data_setting = (
        f"data_files = [{dataset_path!r}]"
        if v.data == "json"
        else f"dataset_folder = {dataset_path!r}"
    )
    tokenizer_path = "tokenizer_path = '/new/tokenizer/path'\n" if v.new_tokenizer else ""
    sp_lines = (
        f"\n# parallel\nsequence_parallel_size = {v.sequence_parallel}\n"
        if v.sequence_parallel is not None
        else ""
    )
    sp_multiply = (
        "accumulative_counts *= sequence_parallel_size\n" if v.sequence_parallel is not None else ""
    )
    llm_extras = (
        ",\n        torch_dtype=torch.bfloat16,\n        attn_implementation='flash_attention_2'"
        if v.mistral_extras
        else ""
    )
    if v.qlora:
        llm_extras += (
            ",\n        quantization_config=dict(\n            type=BitsAndBytesConfig,\n"
            "            load_in_4bit=True,\n            bnb_4bit_compute_dtype=torch.float16,\n"
            "            bnb_4bit_quant_type='nf4')"
        )
    lora = (
        ",\n    lora=dict(type=LoraConfig, r=64, lora_alpha=16, lora_dropout=0.1,\n"
        "              bias='none', task_type='CAUSAL_LM')"
        if v.qlora
        else ""
    )
    model_tokenizer = "\n    tokenizer=tokenizer," if v.new_tokenizer else ""
    tokenizer_source = "tokenizer_path" if v.new_tokenizer else "pretrained_model_name_or_path"
    if v.data == "tokenized":
        dataset = """train_dataset = dict(
    type=build_packed_dataset,
    dataset_cfg=dict(
        type=load_intern_repo_tokenized_dataset,
        data_order_path=None,
        folder=dataset_folder,
        min_length=0,
        file_type='.bin'),
    packed_length=max_length,
    seed=1024)"""
    elif v.data == "untokenized":
        dataset = """train_dataset = dict(
    type=build_packed_dataset,
    dataset_cfg=dict(
        type=load_intern_repo_untokenized_dataset,
        folder=dataset_folder,
        tokenizer=tokenizer,
        max_length=max_length,
        template_map_fn=dict(
            type=template_map_fn_factory, template=prompt_template),
        file_type='.json'),
    packed_length=max_length,
    seed=1024)"""
    else:
        dataset = f"""train_dataset = dict(
    type=process_hf_dataset,
    use_varlen_attn=use_varlen_attn,
    dataset=dict(type=load_dataset, path='json', data_files=data_files),
    tokenizer=tokenizer,
    max_length=max_length,
    dataset_map_fn={"openai_map_fn" if v.openai else "None"},
    template_map_fn=dict(
        type=template_map_fn_factory, template=prompt_template),
    remove_unused_columns=True,
    shuffle_before_pack=True,
    pack_to_max_length=pack_to_max_length)"""
    extra_imports = ""
    if v.mistral_extras or v.qlora:
        extra_imports += "import torch\n"
    peft = "from peft import LoraConfig\n" if v.qlora else ""
    transformers_import = (
        "from transformers import (AutoModelForCausalLM, AutoTokenizer,\n"
        "                          BitsAndBytesConfig)"
        if v.qlora
        else "from transformers import AutoModelForCausalLM, AutoTokenizer"
    )
    return f"""# An XTuner v0.1 config ({v.name}), written for evotune's tests.
{extra_imports}from mmengine.hooks import (CheckpointHook, DistSamplerSeedHook, IterTimerHook,
                            LoggerHook, ParamSchedulerHook)
{scheduler_import}
{peft}from torch.optim import AdamW
from torch.utils.data import BatchSampler
{transformers_import}

from xtuner.dataset.collate_fns import default_collate_fn
{dataset_import}
from xtuner.dataset.samplers import InternRepoSampler
from xtuner.engine import (DatasetInfoHook, EvaluateChatHook, ThroughputHook,
                           VarlenAttnArgsToMessageHubHook)
from xtuner.engine.runner import TrainLoop
from xtuner.model import SupervisedFinetune
from xtuner.utils import PROMPT_TEMPLATE

#######################################################################
#                          PART 1  Settings                           #
#######################################################################
# Model
pretrained_model_name_or_path = {v.model!r}
{tokenizer_path}use_varlen_attn = True

# Data
{data_setting}
prompt_template = PROMPT_TEMPLATE.{v.template}
max_length = {v.max_length}
pack_to_max_length = True
{sp_lines}
# Scheduler & Optimizer
batch_size = 1  # per device
accumulative_counts = {v.accumulative_counts}
{sp_multiply}dataloader_num_workers = {v.num_workers}
max_epochs = {v.max_epochs}
optim_type = AdamW
lr = {v.lr!r}
betas = {v.betas!r}
weight_decay = {v.weight_decay!r}
max_norm = 1  # grad clip
{v.ratio_name} = {v.warmup_ratio!r}

# Save
save_steps = 500
save_total_limit = 2  # Maximum checkpoints to keep (-1 means unlimited)

# Evaluate the generation performance during the training
evaluation_freq = 500
SYSTEM = ''
evaluation_inputs = ['Name three rivers.', 'Tell me a joke about packing.']

#######################################################################
#                      PART 2  Model & Tokenizer                      #
#######################################################################
tokenizer = dict(
    type=AutoTokenizer.from_pretrained,
    pretrained_model_name_or_path={tokenizer_source},
    trust_remote_code=True,
    padding_side='right')

model = dict(
    type=SupervisedFinetune,
    use_varlen_attn=use_varlen_attn,{model_tokenizer}
    llm=dict(
        type=AutoModelForCausalLM.from_pretrained,
        pretrained_model_name_or_path=pretrained_model_name_or_path,
        trust_remote_code=True{llm_extras}){lora})

#######################################################################
#                      PART 3  Dataset & Dataloader                   #
#######################################################################
{dataset}

train_dataloader = dict(
    batch_size=batch_size,
    num_workers=dataloader_num_workers,
    dataset=train_dataset,
    sampler=dict(type=InternRepoSampler, shuffle=True, seed=1024),
    batch_sampler=dict(
        type=BatchSampler, drop_last=True, batch_size=batch_size),
    collate_fn=dict(type=default_collate_fn, use_varlen_attn=use_varlen_attn))

#######################################################################
#                    PART 4  Scheduler & Optimizer                    #
#######################################################################
# optimizer
optim_wrapper = dict(
    type=AmpOptimWrapper,
    optimizer=dict(
        type=optim_type, lr=lr, betas=betas, weight_decay=weight_decay),
    clip_grad=dict(max_norm=max_norm, error_if_nonfinite=False),
    accumulative_counts=accumulative_counts,
    loss_scale='dynamic',
)

# learning policy
param_scheduler = [
    dict(
        type={v.linear_type},
        start_factor={v.start_factor},
        by_epoch=True,
        begin=0,
        end={v.ratio_name} * max_epochs,
        convert_to_iter_based=True),
    dict(
        type=CosineAnnealingLR,
        eta_min={v.eta_min},
        by_epoch=True,
        begin={v.ratio_name} * max_epochs,
        end=max_epochs,
        convert_to_iter_based=True)
]

# train, val, test setting
train_cfg = dict(type=TrainLoop, max_epochs=max_epochs)

#######################################################################
#                           PART 5  Runtime                           #
#######################################################################
custom_hooks = [
    dict(
        type=DatasetInfoHook, tokenizer=tokenizer,
        is_intern_repo_dataset=True),
    dict(
        type=EvaluateChatHook,
        tokenizer=tokenizer,
        every_n_iters=evaluation_freq,
        evaluation_inputs=evaluation_inputs,
        system=SYSTEM,
        prompt_template=prompt_template),
    dict(type=ThroughputHook)
]

if use_varlen_attn:
    custom_hooks += [dict(type=VarlenAttnArgsToMessageHubHook)]

default_hooks = dict(
    timer=dict(type=IterTimerHook),
    logger=dict(type=LoggerHook, log_metric_by_epoch=False, interval={v.logger_interval}),
    param_scheduler=dict(type=ParamSchedulerHook),
    checkpoint=dict(
        type=CheckpointHook,
        by_epoch=False,
        interval=save_steps,
        max_keep_ckpts=save_total_limit),
    sampler_seed=dict(type=DistSamplerSeedHook),
)

env_cfg = dict(
    cudnn_benchmark=False,
    mp_cfg=dict(mp_start_method='fork', opencv_num_threads=0),
    dist_cfg=dict(backend='nccl'),
)

visualizer = None
log_level = 'INFO'
load_from = None
resume = False
randomness = dict(seed=None, deterministic=False)
log_processor = dict(by_epoch=False, window_size=1)
"""


def _settings_of(config: Path) -> dict:
    """The converted config's top-level values, as Python runs the file."""
    namespace: dict = {}
    exec(compile(config.read_text(), str(config), "exec"), namespace)
    return {k: v for k, v in namespace.items() if not k.startswith("__") and not callable(v)}


def _tokenize_command(report: str) -> str:
    return next(
        line.strip() for line in report.splitlines() if line.strip().startswith("evotune data")
    )


def _convert(tmp_path, variant, **kwargs):
    source = tmp_path / f"{variant.name}.py"
    source.write_text(xtuner_config(variant, **kwargs))
    output = tmp_path / f"{variant.name}_evotune.py"
    if variant.approximate:
        with pytest.raises(ConversionError, match="cannot reproduce exactly"):
            convert_xtuner_config(source, output)
        assert not output.exists()
    report = convert_xtuner_config(source, output, allow_approximate=variant.approximate)
    return source, output, report


@pytest.mark.parametrize("variant", VARIANTS, ids=lambda v: v.name)
def test_every_part1_setting_and_the_schedule_are_kept(tmp_path, variant):
    source, output, report = _convert(tmp_path, variant)
    xtuner = read_xtuner_config(source)
    assert xtuner.failures == []
    part1 = xtuner.namespace
    s = _settings_of(output)
    sp = variant.sequence_parallel or 1
    expected = {
        "pretrained_model_name_or_path": variant.model,
        "use_varlen_attn": True,
        "max_length": variant.max_length,
        "pack_to_max_length": True,
        "batch_size": 1,
        "num_workers": variant.num_workers,
        "accumulative_counts": variant.accumulative_counts * sp,
        "max_epochs": variant.max_epochs,
        "lr": variant.lr,
        "betas": variant.betas,
        "weight_decay": variant.weight_decay,
        "max_norm": 1.0,
        "save_total_limit": 2,
        "evaluation_inputs": part1["evaluation_inputs"],
        "SYSTEM": "",
        "prompt_template": variant.template,
        "sequence_parallel_size": sp,
        # XTuner counts CheckpointHook/EvaluateChatHook intervals in micro-batches
        "save_steps": 500 // (variant.accumulative_counts * sp),
        "evaluation_freq": 500 // (variant.accumulative_counts * sp),
        "log_interval": variant.logger_interval,
        # the schedule, as mmengine computes it
        "lr_schedule": "xtuner",
        "warmup_ratio": variant.warmup_ratio,
        "warmup_start_factor": eval(variant.start_factor),
        "eta_min": eval(variant.eta_min, {"lr": variant.lr}),
        "lr_step_unit": "micro_batch",
        "loss_reduction": "pack",
        "dtype": "bfloat16",
        "gradient_checkpointing": True,
        "weight_decay_scope": "all",
        "seed": 0,
    }
    for name, value in expected.items():
        assert s[name] == value, (name, s[name], value)
    assert part1["accumulative_counts"] == variant.accumulative_counts * sp  # *= was evaluated
    assert s["warmup_ratio"] * s["max_epochs"] == part1[variant.ratio_name] * part1["max_epochs"]
    assert set(s) - {"train_dataset", "train_dataloader"} <= set(SETTING_NAMES) | set(NEW_SETTINGS)
    dataset = s["train_dataset"]
    assert dataset["pack_mode"] == "xtuner" and dataset["packed_length"] == variant.max_length
    assert s["train_dataloader"]["sampler"]["order"] == "xtuner"
    assert s["train_dataloader"]["sampler"]["seed"] == 1024
    if variant.data == "tokenized":
        assert s["dataset_folder"] == "/path/to/sft/data/folder"
        assert "data tokenize" not in report
    else:
        command = _tokenize_command(report)
        fmt = "internevo-untokenized" if variant.data == "untokenized" else "xtuner"
        assert f"--format {fmt} --prompt-template {variant.template}" in command
        assert f"--max-length {variant.max_length}" in command
        assert f"-o {s['dataset_folder']}" in command
        assert command in output.read_text()
    assert "VarlenAttnArgsToMessageHubHook" in report and "not needed" in report
    rows = [line.split()[0] for line in report.splitlines()[1:] if line and line[0] != " "]
    for name in part1:  # every top-level name of the XTuner file has a row
        if name not in read_xtuner_config(source).imported_names:
            assert any(
                row == name or row.startswith(f"{name}.") or row.startswith(f"{name}[")
                for row in rows
            ), name


def test_start_factor_and_epochs_other_than_one(tmp_path):
    variant = dataclasses.replace(
        VARIANTS[0], name="three_epochs", max_epochs=3, start_factor="1e-5", warmup_ratio=0.03
    )
    _, output, _ = _convert(tmp_path, variant)
    s = _settings_of(output)
    assert s["warmup_start_factor"] == 1e-5 and s["max_epochs"] == 3
    # W = int((ratio * epochs) * iterations): the product must equal XTuner's LinearLR end
    assert s["warmup_ratio"] * 3 == 0.03 * 3


def test_math_changes_are_named(tmp_path):
    variant = VARIANTS[-1]  # QLoRA on Mistral
    _, output, report = _convert(tmp_path, variant)
    assert "model.lora" in report and "(NOT REPRODUCED)" in report
    assert "model.llm.quantization_config" in output.read_text()
    text = xtuner_config(VARIANTS[0]).replace(
        "    loss_scale='dynamic',", "    loss_scale='dynamic',\n    dtype='float16',"
    )
    (tmp_path / "fp16.py").write_text(text)
    with pytest.raises(
        ConversionError, match=r"optim_wrapper\.dtype='float16' \(evotune has no fp16\)"
    ):
        convert_xtuner_config(tmp_path / "fp16.py", tmp_path / "out.py")


def test_unreadable_statements_are_reported_and_the_rest_converted(tmp_path):
    text = xtuner_config(VARIANTS[0]) + "\nfor _hook in custom_hooks:\n    pass\n"
    (tmp_path / "loop.py").write_text(text)
    report = convert_xtuner_config(tmp_path / "loop.py", tmp_path / "out.py")
    assert "could not read: loop.py:" in report and "For statements" in report
    assert _settings_of(tmp_path / "out.py")["lr"] == 4e-5


@pytest.mark.parametrize(
    "edit,message",
    [
        (
            ("type=CosineAnnealingLR,", "type='PolyLR',"),
            r"param_scheduler\[1\]\.type = 'PolyLR': unknown scheduler",
        ),
        (
            ("type=load_intern_repo_tokenized_dataset,", "type=load_dataset,"),
            "a dataset evotune cannot read",
        ),
        (("type=InternRepoSampler,", "type=LengthGroupedSampler,"), "a sampler evotune cannot"),
    ],
)
def test_bad_input_is_one_error(tmp_path, edit, message):
    text = xtuner_config(VARIANTS[0]).replace(*edit)
    text = (
        "from datasets import load_dataset\nfrom xtuner.dataset.samplers import LengthGroupedSampler\n"
        + text
    )
    (tmp_path / "bad.py").write_text(text)
    with pytest.raises(ConversionError, match=message):
        convert_xtuner_config(tmp_path / "bad.py", tmp_path / "out.py")


def test_not_an_xtuner_config(tmp_path):
    (tmp_path / "internevo.py").write_text("data = dict(seq_len=2048, micro_bsz=1)\n")
    with pytest.raises(ConversionError, match="not an XTuner config"):
        convert_xtuner_config(tmp_path / "internevo.py", tmp_path / "out.py")
    (tmp_path / "broken.py").write_text("lr = (\n")
    with pytest.raises(ConversionError, match=r"broken\.py:1: syntax error"):
        convert_xtuner_config(tmp_path / "broken.py", tmp_path / "out.py")


@pytest.mark.integration
def test_cli_bad_input_is_one_line_exit_2(tmp_path):
    (tmp_path / "plain.py").write_text("x = 1\n")
    result = run_cli(
        "convert", "xtuner-config", str(tmp_path / "plain.py"), "-o", str(tmp_path / "o.py")
    )
    assert result.returncode == 2 and result.stderr.count("\n") == 1
    assert "not an XTuner config" in result.stderr and "Traceback" not in result.stderr
    (tmp_path / "poly.py").write_text(
        xtuner_config(VARIANTS[0]).replace("type=CosineAnnealingLR,", "type='PolyLR',")
    )
    result = run_cli(
        "convert", "xtuner-config", str(tmp_path / "poly.py"), "-o", str(tmp_path / "o.py")
    )
    assert result.returncode == 2 and "unknown scheduler type" in result.stderr
    assert result.stderr.count("\n") == 1


_TRAIN_OPTIONS = [
    "--cfg-options",
    "max_length=256",
    "total_steps=3",
    "dtype=float32",
    "gradient_checkpointing=False",
    "num_workers=0",
    "save_steps=100",
]


@pytest.mark.integration
@needs_new_settings
@pytest.mark.parametrize(
    "variant", [v for v in VARIANTS if v.data == "tokenized"], ids=lambda v: v.name
)
def test_tokenized_configs_train_three_steps_on_the_demo(tmp_path, variant):
    variant = dataclasses.replace(variant, model=str(DEMO_MODEL))
    _, output, _ = _convert(tmp_path, variant, dataset_path=str(DEMO_DATA))
    extra = ["tokenizer_name_or_path=" + str(DEMO_MODEL)] if variant.new_tokenizer else []
    result = run_train(output, tmp_path / "work", *_TRAIN_OPTIONS, *extra)
    assert result.returncode == 0, result.stderr[-3000:]
    assert len(losses(tmp_path / "work")) == 3


@pytest.mark.integration
@needs_new_settings
def test_json_config_tokenizes_with_the_printed_command_and_trains(tmp_path):
    conversations = [
        {
            "conversation": [
                {
                    "system": "You answer about Python.",
                    "input": f"What does os.sep hold? ({i})",
                    "output": "The path separator of the platform, '/' on POSIX. " * 3,
                },
                {"input": "And os.linesep?", "output": "The line separator: '\\n' on POSIX."},
            ]
        }
        for i in range(40)
    ]
    data = tmp_path / "train.json"
    data.write_text(json.dumps(conversations))
    variant = dataclasses.replace(VARIANTS[6], model=str(DEMO_MODEL))
    _, output, report = _convert(tmp_path, variant, dataset_path=str(data))
    command = shlex.split(_tokenize_command(report))
    tokenize = run_cli(*command[1:])
    assert tokenize.returncode == 0, tokenize.stderr
    assert "40 samples" in tokenize.stdout
    result = run_train(output, tmp_path / "work", *_TRAIN_OPTIONS)
    assert result.returncode == 0, result.stderr[-3000:]
    assert len(losses(tmp_path / "work")) == 3


@pytest.mark.parametrize(
    "sampler,expected",
    [
        (
            "dict(type=SequenceParallelSampler, seed=7)",
            {"type": "SequenceParallelSampler", "shuffle": True, "seed": 7, "round_up": True},
        ),
        (
            "dict(type=DefaultSampler, shuffle=False, seed=None)",
            {"type": "SequenceParallelSampler", "shuffle": False, "seed": 0, "round_up": True},
        ),
        (
            "dict(type=InternRepoSampler, shuffle=True, seed=3)",
            {"type": "InternRepoSampler", "shuffle": True, "seed": 1024, "order": "xtuner"},
        ),
    ],
)
def test_samplers_and_their_seeds(tmp_path, sampler, expected):
    text = xtuner_config(VARIANTS[0]).replace(
        "sampler=dict(type=InternRepoSampler, shuffle=True, seed=1024)", f"sampler={sampler}"
    )
    imports = (
        "from mmengine.dataset import DefaultSampler\n"
        "from xtuner.parallel.sequence import SequenceParallelSampler\n"
    )
    (tmp_path / "s.py").write_text(imports + text)
    report = convert_xtuner_config(tmp_path / "s.py", tmp_path / "out.py")
    namespace: dict = {}
    exec(compile((tmp_path / "out.py").read_text(), "out.py", "exec"), namespace)
    got = dict(namespace["train_dataloader"]["sampler"])
    got["type"] = got["type"].__name__
    assert got == expected
    if expected["seed"] == 1024 and "seed=3" in sampler:
        assert "XTuner forces 1024" in report
