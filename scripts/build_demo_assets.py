"""Rebuild the embedded demo: tokenizer, tiny Llama model and ftdp data under demo/.

Text: docstrings of the Python standard library of the running interpreter
(PSF licence). Each sample is a prompt naming the object (masked, no loss)
followed by its docstring (trained). Deterministic for a given Python build.

    python scripts/build_demo_assets.py [--tokens 200000]
"""

from __future__ import annotations

import argparse
import ast
import shutil
import sysconfig
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from evotune.data.tokenize import sft_sample, write_ftdp_shard

ROOT = Path(__file__).resolve().parent.parent
DEMO = ROOT / "demo"
VOCAB_SIZE = 2048
SHARDS_PER_SUBSET = 2


def stdlib_docstrings() -> dict[str, list[tuple[str, str]]]:
    """(qualified name, docstring) of module-level and function/class docstrings."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    by_kind: dict[str, list[tuple[str, str]]] = {"modules": [], "functions": []}
    for path in sorted(stdlib.glob("*.py")):
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError):
            continue
        module = path.stem
        doc = ast.get_docstring(tree)
        if doc and len(doc) > 80:
            by_kind["modules"].append((module, doc.strip()))
        for node in ast.walk(tree):
            if isinstance(node, ast.FunctionDef | ast.ClassDef) and not node.name.startswith("_"):
                doc = ast.get_docstring(node)
                if doc and len(doc) > 40:
                    by_kind["functions"].append((f"{module}.{node.name}", doc.strip()))
    return by_kind


def train_tokenizer(texts: list[str]) -> PreTrainedTokenizerFast:
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=["<unk>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, unk_token="<unk>", bos_token="<s>", eos_token="</s>"
    )


def build_model(tokenizer: PreTrainedTokenizerFast) -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=VOCAB_SIZE,
        hidden_size=64,
        intermediate_size=192,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        rope_theta=10000.0,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=False,
    )
    return LlamaForCausalLM(config)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--tokens", type=int, default=200_000, help="token budget of the data")
    args = parser.parse_args()

    documents = stdlib_docstrings()
    all_text = [doc for items in documents.values() for _, doc in items]
    tokenizer = train_tokenizer(all_text)
    model = build_model(tokenizer)

    if DEMO.exists():
        shutil.rmtree(DEMO)
    model_dir = DEMO / "model"
    model.save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)

    budget = {"modules": args.tokens // 4, "functions": args.tokens - args.tokens // 4}
    for kind, items in documents.items():
        samples, used = [], 0
        for name, doc in items:
            prompt = tokenizer.encode(f"Explain {name}:\n", add_special_tokens=False)
            response = tokenizer.encode(doc, add_special_tokens=False)[:400]
            sample = sft_sample(prompt, response, tokenizer.bos_token_id, tokenizer.eos_token_id)
            if used + len(sample) > budget[kind]:
                break
            samples.append(sample)
            used += len(sample)
        per_shard = -(-len(samples) // SHARDS_PER_SUBSET)
        for shard in range(SHARDS_PER_SUBSET):
            part = samples[shard * per_shard : (shard + 1) * per_shard]
            write_ftdp_shard(DEMO / "data" / "en" / kind / f"part-{shard:03d}.bin", part)
        print(f"{kind}: {len(samples)} samples, {used} tokens")
    print(f"wrote {DEMO}")


if __name__ == "__main__":
    main()
