"""Model loading, varlen attention and the chunked loss."""

from .attention import register_attention, resolve_kernel
from .load import load_model
from .loss import chunked_cross_entropy_sum, packed_loss_sum

__all__ = [
    "chunked_cross_entropy_sum",
    "load_model",
    "packed_loss_sum",
    "register_attention",
    "resolve_kernel",
]
