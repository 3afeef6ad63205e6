"""Which Hugging Face decoder families evotune trains exactly, and what each needs.

evotune runs a model's base (decoder) itself with varlen attention, then applies
the LM head and the loss itself. That is exact only when three things match the
model's own ``ForCausalLM.forward``:

1. attention: every layer's request (scale, sliding window, logit softcap, sinks)
   is honoured per segment, never across segments (evotune/model/attention.py);
2. the output side: the family's logit transform between the LM head and the
   softmax (``LOGITS``: Gemma 2/3 final softcapping, Granite's division by
   ``logits_scaling``, Cohere's ``logit_scale``);
3. auxiliary losses: MoE families add the router load-balancing loss as
   transformers does (only when the config sets ``output_router_logits``),
   ``router_aux_loss_coef * load_balancing_loss_func(router_logits, ...)``.

``FAMILIES`` lists the model types tests/test_families.py verifies on tiny random
models (fp32, a packed row of several samples, some longer than the window):
the packed loss and every gradient equal the model's own forward with labels,
sample by sample (dense) or on the same samples as one padded batch with an
attention mask (MoE with a router loss, whose loss is not a sum over samples).

Router loss on a packed row, defined: the statistics of
``load_balancing_loss_func`` (fraction of top-k assignments per expert, mean
router probability per expert) are pooled over the row's real tokens, across
all layers, exactly as transformers pools them over the real (attention-mask)
tokens of a padded batch of the same samples. The returned term is
``router_aux_loss_coef * aux`` for the micro-batch. Under sequence parallelism
the statistics are summed over the group first (so the value is the whole
row's), and each rank returns 1/sp of the term, so the group's sum is the row's
term, like the loss sums.

A model type not in ``FAMILIES`` is refused at load (``check_model``) unless the
user sets ``allow_unverified_model``; features no kernel can do exactly (hybrid
linear/recurrent layers, chunked attention, attention that bypasses transformers'
attention interface, attention dropout) are refused either way.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from ..errors import ConfigError
from .attention import AttentionNeeds

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class LogitTransform:
    """What the family's forward does to the LM head's logits before the loss."""

    multiply: float | None = None  # Cohere: logits * logit_scale
    divide: float | None = None  # Granite: logits / logits_scaling
    softcap: float | None = None  # Gemma 2/3: cap * tanh(logits / cap)

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        if self.multiply is not None:
            logits = logits * self.multiply
        if self.divide is not None:
            logits = logits / self.divide
        if self.softcap:
            logits = self.softcap * torch.tanh(logits / self.softcap)
        return logits


def _identity(config: Any) -> LogitTransform:
    return LogitTransform()


def _final_softcap(config: Any) -> LogitTransform:
    return LogitTransform(softcap=getattr(config, "final_logit_softcapping", None))


def _divide_by_logits_scaling(config: Any) -> LogitTransform:
    return LogitTransform(divide=config.logits_scaling)


def _multiply_by_logit_scale(config: Any) -> LogitTransform:
    return LogitTransform(multiply=config.logit_scale)


@dataclass(frozen=True)
class Family:
    verified: str  # what tests/test_families.py proves for this model type
    logits: Callable[[Any], LogitTransform] = _identity
    router_aux: bool = False  # transformers adds load_balancing_loss_func when asked
    sinks: bool = False  # learned attention sinks (s_aux)


FAMILIES: dict[str, Family] = {
    "llama": Family("causal attention"),
    "internlm3": Family("causal attention (LlamaForCausalLM)"),
    "mistral": Family("a sliding window on every layer"),
    "ministral": Family("a sliding window on every layer"),
    "qwen2": Family("sliding windows on the layers past max_window_layers"),
    "qwen3": Family("qk-norm; sliding windows on the layers past max_window_layers"),
    "phi3": Family("a sliding window on every layer; fused qkv"),
    "phi": Family("partial rotary, parallel attention/MLP, biases"),
    "starcoder2": Family("a sliding window on every layer; biases"),
    "gemma": Family("scaled embeddings, head_dim != hidden/heads"),
    "gemma2": Family(
        "sliding and full layers, attention logit softcapping, query_pre_attn_scalar, "
        "final logit softcapping",
        logits=_final_softcap,
    ),
    "gemma3_text": Family(
        "sliding and full layers (layer_types), local rope, final logit softcapping",
        logits=_final_softcap,
    ),
    "granite": Family(
        "attention/embedding/residual multipliers, logits / logits_scaling",
        logits=_divide_by_logits_scaling,
    ),
    "cohere": Family("parallel block, logits * logit_scale", logits=_multiply_by_logit_scale),
    "cohere2": Family(
        "sliding and full layers, logits * logit_scale", logits=_multiply_by_logit_scale
    ),
    "olmo": Family("causal attention, non-parametric layer norm"),
    "olmo2": Family("qk-norm, post-norm blocks"),
    "olmo3": Family("sliding and full layers (layer_types)"),
    "glm": Family("partial rotary"),
    "glm4": Family("partial rotary, sandwich norms"),
    "smollm3": Family("layers without rope (no_rope_layers)"),
    "deepseek_v3": Family(
        "multi-head latent attention (value heads smaller than query heads), MoE"
    ),
    "qwen2_moe": Family("MoE with shared expert, router loss", router_aux=True),
    "qwen3_moe": Family("MoE, router load-balancing loss", router_aux=True),
    "mixtral": Family("MoE, router load-balancing loss, sliding window", router_aux=True),
    "olmoe": Family("MoE, router load-balancing loss", router_aux=True),
    "granitemoe": Family(
        "MoE, router loss, logits / logits_scaling",
        logits=_divide_by_logits_scaling,
        router_aux=True,
    ),
    "gpt_oss": Family(
        "learned attention sinks, sliding and full layers, MoE router loss",
        router_aux=True,
        sinks=True,
    ),
}

# attention outside transformers' attention interface: evotune's kernels never run
BYPASSES_ATTENTION_INTERFACE = {
    "falcon": "its attention modules are chosen by name and do not call transformers' "
    "attention interface, so evotune's varlen kernels cannot keep packed samples apart",
    "bloom": "ALiBi attention outside transformers' attention interface",
    "mpt": "ALiBi attention outside transformers' attention interface",
}
ATTENTION_LAYER_TYPES = {"full_attention", "sliding_attention"}
DROPOUT_KEYS = ("attention_dropout", "attn_pdrop", "attention_probs_dropout_prob")


def family_of(config: Any) -> Family | None:
    return FAMILIES.get(str(getattr(config, "model_type", "")))


def attention_needs(config: Any) -> AttentionNeeds:
    """The windows, softcapping, sinks and head size the model's layers will ask for."""
    window = getattr(config, "sliding_window", None) or None
    layer_types = getattr(config, "layer_types", None)
    if layer_types:
        windows = frozenset(window if kind == "sliding_attention" else None for kind in layer_types)
    else:  # Mistral style: the config's window (or none) on every layer
        windows = frozenset({window})
    heads = getattr(config, "num_attention_heads", 1) or 1
    head_dims = [
        getattr(config, "head_dim", None) or getattr(config, "hidden_size", 64) // heads,
        (getattr(config, "qk_nope_head_dim", 0) or 0)
        + (getattr(config, "qk_rope_head_dim", 0) or 0),
        getattr(config, "v_head_dim", 0) or 0,
    ]
    family = family_of(config)
    return AttentionNeeds(
        windows=windows,
        softcap=getattr(config, "attn_logit_softcapping", None) is not None,
        sinks=bool(family and family.sinks),
        head_dim=max(head_dims),
    )


def logit_transform(config: Any) -> LogitTransform:
    """The family's logit transform; unverified families get final softcapping only."""
    family = family_of(config)
    return family.logits(config) if family else _final_softcap(config)


def inexact_features(config: Any) -> list[str]:
    """Features evotune's kernels cannot train exactly on packed rows, for any family."""
    problems = []
    model_type = getattr(config, "model_type", None)
    if model_type in BYPASSES_ATTENTION_INTERFACE:
        problems.append(BYPASSES_ATTENTION_INTERFACE[model_type])
    other_layers = sorted(set(getattr(config, "layer_types", None) or ()) - ATTENTION_LAYER_TYPES)
    if other_layers:
        problems.append(
            f"layer_types {other_layers}: hybrid linear/recurrent or chunked layers have no "
            "varlen kernel here and would carry state across packed samples"
        )
    if getattr(config, "attention_chunk_size", None):
        problems.append("chunked attention (attention_chunk_size) has no varlen kernel here")
    for key in DROPOUT_KEYS:
        if (getattr(config, key, 0) or 0) > 0:
            problems.append(f"{key}={getattr(config, key)}: set it to 0 in config.json")
    return problems


def check_model(config: Any, allow_unverified_model: bool = False) -> None:
    """Refuse a model evotune cannot train exactly; one line naming the type and the gap."""
    model_type = getattr(config, "model_type", None)
    problems = inexact_features(config)
    if problems:
        raise ConfigError(
            f"model_type {model_type!r} cannot be trained exactly on packed rows: "
            + "; ".join(problems)
        )
    if model_type in FAMILIES:
        return
    message = (
        f"model_type {model_type!r} is not verified for packed training (its attention, "
        "logit transform and auxiliary losses are unchecked against its own forward); "
        f"verified: {', '.join(sorted(FAMILIES))}"
    )
    if not allow_unverified_model:
        raise ConfigError(message + "; set allow_unverified_model=True to train it anyway")
    logger.warning("UNVERIFIED MODEL: %s; training anyway (allow_unverified_model=True)", message)


# -- MoE router load-balancing loss ---------------------------------------------------------


@dataclass(frozen=True)
class RouterLoss:
    coefficient: float
    num_experts: int
    top_k: int


def router_loss_of(model: torch.nn.Module) -> RouterLoss | None:
    """The router loss transformers would add for this model, or None."""
    config = model.config
    if not getattr(config, "output_router_logits", False):
        return None
    family = family_of(config)
    if family is not None and not family.router_aux:
        return None
    coefficient = getattr(model, "router_aux_loss_coef", None)
    experts = getattr(model, "num_experts", None)
    top_k = getattr(model, "num_experts_per_tok", None)
    if coefficient is None or experts is None or top_k is None:
        return None
    return RouterLoss(float(coefficient), int(experts), int(top_k))


class _GroupSum(torch.autograd.Function):
    """All-reduce sum whose backward sums the gradients over the group too."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group: Any) -> torch.Tensor:
        ctx.group = group
        x = x.clone()
        dist.all_reduce(x, group=group)
        return x

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        grad = grad.clone()
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


def router_aux_loss(
    router_logits: tuple[torch.Tensor, ...],
    loss: RouterLoss,
    real_tokens: torch.Tensor,
    sequence_parallel: Any = None,
) -> torch.Tensor:
    """``coefficient * load_balancing_loss_func`` over the real tokens of one packed row.

    ``router_logits``: one (tokens, experts) tensor per MoE layer; ``real_tokens``:
    (tokens,) 1 for a sample token, 0 for sequence-parallel padding.
    """
    mask = real_tokens.reshape(-1).float()
    device = router_logits[0].device
    mask = mask.to(device)
    assignments = torch.zeros(loss.num_experts, dtype=torch.float32, device=device)
    probabilities = torch.zeros(loss.num_experts, dtype=torch.float32, device=device)
    rows = torch.zeros((), dtype=torch.float32, device=device)
    for layer_logits in router_logits:
        routing = torch.softmax(layer_logits.to(device), dim=-1)
        _, selected = torch.topk(routing, loss.top_k, dim=-1)
        assignments = assignments + torch.zeros_like(assignments).scatter_add_(
            0, selected.reshape(-1), mask.repeat_interleave(loss.top_k)
        )
        probabilities = probabilities + (routing.float() * mask.unsqueeze(-1)).sum(dim=0)
        rows = rows + mask.sum()
    share = 1.0
    if sequence_parallel is not None:
        group = sequence_parallel.group
        assignments = _GroupSum.apply(assignments, group)
        probabilities = _GroupSum.apply(probabilities, group)
        rows = _GroupSum.apply(rows, group)
        share = 1.0 / sequence_parallel.size
    aux = torch.sum((assignments / rows) * (probabilities / rows)) * loss.num_experts
    return aux * (loss.coefficient * share)
