"""Samples -> signed token ids, and ftdp shards: JSON-lines tokens plus InternEvo's .bin.meta.

A sample is stored as InternEvo stores it: token ids, with the ones that carry no
loss (prompts, non-assistant turns) negated. Three ways to get there:

* ``text_sample``: pre-training text, BOS + text + EOS, all trained.
* ``chat_sample``: ``[{"role", "content"}, ...]`` messages; the tokenizer's chat
  template when it has one, else ``<|role|>\\n`` headers; trained roles carry loss.
* ``xtuner_encode``: XTuner v0.1's conversation turns through one of its prompt
  templates (template_map_fn + encode_fn, reproduced id for id): BOS before a
  turn's prompt when the previous turn ended with EOS, the prompt untrained, the
  output (+ SUFFIX) trained, EOS trained unless the template's SUFFIX acts as EOS,
  SEP untrained, each piece tokenized on its own, the whole cut at max_length.
"""

from __future__ import annotations

import io
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import orjson

from ..errors import DataError
from .templates import PromptTemplate

# XTuner's get_bos_eos_token_ids: these tokenizers get no BOS.
_NO_BOS_TOKENIZERS = ("QWenTokenizer", "QWen2Tokenizer", "Qwen2TokenizerFast", "Qwen2Tokenizer")


def write_ftdp_shard(path: str | os.PathLike[str], samples: Iterable[Sequence[int]]) -> int:
    """Write ``path`` and ``path.meta`` atomically; returns the number of samples.

    Files are created with the process umask (0644 under the usual 022).
    """
    destination = Path(path)
    destination.parent.mkdir(parents=True, exist_ok=True)
    temporary = destination.with_name(destination.name + ".tmp")
    rows: list[tuple[int, int]] = []
    with open(temporary, "wb") as handle:
        for tokens in samples:
            rows.append((handle.tell(), len(tokens)))
            handle.write(orjson.dumps({"tokens": [int(t) for t in tokens]}) + b"\n")
    meta = np.asarray(rows, dtype=np.int64).reshape(-1, 2)
    buffer = io.BytesIO()
    np.save(buffer, meta)
    meta_temporary = destination.with_name(destination.name + ".meta.tmp")
    meta_temporary.write_bytes(buffer.getvalue())
    os.replace(temporary, destination)
    os.replace(meta_temporary, str(destination) + ".meta")
    return len(rows)


def sft_sample(
    prompt_ids: Sequence[int], response_ids: Sequence[int], bos_id: int | None, eos_id: int | None
) -> list[int]:
    """BOS and prompt negated (no loss), response and EOS trained.

    Token id 0 cannot be negated; it is never a training target anyway.
    """
    head = ([bos_id] if bos_id is not None else []) + list(prompt_ids)
    tail = list(response_ids) + ([eos_id] if eos_id is not None else [])
    return [-t for t in head] + tail


def signed(ids: Sequence[int], trained: Sequence[bool]) -> list[int]:
    """ftdp's sign convention: a token without loss is stored negated."""
    return [t if keep else -t for t, keep in zip(ids, trained, strict=True)]


# ---------------------------------------------------------------------------
# plain text and role/content messages


def text_sample(tokenizer: Any, text: str) -> list[int]:
    """Pre-training text: BOS + text + EOS, all positive as InternEvo writes it."""
    ids = tokenizer.encode(text, add_special_tokens=False)
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    return bos + ids + eos


def check_messages(messages: Any, where: str) -> list[dict[str, Any]]:
    """A non-empty list of {'role': str, 'content': str} dicts, or a DataError naming ``where``."""
    if (
        not isinstance(messages, list)
        or not messages
        or not all(
            isinstance(m, dict)
            and isinstance(m.get("role"), str)
            and isinstance(m.get("content"), str)
            for m in messages
        )
    ):
        raise DataError(
            f"{where}: messages must be a non-empty list of {{'role', 'content'}} strings"
        )
    return messages


def chat_sample(
    tokenizer: Any, messages: Sequence[Mapping[str, str]], trained: Sequence[bool]
) -> list[int]:
    """Messages with a per-message trained flag; untrained tokens negated.

    With a chat template the sample is the template's rendering, and a trained
    turn's role header (the generation prompt) stays untrained. Without one, turns
    are ``<|role|>\\ncontent\\n`` between BOS and EOS.
    """
    if getattr(tokenizer, "chat_template", None) is not None:
        return _templated_chat_tokens(tokenizer, messages, trained)
    tokens: list[int] = []
    if tokenizer.bos_token_id is not None:
        tokens.append(-tokenizer.bos_token_id)
    for message, keep in zip(messages, trained, strict=True):
        header = tokenizer.encode(f"<|{message['role']}|>\n", add_special_tokens=False)
        body = tokenizer.encode(message["content"] + "\n", add_special_tokens=False)
        tokens.extend(-t for t in header)
        tokens.extend(body if keep else [-t for t in body])
    if tokenizer.eos_token_id is not None:
        tokens.append(tokenizer.eos_token_id if trained[-1] else -tokenizer.eos_token_id)
    return tokens


def _templated_chat_tokens(
    tokenizer: Any, messages: Sequence[Mapping[str, str]], trained: Sequence[bool]
) -> list[int]:
    """Signs per turn from incremental renders; the result renders exactly like the template.

    BPE may merge across a turn edge, so each render is aligned on its longest common
    prefix with what is already there rather than assumed to extend it.
    """
    ids: list[int] = []
    mask: list[bool] = []
    for index, keep in enumerate(trained):
        turn = _render(tokenizer, messages[: index + 1], add_generation_prompt=False)
        kept = _common_prefix(ids, turn)
        ids, mask = ids[:kept], mask[:kept]
        if keep:
            prompt = _render(tokenizer, messages[:index], add_generation_prompt=True)
            body_start = max(kept, _common_prefix(prompt, turn))
        else:
            body_start = len(turn)
        for position in range(kept, len(turn)):
            ids.append(turn[position])
            mask.append(position >= body_start)
    return signed(ids, mask)


def _common_prefix(first: Sequence[int], second: Sequence[int]) -> int:
    length = 0
    for a, b in zip(first, second, strict=False):
        if a != b:
            break
        length += 1
    return length


def _render(
    tokenizer: Any, messages: Sequence[Mapping[str, str]], add_generation_prompt: bool
) -> list[int]:
    if not messages and not add_generation_prompt:
        return []
    ids = tokenizer.apply_chat_template(
        list(messages), tokenize=True, add_generation_prompt=add_generation_prompt
    )
    return list(ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids)


# ---------------------------------------------------------------------------
# XTuner v0.1 conversations


@dataclass(frozen=True)
class Turn:
    """One XTuner conversation turn: {"system", "input", "output"} (+ output_with_loss)."""

    input: str
    output: str
    system: str = ""
    output_with_loss: bool = True


def conversation_turns(conversation: Any, where: str) -> list[Turn]:
    """XTuner's own format: ``[{"system", "input", "output"}, ...]`` (system and input optional)."""
    if not isinstance(conversation, list):
        raise DataError(f"{where}: 'conversation' must be a list of {{'input', 'output'}} turns")
    turns = []
    for number, turn in enumerate(conversation, start=1):
        if not isinstance(turn, dict) or not isinstance(turn.get("output"), str):
            raise DataError(f"{where}: conversation turn {number} needs an 'output' string")
        text, system = turn.get("input") or "", turn.get("system") or ""
        if not isinstance(text, str) or not isinstance(system, str):
            raise DataError(f"{where}: conversation turn {number}: 'input'/'system' must be text")
        turns.append(
            Turn(text, turn["output"], system, _loss_flag(turn.get("output_with_loss", True)))
        )
    return turns


def openai_turns(messages: Any, where: str) -> list[Turn]:
    """XTuner's openai_map_fn: ``[{"role", "content", "loss"?}, ...]`` -> turns.

    Leading assistant messages are skipped; user messages before an assistant reply
    are joined (no separator) into its input; a system message applies to the next
    reply only; messages after the last reply are dropped. "loss" (default true, a
    bool or the string "true"/"false") says whether the reply is trained.
    """
    messages = check_messages(messages, where)
    index = 0
    while index < len(messages) and messages[index]["role"] == "assistant":
        index += 1
    turns = []
    system, text = "", ""
    for message in messages[index:]:
        role = message["role"]
        if role == "system":
            system = message["content"]
        elif role == "user":
            text += message["content"]
        elif role == "assistant":
            turns.append(
                Turn(text, message["content"], system, _loss_flag(message.get("loss", True)))
            )
            system, text = "", ""
        else:
            raise DataError(
                f"{where}: role {role!r} is not one of system/user/assistant (XTuner's "
                "openai format); rename it"
            )
    return turns


def _loss_flag(value: Any) -> bool:
    # XTuner compares str(value).lower() with "true"; a JSON boolean means what it says
    return value if isinstance(value, bool) else str(value).lower() == "true"


def special_ids(tokenizer: Any) -> tuple[list[int], list[int]]:
    """(BOS ids, EOS ids) as XTuner's encode_fn uses them."""
    if tokenizer.eos_token_id is None:
        raise DataError(
            f"tokenizer {getattr(tokenizer, 'name_or_path', '')!r} has no EOS token; "
            "XTuner's format ends every reply with one"
        )
    no_bos = type(tokenizer).__name__ in _NO_BOS_TOKENIZERS or tokenizer.bos_token_id is None
    return ([] if no_bos else [tokenizer.bos_token_id]), [tokenizer.eos_token_id]


def xtuner_encode(
    tokenizer: Any,
    turns: Sequence[Turn],
    template: PromptTemplate | None,
    max_length: int | None = None,
) -> tuple[list[int], list[bool]]:
    """Token ids and the trained mask XTuner's template_map_fn + encode_fn give a conversation.

    ``template`` None is XTuner without template_map_fn: input and output as
    written, EOS after every output, no system text.
    """
    bos, eos = special_ids(tokenizer)
    ids: list[int] = []
    trained: list[bool] = []

    def add(pieces: Sequence[int], keep: bool) -> None:
        ids.extend(pieces)
        trained.extend([keep] * len(pieces))

    def encode(text: str) -> list[int]:
        return list(tokenizer.encode(text, add_special_tokens=False)) if text else []

    needs_bos = True
    for round_number, turn in enumerate(turns, start=1):
        if template is not None:
            prompt = template.render_input(turn.input, round_number, turn.system)
            output = turn.output + template.suffix
            ends_with_eos = not template.suffix_as_eos
            sep = template.sep
        else:
            prompt, output, ends_with_eos, sep = turn.input, turn.output, True, ""
        if needs_bos:
            add(bos, False)
        add(encode(prompt), False)
        add(encode(output), turn.output_with_loss)
        if ends_with_eos:
            add(eos, turn.output_with_loss)
        needs_bos = ends_with_eos
        add(encode(sep), False)
    if max_length is not None:
        ids, trained = ids[:max_length], trained[:max_length]
    return ids, trained


def turns_as_messages(turns: Sequence[Turn]) -> tuple[list[dict[str, str]], list[bool]]:
    """Turns as role/content messages with trained flags (for the tokenizer's chat template)."""
    messages: list[dict[str, str]] = []
    trained: list[bool] = []
    for turn in turns:
        if turn.system:
            messages.append({"role": "system", "content": turn.system})
            trained.append(False)
        messages.append({"role": "user", "content": turn.input})
        trained.append(False)
        messages.append({"role": "assistant", "content": turn.output})
        trained.append(turn.output_with_loss)
    return messages, trained
