"""What a config may say: every setting, its type, its default and its meaning.

``TrainConfig`` is the one list of settings. The string under each field is its
documentation: ``setting_docs()`` reads those strings from this file's source, and
``evotune.config.reference`` turns them into the README's settings reference.
Each choice setting is a ``Literal``; its allowed values come from that type alone
(``choices(...)``), and modules that need the same list import it from here.

One name per concept, matching InternEvo:

* ``max_length`` is the packed length, the tokens of one pack (InternEvo's
  ``micro_bsz * seq_len`` in packed mode).
* ``max_length_per_sample`` (an argument of ``build_packed_dataset``) is
  InternEvo's ``seq_len``: the longest sample segment inside a pack.
* ``accumulative_counts`` is InternEvo's ``micro_num``: micro-batches per
  optimizer step.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import itertools
import typing
from dataclasses import dataclass, field
from functools import cache
from typing import Any, Literal

DType = Literal["float32", "bfloat16"]
LossReduction = Literal["pack", "token"]
LRSchedule = Literal["internevo", "xtuner", "constant"]
WeightDecayScope = Literal["all", "no_bias_norm"]
OnBadSample = Literal["error", "skip"]
LRStepUnit = Literal["update", "micro_batch"]
Reporter = Literal["tensorboard", "wandb"]
ReportTo = Literal["auto", "none", "tensorboard", "wandb"]
AttnImplementation = Literal[
    "auto", "sdpa", "flex_attention", "eager", "varlen", "flash_attention_2"
]
Engine = Literal["torch", "fsdp2", "fsdp2_offload"]
MixedPrecision = Literal["bf16_params", "autocast"]
ReduceDType = Literal["float32", "bfloat16"]
CheckpointPolicy = Literal["full", "save_matmuls"]


def choices(literal: Any) -> tuple[str, ...]:
    """The allowed values of a choice setting, read from its ``Literal`` type."""
    return tuple(typing.get_args(literal))


DTYPES = choices(DType)
LOSS_REDUCTIONS = choices(LossReduction)
LR_SCHEDULES = choices(LRSchedule)
WEIGHT_DECAY_SCOPES = choices(WeightDecayScope)
ATTN_IMPLEMENTATIONS = choices(AttnImplementation)


@dataclass
class TrainConfig:
    """Every setting evotune reads, with InternEvo's behaviour as the default."""

    # -- model -----------------------------------------------------------------
    pretrained_model_name_or_path: str = ""
    """A local Hugging Face model folder or a hub id; training starts from its weights."""
    tokenizer_name_or_path: str | None = None
    """Tokenizer saved with checkpoints; None: the model's own folder (weights only if absent)."""
    dtype: DType = "float32"
    """Training precision. 'bfloat16' computes in bf16 and keeps fp32 master weights and
    AdamW state (see mixed_precision); the loss is fp32 either way. Checkpoints' HF folders
    are written in this dtype (the fp32 masters beside them, for an exact resume)."""
    mixed_precision: MixedPrecision = "bf16_params"
    """How dtype='bfloat16' trains with the torch engine: 'bf16_params': bf16 parameters and
    activations, fp32 master weights and gradient accumulation (as DeepSpeed and FSDP2 do);
    'autocast': fp32 parameters under torch.autocast (fp32 residual stream, slower)."""
    reduce_dtype: ReduceDType = "float32"
    """Dtype of the gradient reduction across processes (DDP's all-reduce, FSDP2's
    reduce-scatter): 'float32' sums bf16 gradients in fp32; 'bfloat16' halves the traffic
    and rounds each rank's gradient."""
    attn_implementation: AttnImplementation = "auto"
    """Varlen attention kernel. 'auto': torch's varlen flash-attention on CUDA (bf16, PyTorch
    >= 2.10), else flash-attn when installed, else SDPA; SDPA on CPU. Kernels that cannot do
    what the model's attention needs (softcap, sinks) are skipped or refused."""
    allow_unverified_model: bool = False
    """Train a model type that evotune.model.families has not verified (packed loss and
    gradients against the model's own forward), with a warning. Features no kernel does
    exactly are refused either way."""
    gradient_checkpointing: bool = False
    """Recompute activations in the backward (non-reentrant) to save memory."""
    activation_checkpointing_every: int = 1
    """With gradient_checkpointing: checkpoint decoder layers 0, k, 2k, ... only (1: all), so
    memory is traded for speed in steps."""
    activation_checkpointing_policy: CheckpointPolicy = "full"
    """With gradient_checkpointing: 'full' recomputes a checkpointed layer; 'save_matmuls' keeps
    its matmul and attention outputs and recomputes only norms, activations and rotary."""
    compile: bool = False
    """torch.compile each decoder layer (regional compilation; torch and FSDP2 engines): rows of
    fixed length keep shapes static; attention stays the eager varlen kernel; the first step
    pays the compile time. Evaluation and generations run the layers eagerly."""

    # -- data ------------------------------------------------------------------
    dataset_folder: str | None = None
    """Folder of InternEvo tokenized (ftdp) shards; used when train_dataset is not set."""
    max_length: int = 2048
    """Packed length: the tokens of one pack (InternEvo's micro_bsz * seq_len in packed mode).
    The longest sample segment is build_packed_dataset's max_length_per_sample, InternEvo's
    seq_len."""
    pack_to_max_length: bool = True
    """Always True: ftdp samples are packed into rows of max_length tokens."""
    use_varlen_attn: bool = True
    """True: attention stays inside each sample of a pack. False: attention runs over fixed
    windows of max_length_per_sample tokens (the whole pack when unset), across sample edges."""
    batch_size: int = 1
    """Packs per micro-batch, flattened into one varlen row."""
    num_workers: int = 0
    """DataLoader worker processes that read and pack shards."""
    dataset_weights: dict[str, float] | None = None
    """Sampling weight per subfolder of the dataset ('en/wiki': 2.0); unlisted packs weigh 1.
    Needs the InternRepoSampler."""
    train_dataset: dict[str, Any] | None = None
    """Component: dict(type=build_packed_dataset, dataset_cfg=..., packed_length=max_length,
    ...). None: the dataset_folder packed with InternEvo's defaults."""
    train_dataloader: dict[str, Any] | None = None
    """Component: dict(sampler=dict(type=InternRepoSampler, ...)); may repeat batch_size and
    num_workers (equal values only) and dataset=train_dataset."""
    on_bad_sample: OnBadSample = "error"
    """A sample found broken while training (not JSON, no tokens, an id beyond the vocab, a
    length that contradicts the .meta): 'error' saves the last good state and stops naming
    file:line; 'skip' trains it as ignored tokens of the same length (every other pack
    unchanged) and reports the skipped samples per file at the end."""

    # -- optimisation ----------------------------------------------------------
    accumulative_counts: int = 1
    """Micro-batches per optimizer step (InternEvo's micro_num)."""
    max_epochs: int = 1
    """Passes over the data; ignored when total_steps is set."""
    total_steps: int | None = None
    """Optimizer steps to run; wins over max_epochs. None: derived from max_epochs."""
    loss_reduction: LossReduction = "pack"
    """'pack': mean over micro-batches of each micro-batch's token mean (InternEvo);
    'token': one mean over every trainable token of the step."""
    loss_chunk_size: int = 4096
    """Positions per chunk of the fp32 LM head and cross-entropy (bounds logits memory)."""
    lr: float = 2e-5
    """Peak learning rate of AdamW."""
    betas: tuple[float, float] = (0.9, 0.95)
    """AdamW (beta1, beta2)."""
    eps: float = 1e-8
    """AdamW epsilon."""
    weight_decay: float = 0.01
    """AdamW decoupled weight decay."""
    weight_decay_scope: WeightDecayScope = "all"
    """'all': decay every parameter (InternEvo); 'no_bias_norm': spare biases and norms (HF)."""
    max_norm: float = 1.0
    """Clip the global gradient norm to this value; 0 disables clipping."""
    lr_schedule: LRSchedule = "internevo"
    """'internevo': linear warm-up then cosine to eta_min (FineTuneCosineAnnealingWarmupLR);
    'xtuner': warm-up from lr/40 then cosine; 'constant': lr throughout."""
    warmup_ratio: float = 0.0
    """Fraction of total_steps spent warming up, in [0, 1)."""
    init_steps: int = 0
    """InternEvo's init_steps: steps at lr 0 before the warm-up starts."""
    eta_min: float | None = None
    """Final learning rate of the cosine. None: 0.15 * lr for 'xtuner', else 0."""
    warmup_start_factor: float = 1.0 / 40
    """'xtuner' schedule: LR factor of the first warm-up step (mmengine LinearLR start_factor;
    XTuner's templates use 1/40, its Mistral custom SFT 1e-5)."""
    lr_step_unit: LRStepUnit = "update"
    """'xtuner' schedule: advance the LR once per optimizer update, or once per micro-batch
    as XTuner's ParamSchedulerHook does (warm-up and length then count micro-batches)."""
    max_consecutive_skipped_steps: int = 10
    """Stop after this many steps in a row with a non-finite loss or gradient norm."""

    # -- parallelism -----------------------------------------------------------
    sequence_parallel_size: int = 1
    """Ulysses sequence-parallel degree: ranks that share one pack."""
    deepspeed: str | None = None
    """A DeepSpeed preset (deepspeed_zero1/2/3, deepspeed_zero2_offload, deepspeed_zero3_offload)
    or a JSON file; None: plain PyTorch (DDP when distributed)."""
    engine: Engine = "torch"
    """'torch': plain PyTorch (DDP when distributed), or DeepSpeed when deepspeed is set.
    'fsdp2' (--fsdp): PyTorch FSDP2, parameters, gradients and AdamW state sharded over all
    ranks, sharded checkpoints that resume on another number of processes or SP size;
    'fsdp2_offload': the same with the sharded state in CPU memory."""

    # -- run -------------------------------------------------------------------
    cpu_threads: int | None = None
    """Intra-op threads of each process on CPU. None: the cores this process may run on
    (its affinity) divided by the processes of this node, at least 1; an explicit
    OMP_NUM_THREADS in the environment wins over None."""
    seed: int = 0
    """Seed of model-side randomness (dropout); data order has its own seeds in the components."""
    save_steps: int = 500
    """Save a checkpoint every this many steps, and at the end."""
    save_total_limit: int = 2
    """Keep this many newest checkpoints; -1 keeps all."""
    save_shard_size_mb: float = 5120.0
    """Largest safetensors file of a checkpoint's HF folder, in MiB (a bigger single tensor
    gets a file of its own). The main rank holds at most one such file plus one decoder
    layer in host memory while it saves."""
    log_interval: int = 1
    """Log a console line every this many steps (when the progress bar is off)."""
    work_dir: str | None = None
    """Output folder; --work-dir wins. None: work_dirs/CONFIG_STEM (the config file name)."""

    # -- validation ------------------------------------------------------------
    val_dataset_folder: str | None = None
    """Folder of held-out ftdp shards, packed like the training data (train_dataset's packing
    arguments with this folder); used when val_dataset is not set. None: no validation."""
    val_dataset: dict[str, Any] | None = None
    """Component: dict(type=build_packed_dataset, dataset_cfg=..., packed_length=max_length, ...)
    evaluated in its own order, never shuffled. None: val_dataset_folder, if set."""
    eval_steps: int | None = None
    """Validate every this many optimizer steps, and at the end. None: at the end only."""
    max_eval_batches: int | None = None
    """Validate on the first this many batches (batch_size packs each) of the validation set
    only. None: all of it."""

    # -- sample generations ----------------------------------------------------
    evaluation_inputs: list[str] = field(default_factory=list)
    """Prompts (a list of strings) answered greedily on the main rank before training, every
    evaluation_freq steps and at the end: logged and appended to WORK_DIR/generations.jsonl."""
    evaluation_freq: int | None = None
    """Answer the evaluation_inputs every this many optimizer steps (XTuner's every_n_iters /
    accumulative_counts). None: before training and at the end only."""
    prompt_template: str | None = None
    """XTuner prompt template that wraps each evaluation input (internlm2_chat, qwen_chat, ...).
    None: the tokenizer's chat template, or the prompt as written when it has none."""
    SYSTEM: str = ""
    """System message of the evaluation inputs (XTuner's SYSTEM); '' for none."""
    max_new_tokens: int = 64
    """Longest answer to each evaluation input, in tokens (greedy; stops earlier at EOS)."""

    # -- reporting -------------------------------------------------------------
    report_to: ReportTo | list[Reporter] = "auto"
    """Where step and validation records go besides metrics.jsonl: a list of 'tensorboard'
    (WORK_DIR/tensorboard) and 'wandb'; 'auto': TensorBoard when installed; 'none'."""

    def resolved_eta_min(self) -> float:
        """eta_min, or the default of the chosen lr_schedule when it is None."""
        if self.eta_min is not None:
            return self.eta_min
        return 0.15 * self.lr if self.lr_schedule == "xtuner" else 0.0


SETTING_NAMES = tuple(f.name for f in dataclasses.fields(TrainConfig))
COMPONENT_NAMES = ("train_dataset", "train_dataloader", "val_dataset")
DATALOADER_KEYS = ("dataset", "sampler", "batch_size", "num_workers")


@dataclass(frozen=True)
class ProvidedArgument:
    """An argument evotune passes to a component at build time (the sampler's ranks, say).

    A target that does not take it may drop it only while its value is one of
    ``neutral`` (dropping it then changes nothing); any other value would be lost, so
    building stops with ``consequence`` and ``fix``. ``neutral=None`` marks a pure
    hint that a target may always ignore.
    """

    neutral: tuple[Any, ...] | None
    consequence: str = "evotune's value would be lost"
    fix: str = "use a component that takes it"


_SHARDING_FIX = (
    "use a sampler that takes dp_size and dp_rank (InternRepoSampler, SequenceParallelSampler)"
)
PROVIDED_ARGUMENTS: dict[str, ProvidedArgument] = {
    # InternEvo's truncation unit; an order that does not truncate by it loses nothing
    "micro_num": ProvidedArgument(neutral=None),
    "dp_size": ProvidedArgument(
        (1,), "every data-parallel rank would read the same packs", _SHARDING_FIX
    ),
    "dp_rank": ProvidedArgument(
        (0,), "every data-parallel rank would read the same packs", _SHARDING_FIX
    ),
    "dataset_weights": ProvidedArgument(
        (None, {}),
        "the setting dataset_weights would be ignored",
        "remove dataset_weights, or use sampler=dict(type=InternRepoSampler)",
    ),
}
"""The arguments the trainer provides by name; any other provided name is neutral at None."""

_OPTIMIZER = "lr, betas, eps, weight_decay, weight_decay_scope, max_norm"
_SCHEDULE = "lr_schedule, warmup_ratio, eta_min, init_steps"
XTUNER_SECTIONS: dict[str, str] = {
    "optim_wrapper": _OPTIMIZER,
    "optim_type": _OPTIMIZER,
    "param_scheduler": _SCHEDULE,
    "train_cfg": "max_epochs, total_steps",
    "model": "pretrained_model_name_or_path, dtype, attn_implementation, gradient_checkpointing",
    "llm": "pretrained_model_name_or_path",
    "tokenizer": "tokenizer_name_or_path",
    "default_hooks": "save_steps, save_total_limit, log_interval",
    "custom_hooks": "evaluation_inputs, evaluation_freq, prompt_template, SYSTEM, save_steps",
    "env_cfg": "seed",
    "randomness": "seed",
    "visualizer": "log_interval",
    "log_processor": "log_interval",
    "log_level": "log_interval",
    "load_from": "pretrained_model_name_or_path, or --resume",
    "resume": "--resume",
}
"""XTuner v0.1 config sections evotune does not read, with the settings that replace them.

A copied section would otherwise be dropped without a word (an optimizer or a schedule
the user chose), so loading refuses it and names the replacements."""


@cache
def setting_docs() -> dict[str, str]:
    """Each setting's attribute docstring, read from TrainConfig's source (one line each)."""
    tree = ast.parse(inspect.getsource(TrainConfig))
    body = tree.body[0].body  # type: ignore[attr-defined]
    docs: dict[str, str] = {}
    for statement, following in itertools.pairwise(body):
        if (
            isinstance(statement, ast.AnnAssign)
            and isinstance(statement.target, ast.Name)
            and isinstance(following, ast.Expr)
            and isinstance(following.value, ast.Constant)
            and isinstance(following.value.value, str)
        ):
            docs[statement.target.id] = " ".join(following.value.value.split())
    return docs
