"""XTuner prompt templates as Jinja chat templates: the format a run trains on travels with
the tokenizer it saves."""

from __future__ import annotations

from pathlib import Path

import pytest
from runner import run_train
from tiny import save_tiny_llama, write_config, write_corpus
from transformers import AutoTokenizer

from evotune.data.templates import PROMPT_TEMPLATES

DEMO_TOKENIZER = Path(__file__).resolve().parents[1] / "demo" / "model"
CONVERSATION = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Hi"},
    {"role": "assistant", "content": "Hello"},
    {"role": "user", "content": "And?"},
]


def _expected(name: str, bos: str, eos: str) -> str:
    """What evotune.data.tokenize trains on, written out from the template's own pieces."""
    template = PROMPT_TEMPLATES[name]
    first = template.render_input("Hi", 1, "Be brief." if template.system else None)
    end = "" if template.suffix_as_eos else eos
    again = "" if template.suffix_as_eos else bos
    second = template.render_input("And?", 2, None)
    return bos + first + "Hello" + template.suffix + end + template.sep + again + second


@pytest.mark.parametrize("name", ["internlm2_chat", "default", "llama3_chat", "mistral"])
def test_chat_template_renders_what_tokenize_trains_on(name):
    tokenizer = AutoTokenizer.from_pretrained(DEMO_TOKENIZER)
    tokenizer.chat_template = PROMPT_TEMPLATES[name].chat_template(with_bos=True)
    conversation = CONVERSATION if PROMPT_TEMPLATES[name].system else CONVERSATION[1:]
    rendered = tokenizer.apply_chat_template(
        conversation, tokenize=False, add_generation_prompt=True
    )
    assert rendered == _expected(name, tokenizer.bos_token, tokenizer.eos_token)


@pytest.mark.integration
def test_saved_tokenizer_carries_the_runs_prompt_template(tmp_path):
    model = save_tiny_llama(tmp_path / "model", vocab_size=2048)
    data = write_corpus(tmp_path / "data", samples=30)
    config = write_config(
        tmp_path / "c.py",
        model,
        data,
        total_steps=1,
        tokenizer_name_or_path=str(DEMO_TOKENIZER),
        prompt_template="internlm2_chat",
    )
    result = run_train(config, tmp_path / "work")
    assert result.returncode == 0, result.stderr[-3000:]
    saved = AutoTokenizer.from_pretrained(next((tmp_path / "work").glob("checkpoint-*")) / "hf")
    rendered = saved.apply_chat_template(CONVERSATION, tokenize=False, add_generation_prompt=True)
    assert rendered == _expected("internlm2_chat", saved.bos_token, saved.eos_token)
