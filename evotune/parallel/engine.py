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
from pathlib import Path
from typing import Any, Protocol

import torch
from safetensors.torch import load_file, save_file
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

    def forward_backward(self, batch: PackedBatch, objective: Objective, sync: bool) -> float:
        """Forward one micro-batch, back-propagate ``objective(loss_sum)``; returns loss_sum."""

    def update(self, lr: float, max_norm: float, loss_is_finite: bool) -> tuple[float, bool]:
        """Clip and apply the accumulated gradients; returns (pre-clip norm, applied)."""

    def hf_state_dict(self) -> dict[str, torch.Tensor] | None:
        """Full model weights on the main rank (None elsewhere); collective."""

    def save_state(self, folder: Path, weights_saved_exactly: bool) -> None:
        """Everything an exact resume needs beyond the HF folder; collective."""

    def load_state(self, folder: Path) -> None: ...


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

    def forward_backward(self, batch: PackedBatch, objective: Objective, sync: bool) -> float:
        with self._sync_context(sync):
            with self._autocast():
                loss_sum = self.module(batch)
            objective(loss_sum).backward()
        return float(loss_sum.detach())

    def parameters(self) -> Iterator[nn.Parameter]:
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
        self.optimizer.zero_grad(set_to_none=True)
        return norm, applied

    def hf_state_dict(self) -> dict[str, torch.Tensor] | None:
        return self.model.state_dict() if self.dims.is_main else None

    def save_state(self, folder: Path, weights_saved_exactly: bool) -> None:
        if not self.dims.is_main:
            return
        if not weights_saved_exactly:
            master = {k: v.detach().contiguous() for k, v in self.model.state_dict().items()}
            save_file(master, str(folder / "master_weights.safetensors"))
        torch.save(self.optimizer.state_dict(), folder / "optimizer.pt")

    def load_state(self, folder: Path) -> None:
        master = folder / "master_weights.safetensors"
        weights = load_file(str(master if master.exists() else folder / "hf" / "model.safetensors"))
        missing, unexpected = self.model.load_state_dict(
            {k: v.to(torch.float32) for k, v in weights.items()}, strict=False
        )
        tied = set(getattr(self.model, "_tied_weights_keys", None) or [])
        if unexpected or set(missing) - tied:
            raise ValueError(f"{folder}: weights do not match the model (missing {missing[:3]})")
        self.optimizer.load_state_dict(torch.load(folder / "optimizer.pt", weights_only=False))
