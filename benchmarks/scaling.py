"""Throughput of 1 vs 2 processes and peak memory per rank of DDP vs ZeRO 1/2/3.

Every run trains the demo config through the real CLI (torchrun for 2 processes)
with the same global batch; figures are medians over the steps after warm-up.
Prints one JSON object; ratios are against the 1-process run (throughput) and the
DDP run (memory), all measured in this invocation.

    python benchmarks/scaling.py [--steps 30] [--config configs/demo.py]
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _port() -> str:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return str(probe.getsockname()[1])


def run(
    config: str, work: Path, nproc: int, accumulative_counts: int, steps: int, extra: list[str]
) -> dict:
    env = dict(os.environ, NPROC_PER_NODE=str(nproc), PORT=_port())
    command = [
        sys.executable,
        "-m",
        "evotune.cli",
        "train",
        config,
        "--work-dir",
        str(work),
        "--no-progress",
        *extra,
        "--cfg-options",
        f"total_steps={steps}",
        f"accumulative_counts={accumulative_counts}",
        f"save_steps={steps * 10}",
    ]
    completed = subprocess.run(command, env=env, capture_output=True, text=True)
    if completed.returncode:
        raise RuntimeError(completed.stderr[-2000:])
    rows = [json.loads(line) for line in (work / "metrics.jsonl").read_text().splitlines()]
    steady = rows[min(5, len(rows) - 1) :]
    return {
        "tokens_per_s": statistics.median(r["tokens_per_s"] for r in steady),
        "step_time_s": statistics.median(r["step_time_s"] for r in steady),
        "peak_memory_mib_rank0": max(r["peak_memory_mib"] for r in rows),
        "final_loss": rows[-1]["loss"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--config", default=str(ROOT / "configs" / "demo.py"))
    args = parser.parse_args()
    results = {}
    with tempfile.TemporaryDirectory() as scratch:
        layouts = {
            "1proc": (1, 2, []),
            "2proc_ddp": (2, 1, []),
            "2proc_zero1": (2, 1, ["--deepspeed", "deepspeed_zero1"]),
            "2proc_zero2": (2, 1, ["--deepspeed", "deepspeed_zero2"]),
            "2proc_zero3": (2, 1, ["--deepspeed", "deepspeed_zero3"]),
        }
        for name, (nproc, accumulation, extra) in layouts.items():
            results[name] = run(
                args.config, Path(scratch) / name, nproc, accumulation, args.steps, extra
            )
    base, ddp = results["1proc"], results["2proc_ddp"]
    print(
        json.dumps(
            {
                "config": args.config,
                "runs": results,
                "throughput_ratio_vs_1proc": {
                    k: v["tokens_per_s"] / base["tokens_per_s"] for k, v in results.items()
                },
                "memory_ratio_vs_ddp": {
                    k: v["peak_memory_mib_rank0"] / ddp["peak_memory_mib_rank0"]
                    for k, v in results.items()
                    if k != "1proc"
                },
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
