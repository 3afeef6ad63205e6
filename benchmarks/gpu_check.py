"""One-shot GPU check: varlen exactness per kernel, and bf16 training throughput / MFU.

Part 1 (fp32, tiny model): for every kernel available on the GPU, the logits of a
packed row equal each segment run alone (HF eager attention), and the gradients
equal those of the SDPA kernel (FlexAttention's backward only exists on GPU).
Part 2 (bf16): ``evotune train`` on a ~0.4B Llama-style model and a synthetic ftdp
folder, packed rows of 8192 tokens; median tokens/s, TFLOPs and MFU per setting.

    python benchmarks/gpu_check.py --out DIR
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from evotune.data import PackedBatch
from evotune.data.tokenize import write_ftdp_shard
from evotune.model.attention import (
    KERNELS,
    attention_name,
    flash_attn_available,
    register_attention,
)
from evotune.model.loss import packed_loss_sum

SEGMENTS = [37, 300, 1, 129, 64, 500]


def exactness(device: torch.device) -> dict:
    register_attention()
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=512,
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=8,
        num_key_value_heads=2,
        tie_word_embeddings=False,
    )
    reference = LlamaForCausalLM(config).to(device).eval()
    reference.config._attn_implementation = "eager"
    total = sum(SEGMENTS)
    ids = torch.randint(1, 512, (1, total), device=device)
    labels = torch.randint(1, 512, (1, total), device=device)
    positions = torch.cat([torch.arange(n) for n in SEGMENTS]).unsqueeze(0).to(device)
    cu = torch.tensor([0, *np.cumsum(SEGMENTS).tolist()], dtype=torch.int32, device=device)
    batch = PackedBatch(ids, labels, positions, cu, max(SEGMENTS), torch.zeros_like(ids), 1)
    with torch.no_grad():
        alone = []
        start = 0
        for length in SEGMENTS:
            alone.append(reference(input_ids=ids[:, start : start + length]).logits[0])
            start += length
        alone = torch.cat(alone)
    kernels = [k for k in KERNELS if k != "flash_attention_2" or flash_attn_available()]
    results, grads = {}, {}
    for kernel in kernels:
        model = LlamaForCausalLM(config).to(device)
        model.load_state_dict(reference.state_dict())
        model.config._attn_implementation = attention_name(kernel)
        with torch.no_grad():
            packed = model(
                input_ids=ids,
                position_ids=positions,
                use_cache=False,
                cu_seq_lens_q=cu,
                max_length_q=max(SEGMENTS),
            ).logits[0]
        model.zero_grad()
        (packed_loss_sum(model, batch) / total).backward()
        grads[kernel] = {n: p.grad.detach().clone() for n, p in model.named_parameters()}
        results[kernel] = {
            "max_abs_logit_diff_vs_segments_alone": float((packed - alone).abs().max())
        }
    for kernel in kernels:
        worst = max(
            float((grads[kernel][n] - g).abs().max() / g.abs().max().clamp_min(1e-12))
            for n, g in grads["sdpa"].items()
        )
        results[kernel]["max_rel_grad_diff_vs_sdpa"] = worst
    return results


def build_assets(root: Path) -> tuple[Path, Path]:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=32000,
        hidden_size=1536,
        intermediate_size=4096,
        num_hidden_layers=12,
        num_attention_heads=12,
        num_key_value_heads=4,
        max_position_embeddings=8192,
        tie_word_embeddings=False,
    )
    model_dir = root / "model"
    LlamaForCausalLM(config).to(torch.bfloat16).save_pretrained(model_dir)
    rng = np.random.default_rng(0)
    data = root / "data"
    for shard in range(4):
        samples, remaining = [], 400_000
        while remaining > 0:
            length = int(min(remaining, rng.integers(64, 4096)))
            sample = rng.integers(3, 32000, length)
            sample[: length // 4] *= -1
            samples.append(sample.tolist())
            remaining -= length
        write_ftdp_shard(data / "en" / f"part{shard}.bin", samples)
    return model_dir, data


def throughput(root: Path, model_dir: Path, data: Path, name: str, settings: dict) -> dict:
    values = dict(
        pretrained_model_name_or_path=str(model_dir),
        dataset_folder=str(data),
        max_length=8192,
        batch_size=1,
        accumulative_counts=1,
        total_steps=14,
        lr=1e-5,
        dtype="bfloat16",
        save_steps=10_000,
        save_total_limit=1,
        loss_chunk_size=4096,
    )
    values.update(settings)
    config = root / f"{name}.py"
    config.write_text("".join(f"{k} = {v!r}\n" for k, v in values.items()))
    work = root / f"work-{name}"
    started = time.time()
    completed = subprocess.run(
        [
            sys.executable,
            "-m",
            "evotune.cli",
            "train",
            str(config),
            "--work-dir",
            str(work),
            "--no-progress",
        ],
        capture_output=True,
        text=True,
    )
    result = {"exit": completed.returncode, "wall_s": time.time() - started}
    if completed.returncode:
        result["stderr_tail"] = completed.stderr[-1500:]
        return result
    rows = [json.loads(line) for line in (work / "metrics.jsonl").read_text().splitlines()][4:]
    for key in ("tokens_per_s", "tflops_per_rank", "mfu", "step_time_s"):
        result[key] = (
            statistics.median(r[key] for r in rows if r[key] is not None)
            if any(r[key] is not None for r in rows)
            else None
        )
    result["peak_memory_mib"] = max(r["peak_memory_mib"] for r in rows)
    result["first_loss"], result["last_loss"] = rows[0]["loss"], rows[-1]["loss"]
    shutil.rmtree(work, ignore_errors=True)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    out = Path(args.out)
    device = torch.device("cuda")
    report = {"device": torch.cuda.get_device_name(), "torch": torch.__version__}
    import transformers

    report["transformers"] = transformers.__version__
    report["exactness_fp32"] = exactness(device)
    (out / "gpu_check.json").write_text(json.dumps(report, indent=2))
    scratch = Path(os.environ.get("TMPDIR", "/tmp")) / "evotune-gpu"
    model_dir, data = build_assets(scratch)
    report["throughput_bf16_8k"] = {}
    for name, settings in [
        ("sdpa", {"attn_implementation": "sdpa"}),
        ("flex", {"attn_implementation": "flex_attention"}),
        ("sdpa_ckpt", {"attn_implementation": "sdpa", "gradient_checkpointing": True}),
    ]:
        report["throughput_bf16_8k"][name] = throughput(scratch, model_dir, data, name, settings)
        (out / "gpu_check.json").write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
