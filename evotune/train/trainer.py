"""The Trainer: builds the parts in data-flow order, then runs one explicit loop.

config -> ParallelDims -> tokenizer -> dataset -> sampler -> collate -> model + engine
       -> for each optimizer step: lr -> weights -> forward/backward -> one reduction
          -> update -> stats -> log, save

Each concern has its own room: inputs.py (data), parallelize.py (model and engine),
loss_policy.py (what a step optimises), checkpoint_manager.py (saving and
resuming), metrics.py (records and the console). The loop below only sequences them.
"""

from __future__ import annotations

import itertools
import logging
import math
import random
import signal
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..config import LoadedConfig, TrainConfig
from ..data import PackedBatch
from ..errors import DataError
from ..model.load import check_model_source
from ..parallel.dims import ParallelDims
from ..parallel.parallelize import build_engine
from . import inputs
from .checkpoint_manager import CheckpointManager
from .evaluation import TypeLosses, Validation
from .faults import FaultInjectingEngine, Faults
from .generation import SampleGenerations
from .loss_policy import LossPolicy
from .metrics import RunLogger, log_start_banner, recomputed_fraction
from .reporters import Reporters, resolve_report_to
from .state import DataPosition, TrainingError, TrainState
from .stopping import Preempted, StopRequest

logger = logging.getLogger("evotune")

__all__ = ["StepResult", "TrainResult", "Trainer", "TrainingError"]


@dataclass
class TrainResult:
    steps: int
    losses: list[float] = field(default_factory=list)
    last_checkpoint: Path | None = None


@dataclass
class StepResult:
    loss: float  # the objective the step optimised (over all ranks)
    aux_loss: float | None
    lr: float
    grad_norm: float
    applied: bool
    tokens: int  # whole rows of the step, every data-parallel replica
    trainable: int
    position: DataPosition  # where the data stream stands after this step
    stop_requested: bool = False  # some rank received a stop signal
    # data type -> (token mean loss, trainable tokens) over the step, every rank
    loss_by_type: dict[str, tuple[float, int]] = field(default_factory=dict)


class Trainer:
    def __init__(
        self,
        loaded: LoadedConfig,
        work_dir: Path,
        dims: ParallelDims | None = None,
        resume: str | None = None,
        show_progress: bool = True,
        stop: StopRequest | None = None,
    ):
        self.loaded = loaded
        self.stop = stop or StopRequest()
        self.settings: TrainConfig = loaded.settings
        s = self.settings
        self.work_dir = work_dir
        self.work_dir.mkdir(parents=True, exist_ok=True)
        self.dims = dims or ParallelDims()
        self.show_progress = show_progress
        _seed_everything(s.seed)

        check_model_source(s.pretrained_model_name_or_path)  # the root cause comes first
        self.tokenizer = inputs.load_tokenizer(s)
        self.dataset = inputs.build_dataset(s)
        source = str(loaded.source)  # validation, generations, reporters: checked before the model
        self.validation = Validation.build(s, self.dims, source)
        self.generations = SampleGenerations.build(s, self.dims, self.tokenizer, work_dir, source)
        resolve_report_to(s.report_to, source)
        self.sampler = inputs.build_sampler(s, self.dataset, self.dims)
        self.collator = inputs.build_collator(s, self.dataset)
        self.model, self.engine = build_engine(s, self.dims, resuming=resume is not None)
        inputs.check_model_fits_data(self.model.config, self.dataset, self.tokenizer)
        inputs.check_tokenizer_provenance(self.dataset, self.tokenizer)
        self.total_steps = inputs.plan_total_steps(s, self.dataset, self.sampler, self.dims)
        self.schedule = inputs.build_schedule(s, self.sampler, self.total_steps)
        self.loss_policy = LossPolicy(s.loss_reduction, self.dims)
        self.state = TrainState()
        faults = Faults.from_environment()
        if faults is not None:
            self.engine = FaultInjectingEngine(self.engine, faults, lambda: self.state.step)
        self.checkpoints = CheckpointManager(
            work_dir,
            self.dims,
            self.engine,
            self.model,
            self.tokenizer,
            loaded,
            self.dataset,
            self.sampler,
            self.total_steps,
        )
        if resume is not None:
            self.state = self.checkpoints.resume(Path(resume))

    # -- the loop ----------------------------------------------------------------------

    def train(self) -> TrainResult:
        s = self.settings
        result = TrainResult(steps=self.total_steps)
        if self.dims.is_main:
            log_start_banner(
                self.settings,
                self.dims,
                self.dataset,
                self.tokenizer,
                self.sampler,
                engine=self.engine.name,
                total_steps=self.total_steps,
                start_step=self.state.step,
                validation=None if self.validation is None else self.validation.describe(),
            )
        run_logger = RunLogger(
            self.work_dir,
            self.dims,
            self.model.config,
            self.total_steps,
            self.state.step,
            s.log_interval,
            recomputed_fraction(s, self.model.config.num_hidden_layers),
            self.show_progress,
            Reporters.build(s, self.work_dir, self.dims.is_main, self.state.step),
        )
        stream = self.micro_batches()
        try:
            if self.state.step == 0:
                self._watch(run_logger, last=False)  # answers of the untrained model
            while self.state.step < self.total_steps:
                chunk = self._next_micro_batches(stream, result)
                if not chunk:
                    break
                started = time.perf_counter()
                try:
                    step = self.train_step([batch for batch, _ in chunk], chunk[-1][1])
                except TrainingError:
                    # skipped steps never touched the weights: save the last good state
                    result.last_checkpoint = self.save_checkpoint()
                    raise
                record = run_logger.record(
                    self.state,
                    loss=step.loss,
                    aux_loss=step.aux_loss,
                    loss_by_type=step.loss_by_type,
                    lr=step.lr,
                    grad_norm=step.grad_norm,
                    applied=step.applied,
                    segment_lengths=[b.segment_lengths().tolist() for b, _ in chunk],
                    tokens=step.tokens,
                    trainable=step.trainable,
                    elapsed=time.perf_counter() - started,
                )
                run_logger.log(record)
                result.losses.append(step.loss)
                last = self.state.step >= self.total_steps
                if self.checkpoints.due(self.state.step, last) or step.stop_requested:
                    result.last_checkpoint = self.save_checkpoint()
                if step.stop_requested and not last:
                    raise Preempted(
                        self.stop.signal_number or signal.SIGTERM,
                        self.state.step,
                        result.last_checkpoint,
                    )
                self._watch(run_logger, last)
        finally:
            run_logger.close()
            inputs.report_bad_samples(self.dataset)
        return result

    def _watch(self, run_logger: RunLogger, last: bool) -> None:
        """Validation and sample generations due after this step; collective on all ranks."""
        step = self.state.step
        if self.validation is not None and self.validation.due(step, last):
            evaluated = self.validation.run(self.model, self.engine, step)
            run_logger.write(evaluated.record(step))
            if self.dims.is_main:
                logger.info("%s", evaluated.line(step))
        if self.generations is not None and self.generations.due(step, last):
            self.generations.run(self.model, self.engine, step)

    def _next_micro_batches(
        self, stream: Iterator[tuple[PackedBatch, DataPosition]], result: TrainResult
    ) -> list[tuple[PackedBatch, DataPosition]]:
        """The next step's micro-batches; a data error on any rank saves the last good state."""
        try:
            chunk, failure = list(itertools.islice(stream, self.settings.accumulative_counts)), None
        except DataError as error:
            chunk, failure = [], inputs.one_line_cause(error)
        for batch, _ in chunk:
            if batch.bad_samples:
                self.dataset.note_bad_samples(batch.bad_samples)
        failure = self.dims.first_failure(failure)
        if failure is not None:
            if self.state.step > 0:  # the weights are those of the last finished step
                result.last_checkpoint = self.save_checkpoint()
            raise DataError(failure)
        return chunk

    def micro_batches(self) -> Iterator[tuple[PackedBatch, DataPosition]]:
        return inputs.micro_batches(
            self.settings, self.dataset, self.sampler, self.collator, self.state.position
        )

    def train_step(self, micro_batches: list[PackedBatch], position: DataPosition) -> StepResult:
        """One optimizer step over this rank's micro-batches (fewer than usual at the end)."""
        s, state = self.settings, self.state
        lr = self.schedule(state.updates)
        trainable = [batch.num_trainable for batch in micro_batches]
        weights = self.loss_policy.weights(trainable)
        last = len(micro_batches) - 1
        objective: Any = 0.0  # summed on the device: one host sync per step, below
        aux: Any = None
        by_type = TypeLosses(self.dataset.corpus.type_names, self.dims.device)
        for index, (batch, weight) in enumerate(zip(micro_batches, weights.loss, strict=True)):
            parts = self.engine.forward_backward(batch, weight, weights.aux, sync=index == last)
            objective = objective + parts.loss_sum.double() * weight
            if parts.token_losses is not None and parts.token_types is not None:
                by_type.add_typed(parts.token_losses, parts.token_types)
            if parts.aux_loss is not None:
                aux = (0.0 if aux is None else aux) + parts.aux_loss.double() * weights.aux
        rows = [float(sum(b.num_tokens for b in micro_batches)), float(sum(trainable))]
        stop = float(self.stop.requested)  # rides on the step's reduction: all ranks agree
        per_rank = [float(objective), stop] + ([] if aux is None else [float(aux)])
        per_type = by_type.flat()  # rides on the same reduction
        summed, (tokens, step_trainable) = self.dims.sum_step(per_rank + per_type, rows)
        loss = summed[0]
        grad_norm, applied = self.engine.update(lr, s.max_norm, math.isfinite(loss))
        state.advance(position, int(tokens), applied)
        if not applied:
            self._report_skip(loss, grad_norm)
        aux_loss = summed[2] if aux is not None else None
        return StepResult(
            loss,
            aux_loss,
            lr,
            grad_norm,
            applied,
            int(tokens),
            int(step_trainable),
            position,
            stop_requested=summed[1] > 0,
            loss_by_type=by_type.means(summed[len(per_rank) :]),
        )

    def _report_skip(self, loss: float, grad_norm: float) -> None:
        state, limit = self.state, self.settings.max_consecutive_skipped_steps
        logger.warning(
            "step %d: non-finite loss %s or grad norm %s; update skipped (%d in a row)",
            state.step,
            loss,
            grad_norm,
            state.consecutive_skips,
        )
        if state.consecutive_skips >= limit:
            raise TrainingError(
                f"{state.consecutive_skips} consecutive steps had a non-finite loss or gradient "
                f"norm (max_consecutive_skipped_steps={limit}); lower lr, check the data, or use "
                "float32"
            )

    # -- checkpoints -------------------------------------------------------------------

    def save_checkpoint(self) -> Path:
        return self.checkpoints.save(self.state)


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
