"""Step time and peak memory per rank for one long packed row at sp=1 and sp=2.

A Llama-style model (hidden 256, 4 layers, 8 heads / 2 KV heads) trains one step
(forward + backward) on a row of --length tokens made of --segment-length
segments. sp=1 runs in one process, sp=2 in two processes under torchrun, both
in this invocation; memory is torch's peak allocation on GPU and the growth of
peak RSS during the step on CPU. Prints JSON with sp2/sp1 ratios.

    python benchmarks/sequence_parallel.py [--length 16384] [--segment-length 2048]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch


def _memory_mib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def worker(length: int, segment: int, steps: int, output: str) -> None:
    import torch.distributed as dist
    from transformers import LlamaConfig, LlamaForCausalLM

    from evotune.data import PackedBatch
    from evotune.model.attention import attention_name, register_attention, resolve_kernel
    from evotune.model.loss import packed_loss_sum
    from evotune.parallel.sequence import SequenceParallel

    world = int(os.environ.get("WORLD_SIZE", "1"))
    cuda = torch.cuda.is_available()
    device = (
        torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        if cuda
        else torch.device("cpu")
    )
    if world > 1:
        dist.init_process_group("nccl" if cuda else "gloo")
    register_attention()
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=8192,
        hidden_size=256,
        intermediate_size=704,
        num_hidden_layers=4,
        num_attention_heads=8,
        num_key_value_heads=2,
        max_position_embeddings=max(segment, 4096),
    )
    dtype = torch.bfloat16 if cuda else torch.float32
    model = LlamaForCausalLM(config).to(device=device, dtype=dtype)
    model.config._attn_implementation = attention_name(resolve_kernel("auto", device))
    lengths = [segment] * (length // segment) + ([length % segment] if length % segment else [])
    ids = torch.randint(1, 8192, (1, length))
    positions = torch.cat([torch.arange(n) for n in lengths]).unsqueeze(0)
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    batch = PackedBatch(ids, ids.clone(), positions, cu, max(lengths), torch.zeros_like(ids), 1)
    sp = SequenceParallel(world, dist.get_rank(), dist.group.WORLD) if world > 1 else None
    local = (sp.split(batch) if sp else batch).to(device)
    before = _memory_mib(device)
    times = []
    for _ in range(steps):
        if cuda:
            torch.cuda.synchronize()
        started = time.perf_counter()
        loss = packed_loss_sum(model, local, chunk_size=4096, sequence_parallel=sp) / length
        loss.backward()
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - started)
        model.zero_grad(set_to_none=True)
    result = {
        "step_time_s": min(times),
        "peak_memory_mib": _memory_mib(device),
        "step_memory_growth_mib": _memory_mib(device) - before,
    }
    if world == 1 or dist.get_rank() == 0:
        Path(output).write_text(json.dumps(result))
    if world > 1:
        dist.destroy_process_group()


def _port() -> str:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return str(probe.getsockname()[1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--length", type=int, default=16384)
    parser.add_argument("--segment-length", type=int, default=2048)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--output", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.length, args.segment_length, args.steps, args.output)
        return
    common = [
        __file__,
        "--worker",
        "--length",
        str(args.length),
        "--segment-length",
        str(args.segment_length),
        "--steps",
        str(args.steps),
    ]
    results = {}
    with tempfile.TemporaryDirectory() as scratch:
        for sp in (1, 2):
            output = str(Path(scratch) / f"sp{sp}.json")
            launcher = (
                [sys.executable]
                if sp == 1
                else [
                    sys.executable,
                    "-m",
                    "torch.distributed.run",
                    "--nproc_per_node",
                    str(sp),
                    "--master_port",
                    _port(),
                ]
            )
            subprocess.run(
                [*launcher, *common, "--output", output],
                check=True,
                env=dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1")),
            )
            results[f"sp{sp}"] = json.loads(Path(output).read_text())
    print(
        json.dumps(
            {
                "length": args.length,
                "segment_length": args.segment_length,
                "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
                "per_rank": results,
                "ratio_sp2_over_sp1": {
                    k: results["sp2"][k] / results["sp1"][k] for k in results["sp1"]
                },
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
