"""DeepSpeed ZeRO 1/2/3 behind the engine seam.

The trainer keeps the loop: it marks the accumulation boundary itself (so a
short last step is exact), scales the loss itself (scale_wrt_gas=False) and
sets the learning rate from its closed form before each update. DeepSpeed keeps
fp32 master weights and optimizer state, partitioned across data-parallel ranks.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from importlib import resources
from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedModel

from ..config import ConfigError, TrainConfig
from ..data.collate import PackedBatch
from ..model.layers import weight_groups
from ..model.loss import PackedLoss
from .dims import ParallelDims
from .engine import EngineBase, PackedLossModule, host_copies, optimizer_param_groups
from .sequence import SequenceParallel

PRESETS = (
    "deepspeed_zero1",
    "deepspeed_zero2",
    "deepspeed_zero2_offload",
    "deepspeed_zero3",
    "deepspeed_zero3_offload",
)


def load_deepspeed_config(
    name_or_path: str, settings: TrainConfig, dims: ParallelDims
) -> dict[str, Any]:
    """A preset name or a JSON file, with every "auto" filled from the config."""
    if name_or_path in PRESETS:
        text = resources.files("evotune.presets").joinpath(f"{name_or_path}.json").read_text()
        source = name_or_path
    else:
        path = Path(name_or_path)
        if not path.is_file():
            raise ConfigError(
                f"--deepspeed {name_or_path}: not a preset ({', '.join(PRESETS)}) nor a JSON file"
            )
        text, source = path.read_text(), str(path)
    try:
        config = json.loads(text)
    except json.JSONDecodeError as error:
        raise ConfigError(f"--deepspeed {source}: invalid JSON ({error})") from None
    bf16 = settings.dtype == "bfloat16"
    ignored = {
        "optimizer": "evotune builds AdamW from lr, betas, eps, weight_decay, weight_decay_scope",
        "scheduler": "evotune sets the learning rate from lr_schedule, warmup_ratio, eta_min",
    }
    present = [key for key in ignored if key in config]
    if present:
        reasons = "; ".join(f'"{key}": {ignored[key]}' for key in present)
        raise ConfigError(
            f"--deepspeed {source}: section(s) {', '.join(present)} would not be used "
            f"({reasons}); remove them and set those evotune settings in the config"
        )
    filled = {
        "gradient_accumulation_steps": settings.accumulative_counts,
        "train_micro_batch_size_per_gpu": 1,  # one flattened varlen row per micro-batch
        "gradient_clipping": settings.max_norm,
    }
    for key, value in filled.items():
        if config.get(key, "auto") == "auto":
            config[key] = value
        elif config[key] != value:
            raise ConfigError(
                f"--deepspeed {source}: {key}={config[key]} contradicts the config ({value}); "
                'set it to "auto"'
            )
    # A global batch in rows: data-parallel ranks x micro-batches x one row each
    global_batch = dims.dp_size * settings.accumulative_counts * 1
    if config.get("train_batch_size", "auto") not in ("auto", global_batch):
        raise ConfigError(
            f"--deepspeed {source}: train_batch_size={config['train_batch_size']} contradicts "
            f"the run ({dims.dp_size} data-parallel ranks x accumulative_counts="
            f'{settings.accumulative_counts} x 1 row = {global_batch}); set it to "auto"'
        )
    # DeepSpeed averages gradients over every rank, sequence-parallel ones included (the
    # trainer's loss scaling assumes exactly that), so it derives train_batch_size itself
    config.pop("train_batch_size", None)
    for precision, enabled in (("bf16", bf16), ("fp16", False)):
        section = config.setdefault(precision, {})
        if section.get("enabled", "auto") == "auto":
            section["enabled"] = enabled
    if config["fp16"]["enabled"]:
        raise ConfigError(f"--deepspeed {source}: fp16 is not supported; use dtype='bfloat16'")
    if config["bf16"]["enabled"] != bf16:
        raise ConfigError(
            f"--deepspeed {source}: bf16.enabled={config['bf16']['enabled']} contradicts "
            f'dtype={settings.dtype!r}; set it to "auto"'
        )
    if dims.device.type == "cpu":
        # overlap_comm needs CUDA streams; offloaded pinned memory needs CUDA
        zero = config.setdefault("zero_optimization", {})
        zero["overlap_comm"] = False
        for key in ("offload_optimizer", "offload_param"):
            if key in zero:
                zero[key]["pin_memory"] = False
    return config


def zero_stage(config: dict[str, Any]) -> int:
    return int(config.get("zero_optimization", {}).get("stage", 0))


class DeepSpeedEngine(EngineBase):
    """ZeRO 1/2/3; DeepSpeed averages gradients over every rank (SP ranks included)."""

    partitioned = True  # optimizer (and parameter) state split over every rank

    def __init__(
        self,
        model: PreTrainedModel,
        dims: ParallelDims,
        config: dict[str, Any],
        settings: TrainConfig,
        sequence_parallel: SequenceParallel | None = None,
    ):
        import deepspeed

        super().__init__(model, dims, sequence_parallel, gradient_scale=float(dims.world_size))
        self.name = str(settings.deepspeed)
        self.config = config
        self.stage = zero_stage(config)
        groups = optimizer_param_groups(model, settings.weight_decay, settings.weight_decay_scope)
        zero = config.get("zero_optimization", {})
        if "offload_optimizer" in zero:
            from deepspeed.ops.adam import DeepSpeedCPUAdam

            optimizer = DeepSpeedCPUAdam(
                groups, lr=settings.lr, betas=settings.betas, eps=settings.eps, adamw_mode=True
            )
        else:
            optimizer = torch.optim.AdamW(
                groups, lr=settings.lr, betas=settings.betas, eps=settings.eps
            )
        module = PackedLossModule(model, settings.loss_chunk_size, sequence_parallel)
        self.engine, self.optimizer, _, _ = deepspeed.initialize(
            model=module, optimizer=optimizer, config=config, dist_init_required=False
        )

    def forward_backward(
        self, batch: PackedBatch, weight: float, aux_weight: float, sync: bool
    ) -> PackedLoss:
        self.engine.set_gradient_accumulation_boundary(sync)
        parts = self.engine(self._local(batch))
        self.engine.backward(self._objective(parts, weight, aux_weight), scale_wrt_gas=False)
        return self._detached(parts)

    def update(self, lr: float, max_norm: float, loss_is_finite: bool) -> tuple[float, bool]:
        """DeepSpeed clips inside step() (gradient_clipping) and reports the pre-clip norm."""
        if not loss_is_finite:
            self.engine.optimizer.zero_grad()
            return float("nan"), False
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.engine.set_gradient_accumulation_boundary(True)
        self.engine.step()
        norm = self.engine.get_global_grad_norm()
        norm = float(norm) if norm is not None else float("nan")
        return norm, self.engine.was_step_applied()

    def hf_weight_groups(self, dtype: torch.dtype) -> Iterator[dict[str, torch.Tensor]]:
        """Under ZeRO-3 one decoder layer's parameters are gathered at a time and copied
        to the main rank's host memory; no device ever holds the whole model."""
        if self.stage < 3:  # a full replica on every rank
            yield from super().hf_weight_groups(dtype)
            return
        import deepspeed

        for group in weight_groups(self.model):
            partitioned = [tensor for tensor in group.values() if hasattr(tensor, "ds_id")]
            with deepspeed.zero.GatheredParameters(partitioned, modifier_rank=None):
                copies = host_copies(group, dtype) if self.dims.is_main else {}
            yield copies

    def save_state(self, folder: Path, weights_saved_exactly: bool) -> None:
        self.engine.save_checkpoint(str(folder / "deepspeed"), tag="state", save_latest=False)

    def load_state(self, folder: Path) -> None:
        self.engine.load_checkpoint(
            str(folder / "deepspeed"),
            tag="state",
            load_optimizer_states=True,
            load_lr_scheduler_states=False,
        )
