"""XTuner v0.1 prompt templates, as data (the strings of ``xtuner.utils.PROMPT_TEMPLATE``).

A conversation turn is rendered as XTuner's template_map_fn renders it:

    input  = SYSTEM.format(system=...)  (only when the turn has a non-empty system)
           + INSTRUCTION.format(input=..., round=turn number from 1)
    output = output + SUFFIX            (trained)
    then   EOS (trained) unless SUFFIX_AS_EOS, and SEP (not trained)

``evotune.data.tokenize.xtuner_sample`` turns that into token ids and a loss mask
exactly as XTuner's encode_fn does. ``stop_words`` end a generation.
"""

from __future__ import annotations

import json
import string
from dataclasses import dataclass

from ..errors import ConfigError

_LLAMA2_SYSTEM = (
    "[INST] <<SYS>>\n You are a helpful, respectful and honest assistant. Always answer as "
    "helpfully as possible, while being safe. Your answers should not include any harmful, "
    "unethical, racist, sexist, toxic, dangerous, or illegal content. Please ensure that your "
    "responses are socially unbiased and positive in nature.\n{system}\n<</SYS>>\n [/INST] "
)
_VICUNA_SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. The assistant "
    "gives helpful, detailed, and polite answers to the user's questions. {system}\n "
)
_DEEPSEEK_CODER_SYSTEM = (
    "You are an AI programming assistant, utilizing the DeepSeek Coder model, developed by "
    "DeepSeekCompany, and you only answer questions related to computer science. For "
    "politically sensitive questions, security and privacy issues, and other non-computer "
    "science questions, you will refuse to answer. {system}\n"
)


@dataclass(frozen=True)
class PromptTemplate:
    """One XTuner prompt template. ``system`` None: the template has no system slot."""

    name: str
    instruction: str
    system: str | None = None
    suffix: str = ""
    suffix_as_eos: bool = False
    sep: str = ""
    stop_words: tuple[str, ...] = ()

    def render_input(self, text: str, round_number: int, system: str | None) -> str:
        """The untrained prompt of one turn: optional system block, then the instruction."""
        rendered = self.instruction.format(input=text, round=round_number)
        if system:
            if self.system is None:
                raise ConfigError(
                    f"prompt template {self.name!r} has no system slot but a turn has a system "
                    "message; choose another template or drop the system text"
                )
            rendered = self.system.format(system=system) + rendered
        return rendered

    def chat_template(self, with_bos: bool) -> str:
        """This template as a Jinja chat template, for tokenizers saved with the model.

        Renders what ``tokenize`` trains on: BOS at the start and after each turn that
        ended with EOS (``with_bos``: the tokenizer has one), a system message before
        the turn it belongs to, the instruction with its round number, the reply, the
        suffix, EOS unless the suffix is the end of turn, the separator. With
        ``add_generation_prompt`` nothing is added: the instruction ends with the
        assistant's prefix already.
        """

        def jinja(text: str, values: dict[str, str]) -> str:
            pieces = []
            for literal, field, _, _ in string.Formatter().parse(text):
                if literal:
                    pieces.append("{{ " + json.dumps(literal) + " }}")
                if field is not None:
                    pieces.append("{{ " + values[field] + " }}")
            return "".join(pieces)

        eos = "" if self.suffix_as_eos else "{{ eos_token }}"
        bos = "{%- if ns.bos %}{{ bos_token }}{% endif -%}" if with_bos else ""
        system = (
            "{%- if ns.system %}" + jinja(self.system, {"system": "ns.system"}) + "{% endif -%}"
            if self.system is not None
            else ""
        )
        return "".join(
            [
                "{%- set ns = namespace(round=1, system='', bos=true) -%}",
                "{%- for message in messages -%}",
                "{%- if message['role'] == 'system' -%}",
                "{%- set ns.system = message['content'] -%}",
                "{%- elif message['role'] == 'user' -%}",
                bos,
                system,
                "{%- set ns.system = '' -%}",
                jinja(self.instruction, {"input": "message['content']", "round": "ns.round"}),
                "{%- elif message['role'] == 'assistant' -%}",
                "{{ message['content'] }}",
                jinja(self.suffix, {}),
                eos,
                jinja(self.sep, {}),
                "{%- set ns.bos = " + ("false" if self.suffix_as_eos else "true") + " -%}",
                "{%- set ns.round = ns.round + 1 -%}",
                "{%- endif -%}",
                "{%- endfor -%}",
            ]
        )


def _template(name: str, instruction: str, **fields: object) -> PromptTemplate:
    return PromptTemplate(name=name, instruction=instruction, **fields)  # type: ignore[arg-type]


_IM_SYSTEM = "<|im_start|>system\n{system}<|im_end|>\n"
_IM_INSTRUCTION = "<|im_start|>user\n{input}<|im_end|>\n<|im_start|>assistant\n"

PROMPT_TEMPLATES: dict[str, PromptTemplate] = {
    t.name: t
    for t in (
        _template(
            "default",
            "<|User|>:{input}\n<|Bot|>:",
            system="<|System|>:{system}\n",
            sep="\n",
        ),
        _template(
            "zephyr",
            "<|user|>\n{input}\n<|assistant|>\n",
            system="<|system|>\n{system}\n",
            sep="\n",
        ),
        _template(
            "internlm_chat",
            "<|User|>:{input}<eoh>\n<|Bot|>:",
            system="<|System|>:{system}\n",
            suffix="<eoa>",
            suffix_as_eos=True,
            sep="\n",
            stop_words=("<eoa>",),
        ),
        _template(
            "internlm2_chat",
            _IM_INSTRUCTION,
            system=_IM_SYSTEM,
            suffix="<|im_end|>",
            suffix_as_eos=True,
            sep="\n",
            stop_words=("<|im_end|>",),
        ),
        _template(
            "moss_sft",
            "<|Human|>: {input}<eoh>\n",
            system="{system}\n",
            sep="\n",
            stop_words=("<eoc>", "<eom>"),
        ),
        _template("llama2_chat", "[INST] {input} [/INST]", system=_LLAMA2_SYSTEM, sep="\n"),
        _template("code_llama_chat", "[INST] {input} [/INST]", system="{system}\n"),
        _template(
            "chatglm2",
            "[Round {round}]\n\n问：{input}\n\n答：",
            system="{system}\n",
            sep="\n\n",
        ),
        _template(
            "chatglm3",
            "<|user|>\n{input}<|assistant|>\n",
            system="<|system|>\n{system}",
            sep="\n",
        ),
        _template(
            "qwen_chat",
            _IM_INSTRUCTION,
            system=_IM_SYSTEM,
            suffix="<|im_end|>",
            suffix_as_eos=True,
            sep="\n",
            stop_words=("<|im_end|>", "<|endoftext|>"),
        ),
        _template(
            "baichuan_chat", "<reserved_102>{input}<reserved_103>", system="{system}\n", sep="\n"
        ),
        _template(
            "baichuan2_chat", "<reserved_106>{input}<reserved_107>", system="{system}\n", sep="\n"
        ),
        _template(
            "wizardlm",
            "USER: {input} ASSISTANT:",
            system=_VICUNA_SYSTEM,
            sep="\n",
        ),
        _template(
            "wizardcoder",
            "### Instruction:\n{input}\n\n### Response:",
            system=(
                "Below is an instruction that describes a task. Write a response that "
                "appropriately completes the request.\n\n{system}\n "
            ),
            sep="\n\n",
        ),
        _template("vicuna", "USER: {input} ASSISTANT:", system=_VICUNA_SYSTEM, sep="\n"),
        _template(
            "deepseek_coder",
            "### Instruction:\n{input}\n### Response:\n",
            system=_DEEPSEEK_CODER_SYSTEM,
            sep="\n",
        ),
        _template(
            "deepseekcoder",
            "### Instruction:\n{input}\n### Response:\n",
            system=_DEEPSEEK_CODER_SYSTEM,
            sep="\n",
        ),
        _template(
            "deepseek_moe", "[INST] {input} [/INST]", system="[INST] {system} [/INST]\n", sep="\n"
        ),
        _template(
            "deepseek_v2",
            "User: {input}\n\nAssistant: ",
            system="{system}\n\n",
            suffix="<｜end▁of▁sentence｜>",
            suffix_as_eos=True,
            stop_words=("<｜end▁of▁sentence｜>",),
        ),
        _template(
            "mistral", "[INST] {input} [/INST]", system="[INST] {system} [/INST]\n", sep="\n"
        ),
        _template(
            "mixtral", "[INST] {input} [/INST]", system="[INST] {system} [/INST]\n", sep="\n"
        ),
        _template("minicpm", "<用户> {input} <AI>", sep="\n"),
        _template(
            "gemma",
            "<start_of_turn>user\n{input}<end_of_turn>\n<start_of_turn>model\n",
            system="<start_of_turn>system\n{system}<end_of_turn>\n",
            suffix="<end_of_turn>",
            suffix_as_eos=False,
            sep="\n",
            stop_words=("<end_of_turn>",),
        ),
        _template(
            "cohere_chat",
            "<|START_OF_TURN_TOKEN|><|USER_TOKEN|>{input}<|END_OF_TURN_TOKEN|>"
            "<|START_OF_TURN_TOKEN|><|CHATBOT_TOKEN|>",
            system="<|START_OF_TURN_TOKEN|><|SYSTEM_TOKEN|>{system}<|END_OF_TURN_TOKEN|>",
            suffix="<|END_OF_TURN_TOKEN|>",
            suffix_as_eos=True,
            stop_words=("<|END_OF_TURN_TOKEN|>",),
        ),
        _template(
            "llama3_chat",
            "<|start_header_id|>user<|end_header_id|>\n\n{input}<|eot_id|>"
            "<|start_header_id|>assistant<|end_header_id|>\n\n",
            system="<|start_header_id|>system<|end_header_id|>\n\n{system}<|eot_id|>",
            suffix="<|eot_id|>",
            suffix_as_eos=True,
            stop_words=("<|eot_id|>",),
        ),
        _template(
            "phi3_chat",
            "<|user|>\n{input}<|end|>\n<|assistant|>\n",
            system="<|system|>\n{system}<|end|>\n",
            suffix="<|end|>",
            suffix_as_eos=True,
            sep="\n",
            stop_words=("<|end|>",),
        ),
    )
}
"""Every template of XTuner v0.1.23, by the name XTuner configs use (PROMPT_TEMPLATE.<name>)."""


def get_template(name: str) -> PromptTemplate:
    """The template called ``name``; a ConfigError naming the choices otherwise."""
    try:
        return PROMPT_TEMPLATES[name]
    except KeyError:
        raise ConfigError(
            f"unknown prompt template {name!r}; choose one of {', '.join(sorted(PROMPT_TEMPLATES))}"
        ) from None
