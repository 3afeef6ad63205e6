"""Sample generations: prompts, greedy answers against a decode without a cache, layouts.

The demo model (demo/model: a tiny random Llama with its own BPE tokenizer) answers.
Its answers are nonsense, but deterministic: the same ids whatever the layout.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from runner import losses, run_train
from tiny import write_config
from transformers import AutoModelForCausalLM, AutoTokenizer

from evotune.config import ConfigError, load_config
from evotune.data import PackedBatch
from evotune.data.templates import get_template
from evotune.model.attention import (
    AttentionMetadata,
    attention_name,
    kernel_of,
    register_attention,
)
from evotune.model.families import attention_needs
from evotune.parallel.dims import ParallelDims
from evotune.train.generation import (
    GENERATIONS_FILE,
    SampleGenerations,
    encode_prompt,
    render_prompt,
)

DEMO = Path(__file__).resolve().parent.parent / "demo"
PROMPTS = ["Explain json.dumps:\n", "Explain os.path.join:\n"]


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(DEMO / "model")


def _model():
    register_attention()
    return AutoModelForCausalLM.from_pretrained(
        DEMO / "model", attn_implementation=attention_name("sdpa")
    ).train()


def _config(path: Path, **settings) -> Path:
    return write_config(
        path, DEMO / "model", DEMO / "val", max_length=256, total_steps=2, **settings
    )


def _greedy_without_cache(model, ids: list[int], new_tokens: int, eos: int) -> list[int]:
    """Greedy decode by re-running evotune's varlen forward on the whole sequence."""
    config = model.config
    sequence = list(ids)
    with torch.no_grad():
        for _ in range(new_tokens):
            length = len(sequence)
            row = torch.tensor([sequence])
            batch = PackedBatch(
                input_ids=row,
                labels=torch.full_like(row, -100),
                position_ids=torch.arange(length).unsqueeze(0),
                cu_seqlens=torch.tensor([0, length], dtype=torch.int32),
                max_seqlen=length,
                type_ids=torch.zeros_like(row),
                num_packs=1,
            )
            metadata = AttentionMetadata.for_batch(
                batch, kernel_of(config), attention_needs(config)
            )
            hidden = model.model(
                input_ids=row,
                position_ids=batch.position_ids,
                use_cache=False,
                attention_metadata=metadata,
            ).last_hidden_state
            token = int(model.lm_head(hidden[0, -1]).argmax())
            sequence.append(token)
            if token == eos:
                break
    return sequence[len(ids) :]


def test_greedy_answers_match_a_decode_without_cache_and_the_model_is_restored(tmp_path, tokenizer):
    config = _config(tmp_path / "c.py", evaluation_inputs=PROMPTS, max_new_tokens=12)
    generations = SampleGenerations.build(
        load_config(config).settings, ParallelDims(), tokenizer, tmp_path, str(config)
    )
    model = _model()
    model.model.layers[1].eval()  # a module kept in eval mode stays there
    modes = {name: m.training for name, m in model.named_modules()}
    attention = model.config._attn_implementation
    rng = torch.get_rng_state()
    records = generations.run(model, engine=None, step=3)
    assert torch.equal(torch.get_rng_state(), rng)
    assert model.config._attn_implementation == attention
    assert model.model.layers[0].self_attn.config._attn_implementation == attention
    assert {name: m.training for name, m in model.named_modules()} == modes

    written = [json.loads(line) for line in (tmp_path / GENERATIONS_FILE).read_text().splitlines()]
    assert written == records
    assert [r["prompt"] for r in written] == PROMPTS and {r["step"] for r in written} == {3}
    for prompt, record in zip(PROMPTS, written, strict=True):
        ids = encode_prompt(prompt, tokenizer)
        assert ids[0] == tokenizer.bos_token_id
        expected = _greedy_without_cache(model, ids, 12, tokenizer.eos_token_id)
        answer = tokenizer.decode(expected, skip_special_tokens=True)
        assert record["answer"] == answer and answer


def test_prompts_are_rendered_with_xtuner_templates_or_the_chat_template(tokenizer):
    template = get_template("internlm2_chat")
    assert render_prompt("hi", template, "be brief", tokenizer) == (
        "<|im_start|>system\nbe brief<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    assert render_prompt("hi", None, "", tokenizer) == "hi"  # no chat template: as written
    with pytest.raises(ConfigError, match="SYSTEM: there is no prompt_template"):
        render_prompt("hi", None, "be brief", tokenizer)
    chat = AutoTokenizer.from_pretrained(DEMO / "model")
    chat.chat_template = (
        "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}"
        "{% if add_generation_prompt %}<assistant>{% endif %}"
    )
    assert render_prompt("hi", None, "sys", chat) == "<system>sys<user>hi<assistant>"
    assert render_prompt("hi", get_template("minicpm"), "", tokenizer) == "<用户> hi <AI>"
    with pytest.raises(ConfigError, match="has no system slot"):
        render_prompt("hi", get_template("minicpm"), "sys", tokenizer)


@pytest.mark.parametrize(
    "settings, message",
    [
        (
            {"evaluation_inputs": PROMPTS, "prompt_template": "internlm3_chat"},
            "prompt_template: unknown template 'internlm3_chat'",
        ),
        ({"evaluation_inputs": PROMPTS, "evaluation_freq": 0}, "evaluation_freq: must be >= 1"),
        (
            {"evaluation_inputs": "Explain json:"},
            "'evaluation_inputs' = 'Explain json:' should be a list of a str",
        ),
        ({"evaluation_inputs": ["ok", ""]}, r"evaluation_inputs\[1\]: must be a non-empty"),
        ({"evaluation_inputs": PROMPTS, "max_new_tokens": 0}, "max_new_tokens: must be >= 1"),
        ({"evaluation_freq": 10}, "evaluation_freq: there are no evaluation_inputs"),
        ({"evaluation_inputs": PROMPTS, "SYSTEM": "be brief"}, "SYSTEM: there is no prompt"),
    ],
)
def test_bad_generation_settings_are_one_line_errors(tmp_path, tokenizer, settings, message):
    config = _config(tmp_path / "c.py", **settings)
    with pytest.raises(ConfigError, match=message) as raised:
        SampleGenerations.build(
            load_config(config).settings, ParallelDims(), tokenizer, tmp_path, str(config)
        )
    assert "\n" not in str(raised.value) and str(config) in str(raised.value)


def test_no_tokenizer_is_refused(tmp_path):
    config = _config(tmp_path / "c.py", evaluation_inputs=PROMPTS)
    with pytest.raises(ConfigError, match="evaluation_inputs: no tokenizer"):
        SampleGenerations.build(load_config(config).settings, ParallelDims(), None, tmp_path)


def test_due_before_training_every_few_steps_and_at_the_end(tmp_path, tokenizer):
    config = _config(tmp_path / "c.py", evaluation_inputs=PROMPTS, evaluation_freq=3)
    generations = SampleGenerations.build(
        load_config(config).settings, ParallelDims(), tokenizer, tmp_path
    )
    assert [s for s in range(8) if generations.due(s, last=s == 7)] == [0, 3, 6, 7]


# -- whole runs -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def single_runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("gen")
    runs = {}
    for name, settings in (
        ("plain", {}),
        ("answers", {"evaluation_inputs": PROMPTS, "evaluation_freq": 1, "max_new_tokens": 16}),
    ):
        result = run_train(_config(root / f"{name}.py", **settings), root / name)
        assert result.returncode == 0, result.stderr[-3000:]
        runs[name] = root / name
    return root, runs


def _answers(work_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (work_dir / GENERATIONS_FILE).read_text().splitlines()]


@pytest.mark.integration
def test_generations_leave_the_training_run_bit_identical(single_runs):
    _root, runs = single_runs
    assert losses(runs["answers"]) == losses(runs["plain"])  # exact, not approximately
    answers = _answers(runs["answers"])
    assert [(a["step"], a["prompt"]) for a in answers] == [
        (step, prompt) for step in (0, 1, 2) for prompt in PROMPTS
    ]
    assert not (runs["plain"] / GENERATIONS_FILE).exists()


@pytest.mark.integration
@pytest.mark.parametrize(
    "layout, args, settings",
    [
        ("zero3", ("--deepspeed", "deepspeed_zero3"), {}),
        ("fsdp2", ("--fsdp",), {}),
        ("sp2", (), {"sequence_parallel_size": 2, "accumulative_counts": 2}),
    ],
)
def test_sharded_and_sequence_parallel_runs_give_the_same_answers(
    single_runs, layout, args, settings
):
    root, runs = single_runs
    values = {
        "evaluation_inputs": PROMPTS,
        "evaluation_freq": 1,
        "max_new_tokens": 16,
        "accumulative_counts": 1,
        **settings,
    }
    result = run_train(_config(root / f"{layout}.py", **values), root / layout, *args, nproc=2)
    assert result.returncode == 0, result.stderr[-3000:]
    got, expected = _answers(root / layout), _answers(runs["answers"])
    assert [(a["step"], a["prompt"]) for a in got] == [(a["step"], a["prompt"]) for a in expected]
    # the untrained model's answers are the same ids: generation ran on the full weights
    assert [a["answer"] for a in got if a["step"] == 0] == [
        a["answer"] for a in expected if a["step"] == 0
    ]


@pytest.mark.integration
def test_unknown_prompt_template_exits_2_with_one_line(tmp_path):
    config = _config(tmp_path / "c.py", evaluation_inputs=PROMPTS, prompt_template="chatml")
    result = run_train(config, tmp_path / "w")
    assert result.returncode == 2, result.stderr[-2000:]
    last = result.stderr.strip().splitlines()[-1]
    assert (
        last.startswith("evotune: error: ") and "prompt_template: unknown template 'chatml'" in last
    )
