"""The fused LM head + cross-entropy against the checkpointed chunks it replaced (CPU, fp32).

Two measurements, each as interleaved rounds in one process (medians, ratios per
round, so a busy machine slows both sides alike):

* ``loss``: the head + loss alone on one packed row (forward + backward of the loss
  sum w.r.t. the hidden states and the head's weight): checkpointed chunks; fused
  over every position; fused skipping positions without a target (the CPU default).
* ``step``: the whole forward + backward of a Llama (hidden 256, 4 layers, vocab 32k)
  on the same row, the base model then each loss path.

    OMP_NUM_THREADS=1 python benchmarks/fused_loss.py --out benchmarks/results/fused_loss_cpu.json
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from evotune.model.attention import AttentionMetadata, attention_name, register_attention
from evotune.model.loss import checkpointed_cross_entropy, fused_cross_entropy_sum


def packed_row(tokens: int, vocab: int, masked_fraction: float, seed: int = 0):
    """SFT-like segments (log-normal lengths, median ~300) with prompts masked."""
    rng = np.random.default_rng(seed)
    lengths: list[int] = []
    while sum(lengths) < tokens:
        lengths.append(int(np.clip(rng.lognormal(np.log(300), 0.8), 8, 2048)))
    lengths[-1] -= sum(lengths) - tokens
    lengths = [n for n in lengths if n > 0]
    ids = torch.from_numpy(rng.integers(3, vocab, tokens))
    labels = torch.roll(ids, -1).clone()
    start = 0
    for length in lengths:  # the first part of every sample is its prompt
        labels[start : start + int(length * masked_fraction)] = -100
        start += length
        labels[start - 1] = -100
    positions = torch.cat([torch.arange(n) for n in lengths])
    bounds = [0, *np.cumsum(lengths).tolist()]
    return ids, labels, positions, bounds


def timed(fn: Callable[[], None]) -> float:
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started


def rounds(candidates: dict[str, Callable[[], None]], count: int) -> dict[str, list[float]]:
    for fn in candidates.values():  # warm-up
        fn()
    times: dict[str, list[float]] = {name: [] for name in candidates}
    for _ in range(count):
        for name, fn in candidates.items():
            times[name].append(timed(fn))
    return times


def summarise(times: dict[str, list[float]], baseline: str) -> dict[str, object]:
    result: dict[str, object] = {
        name: {"median_s": statistics.median(values), "all_s": values}
        for name, values in times.items()
    }
    for name, values in times.items():
        if name != baseline:
            ratios = [b / v for b, v in zip(times[baseline], values, strict=True)]
            result[f"speedup_{name}_vs_{baseline}"] = statistics.median(ratios)
    return result


def loss_only(args: argparse.Namespace, labels: torch.Tensor) -> dict[str, object]:
    torch.manual_seed(0)
    head = torch.nn.Linear(args.hidden, args.vocab, bias=False)
    hidden = torch.randn(args.tokens, args.hidden, requires_grad=True)

    def run(loss_fn: Callable[[], torch.Tensor]) -> Callable[[], None]:
        def step() -> None:
            hidden.grad = None
            head.weight.grad = None
            loss_fn().backward()

        return step

    return summarise(
        rounds(
            {
                "checkpointed": run(
                    lambda: checkpointed_cross_entropy(hidden, head, labels, args.chunk)[0]
                ),
                "fused_all_rows": run(
                    lambda: fused_cross_entropy_sum(
                        hidden, head.weight, labels, args.chunk, skip_ignored=False
                    )
                ),
                "fused": run(
                    lambda: fused_cross_entropy_sum(hidden, head.weight, labels, args.chunk)
                ),
            },
            args.rounds,
        ),
        "checkpointed",
    )


def whole_step(args: argparse.Namespace, ids, labels, positions, bounds) -> dict[str, object]:
    register_attention()
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        intermediate_size=4 * args.hidden,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=args.tokens,
        tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(config)
    model.config._attn_implementation = attention_name("sdpa")
    metadata = AttentionMetadata("sdpa", bounds, "cpu")

    def run(loss_path: str) -> Callable[[], None]:
        def step() -> None:
            model.zero_grad(set_to_none=True)
            hidden = model.model(
                input_ids=ids[None],
                position_ids=positions[None],
                use_cache=False,
                attention_metadata=metadata,
            ).last_hidden_state[0]
            if loss_path == "checkpointed":
                loss = checkpointed_cross_entropy(hidden, model.lm_head, labels, args.chunk)[0]
            else:
                loss = fused_cross_entropy_sum(hidden, model.lm_head.weight, labels, args.chunk)
            loss.backward()

        return step

    return summarise(
        rounds({"checkpointed": run("checkpointed"), "fused": run("fused")}, args.rounds),
        "checkpointed",
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--chunk", type=int, default=4096)
    parser.add_argument("--masked", type=float, default=0.4, help="prompt share of each sample")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    ids, labels, positions, bounds = packed_row(args.tokens, args.vocab, args.masked)
    report = {
        "what": "fused LM head + CE vs checkpointed chunks, fp32 CPU, forward+backward",
        "settings": vars(args) | {"out": str(args.out)},
        "trainable_fraction": float((labels != -100).float().mean()),
        "torch": torch.__version__,
        "machine": platform.processor() or platform.machine(),
        "loss_only": loss_only(args, labels),
        "whole_step": whole_step(args, ids, labels, positions, bounds),
    }
    text = json.dumps(report, indent=2)
    print(text)
    if args.out is not None:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
