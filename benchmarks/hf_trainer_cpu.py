"""evotune against the Hugging Face Trainer (and TRL's packed SFTTrainer) on CPU, fp32.

Same model (Llama: hidden 256, 4 layers, intermediate 688, vocab 32k, ~19.6M
parameters, random init saved once), same samples (3000 SFT-like samples: log-normal
lengths, median ~300, clipped to 16..4096; the first 20-60% of each sample is a masked
prompt), the same optimizer settings (AdamW lr 1e-4 constant, betas 0.9/0.95,
weight decay 0.01, clip 1.0), one CPU thread each. Measured: real trainable tokens
(targets that carry loss) per second of the training loop after its first step
(data loading included; start-up, the warm-up step and saving excluded).

Contenders, ~4k tokens per optimizer step each:
* evotune: ``evotune train`` in this process (run_training): InternEvo packs of 4096
  tokens, varlen SDPA, fused LM head + loss;
* hf_padded: Trainer, batches of 8 padded to their longest sample, random order;
* hf_group_by_length: the same with train_sampling_strategy='group_by_length';
* hf_flattening: Trainer with DataCollatorWithFlattening (padding-free rows of 8
  samples, position_ids; transformers builds the block mask for SDPA);
* trl_packed: TRL's SFTTrainer, packing='bfd' into 4096-token rows, completion-only
  loss (when trl is installed).

Rounds are interleaved (round r: every contender trains the same r-th slice of the
samples, ``--round-tokens`` tokens, from the same initial weights); medians of
per-round figures and of per-round ratios, so a busy machine slows all alike. A
torch.profiler table of one evotune step names where its time goes.

    python benchmarks/hf_trainer_cpu.py --out benchmarks/results/hf_trainer_cpu.json
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

THREADS = os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from transformers import (  # noqa: E402
    DataCollatorWithFlattening,
    LlamaConfig,
    LlamaForCausalLM,
    Trainer,
    TrainerCallback,
    TrainingArguments,
)

VOCAB = 32000
MAX_LENGTH = 4096
HF_BATCH = 8


def make_samples(count: int, seed: int) -> list[tuple[np.ndarray, int]]:
    """(token ids, prompt length) pairs."""
    rng = np.random.default_rng(seed)
    lengths = np.clip(rng.lognormal(np.log(300), 0.9, count), 16, MAX_LENGTH).astype(int)
    samples = []
    for length in lengths:
        ids = rng.integers(3, VOCAB, length)
        prompt = max(1, int(length * rng.uniform(0.2, 0.6)))
        samples.append((ids, prompt))
    return samples


def slices(samples, round_tokens: int, rounds: int) -> list[list[tuple[np.ndarray, int]]]:
    out, current, tokens = [], [], 0
    for sample in samples:
        current.append(sample)
        tokens += len(sample[0])
        if tokens >= round_tokens:
            out.append(current)
            current, tokens = [], 0
            if len(out) == rounds:
                break
    if len(out) < rounds:
        raise SystemExit("not enough samples for the requested rounds; lower --round-tokens")
    return out


def save_model(folder: Path) -> Path:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=256,
        intermediate_size=688,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=MAX_LENGTH,
        tie_word_embeddings=False,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    LlamaForCausalLM(config).save_pretrained(folder)
    return folder


# -- evotune -------------------------------------------------------------------------------


def run_evotune(root: Path, model: Path, samples, name: str) -> dict[str, float]:
    from evotune.data.tokenize import write_ftdp_shard
    from evotune.train.run import run_training

    data = root / f"{name}-data"
    write_ftdp_shard(
        data / "sft" / "part0.bin",
        [np.concatenate([-ids[:prompt], ids[prompt:]]).tolist() for ids, prompt in samples],
    )
    config = root / f"{name}.py"
    settings = dict(
        pretrained_model_name_or_path=str(model),
        dataset_folder=str(data),
        max_length=MAX_LENGTH,
        batch_size=1,
        accumulative_counts=1,
        max_epochs=1,
        lr=1e-4,
        lr_schedule="constant",
        weight_decay=0.01,
        max_norm=1.0,
        save_steps=1_000_000,
        save_total_limit=1,
        report_to="none",
        log_interval=1_000_000,
    )
    config.write_text("".join(f"{k} = {v!r}\n" for k, v in settings.items()))
    work = root / f"{name}-work"
    code = run_training(config, [], str(work), show_progress=False)
    if code:
        raise SystemExit(f"evotune failed ({code}); see {work}/train.log")
    records = [json.loads(line) for line in (work / "metrics.jsonl").read_text().splitlines()]
    records = [r for r in records if "trainable_tokens" in r]
    if len(records) < 2:
        raise SystemExit("evotune trained fewer than 2 steps; raise --round-tokens")
    elapsed = records[-1]["time"] - records[0]["time"]  # after the first (warm-up) step
    trainable = sum(r["trainable_tokens"] for r in records[1:])
    return {"trainable_tokens": trainable, "seconds": elapsed, "steps": len(records)}


def profile_evotune_step(model_dir: Path, samples) -> list[dict[str, Any]]:
    """Self CPU time per op of one evotune step (forward, backward, AdamW) on a 4096-token row."""
    from evotune.data import PackedBatch
    from evotune.model.load import load_model
    from evotune.parallel.dims import ParallelDims
    from evotune.parallel.engine import TorchEngine

    model = load_model(str(model_dir), "sdpa")
    engine = TorchEngine(
        model,
        ParallelDims(),
        lr=1e-4,
        betas=(0.9, 0.95),
        eps=1e-8,
        weight_decay=0.01,
        weight_decay_scope="all",
        autocast_dtype=None,
        chunk_size=4096,
    )
    ids, labels, positions, bounds = [], [], [], [0]
    for tokens, prompt in samples:
        room = MAX_LENGTH - bounds[-1]
        if room <= 0:
            break
        tokens = tokens[:room]
        target = np.roll(tokens, -1)
        target[: max(prompt - 1, 0)] = -100
        target[-1] = -100
        ids.append(tokens)
        labels.append(target)
        positions.append(np.arange(len(tokens)))
        bounds.append(bounds[-1] + len(tokens))

    def row(parts: list[np.ndarray]) -> torch.Tensor:
        return torch.from_numpy(np.concatenate(parts)).long()[None]

    batch = PackedBatch(
        row(ids),
        row(labels),
        row(positions),
        torch.tensor(bounds, dtype=torch.int32),
        max(b - a for a, b in itertools.pairwise(bounds)),
        torch.zeros_like(row(ids)),
        1,
    )
    weight = 1.0 / int((batch.labels != -100).sum())

    def step() -> None:
        engine.forward_backward(batch, weight, 0.0, sync=True)
        engine.update(1e-4, 1.0, True)

    step()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profile:
        step()
    table = profile.key_averages()
    total = sum(event.self_cpu_time_total for event in table)
    top = sorted(table, key=lambda event: event.self_cpu_time_total, reverse=True)[:12]
    return [
        {
            "op": event.key,
            "self_cpu_share": round(event.self_cpu_time_total / total, 4),
            "calls": event.count,
        }
        for event in top
    ]


def profile_notes(profile: list[dict[str, Any]]) -> list[str]:
    """Where evotune's step goes, by kind of op (shares of the profiled self CPU time)."""
    groups = {
        "matmuls (projections, MLP, LM head forward and input gradient)": ("aten::mm", "aten::bmm"),
        "LM-head weight gradient accumulated in the fused loss": ("aten::addmm_",),
        "varlen attention (SDPA flash for CPU, forward + backward)": ("attention",),
        "loss softmax (log_softmax, exp_, masking)": ("log_softmax", "exp_", "masked_fill"),
    }
    shares = {
        name: sum(op["self_cpu_share"] for op in profile if any(k in op["op"] for k in keys))
        for name, keys in groups.items()
    }
    lines = [f"{share:.0%} {name}" for name, share in shares.items()]
    lines.append(f"{1 - sum(shares.values()):.0%} the rest (elementwise ops, AdamW, norms)")
    return [
        "evotune's step on one 4096-token row (torch.profiler, self CPU time): " + "; ".join(lines),
        "Matrix products dominate (the model's useful work); the LM head is not run twice "
        "(fused loss) and only rows with a target reach it on CPU; attention runs per "
        "segment on 4-D tensors (PyTorch's CPU flash kernel, O(segment) memory).",
    ]


# -- Hugging Face --------------------------------------------------------------------------


class StepTimer(TrainerCallback):
    """Wall time at the end of every optimizer step."""

    def __init__(self):
        self.ends: list[float] = []

    def on_step_end(self, args, state, control, **kwargs):
        self.ends.append(time.perf_counter())


class CountingCollator:
    """Wraps a collator; remembers each batch's targets (labels after the causal shift)."""

    def __init__(self, inner: Any):
        self.inner = inner
        self.targets: list[int] = []

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        batch = self.inner(features)
        self.targets.append(int((batch["labels"][:, 1:] != -100).sum()))
        return batch


def loop_rate(timer: StepTimer, counter: CountingCollator) -> dict[str, float]:
    """Targets per second after the first (warm-up) step, as for evotune."""
    steps = len(timer.ends)
    if steps < 2:
        raise SystemExit("a Hugging Face run trained fewer than 2 steps; raise --round-tokens")
    return {
        "trainable_tokens": sum(counter.targets[1:steps]),
        "seconds": timer.ends[-1] - timer.ends[0],
        "steps": steps,
    }


def padded_collate(features: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
    longest = max(len(f["input_ids"]) for f in features)
    ids = torch.zeros((len(features), longest), dtype=torch.long)
    labels = torch.full((len(features), longest), -100, dtype=torch.long)
    mask = torch.zeros((len(features), longest), dtype=torch.long)
    for row, feature in enumerate(features):
        n = len(feature["input_ids"])
        ids[row, :n] = torch.tensor(feature["input_ids"])
        labels[row, :n] = torch.tensor(feature["labels"])
        mask[row, :n] = 1
    return {"input_ids": ids, "labels": labels, "attention_mask": mask}


def hf_features(samples) -> list[dict[str, list[int]]]:
    features = []
    for ids, prompt in samples:
        labels = ids.copy()
        labels[:prompt] = -100
        features.append({"input_ids": ids.tolist(), "labels": labels.tolist()})
    return features


def hf_arguments(root: Path, name: str, batch: int, **extra: Any) -> TrainingArguments:
    return TrainingArguments(
        output_dir=str(root / name),
        per_device_train_batch_size=batch,
        num_train_epochs=1,
        learning_rate=1e-4,
        lr_scheduler_type="constant",
        adam_beta2=0.95,
        weight_decay=0.01,
        max_grad_norm=1.0,
        optim="adamw_torch",
        logging_steps=1_000_000,
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
        dataloader_num_workers=0,
        use_cpu=True,
        seed=0,
        remove_unused_columns=False,
        **extra,
    )


def run_hf(root: Path, model_dir: Path, samples, kind: str, name: str) -> dict[str, float]:
    model = LlamaForCausalLM.from_pretrained(model_dir, attn_implementation="sdpa").train()
    features = hf_features(samples)
    extra: dict[str, Any] = {}
    collate: Any = padded_collate
    if kind == "group_by_length":
        extra["train_sampling_strategy"] = "group_by_length"
    elif kind == "flattening":
        collate = DataCollatorWithFlattening(return_position_ids=True)
    timer, counter = StepTimer(), CountingCollator(collate)
    trainer = Trainer(
        model=model,
        args=hf_arguments(root, name, HF_BATCH, **extra),
        train_dataset=features,
        data_collator=counter,
        callbacks=[timer],
    )
    trainer.train()
    return loop_rate(timer, counter)


def word_tokenizer() -> Any:
    """A tokenizer object TRL can hold: one word per id (the data is already token ids)."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    vocab = {f"t{i}": i for i in range(VOCAB)}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="t0"))
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="t0", bos_token="t1", eos_token="t2", unk_token="t0"
    )


def run_trl(root: Path, model_dir: Path, samples, name: str) -> dict[str, float]:
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    model = LlamaForCausalLM.from_pretrained(model_dir, attn_implementation="sdpa").train()
    dataset = Dataset.from_list(
        [
            {"input_ids": ids.tolist(), "completion_mask": [0] * prompt + [1] * (len(ids) - prompt)}
            for ids, prompt in samples
        ]
    )
    base = hf_arguments(root, name, 1).to_dict()
    base.update(
        packing=True,
        packing_strategy="bfd",
        max_length=MAX_LENGTH,
        completion_only_loss=True,
        dataset_num_proc=None,
    )
    for key in list(base):
        if key.startswith("_") or key not in SFTConfig.__dataclass_fields__:
            base.pop(key)
    timer = StepTimer()
    trainer = SFTTrainer(
        model=model,
        args=SFTConfig(**base),
        train_dataset=dataset,
        processing_class=word_tokenizer(),
        callbacks=[timer],
    )
    counter = CountingCollator(trainer.data_collator)
    trainer.data_collator = counter
    trainer.train()
    return loop_rate(timer, counter)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--samples", type=int, default=3000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--round-tokens", type=int, default=16_000)
    parser.add_argument("--skip", nargs="*", default=[], help="contenders to leave out")
    args = parser.parse_args()
    torch.set_num_threads(int(THREADS))
    samples = make_samples(args.samples, seed=0)
    lengths = [len(ids) for ids, _ in samples]
    try:
        import trl  # noqa: F401

        have_trl = True
    except ImportError:
        have_trl = False
    contenders = ["evotune", "hf_padded", "hf_group_by_length", "hf_flattening"]
    contenders += ["trl_packed"] if have_trl else []
    contenders = [c for c in contenders if c not in args.skip]
    runs: dict[str, list[dict[str, float]]] = {c: [] for c in contenders}
    with tempfile.TemporaryDirectory(prefix="evotune-hf-bench-") as scratch:
        root = Path(scratch)
        model_dir = save_model(root / "model")
        for index, part in enumerate(slices(samples, args.round_tokens, args.rounds)):
            for contender in contenders:
                name = f"{contender}-{index}"
                if contender == "evotune":
                    result = run_evotune(root, model_dir, part, name)
                elif contender == "trl_packed":
                    result = run_trl(root, model_dir, part, name)
                else:
                    kind = contender.removeprefix("hf_")
                    result = run_hf(root, model_dir, part, kind, name)
                result["trainable_tokens_per_s"] = result["trainable_tokens"] / result["seconds"]
                runs[contender].append(result)
                print(name, json.dumps(result), file=sys.stderr, flush=True)
        profile = profile_evotune_step(model_dir, samples)
    report: dict[str, Any] = {
        "what": "real trainable tokens/s of the training loop, fp32 CPU, one thread each",
        "settings": {
            "threads": int(THREADS),
            "samples": args.samples,
            "rounds": args.rounds,
            "round_tokens": args.round_tokens,
            "median_sample_length": statistics.median(lengths),
            "mean_sample_length": float(np.mean(lengths)),
            "max_length": MAX_LENGTH,
            "hf_batch_size": HF_BATCH,
            "torch": torch.__version__,
        },
    }
    for contender, values in runs.items():
        report[contender] = {
            "median_trainable_tokens_per_s": statistics.median(
                v["trainable_tokens_per_s"] for v in values
            ),
            "rounds": values,
        }
    for contender in contenders:
        if contender != "evotune" and "evotune" in runs:
            ratios = [
                e["trainable_tokens_per_s"] / o["trainable_tokens_per_s"]
                for e, o in zip(runs["evotune"], runs[contender], strict=True)
            ]
            report[f"evotune_vs_{contender}"] = statistics.median(ratios)
    report["evotune_step_profile_top_ops"] = profile
    report["notes"] = profile_notes(profile)
    text = json.dumps(report, indent=2)
    print(text)
    if args.out is not None:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
