"""Model loading and family checks, varlen attention, and the packed loss."""

from .attention import AttentionMetadata, register_attention, resolve_kernel
from .families import FAMILIES, check_model
from .load import load_model
from .loss import PackedLoss, chunked_cross_entropy_sum, packed_loss, packed_loss_sum

__all__ = [
    "FAMILIES",
    "AttentionMetadata",
    "PackedLoss",
    "check_model",
    "chunked_cross_entropy_sum",
    "load_model",
    "packed_loss",
    "packed_loss_sum",
    "register_attention",
    "resolve_kernel",
]
