"""TorchEngine precision modes on CPU: fp32, bf16 parameters + fp32 masters, bf16 autocast.

One optimizer step (forward, backward, clip, AdamW) of a Llama (hidden 256, 4 layers,
vocab 32k) on one packed SFT-like row, each mode in the same process, interleaved
rounds, medians and per-round ratios. The CPU's bf16 matmuls (oneDNN, AVX512-BF16
here) decide the bf16 figures; a GPU is not measured by this script.

    OMP_NUM_THREADS=1 python benchmarks/precision_cpu.py --out benchmarks/results/precision_cpu.json
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import sys
import time
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from evotune.data import PackedBatch
from evotune.model.attention import attention_name, register_attention
from evotune.parallel.dims import ParallelDims
from evotune.parallel.engine import TorchEngine

sys.path.insert(0, str(Path(__file__).resolve().parent))
from fused_loss import packed_row

MODES = {
    "fp32": {"autocast_dtype": None},
    "bf16_params": {"autocast_dtype": None, "param_dtype": torch.bfloat16},
    "autocast": {"autocast_dtype": torch.bfloat16},
}


def build(mode: str, args: argparse.Namespace) -> TorchEngine:
    register_attention()
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        intermediate_size=4 * args.hidden,
        num_hidden_layers=args.layers,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=args.tokens,
        tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(config)
    model.config._attn_implementation = attention_name("sdpa")
    return TorchEngine(
        model.train(),
        ParallelDims(),
        lr=1e-4,
        betas=(0.9, 0.95),
        eps=1e-8,
        weight_decay=0.01,
        weight_decay_scope="all",
        chunk_size=4096,
        **MODES[mode],
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    ids, labels, positions, bounds = packed_row(args.tokens, args.vocab, 0.4)
    cu = torch.tensor(bounds, dtype=torch.int32)
    batch = PackedBatch(
        ids[None],
        labels[None],
        positions[None],
        cu,
        max(b - a for a, b in itertools.pairwise(bounds)),
        torch.zeros_like(ids[None]),
        1,
    )
    weight = 1.0 / int((labels != -100).sum())
    engines = {mode: build(mode, args) for mode in MODES}
    losses: dict[str, list[float]] = {mode: [] for mode in MODES}

    def step(mode: str) -> float:
        engine = engines[mode]
        started = time.perf_counter()
        parts = engine.forward_backward(batch, weight, 0.0, sync=True)
        engine.update(1e-4, 1.0, True)
        losses[mode].append(float(parts.loss_sum) * weight)
        return time.perf_counter() - started

    for mode in MODES:  # warm-up
        step(mode)
    times: dict[str, list[float]] = {mode: [] for mode in MODES}
    for _ in range(args.rounds):
        for mode in MODES:
            times[mode].append(step(mode))
    report: dict[str, object] = {
        "what": "one optimizer step per precision mode, CPU, same process, interleaved rounds",
        "settings": vars(args) | {"out": str(args.out)},
        "torch": torch.__version__,
        "gpu": "not measured (no device in this session)",
    }
    for mode in MODES:
        report[mode] = {
            "median_step_s": statistics.median(times[mode]),
            "all_s": times[mode],
            "losses": losses[mode],
        }
    for mode in ("bf16_params", "autocast"):
        ratios = [f / m for f, m in zip(times["fp32"], times[mode], strict=True)]
        report[f"speedup_{mode}_vs_fp32"] = statistics.median(ratios)
    ratios = [a / p for a, p in zip(times["autocast"], times["bf16_params"], strict=True)]
    report["speedup_bf16_params_vs_autocast"] = statistics.median(ratios)
    text = json.dumps(report, indent=2)
    print(text)
    if args.out is not None:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
