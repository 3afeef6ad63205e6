"""ParallelDims: the one object that owns ranks, devices and process groups.

Layout (training.md section 5): sequence-parallel groups are contiguous ranks
[i*sp, (i+1)*sp); the data-parallel rank is rank // sp and DP size is world / sp.
Everything that needs a rank or a group receives this object as an argument.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist

from ..config import ConfigError

COLLECTIVE_TIMEOUT = datetime.timedelta(minutes=10)


@dataclass
class ParallelDims:
    world_size: int = 1
    rank: int = 0
    local_rank: int = 0
    sp_size: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    sp_group: Any = None
    dp_group: Any = None

    @property
    def dp_size(self) -> int:
        return self.world_size // self.sp_size

    @property
    def dp_rank(self) -> int:
        return self.rank // self.sp_size

    @property
    def sp_rank(self) -> int:
        return self.rank % self.sp_size

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @classmethod
    def from_environment(cls, sp_size: int = 1) -> ParallelDims:
        """Read torchrun's variables (WORLD_SIZE, RANK, LOCAL_RANK), start the process group."""
        world_size = int(os.environ.get("WORLD_SIZE", "1"))
        rank = int(os.environ.get("RANK", "0"))
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        if world_size % sp_size:
            raise ConfigError(
                f"sequence_parallel_size={sp_size} must divide the number of processes "
                f"({world_size}); change sequence_parallel_size or NPROC_PER_NODE/NNODES"
            )
        if torch.cuda.is_available():
            device = torch.device("cuda", local_rank)
            torch.cuda.set_device(device)
        else:
            device = torch.device("cpu")
        dims = cls(world_size, rank, local_rank, sp_size, device)
        if world_size > 1 and not dist.is_initialized():
            backend = "nccl" if device.type == "cuda" else "gloo"
            dist.init_process_group(backend=backend, timeout=COLLECTIVE_TIMEOUT)
        if world_size > 1:
            dims._create_groups()
        return dims

    def _create_groups(self) -> None:
        # every rank must create every group, in the same order
        for start in range(0, self.world_size, self.sp_size):
            ranks = list(range(start, start + self.sp_size))
            group = dist.new_group(ranks)
            if self.rank in ranks:
                self.sp_group = group
        for sp_rank in range(self.sp_size):
            ranks = list(range(sp_rank, self.world_size, self.sp_size))
            group = dist.new_group(ranks)
            if self.rank in ranks:
                self.dp_group = group

    def all_reduce_sum(self, values: list[float], group: Any = None) -> list[float]:
        """Sum floats over a group (the whole world by default) in float64."""
        if not self.is_distributed:
            return list(values)
        tensor = torch.tensor(values, dtype=torch.float64, device=self._collective_device())
        dist.all_reduce(tensor, group=group)
        return tensor.tolist()

    def barrier(self) -> None:
        if self.is_distributed:
            dist.barrier()

    def _collective_device(self) -> torch.device:
        return self.device if dist.get_backend() == "nccl" else torch.device("cpu")

    def shutdown(self, clean: bool) -> None:
        """Tear the process group down before interpreter exit.

        On success every rank first meets at a barrier, so no rank exits while a
        peer still has collectives in flight (gloo's worker threads otherwise
        die with the interpreter). After a failure there is no barrier: peers
        may be stuck in a collective, and torchrun stops them.
        """
        if not dist.is_initialized():
            return
        if clean:
            dist.barrier()
        dist.destroy_process_group()
