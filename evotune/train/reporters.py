"""Where a run's records go besides metrics.jsonl, and the dataset table of the banner.

metrics.jsonl stays the ground truth (every plot and report reads it). The
reporters named by ``report_to`` get the same records on the main rank:

* ``tensorboard``: event files under WORK_DIR/tensorboard (torch.utils.tensorboard;
  ``pip install 'evotune[tensorboard]'``). Every numeric value of every record
  becomes a scalar: ``train/loss``, ``train/loss_by_type/en``, ``eval/val_loss``,
  ``eval/val_loss_by_type/code``, ... at the record's step. A resumed run purges
  the events after its starting step, so replayed steps are not drawn twice.
* ``wandb``: Weights & Biases (``pip install wandb``), the same names, one W&B run
  per work dir (its id is kept in WORK_DIR/wandb_run_id, so a resumed run goes on
  in the same W&B run); ``WANDB_MODE=offline`` works without a network.

``report_to = 'auto'`` (the default) means TensorBoard when the package is
installed; a reporter asked for by name and not installed stops the run at start
with one line saying what to install.
"""

from __future__ import annotations

import importlib.util
import logging
import uuid
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

from ..config import TrainConfig
from ..errors import ConfigError

logger = logging.getLogger("evotune")

REPORTERS = ("tensorboard", "wandb")
TENSORBOARD_FOLDER = "tensorboard"
WANDB_RUN_ID_FILE = "wandb_run_id"
_INSTALL = {"tensorboard": "pip install 'evotune[tensorboard]'", "wandb": "pip install wandb"}
_MODULE = {"tensorboard": "tensorboard", "wandb": "wandb"}


def resolve_report_to(value: Any, source: str = "config") -> list[str]:
    """The reporters to build: names checked, 'auto' and 'none' resolved, each installed."""
    if value == "auto":
        if _installed("tensorboard"):
            return ["tensorboard"]
        logger.info(
            "TensorBoard is not installed: metrics.jsonl only (%s, or report_to='none')",
            _INSTALL["tensorboard"],
        )
        return []
    if value in ("none", None):
        return []
    names = [value] if isinstance(value, str) else value
    if not isinstance(names, list | tuple) or not all(isinstance(n, str) for n in names):
        raise ConfigError(
            f"{source}: report_to: a list of {', '.join(map(repr, REPORTERS))}, or 'auto' or "
            f"'none', got {value!r}"
        )
    for name in names:
        if name not in REPORTERS:
            raise ConfigError(
                f"{source}: report_to: unknown reporter {name!r}; choose from "
                f"{', '.join(map(repr, REPORTERS))} (or 'none')"
            )
        if not _installed(name):
            raise ConfigError(
                f"{source}: report_to: {name!r} is asked for but the {_MODULE[name]} package is "
                f"not installed; {_INSTALL[name]}, or remove it from report_to"
            )
    return list(dict.fromkeys(names))


def _installed(name: str) -> bool:
    try:
        return importlib.util.find_spec(_MODULE[name]) is not None
    except ValueError:  # a module set to None in sys.modules: not importable
        return False


def scalars(record: Mapping[str, Any]) -> dict[str, float]:
    """The numeric values of a record by reporter name: 'train/loss', 'eval/val_loss_by_type/en'.

    Booleans count as 0/1; None, strings and the step itself are left out.
    """
    prefix = "eval" if record.get("kind") == "eval" else "train"
    values: dict[str, float] = {}

    def add(name: str, value: Any) -> None:
        if isinstance(value, Mapping):
            for key, item in value.items():
                add(f"{name}/{key}", item)
        elif isinstance(value, bool | int | float):
            values[name] = float(value)

    for key, value in record.items():
        if key not in ("step", "kind"):
            add(f"{prefix}/{key}", value)
    return values


class Reporter(Protocol):
    def write(self, record: Mapping[str, Any]) -> None: ...

    def close(self) -> None: ...


class TensorBoardReporter:
    """Scalars in WORK_DIR/tensorboard event files."""

    def __init__(self, work_dir: Path, start_step: int):
        from torch.utils.tensorboard import SummaryWriter

        self.folder = work_dir / TENSORBOARD_FOLDER
        # a resumed run hides the events its predecessor wrote after the resume point
        purge = start_step + 1 if start_step > 0 else None
        self.writer = SummaryWriter(log_dir=str(self.folder), purge_step=purge, flush_secs=10)

    def write(self, record: Mapping[str, Any]) -> None:
        step = int(record["step"])
        for name, value in scalars(record).items():
            self.writer.add_scalar(name, value, step)

    def close(self) -> None:
        self.writer.close()


class WandbReporter:
    """One W&B run per work dir; WANDB_PROJECT, WANDB_MODE etc. are read by wandb itself."""

    def __init__(self, work_dir: Path, settings: TrainConfig):
        import wandb

        id_file = work_dir / WANDB_RUN_ID_FILE
        run_id = id_file.read_text().strip() if id_file.is_file() else uuid.uuid4().hex[:12]
        id_file.write_text(run_id + "\n")
        self.run = wandb.init(
            id=run_id,
            resume="allow",
            name=work_dir.name,
            dir=str(work_dir),
            config=plain_settings(settings),
        )

    def write(self, record: Mapping[str, Any]) -> None:
        self.run.log(scalars(record), step=int(record["step"]))

    def close(self) -> None:
        self.run.finish()


def plain_settings(settings: TrainConfig) -> dict[str, Any]:
    """Settings as JSON-friendly values (components' targets by name) for W&B's config."""
    import dataclasses

    def plain(value: Any) -> Any:
        if isinstance(value, Mapping):
            return {str(k): plain(v) for k, v in value.items()}
        if isinstance(value, list | tuple):
            return [plain(v) for v in value]
        if callable(value):
            return f"{value.__module__}.{value.__qualname__}"
        return value

    return {f.name: plain(getattr(settings, f.name)) for f in dataclasses.fields(settings)}


class Reporters:
    """Every reporter of the run (main rank only); each record goes to all of them."""

    def __init__(self, reporters: Sequence[Reporter] = ()):
        self.reporters = list(reporters)

    @classmethod
    def build(
        cls,
        settings: TrainConfig,
        work_dir: Path,
        is_main: bool,
        start_step: int = 0,
        source: str = "config",
    ) -> Reporters:
        names = resolve_report_to(settings.report_to, source)  # every rank checks the names
        if not is_main:
            return cls()
        built: list[Reporter] = []
        for name in names:
            if name == "tensorboard":
                built.append(TensorBoardReporter(work_dir, start_step))
                logger.info("TensorBoard: tensorboard --logdir %s", work_dir / TENSORBOARD_FOLDER)
            elif name == "wandb":
                built.append(WandbReporter(work_dir, settings))
        return cls(built)

    def write(self, record: Mapping[str, Any]) -> None:
        for reporter in self.reporters:
            reporter.write(record)

    def close(self) -> None:
        for reporter in self.reporters:
            reporter.close()
        self.reporters = []


# -- the start banner: the data, type by type (XTuner's DatasetInfoHook) ----------------


def dataset_lines(label: str, dataset: Any, tokenizer: Any = None, preview: int = 200) -> list[str]:
    """Lines for the start banner: per type, shards, samples and tokens; the first pack.

    ``dataset`` is a PackedDataset; the first pack is decoded to text (its first
    ``preview`` tokens) when there is a tokenizer.
    """
    corpus = dataset.corpus
    lines = []
    for type_id, name in enumerate(corpus.type_names):
        shards = [s for s in corpus.shards if s.type_id == type_id]
        if not shards:
            continue
        lines.append(
            f"{label} type {name!r}: {len(shards)} shards, "
            f"{sum(s.num_samples for s in shards)} samples, "
            f"{sum(s.num_tokens for s in shards)} tokens, "
            f"{_packs_of_type(dataset, type_id)} packs"
        )
    if tokenizer is not None and len(dataset) > 0:
        ids = [int(t) for t in dataset[0]["input_ids"][:preview]]
        text = tokenizer.decode(ids)
        lines.append(f"{label} first pack, first {len(ids)} tokens: {text!r}")
    return lines


def _packs_of_type(dataset: Any, type_id: int) -> int:
    return sum(plan.num_packs for plan in dataset.plans if plan.shard.type_id == type_id)
