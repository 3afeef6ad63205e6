"""Sample generations during training: XTuner's EvaluateChatHook, without a hook.

Each of ``evaluation_inputs`` is wrapped in the prompt template (``prompt_template``,
an XTuner template name from evotune.data.templates, with ``SYSTEM``), or in the
tokenizer's chat template when no template is named, and answered greedily with
at most ``max_new_tokens`` tokens: before training (step 0), every
``evaluation_freq`` optimizer steps and at the end. Answers are logged and
appended to WORK_DIR/generations.jsonl as {"step", "prompt", "answer"}.

A prompt starts with the tokenizer's BOS token (when it has one), as every ftdp
sample does and as XTuner's ``tokenizer.encode`` gives it.

Who generates. evotune's attention kernels need a packed row's metadata, so the
model switches to transformers' own attention ('sdpa'; 'eager' for softcapping
or sinks) with a KV cache for the answers, then back. Where each rank holds the
whole model (one process, DDP, ZeRO-1/2, sequence parallelism), the main rank
generates alone with the plain forward. Where parameters are sharded (ZeRO-3,
FSDP2), gathering them is collective, so every rank runs the same greedy
generation in lockstep (``synced_gpus``) and the main rank writes the answers.

The model goes back to the exact mode of every module and the RNG state is left
untouched, so a run with generations has the same losses, bit for bit, as one
without (tests/test_generation.py).
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import GenerationConfig, PreTrainedTokenizerBase

from ..config import TrainConfig
from ..data.templates import PromptTemplate, get_template
from ..errors import ConfigError
from ..model.families import attention_needs
from ..parallel.dims import ParallelDims
from .evaluation import compute_context, evaluation_mode, gathered_root

logger = logging.getLogger("evotune")

GENERATIONS_FILE = "generations.jsonl"


def check_settings(settings: TrainConfig, source: str = "config") -> None:
    """Types and ranges of the generation settings; one line naming the key and the fix."""
    s = settings
    inputs = s.evaluation_inputs
    if isinstance(inputs, str) or not isinstance(inputs, list | tuple):
        raise ConfigError(
            f"{source}: evaluation_inputs: must be a list of prompt strings, got {inputs!r}"
        )
    for index, prompt in enumerate(inputs):
        if not isinstance(prompt, str) or not prompt.strip():
            raise ConfigError(
                f"{source}: evaluation_inputs[{index}]: must be a non-empty string, got {prompt!r}"
            )
    if not isinstance(s.SYSTEM, str):
        raise ConfigError(f"{source}: SYSTEM: must be a string ('' for none), got {s.SYSTEM!r}")
    if s.evaluation_freq is not None and s.evaluation_freq < 1:
        raise ConfigError(
            f"{source}: evaluation_freq: must be >= 1 (or None for before training and the end "
            f"only), got {s.evaluation_freq}"
        )
    if s.max_new_tokens < 1:
        raise ConfigError(f"{source}: max_new_tokens: must be >= 1, got {s.max_new_tokens}")
    if s.prompt_template is not None:
        try:
            get_template(s.prompt_template)
        except ConfigError as error:
            raise ConfigError(f"{source}: prompt_template: {error}") from None
    if not inputs and s.evaluation_freq is not None:
        raise ConfigError(
            f"{source}: evaluation_freq: there are no evaluation_inputs to answer; add prompts "
            "to evaluation_inputs or remove evaluation_freq"
        )


def render_prompt(
    prompt: str,
    template: PromptTemplate | None,
    system: str,
    tokenizer: PreTrainedTokenizerBase,
) -> str:
    """The text the model continues: template (or chat template) around the prompt."""
    if template is not None:
        return template.render_input(prompt, 1, system or None)
    if getattr(tokenizer, "chat_template", None):
        messages = [{"role": "system", "content": system}] if system else []
        messages.append({"role": "user", "content": prompt})
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return str(text)
    if system:
        raise ConfigError(
            "SYSTEM: there is no prompt_template and the tokenizer has no chat template to put "
            "the system message in; set prompt_template (e.g. 'internlm2_chat') or SYSTEM = ''"
        )
    return prompt


def encode_prompt(text: str, tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """Token ids of a rendered prompt, starting with BOS when the tokenizer has one."""
    ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])
    bos = tokenizer.bos_token_id
    if bos is not None and (not ids or ids[0] != bos):
        ids.insert(0, bos)
    return ids


def parameters_sharded(model: nn.Module) -> bool:
    """True when some parameter lives in shards (ZeRO-3 partitions or FSDP2 DTensors)."""
    from torch.distributed.tensor import DTensor

    return any(hasattr(p, "ds_id") or isinstance(p, DTensor) for p in model.parameters())


@contextlib.contextmanager
def transformers_attention(model: Any) -> Iterator[None]:
    """transformers' own attention (with a KV cache) for generation, then evotune's again."""
    original = model.config._attn_implementation
    needs = attention_needs(model.config)
    model.set_attn_implementation("eager" if needs.softcap or needs.sinks else "sdpa")
    try:
        yield
    finally:
        model.set_attn_implementation(original)


class SampleGenerations:
    """Answers to the evaluation inputs, before training, every few steps and at the end."""

    def __init__(
        self,
        prompts: Sequence[str],
        encoded: Sequence[list[int]],
        tokenizer: PreTrainedTokenizerBase,
        dims: ParallelDims,
        path: Path,
        every: int | None,
        max_new_tokens: int,
        stop_words: Sequence[str] = (),
    ):
        self.prompts = list(prompts)
        self.encoded = [list(ids) for ids in encoded]
        self.tokenizer = tokenizer
        self.dims = dims
        self.path = path
        self.every = every
        self.max_new_tokens = max_new_tokens
        self.stop_words = list(stop_words)
        self.last_step: int | None = None

    @classmethod
    def build(
        cls,
        settings: TrainConfig,
        dims: ParallelDims,
        tokenizer: PreTrainedTokenizerBase | None,
        work_dir: Path,
        source: str = "config",
    ) -> SampleGenerations | None:
        check_settings(settings, source)
        s = settings
        if not s.evaluation_inputs:
            if s.prompt_template is not None or s.SYSTEM:
                logger.warning(
                    "prompt_template/SYSTEM are only used for evaluation_inputs, and there are "
                    "none: no sample generations"
                )
            return None
        if tokenizer is None:
            raise ConfigError(
                f"{source}: evaluation_inputs: no tokenizer to encode them; set "
                "tokenizer_name_or_path (or put a tokenizer in the model folder)"
            )
        template = get_template(s.prompt_template) if s.prompt_template is not None else None
        try:
            texts = [render_prompt(p, template, s.SYSTEM, tokenizer) for p in s.evaluation_inputs]
        except ConfigError as error:
            raise ConfigError(f"{source}: {error}") from None
        except Exception as error:  # a chat template that rejects these messages (jinja)
            raise ConfigError(
                f"{source}: evaluation_inputs: the tokenizer's chat template failed "
                f"({type(error).__name__}: {error}); set prompt_template or SYSTEM = ''"
            ) from None
        stop_words = list(template.stop_words) if template is not None else []
        return cls(
            s.evaluation_inputs,
            [encode_prompt(text, tokenizer) for text in texts],
            tokenizer,
            dims,
            work_dir / GENERATIONS_FILE,
            s.evaluation_freq,
            s.max_new_tokens,
            stop_words,
        )

    def due(self, step: int, last: bool) -> bool:
        if step == self.last_step:
            return False
        return step == 0 or last or (self.every is not None and step % self.every == 0)

    def run(self, model: Any, engine: Any, step: int) -> list[dict[str, Any]]:
        """Generate every answer; the records on the main rank (empty elsewhere).

        Collective where parameters are sharded: call it on every rank.
        """
        self.last_step = step
        lockstep = self.dims.is_distributed and parameters_sharded(model)
        if not (lockstep or self.dims.is_main):
            return []
        device = self.dims.device
        records = []
        with evaluation_mode(model, device), gathered_root(engine), transformers_attention(model):
            for prompt, ids in zip(self.prompts, self.encoded, strict=True):
                with compute_context(engine, device):
                    answer_ids = self._generate(model, ids, synced=lockstep)
                answer = self._decode(answer_ids)
                records.append({"step": step, "prompt": prompt, "answer": answer})
        if not self.dims.is_main:
            return []
        with open(self.path, "a", encoding="utf-8") as handle:
            for record in records:
                handle.write(json.dumps(record, ensure_ascii=False) + "\n")
                logger.info("sample at step %d: %r -> %r", step, record["prompt"], record["answer"])
        return records

    def _generate(self, model: Any, ids: list[int], synced: bool) -> list[int]:
        tokenizer = self.tokenizer
        eos = tokenizer.eos_token_id
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
        config = GenerationConfig(
            max_new_tokens=self.max_new_tokens,
            do_sample=False,
            num_beams=1,
            use_cache=True,
            eos_token_id=eos,
            pad_token_id=pad,
            stop_strings=self.stop_words or None,
        )
        input_ids = torch.tensor([ids], device=self.dims.device)
        output = model.generate(
            input_ids=input_ids,
            attention_mask=torch.ones_like(input_ids),
            generation_config=config,
            synced_gpus=synced,
            tokenizer=tokenizer if self.stop_words else None,
        )
        return output[0, len(ids) :].tolist()

    def _decode(self, answer_ids: list[int]) -> str:
        text = str(self.tokenizer.decode(answer_ids, skip_special_tokens=True))
        for word in self.stop_words:
            text = text.split(word, 1)[0]
        return text
