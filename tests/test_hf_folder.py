"""The streamed HF folder: what save_pretrained writes, one decoder layer at a time.

Compared with save_pretrained on the same model: the same tensor names (MoE
experts back in their on-disk format, tied weights once) and values, sharded
folders that from_pretrained loads, shards that never exceed the limit. A MoE run
on the torch engine resumes although its HF folder renames the experts.
"""

from __future__ import annotations

import json

import pytest
import torch
from runner import records, run_cli, run_train
from safetensors.torch import load_file
from tiny import save_tiny_llama, tiny_llama_config, write_config, write_corpus
from transformers import AutoConfig, AutoModelForCausalLM, LlamaForCausalLM

from evotune.model.hf_folder import INDEX_FILE, SINGLE_FILE, read_hf_weights, write_hf_folder
from evotune.model.layers import decoder_layers, weight_groups
from evotune.parallel.engine import host_copies


def _mixtral() -> torch.nn.Module:
    config = AutoConfig.for_model(
        "mixtral",
        vocab_size=128,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_local_experts=4,
        num_experts_per_tok=2,
    )
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config)


def _stream(model, folder, dtype=torch.float32, **options):
    groups = (host_copies(group, dtype) for group in weight_groups(model))
    return write_hf_folder(folder, model, groups, dtype, **options)


def _assert_same_folder(ours, theirs):
    expected, got = read_hf_weights(theirs), read_hf_weights(ours)
    assert sorted(got) == sorted(expected)
    for name, tensor in expected.items():
        assert got[name].dtype == tensor.dtype, name
        assert torch.equal(got[name], tensor), name


def test_weight_groups_hold_each_tensor_once_a_layer_at_a_time():
    model = LlamaForCausalLM(tiny_llama_config(num_hidden_layers=3, tie_word_embeddings=True))
    groups = weight_groups(model)
    assert len(groups) == len(decoder_layers(model)) + 1
    for index, group in enumerate(groups[:-1]):
        assert all(name.startswith(f"model.layers.{index}.") for name in group)
    assert sorted(groups[-1]) == ["model.embed_tokens.weight", "model.norm.weight"]
    names = [name for group in groups for name in group]
    assert len(names) == len(set(names)) == len(model.state_dict()) - 1  # lm_head is tied


@pytest.mark.parametrize("tied", [False, True])
def test_single_file_equals_save_pretrained(tmp_path, tied):
    torch.manual_seed(0)
    model = LlamaForCausalLM(tiny_llama_config(tie_word_embeddings=tied))
    model.save_pretrained(tmp_path / "theirs")
    writer = _stream(model, tmp_path / "ours")
    assert not writer.renamed
    assert not (tmp_path / "ours" / INDEX_FILE).exists()
    _assert_same_folder(tmp_path / "ours", tmp_path / "theirs")
    config = json.loads((tmp_path / "ours" / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"] and config["dtype"] == "float32"
    assert (tmp_path / "ours" / "generation_config.json").is_file()
    reloaded = LlamaForCausalLM.from_pretrained(tmp_path / "ours")
    for name, tensor in model.state_dict().items():
        assert torch.equal(reloaded.state_dict()[name], tensor), name


def test_shards_stay_under_the_limit_and_load(tmp_path):
    torch.manual_seed(0)
    model = LlamaForCausalLM(tiny_llama_config(num_hidden_layers=3))
    limit = 40_000  # bytes: a few bf16 projections per shard
    writer = _stream(model, tmp_path / "hf", torch.bfloat16, max_shard_bytes=limit)
    folder = tmp_path / "hf"
    index = json.loads((folder / INDEX_FILE).read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) == len(writer.shards) > 3
    assert shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    assert not (folder / SINGLE_FILE).exists() and not list(folder.glob(".shard-*"))
    for shard in shards:
        tensors = load_file(str(folder / shard))
        size = sum(t.numel() * t.element_size() for t in tensors.values())
        assert size <= limit or len(tensors) == 1, shard  # an oversized tensor stands alone
    assert index["metadata"]["total_size"] == writer.total_bytes
    reloaded = LlamaForCausalLM.from_pretrained(folder, dtype=torch.bfloat16)
    for name, tensor in model.state_dict().items():
        assert torch.equal(reloaded.state_dict()[name], tensor.to(torch.bfloat16)), name
    assert json.loads((folder / "config.json").read_text())["dtype"] == "bfloat16"


def test_moe_experts_are_saved_in_their_on_disk_format(tmp_path):
    model = _mixtral()
    model.save_pretrained(tmp_path / "theirs")
    writer = _stream(model, tmp_path / "ours")
    assert writer.renamed  # the fused in-memory experts are split per expert on disk
    _assert_same_folder(tmp_path / "ours", tmp_path / "theirs")
    assert any(".experts.3." in name for name in read_hf_weights(tmp_path / "ours"))
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "ours")
    for name, tensor in model.state_dict().items():
        assert torch.equal(reloaded.state_dict()[name], tensor), name


@pytest.mark.integration
def test_a_moe_run_resumes_on_the_torch_engine(tmp_path):
    """The HF folder renames the experts, so the exact weights go to master_weights."""
    _mixtral().save_pretrained(tmp_path / "model")
    data = write_corpus(tmp_path / "data", shards=2, samples=30)
    config = write_config(tmp_path / "c.py", tmp_path / "model", data, total_steps=3, save_steps=1)
    straight = run_train(config, tmp_path / "straight")
    assert straight.returncode == 0, straight.stderr[-3000:]
    checkpoint = tmp_path / "straight" / "checkpoint-0000002"
    assert (checkpoint / "master_weights.safetensors").is_file()
    resumed = run_train(config, tmp_path / "resumed", "--resume", str(checkpoint))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert records(tmp_path / "resumed")[-1]["loss"] == records(tmp_path / "straight")[-1]["loss"]


@pytest.mark.integration
def test_a_run_with_sharded_folders_resumes_and_exports(tmp_path):
    """save_shard_size_mb splits hf/; resume (fp32: the weights come from hf/) and export."""
    model = save_tiny_llama(tmp_path / "model")
    data = write_corpus(tmp_path / "data", shards=2, samples=30)
    config = write_config(
        tmp_path / "c.py", model, data, total_steps=3, save_steps=1, save_shard_size_mb=0.02
    )
    straight = run_train(config, tmp_path / "straight")
    assert straight.returncode == 0, straight.stderr[-3000:]
    checkpoint = tmp_path / "straight" / "checkpoint-0000002"
    index = json.loads((checkpoint / "hf" / INDEX_FILE).read_text())
    assert len(set(index["weight_map"].values())) > 3
    assert not (checkpoint / "master_weights.safetensors").exists()  # hf/ holds them exactly
    resumed = run_train(config, tmp_path / "resumed", "--resume", str(checkpoint))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert records(tmp_path / "resumed")[-1]["loss"] == records(tmp_path / "straight")[-1]["loss"]
    exported = run_cli("export", str(checkpoint), "-o", str(tmp_path / "out"))
    assert exported.returncode == 0, exported.stderr[-3000:]
    reloaded = LlamaForCausalLM.from_pretrained(tmp_path / "out")
    for name, tensor in read_hf_weights(checkpoint / "hf").items():
        assert torch.equal(reloaded.state_dict()[name], tensor), name


def test_sharded_folder_reads_back_whole(tmp_path):
    model = LlamaForCausalLM(tiny_llama_config())
    _stream(model, tmp_path / "hf", max_shard_bytes=10_000)
    weights = read_hf_weights(tmp_path / "hf")
    assert sorted(weights) == sorted(model.state_dict())
