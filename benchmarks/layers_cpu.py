"""Activation checkpointing in steps and regional compile on CPU: step time and memory.

Each setting runs in its own process (so its peak memory is its own): a Llama (hidden
256, 4 layers, vocab 32k, fp32) trains on one packed SFT-like row; the process
reports its median step time (after warm-up and, when compiled, after compilation)
and the growth of its peak RSS over the first training step (activations held for
the backward, plus the gradients). Settings are interleaved over rounds; medians.

    OMP_NUM_THREADS=1 python benchmarks/layers_cpu.py --out benchmarks/results/layers_cpu.json
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

SETTINGS = {
    "no_checkpointing": {"checkpoint_every": None},
    "checkpoint_all_full": {"checkpoint_every": 1},
    "checkpoint_every_2": {"checkpoint_every": 2},
    "checkpoint_all_save_matmuls": {"checkpoint_every": 1, "policy": "save_matmuls"},
    "compile": {"checkpoint_every": None, "compile": True},
    "compile_checkpoint_all": {"checkpoint_every": 1, "compile": True},
}


def current_rss_mib() -> float:
    with open("/proc/self/statm") as handle:
        pages = int(handle.read().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def child(name: str, args: argparse.Namespace) -> dict[str, float]:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from evotune.data import PackedBatch
    from evotune.model.attention import attention_name, register_attention
    from evotune.model.loss import packed_loss
    from evotune.parallel.parallelize import prepare_decoder_layers

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from fused_loss import packed_row

    torch.set_num_threads(args.threads)
    register_attention()
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=32000,
        hidden_size=256,
        intermediate_size=1024,
        num_hidden_layers=4,
        num_attention_heads=4,
        max_position_embeddings=args.tokens,
        tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(config).train()
    model.config._attn_implementation = attention_name("sdpa")
    prepare_decoder_layers(model, **SETTINGS[name])
    ids, labels, positions, bounds = packed_row(args.tokens, 32000, 0.4)
    cu = torch.tensor(bounds, dtype=torch.int32)
    lengths = [b - a for a, b in itertools.pairwise(bounds)]
    batch = PackedBatch(
        ids[None], labels[None], positions[None], cu, max(lengths), torch.zeros_like(ids[None]), 1
    )

    def step() -> float:
        started = time.perf_counter()
        model.zero_grad(set_to_none=True)
        packed_loss(model, batch, 4096).loss_sum.backward()
        return time.perf_counter() - started

    before = current_rss_mib()
    first = step()  # includes compilation when compiled
    growth = peak_rss_mib() - before
    step()
    times = [step() for _ in range(args.steps)]
    return {
        "median_step_s": statistics.median(times),
        "first_step_s": first,
        "peak_rss_growth_mib": growth,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args)))
        return
    runs: dict[str, list[dict[str, float]]] = {name: [] for name in SETTINGS}
    for _ in range(args.rounds):
        for name in SETTINGS:
            command = [sys.executable, __file__, "--child", name, "--tokens", str(args.tokens)]
            command += ["--steps", str(args.steps), "--threads", str(args.threads)]
            env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
            output = subprocess.run(command, capture_output=True, text=True, env=env, check=True)
            runs[name].append(json.loads(output.stdout.strip().splitlines()[-1]))
    report: dict[str, object] = {
        "what": "per-layer activation checkpointing and regional compile, fp32 CPU, one row",
        "settings": vars(args) | {"out": str(args.out)},
        "memory": "growth of the process's peak RSS over the first step (MiB)",
    }
    base = runs["no_checkpointing"]
    for name, values in runs.items():
        report[name] = {
            "median_step_s": statistics.median(v["median_step_s"] for v in values),
            "median_peak_rss_growth_mib": statistics.median(
                v["peak_rss_growth_mib"] for v in values
            ),
            "first_step_s": statistics.median(v["first_step_s"] for v in values),
            "speed_vs_no_checkpointing": statistics.median(
                b["median_step_s"] / v["median_step_s"] for b, v in zip(base, values, strict=True)
            ),
        }
    text = json.dumps(report, indent=2)
    print(text)
    if args.out is not None:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
