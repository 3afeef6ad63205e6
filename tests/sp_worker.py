"""Run under torchrun with 2 gloo processes: Ulysses SP loss/gradients vs the whole row.

Writes max differences to the JSON file given as argv[1] (from rank 0).
"""

from __future__ import annotations

import json
import sys

import torch
import torch.distributed as dist
from transformers import LlamaConfig, LlamaForCausalLM

from evotune.data import PackedBatch
from evotune.model.attention import attention_name, register_attention
from evotune.model.loss import packed_loss_sum
from evotune.parallel.sequence import SequenceParallel

SEGMENTS = [7, 12, 5, 9]  # 33 tokens: padded to 34, the slice edge at 17 cuts segment 2


def row() -> PackedBatch:
    generator = torch.Generator().manual_seed(1)
    total = sum(SEGMENTS)
    ids = torch.randint(1, 128, (1, total), generator=generator)
    labels = torch.randint(1, 128, (1, total), generator=generator)
    labels[0, :3] = -100  # a masked prompt
    labels[0, 19:28] = -100  # most of the second slice is masked: unequal trainable counts
    positions = torch.cat([torch.arange(n) for n in SEGMENTS]).unsqueeze(0)
    cu = torch.tensor([0, *torch.tensor(SEGMENTS).cumsum(0).tolist()], dtype=torch.int32)
    return PackedBatch(ids, labels, positions, cu, max(SEGMENTS), torch.zeros_like(ids), 1)


def model_for(kernel: str, kv_heads: int, checkpointing: bool) -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=kv_heads,
        tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(config)
    model.config._attn_implementation = attention_name(kernel)
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.train()
    return model


def compare(kernel: str, kv_heads: int, checkpointing: bool, sp: SequenceParallel) -> dict:
    batch = row()
    trainable = batch.num_trainable
    with_grad = kernel != "flex_attention"  # FlexAttention has no CPU backward

    reference = model_for(kernel, kv_heads, checkpointing)
    with torch.set_grad_enabled(with_grad):
        whole = packed_loss_sum(reference, batch) / trainable
    if with_grad:
        whole.backward()

    model = model_for(kernel, kv_heads, checkpointing)
    local_batch = sp.split(batch)
    local_trainable = local_batch.num_trainable
    with torch.set_grad_enabled(with_grad):
        local = packed_loss_sum(model, local_batch, sequence_parallel=sp) / trainable
    if with_grad:
        local.backward()
    summed = local.detach().clone()
    dist.all_reduce(summed)
    counts = torch.tensor([local_trainable])
    gathered = [torch.zeros_like(counts) for _ in range(sp.size)]
    dist.all_gather(gathered, counts)
    result = {
        "loss_diff": abs(float(summed) - float(whole)),
        "loss": float(whole),
        "slice_trainable": [int(c) for c in gathered],
    }
    if with_grad:
        worst = 0.0
        for p, q in zip(model.parameters(), reference.parameters(), strict=True):
            grad = p.grad.clone()
            dist.all_reduce(grad)  # partial gradients of one pack add up over the group
            scale = q.grad.abs().max().clamp_min(1e-12)
            worst = max(worst, float((grad - q.grad).abs().max() / scale))
        result["grad_max_rel_diff"] = worst
    return result


def main() -> None:
    dist.init_process_group("gloo")
    register_attention()
    sp = SequenceParallel(dist.get_world_size(), dist.get_rank(), dist.group.WORLD)
    results = {}
    for kernel, kv_heads, checkpointing in [
        ("sdpa", 2, False),
        ("sdpa", 1, False),
        ("sdpa", 2, True),
        ("eager", 4, False),
        ("flex_attention", 2, False),
    ]:
        key = f"{kernel}-kv{kv_heads}-ckpt{int(checkpointing)}"
        results[key] = compare(kernel, kv_heads, checkpointing, sp)
    if dist.get_rank() == 0:
        with open(sys.argv[1], "w") as handle:
            json.dump(results, handle, indent=2)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
