"""ParallelDims describes the layout: SP groups are contiguous, DP groups strided."""

from __future__ import annotations

from pathlib import Path

import pytest

from evotune.errors import ConfigError
from evotune.parallel.dims import ParallelDims, rank_groups


def test_rank_groups_at_world_4_and_8():
    assert rank_groups(4, 2) == {"sp": [[0, 1], [2, 3]], "dp": [[0, 2], [1, 3]]}
    assert rank_groups(8, 4) == {
        "sp": [[0, 1, 2, 3], [4, 5, 6, 7]],
        "dp": [[0, 4], [1, 5], [2, 6], [3, 7]],
    }
    assert rank_groups(8, 1) == {"sp": [[r] for r in range(8)], "dp": [list(range(8))]}


@pytest.mark.parametrize("world, sp", [(4, 1), (4, 2), (4, 4), (8, 2), (8, 8)])
def test_every_rank_is_in_one_group_of_each_kind(world, sp):
    groups = rank_groups(world, sp)
    for kind in ("sp", "dp"):
        flat = sorted(rank for group in groups[kind] for rank in group)
        assert flat == list(range(world))
    for rank in range(world):
        dims = ParallelDims(world_size=world, rank=rank, sp_size=sp)
        sp_group = next(g for g in groups["sp"] if rank in g)
        dp_group = next(g for g in groups["dp"] if rank in g)
        # the rank's coordinates are its position in each of its groups
        assert sp_group.index(rank) == dims.sp_rank
        assert dp_group.index(rank) == dims.dp_rank
        assert len(dp_group) == dims.dp_size == world // sp


def test_invalid_layouts_are_refused():
    with pytest.raises(ConfigError, match="must divide the number of processes"):
        ParallelDims(world_size=6, sp_size=4)
    with pytest.raises(ConfigError, match="must be >= 1"):
        ParallelDims(world_size=2, sp_size=0)


def test_sum_step_counts_whole_rows_once_per_replica():
    dims = ParallelDims()
    assert dims.sum_step([1.5, 2.0], [10.0]) == ([1.5, 2.0], [10.0])


def _run_on_main_worker(rank: int, port: int, output: str) -> None:
    import json
    import os

    import torch.distributed as dist

    from evotune.errors import ConfigError, UserError

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    dims = ParallelDims(world_size=2, rank=rank)
    seen = {"value": dims.run_on_main(lambda: 42)}

    def fail() -> int:
        raise ConfigError("model.safetensors: truncated")

    try:
        dims.run_on_main(fail)
    except UserError as error:
        seen["error"] = f"{type(error).__name__}: {error}"
    dist.destroy_process_group()
    Path(f"{output}.{rank}").write_text(json.dumps(seen))


@pytest.mark.integration
def test_run_on_main_returns_there_and_spreads_a_failure(tmp_path):
    """The others wait for the main rank, and end with its error instead of hanging."""
    import json

    import torch.multiprocessing as mp
    from runner import free_port

    output = str(tmp_path / "seen")
    mp.spawn(_run_on_main_worker, args=(free_port(), output), nprocs=2)
    main, other = (json.loads(Path(f"{output}.{rank}").read_text()) for rank in (0, 1))
    assert main == {"value": 42, "error": "ConfigError: model.safetensors: truncated"}
    assert other == {
        "value": None,
        "error": "UserError: rank 0 failed: model.safetensors: truncated",
    }
