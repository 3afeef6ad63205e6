"""``evotune train``: config -> work dir -> parallel layout -> Trainer -> exit code."""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

import torch

from ..config import ConfigError, LoadedConfig, load_config
from ..parallel.dims import ParallelDims
from .stopping import Preempted, StopRequest
from .workdir import choose_start, truncate_records, work_dir_lock

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


def choose_cpu_threads(requested: int | None, dims: ParallelDims) -> int | None:
    """Threads for torch's CPU kernels: oversubscribing a busy machine costs 10-40x."""
    if dims.device.type != "cpu":
        return None
    if requested is None and "OMP_NUM_THREADS" in os.environ:
        return torch.get_num_threads()
    local_processes = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    threads = requested or max(1, len(os.sched_getaffinity(0)) // local_processes)
    torch.set_num_threads(threads)
    return threads


def run_training(
    config_path: Path,
    overrides: list[str],
    work_dir: str | None = None,
    resume: str | None = None,
    show_progress: bool = True,
    overwrite: bool = False,
) -> int:
    from .trainer import Trainer

    loaded = load_config(config_path, overrides)
    dims = ParallelDims.from_environment(loaded.settings.sequence_parallel_size)
    if dims.device.type == "cpu":  # spares runs that import DeepSpeed its GPU probe warning
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    threads = choose_cpu_threads(loaded.settings.cpu_threads, dims)
    stop = StopRequest()
    restore_signals = stop.install()
    succeeded = False
    try:
        work = resolve_work_dir(loaded, work_dir)
        setup_logging(dims, work, progress_bar=show_progress)
        if dims.is_main and threads is not None:
            logger.info("cpu threads per process: %d (set cpu_threads to change)", threads)
        with work_dir_lock(work, dims):
            start = choose_start(work, dims, resume, overwrite)
            trainer = Trainer(
                loaded,
                work,
                dims,
                resume=None if start is None else str(start),
                show_progress=show_progress,
                stop=stop,
            )
            if dims.is_main:  # only once the checkpoint was accepted
                rendered = loaded.render()
                (work / "config.py").write_text(rendered)
                logger.info("resolved config (saved to %s):\n%s", work / "config.py", rendered)
                if start is not None:
                    truncate_records(work, trainer.state.step)
            try:
                result = trainer.train()
            except Preempted as stopped:
                if dims.is_main:
                    logger.warning("%s", stopped)
                    print(f"evotune: {stopped}", file=sys.stderr, flush=True)
                succeeded = True  # every rank agreed on the stop and saved together
                return stopped.exit_code
        if dims.is_main:
            logger.info("done: %d steps, last checkpoint %s", result.steps, result.last_checkpoint)
        succeeded = True
        return 0
    finally:
        restore_signals()
        dims.shutdown(clean=succeeded)
