"""CheckpointManager: when to save, what a checkpoint holds, and resuming from one.

A save is collective: every rank writes its engine state into one hidden
temporary folder, the main rank adds the HF folder, the run state and the
resolved config, and publishes it with one rename (evotune.train.checkpoint).
A resume checks that the checkpoint belongs to this run's layout and data
before anything is loaded, then restores engine, RNG and run state.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from ..config import LoadedConfig
from ..data import PackedDataset
from ..errors import ConfigError
from ..model.hf_folder import write_hf_folder
from ..parallel.dims import ParallelDims
from ..parallel.engine import Engine
from ..parallel.parallelize import TORCH_DTYPES
from . import checkpoint as ckpt
from .state import TrainState

logger = logging.getLogger("evotune")


class CheckpointManager:
    def __init__(
        self,
        work_dir: Path,
        dims: ParallelDims,
        engine: Engine,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase | None,
        loaded: LoadedConfig,
        dataset: PackedDataset,
        sampler: Any,
        total_steps: int,
    ):
        self.work_dir = work_dir
        self.dims = dims
        self.engine = engine
        self.model = model
        self.tokenizer = tokenizer
        self.loaded = loaded
        self.dataset = dataset
        self.sampler = sampler
        self.total_steps = total_steps
        settings = loaded.settings
        if tokenizer is not None and settings.prompt_template is not None:
            # the saved tokenizer formats chats the way this run's data and answers were
            from ..data.templates import get_template
            from ..data.tokenize import special_ids

            template = get_template(settings.prompt_template)
            tokenizer.chat_template = template.chat_template(
                with_bos=bool(special_ids(tokenizer)[0])
            )
        self.save_steps = settings.save_steps
        self.keep = settings.save_total_limit
        self.save_dtype = TORCH_DTYPES[settings.dtype]
        self.shard_bytes = max(1, int(settings.save_shard_size_mb * 2**20))

    def due(self, step: int, last: bool) -> bool:
        return last or step % self.save_steps == 0

    def identity(self) -> dict[str, Any]:
        """What a checkpoint must share with this run to be resumed by it."""
        dataset = dict(self.dataset.describe()) | {"folder": self.dataset.corpus.folder}
        return {
            "engine": self.engine.name,
            "dp_size": self.dims.dp_size,
            "world_size": self.dims.world_size,
            "dataset": dataset,
        }

    def save(self, state: TrainState) -> Path:
        """checkpoint-<step>, written to a temporary folder by every rank, then published."""
        dims, step = self.dims, state.step
        temporary = ckpt.temporary_folder(self.work_dir, step)
        if dims.is_main:
            ckpt.prepare_folder(temporary)
        dims.barrier()
        weights_saved_exactly = self._write_hf_folder(temporary / "hf")
        self.engine.save_state(temporary, weights_saved_exactly)
        dims.barrier()
        path = self.work_dir / ckpt.checkpoint_name(step)
        if dims.is_main:
            torch.save(rng_state(), temporary / "rng.pt")
            run_state = {
                "state": asdict(state),
                "sampler": self.sampler.state_dict(consumed=state.consumed_in_epoch),
                "total_steps": self.total_steps,
                **self.identity(),
            }
            ckpt.write_json(temporary / "trainer_state.json", run_state)
            (temporary / "config.py").write_text(self.loaded.render())
            ckpt.publish(temporary, path)
            removed = ckpt.prune_checkpoints(self.work_dir, self.keep)
            logger.info("saved %s%s", path, f" (removed {len(removed)} old)" if removed else "")
        dims.barrier()
        return path

    def _write_hf_folder(self, folder: Path) -> bool:
        """Stream the weights into ``folder`` on the main rank (collective).

        Returns, on the main rank, whether the folder holds every parameter bit for bit
        under its in-memory name (False on the other ranks, which write nothing).
        """
        groups = self.engine.hf_weight_groups(self.save_dtype)
        if not self.dims.is_main:
            for _ in groups:  # take part in each gather
                pass
            return False
        try:
            writer = write_hf_folder(folder, self.model, groups, self.save_dtype, self.shard_bytes)
        except Exception:
            # the other ranks are inside the same gathers: let them finish, then fail
            with contextlib.suppress(Exception):
                for _ in groups:
                    pass
            raise
        _portable_config(folder)
        if self.tokenizer is not None:
            self.tokenizer.save_pretrained(folder)
        return self.save_dtype == torch.float32 and not writer.renamed

    def resume(self, path: Path) -> TrainState:
        """Check that ``path`` belongs to this run, then restore engine, RNG, sampler and state.

        An elastic engine (FSDP2) may resume on another data-parallel size: its state
        reshards on load and the sampler re-splits the rest of the epoch.
        """
        expected = self.identity()
        if not (path / ckpt.COMPLETE_MARKER).is_file():
            raise ConfigError(
                f"--resume {path}: not a complete evotune checkpoint (no COMPLETE marker)"
            )
        problems = ckpt.verify_checkpoint(path)
        if problems:
            raise ConfigError(f"--resume {path}: damaged: {'; '.join(problems)}")
        saved = ckpt.read_json(path / "trainer_state.json")
        elastic = self.engine.elastic  # its state reshards on load
        _check_same_run(path, saved, expected, elastic, self.engine.partitioned)
        if saved.get("dp_size") != expected.get("dp_size"):
            logger.info(
                "resuming on data-parallel size %s (saved with %s): the engine state reshards "
                "and the rest of the epoch is split over the new ranks",
                expected.get("dp_size"),
                saved.get("dp_size"),
            )
        self.engine.load_state(path)
        restore_rng_state(torch.load(path / "rng.pt", weights_only=True))
        state = TrainState(**saved["state"])
        self.sampler.load_state_dict(saved["sampler"], relayout=elastic)
        state.consumed_in_epoch = self.sampler.start  # 0 where re-split on a new layout
        by_epochs = self.loaded.settings.total_steps is None
        if elastic and by_epochs and saved.get("total_steps") != self.total_steps:
            raise ConfigError(
                f"--resume {path}: max_epochs makes {saved.get('total_steps')} steps at the saved "
                f"global batch but {self.total_steps} at dp x accumulative_counts x batch_size "
                "now; keep that product, or set total_steps"
            )
        logger.info("resumed from %s at step %d", path, state.step)
        return state


def _check_same_run(
    path: Path,
    saved: dict[str, Any],
    expected: dict[str, Any],
    elastic: bool = False,
    partitioned: bool = False,
) -> None:
    """Refuse a checkpoint of another run.

    An ``elastic`` engine may change the layout; a ``partitioned`` one (ZeRO) needs the
    same world size too, since its state is split over every rank, SP ranks included.
    """
    mismatch = {
        "engine": "saved by the {saved!r} engine, now {now!r}; resume with the same --deepspeed "
        "/ --fsdp setting (or export the HF folder and start a new run)",
        "dp_size": "saved with data-parallel size {saved}, now {now}; resume with the same number "
        "of processes / sp size, or train with --fsdp, whose checkpoints resume on another "
        "layout (or export the HF folder and start a new run)",
        "world_size": "saved on {saved} processes, now {now}; a ZeRO checkpoint is partitioned "
        "over every rank: resume on the same number of processes, or train with --fsdp",
        "dataset": "the dataset or packing changed ({saved} -> {now}); resume with the original "
        "data and packing settings",
    }
    for key, now in expected.items():
        if key in ("dp_size", "world_size") and elastic:
            continue  # the engine (checked first) is the same and reshards
        if key == "world_size" and (not partitioned or key not in saved):
            continue  # a full replica per rank: only the data-parallel size matters
        if saved.get(key) != now:
            reason = mismatch[key].format(saved=saved.get(key), now=now)
            raise ConfigError(f"--resume {path}: {reason}")


def rng_state() -> dict[str, Any]:
    """Python, numpy and torch RNG states as plain values and tensors (weights_only loads)."""
    import random

    version, python_state, gauss = random.getstate()
    name, keys, position, has_gauss, cached = np.random.get_state()
    return {
        "python": [version, list(python_state), gauss],
        "numpy": [name, torch.from_numpy(np.asarray(keys, dtype=np.int64)), position, has_gauss,
                  cached],
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
    }  # fmt: skip


def restore_rng_state(state: dict[str, Any]) -> None:
    import random

    version, python_state, gauss = state["python"]
    random.setstate((version, tuple(python_state), gauss))
    name, keys, position, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), position, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _portable_config(hf_dir: Path) -> None:
    """Saved configs must not name evotune's training-only attention functions."""
    config_path = hf_dir / "config.json"
    config = ckpt.read_json(config_path)
    for key in ("_attn_implementation", "attn_implementation"):
        if str(config.get(key, "")).startswith("evotune_"):
            config.pop(key)
    config["use_cache"] = True  # training turned the cache off; generation wants it back
    ckpt.write_json(config_path, config)
