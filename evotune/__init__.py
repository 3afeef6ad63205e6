"""evotune: train Hugging Face causal LMs on InternEvo (ftdp) data, InternEvo's way."""

__version__ = "0.1.0"
