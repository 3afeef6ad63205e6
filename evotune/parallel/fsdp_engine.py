"""FSDP2 behind the engine seam: per-layer ``fully_shard``, DTensor parameters, DCP checkpoints.

Design, and why:

* **One shard group of every rank.** After a step every rank's gradient must be
  the SUM over all ranks (engine.py): data-parallel ranks saw different packs, and
  the ranks of a sequence-parallel group hold partial sums over slices of the
  same packs. So parameters are sharded over the flattened ("dp", "sp") mesh
  (torchtitan's dp_shard x cp layout) rather than HSDP over the 2-D mesh
  (replicate over dp, shard over sp), which would shard over fewer ranks and add
  an all-reduce. SP keeps its own mesh dimension for the attention all-to-all.
* **Sum, not mean.** FSDP2 averages over its shard group by default; every FSDP
  module here has divide factor 1 and plain SUM collectives (gloo has neither AVG
  nor PREMUL_SUM), so the reduce-scatter yields the contract's sum with
  gradient_scale 1: no scale-then-divide rounding, whatever the world size.
* **Reduce every micro-batch.** Each backward reduce-scatters into sharded fp32
  gradients that accumulate over the step's micro-batches, so no rank ever keeps
  unsharded gradients (``sync`` is not needed); one reduce-scatter per micro-batch.
* **Loading.** Every rank builds the model with its parameters on the meta device
  (no memory, no weights read; buffers computed as usual), shards it, allocates only
  its own shards, and receives them tensor by tensor from the main rank, the one
  process that reads the base model (into host memory). No device ever holds the
  whole model, and a node's host memory holds it once, not once per rank. A resume
  reads no base model at all: the checkpoint's shards fill the allocated ones.
* **Order.** The model is built with HF activation checkpointing (or evotune's
  per-layer checkpointing and compilation) already applied, then ``fully_shard``
  goes bottom-up: every decoder layer (model/layers.py), then the root, which is the
  PackedLossModule wrapper: packed_loss calls the base model and the LM head
  directly, so the root's own parameters (embeddings, final norm, LM head) must
  be gathered by the wrapper's forward hook. Recomputation re-enters a layer's
  forward inside the backward, where FSDP2's pre-backward gather already holds
  the layer's parameters.
* **Precision.** float32: no policy, exact. bfloat16: bf16 compute copies of the
  parameters, fp32 sharded master weights and optimizer state. Gradients are
  reduce-scattered in ``reduce_dtype`` (fp32 unless the user halves the traffic with
  bf16) and accumulate in fp32 shards.
* **Offload** (engine 'fsdp2_offload'): sharded parameters, gradients and AdamW
  state live in CPU memory (CPUOffloadPolicy); the optimizer steps on the CPU.
* **Checkpoints.** ``fsdp/`` is a torch.distributed.checkpoint folder: every rank
  writes its own shards of the model and optimizer state, and loading reshards
  them to the current world size, which makes elastic resume possible
  (data/sampler.py re-splits the data). The HF folder is gathered one parameter
  at a time and streamed to disk on rank 0 a decoder layer at a time
  (model/hf_folder.py): no device holds more than one full parameter, and rank 0's
  host memory at most one safetensors shard.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedModel

from ..config import TrainConfig
from ..data.collate import PackedBatch
from ..errors import ConfigError
from ..model.layers import decoder_layers, weight_groups
from ..model.loss import PackedLoss
from .dims import ParallelDims
from .engine import EngineBase, PackedLossModule, optimizer_param_groups
from .sequence import SequenceParallel

CHECKPOINT_FOLDER = "fsdp"
logger = logging.getLogger(__name__)
SHARD_MESH_NAME = "dp_sp"


def prepare_fsdp(settings: TrainConfig, dims: ParallelDims) -> None:
    """Refuse a second engine; give a single process a one-rank group (DTensors need a mesh)."""

    if settings.deepspeed is not None:
        raise ConfigError(
            f"engine={settings.engine!r} and deepspeed={settings.deepspeed!r} both choose an "
            "engine; drop --deepspeed or --fsdp (engine='torch')"
        )
    dims.ensure_process_group()


def shard_mesh(dims: ParallelDims) -> Any:
    """The 1-D mesh of every rank, flattened from the ("dp", "sp") mesh."""
    assert dims.mesh is not None, "prepare_fsdp first"
    return dims.mesh._flatten(SHARD_MESH_NAME)


class FSDP2Engine(EngineBase):
    """Fully sharded data parallel (FSDP2) over all ranks; resumable on another layout."""

    name = "fsdp2"  # offload or not, the checkpoint is the same
    elastic = True  # its checkpoints load on another number of ranks (CheckpointManager)

    def __init__(
        self,
        model: PreTrainedModel,
        dims: ParallelDims,
        settings: TrainConfig,
        sequence_parallel: SequenceParallel | None = None,
        source_model: PreTrainedModel | None = None,
        receive_weights: bool = True,
    ):
        """``model`` may have its parameters on the meta device (parallelize.build_engine
        builds it so): it is sharded first, then each rank allocates its shards and,
        unless a checkpoint will fill them (``receive_weights=False``: a resume), receives
        them from ``source_model``, the main rank's full model in host memory (None on
        the other ranks)."""
        from torch.distributed.fsdp import (
            CPUOffloadPolicy,
            FSDPModule,
            MixedPrecisionPolicy,
            OffloadPolicy,
            fully_shard,
        )

        super().__init__(model, dims, sequence_parallel, gradient_scale=1.0)
        self.offload = settings.engine == "fsdp2_offload"
        on_meta = any(parameter.is_meta for parameter in model.parameters())
        # the build computed them; allocating the shards below leaves every tensor empty
        built_buffers = (
            {name: b.detach().clone() for name, b in model.named_buffers()} if on_meta else {}
        )
        mesh = shard_mesh(dims)
        compute = torch.bfloat16 if settings.dtype == "bfloat16" else None
        reduce = getattr(torch, settings.reduce_dtype)
        precision = (
            MixedPrecisionPolicy(param_dtype=compute, reduce_dtype=reduce)
            if compute is not None or reduce != torch.float32
            else MixedPrecisionPolicy()  # fp32 throughout: no casts at all
        )
        logger.info(
            "fsdp2: compute in %s, gradients reduce-scattered in %s, fp32 shards%s",
            settings.dtype,
            settings.reduce_dtype,
            " in CPU memory" if self.offload else "",
        )
        placement = (
            CPUOffloadPolicy(pin_memory=dims.device.type == "cuda")
            if self.offload
            else OffloadPolicy()
        )
        options: dict[str, Any] = {
            "mesh": mesh,
            "mp_policy": precision,
            "offload_policy": placement,
        }
        self.layers = decoder_layers(model)
        for layer in self.layers:
            fully_shard(layer, **options)
        self.module = PackedLossModule(model, settings.loss_chunk_size, sequence_parallel)
        fully_shard(self.module, **options)
        for module in self.module.modules():
            if isinstance(module, FSDPModule):
                module.set_gradient_divide_factor(1.0)
                module.set_force_sum_reduction_for_comms(True)
        if on_meta:
            self._allocate_shards(built_buffers)
            if receive_weights:
                self._receive_weights(source_model)
        self.optimizer = torch.optim.AdamW(
            optimizer_param_groups(model, settings.weight_decay, settings.weight_decay_scope),
            lr=settings.lr,
            betas=settings.betas,
            eps=settings.eps,
        )

    def _allocate_shards(self, buffers: dict[str, torch.Tensor]) -> None:
        """Memory for this rank's shards (uninitialised), and the buffers on the device."""
        self.model.to_empty(device="cpu" if self.offload else self.dims.device)
        for qualified, value in buffers.items():
            owner, _, attribute = qualified.rpartition(".")
            # offloading keeps parameters in host memory only; buffers live on the device
            self.model.get_submodule(owner)._buffers[attribute] = value.to(self.dims.device)

    def _receive_weights(self, source: PreTrainedModel | None) -> None:
        """Fill this rank's shards from ``source``, broadcast from the main rank tensor by
        tensor: no device ever holds the whole model, and only the main rank's host
        memory does (once per job, not once per rank)."""
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            set_model_state_dict,
        )

        if self.dims.is_main and source is None:
            raise ValueError("the main rank must pass the full weights of a meta-device model")
        full = source.state_dict() if source is not None else {}
        options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True, strict=False)
        result = set_model_state_dict(self.model, full, options=options)
        if result.missing_keys or result.unexpected_keys:
            raise ConfigError(
                f"the loaded weights do not fit the model (missing {result.missing_keys[:3]}, "
                f"unexpected {result.unexpected_keys[:3]})"
            )

    def forward_backward(
        self, batch: PackedBatch, weight: float, aux_weight: float, sync: bool
    ) -> PackedLoss:
        parts = self.module(self._local(batch))
        self._objective(parts, weight, aux_weight).backward()
        return self._detached(parts)

    def update(self, lr: float, max_norm: float, loss_is_finite: bool) -> tuple[float, bool]:
        """Global L2 norm over the sharded gradients, clip (eps 1e-6), step unless non-finite."""
        from torch.distributed.tensor import DTensor

        parameters = [p for p in self.model.parameters() if p.grad is not None]
        gradients = [p.grad for p in parameters if p.grad is not None]
        total = torch.nn.utils.get_total_norm(gradients, 2.0)
        if isinstance(total, DTensor):  # partial sums of squares on each shard
            total = total.full_tensor()
        norm = float(total)
        applied = loss_is_finite and math.isfinite(norm)
        if applied:
            torch.nn.utils.clip_grads_with_norm_(
                parameters, max_norm if max_norm > 0 else math.inf, total
            )
            for group in self.optimizer.param_groups:
                group["lr"] = lr
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return norm, applied

    @torch.no_grad()
    def hf_weight_groups(self, dtype: torch.dtype) -> Iterator[dict[str, torch.Tensor]]:
        """Each parameter all-gathered in ``dtype`` on the device, one at a time, and
        copied to the main rank's CPU; the main rank hands over a decoder layer at a time."""
        from torch.distributed.tensor import DTensor

        for group in weight_groups(self.model):
            copies: dict[str, torch.Tensor] = {}
            for name, tensor in group.items():
                full = tensor.detach().to(dtype)
                if isinstance(full, DTensor):
                    local = full.to_local()
                    if local.device != self.dims.device:  # offloaded: gather on the device
                        full = DTensor.from_local(
                            local.to(self.dims.device),
                            full.device_mesh,
                            full.placements,
                            shape=full.shape,
                            stride=full.stride(),
                        )
                    full = full.full_tensor()
                if self.dims.is_main:
                    copies[name] = full.to("cpu")
            yield copies

    def _sharded_state(self) -> dict[str, Any]:
        from torch.distributed.checkpoint.state_dict import get_state_dict

        model_state, optimizer_state = get_state_dict(self.model, self.optimizer)
        return {"model": model_state, "optimizer": optimizer_state}

    def save_state(self, folder: Path, weights_saved_exactly: bool) -> None:
        """Each rank writes its shards of the fp32 weights and AdamW state (no gather)."""
        import torch.distributed.checkpoint as dcp

        dcp.save(self._sharded_state(), checkpoint_id=str(folder / CHECKPOINT_FOLDER))

    def load_state(self, folder: Path) -> None:
        """Read the shards this rank needs now, whatever the world size that wrote them."""
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import set_state_dict

        source = folder / CHECKPOINT_FOLDER
        if not source.is_dir():
            raise ConfigError(
                f"--resume {folder}: no {CHECKPOINT_FOLDER}/ folder (not saved by the fsdp2 "
                "engine); resume with the engine that saved it"
            )
        state = self._sharded_state()
        try:
            dcp.load(state, checkpoint_id=str(source))
        except Exception as error:
            cause = " ".join(str(error).split())[:300]
            raise ConfigError(
                f"{source}: cannot be read ({type(error).__name__}: {cause}); the checkpoint is "
                "damaged or from another model: resume from an earlier one"
            ) from None
        set_state_dict(
            self.model,
            self.optimizer,
            model_state_dict=state["model"],
            optim_state_dict=state["optimizer"],
        )
