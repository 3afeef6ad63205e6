"""TorchEngine precision: fp32 exactly a plain AdamW loop; bf16 parameters with fp32 masters.

* fp32: the engine's step is bit-identical to a hand-written packed loss + clip +
  AdamW loop (nothing added for mixed precision touches fp32 runs).
* bf16 parameters (mixed_precision='bf16_params'): the model holds bf16 copies of
  fp32 masters, AdamW state is fp32, micro-batch gradients accumulate in fp32, and
  20 steps track the fp32 run: every step's loss within 0.01 absolute (the loss
  falls from 4.87 to 2.53; measured: bf16 parameters differ by at most 3.7e-3,
  autocast by 1.5e-3, pure bf16 weights without masters by 0.086).
* A checkpoint of a bf16 run resumes bit-identically (fp32 masters and AdamW state
  saved beside the bf16 HF folder), engine-level and through the CLI.
* DDP on 2 gloo processes with bf16 parameters, reducing in fp32 or bf16, tracks the
  single-process run.
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from tiny import save_tiny_llama, tiny_llama_config, write_config, write_corpus
from transformers import LlamaForCausalLM

from evotune.config.validate import validate
from evotune.data import PackedBatch
from evotune.errors import ConfigError
from evotune.model.attention import attention_name, register_attention
from evotune.model.loss import packed_loss
from evotune.parallel.dims import ParallelDims
from evotune.parallel.engine import TorchEngine, optimizer_param_groups

LR = 3e-3
OPTIMIZER = dict(betas=(0.9, 0.95), eps=1e-8, weight_decay=0.01, weight_decay_scope="all")
LOSS_TRACKING = 0.01


def _rows(count: int, seed: int = 0) -> list[PackedBatch]:
    generator = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(count):
        lengths = [int(n) for n in torch.randint(3, 30, (4,), generator=generator)]
        ids = torch.randint(1, 128, (1, sum(lengths)), generator=generator)
        labels = torch.roll(ids, -1, dims=1).clone()
        labels[0, :3] = -100
        positions = torch.cat([torch.arange(n) for n in lengths]).unsqueeze(0)
        cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
        rows.append(PackedBatch(ids, labels, positions, cu, max(lengths), torch.zeros_like(ids), 1))
    return rows


ROWS = _rows(4)  # cycled, so the loss falls visibly within 20 steps


def _model(seed: int = 0) -> LlamaForCausalLM:
    register_attention()
    torch.manual_seed(seed)
    model = LlamaForCausalLM(tiny_llama_config())
    model.config._attn_implementation = attention_name("sdpa")
    return model.train()


def _engine(model, mode: str) -> TorchEngine:
    precision = {
        "fp32": {"autocast_dtype": None},
        "bf16_params": {"autocast_dtype": None, "param_dtype": torch.bfloat16},
        "autocast": {"autocast_dtype": torch.bfloat16},
    }[mode]
    return TorchEngine(model, ParallelDims(), lr=LR, chunk_size=64, **OPTIMIZER, **precision)


def _train(engine: TorchEngine, steps: range, micro_batches: int = 2) -> list[float]:
    losses = []
    for step in steps:
        batches = [ROWS[(step * micro_batches + i) % len(ROWS)] for i in range(micro_batches)]
        total = 0.0
        for index, batch in enumerate(batches):
            weight = 1.0 / (batch.num_trainable * micro_batches)
            parts = engine.forward_backward(batch, weight, 0.0, sync=index == micro_batches - 1)
            total += float(parts.loss_sum) * weight
        engine.update(LR, 1.0, True)
        losses.append(total)
    return losses


def test_fp32_engine_is_bit_identical_to_a_plain_adamw_loop():
    model = _model()
    reference = copy.deepcopy(model)
    engine_losses = _train(_engine(model, "fp32"), range(3))
    optimizer = torch.optim.AdamW(
        optimizer_param_groups(reference, 0.01, "all"), lr=LR, betas=(0.9, 0.95), eps=1e-8
    )
    plain_losses = []
    for step in range(3):
        total = 0.0
        for index in range(2):
            batch = ROWS[(step * 2 + index) % len(ROWS)]
            weight = 1.0 / (batch.num_trainable * 2)
            loss_sum = packed_loss(reference, batch, 64).loss_sum
            (loss_sum * weight * 1.0).backward()
            total += float(loss_sum.detach()) * weight
        torch.nn.utils.clip_grad_norm_(list(reference.parameters()), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        plain_losses.append(total)
    assert engine_losses == plain_losses
    for (name, ours), theirs in zip(
        model.state_dict().items(), reference.state_dict().values(), strict=True
    ):
        assert ours.dtype == torch.float32 and torch.equal(ours, theirs), name


def test_bf16_runs_track_the_fp32_run_for_20_steps():
    fp32 = _train(_engine(_model(), "fp32"), range(20))
    assert fp32[0] - min(fp32[-4:]) > 0.3  # the run learns: the comparison is not flat
    for mode in ("bf16_params", "autocast"):
        losses = _train(_engine(_model(), mode), range(20))
        worst = max(abs(a - b) for a, b in zip(losses, fp32, strict=True))
        assert worst < LOSS_TRACKING, (mode, worst)


def test_a_run_without_master_weights_would_not_track():
    """The bound above can fail: bf16 weights updated in place lose the small AdamW steps."""
    fp32 = _train(_engine(_model(), "fp32"), range(20))
    model = _model().to(torch.bfloat16)
    engine = TorchEngine(
        model, ParallelDims(), lr=LR, chunk_size=64, autocast_dtype=None, **OPTIMIZER
    )
    engine.optimizer = torch.optim.AdamW(model.parameters(), lr=LR, betas=(0.9, 0.95))
    pure_bf16 = _train(engine, range(20))
    assert max(abs(a - b) for a, b in zip(pure_bf16, fp32, strict=True)) > LOSS_TRACKING


def test_bf16_parameters_are_rounded_fp32_masters():
    model = _model()
    original = {n: p.detach().clone() for n, p in model.named_parameters()}
    engine = _engine(model, "bf16_params")
    inv_freq = model.model.rotary_emb.inv_freq
    assert inv_freq.dtype == torch.float32  # buffers keep their precision
    for (name, parameter), master in zip(model.named_parameters(), engine.masters, strict=True):
        assert parameter.dtype == torch.bfloat16 and master.dtype == torch.float32
        assert torch.equal(master, original[name])  # the masters start from the fp32 weights
    _train(engine, range(3))
    for parameter, master in zip(engine.master_params, engine.masters, strict=True):
        assert torch.equal(parameter, master.to(torch.bfloat16))
        assert parameter.grad is None
    states = [s for state in engine.optimizer.state.values() for s in state.values()]
    assert all(s.dtype == torch.float32 for s in states if s.ndim > 0)


def test_micro_batch_gradients_accumulate_in_fp32():
    engines = [_engine(_model(), "bf16_params") for _ in range(3)]
    first, second = ROWS[0], ROWS[1]
    engines[0].forward_backward(first, 0.5, 0.0, sync=False)
    engines[0].forward_backward(second, 0.25, 0.0, sync=True)
    engines[1].forward_backward(first, 0.5, 0.0, sync=True)
    engines[2].forward_backward(second, 0.25, 0.0, sync=True)
    for both, alone_first, alone_second in zip(*(e.masters for e in engines), strict=True):
        assert both.grad.dtype == torch.float32
        assert torch.equal(both.grad, alone_first.grad + alone_second.grad)


def _save(engine: TorchEngine, folder: Path) -> None:
    folder.mkdir()
    engine.save_state(folder, weights_saved_exactly=False)


def test_bf16_checkpoint_resumes_bit_identically(tmp_path):
    straight = _engine(_model(), "bf16_params")
    straight_losses = _train(straight, range(6))
    first = _engine(_model(), "bf16_params")
    _train(first, range(3))
    _save(first, tmp_path / "ckpt")
    from safetensors.torch import load_file

    saved = load_file(str(tmp_path / "ckpt" / "master_weights.safetensors"))
    assert all(v.dtype == torch.float32 for v in saved.values())
    resumed = _engine(_model(seed=1), "bf16_params")  # other weights: all come from the file
    resumed.load_state(tmp_path / "ckpt")
    assert _train(resumed, range(3, 6)) == straight_losses[3:]
    for ours, theirs in zip(resumed.masters, straight.masters, strict=True):
        assert torch.equal(ours, theirs)
    for ours, theirs in zip(resumed.master_params, straight.master_params, strict=True):
        assert torch.equal(ours, theirs)


def test_tied_embeddings_train_and_resume_with_masters(tmp_path):
    def tied_engine(seed):
        register_attention()
        torch.manual_seed(seed)
        model = LlamaForCausalLM(tiny_llama_config(tie_word_embeddings=True))
        model.config._attn_implementation = attention_name("sdpa")
        return _engine(model.train(), "bf16_params")

    engine = tied_engine(0)
    assert engine.model.lm_head.weight is engine.model.model.embed_tokens.weight
    _train(engine, range(2))
    _save(engine, tmp_path / "tied")
    resumed = tied_engine(1)
    resumed.load_state(tmp_path / "tied")
    assert _train(resumed, range(2, 4)) == _train(engine, range(2, 4))


def _settings(**values):
    base = dict(pretrained_model_name_or_path="m", dataset_folder="d")
    return validate(Path("config.py"), base | values)


def test_precision_settings_are_checked():
    assert _settings(dtype="bfloat16", mixed_precision="autocast").mixed_precision == "autocast"
    with pytest.raises(ConfigError, match="mixed_precision: 'autocast' applies to dtype="):
        _settings(mixed_precision="autocast")
    with pytest.raises(ConfigError, match="reduce_dtype: set for the torch and FSDP2 engines"):
        _settings(reduce_dtype="bfloat16", deepspeed="deepspeed_zero2")
    assert _settings(reduce_dtype="bfloat16", engine="fsdp2").reduce_dtype == "bfloat16"
    with pytest.raises(ConfigError, match="'autocast' is the torch engine's"):
        _settings(dtype="bfloat16", mixed_precision="autocast", engine="fsdp2")


# -- through the CLI: resume and DDP ---------------------------------------------------------


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("precision")
    return root, save_tiny_llama(root / "model"), write_corpus(root / "data", samples=60)


@pytest.mark.integration
def test_cli_bf16_resume_is_bit_identical(assets):
    from runner import losses, run_train
    from safetensors.torch import load_file

    from evotune.train.checkpoint import checkpoint_name

    root, model, data = assets
    settings = dict(dtype="bfloat16", total_steps=4, save_steps=2, save_total_limit=-1)
    config = write_config(root / "bf16.py", model, data, **settings)
    straight = run_train(config, root / "straight")
    assert straight.returncode == 0, straight.stderr[-3000:]
    resumed = run_train(
        config, root / "resumed", "--resume", str(root / "straight" / checkpoint_name(2))
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert losses(root / "resumed") == losses(root / "straight")[2:]
    for name in ("master_weights.safetensors", "hf/model.safetensors"):
        ours = load_file(str(root / "resumed" / checkpoint_name(4) / name))
        theirs = load_file(str(root / "straight" / checkpoint_name(4) / name))
        assert ours.keys() == theirs.keys()
        assert all(torch.equal(ours[k], theirs[k]) for k in ours), name
    hf = load_file(str(root / "straight" / checkpoint_name(4) / "hf" / "model.safetensors"))
    assert all(v.dtype == torch.bfloat16 for v in hf.values())


@pytest.mark.integration
@pytest.mark.parametrize(
    "engine, reduce_dtype", [("ddp", "float32"), ("ddp", "bfloat16"), ("fsdp2", "bfloat16")]
)
def test_bf16_parameters_on_two_processes_track_one_process(assets, engine, reduce_dtype):
    """DDP's all-reduce and FSDP2's reduce-scatter, in fp32 or bf16."""
    from runner import losses, run_train

    root, model, data = assets
    single = write_config(
        root / "one.py", model, data, dtype="bfloat16", accumulative_counts=2, total_steps=4
    )
    name = f"two_{engine}_{reduce_dtype}"
    two = write_config(
        root / f"{name}.py",
        model,
        data,
        dtype="bfloat16",
        accumulative_counts=1,
        total_steps=4,
        reduce_dtype=reduce_dtype,
    )
    if not (root / "one").exists():
        result = run_train(single, root / "one")
        assert result.returncode == 0, result.stderr[-3000:]
    extra = ("--fsdp",) if engine == "fsdp2" else ()
    result = run_train(two, root / name, *extra, nproc=2)
    assert result.returncode == 0, result.stderr[-3000:]
    if engine == "fsdp2":
        assert f"gradients reduce-scattered in {reduce_dtype}" in result.stderr
    reference, ours = losses(root / "one"), losses(root / name)
    assert max(abs(a - b) for a, b in zip(ours, reference, strict=True)) < LOSS_TRACKING
