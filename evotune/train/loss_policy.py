"""How a step's micro-batch losses become one objective ('pack' or 'token').

The policy turns each micro-batch's trainable-token count into the weight of its
loss sum. Engines guarantee that every parameter's gradient is the SUM over all
ranks of the gradients of ``weight * loss_sum + aux_weight * aux_loss``, so the
weights alone decide what a step optimises, whatever the layout:

* 'pack' (InternEvo): the mean over data-parallel replicas and micro-batches of
  each micro-batch's token mean; weight = 1 / (trainable * micro_batches * dp).
* 'token': one token mean over every trainable label of the step, on every
  replica; weight = 1 / (trainable tokens of the whole step).

Under sequence parallelism every rank of a group holds a slice of the same row
and a partial loss sum; the counts describe the whole row, so the partial sums
add up to the row's loss over the group. The logged loss is the objective itself:
the sum over ranks of the weighted loss sums (docs/training.md, "Loss").
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import get_args, get_type_hints

from ..config import TrainConfig
from ..parallel.dims import ParallelDims


@dataclass(frozen=True)
class StepWeights:
    loss: list[float]  # per micro-batch: weight of its loss sum
    aux: float  # weight of each micro-batch's auxiliary (router) loss


@dataclass(frozen=True)
class LossPolicy:
    reduction: str
    dims: ParallelDims

    def __post_init__(self) -> None:
        choices = get_args(get_type_hints(TrainConfig)["loss_reduction"])
        if self.reduction not in choices:
            raise ValueError(f"loss_reduction={self.reduction!r}: one of {choices}")

    def weights(self, trainable: list[int]) -> StepWeights:
        """Weights for this rank's micro-batches, given their whole-row trainable counts."""
        count = len(trainable)
        dp = self.dims.dp_size
        # auxiliary (router) losses are per-row terms averaged over the step's rows, as the
        # HF Trainer averages over accumulation and data parallelism; under SP each rank
        # returns its 1/sp share of the row's term (evotune.model.families), so they add up
        aux = 1.0 / (count * dp)
        if self.reduction == "pack":
            return StepWeights([1.0 / (max(n, 1) * count * dp) for n in trainable], aux)
        _, (step_trainable,) = self.dims.sum_step([], [float(sum(trainable))])
        return StepWeights([1.0 / max(step_trainable, 1.0)] * count, aux)
