"""The step objective against a hand computation (docs/training.md#loss)."""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F
from tiny import save_tiny_llama, write_config, write_corpus
from transformers import LlamaForCausalLM

from evotune.config import load_config
from evotune.train.trainer import Trainer


def _hand_gradients(model_dir, micro_batches, reduction):
    model = LlamaForCausalLM.from_pretrained(model_dir)
    sums, counts = [], []
    for batch in micro_batches:
        # independent path: full logits, per-segment positions, native eager attention
        logits = []
        bounds = batch.cu_seqlens.tolist()
        for start, end in itertools.pairwise(bounds):
            logits.append(model(input_ids=batch.input_ids[:, start:end], use_cache=False).logits[0])
        logits = torch.cat(logits).float()
        labels = batch.labels[0]
        sums.append(F.cross_entropy(logits, labels, ignore_index=-100, reduction="sum"))
        counts.append(int((labels != -100).sum()))
    if reduction == "pack":
        objective = sum(s / n for s, n in zip(sums, counts, strict=True)) / len(sums)
    else:
        objective = sum(sums) / sum(counts)
    objective.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters()}, float(objective)


@pytest.mark.integration
@pytest.mark.parametrize("reduction", ["pack", "token"])
def test_step_objective_matches_hand_computation(tmp_path, reduction):
    model_dir = save_tiny_llama(tmp_path / "model")
    data = write_corpus(tmp_path / "data", samples=30)
    config = write_config(
        tmp_path / "cfg.py",
        model_dir,
        data,
        accumulative_counts=3,
        loss_reduction=reduction,
        max_norm=0.0,
    )
    trainer = Trainer(load_config(config), tmp_path / "work", show_progress=False)
    stream = trainer.micro_batches()
    chunk = [next(stream) for _ in range(3)]
    micro_batches = [batch for batch, _ in chunk]
    counts = [b.num_trainable for b in micro_batches]
    assert len(set(counts)) > 1  # unequal trainable tokens make the reductions differ

    captured = {}
    real_update = trainer.engine.update

    def observe(lr, max_norm, loss_is_finite):
        captured.update({n: p.grad.clone() for n, p in trainer.model.named_parameters()})
        return real_update(lr, max_norm, loss_is_finite)

    trainer.engine.update = observe
    step = trainer.train_step(micro_batches, chunk[-1][1])
    expected, expected_loss = _hand_gradients(model_dir, micro_batches, reduction)
    assert step.loss == pytest.approx(expected_loss, rel=1e-5)
    for name, grad in expected.items():
        torch.testing.assert_close(captured[name], grad, rtol=1e-4, atol=1e-6, msg=name)
