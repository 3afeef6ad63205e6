"""Multi-process training on CPU (gloo) against the single-process run.

Same global batch (dp x accumulative_counts packs) and seed: per-step losses and
final weights of 1 process with accumulative_counts=2 must match 2 processes
with 1 (DDP, ZeRO-1/2/3). Tolerance: fp32 sums reduced in a different order
differ by a few ulps per step; after 4 AdamW steps (lr 1e-3) we accept 1e-5
relative on losses and 2e-5 absolute on weights of magnitude ~0.02-1.
"""

from __future__ import annotations

import pytest
import torch
from runner import final_weights, losses, records, run_train
from tiny import save_tiny_llama, write_config, write_corpus

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("dist")
    model = save_tiny_llama(root / "model")
    data = write_corpus(root / "data", shards=3, samples=60)
    return root, model, data


@pytest.fixture(scope="module")
def single(setup):
    root, model, data = setup
    config = write_config(root / "single.py", model, data, accumulative_counts=2, total_steps=4)
    result = run_train(config, root / "single")
    assert result.returncode == 0, result.stderr[-3000:]
    return root / "single"


def _compare(reference, other):
    torch.testing.assert_close(
        torch.tensor(losses(other)), torch.tensor(losses(reference)), rtol=1e-5, atol=1e-6
    )
    expected, got = final_weights(reference), final_weights(other)
    assert expected.keys() == got.keys()
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=0, atol=2e-5, msg=name)


@pytest.mark.parametrize("engine", [None, "deepspeed_zero1", "deepspeed_zero2", "deepspeed_zero3"])
def test_two_processes_match_one(setup, single, engine):
    root, model, data = setup
    name = engine or "ddp"
    config = write_config(root / f"{name}.py", model, data, accumulative_counts=1, total_steps=4)
    extra = ["--deepspeed", engine] if engine else []
    result = run_train(config, root / name, *extra, nproc=2)
    assert result.returncode == 0, result.stderr[-3000:]
    _compare(single, root / name)
    assert "global batch = dp 2 x accumulative_counts 1 x batch_size 1 = 2 packs" in result.stderr


def test_slurm_launcher_by_hand(setup, single):
    """Two processes started with SLURM_* variables, as srun would."""
    import subprocess
    import sys

    from runner import free_port

    root, model, data = setup
    config = write_config(root / "slurm.py", model, data, accumulative_counts=1, total_steps=4)
    port = str(free_port())
    processes = []
    for rank in (0, 1):
        env = {
            "SLURM_PROCID": str(rank),
            "SLURM_NTASKS": "2",
            "SLURM_LOCALID": str(rank),
            "SLURM_NODELIST": "localhost",
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": port,
            "OMP_NUM_THREADS": "1",
            "PATH": __import__("os").environ["PATH"],
        }
        processes.append(
            subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "evotune.cli",
                    "train",
                    str(config),
                    "--launcher",
                    "slurm",
                    "--work-dir",
                    str(root / "slurm"),
                    "--no-progress",
                ],
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
        )
    outputs = [p.communicate(timeout=300) for p in processes]
    assert [p.returncode for p in processes] == [0, 0], outputs[0][1][-2000:]
    _compare(single, root / "slurm")


def test_rank_failure_ends_run_with_cause(setup, tmp_path):
    _root, model, data = setup
    from ftdp_factory import write_shard

    broken = tmp_path / "data"
    import shutil

    shutil.copytree(data, broken)
    # a token beyond the model's vocab: whichever rank reads it first fails
    write_shard(broken / "en" / "zz" / "bad.bin", [[5, 7, 100_000, 9] * 40] * 4)
    config = write_config(
        tmp_path / "bad.py", model, broken, accumulative_counts=1, total_steps=200, max_epochs=1
    )
    result = run_train(config, tmp_path / "w", nproc=2, timeout=240)
    assert result.returncode == 2, result.stderr[-3000:]
    last = result.stderr.strip().splitlines()[-1]
    assert (
        last.startswith("evotune: error: rank")
        and "token id 100000 >= the model's vocab size" in last
    )


def test_leftover_micro_batches_form_a_last_step(setup, tmp_path):
    """XTuner order truncates to a multiple of dp only: the last step is shorter, not dropped."""
    _root, model, data = setup
    config = write_config(
        tmp_path / "left.py",
        model,
        data,
        accumulative_counts=4,
        total_steps=None,
        max_epochs=1,
        train_dataloader=dict(sampler=dict(type="__sampler__", order="xtuner")),
    )
    text = config.read_text().replace("'__sampler__'", "InternRepoSampler")
    config.write_text("from evotune.data import InternRepoSampler\n" + text)
    result = run_train(config, tmp_path / "w")
    assert result.returncode == 0, result.stderr[-3000:]
    from evotune.data import build_packed_dataset, load_intern_repo_tokenized_dataset

    packs = len(build_packed_dataset(load_intern_repo_tokenized_dataset(data), packed_length=64))
    steps = records(tmp_path / "w")
    assert sum(r["micro_batches"] for r in steps) == packs
    assert packs % 4 != 0  # the corpus is chosen so that the last step is short
    assert len(steps) == -(-packs // 4)
    assert steps[-1]["micro_batches"] == packs % 4
    assert all(r["micro_batches"] == 4 for r in steps[:-1])
