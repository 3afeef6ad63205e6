"""Data pipeline speed and memory: evotune vs a parse-everything-at-startup baseline.

Generates a synthetic ftdp corpus (default 100M tokens in 1,000 shards), then in
two child processes of this run (so each has its own peak RSS):

* evotune: index from .meta files, plan packs, build the sampler, iterate packs.
* baseline (XTuner v0.1 style): parse every JSON line at startup into token
  arrays, then pack each file (same permutation), then iterate.

Prints one JSON object with both sides' figures and evotune/baseline ratios.

    python benchmarks/data_pipeline.py [--tokens 100_000_000] [--shards 1000]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import resource
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import orjson

from evotune.data import (
    InternRepoSampler,
    PackCollator,
    build_packed_dataset,
    load_intern_repo_tokenized_dataset,
)
from evotune.data.ftdp import discover_shards
from evotune.data.tokenize import write_ftdp_shard


def generate_corpus(folder: Path, tokens: int, shards: int, seed: int = 0) -> dict[str, int]:
    rng = np.random.default_rng(seed)
    per_shard = tokens // shards
    samples_written = 0
    for index in range(shards):
        remaining, samples = per_shard, []
        while remaining > 0:
            length = min(int(rng.lognormal(6.0, 1.0)) + 8, 8192, remaining)
            sample = rng.integers(1, 100_000, length)
            prompt = int(rng.integers(0, length // 3 + 1))
            sample[:prompt] *= -1
            samples.append(sample.tolist())
            remaining -= length
        kind = ("en", "cn", "code")[index % 3]
        write_ftdp_shard(folder / kind / f"set{index % 7}" / f"part-{index:05d}.bin", samples)
        samples_written += len(samples)
    return {"tokens": per_shard * shards, "shards": shards, "samples": samples_written}


def _peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_evotune(folder: str, packed_length: int, iterate: int, queue) -> None:
    started = time.perf_counter()
    dataset = build_packed_dataset(
        dict(type=load_intern_repo_tokenized_dataset, folder=folder), packed_length=packed_length
    )
    built = time.perf_counter()
    sampler = InternRepoSampler(dataset, micro_num=4, dp_size=8, dp_rank=0)
    order = list(sampler)
    sampled = time.perf_counter()
    collate = PackCollator()
    collate([dataset[order[0]]])
    first = time.perf_counter()
    for index in order[1 : iterate + 1]:
        collate([dataset[index]])
    iterated = time.perf_counter()
    count = min(iterate, len(order) - 1)
    samples = dataset.corpus.num_samples
    queue.put(
        {
            "build_dataset_s": built - started,
            "build_sampler_s": sampled - built,
            "time_to_first_batch_s": first - started,
            "packs_per_s": count / (iterated - first),
            "tokens_per_s": count * packed_length / (iterated - first),
            "peak_rss_mib": _peak_rss_mib(),
            "index_bytes_per_sample": dataset.index_bytes() / samples,
            "packs": len(dataset),
        }
    )


def run_baseline(folder: str, packed_length: int, iterate: int, queue) -> None:
    """Load every sample at startup (as XTuner v0.1 does), then pack per file."""
    started = time.perf_counter()
    root = Path(folder)
    packs: list[np.ndarray] = []
    for relative in discover_shards(root):
        with open(root / relative, "rb") as handle:
            samples = [np.asarray(orjson.loads(line)["tokens"], dtype=np.int64) for line in handle]
        order = np.random.RandomState(1024).permutation(len(samples))
        stream = np.concatenate([samples[i] for i in order]) if samples else np.zeros(0, np.int64)
        count = len(stream) // packed_length
        packs.extend(np.split(stream[: count * packed_length], count) if count else [])
    built = time.perf_counter()
    order = np.random.RandomState(1024).permutation(len(packs))
    sampled = time.perf_counter()
    np.abs(packs[order[0]])
    first = time.perf_counter()
    for index in order[1 : iterate + 1]:
        np.abs(packs[index])
    iterated = time.perf_counter()
    count = min(iterate, len(order) - 1)
    queue.put(
        {
            "build_dataset_s": built - started,
            "build_sampler_s": sampled - built,
            "time_to_first_batch_s": first - started,
            "packs_per_s": count / (iterated - first),
            "tokens_per_s": count * packed_length / (iterated - first),
            "peak_rss_mib": _peak_rss_mib(),
            "packs": len(packs),
        }
    )


def _in_child(target, *args) -> dict:
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    process = context.Process(target=target, args=(*args, queue))
    process.start()
    result = queue.get()
    process.join()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=100_000_000)
    parser.add_argument("--shards", type=int, default=1000)
    parser.add_argument("--packed-length", type=int, default=8192)
    parser.add_argument(
        "--iterate", type=int, default=2000, help="packs to iterate after the first"
    )
    parser.add_argument("--folder", help="reuse/keep the corpus here instead of a temp folder")
    args = parser.parse_args()

    folder = Path(args.folder) if args.folder else Path(tempfile.mkdtemp(prefix="evotune-bench-"))
    try:
        started = time.perf_counter()
        if not any(folder.rglob("*.bin")):
            corpus = generate_corpus(folder, args.tokens, args.shards)
        else:
            corpus = {"reused": str(folder)}
        corpus["generate_s"] = time.perf_counter() - started
        evotune = _in_child(run_evotune, str(folder), args.packed_length, args.iterate)
        baseline = _in_child(run_baseline, str(folder), args.packed_length, args.iterate)
        assert evotune["packs"] == baseline["packs"], (evotune["packs"], baseline["packs"])
        ratios = {
            key: evotune[key] / baseline[key]
            for key in ("build_dataset_s", "time_to_first_batch_s", "packs_per_s", "peak_rss_mib")
        }
        print(
            json.dumps(
                {
                    "corpus": corpus,
                    "packed_length": args.packed_length,
                    "evotune": evotune,
                    "baseline": baseline,
                    "ratio_evotune_over_baseline": ratios,
                },
                indent=2,
            )
        )
    finally:
        if not args.folder:
            shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
