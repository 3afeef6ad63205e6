"""ftdp datasets: index, pack, order, collate."""

from .collate import PackCollator, PackedBatch
from .ftdp import DataError, TokenizedCorpus, load_intern_repo_tokenized_dataset
from .packing import IGNORE_INDEX, PackedDataset, build_packed_dataset
from .sampler import InternRepoSampler, SequenceParallelSampler

__all__ = [
    "IGNORE_INDEX",
    "DataError",
    "InternRepoSampler",
    "PackCollator",
    "PackedBatch",
    "PackedDataset",
    "SequenceParallelSampler",
    "TokenizedCorpus",
    "build_packed_dataset",
    "load_intern_repo_tokenized_dataset",
]
