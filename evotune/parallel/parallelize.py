"""The one place that loads, wraps and shards the model for a parallel layout.

``build_engine(settings, dims)`` applies, in a fixed order: the sequence-parallel
object for the layout, the model load (straight into ZeRO-3 partitions when
asked), activation checkpointing, and the engine that wraps the model (DDP,
DeepSpeed, or FSDP2 in fsdp_engine.py). Adding an engine means adding a branch here and a class that keeps
the contract in engine.py; the trainer does not change.
"""

from __future__ import annotations

import contextlib
import copy
import logging
from collections.abc import Iterator
from typing import Any

import torch
from transformers import PreTrainedModel

from ..config import DTYPES, TrainConfig
from ..model.layers import decoder_layers
from ..model.load import load_model
from .dims import ParallelDims
from .engine import Engine, TorchEngine
from .sequence import SequenceParallel, check_heads

TORCH_DTYPES = {name: getattr(torch, name) for name in DTYPES}
logger = logging.getLogger(__name__)


def build_engine(
    settings: TrainConfig, dims: ParallelDims, resuming: bool = False
) -> tuple[PreTrainedModel, Engine]:
    """Load the model for ``dims`` and wrap it in the engine the settings ask for.

    ``resuming``: a checkpoint will overwrite every weight, so an engine that can
    skip reading the base model's weights (FSDP2) does.
    """
    s = settings
    sequence_parallel = (
        SequenceParallel(dims.sp_size, dims.sp_rank, dims.sp_group) if dims.sp_size > 1 else None
    )
    if s.engine != "torch":
        from .fsdp_engine import FSDP2Engine, prepare_fsdp

        prepare_fsdp(s, dims)
        model = _load(s, dims, placement="meta")  # sharded before any weight is read
        if resuming:
            logger.info(
                "fsdp2: parameters built on the meta device; their shards come from the checkpoint"
            )
            return model, FSDP2Engine(model, dims, s, sequence_parallel, receive_weights=False)
        source_model = dims.run_on_main(lambda: _load_on_host(s, dims))
        logger.info(
            "fsdp2: parameters built on the meta device; their shards come from rank 0's host"
        )
        return model, FSDP2Engine(model, dims, s, sequence_parallel, source_model)
    if s.deepspeed is None:
        model = _load(s, dims)  # fp32: the engine turns it into bf16 params + fp32 masters
        autocast = s.dtype != "float32" and s.mixed_precision == "autocast"
        engine: Engine = TorchEngine(
            model,
            dims,
            lr=s.lr,
            betas=s.betas,
            eps=s.eps,
            weight_decay=s.weight_decay,
            weight_decay_scope=s.weight_decay_scope,
            autocast_dtype=TORCH_DTYPES[s.dtype] if autocast else None,
            chunk_size=s.loss_chunk_size,
            sequence_parallel=sequence_parallel,
            param_dtype=torch.float32 if autocast else TORCH_DTYPES[s.dtype],
            reduce_dtype=TORCH_DTYPES[s.reduce_dtype],
        )
        return model, engine

    from .deepspeed_engine import DeepSpeedEngine, load_deepspeed_config, zero_stage

    _start_deepspeed(dims)
    ds_config = load_deepspeed_config(s.deepspeed, s, dims)
    with zero3_partitioned_load(ds_config, enabled=zero_stage(ds_config) == 3):
        model = _load(s, dims)
    return model, DeepSpeedEngine(model, dims, ds_config, s, sequence_parallel)


def _load_on_host(s: TrainConfig, dims: ParallelDims) -> PreTrainedModel:
    """The full model in host memory, the source an FSDP2 engine shards from."""
    return load_model(
        s.pretrained_model_name_or_path,
        s.attn_implementation,
        dims.device,
        allow_unverified_model=s.allow_unverified_model,
        compute_dtype=TORCH_DTYPES[s.dtype],
        placement="cpu",
    )


def _load(s: TrainConfig, dims: ParallelDims, placement: str | None = None) -> PreTrainedModel:
    selective = (
        s.compile
        or s.activation_checkpointing_every != 1
        or s.activation_checkpointing_policy != "full"
    )
    model = load_model(
        s.pretrained_model_name_or_path,
        s.attn_implementation,
        dims.device,
        s.gradient_checkpointing and not selective,  # HF's own: every layer, full recompute
        allow_unverified_model=s.allow_unverified_model,
        compute_dtype=TORCH_DTYPES[s.dtype],
        placement=placement,
    )
    config = model.config
    check_heads(
        config.num_attention_heads,
        getattr(config, "num_key_value_heads", None) or config.num_attention_heads,
        dims.sp_size,
    )
    if selective:
        prepare_decoder_layers(
            model,
            checkpoint_every=s.activation_checkpointing_every if s.gradient_checkpointing else None,
            policy=s.activation_checkpointing_policy,
            compile=s.compile,
        )
    return model


# -- per decoder layer: activation checkpointing (every k-th, selective) and regional compile --


def _saves_matmuls_and_attention(ctx: Any, op: Any, *args: Any, **kwargs: Any) -> Any:
    """Selective checkpointing: keep matmul and attention outputs, recompute everything else."""
    from torch.utils.checkpoint import CheckpointPolicy

    name = str(op)
    keep = name.split(".")[1] in MATMUL_OPS if name.startswith("aten.") else False
    if keep or "attention" in name or "attn" in name:
        return CheckpointPolicy.MUST_SAVE
    return CheckpointPolicy.PREFER_RECOMPUTE


MATMUL_OPS = frozenset({"mm", "addmm", "bmm", "baddbmm", "matmul", "linear", "_scaled_mm"})


def _checkpoint_options(policy: str) -> dict[str, Any]:
    options: dict[str, Any] = {"use_reentrant": False}
    if policy == "save_matmuls":
        import functools

        from torch.utils.checkpoint import create_selective_checkpoint_contexts

        options["context_fn"] = functools.partial(
            create_selective_checkpoint_contexts, _saves_matmuls_and_attention
        )
    return options


def _attention_outside_compiled_graphs(model: PreTrainedModel) -> None:
    """Run the varlen attention function eagerly inside compiled layers.

    Its metadata (segment bounds as Python ints, masks) differs in every row; traced,
    it would specialise each graph on one row's segments and recompile for the next.
    Left outside, each layer compiles to static-shape graphs around it.
    """
    from transformers import AttentionInterface
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    name = model.config._attn_implementation
    function = ALL_ATTENTION_FUNCTIONS[name]
    if not getattr(function, "_torchdynamo_disable", False):
        AttentionInterface.register(name, torch.compiler.disable(function))


def prepare_decoder_layers(
    model: PreTrainedModel,
    *,
    checkpoint_every: int | None,
    policy: str = "full",
    compile: bool = False,
) -> None:
    """Wrap each decoder layer's forward: compiled (training only), checkpointed when chosen.

    ``checkpoint_every``: checkpoint layers 0, k, 2k, ... (None: no checkpointing);
    ``policy``: 'full' recomputes a checkpointed layer, 'save_matmuls' keeps its
    matmul and attention outputs. ``compile``: torch.compile each layer's forward
    (regional compilation; default dynamic-shape handling, so fixed-length rows give
    one static graph per layer part). The checkpoint wraps the compiled forward, so
    the backward's recomputation runs compiled too; module hooks (FSDP2, ZeRO-3)
    stay outside both. Evaluation and generation (no grad or eval mode) run the
    layers eagerly. The model's parameters and state_dict names do not change.
    """
    from torch.utils.checkpoint import checkpoint

    if compile and checkpoint_every is not None and policy != "full":
        raise ValueError(
            f"activation checkpointing policy {policy!r} does not compose with compile (torch's "
            "selective checkpoint rejects compiled layers); use 'full'"
        )
    if compile:
        _attention_outside_compiled_graphs(model)
    options = _checkpoint_options(policy)
    for index, layer in enumerate(decoder_layers(model)):
        eager = layer.forward
        compiled = torch.compile(eager) if compile else eager
        checkpointed = checkpoint_every is not None and index % checkpoint_every == 0

        def forward(
            *args: Any,
            _layer: torch.nn.Module = layer,
            _eager: Any = eager,
            _compiled: Any = compiled,
            _checkpointed: bool = checkpointed,
            **kwargs: Any,
        ) -> Any:
            if not (_layer.training and torch.is_grad_enabled()):
                return _eager(*args, **kwargs)
            if _checkpointed:
                return checkpoint(_compiled, *args, **options, **kwargs)
            return _compiled(*args, **kwargs)

        layer.forward = forward  # an instance attribute: hooks on __call__ stay outside
    layers = decoder_layers(model)
    summary = (
        "none"
        if checkpoint_every is None
        else f"{len(range(0, len(layers), checkpoint_every))} ({policy})"
    )
    logger.info(
        "decoder layers: %d, compiled: %s, activation-checkpointed: %s",
        len(layers),
        "all" if compile else "none",
        summary,
    )


def _start_deepspeed(dims: ParallelDims) -> None:
    """Let deepspeed.comm wrap our process group (a group of one for a single process).

    Without the torch.distributed variables DeepSpeed probes for MPI (mpi4py) even
    for one process; a one-rank group on this machine needs no launcher.
    """
    import deepspeed

    dims.ensure_process_group()
    deepspeed.init_distributed(dist_backend="nccl" if dims.device.type == "cuda" else "gloo")


@contextlib.contextmanager
def zero3_partitioned_load(ds_config: dict[str, Any], enabled: bool) -> Iterator[None]:
    """While open, from_pretrained loads weights straight into ZeRO-3 partitions.

    transformers reads a module-level weak reference to a live HfDeepSpeedConfig;
    holding the object for the duration of the block is what switches it on.
    """
    if not enabled:
        yield
        return
    from transformers.integrations import HfDeepSpeedConfig

    live = HfDeepSpeedConfig(copy.deepcopy(ds_config))  # it edits its copy
    try:
        yield
    finally:
        del live
