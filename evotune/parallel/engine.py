"""The engine contract: how parameters are stored, gradients reduced and updated.

An engine owns the model wrapper, the optimizer, mixed precision and the
gradient reduction. Per optimizer step the trainer calls ``forward_backward``
once per micro-batch with a weight, then ``update`` once. The contract every
engine keeps, whatever it wraps:

    after the step's last micro-batch, the gradient of every parameter equals the
    SUM over all ranks of the gradients of (weight * loss_sum + aux_weight * aux).

DDP and DeepSpeed average gradients over the world, so they scale the objective
by the world size; a single process scales by 1. The trainer never sees world,
data-parallel or sequence-parallel sizes: the loss policy chooses the weights
(evotune.train.loss_policy) and the engine makes them mean the same everywhere.

* TorchEngine: one process, or DistributedDataParallel over all ranks; fp32, or
  bf16 parameters with fp32 master weights and AdamW state, or bf16 autocast.
* DeepSpeedEngine (deepspeed_engine.py): ZeRO 1/2/3.
Both are built by evotune.parallel.parallelize.build_engine.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Protocol

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import PreTrainedModel

from ..data.collate import PackedBatch
from ..errors import ConfigError
from ..model.hf_folder import read_hf_weights
from ..model.layers import weight_groups
from ..model.loss import PackedLoss, packed_loss
from .dims import ParallelDims
from .sequence import SequenceParallel

_NORM_PARAMETER_HINTS = ("norm", "ln_", "layernorm")


class PackedLossModule(nn.Module):
    """Wraps the HF model so the DDP/DeepSpeed forward returns the packed loss parts."""

    def __init__(
        self,
        model: PreTrainedModel,
        chunk_size: int,
        sequence_parallel: SequenceParallel | None = None,
    ):
        super().__init__()
        self.model = model
        self.chunk_size = chunk_size
        self.sequence_parallel = sequence_parallel

    def forward(self, batch: PackedBatch) -> PackedLoss:
        return packed_loss(self.model, batch, self.chunk_size, self.sequence_parallel)


def optimizer_param_groups(
    model: nn.Module, weight_decay: float, scope: str
) -> list[dict[str, Any]]:
    """'all' decays every parameter (InternEvo); 'no_bias_norm' spares biases and norms (HF)."""
    parameters = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if scope == "all":
        return [{"params": [p for _, p in parameters], "weight_decay": weight_decay}]
    decayed: list[nn.Parameter] = []
    spared: list[nn.Parameter] = []
    for name, parameter in parameters:
        lowered = name.lower()
        is_norm = any(hint in lowered for hint in _NORM_PARAMETER_HINTS)
        (spared if name.endswith(".bias") or is_norm or parameter.ndim < 2 else decayed).append(
            parameter
        )
    return [
        {"params": decayed, "weight_decay": weight_decay},
        {"params": spared, "weight_decay": 0.0},
    ]


class Engine(Protocol):
    name: str  # recorded in checkpoints: a resume must use the same engine
    elastic: bool  # its checkpoints resume on another number of ranks (state reshards)
    partitioned: bool  # its resume state is split over every rank (needs the same world)
    model: PreTrainedModel

    def forward_backward(
        self, batch: PackedBatch, weight: float, aux_weight: float, sync: bool
    ) -> PackedLoss:
        """Forward one whole micro-batch row, back-propagate its weighted loss.

        Returns the detached loss parts of this rank (its slice under SP). ``sync``
        is True for the step's last micro-batch (gradient reduction happens then).
        """

    def update(self, lr: float, max_norm: float, loss_is_finite: bool) -> tuple[float, bool]:
        """Clip and apply the accumulated gradients; returns (pre-clip norm, applied)."""

    def hf_weight_groups(self, dtype: torch.dtype) -> Iterator[dict[str, torch.Tensor]]:
        """The full weights in ``dtype`` on the main rank's CPU, a decoder layer at a time.

        Groups as model/layers.weight_groups; other ranks get empty groups. Collective:
        every rank consumes the whole iterator, so no rank holds more than one layer
        beyond its own shards.
        """

    def save_state(self, folder: Path, weights_saved_exactly: bool) -> None:
        """Everything an exact resume needs beyond the HF folder; collective.

        ``weights_saved_exactly`` (meaningful on the main rank): the HF folder holds
        the parameters bit for bit under their in-memory names.
        """

    def load_state(self, folder: Path) -> None: ...


class EngineBase:
    """What every engine shares: SP slicing, device placement, the objective."""

    name = "torch"
    elastic = False
    partitioned = False

    def __init__(
        self,
        model: PreTrainedModel,
        dims: ParallelDims,
        sequence_parallel: SequenceParallel | None,
        gradient_scale: float,
    ):
        self.model = model
        self.dims = dims
        self.sequence_parallel = sequence_parallel
        self.gradient_scale = gradient_scale  # undoes the wrapper's averaging over ranks

    def hf_weight_groups(self, dtype: torch.dtype) -> Iterator[dict[str, torch.Tensor]]:
        """A full replica on every rank: the main rank copies each layer, nothing is gathered."""
        for group in weight_groups(self.model):
            yield host_copies(group, dtype) if self.dims.is_main else {}

    def _local(self, batch: PackedBatch) -> PackedBatch:
        if self.sequence_parallel is not None:
            batch = self.sequence_parallel.split(batch)
        return batch.to(self.dims.device)

    def _objective(self, parts: PackedLoss, weight: float, aux_weight: float) -> torch.Tensor:
        objective = parts.loss_sum * weight
        if parts.aux_loss is not None:
            objective = objective + parts.aux_loss * aux_weight
        return objective * self.gradient_scale

    @staticmethod
    def _detached(parts: PackedLoss) -> PackedLoss:
        aux = None if parts.aux_loss is None else parts.aux_loss.detach().float()
        return PackedLoss(
            parts.loss_sum.detach().float(), aux, parts.token_losses, parts.token_types
        )


class TorchEngine(EngineBase):
    """Single process or DDP: fp32, or bf16 parameters with fp32 master weights, or autocast.

    Precision (``param_dtype`` / ``autocast_dtype``):

    * fp32: parameters, gradients and AdamW state in fp32; DDP reduces at the step's
      last micro-batch (``no_sync`` before it).
    * bf16 parameters (``param_dtype=bfloat16``): the model's parameters and
      activations are bf16; the engine keeps fp32 master copies that AdamW (fp32
      state) updates, then copies back rounded. After every micro-batch's backward
      its bf16 gradients are added into the masters' fp32 gradients, so
      accumulation over micro-batches is fp32; under DDP each micro-batch is
      reduced (in ``reduce_dtype``) before that, because the bf16 gradients are
      released once accumulated. Buffers (RoPE's inv_freq) stay fp32.
    * autocast (``autocast_dtype=bfloat16``): fp32 parameters, bf16 matmuls.

    ``reduce_dtype`` is the dtype of DDP's all-reduce: bf16 gradients summed in
    fp32, or fp32 gradients compressed to bf16; the same dtype reduces as is.
    """

    name = "torch"

    def __init__(
        self,
        model: PreTrainedModel,
        dims: ParallelDims,
        *,
        lr: float,
        betas: tuple[float, float],
        eps: float,
        weight_decay: float,
        weight_decay_scope: str,
        autocast_dtype: torch.dtype | None,
        chunk_size: int,
        sequence_parallel: SequenceParallel | None = None,
        param_dtype: torch.dtype = torch.float32,
        reduce_dtype: torch.dtype = torch.float32,
    ):
        super().__init__(model, dims, sequence_parallel, gradient_scale=float(dims.world_size))
        if autocast_dtype is not None and param_dtype != torch.float32:
            raise ValueError("choose bf16 parameters or autocast, not both")
        self.autocast_dtype = autocast_dtype
        groups = optimizer_param_groups(model, weight_decay, weight_decay_scope)
        # bf16 parameters: AdamW steps fp32 masters that take over the fp32 storage
        self.masters: list[nn.Parameter] | None = None
        self.master_params: list[nn.Parameter] = []
        if param_dtype != torch.float32:
            master_of: dict[int, nn.Parameter] = {}
            for group in groups:
                for parameter in group["params"]:
                    master_of[id(parameter)] = nn.Parameter(parameter.detach().float())
                    self.master_params.append(parameter)
                    parameter.data = parameter.detach().to(param_dtype)
                group["params"] = [master_of[id(parameter)] for parameter in group["params"]]
            self.masters = [master_of[id(parameter)] for parameter in self.master_params]
        self.module: nn.Module = PackedLossModule(model, chunk_size, sequence_parallel)
        if dims.is_distributed:
            self.module = nn.parallel.DistributedDataParallel(
                self.module,
                device_ids=[dims.device.index] if dims.device.type == "cuda" else None,
                broadcast_buffers=False,
            )
            _register_reduce_dtype(self.module, param_dtype, reduce_dtype)
        self.optimizer = torch.optim.AdamW(
            groups,
            lr=lr,
            betas=betas,
            eps=eps,
            fused=dims.device.type == "cuda",
        )

    def _autocast(self) -> contextlib.AbstractContextManager[None]:
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.dims.device.type, dtype=self.autocast_dtype)

    def _sync_context(self, sync: bool) -> contextlib.AbstractContextManager[None]:
        if sync or not isinstance(self.module, nn.parallel.DistributedDataParallel):
            return contextlib.nullcontext()
        return self.module.no_sync()

    def forward_backward(
        self, batch: PackedBatch, weight: float, aux_weight: float, sync: bool
    ) -> PackedLoss:
        # bf16 parameters: every micro-batch is reduced, then accumulated in fp32
        with self._sync_context(sync or self.masters is not None):
            with self._autocast():
                parts = self.module(self._local(batch))
            self._objective(parts, weight, aux_weight).backward()
        if self.masters is not None:
            self._accumulate_into_masters()
        return self._detached(parts)

    @torch.no_grad()
    def _accumulate_into_masters(self) -> None:
        assert self.masters is not None
        for master, parameter in zip(self.masters, self.master_params, strict=True):
            if parameter.grad is None:
                continue
            if master.grad is None:
                master.grad = parameter.grad.float()
            else:
                master.grad.add_(parameter.grad)
            parameter.grad = None

    def parameters(self) -> Iterator[nn.Parameter]:
        """What the optimizer updates: the fp32 masters, or the model's own parameters."""
        if self.masters is not None:
            return iter(self.masters)
        return (p for p in self.model.parameters() if p.requires_grad)

    def update(self, lr: float, max_norm: float, loss_is_finite: bool) -> tuple[float, bool]:
        """Global L2 norm before clipping (eps 1e-6); a non-finite norm or loss skips the step."""
        norm = float(
            torch.nn.utils.clip_grad_norm_(
                list(self.parameters()), max_norm if max_norm > 0 else math.inf
            )
        )
        applied = loss_is_finite and math.isfinite(norm)
        if applied:
            for group in self.optimizer.param_groups:
                group["lr"] = lr
            self.optimizer.step()
            self._copy_masters_to_model()
        self.optimizer.zero_grad(set_to_none=True)
        return norm, applied

    @torch.no_grad()
    def _copy_masters_to_model(self) -> None:
        if self.masters is not None:
            torch._foreach_copy_(tuple(self.master_params), tuple(self.masters))

    def _weights_to_save(self) -> dict[str, torch.Tensor]:
        """The model's state with fp32 masters in place of bf16 parameters; tied names once."""
        master_by_tensor = {}
        if self.masters is not None:
            master_by_tensor = {
                id(parameter): master
                for parameter, master in zip(self.master_params, self.masters, strict=True)
            }
        return {
            name: master_by_tensor.get(id(tensor), tensor).detach().contiguous()
            for group in weight_groups(self.model)
            for name, tensor in group.items()
        }

    def save_state(self, folder: Path, weights_saved_exactly: bool) -> None:
        if not self.dims.is_main:
            return
        # bf16 parameters: the HF folder holds rounded copies, never the fp32 masters
        if not weights_saved_exactly or self.masters is not None:
            save_file(self._weights_to_save(), str(folder / "master_weights.safetensors"))
        torch.save(self.optimizer.state_dict(), folder / "optimizer.pt")

    def load_state(self, folder: Path) -> None:
        master = folder / "master_weights.safetensors"
        weights_file = master if master.exists() else folder / "hf"
        weights = _load_named(
            weights_file,
            lambda path: load_file(str(path)) if path.is_file() else read_hf_weights(path),
        )
        # load_state_dict copies into each tensor in its own dtype
        missing, unexpected = self.model.load_state_dict(weights, strict=False)
        tied = set(getattr(self.model, "_tied_weights_keys", None) or [])
        if unexpected or set(missing) - tied:
            raise ConfigError(
                f"{weights_file}: weights do not match the model (missing {missing[:3]}, "
                f"unexpected {unexpected[:3]}); resume with the model the run started from"
            )
        if self.masters is not None:
            names = {id(p): n for n, p in self.model.named_parameters()}
            with torch.no_grad():
                for parameter, master_weight in zip(self.master_params, self.masters, strict=True):
                    master_weight.copy_(weights[names[id(parameter)]].to(torch.float32))
            self._copy_masters_to_model()
        state = _load_named(
            folder / "optimizer.pt", lambda path: torch.load(path, weights_only=True)
        )
        self.optimizer.load_state_dict(state)


@torch.no_grad()
def host_copies(group: dict[str, torch.Tensor], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Detached copies in ``dtype`` on the CPU (cast first: less to move off the device)."""
    return {name: tensor.detach().to(dtype).to("cpu") for name, tensor in group.items()}


def _register_reduce_dtype(
    ddp: nn.parallel.DistributedDataParallel, param_dtype: torch.dtype, reduce_dtype: torch.dtype
) -> None:
    """DDP's all-reduce in ``reduce_dtype`` (the default hook reduces in the gradients' dtype)."""
    if reduce_dtype == param_dtype:
        return
    from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

    if reduce_dtype == torch.bfloat16:
        ddp.register_comm_hook(None, default_hooks.bf16_compress_hook)
    elif reduce_dtype == torch.float32:
        ddp.register_comm_hook(None, _fp32_allreduce_hook)
    else:
        raise ValueError(f"reduce_dtype {reduce_dtype} is not supported")


def _fp32_allreduce_hook(process_group, bucket):
    """Average a bf16 gradient bucket in fp32: sum in fp32, divide, round once.

    Unannotated: DDP rejects a hook whose annotations are not the GradBucket and
    Future classes themselves, and this module's annotations are strings.
    """
    import torch.distributed as dist

    group = process_group if process_group is not None else dist.group.WORLD
    buffer = bucket.buffer()
    wide = buffer.to(torch.float32)
    future = dist.all_reduce(wide, group=group, async_op=True).get_future()
    world = dist.get_world_size(group)

    def back(done: torch.futures.Future[Any]) -> torch.Tensor:
        buffer.copy_(done.value()[0].div_(world))
        return buffer

    return future.then(back)


def _load_named(path: Path, load: Any) -> Any:
    """Load a checkpoint file; any failure names the file (a truncated write, say)."""
    try:
        return load(path)
    except Exception as error:
        raise ConfigError(
            f"{path}: cannot be read ({type(error).__name__}: {error}); the checkpoint is "
            "damaged: resume from an earlier one"
        ) from None
