"""The FSDP2 engine on CPU (gloo) against the single-process run, and its exact resume.

Same global batch (dp x accumulative_counts packs) and seed as the plain single
process: per-step losses and pre-clip gradient norms within 1e-5 relative, final
weights within 2e-5 absolute (fp32 sums reduced in another order differ by a few
ulps per step), for FSDP2 over 2 data-parallel ranks, and for SP=2 (one
data-parallel rank of two SP ranks) with activation checkpointing and CPU offload
composed in one run (every part must be exact for it to match). The model ties its
LM head to the embeddings: the meta-device build, the weights sent from rank 0 and
the streamed HF folder must all keep the tie. Resuming is in test_elastic_resume.py.
"""

from __future__ import annotations

import json

import pytest
import torch
from runner import final_weights, records, run_train
from tiny import save_tiny_llama, write_config, write_corpus
from transformers import GenerationConfig

from evotune.train.checkpoint import complete_checkpoints

STEPS = 6


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("fsdp")
    model = save_tiny_llama(root / "model", tie_word_embeddings=True)  # a tied LM head
    # generation defaults of their own, which the saved HF folders must keep
    GenerationConfig(
        eos_token_id=[2, 5], do_sample=True, temperature=0.7, top_p=0.8
    ).save_pretrained(model)
    data = write_corpus(root / "data", shards=3, samples=60)
    return root, model, data


def _config(root, name, model, data, **settings):
    return write_config(root / f"{name}.py", model, data, total_steps=STEPS, **settings)


@pytest.fixture(scope="module")
def single(setup):
    """The reference: one process, the torch engine, 2 micro-batches per step."""
    root, model, data = setup
    config = _config(root, "single", model, data, accumulative_counts=2)
    result = run_train(config, root / "single")
    assert result.returncode == 0, result.stderr[-3000:]
    return root / "single"


def _compare(reference, other):
    expected, got = records(reference), records(other)
    for field in ("loss", "grad_norm"):
        torch.testing.assert_close(
            torch.tensor([r[field] for r in got]),
            torch.tensor([r[field] for r in expected]),
            rtol=1e-5,
            atol=1e-6,
            msg=field,
        )
    reference_weights, weights = final_weights(reference), final_weights(other)
    assert reference_weights.keys() == weights.keys()
    for name in reference_weights:
        torch.testing.assert_close(
            weights[name], reference_weights[name], rtol=0, atol=2e-5, msg=name
        )


@pytest.mark.integration
def test_two_processes_match_one(setup, single):
    """FSDP2 over 2 processes, 1 micro-batch each per step: the same global batch."""
    root, model, data = setup
    config = _config(root, "fsdp2", model, data, accumulative_counts=1)
    result = run_train(config, root / "fsdp2", "--fsdp", nproc=2)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "layout: world 2 = dp 2 x sp 1; engine fsdp2" in result.stderr
    # built on the meta device and sharded before any weight was read; rank 0 sent them
    assert (
        "fsdp2: parameters built on the meta device; their shards come from rank 0" in result.stderr
    )
    _compare(single, root / "fsdp2")
    expected, got = (
        json.loads((complete_checkpoints(work)[-1] / "hf" / "generation_config.json").read_text())
        for work in (single, root / "fsdp2")
    )
    assert got == expected and got["eos_token_id"] == [2, 5] and got["temperature"] == 0.7
    # every rank wrote its own shards; nothing of the resume state was gathered
    saved = complete_checkpoints(root / "fsdp2")[-1] / "fsdp"
    assert sorted(p.name for p in saved.glob("*.distcp")) == ["__0_0.distcp", "__1_0.distcp"]


@pytest.mark.integration
def test_sequence_parallel_checkpointing_offload_match_one_process(setup, single):
    """SP=2 (one data-parallel rank), activation checkpointing and CPU offload together."""
    root, model, data = setup
    config = _config(
        root,
        "composed",
        model,
        data,
        accumulative_counts=2,
        sequence_parallel_size=2,
        gradient_checkpointing=True,
        engine="fsdp2_offload",
    )
    result = run_train(config, root / "composed", nproc=2)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "layout: world 2 = dp 1 x sp 2; engine fsdp2" in result.stderr
    _compare(single, root / "composed")


def test_fsdp_and_deepspeed_together_are_refused():
    from evotune.config import TrainConfig
    from evotune.errors import ConfigError
    from evotune.parallel.dims import ParallelDims
    from evotune.parallel.fsdp_engine import prepare_fsdp

    settings = TrainConfig(engine="fsdp2", deepspeed="deepspeed_zero3")
    with pytest.raises(ConfigError, match="drop --deepspeed or --fsdp"):
        prepare_fsdp(settings, ParallelDims())
