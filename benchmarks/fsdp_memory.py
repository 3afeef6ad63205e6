"""Per-rank memory of FSDP2 at 2 ranks vs 1 rank, beside ZeRO-3 and the plain engine (CPU).

A random-init Llama of ~125M parameters (hidden 768, 12 layers, vocab 32000,
untied) trains a few steps of one 256-token pack per micro-batch (fp32, AdamW)
on synthetic ftdp shards, each layout under torchrun with the same global batch.
Every rank runs evotune's Trainer and samples its own resident set size (RSS)
every 10 ms in three phases: ``load`` (building the Trainer: model load, wrap,
shard), ``train`` (the optimizer steps), ``save`` (the final checkpoint: HF
folder and engine state). Figures are the maximum over ranks, in MiB, minus the
rank's RSS after imports (``base``), so they hold the model, gradients, AdamW
state, activations and buffers, not the libraries. On CPU the ratio of these
figures is what carries over to a GPU; absolute GPU figures need a GPU run.

    python benchmarks/fsdp_memory.py [--steps 2] [--output FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PHASES = ("load", "train", "save")
LAYOUTS = {  # name: (processes, accumulative_counts, extra settings)
    "torch_1rank": (1, 2, []),
    "fsdp2_1rank": (1, 2, ["engine=fsdp2"]),
    "fsdp2_2ranks": (2, 1, ["engine=fsdp2"]),
    "zero3_1rank": (1, 2, ["deepspeed=deepspeed_zero3"]),
    "zero3_2ranks": (2, 1, ["deepspeed=deepspeed_zero3"]),
}
MODEL = dict(
    vocab_size=32000,
    hidden_size=768,
    intermediate_size=2048,
    num_hidden_layers=12,
    num_attention_heads=12,
    num_key_value_heads=4,
    max_position_embeddings=1024,
    tie_word_embeddings=False,
)


def _rss_mib() -> float:
    import psutil

    return psutil.Process().memory_info().rss / 2**20


class PhaseSampler:
    """Peak RSS per phase, sampled from a thread while the main thread works."""

    def __init__(self, interval: float = 0.01):
        self.phase = "load"
        self.peaks = dict.fromkeys(PHASES, 0.0)
        self._interval = interval
        self._running = True
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()

    def _sample(self) -> None:
        while self._running:
            self.peaks[self.phase] = max(self.peaks[self.phase], _rss_mib())
            time.sleep(self._interval)

    def stop(self) -> dict[str, float]:
        self._running = False
        self._thread.join()
        return self.peaks


def worker(config: str, work: str, overrides: list[str], report: str) -> None:
    """One rank: evotune's Trainer with the phases marked; writes its figures as JSON."""
    from evotune.config import load_config
    from evotune.parallel.dims import ParallelDims
    from evotune.train.trainer import Trainer

    base = _rss_mib()
    sampler = PhaseSampler()
    loaded = load_config(Path(config), overrides)
    dims = ParallelDims.from_environment(loaded.settings.sequence_parallel_size)
    trainer = Trainer(loaded, Path(work), dims, show_progress=False)
    save = trainer.checkpoints.save

    def marked_save(*args, **kwargs):
        sampler.phase = "save"
        return save(*args, **kwargs)

    trainer.checkpoints.save = marked_save
    sampler.phase = "train"
    trainer.train()
    peaks = sampler.stop()
    dims.shutdown(clean=True)
    import resource

    figures = {
        "base_mib": base,
        **{f"{phase}_peak_mib": peaks[phase] - base for phase in PHASES},
        "ru_maxrss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }
    Path(report).joinpath(f"rank{dims.rank}.json").write_text(json.dumps(figures))


def _port() -> str:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return str(probe.getsockname()[1])


def build_inputs(folder: Path, steps: int) -> tuple[Path, int]:
    """A ~125M-parameter model folder, enough packs for the steps, a config file; the
    config and the number of parameters."""
    import numpy as np
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from evotune.data.tokenize import write_ftdp_shard

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**MODEL))
    parameters = sum(p.numel() for p in model.parameters())
    model.save_pretrained(folder / "model")
    del model
    rng = np.random.default_rng(0)
    samples = [rng.integers(1, MODEL["vocab_size"], 250).tolist() for _ in range(8 * steps)]
    write_ftdp_shard(folder / "data" / "en" / "part-00000.bin", samples)
    config = folder / "config.py"
    config.write_text(
        f"pretrained_model_name_or_path = {str(folder / 'model')!r}\n"
        f"dataset_folder = {str(folder / 'data')!r}\n"
        f"max_length = 256\ntotal_steps = {steps}\nsave_steps = 1000\nlr = 1e-4\n"
    )
    return config, parameters


def measure(config: Path, scratch: Path, name: str) -> dict:
    nproc, accumulation, settings = LAYOUTS[name]
    report = scratch / f"{name}-report"
    report.mkdir()
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        f"--nproc_per_node={nproc}",
        f"--master_port={_port()}",
        __file__,
        "--worker",
        str(config),
        str(scratch / name),
        str(report),
        f"accumulative_counts={accumulation}",
        *settings,
    ]
    # a fixed mmap threshold: glibc then returns every large freed buffer to the system at
    # once, so RSS follows the live tensors instead of the allocator's high-water mark
    env = dict(os.environ, OMP_NUM_THREADS="1", MALLOC_MMAP_THRESHOLD_="131072")
    completed = subprocess.run(command, env=env, capture_output=True, text=True)
    if completed.returncode:
        raise RuntimeError(f"{name}: {completed.stderr[-3000:]}")
    ranks = [json.loads(p.read_text()) for p in sorted(report.glob("rank*.json"))]
    return {key: round(max(rank[key] for rank in ranks), 1) for key in ranks[0]}


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        config, work, report, *overrides = sys.argv[2:]
        worker(config, work, overrides, report)
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--output", help="also write the JSON to this file")
    parser.add_argument("--layouts", nargs="+", choices=list(LAYOUTS), default=list(LAYOUTS))
    args = parser.parse_args()
    results: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as folder:
        scratch = Path(folder)
        config, parameters = build_inputs(scratch, args.steps)
        for name in args.layouts:
            results[name] = measure(config, scratch, name)

    def ratio(numerator: str, denominator: str, key: str) -> float | None:
        if numerator not in results or denominator not in results:
            return None
        return round(results[numerator][key] / results[denominator][key], 3)

    for figures in results.values():
        figures["peak_mib"] = max(figures[f"{phase}_peak_mib"] for phase in PHASES)
    pairs = {
        "fsdp2_2ranks_vs_1rank": ("fsdp2_2ranks", "fsdp2_1rank"),
        "zero3_2ranks_vs_1rank": ("zero3_2ranks", "zero3_1rank"),
        "fsdp2_2ranks_vs_torch_1rank": ("fsdp2_2ranks", "torch_1rank"),
        "zero3_2ranks_vs_torch_1rank": ("zero3_2ranks", "torch_1rank"),
        "fsdp2_2ranks_vs_zero3_2ranks": ("fsdp2_2ranks", "zero3_2ranks"),
    }
    summary = {
        "what": "per-rank RSS above the post-import baseline, MiB, max over ranks (CPU, fp32)",
        "parameters": parameters,
        "fp32_training_state_mib_1rank": round(parameters * 16 / 2**20, 1),
        "steps": args.steps,
        "runs": results,
        "ratios": {
            figure: {name: ratio(*pair, f"{figure}_mib") for name, pair in pairs.items()}
            for figure in ("train_peak", "peak")
        },
        "notes": "train_peak: during the optimizer steps; peak: the largest of load, train and "
        "save. The torch engine's load touches almost nothing (the weights are read from the "
        "safetensors mapping when first used), so its load figure is no measure of its weights.",
    }
    text = json.dumps(summary, indent=2)
    print(text)
    if args.output:
        Path(args.output).write_text(text + "\n")


if __name__ == "__main__":
    main()
