"""ParallelDims: a validated description of the process layout, and its device mesh.

Layout: sequence-parallel groups are contiguous ranks [i*sp, (i+1)*sp); the
data-parallel rank is rank // sp and the DP size is world / sp
(docs/training.md, "Sequence parallelism"). The layout is one named
``DeviceMesh`` of shape (dp, sp); nothing else creates process groups, and
everything that needs a rank or a group receives this object as an argument.
"""

from __future__ import annotations

import datetime
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import torch
import torch.distributed as dist

from ..errors import ConfigError, UserError

COLLECTIVE_TIMEOUT = datetime.timedelta(minutes=10)
# reading a large checkpoint from network storage on one rank can outlast a collective
MAIN_RANK_WORK_TIMEOUT = datetime.timedelta(hours=2)
MESH_DIMS = ("dp", "sp")
T = TypeVar("T")


def rank_groups(world_size: int, sp_size: int) -> dict[str, list[list[int]]]:
    """The ranks of every SP group and every DP group of a (dp, sp) row-major mesh."""
    dp_size = world_size // sp_size
    return {
        "sp": [list(range(d * sp_size, (d + 1) * sp_size)) for d in range(dp_size)],
        "dp": [list(range(s, world_size, sp_size)) for s in range(sp_size)],
    }


@dataclass
class ParallelDims:
    world_size: int = 1
    rank: int = 0
    local_rank: int = 0
    sp_size: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    mesh: Any = None  # torch DeviceMesh with dims ("dp", "sp") when distributed

    def __post_init__(self) -> None:
        if self.sp_size < 1 or self.world_size < 1:
            raise ConfigError(
                f"sequence_parallel_size={self.sp_size} and world size {self.world_size} must "
                "be >= 1"
            )
        if self.world_size % self.sp_size:
            raise ConfigError(
                f"sequence_parallel_size={self.sp_size} must divide the number of processes "
                f"({self.world_size}); change sequence_parallel_size or NPROC_PER_NODE/NNODES"
            )
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank {self.rank} outside world size {self.world_size}")

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

    @property
    def sp_group(self) -> Any:
        return self.mesh.get_group("sp") if self.mesh is not None else None

    @property
    def dp_group(self) -> Any:
        return self.mesh.get_group("dp") if self.mesh is not None else None

    @classmethod
    def from_environment(cls, sp_size: int = 1) -> ParallelDims:
        """Read torchrun's variables (WORLD_SIZE, RANK, LOCAL_RANK), start the process group."""
        world_size = int(os.environ.get("WORLD_SIZE", "1"))
        rank = int(os.environ.get("RANK", "0"))
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        if torch.cuda.is_available():
            device = torch.device("cuda", local_rank)
            torch.cuda.set_device(device)
        else:
            device = torch.device("cpu")
        dims = cls(world_size, rank, local_rank, sp_size, device)
        if world_size > 1:
            dims.start_process_group()
        return dims

    def start_process_group(self) -> None:
        """Start (or join) the default group and build the (dp, sp) mesh; collective."""
        from torch.distributed.device_mesh import init_device_mesh

        if not dist.is_initialized():
            backend = "nccl" if self.device.type == "cuda" else "gloo"
            dist.init_process_group(
                backend=backend,
                timeout=COLLECTIVE_TIMEOUT,
                rank=self.rank,
                world_size=self.world_size,
            )
        self.mesh = init_device_mesh(
            self.device.type, (self.dp_size, self.sp_size), mesh_dim_names=MESH_DIMS
        )

    def ensure_process_group(self) -> None:
        """A process group even for one process (DeepSpeed and FSDP2 need one)."""
        if self.mesh is not None:
            return
        if not dist.is_initialized():
            from ..launch import free_port

            for name, value in (
                ("RANK", "0"),
                ("LOCAL_RANK", "0"),
                ("WORLD_SIZE", "1"),
                ("MASTER_ADDR", "127.0.0.1"),
            ):
                os.environ.setdefault(name, value)
            os.environ.setdefault("MASTER_PORT", str(free_port()))
        self.start_process_group()

    def all_reduce_sum(self, values: list[float], group: Any = None) -> list[float]:
        """Sum floats over a group (the whole world by default) in float64."""
        if not self.is_distributed:
            return list(values)
        tensor = torch.tensor(values, dtype=torch.float64, device=self._collective_device())
        dist.all_reduce(tensor, group=group)
        return tensor.tolist()

    def sum_step(
        self, per_rank: list[float], per_replica: list[float]
    ) -> tuple[list[float], list[float]]:
        """One all-reduce for a step's figures.

        ``per_rank`` values are summed over every rank; ``per_replica`` values are
        equal on the ranks of a sequence-parallel group (they describe whole rows),
        so they are summed over data-parallel replicas only.
        """
        shared = per_replica if self.sp_rank == 0 else [0.0] * len(per_replica)
        summed = self.all_reduce_sum([*per_rank, *shared])
        return summed[: len(per_rank)], summed[len(per_rank) :]

    def first_failure(self, message: str | None) -> str | None:
        """Collective: the failure of the lowest failing rank, or None when all are fine.

        One small all-reduce when nothing failed; the messages travel only on failure.
        """
        if not self.is_distributed:
            return message
        if self.all_reduce_sum([1.0 if message else 0.0])[0] == 0:
            return None
        messages: list[str | None] = [None] * self.world_size
        dist.all_gather_object(messages, message)
        return next(m for m in messages if m)

    def run_on_main(self, work: Callable[[], T]) -> T | None:
        """``work()`` on the main rank while the others wait (collective); None elsewhere.

        The others wait on a gloo group of their own with MAIN_RANK_WORK_TIMEOUT, not
        the collective timeout. When ``work`` fails, the main rank raises its error and
        the others raise one line naming it (a UserError when it is the user's).
        """
        if not self.is_distributed:
            return work()
        group = dist.new_group(backend="gloo", timeout=MAIN_RANK_WORK_TIMEOUT)
        result, failure = None, None
        if self.is_main:
            try:
                result = work()
            except Exception as error:
                failure = error
        status: list[Any] = [None]
        if failure is not None:
            status = [(isinstance(failure, UserError), " ".join(str(failure).split())[:500])]
        dist.broadcast_object_list(status, src=0, group=group)
        dist.destroy_process_group(group)
        if failure is not None:
            raise failure
        if status[0] is not None:
            users, message = status[0]
            raise (UserError if users else RuntimeError)(f"rank 0 failed: {message}")
        return result

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
