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
import os
from collections.abc import Iterator
from typing import Any

import torch
from transformers import PreTrainedModel

from ..config import TrainConfig
from ..model.load import load_model
from .dims import ParallelDims
from .engine import Engine, TorchEngine
from .sequence import SequenceParallel, check_heads

TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def build_engine(settings: TrainConfig, dims: ParallelDims) -> tuple[PreTrainedModel, Engine]:
    """Load the model for ``dims`` and wrap it in the engine the settings ask for."""
    s = settings
    sequence_parallel = (
        SequenceParallel(dims.sp_size, dims.sp_rank, dims.sp_group) if dims.sp_size > 1 else None
    )
    if s.engine != "torch":
        from .fsdp_engine import FSDP2Engine, prepare_fsdp

        prepare_fsdp(s, dims)
        model = _load(s, dims)
        return model, FSDP2Engine(model, dims, s, sequence_parallel)
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


def _load(s: TrainConfig, dims: ParallelDims) -> PreTrainedModel:
    model = load_model(
        s.pretrained_model_name_or_path,
        s.attn_implementation,
        dims.device,
        s.gradient_checkpointing,
        allow_unverified_model=s.allow_unverified_model,
        compute_dtype=TORCH_DTYPES[s.dtype],
    )
    config = model.config
    check_heads(
        config.num_attention_heads,
        getattr(config, "num_key_value_heads", None) or config.num_attention_heads,
        dims.sp_size,
    )
    return model


def _start_deepspeed(dims: ParallelDims) -> None:
    """Let deepspeed.comm wrap our process group (a group of one for a single process).

    Without the torch.distributed variables DeepSpeed probes for MPI (mpi4py) even
    for one process; a one-rank group on this machine needs no launcher.
    """
    import deepspeed
    import torch.distributed as dist

    if not dims.is_distributed and not dist.is_initialized():
        from ..launch import free_port

        for name, value in (
            ("RANK", "0"),
            ("LOCAL_RANK", "0"),
            ("WORLD_SIZE", "1"),
            ("MASTER_ADDR", "127.0.0.1"),
        ):
            os.environ.setdefault(name, value)
        os.environ.setdefault("MASTER_PORT", str(free_port()))
        dims.start_process_group()
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
