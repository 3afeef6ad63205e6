"""``evotune plot``: training curves of one or more work dirs in one image.

Panels: training loss (raw, faint, and an exponential moving average) with the
validation loss on top, training and validation loss per data type (when the
records hold them), learning rate, gradient norm and tokens/s. Each run keeps one
colour in every panel and the legend names its work dir, so two configs compare
at a glance; in the per-type panels of a single run the colour names the type.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from ..errors import ConfigError
from .records import RunRecords, read_records, run_label

logger = logging.getLogger("evotune")

PALETTE = ["#1f5fa8", "#d1495b", "#2a9d5c", "#e8a33d", "#7b4fa8", "#3b9dbb", "#8c564b"]
TYPE_STYLES = ["-", "--", ":", "-.", (0, (5, 1)), (0, (3, 1, 1, 1, 1, 1)), (0, (1, 3))]
X_AXES = ("step", "tokens")

# panel -> (title, y label, log scale when the values span more than a factor 4)
PANELS = {
    "loss": ("loss (faint: per step; solid: EMA over {span})", "loss (nats/token)", True),
    "loss_by_type": ("training loss per data type (EMA over {span})", "loss (nats/token)", True),
    "val_loss_by_type": ("validation loss per data type", "loss (nats/token)", True),
    "lr": ("learning rate", "learning rate", False),
    "grad_norm": ("gradient norm before clipping (EMA, faint: per step)", "grad norm", True),
    "tokens_per_s": ("throughput, all ranks (EMA, faint: per step)", "tokens/s", False),
}
Mapper = Callable[[list[int]], list[int]]


def ema(values: Sequence[float], span: int) -> list[float]:
    """Debiased exponential moving average over ``span`` points (span 1 = the values)."""
    if span <= 1:
        return list(values)
    decay = 1.0 - 2.0 / (span + 1)
    smoothed, average, weight = [], 0.0, 0.0
    for value in values:
        average = decay * average + (1.0 - decay) * value
        weight = decay * weight + (1.0 - decay)
        smoothed.append(average / weight)
    return smoothed


def auto_span(points: int) -> int:
    """About 1/25 of the run, within 1..200 steps: smooth enough to read, short enough to react."""
    return max(1, min(200, round(points / 25)))


def plot_runs(
    work_dirs: Sequence[Path],
    output: Path,
    smooth: int | None = None,
    x_axis: str = "step",
) -> list[RunRecords]:
    """Draw the curves of ``work_dirs`` into ``output`` (PNG, PDF or SVG by its suffix)."""
    if x_axis not in X_AXES:
        raise ConfigError(f"--x {x_axis}: choose one of {', '.join(X_AXES)}")
    if smooth is not None and smooth < 1:
        raise ConfigError(f"--smooth {smooth}: give a span of at least 1 step")
    plt = _pyplot()
    runs = _runs_with_steps([read_records(Path(w)) for w in work_dirs])
    labels = [run_label(run.work_dir, [r.work_dir for r in runs]) for run in runs]
    spans = [smooth or auto_span(len(run.train)) for run in runs]
    typed = {
        "loss_by_type": _type_names(runs, "loss_by_type", "train"),
        "val_loss_by_type": _type_names(runs, "val_loss_by_type", "eval"),
    }
    names = ["loss", *(key for key, found in typed.items() if found)]
    names += ["lr", "grad_norm", "tokens_per_s"]
    columns = 2 if len(names) <= 4 else 3
    rows = math.ceil(len(names) / columns)
    figure, grid = plt.subplots(rows, columns, figsize=(6.4 * columns, 4.2 * rows), squeeze=False)
    axes = dict(zip(names, grid.flat, strict=False))
    for spare in list(grid.flat)[len(names) :]:
        spare.set_visible(False)

    for index, (run, label, span) in enumerate(zip(runs, labels, spans, strict=True)):
        colour = PALETTE[index % len(PALETTE)]
        to_x = _x_mapper(run, x_axis)
        _loss_panel(axes["loss"], run, label, colour, span, to_x)
        for key, type_names in typed.items():
            if key in axes:
                _typed_panel(axes[key], run, key, type_names, colour, span, to_x, len(runs))
        _line(axes["lr"], run, "lr", label, colour, to_x, span=1, faint=False)
        _line(axes["grad_norm"], run, "grad_norm", label, colour, to_x, span=span)
        _line(axes["tokens_per_s"], run, "tokens_per_s", label, colour, to_x, span=span)

    span_text = "/".join(str(s) for s in sorted(set(spans))) + " steps"
    for name, axis in axes.items():
        title, y_label, log_when_wide = PANELS[name]
        axis.set_title(title.format(span=span_text), fontsize=10)
        axis.set_xlabel("optimizer step" if x_axis == "step" else "tokens trained")
        axis.set_ylabel(y_label)
        axis.grid(True, alpha=0.3)
        if log_when_wide:
            _log_scale_if_wide(axis)
        if name == "lr":
            axis.ticklabel_format(axis="y", style="sci", scilimits=(-2, 3))
        if name in typed:
            axis.legend(handles=_typed_legend(typed[name], labels), fontsize=8, loc="best")
        elif axis.get_legend_handles_labels()[0]:
            axis.legend(fontsize=8, loc="best")
    figure.suptitle(
        "; ".join(_run_note(run, label) for run, label in zip(runs, labels, strict=True))
    )
    figure.tight_layout()
    output.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(output, dpi=110)
    plt.close(figure)
    return runs


def _pyplot() -> Any:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise ConfigError("evotune plot needs matplotlib: pip install 'evotune[plot]'") from None
    return plt


def _runs_with_steps(runs: list[RunRecords]) -> list[RunRecords]:
    """Runs that finished a step; a run that just started is left out with a warning."""
    waiting = [run.work_dir for run in runs if not run.train]
    if len(waiting) == len(runs):
        folders = ", ".join(str(w) for w in waiting)
        raise ConfigError(f"{folders}: no step finished yet; plot again later")
    for work_dir in waiting:
        logger.warning("%s: no step finished yet; left out of the plot", work_dir)
    return [run for run in runs if run.train]


def _x_mapper(run: RunRecords, x_axis: str) -> Mapper:
    if x_axis == "step":
        return lambda steps: steps
    cumulative, total = {}, 0
    for row in run.train:
        total += row.get("tokens") or 0
        cumulative[row["step"]] = total

    def to_tokens(steps: list[int]) -> list[int]:
        # an eval record sits at the step it followed; a step without a record keeps the total
        return [cumulative.get(step, total) for step in steps]

    return to_tokens


def _loss_panel(
    axis: Any, run: RunRecords, label: str, colour: str, span: int, to_x: Mapper
) -> None:
    _line(axis, run, "loss", f"{label} train", colour, to_x, span=span)
    steps, losses = run.series("val_loss", "eval")
    if steps:
        axis.plot(
            to_x(steps),
            losses,
            color=colour,
            linestyle="--",
            marker="o",
            markersize=4,
            linewidth=1.2,
            label=f"{label} validation",
        )


def _line(
    axis: Any,
    run: RunRecords,
    key: str,
    label: str,
    colour: str,
    to_x: Mapper,
    span: int,
    faint: bool = True,
) -> None:
    steps, values = run.series(key)
    if not steps:
        return
    if faint:
        axis.plot(to_x(steps), values, color=colour, alpha=0.22, linewidth=0.7)
    axis.plot(to_x(steps), ema(values, span), color=colour, linewidth=1.6, label=label)


def _type_names(runs: list[RunRecords], key: str, records: str) -> list[str]:
    names: dict[str, None] = {}
    for run in runs:
        names.update(dict.fromkeys(run.type_names(key, records)))
    return list(names)


def _type_look(index: int, run_colour: str, runs: int) -> dict[str, Any]:
    """One run: a colour per type. Several: the run's colour and a line style per type."""
    if runs == 1:
        return {"color": PALETTE[index % len(PALETTE)], "linestyle": "-"}
    return {"color": run_colour, "linestyle": TYPE_STYLES[index % len(TYPE_STYLES)]}


def _typed_panel(
    axis: Any,
    run: RunRecords,
    key: str,
    names: list[str],
    colour: str,
    span: int,
    to_x: Mapper,
    runs: int,
) -> None:
    records = "eval" if key.startswith("val_") else "train"
    for index, name in enumerate(names):  # the index over all runs' names keeps looks aligned
        steps, values = run.typed_series(key, name, records)
        if not steps:
            continue
        look = _type_look(index, colour, runs)
        if records == "train":
            axis.plot(to_x(steps), ema(values, span), linewidth=1.5, **look)
        else:
            axis.plot(to_x(steps), values, marker="o", markersize=4, linewidth=1.2, **look)


def _typed_legend(names: list[str], labels: list[str]) -> list[Any]:
    from matplotlib.lines import Line2D

    runs = len(labels)
    handles = [
        Line2D([], [], label=name, **_type_look(index, "0.3", runs))
        for index, name in enumerate(names)
    ]
    if runs > 1:
        handles += [
            Line2D([], [], color=PALETTE[index % len(PALETTE)], linewidth=3, label=label)
            for index, label in enumerate(labels)
        ]
    return handles


def _log_scale_if_wide(axis: Any) -> None:
    """Log scale when the curves span more than a factor 4: early and late both stay readable."""
    from matplotlib.ticker import FuncFormatter

    values = [v for line in axis.get_lines() for v in line.get_ydata() if v > 0]
    if not values or max(values) / min(values) <= 4:
        return
    axis.set_yscale("log")
    decades = math.log10(max(values) / min(values))
    # plain numbers (2, 3, 4, not 2x10^0); fewer labelled in-between ticks as the range grows
    labelled = {2, 3, 4, 6} if decades < 1.5 else {2, 5} if decades < 3 else set()

    def minor(value: float, _: Any) -> str:
        mantissa = round(value / 10 ** math.floor(math.log10(value)), 6)
        return f"{value:g}" if mantissa in labelled else ""

    axis.yaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}"))
    axis.yaxis.set_minor_formatter(FuncFormatter(minor))


def _run_note(run: RunRecords, label: str) -> str:
    note = f"{label}: {run.train[-1]['step']} steps"
    if run.segments > 1:
        note += f", resumed {run.segments - 1}x"
    return note
