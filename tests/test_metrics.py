"""FLOPs behind MFU and HFU: the model's work once, plus what checkpointing recomputes."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from tiny import tiny_llama_config

from evotune.train.metrics import recomputed_fraction, transformer_flops


def _settings(checkpointing: bool, every: int = 1, policy: str = "full") -> SimpleNamespace:
    return SimpleNamespace(
        gradient_checkpointing=checkpointing,
        activation_checkpointing_every=every,
        activation_checkpointing_policy=policy,
    )


@pytest.mark.parametrize(
    "settings, expected",
    [
        (_settings(False), 0.0),
        (_settings(True), 1.0),
        (_settings(True, every=2), 3 / 5),  # layers 0, 2, 4 of 5
        (_settings(True, policy="save_matmuls"), 0.0),
    ],
)
def test_recomputed_share_of_the_forward(settings, expected):
    assert recomputed_fraction(settings, num_layers=5) == pytest.approx(expected)


def test_hfu_flops_add_the_recomputed_forward():
    config = tiny_llama_config()
    lengths = [5, 17, 42]
    model = transformer_flops(config, lengths)
    forward = model / 3
    assert transformer_flops(config, lengths, 1.0) == pytest.approx(4 * forward)
    assert transformer_flops(config, lengths, 0.5) == pytest.approx(3.5 * forward)
    # each segment's own causal attention: one 64-token segment costs more than two of 32
    assert transformer_flops(config, [64]) > transformer_flops(config, [32, 32])
