"""The one seam between the trainer and how parameters are stored and reduced.

An engine owns the model wrapper, the optimizer and mixed precision. The trainer
calls, per optimizer step: ``forward_backward`` for each micro-batch (with a
function that turns the micro-batch's loss sum into the objective to
back-propagate), then ``clip_grad_norm``, then ``step`` or ``skip``.

* TorchEngine: one process, or DistributedDataParallel over the data-parallel
  ranks. fp32 master weights; bfloat16 runs under autocast.
* DeepSpeedEngine (deepspeed_engine.py): ZeRO 1/2/3.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator
from typing import Any, Protocol

import torch
import torch.distributed as dist
from torch import nn
from transformers import PreTrainedModel

from ..data.collate import PackedBatch
from ..model.loss import packed_loss_sum
from .dims import ParallelDims

Objective = Callable[[torch.Tensor], torch.Tensor]

_NORM_PARAMETER_HINTS = ("norm", "ln_", "layernorm")


class PackedLossModule(nn.Module):
    """Wraps the HF model so the DDP/DeepSpeed forward returns the packed loss sum."""

    def __init__(self, model: PreTrainedModel, chunk_size: int, sequence_parallel: Any = None):
        super().__init__()
        self.model = model
        self.chunk_size = chunk_size
        self.sequence_parallel = sequence_parallel

    def forward(self, batch: PackedBatch) -> torch.Tensor:
        return packed_loss_sum(self.model, batch, self.chunk_size, self.sequence_parallel)


def optimizer_param_groups(
    model: nn.Module, weight_decay: float, scope: str
) -> list[dict[str, Any]]:
    """'all' decays every parameter (InternEvo); 'no_bias_norm' spares biases and norms (HF)."""
    parameters = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if scope == "all":
        return [{"params": [p for _, p in parameters], "weight_decay": weight_decay}]
    decayed, spared = [], []
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
    model: PreTrainedModel

    def forward_backward(self, batch: PackedBatch, objective: Objective, sync: bool) -> float: ...
    def clip_grad_norm(self, max_norm: float) -> float: ...
    def step(self, lr: float) -> None: ...
    def skip(self) -> None: ...
    def optimizer_state(self) -> dict[str, Any]: ...
    def load_optimizer_state(self, state: dict[str, Any]) -> None: ...


class TorchEngine:
    """Single process or DDP; fp32 master weights and optimizer, optional bf16 autocast."""

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
        sequence_parallel: Any = None,
    ):
        self.model = model
        self.dims = dims
        self.autocast_dtype = autocast_dtype
        self.module: nn.Module = PackedLossModule(model, chunk_size, sequence_parallel)
        if dims.is_distributed:
            self.module = nn.parallel.DistributedDataParallel(
                self.module,
                device_ids=[dims.device.index] if dims.device.type == "cuda" else None,
                broadcast_buffers=False,
            )
        self.optimizer = torch.optim.AdamW(
            optimizer_param_groups(model, weight_decay, weight_decay_scope),
            lr=lr,
            betas=betas,
            eps=eps,
            foreach=dims.device.type == "cuda",
        )

    def _autocast(self) -> contextlib.AbstractContextManager[None]:
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.dims.device.type, dtype=self.autocast_dtype)

    def _sync_context(self, sync: bool) -> contextlib.AbstractContextManager[None]:
        if sync or not isinstance(self.module, nn.parallel.DistributedDataParallel):
            return contextlib.nullcontext()
        return self.module.no_sync()

    def forward_backward(self, batch: PackedBatch, objective: Objective, sync: bool) -> float:
        with self._sync_context(sync):
            with self._autocast():
                loss_sum = self.module(batch)
            objective(loss_sum).backward()
        return float(loss_sum.detach())

    def parameters(self) -> Iterator[nn.Parameter]:
        return (p for p in self.model.parameters() if p.requires_grad)

    def clip_grad_norm(self, max_norm: float) -> float:
        """Global L2 norm before clipping; clips in place when max_norm > 0 and it is finite."""
        parameters = list(self.parameters())
        norm = torch.nn.utils.clip_grad_norm_(
            parameters, max_norm if max_norm > 0 else math.inf, error_if_nonfinite=False
        )
        return float(norm)

    def step(self, lr: float) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def skip(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)

    def optimizer_state(self) -> dict[str, Any]:
        return self.optimizer.state_dict()

    def load_optimizer_state(self, state: dict[str, Any]) -> None:
        self.optimizer.load_state_dict(state)

    def barrier(self) -> None:
        if dist.is_initialized():
            dist.barrier()
