"""One-shot GPU check (<= 8 minutes on one H200): exactness, no host sync, speed, DeepSpeed.

Sections, in priority order (a section that would not fit the ``--budget-s`` left is
skipped and says so; the report is rewritten after every section):

1. ``exactness``: tiny Llama, every kernel this machine has (sdpa, eager, flex_attention,
   varlen, flash_attention_2): a packed row's logits equal each segment run alone
   (transformers' eager attention), in fp32 (kernels that take it) and bf16, and the
   gradients equal the SDPA kernel's; regional compile equals eager. Tolerances:
   fp32 logits 1e-4 abs, grads 1e-4 rel; bf16 logits 0.1 abs, grads 0.05 rel.
2. ``no_sync``: forward + backward of the packed loss (and the torch engine's
   forward_backward with bf16 parameters) under torch.cuda.set_sync_debug_mode("error"),
   per kernel, plain and compiled.
3. ``throughput``: a Llama-shaped ~1.9B model (hidden 2048, intermediate 8192, 24
   layers, 16 heads / 8 KV heads, vocab 92544), random init, bf16, SFT-like samples
   (log-normal, median ~300, tail to 8k, prompts masked) packed into 8k rows:
   ``evotune train`` with its default (bf16 parameters, auto kernel), +compile, with and
   without activation checkpointing; the Hugging Face Trainer on the same model and
   samples, padding-free (DataCollatorWithFlattening, its best attention) and padded;
   DeepSpeed ZeRO-2 and ZeRO-3 and FSDP2 (meta-device build, weights sent from rank 0,
   streamed HF folder at the final save) through evotune, whose losses must equal the
   torch engine's within bf16 tolerance. tokens/s, trainable tokens/s, MFU, HFU, peak memory,
   step time (medians after warm-up steps).

    python benchmarks/gpu_check.py --out DIR              # on the GPU machine
    python benchmarks/gpu_check.py --out DIR --tiny       # the same code paths, tiny, CPU ok

The GPU image lacks evotune's orjson and DeepSpeed (with pydantic): make the wheels
with benchmarks/gpu_wheels.sh here and carry ``.whl`` (see that script).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import os
import statistics
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from evotune.data import PackedBatch
from evotune.model.attention import (
    KERNELS,
    AttentionMetadata,
    attention_name,
    kernel_problem,
    register_attention,
)
from evotune.model.families import attention_needs
from evotune.model.loss import packed_loss

SEGMENTS = [37, 300, 1, 129, 64, 500]
TOLERANCE = {
    "float32": {"logits_abs": 1e-4, "grads_rel": 1e-4},
    "bfloat16": {"logits_abs": 0.1, "grads_rel": 0.05},
}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
BIG = dict(
    vocab_size=92544,
    hidden_size=2048,
    intermediate_size=8192,
    num_hidden_layers=24,
    num_attention_heads=16,
    num_key_value_heads=8,
    max_position_embeddings=8192,
)
TINY = dict(
    vocab_size=512,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=1024,
)


class Plan:
    """Sizes of one run: the real check on a GPU, or ``--tiny`` (same code paths, seconds)."""

    def __init__(self, tiny: bool, device: torch.device):
        self.tiny = tiny
        self.device = device
        self.model = TINY if tiny else BIG
        self.max_length = 512 if tiny else 8192
        self.steps = 4 if tiny else 8  # optimizer steps per throughput run
        self.warmup = 1 if tiny else 3  # steps left out of the medians
        self.dtype = "bfloat16" if device.type == "cuda" else "float32"
        self.hf_flat_batch = 2 if tiny else 18  # ~8k tokens per step at mean length ~450
        self.hf_padded_batch = 2 if tiny else 4
        self.run_timeout = 300 if tiny else 240


def tiny_config() -> LlamaConfig:
    return LlamaConfig(**TINY, tie_word_embeddings=False)


def _row(device: torch.device, vocab: int) -> PackedBatch:
    total = sum(SEGMENTS)
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(1, vocab, (1, total), generator=generator)
    labels = torch.randint(1, vocab, (1, total), generator=generator)
    positions = torch.cat([torch.arange(n) for n in SEGMENTS]).unsqueeze(0)
    cu = torch.tensor([0, *np.cumsum(SEGMENTS).tolist()], dtype=torch.int32)
    batch = PackedBatch(ids, labels, positions, cu, max(SEGMENTS), torch.zeros_like(ids), 1)
    return batch.to(device)


def _kernel_model(reference: LlamaForCausalLM, kernel: str, dtype: torch.dtype) -> Any:
    model = copy.deepcopy(reference).to(dtype)
    model.config._attn_implementation = attention_name(kernel)
    return model.train()


def usable_kernels(device: torch.device, dtype: torch.dtype, config: Any) -> list[str]:
    needs = attention_needs(config)
    return [k for k in KERNELS if kernel_problem(k, device, needs, dtype, training=True) is None]


def exactness(plan: Plan) -> dict[str, Any]:
    """Packed row == each segment alone (logits); gradients == the SDPA kernel's."""
    register_attention()
    device = plan.device
    torch.manual_seed(0)
    config = tiny_config()
    base = LlamaForCausalLM(config).to(device)
    batch = _row(device, config.vocab_size)
    results: dict[str, Any] = {"tolerance": TOLERANCE}
    for dtype_name, dtype in DTYPES.items():
        reference = copy.deepcopy(base).to(dtype).eval()
        reference.config._attn_implementation = "eager"
        with torch.no_grad():
            alone, start = [], 0
            for length in SEGMENTS:
                ids = batch.input_ids[:, start : start + length]
                alone.append(reference(input_ids=ids, use_cache=False).logits[0].float())
                start += length
            expected = torch.cat(alone)
        grads: dict[str, dict[str, torch.Tensor]] = {}
        per_kernel: dict[str, Any] = {}
        kernels = usable_kernels(device, dtype, config)
        if device.type == "cpu":  # flex has no CPU backward: its forward is still checked
            kernels = [*kernels, "flex_attention"] if "flex_attention" not in kernels else kernels
        for kernel in kernels:
            model = _kernel_model(base, kernel, dtype)
            metadata = AttentionMetadata.for_batch(batch, kernel, attention_needs(config))
            with torch.no_grad():
                logits = model(
                    input_ids=batch.input_ids,
                    position_ids=batch.position_ids,
                    use_cache=False,
                    attention_metadata=metadata,
                ).logits[0]
            diff = float((logits.float() - expected).abs().max())
            entry: dict[str, Any] = {"max_abs_logit_diff_vs_segments_alone": diff}
            if kernel_problem(kernel, device, attention_needs(config), dtype, True) is None:
                total = int((batch.labels != -100).sum())
                (packed_loss(model, batch, 256).loss_sum / total).backward()
                grads[kernel] = {n: p.grad.float() for n, p in model.named_parameters()}
            entry["ok_logits"] = diff <= TOLERANCE[dtype_name]["logits_abs"]
            per_kernel[kernel] = entry
        for kernel, kernel_grads in grads.items():
            worst = max(
                float((kernel_grads[n] - g).abs().max() / g.abs().max().clamp_min(1e-12))
                for n, g in grads["sdpa"].items()
            )
            per_kernel[kernel]["max_rel_grad_diff_vs_sdpa"] = worst
            per_kernel[kernel]["ok_grads"] = worst <= TOLERANCE[dtype_name]["grads_rel"]
        per_kernel["compiled_layers"] = compiled_vs_eager(base, batch, dtype, device)
        results[dtype_name] = per_kernel
    return results


def compiled_vs_eager(base: Any, batch: PackedBatch, dtype: torch.dtype, device: torch.device):
    """Regional compile (per decoder layer, the default kernel) against the same model eager."""
    from evotune.parallel.parallelize import prepare_decoder_layers

    kernel = usable_kernels(device, dtype, base.config)[0]
    if "varlen" in usable_kernels(device, dtype, base.config):
        kernel = "varlen"
    total = int((batch.labels != -100).sum())
    eager = _kernel_model(base, kernel, dtype)
    compiled = _kernel_model(base, kernel, dtype)
    prepare_decoder_layers(compiled, checkpoint_every=1, compile=True)
    for model in (eager, compiled):
        (packed_loss(model, batch, 256).loss_sum / total).backward()
    worst = max(
        float((c.grad.float() - e.grad.float()).abs().max() / e.grad.float().abs().max())
        for c, e in zip(compiled.parameters(), eager.parameters(), strict=True)
    )
    limit = TOLERANCE["float32" if dtype == torch.float32 else "bfloat16"]["grads_rel"]
    return {"kernel": kernel, "max_rel_grad_diff": worst, "ok": worst <= limit}


def no_sync(plan: Plan) -> dict[str, Any]:
    """Forward + backward with the device set to raise on any host synchronisation."""
    if plan.device.type != "cuda":
        return {"skipped": "needs CUDA (set_sync_debug_mode)"}
    from evotune.parallel.dims import ParallelDims
    from evotune.parallel.engine import TorchEngine
    from evotune.parallel.parallelize import prepare_decoder_layers

    register_attention()
    config = tiny_config()
    torch.manual_seed(0)
    base = LlamaForCausalLM(config).to(plan.device)
    batch = _row(plan.device, config.vocab_size)
    results: dict[str, Any] = {}
    for kernel in usable_kernels(plan.device, torch.bfloat16, config):
        for compiled in (False, True):
            name = f"{kernel}{'_compiled' if compiled else ''}"
            model = _kernel_model(base, kernel, torch.bfloat16)
            if compiled:
                prepare_decoder_layers(model, checkpoint_every=1, compile=True)
            engine = TorchEngine(
                model,
                ParallelDims(),
                lr=1e-5,
                betas=(0.9, 0.95),
                eps=1e-8,
                weight_decay=0.0,
                weight_decay_scope="all",
                autocast_dtype=None,
                chunk_size=256,
                param_dtype=torch.bfloat16,
            )
            metadata = AttentionMetadata.for_batch(batch, kernel, attention_needs(config))
            try:
                for checked in (False, True):  # warm-up (compilation), then the check
                    torch.cuda.synchronize()
                    torch.cuda.set_sync_debug_mode("error" if checked else 0)
                    try:
                        outputs = model.model(
                            input_ids=batch.input_ids,
                            position_ids=batch.position_ids,
                            use_cache=False,
                            attention_metadata=metadata,
                        )
                        del outputs
                        engine.forward_backward(batch, 1e-3, 0.0, sync=True)
                    finally:
                        torch.cuda.set_sync_debug_mode(0)
                    engine.optimizer.zero_grad(set_to_none=True)
                results[name] = {"ok": True}
            except Exception as error:  # report which kernel synchronised, keep going
                results[name] = {"ok": False, "error": f"{type(error).__name__}: {error}"[:500]}
    return results


# -- the 1.9B throughput runs ----------------------------------------------------------------


def make_samples(plan: Plan, count: int, seed: int = 0) -> list[tuple[np.ndarray, int]]:
    rng = np.random.default_rng(seed)
    vocab = plan.model["vocab_size"]
    median = 60 if plan.tiny else 300
    lengths = np.clip(rng.lognormal(np.log(median), 0.9, count), 8, plan.max_length).astype(int)
    out = []
    for length in lengths:
        out.append((rng.integers(3, vocab, length), max(1, int(length * rng.uniform(0.2, 0.6)))))
    return out


def build_assets(plan: Plan, root: Path) -> dict[str, str]:
    from evotune.data.tokenize import write_ftdp_shard

    torch.manual_seed(0)
    config = LlamaConfig(**plan.model, tie_word_embeddings=False, pad_token_id=0)
    with torch.device(plan.device):
        model = LlamaForCausalLM(config)
    model = model.to(DTYPES[plan.dtype])
    model_dir = root / "model"
    model.save_pretrained(model_dir)
    parameters = sum(p.numel() for p in model.parameters())
    del model
    tokens_needed = plan.max_length * (plan.steps + 2)
    samples, total = [], 0
    for sample in make_samples(plan, 100_000):
        samples.append(sample)
        total += len(sample[0])
        if total >= tokens_needed * 1.3:
            break
    data = root / "data"
    write_ftdp_shard(
        data / "sft" / "part0.bin",
        [np.concatenate([-ids[:prompt], ids[prompt:]]).tolist() for ids, prompt in samples],
    )
    np.savez(
        root / "samples.npz",
        tokens=np.concatenate([ids for ids, _ in samples]),
        lengths=np.array([len(ids) for ids, _ in samples]),
        prompts=np.array([prompt for _, prompt in samples]),
    )
    return {
        "model": str(model_dir),
        "data": str(data),
        "parameters": parameters,
        "samples": len(samples),
        "median_sample_length": float(np.median([len(ids) for ids, _ in samples])),
    }


def _median(rows: list[dict[str, Any]], key: str) -> float | None:
    values = [r[key] for r in rows if r.get(key) is not None]
    return statistics.median(values) if values else None


def evotune_run(plan: Plan, root: Path, assets: dict[str, Any], name: str, extra: dict) -> dict:
    values = dict(
        pretrained_model_name_or_path=assets["model"],
        dataset_folder=assets["data"],
        max_length=plan.max_length,
        batch_size=1,
        accumulative_counts=1,
        total_steps=plan.steps,
        lr=1e-5,
        lr_schedule="constant",
        dtype=plan.dtype,
        save_steps=1_000_000,
        save_total_limit=1,
        report_to="none",
        seed=0,
    )
    values.update(extra.get("settings", {}))
    config = root / f"{name}.py"
    config.write_text("".join(f"{k} = {v!r}\n" for k, v in values.items()))
    work = root / f"work-{name}"
    command = [sys.executable, "-m", "evotune.cli", "train", str(config), "--work-dir", str(work)]
    command += ["--no-progress", *extra.get("cli", [])]
    started = time.time()
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=plan.run_timeout)
    except subprocess.TimeoutExpired:
        return {"exit": "timeout", "wall_s": time.time() - started}
    result: dict[str, Any] = {"exit": done.returncode, "wall_s": time.time() - started}
    if done.returncode:
        result["stderr_tail"] = done.stderr[-2000:]
        return result
    rows = [json.loads(line) for line in (work / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if "tokens_per_s" in r]
    measured = rows[plan.warmup :] or rows
    result["losses"] = [r["loss"] for r in rows]
    for key in ("tokens_per_s", "mfu", "hfu", "tflops_per_rank", "step_time_s"):
        result[key] = _median(measured, key)
    trainable = sum(r["trainable_tokens"] for r in measured)
    result["trainable_tokens_per_s"] = trainable / sum(r["step_time_s"] for r in measured)
    result["peak_memory_mib"] = max(r["peak_memory_mib"] for r in rows)
    log = (work / "train.log").read_text() if (work / "train.log").exists() else ""
    kernel_lines = [line for line in log.splitlines() if "attention kernel" in line]
    result["attention"] = kernel_lines[0].split("INFO ")[-1] if kernel_lines else None
    return result


def hf_child(args: argparse.Namespace) -> None:
    """One Hugging Face Trainer run (a child process): prints its figures as JSON."""
    import importlib.util

    from transformers import DataCollatorWithFlattening, Trainer, TrainerCallback, TrainingArguments

    from evotune.train.metrics import peak_flops, transformer_flops

    plan = Plan(args.tiny, torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    root = Path(args.assets)
    stored = np.load(root / "samples.npz")
    bounds = np.concatenate([[0], np.cumsum(stored["lengths"])])
    features = []
    for index, prompt in enumerate(stored["prompts"]):
        ids = stored["tokens"][bounds[index] : bounds[index + 1]].astype(np.int64)
        labels = ids.copy()
        labels[:prompt] = -100
        features.append({"input_ids": ids.tolist(), "labels": labels.tolist()})
    flat = args.child == "hf_flattening"
    attention = "sdpa"
    if plan.device.type == "cuda" and importlib.util.find_spec("flash_attn") is not None:
        attention = "flash_attention_2"
    model = LlamaForCausalLM.from_pretrained(
        root / "model", dtype=torch.float32, attn_implementation=attention
    ).to(plan.device)
    config = model.config

    def padded(batch: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        longest = max(len(f["input_ids"]) for f in batch)
        ids = torch.zeros((len(batch), longest), dtype=torch.long)
        labels = torch.full((len(batch), longest), -100, dtype=torch.long)
        mask = torch.zeros((len(batch), longest), dtype=torch.long)
        for row, feature in enumerate(batch):
            n = len(feature["input_ids"])
            ids[row, :n] = torch.tensor(feature["input_ids"])
            labels[row, :n] = torch.tensor(feature["labels"])
            mask[row, :n] = 1
        return {"input_ids": ids, "labels": labels, "attention_mask": mask}

    inner: Any = DataCollatorWithFlattening(return_position_ids=True) if flat else padded
    steps: list[dict[str, Any]] = []

    def collate(batch: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        lengths = [len(f["input_ids"]) for f in batch]
        out = inner(batch)
        steps.append(
            {
                "lengths": lengths,
                "trainable": int((out["labels"][:, 1:] != -100).sum()),
                "padded_tokens": int(out["input_ids"].numel()),
            }
        )
        return out

    class Timer(TrainerCallback):
        def __init__(self) -> None:
            self.ends: list[float] = []

        def on_step_begin(self, args, state, control, **kwargs):
            if plan.device.type == "cuda":
                torch.cuda.synchronize()

        def on_step_end(self, args, state, control, **kwargs):
            if plan.device.type == "cuda":
                torch.cuda.synchronize()
            self.ends.append(time.perf_counter())

    timer = Timer()
    if plan.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    trainer = Trainer(
        model=model,
        args=TrainingArguments(
            output_dir=str(root / args.child),
            per_device_train_batch_size=plan.hf_flat_batch if flat else plan.hf_padded_batch,
            max_steps=plan.steps,
            learning_rate=1e-5,
            lr_scheduler_type="constant",
            adam_beta2=0.95,
            weight_decay=0.0,
            max_grad_norm=1.0,
            bf16=plan.dtype == "bfloat16",
            logging_steps=1_000_000,
            save_strategy="no",
            report_to="none",
            disable_tqdm=True,
            dataloader_num_workers=0,
            use_cpu=plan.device.type == "cpu",
            seed=0,
            remove_unused_columns=False,
        ),
        train_dataset=features,
        data_collator=collate,
        callbacks=[timer],
    )
    trainer.train()
    first = plan.warmup
    times = np.diff(timer.ends)[first - 1 :] if len(timer.ends) > first else np.diff(timer.ends)
    measured = steps[first : first + len(times)]
    seconds = float(np.sum(times))
    tokens = sum(sum(s["lengths"]) for s in measured)
    flops = sum(transformer_flops(config, s["lengths"]) for s in measured)
    peak = peak_flops(plan.device)
    print(
        json.dumps(
            {
                "attention": attention,
                "batch_size": plan.hf_flat_batch if flat else plan.hf_padded_batch,
                "tokens_per_s": tokens / seconds,
                "trainable_tokens_per_s": sum(s["trainable"] for s in measured) / seconds,
                "padding_share": 1 - tokens / max(1, sum(s["padded_tokens"] for s in measured)),
                "step_time_s": float(np.median(times)),
                "mfu": flops / seconds / peak if peak else None,
                "peak_memory_mib": torch.cuda.max_memory_allocated() / 2**20
                if plan.device.type == "cuda"
                else None,
            }
        )
    )


def hf_run(plan: Plan, assets_root: Path, name: str) -> dict[str, Any]:
    command = [sys.executable, __file__, "--child", name, "--assets", str(assets_root)]
    command += ["--out", str(assets_root)] + (["--tiny"] if plan.tiny else [])
    started = time.time()
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=plan.run_timeout)
    except subprocess.TimeoutExpired:
        return {"exit": "timeout", "wall_s": time.time() - started}
    if done.returncode:
        return {"exit": done.returncode, "stderr_tail": done.stderr[-2000:]}
    result = json.loads(done.stdout.strip().splitlines()[-1])
    result.update(exit=0, wall_s=time.time() - started)
    return result


def compare_losses(reference: dict[str, Any], other: dict[str, Any]) -> dict[str, Any]:
    """DeepSpeed's per-step losses against the torch engine's (bf16: 2e-2 absolute)."""
    ours, theirs = reference.get("losses"), other.get("losses")
    if not ours or not theirs:
        return {"compared": False}
    worst = max(abs(a - b) for a, b in zip(ours, theirs, strict=False))
    return {"max_abs_loss_diff_vs_torch": worst, "ok": worst <= 2e-2}


# -- driver ----------------------------------------------------------------------------------


class Report:
    def __init__(self, out: Path, budget_s: float):
        self.out = out
        self.data: dict[str, Any] = {}
        self.started = time.time()
        self.budget_s = budget_s

    def left(self) -> float:
        return self.budget_s - (time.time() - self.started)

    def section(self, key: str, needs_s: float, work: Any) -> Any:
        if self.left() < needs_s:
            self.data[key] = {"skipped": f"time budget: {self.left():.0f}s left, needs ~{needs_s}"}
        else:
            began = time.time()
            try:
                self.data[key] = work()
            except Exception as error:
                self.data[key] = {"error": f"{type(error).__name__}: {error}"[:800]}
                self.data[key]["traceback"] = traceback.format_exc()[-1500:]
            if isinstance(self.data[key], dict):
                self.data[key]["section_s"] = round(time.time() - began, 1)
        self.write()
        return self.data[key]

    def write(self) -> None:
        self.data["elapsed_s"] = round(time.time() - self.started, 1)
        (self.out / "gpu_check.json").write_text(json.dumps(self.data, indent=2, default=str))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, type=Path, help="folder for gpu_check.json")
    parser.add_argument("--tiny", action="store_true", help="tiny sizes (any device, seconds)")
    parser.add_argument("--budget-s", type=float, default=450.0, help="stop starting sections")
    parser.add_argument("--scratch", type=Path, default=None, help="model and data folder")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--assets", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        hf_child(args)
        return
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cpu" and not args.tiny:
        raise SystemExit("no CUDA device: run with --tiny for the CPU smoke run")
    plan = Plan(args.tiny, device)
    args.out.mkdir(parents=True, exist_ok=True)
    report = Report(args.out, args.budget_s)
    import transformers

    report.data["environment"] = {
        "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "tiny": args.tiny,
        "deepspeed": _version("deepspeed"),
        "flash_attn": _version("flash_attn"),
        "kernels_bf16": usable_kernels(device, torch.bfloat16, tiny_config()),
    }
    report.section("exactness", 20, lambda: exactness(plan))
    report.section("no_sync", 20, lambda: no_sync(plan))
    scratch = args.scratch or Path(os.environ.get("TMPDIR", "/tmp")) / "evotune-gpu-check"
    scratch.mkdir(parents=True, exist_ok=True)
    assets = report.section("assets", 40, lambda: build_assets(plan, scratch))
    if "model" not in assets:
        return
    runs: list[tuple[str, float, Any]] = [
        ("evotune_default", 60, lambda: evotune_run(plan, scratch, assets, "default", {})),
        ("hf_padding_free", 60, lambda: hf_run(plan, scratch, "hf_flattening")),
        (
            "evotune_compile",
            100,
            lambda: evotune_run(plan, scratch, assets, "compile", {"settings": {"compile": True}}),
        ),
        (
            "deepspeed_zero2",
            70,
            lambda: evotune_run(
                plan, scratch, assets, "zero2", {"cli": ["--deepspeed", "deepspeed_zero2"]}
            ),
        ),
        (
            "deepspeed_zero3",
            80,
            lambda: evotune_run(
                plan, scratch, assets, "zero3", {"cli": ["--deepspeed", "deepspeed_zero3"]}
            ),
        ),
        (
            "fsdp2",
            70,
            lambda: evotune_run(plan, scratch, assets, "fsdp2", {"cli": ["--fsdp"]}),
        ),
        (
            "evotune_checkpointing",
            60,
            lambda: evotune_run(
                plan, scratch, assets, "ckpt", {"settings": {"gradient_checkpointing": True}}
            ),
        ),
        ("hf_padded", 60, lambda: hf_run(plan, scratch, "hf_padded")),
        (
            "evotune_compile_checkpointing",
            100,
            lambda: evotune_run(
                plan,
                scratch,
                assets,
                "compile_ckpt",
                {"settings": {"compile": True, "gradient_checkpointing": True}},
            ),
        ),
    ]
    for name, needs, work in runs:
        report.section(name, needs, work)
    default = report.data.get("evotune_default", {})
    for name in ("deepspeed_zero2", "deepspeed_zero3", "fsdp2"):
        if isinstance(report.data.get(name), dict):
            report.data[name]["losses_vs_torch"] = compare_losses(default, report.data[name])
    evotune_best = max(
        (report.data[k].get("tokens_per_s") or 0.0, k)
        for k in report.data
        if k.startswith("evotune_") and isinstance(report.data[k], dict)
    )
    hf = report.data.get("hf_padding_free", {}).get("tokens_per_s")
    best_mfu = report.data.get(evotune_best[1], {}).get("mfu")
    report.data["targets"] = {
        "best_evotune_setting": evotune_best[1],
        "best_mfu": best_mfu,
        "mfu_at_least_40_percent": None if best_mfu is None else best_mfu >= 0.40,
        "speedup_vs_hf_padding_free": evotune_best[0] / hf if hf else None,
        "at_least_2x_hf_padding_free": None if not hf else evotune_best[0] / hf >= 2.0,
    }
    report.write()
    print(json.dumps(report.data, indent=2, default=str))


def _version(package: str) -> str | None:
    with contextlib.suppress(Exception):
        from importlib.metadata import version

        return version(package)
    return None


if __name__ == "__main__":
    main()
