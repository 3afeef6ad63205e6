"""``evotune data check`` throughput (MB/s) against two baselines measured in the same run.

Generates a synthetic ftdp corpus (default about 200 MB: InternLM2-sized ids, log-normal
sample lengths), reads it once so every figure comes from the page cache, then runs,
round after round (the median of the rounds is reported):

* raw read: every shard read in 16 MB blocks and its newlines counted (``wc -l``);
  the ceiling for anything that looks at every byte, one process.
* json.loads: the standard library parsing every line, one process, no checks; what
  a hand-written validation script does.
* evotune data check with 1 worker and with every core: JSON, token types, ids
  against the vocab, every .meta row against the file.

Prints one JSON object (figures, ratios, the machine's core count and load).

    python benchmarks/data_check.py [--megabytes 200] [--rounds 3] [--folder DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from data_pipeline import generate_corpus

from evotune.data.check import check_folder
from evotune.data.ftdp import discover_shards

VOCAB_SIZE = 92544
BYTES_PER_TOKEN = 6.6  # compact JSON, 5-digit ids


def raw_read(paths: list[Path]) -> int:
    lines = 0
    for path in paths:
        with open(path, "rb") as handle:
            while block := handle.read(16 << 20):
                lines += block.count(b"\n")
    return lines


def json_loads_every_line(paths: list[Path]) -> int:
    tokens = 0
    for path in paths:
        with open(path, "rb") as handle:
            for line in handle:
                tokens += len(json.loads(line)["tokens"])
    return tokens


def _timed(function, *args) -> float:
    started = time.perf_counter()
    function(*args)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--megabytes", type=float, default=200)
    parser.add_argument("--shards", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--folder", help="reuse/keep the corpus here instead of a temp folder")
    args = parser.parse_args()

    folder = Path(args.folder) if args.folder else Path(tempfile.mkdtemp(prefix="evotune-check-"))
    try:
        started = time.perf_counter()
        if not any(folder.rglob("*.bin")):
            tokens = int(args.megabytes * 1e6 / BYTES_PER_TOKEN)
            generate_corpus(folder, tokens, args.shards, vocab_size=VOCAB_SIZE)
        generate_s = time.perf_counter() - started
        paths = [folder / relative for relative in discover_shards(folder)]
        size = sum(path.stat().st_size for path in paths)
        raw_read(paths)  # warm the page cache
        seconds: dict[str, list[float]] = {
            "raw_read": [],
            "json_loads": [],
            "check_1_worker": [],
            f"check_{args.workers}_workers": [],
        }
        load_before = os.getloadavg()
        report = None
        for _ in range(args.rounds):
            seconds["raw_read"].append(_timed(raw_read, paths))
            seconds["json_loads"].append(_timed(json_loads_every_line, paths))
            seconds["check_1_worker"].append(_timed(check_folder, folder, VOCAB_SIZE, 1))
            started = time.perf_counter()
            report = check_folder(folder, VOCAB_SIZE, args.workers)
            seconds[f"check_{args.workers}_workers"].append(time.perf_counter() - started)
        assert report is not None and report.problem_count == 0, report and report.problems[:3]
        mb_per_s = {
            name: size / 1e6 / statistics.median(values) for name, values in seconds.items()
        }
        parallel = f"check_{args.workers}_workers"
        print(
            json.dumps(
                {
                    "corpus": {
                        "megabytes": size / 1e6,
                        "shards": report.shards,
                        "samples": report.samples,
                        "tokens": report.tokens,
                        "vocab_size": VOCAB_SIZE,
                        "generate_s": generate_s,
                        "from": "page cache (read once before timing)",
                    },
                    "cpu_count": os.cpu_count(),
                    "load_average_before": load_before,
                    "load_average_after": os.getloadavg(),
                    "rounds": args.rounds,
                    "seconds": seconds,
                    "mb_per_s_median": mb_per_s,
                    "ratio_median_of_rounds": {
                        f"{name}_over_json_loads": statistics.median(
                            json_s / check_s
                            for json_s, check_s in zip(
                                seconds["json_loads"], seconds[name], strict=True
                            )
                        )
                        for name in ("check_1_worker", parallel)
                    },
                    "ratios": {
                        "check_1_worker_over_json_loads": mb_per_s["check_1_worker"]
                        / mb_per_s["json_loads"],
                        f"{parallel}_over_json_loads": mb_per_s[parallel] / mb_per_s["json_loads"],
                        f"{parallel}_over_raw_read": mb_per_s[parallel] / mb_per_s["raw_read"],
                    },
                },
                indent=2,
            )
        )
    finally:
        if not args.folder:
            shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
