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

* TorchEngine: one process, or DistributedDataParallel over all ranks; fp32
  master weights, bfloat16 under autocast.
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

    def hf_state_dict(self) -> dict[str, torch.Tensor] | None:
        """Full model weights on the main rank (None elsewhere); collective."""

    def save_state(self, folder: Path, weights_saved_exactly: bool) -> None:
        """Everything an exact resume needs beyond the HF folder; collective."""

    def load_state(self, folder: Path) -> None: ...


class EngineBase:
    """What every engine shares: SP slicing, device placement, the objective."""

    name = "torch"

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
        return PackedLoss(parts.loss_sum.detach().float(), aux)


class TorchEngine(EngineBase):
    """Single process or DDP; fp32 master weights and optimizer, optional bf16 autocast."""

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
    ):
        super().__init__(model, dims, sequence_parallel, gradient_scale=float(dims.world_size))
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

    def forward_backward(
        self, batch: PackedBatch, weight: float, aux_weight: float, sync: bool
    ) -> PackedLoss:
        with self._sync_context(sync):
            with self._autocast():
                parts = self.module(self._local(batch))
            self._objective(parts, weight, aux_weight).backward()
        return self._detached(parts)

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
        weights_file = master if master.exists() else folder / "hf" / "model.safetensors"
        weights = _load_named(weights_file, lambda path: load_file(str(path)))
        missing, unexpected = self.model.load_state_dict(
            {k: v.to(torch.float32) for k, v in weights.items()}, strict=False
        )
        tied = set(getattr(self.model, "_tied_weights_keys", None) or [])
        if unexpected or set(missing) - tied:
            raise ConfigError(
                f"{weights_file}: weights do not match the model (missing {missing[:3]}, "
                f"unexpected {unexpected[:3]}); resume with the model the run started from"
            )
        state = _load_named(
            folder / "optimizer.pt", lambda path: torch.load(path, weights_only=True)
        )
        self.optimizer.load_state_dict(state)


def _load_named(path: Path, load: Any) -> Any:
    """Load a checkpoint file; any failure names the file (a truncated write, say)."""
    try:
        return load(path)
    except Exception as error:
        raise ConfigError(
            f"{path}: cannot be read ({type(error).__name__}: {error}); the checkpoint is "
            "damaged: resume from an earlier one"
        ) from None
