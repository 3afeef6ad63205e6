"""``evotune train``: config -> work dir -> parallel layout -> Trainer -> exit code."""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

from ..config import ConfigError, LoadedConfig, load_config
from ..parallel.dims import ParallelDims
from . import checkpoint as ckpt

logger = logging.getLogger("evotune")


def resolve_work_dir(loaded: LoadedConfig, work_dir: str | None) -> Path:
    chosen = work_dir or loaded.settings.work_dir or f"work_dirs/{loaded.source.stem}"
    path = Path(chosen).expanduser().resolve()
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".write-probe-{os.getpid()}"
        probe.write_text("ok")
        probe.unlink()
    except OSError as error:
        raise ConfigError(
            f"--work-dir {path}: not writable ({error.strerror}); choose another folder"
        ) from None
    return path


def setup_logging(dims: ParallelDims, work_dir: Path | None, progress_bar: bool = False) -> None:
    prefix = f"[rank {dims.rank}] " if dims.is_distributed else ""
    formatter = logging.Formatter(f"%(asctime)s {prefix}%(levelname)s %(message)s", "%H:%M:%S")
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
    console = logging.StreamHandler(sys.stderr)
    console.setFormatter(formatter)
    console.setLevel(logging.INFO if dims.is_main else logging.WARNING)
    if progress_bar:  # the bar shows the steps; train.log still gets every step line
        console.addFilter(lambda record: record.name != "evotune.steps")
    root.addHandler(console)
    if work_dir is not None and dims.is_main:
        log_file = logging.FileHandler(work_dir / "train.log")
        log_file.setFormatter(formatter)
        root.addHandler(log_file)
    root.setLevel(logging.INFO)
    import transformers

    transformers.utils.logging.disable_progress_bar()
    for noisy in ("transformers", "torch", "DeepSpeed", "deepspeed", "urllib3", "filelock"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def resolve_resume(resume: str | None, work_dir: Path) -> str | None:
    if resume is None:
        return None
    if resume == "auto":
        latest = ckpt.latest_checkpoint(work_dir)
        if latest is None:
            logger.info("--resume auto: no complete checkpoint in %s; starting fresh", work_dir)
            return None
        return str(latest)
    path = Path(resume)
    if not path.is_dir():
        raise ConfigError(f"--resume {resume}: no such checkpoint folder")
    return str(path)


def run_training(
    config_path: Path,
    overrides: list[str],
    work_dir: str | None = None,
    resume: str | None = None,
    show_progress: bool = True,
) -> int:
    from .trainer import Trainer

    loaded = load_config(config_path, overrides)
    dims = ParallelDims.from_environment(loaded.settings.sequence_parallel_size)
    succeeded = False
    try:
        work = resolve_work_dir(loaded, work_dir)
        setup_logging(dims, work, progress_bar=show_progress)
        if dims.is_main:
            rendered = loaded.render()
            (work / "config.py").write_text(rendered)
            logger.info("resolved config (saved to %s):\n%s", work / "config.py", rendered)
        trainer = Trainer(
            loaded, work, dims, resume=resolve_resume(resume, work), show_progress=show_progress
        )
        result = trainer.train()
        if dims.is_main:
            logger.info("done: %d steps, last checkpoint %s", result.steps, result.last_checkpoint)
        succeeded = True
        return 0
    finally:
        dims.shutdown(clean=succeeded)
