"""InternLM2 straight from its HF folder: loaded as Llama in memory, trained, written back.

The tests write a tiny InternLM2-layout folder themselves (config.json with
InternLM2 keys and auto_map, safetensors with InternLM2 names, fused wqkv built
here from a Llama model's q/k/v): no download, no remote code is ever run.
"""

from __future__ import annotations

import itertools
import json
import subprocess
import sys

import pytest
import torch
from runner import run_train
from safetensors.torch import load_file, save_file
from tiny import save_tiny_llama, tiny_llama_config, write_config, write_corpus
from transformers import LlamaForCausalLM

from evotune.convert.checkpoints import export_as_internlm2
from evotune.data import PackedBatch
from evotune.errors import ConfigError, ConversionError
from evotune.model.attention import AttentionMetadata
from evotune.model.load import load_model
from evotune.model.loss import packed_loss

HEADS, KV_HEADS, HIDDEN, LAYERS = 4, 2, 64, 2
REMOTE_CODE = ("configuration_internlm2.py", "modeling_internlm2.py")
AUTO_MAP = {
    "AutoConfig": "configuration_internlm2.InternLM2Config",
    "AutoModelForCausalLM": "modeling_internlm2.InternLM2ForCausalLM",
}


def _fused_wqkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """InternLM2's layout, written independently of evotune: per KV head [q x groups, k, v]."""
    head_dim, groups = HIDDEN // HEADS, HEADS // KV_HEADS
    rows = []
    for kv_head in range(KV_HEADS):
        for group in range(groups):
            head = kv_head * groups + group
            rows.append(q[head * head_dim : (head + 1) * head_dim])
        rows.append(k[kv_head * head_dim : (kv_head + 1) * head_dim])
        rows.append(v[kv_head * head_dim : (kv_head + 1) * head_dim])
    return torch.cat(rows)


def internlm2_weights(llama: LlamaForCausalLM) -> dict[str, torch.Tensor]:
    state = llama.state_dict()
    weights = {
        "model.tok_embeddings.weight": state["model.embed_tokens.weight"],
        "model.norm.weight": state["model.norm.weight"],
        "output.weight": state["lm_head.weight"],
    }
    for layer in range(LAYERS):
        llama_prefix, prefix = f"model.layers.{layer}.", f"model.layers.{layer}."
        weights[prefix + "attention.wqkv.weight"] = _fused_wqkv(
            state[llama_prefix + "self_attn.q_proj.weight"],
            state[llama_prefix + "self_attn.k_proj.weight"],
            state[llama_prefix + "self_attn.v_proj.weight"],
        )
        for ours, theirs in (
            ("self_attn.o_proj", "attention.wo"),
            ("input_layernorm", "attention_norm"),
            ("post_attention_layernorm", "ffn_norm"),
            ("mlp.gate_proj", "feed_forward.w1"),
            ("mlp.up_proj", "feed_forward.w3"),
            ("mlp.down_proj", "feed_forward.w2"),
        ):
            weights[f"{prefix}{theirs}.weight"] = state[f"{llama_prefix}{ours}.weight"]
    return {name: tensor.contiguous() for name, tensor in weights.items()}


INTERNLM2_CONFIG = dict(
    architectures=["InternLM2ForCausalLM"],
    model_type="internlm2",
    auto_map=AUTO_MAP,
    attn_implementation="eager",
    bias=False,
    hidden_act="silu",
    vocab_size=128,
    hidden_size=HIDDEN,
    intermediate_size=128,
    num_hidden_layers=LAYERS,
    num_attention_heads=HEADS,
    num_key_value_heads=KV_HEADS,
    max_position_embeddings=512,
    rms_norm_eps=1e-5,
    rope_theta=1_000_000.0,
    rope_scaling=None,
    tie_word_embeddings=False,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=2,
    torch_dtype="float32",
)


@pytest.fixture(scope="module")
def original() -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = tiny_llama_config(
        num_hidden_layers=LAYERS, rope_theta=1_000_000.0, rms_norm_eps=1e-5, bos_token_id=1
    )
    return LlamaForCausalLM(config).eval()


@pytest.fixture()
def internlm2_folder(tmp_path, original):
    folder = tmp_path / "internlm2-tiny"
    folder.mkdir()
    save_file(internlm2_weights(original), str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps(INTERNLM2_CONFIG))
    (folder / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 512}))
    for name in REMOTE_CODE:  # never imported: evotune runs no remote code
        (folder / name).write_text("raise RuntimeError('remote code must not run')\n")
    return folder


def _row() -> PackedBatch:
    lengths = [7, 12, 5]
    generator = torch.Generator().manual_seed(3)
    ids = torch.randint(3, 128, (1, sum(lengths)), generator=generator)
    labels = torch.roll(ids, -1, dims=1)
    positions = torch.cat([torch.arange(n) for n in lengths]).unsqueeze(0)
    cu = torch.tensor([0, 7, 19, 24], dtype=torch.int32)
    return PackedBatch(ids, labels, positions, cu, 12, torch.zeros_like(ids), 1)


def _logits(model, batch: PackedBatch) -> torch.Tensor:
    metadata = AttentionMetadata.for_batch(batch, "sdpa")
    with torch.no_grad():
        return model(
            input_ids=batch.input_ids,
            position_ids=batch.position_ids,
            use_cache=False,
            attention_metadata=metadata,
        ).logits[0]


def _reference_logits(original: LlamaForCausalLM, batch: PackedBatch) -> torch.Tensor:
    """Each sample alone through the original Llama with transformers' eager attention."""
    original.config._attn_implementation = "eager"
    pieces = []
    bounds = batch.segment_bounds
    with torch.no_grad():
        for start, end in itertools.pairwise(bounds):
            pieces.append(original(input_ids=batch.input_ids[:, start:end]).logits[0])
    return torch.cat(pieces)


def test_internlm2_folder_loads_as_llama_in_memory(internlm2_folder, original):
    before = sorted(p.name for p in internlm2_folder.iterdir())
    model = load_model(str(internlm2_folder))
    assert type(model) is LlamaForCausalLM
    assert sorted(p.name for p in internlm2_folder.iterdir()) == before  # nothing written
    batch = _row()
    torch.testing.assert_close(
        _logits(model, batch), _reference_logits(original, batch), atol=1e-5, rtol=1e-5
    )


def test_loaded_internlm2_trains(internlm2_folder):
    model = load_model(str(internlm2_folder), gradient_checkpointing=True)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    batch = _row()
    losses = []
    for _ in range(4):
        loss = packed_loss(model, batch).loss_sum / batch.num_trainable
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(float(loss.detach()))
    assert losses[-1] < losses[0] - 0.1, losses


def test_export_as_internlm2_round_trip(internlm2_folder, tmp_path):
    model = load_model(str(internlm2_folder))
    llama_folder = tmp_path / "trained-llama"
    model.save_pretrained(llama_folder)  # what a checkpoint's hf/ holds
    (llama_folder / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 512}))
    exported = export_as_internlm2(llama_folder, tmp_path / "back")
    original_weights = load_file(str(internlm2_folder / "model.safetensors"))
    written = load_file(str(exported / "model.safetensors"))
    assert written.keys() == original_weights.keys()
    for name, tensor in original_weights.items():
        assert torch.equal(written[name], tensor), name
    config = json.loads((exported / "config.json").read_text())
    for key, value in INTERNLM2_CONFIG.items():
        assert config[key] == value, key
    for name in (*REMOTE_CODE, "tokenizer_config.json"):
        assert (exported / name).is_file(), name
    reloaded = load_model(str(exported))
    batch = _row()
    torch.testing.assert_close(_logits(reloaded, batch), _logits(model, batch), atol=0, rtol=0)


def test_export_refers_to_hub_code_when_the_source_was_a_hub_id(internlm2_folder, tmp_path):
    from evotune.convert.checkpoints import INTERNLM2_CONFIG_KEY, read_internlm2_hf

    config, weights = read_internlm2_hf(internlm2_folder, source="internlm/internlm2-7b")
    assert getattr(config, INTERNLM2_CONFIG_KEY)["source"] == "internlm/internlm2-7b"
    llama_folder = tmp_path / "llama"
    LlamaForCausalLM.from_pretrained(None, config=config, state_dict=weights).save_pretrained(
        llama_folder
    )
    exported = export_as_internlm2(llama_folder, tmp_path / "back")
    auto_map = json.loads((exported / "config.json").read_text())["auto_map"]
    assert auto_map["AutoModelForCausalLM"] == (
        "internlm/internlm2-7b--modeling_internlm2.InternLM2ForCausalLM"
    )


def test_export_refuses_what_internlm2_cannot_hold(tmp_path):
    folder = save_tiny_llama(tmp_path / "biased", attention_bias=True)
    with pytest.raises(ConversionError, match="attention_bias=True has no InternLM2 equivalent"):
        export_as_internlm2(folder, tmp_path / "out")


def test_other_remote_code_is_refused_in_one_line(tmp_path):
    folder = tmp_path / "remote"
    folder.mkdir()
    (folder / "config.json").write_text(
        json.dumps({"model_type": "fancy_lm", "auto_map": {"AutoModel": "modeling_fancy.Fancy"}})
    )
    with pytest.raises(ConfigError, match=r"remote code.*'fancy_lm'") as error:
        load_model(str(folder))
    assert "\n" not in str(error.value)
    (folder / "config.json").write_text(json.dumps({"model_type": "fancy_lm"}))
    with pytest.raises(ConfigError, match="model_type 'fancy_lm', which this transformers"):
        load_model(str(folder))


@pytest.mark.integration
def test_refusal_through_the_cli_is_exit_2(tmp_path):
    model = tmp_path / "remote"
    model.mkdir()
    (model / "config.json").write_text(
        json.dumps({"model_type": "fancy_lm", "auto_map": {"AutoModel": "modeling_fancy.Fancy"}})
    )
    data = write_corpus(tmp_path / "data", shards=1, samples=10)
    config = write_config(tmp_path / "run.py", model, data)
    result = run_train(config, tmp_path / "work")
    assert result.returncode == 2, result.stderr[-2000:]
    assert "remote code" in result.stderr.strip().splitlines()[-1]


@pytest.mark.integration
def test_train_from_internlm2_folder_and_export_both_formats(internlm2_folder, tmp_path):
    data = write_corpus(tmp_path / "data", shards=2, samples=30)
    config = write_config(
        tmp_path / "run.py", internlm2_folder, data, total_steps=2, accumulative_counts=1
    )
    # FSDP2: rank 0 converts the weights in memory, the other rank reads the config only
    result = run_train(config, tmp_path / "work", "--fsdp", nproc=2)
    assert result.returncode == 0, result.stderr[-3000:]
    checkpoint = sorted((tmp_path / "work").glob("checkpoint-*"))[-1]
    for fmt in ("llama", "internlm2"):
        exported = subprocess.run(
            [
                sys.executable,
                "-m",
                "evotune.cli",
                "export",
                str(checkpoint),
                "-o",
                str(tmp_path / fmt),
                "--format",
                fmt,
            ],
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert exported.returncode == 0, exported.stderr[-3000:]
    assert json.loads((tmp_path / "llama" / "config.json").read_text())["model_type"] == "llama"
    assert (tmp_path / "internlm2" / "modeling_internlm2.py").is_file()
    batch = _row()
    torch.testing.assert_close(
        _logits(load_model(str(tmp_path / "internlm2")), batch),
        _logits(load_model(str(tmp_path / "llama")), batch),
        atol=0,
        rtol=0,
    )
