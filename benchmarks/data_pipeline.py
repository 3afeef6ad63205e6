"""Data pipeline speed and memory: evotune vs XTuner v0.1.23's InternEvo-data loader.

Generates a synthetic ftdp corpus (default 50M tokens in 500 shards), then runs each
loader in its own child process (so each has its own peak RSS), round after round
(medians reported):

* evotune: index from the .meta files, plan packs, build the sampler, then build
  and collate packs in the sampler's order.
* xtuner_reimplementation: XTuner v0.1.23's algorithm (xtuner/dataset/intern_repo.py:
  JsonlDataset, PackedDataset, load_intern_repo_tokenized_dataset; the
  InternRepoSampler; default_collate_fn with use_varlen_attn=True), re-implemented
  here from reading that code, because xtuner itself needs mmengine. Like evotune it
  reads only the .meta files at start; per pack it parses lines with the standard
  json module into Python lists.
* evotune_before (with --before-commit REV): evotune's package at an older commit,
  taken with ``git archive`` into a temporary folder, measured the same way.

Prints one JSON object with every side's figures and the ratios evotune/xtuner.

    python benchmarks/data_pipeline.py [--tokens 50_000_000] [--shards 500] \
        [--before-commit REV] [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import shutil
import statistics
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

XTUNER_NOTE = (
    "independent re-implementation of XTuner v0.1.23's loader algorithm (intern_repo.py "
    "JsonlDataset + PackedDataset + ConcatDataset, InternRepoSampler, default_collate_fn "
    "with use_varlen_attn=True), not XTuner itself (it needs mmengine)"
)
DP_SIZE = 8  # both samplers hand this process rank 0's share of 8 data-parallel ranks


def generate_corpus(
    folder: Path, tokens: int, shards: int, seed: int = 0, vocab_size: int = 100_000
) -> dict[str, int]:
    """Log-normal SFT-like samples (median ~400 tokens), a masked prefix in each."""
    from evotune.data.tokenize import write_ftdp_shard

    rng = np.random.default_rng(seed)
    per_shard = tokens // shards
    samples_written = 0
    for index in range(shards):
        remaining, samples = per_shard, []
        while remaining > 0:
            length = min(int(rng.lognormal(6.0, 1.0)) + 8, 8192, remaining)
            sample = rng.integers(1, vocab_size, length)
            prompt = int(rng.integers(0, length // 3 + 1))
            sample[:prompt] *= -1
            samples.append(sample.tolist())
            remaining -= length
        kind = ("en", "cn", "code")[index % 3]
        write_ftdp_shard(folder / kind / f"set{index % 7}" / f"part-{index:05d}.bin", samples)
        samples_written += len(samples)
    return {"tokens": per_shard * shards, "shards": shards, "samples": samples_written}


def _peak_rss_mib() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _figures(started, built, sampled, first, iterated, count, packed_length, packs) -> dict:
    return {
        "build_dataset_s": built - started,
        "build_sampler_s": sampled - built,
        "time_to_first_batch_s": first - started,
        "packs_per_s": count / (iterated - first),
        "tokens_per_s": count * packed_length / (iterated - first),
        "peak_rss_mib": _peak_rss_mib(),
        "packs": packs,
    }


# -- evotune -------------------------------------------------------------------------


def run_evotune(folder: str, packed_length: int, iterate: int, package_root: str | None, queue):
    import sys

    if package_root is not None:
        sys.path.insert(0, package_root)
    from evotune.data import (
        InternRepoSampler,
        PackCollator,
        build_packed_dataset,
        load_intern_repo_tokenized_dataset,
    )

    started = time.perf_counter()
    dataset = build_packed_dataset(
        dict(type=load_intern_repo_tokenized_dataset, folder=folder), packed_length=packed_length
    )
    built = time.perf_counter()
    sampler = InternRepoSampler(dataset, micro_num=4, dp_size=DP_SIZE, dp_rank=0)
    order = list(sampler)
    sampled = time.perf_counter()
    collate = PackCollator()
    collate([dataset[order[0]]])
    first = time.perf_counter()
    for index in order[1 : iterate + 1]:
        collate([dataset[index]])
    iterated = time.perf_counter()
    count = min(iterate, len(order) - 1)
    figures = _figures(started, built, sampled, first, iterated, count, packed_length, len(dataset))
    figures["index_bytes_per_sample"] = dataset.index_bytes() / dataset.corpus.num_samples
    figures["evotune_module"] = sys.modules["evotune"].__file__
    queue.put(figures)


# -- XTuner v0.1.23, re-implemented ---------------------------------------------------


class XtunerJsonlShard:
    """One shard as XTuner's JsonlDataset reads it: meta at start, a line per item."""

    def __init__(self, path: str):
        self.path = path
        meta = np.load(f"{Path(path).resolve()}.meta")
        self.offsets = meta[:, 0]
        self.length = meta[:, -1]
        self._mapped = None

    def __len__(self) -> int:
        return len(self.offsets)

    def __getitem__(self, index: int) -> dict[str, Any]:
        import mmap

        if self._mapped is None:
            with open(self.path, "rb") as handle:
                self._mapped = mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ)
        self._mapped.seek(self.offsets[index])
        record = json.loads(self._mapped.readline().decode("utf-8"))
        ids = record.pop("tokens")
        record["input_ids"] = [abs(token) for token in ids]
        record["labels"] = [token if token > 0 else -100 for token in ids]
        record["length"] = len(ids)
        return record


class XtunerPackedShard:
    """XTuner's PackedDataset over one shard: Python lists of the shuffled lengths."""

    def __init__(self, shard: XtunerJsonlShard, packed_length: int, seed: int = 1024):
        import itertools
        import operator

        self.shard = shard
        self.packed_length = packed_length
        order = np.arange(len(shard.length))
        np.random.RandomState(seed).shuffle(order)
        self.order = order.tolist()
        self.lengths = [shard.length[i] for i in order]  # numpy scalars, as in XTuner
        self.ends = list(itertools.accumulate(self.lengths, operator.add))
        self.num_tokens = sum(shard.length)

    def __len__(self) -> int:
        return int(self.num_tokens // self.packed_length)

    def _last_sample(self, pack: int) -> int:
        # XTuner searches its Python list, which numpy converts on every call
        return int(np.searchsorted(self.ends, (pack + 1) * self.packed_length, side="left"))

    def __getitem__(self, pack: int) -> dict[str, list[int]]:
        begin_sample, begin_token = 0, 0
        if pack > 0:
            begin_sample = self._last_sample(pack - 1)
            begin_token = self.lengths[begin_sample] - (
                self.ends[begin_sample] - pack * self.packed_length
            )
            if begin_token == self.lengths[begin_sample]:
                begin_sample, begin_token = begin_sample + 1, 0
        end_sample = self._last_sample(pack)
        end_token = self.lengths[end_sample] - (
            self.ends[end_sample] - (pack + 1) * self.packed_length
        )
        input_ids, labels, position_ids, cumulative = [], [], [], [0]
        for position in range(begin_sample, end_sample + 1):
            sample = self.shard[self.order[position]]
            low = begin_token if position == begin_sample else 0
            high = end_token if position == end_sample else None
            chunk = sample["input_ids"][low:high]
            input_ids.extend(chunk)
            labels.extend(sample["labels"][low:high])
            cumulative.append(cumulative[-1] + len(chunk))
            position_ids.extend(range(len(chunk)))
        return {
            "input_ids": input_ids,
            "labels": labels,
            "cumulative_len": cumulative,
            "position_ids": position_ids,
        }


def xtuner_collate(item: dict[str, list[int]]) -> dict[str, Any]:
    """default_collate_fn(use_varlen_attn=True) for its one instance."""
    import torch

    cumulative = torch.IntTensor(item["cumulative_len"])
    return {
        "input_ids": torch.stack([torch.LongTensor(item["input_ids"])]),
        "labels": torch.stack([torch.LongTensor(item["labels"])]),
        "position_ids": torch.stack([torch.LongTensor(item["position_ids"])]),
        "cumulative_len": [cumulative],
        "max_seqlen": (cumulative[1:] - cumulative[:-1]).max().item(),
    }


def xtuner_order(length: int, world: int, rank: int, seed: int = 1024, epoch: int = 0) -> list:
    order = np.arange(length)
    np.random.RandomState(seed + epoch).shuffle(order)
    total = length // world * world
    return order.tolist()[:total][rank:total:world]


def run_xtuner_reimplementation(folder: str, packed_length: int, iterate: int, _, queue):
    from torch.utils.data import ConcatDataset

    started = time.perf_counter()
    paths = []
    for root, _dirs, files in os.walk(folder, followlinks=True):
        paths.extend(os.path.join(root, name) for name in sorted(files) if name.endswith(".bin"))
    shards = [XtunerJsonlShard(path) for path in paths]
    dataset = ConcatDataset(
        [XtunerPackedShard(shard, packed_length) for shard in shards if len(shard)]
    )
    built = time.perf_counter()
    order = xtuner_order(len(dataset), DP_SIZE, 0)
    sampled = time.perf_counter()
    xtuner_collate(dataset[order[0]])
    first = time.perf_counter()
    for index in order[1 : iterate + 1]:
        xtuner_collate(dataset[index])
    iterated = time.perf_counter()
    count = min(iterate, len(order) - 1)
    queue.put(
        _figures(started, built, sampled, first, iterated, count, packed_length, len(dataset))
    )


# -- driver ----------------------------------------------------------------------------


def _in_child(target, *args) -> dict:
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    process = context.Process(target=target, args=(*args, queue))
    process.start()
    result = queue.get()
    process.join()
    return result


def _export_package(commit: str, destination: Path) -> str:
    """evotune/ at ``commit`` into ``destination`` (git archive: the work tree is untouched)."""
    repository = Path(__file__).resolve().parent.parent
    archive = subprocess.run(
        ["git", "-C", str(repository), "archive", commit, "evotune"],
        check=True,
        capture_output=True,
    ).stdout
    subprocess.run(["tar", "-x", "-C", str(destination)], input=archive, check=True)
    revision = subprocess.run(
        ["git", "-C", str(repository), "rev-parse", "--short", commit],
        check=True,
        capture_output=True,
        text=True,
    )
    return revision.stdout.strip()


def _median(runs: list[dict]) -> dict:
    summary = {}
    for key, value in runs[0].items():
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            summary[key] = statistics.median(run[key] for run in runs)
        else:
            summary[key] = value
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=50_000_000)
    parser.add_argument("--shards", type=int, default=500)
    parser.add_argument("--packed-length", type=int, default=8192)
    parser.add_argument(
        "--iterate", type=int, default=2000, help="packs to iterate after the first"
    )
    parser.add_argument("--rounds", type=int, default=3, help="runs of each side (medians)")
    parser.add_argument("--before-commit", help="also measure evotune at this git revision")
    parser.add_argument("--folder", help="reuse/keep the corpus here instead of a temp folder")
    args = parser.parse_args()

    folder = Path(args.folder) if args.folder else Path(tempfile.mkdtemp(prefix="evotune-bench-"))
    before_root = Path(tempfile.mkdtemp(prefix="evotune-before-"))
    try:
        started = time.perf_counter()
        if not any(folder.rglob("*.bin")):
            corpus: dict[str, Any] = generate_corpus(folder, args.tokens, args.shards)
        else:
            corpus = {"reused": str(folder)}
        corpus["generate_s"] = time.perf_counter() - started
        sides: dict[str, tuple[Any, str | None]] = {
            "evotune": (run_evotune, None),
            "xtuner_reimplementation": (run_xtuner_reimplementation, None),
        }
        before_revision = None
        if args.before_commit:
            before_revision = _export_package(args.before_commit, before_root)
            sides["evotune_before"] = (run_evotune, str(before_root))
        runs: dict[str, list[dict]] = {name: [] for name in sides}
        load_before = os.getloadavg()
        for _ in range(args.rounds):  # interleaved, so a busy machine hurts every side alike
            for name, (target, package_root) in sides.items():
                runs[name].append(
                    _in_child(target, str(folder), args.packed_length, args.iterate, package_root)
                )
        results = {name: _median(values) for name, values in runs.items()}
        packs = {result["packs"] for result in results.values()}
        assert len(packs) == 1, packs
        keys = ("build_dataset_s", "time_to_first_batch_s", "packs_per_s", "peak_rss_mib")
        evotune, xtuner = results["evotune"], results["xtuner_reimplementation"]
        output: dict[str, Any] = {
            "corpus": corpus,
            "packed_length": args.packed_length,
            "iterated_packs": args.iterate,
            "rounds": args.rounds,
            "cpu_count": os.cpu_count(),
            "load_average_before": load_before,
            "xtuner_reimplementation_is": XTUNER_NOTE,
            **results,
            "ratio_evotune_over_xtuner": {key: evotune[key] / xtuner[key] for key in keys},
        }
        if before_revision is not None:
            before = results["evotune_before"]
            before["commit"] = before_revision
            output["ratio_evotune_over_evotune_before"] = {
                key: evotune[key] / before[key] for key in keys
            }
        output["packs_per_s_every_round"] = {
            name: [run["packs_per_s"] for run in values] for name, values in runs.items()
        }
        # sides run one after another in each round: a ratio inside one round is the least
        # disturbed by a load that drifts from round to round
        output["packs_per_s_ratio_median_of_rounds"] = {
            f"evotune_over_{other}": statistics.median(
                mine["packs_per_s"] / theirs["packs_per_s"]
                for mine, theirs in zip(runs["evotune"], runs[other], strict=True)
            )
            for other in runs
            if other != "evotune"
        }
        output["load_average_after"] = os.getloadavg()
        print(json.dumps(output, indent=2))
    finally:
        shutil.rmtree(before_root, ignore_errors=True)
        if not args.folder:
            shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
