"""InternEvo checkpoints and InternLM2 HF folders -> Llama, checked by logits."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from tiny import tiny_llama_config
from transformers import AutoModelForCausalLM, LlamaForCausalLM

from evotune.convert.checkpoints import convert_internevo_checkpoint
from evotune.convert.internlm2 import ConversionError, deinterleave_rotary

HEADS, KV_HEADS, HIDDEN, LAYERS = 4, 2, 64, 4


class Opaque:
    """Stands for any non-tensor object a pickle could smuggle in."""


@pytest.fixture(scope="module")
def original():
    torch.manual_seed(0)
    config = tiny_llama_config(
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        num_key_value_heads=KV_HEADS,
        hidden_size=HIDDEN,
        rope_theta=1_000_000.0,
        rms_norm_eps=1e-5,
    )
    return LlamaForCausalLM(config).eval()


def _interleave(weight, heads):
    """HF half-split rotary rows -> InternEvo adapt_hf=False interleaved rows (per head)."""
    rows, columns = weight.shape
    head_dim = rows // heads
    per_head = weight.reshape(heads, 2, head_dim // 2, columns).transpose(1, 2)
    return per_head.reshape(rows, columns)


def _llama2_layer(state, layer, interleave):
    """InternEvo's LLAMA2 layout: separate wq/wk/wv."""
    prefix = f"model.layers.{layer}."
    q = state[prefix + "self_attn.q_proj.weight"]
    k = state[prefix + "self_attn.k_proj.weight"]
    if interleave:
        q, k = _interleave(q, HEADS), _interleave(k, KV_HEADS)
    fused = _internlm2_layer(state, layer, interleave)
    del fused["attention.wqkv.weight"]
    return {
        **fused,
        "attention.wq.weight": q,
        "attention.wk.weight": k,
        "attention.wv.weight": state[prefix + "self_attn.v_proj.weight"],
    }


def _internlm2_layer(state, layer, interleave):
    prefix = f"model.layers.{layer}."
    q = state[prefix + "self_attn.q_proj.weight"]
    k = state[prefix + "self_attn.k_proj.weight"]
    v = state[prefix + "self_attn.v_proj.weight"]
    if interleave:
        q, k = _interleave(q, HEADS), _interleave(k, KV_HEADS)
    head_dim = HIDDEN // HEADS
    groups = HEADS // KV_HEADS
    wqkv = torch.cat(
        [
            q.reshape(KV_HEADS, groups, head_dim, HIDDEN),
            k.reshape(KV_HEADS, 1, head_dim, HIDDEN),
            v.reshape(KV_HEADS, 1, head_dim, HIDDEN),
        ],
        dim=1,
    ).reshape(-1, HIDDEN)
    return {
        "attention.wqkv.weight": wqkv,
        "attention.wo.weight": state[prefix + "self_attn.o_proj.weight"],
        "attention_norm.weight": state[prefix + "input_layernorm.weight"],
        "ffn_norm.weight": state[prefix + "post_attention_layernorm.weight"],
        "feed_forward.w1.weight": state[prefix + "mlp.gate_proj.weight"],
        "feed_forward.w3.weight": state[prefix + "mlp.up_proj.weight"],
        "feed_forward.w2.weight": state[prefix + "mlp.down_proj.weight"],
    }


def _tp_slice(name, tensor, rank, tp, embed_split_hidden):
    dims = {
        "attention.wo.weight": 1,
        "feed_forward.w2.weight": 1,
        "attention.wqkv.weight": 0,
        "attention.wq.weight": 0,
        "attention.wk.weight": 0,
        "attention.wv.weight": 0,
        "feed_forward.w1.weight": 0,
        "feed_forward.w3.weight": 0,
        "output.weight": 0,
    }
    if name.endswith("tok_embeddings.weight"):
        dim = 1 if embed_split_hidden else 0
    else:
        dim = next((d for suffix, d in dims.items() if name.endswith(suffix)), None)
    if dim is None:
        return tensor.clone()
    return tensor.chunk(tp, dim=dim)[rank].clone()


def write_internevo_checkpoint(
    model, folder, tp, pp, adapt_hf, embed_split_hidden, layer_layout=_internlm2_layer
):
    state = model.state_dict()
    folder.mkdir(parents=True)
    per_stage = LAYERS // pp
    for stage in range(pp):
        full = {}
        if stage == 0:
            full["model.tok_embeddings.weight"] = state["model.embed_tokens.weight"]
        for local in range(per_stage):
            for rest, tensor in layer_layout(
                state, stage * per_stage + local, not adapt_hf
            ).items():
                full[f"model.layers.{local}.{rest}"] = tensor
            full[f"model.layers.{local}.attention.rotary_emb.inv_freq"] = torch.ones(8)
        if stage == pp - 1:
            full["model.norm.weight"] = state["model.norm.weight"]
            full["model.output.weight"] = state["lm_head.weight"]
        for rank in range(tp):
            shard = {
                k: _tp_slice(k, v, rank, tp, embed_split_hidden).to(torch.bfloat16)
                for k, v in full.items()
            }
            torch.save(shard, folder / f"model_tp{rank}_pp{stage}.pt")
    torch.save(
        dict(
            num_layers=LAYERS,
            hidden_size=HIDDEN,
            num_attention_heads=HEADS,
            num_kv_attention_heads=KV_HEADS,
            vocab_size=128,
            mlp_ratio=2.0,
            rope_base=1_000_000,
            layer_norm_epsilon=1e-5,
            adapt_hf=adapt_hf,
            embed_split_hidden=embed_split_hidden,
            max_position_embeddings=512,
            dtype="torch.bfloat16",
        ),
        folder / "model_config.pt",
    )


def _assert_matches_bf16_original(folder, original):
    """InternEvo stores bf16: compare with the original model rounded to bf16."""
    converted = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    reference = LlamaForCausalLM(original.config)
    rounded = {k: v.to(torch.bfloat16).float() for k, v in original.state_dict().items()}
    reference.load_state_dict(rounded)
    torch.testing.assert_close(_logits(converted), _logits(reference.eval()), atol=1e-5, rtol=1e-5)


def _logits(model):
    ids = torch.arange(1, 40).unsqueeze(0) % 127 + 1
    with torch.no_grad():
        return model(ids).logits.float()


@pytest.mark.parametrize("adapt_hf", [True, False])
@pytest.mark.parametrize("embed_split_hidden", [True, False])
def test_internevo_checkpoint_round_trip(tmp_path, original, adapt_hf, embed_split_hidden):
    write_internevo_checkpoint(original, tmp_path / "ckpt", 2, 2, adapt_hf, embed_split_hidden)
    out = convert_internevo_checkpoint(tmp_path / "ckpt", tmp_path / "hf")
    _assert_matches_bf16_original(out, original)


@pytest.mark.parametrize("adapt_hf", [True, False])
def test_llama2_layout_round_trip(tmp_path, original, adapt_hf):
    write_internevo_checkpoint(
        original, tmp_path / "ckpt", 2, 2, adapt_hf, False, layer_layout=_llama2_layer
    )
    out = convert_internevo_checkpoint(tmp_path / "ckpt", tmp_path / "hf", model_type="LLAMA2")
    _assert_matches_bf16_original(out, original)
    with pytest.raises(ConversionError, match="look like LLAMA2"):
        convert_internevo_checkpoint(
            tmp_path / "ckpt", tmp_path / "hf2", model_type="INTERNLM2_PUBLIC"
        )


def test_model_settings_from_config_file_pt(tmp_path, original):
    write_internevo_checkpoint(original, tmp_path / "ckpt", 1, 2, True, False)
    (tmp_path / "ckpt" / "model_config.pt").unlink()
    text = (
        f"SEQ_LEN = 64\nmodel = dict(num_layers={LAYERS}, hidden_size={HIDDEN}, "
        f"num_attention_heads={HEADS}, num_kv_attention_heads={KV_HEADS}, "
        "rope_base=1000000, layer_norm_epsilon=1e-5, adapt_hf=True)\n"
    )
    torch.save(text, tmp_path / "ckpt" / "config_file.pt")
    out = convert_internevo_checkpoint(tmp_path / "ckpt", tmp_path / "hf")
    _assert_matches_bf16_original(out, original)


def test_rotary_layout_permutation_is_undone():
    weight = torch.randn(HEADS * 16, HIDDEN)
    stored = _interleave(weight, HEADS)
    assert not torch.equal(stored, weight)
    torch.testing.assert_close(deinterleave_rotary(stored, HEADS), weight, rtol=0, atol=0)


@pytest.mark.integration
def test_cli_and_refusals(tmp_path, original):
    write_internevo_checkpoint(original, tmp_path / "ckpt", 2, 1, True, False)
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "evotune.cli",
            "convert",
            "internevo-ckpt",
            str(tmp_path / "ckpt"),
            "-o",
            str(tmp_path / "hf"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    (tmp_path / "ckpt" / "model_tp0_pp0.pt").unlink()
    with pytest.raises(ConversionError, match=r"missing shards \['model_tp0_pp0.pt'\]"):
        convert_internevo_checkpoint(tmp_path / "ckpt", tmp_path / "hf2")
    (tmp_path / "ckpt" / "model_tp1_pp0.pt").rename(tmp_path / "ckpt" / "model_tp0_pp0.pt")
    with pytest.raises(ConversionError, match="is a tensor-parallel shard missing"):
        convert_internevo_checkpoint(tmp_path / "ckpt", tmp_path / "hf2")

    bad = tmp_path / "bad"
    bad.mkdir()
    torch.save({"x": Opaque()}, bad / "model_config.pt")  # an arbitrary class: refused
    torch.save({}, bad / "model_tp0_pp0.pt")
    with pytest.raises(ConversionError, match="weights_only=True"):
        convert_internevo_checkpoint(bad, tmp_path / "hf3")


@pytest.mark.integration
def test_internlm2_hf_folder_to_llama(tmp_path, original):
    state = original.state_dict()
    weights = {
        "model.tok_embeddings.weight": state["model.embed_tokens.weight"],
        "model.norm.weight": state["model.norm.weight"],
        "output.weight": state["lm_head.weight"],
    }
    for layer in range(LAYERS):
        for rest, tensor in _internlm2_layer(state, layer, interleave=False).items():
            weights[f"model.layers.{layer}.{rest}"] = tensor
    folder = tmp_path / "internlm2"
    folder.mkdir()
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in weights.items()}, str(folder / "model.safetensors"))
    (folder / "config.json").write_text(
        json.dumps(
            dict(
                model_type="internlm2",
                architectures=["InternLM2ForCausalLM"],
                vocab_size=128,
                hidden_size=HIDDEN,
                intermediate_size=128,
                num_hidden_layers=LAYERS,
                num_attention_heads=HEADS,
                num_key_value_heads=KV_HEADS,
                rms_norm_eps=1e-5,
                rope_theta=1_000_000.0,
                max_position_embeddings=512,
                bias=False,
                tie_word_embeddings=False,
                auto_map={"AutoModelForCausalLM": "x.InternLM2ForCausalLM"},
            )
        )
    )
    (folder / "tokenizer_config.json").write_text("{}")
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "evotune.cli",
            "convert",
            "internlm2-to-llama",
            str(folder),
            "-o",
            str(tmp_path / "llama"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    for implementation in ("eager", "sdpa"):
        converted = AutoModelForCausalLM.from_pretrained(
            tmp_path / "llama", attn_implementation=implementation
        )
        torch.testing.assert_close(
            _logits(converted.eval()), _logits(original), atol=1e-5, rtol=1e-5
        )
    assert (tmp_path / "llama" / "tokenizer_config.json").is_file()


@pytest.mark.parametrize("down_name", ["mlp.w3.weight", "mlp.w2.weight"])  # after / before Feb 2024
def test_internlm_v1_round_trip(tmp_path, down_name):
    torch.manual_seed(0)
    config = tiny_llama_config(
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        num_key_value_heads=HEADS,
        hidden_size=HIDDEN,
        intermediate_size=192,
        attention_bias=True,
        rms_norm_eps=1e-5,
    )
    original = LlamaForCausalLM(config).eval()
    state = original.state_dict()
    up_name = "mlp.w2.weight" if down_name == "mlp.w3.weight" else "mlp.w3.weight"
    tp, pp, per_stage = 2, 2, LAYERS // 2
    folder = tmp_path / "ckpt"
    folder.mkdir()
    for stage in range(pp):
        for rank in range(tp):

            def shard(tensor, dim, rank=rank):
                return tensor.chunk(tp, dim=dim)[rank].clone()

            out = {}
            if stage == 0:
                out["model.embedding.weight"] = shard(state["model.embed_tokens.weight"], 0)
            for local in range(per_stage):
                p = f"model.layers.{stage * per_stage + local}."
                b = f"model.blocks.{local}."
                qkv_w = torch.stack([state[p + f"self_attn.{x}_proj.weight"] for x in "qkv"])
                qkv_b = torch.stack([state[p + f"self_attn.{x}_proj.bias"] for x in "qkv"])
                head_dim = HIDDEN // HEADS
                out[b + "mixer.Wqkv.weight"] = shard(
                    qkv_w.reshape(3, HEADS, head_dim, HIDDEN), 1
                ).reshape(-1, HIDDEN)
                out[b + "mixer.Wqkv.bias"] = shard(qkv_b.reshape(3, HEADS, head_dim), 1).reshape(-1)
                out[b + "mixer.out_proj.weight"] = shard(state[p + "self_attn.o_proj.weight"], 1)
                out[b + "mixer.out_proj.bias"] = state[p + "self_attn.o_proj.bias"].clone()
                out[b + "norm1.weight"] = state[p + "input_layernorm.weight"].clone()
                out[b + "norm2.weight"] = state[p + "post_attention_layernorm.weight"].clone()
                out[b + "mlp.w1.weight"] = shard(state[p + "mlp.gate_proj.weight"], 0)
                out[b + up_name] = shard(state[p + "mlp.up_proj.weight"], 0)
                out[b + down_name] = shard(state[p + "mlp.down_proj.weight"], 1)
            if stage == pp - 1:
                out["model.norm.weight"] = state["model.norm.weight"].clone()
                out["model.head.weight"] = shard(state["lm_head.weight"], 0)
            torch.save(out, folder / f"model_tp{rank}_pp{stage}.pt")
    torch.save(
        dict(
            num_layers=LAYERS,
            hidden_size=HIDDEN,
            num_attention_heads=HEADS,
            vocab_size=128,
            layer_norm_epsilon=1e-5,
            embed_split_hidden=False,
            max_position_embeddings=512,
        ),
        folder / "model_config.pt",
    )
    out_dir = convert_internevo_checkpoint(folder, tmp_path / "hf", model_type="INTERNLM")
    converted = AutoModelForCausalLM.from_pretrained(out_dir).eval()
    torch.testing.assert_close(_logits(converted), _logits(original), atol=1e-5, rtol=1e-5)
