"""Tiny models and folders for tests (built from a config; no downloads)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from ftdp_factory import random_samples, write_shard
from transformers import LlamaConfig, LlamaForCausalLM

VOCAB = 128


def tiny_llama_config(**overrides) -> LlamaConfig:
    values = dict(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=False,
    )
    values.update(overrides)
    return LlamaConfig(**values)


def save_tiny_llama(folder: Path, seed: int = 0, **overrides) -> Path:
    torch.manual_seed(seed)
    model = LlamaForCausalLM(tiny_llama_config(**overrides))
    model.save_pretrained(folder)
    return folder


def write_corpus(
    folder: Path, seed: int = 0, shards: int = 3, samples: int = 40, vocab: int = VOCAB
) -> Path:
    rng = np.random.default_rng(seed)
    for index in range(shards):
        kind = "cn" if index % 2 else "en"
        write_shard(
            folder / kind / f"set{index}" / f"part{index}.bin",
            random_samples(rng, samples, vocab, low=3, high=60),
        )
    return folder


def write_config(path: Path, model: Path, data: Path, **settings) -> Path:
    values = dict(
        pretrained_model_name_or_path=str(model),
        dataset_folder=str(data),
        max_length=64,
        batch_size=1,
        accumulative_counts=2,
        total_steps=4,
        lr=1e-3,
        warmup_ratio=0.0,
        save_steps=1000,
        seed=0,
    )
    values.update(settings)
    body = "\n".join(f"{key} = {value!r}" for key, value in values.items())
    path.write_text(body + "\n")
    return path
