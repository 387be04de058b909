"""The run's plots, `loss.png` and `expert_load.png`, from plain numpy arrays.

`RunMonitor` (train/monitor.py) hands a `PlotJob` to `render_plots` in a separate process, because a
refresh costs about as much CPU time as a training step. So this module imports only numpy and
matplotlib, never torch, and a job is arrays that pickle in a memcpy. Matplotlib is imported inside the
functions: importing this module costs nothing until a plot is drawn.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from matplotlib.figure import Figure

LOSS_PLOT = "loss.png"
EXPERT_LOAD_PLOT = "expert_load.png"
MAX_PLOT_POINTS = 2000  # per curve; plotting 100k raw points takes seconds and shows nothing more

# A series is an (n, 2) array of (step, value) rows (or anything np.asarray turns into one)
Series = Mapping[str, Any]


@dataclass(frozen=True)
class PlotJob:
    """One refresh: everything the plots show, as of the step `step`."""

    run_dir: str
    step: int  # the last step logged when the job was made
    series: dict[str, np.ndarray]  # metric -> (n, 2) float64 rows of (step, value)
    expert_counts: np.ndarray | None = None  # layers x experts, routed tokens summed over expert_steps
    expert_steps: tuple[int, int] = (0, 0)  # first and last step of those counts


def render_plots(job: PlotJob) -> dict[str, str]:
    """Draw the job's plots. One failing doesn't stop the other; returns {plot: error text} for
    the failed ones (text, not exceptions: it crosses back from the worker process, and not every
    exception unpickles)."""
    run_dir = Path(job.run_dir)
    failures: dict[str, str] = {}
    if len(job.series.get("loss", ())):
        try:
            plot_losses(job.series, run_dir / LOSS_PLOT)
        except Exception as e:
            failures["loss plot"] = f"{type(e).__name__}: {e}"
    if job.expert_counts is not None:
        try:
            plot_expert_load(job.expert_counts, *job.expert_steps, run_dir / EXPERT_LOAD_PLOT)
        except Exception as e:
            failures["expert-load plot"] = f"{type(e).__name__}: {e}"
    return failures


def relative_expert_load(counts: np.ndarray) -> np.ndarray:
    """count / mean count of its layer (1 = uniform); a layer that routed nothing is all 0."""
    counts = np.asarray(counts, dtype=np.float64)
    mean = counts.mean(axis=1, keepdims=True)
    return np.divide(counts, mean, out=np.zeros_like(counts), where=mean > 0)


def save_figure_atomically(fig: Figure, path: Path) -> None:
    """Render to a temp file in the same directory, then rename, so a viewer never sees half a PNG.
    The temp name holds the process id: a worker left running past close() and the training
    process's own fallback render never write the same temp file."""
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp.png")
    try:
        # light compression: the default zlib level is most of the time spent on a refresh
        fig.savefig(tmp, format="png", dpi=100, pil_kwargs={"compress_level": 1})
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def finite_series(
    series: Series, key: str, max_points: int = MAX_PLOT_POINTS
) -> tuple[np.ndarray, np.ndarray]:
    """The finite points of a series; a long one as bucket means, so a refresh stays cheap on a long run."""
    points = np.asarray(series.get(key, ()), dtype=np.float64).reshape(-1, 2)
    points = points[np.isfinite(points[:, 1])]
    if len(points) > max_points:
        points = np.stack([chunk.mean(axis=0) for chunk in np.array_split(points, max_points)])
    return points[:, 0], points[:, 1]


def plot_losses(series: Series, path: Path) -> None:
    """Losses on top, the auxiliary losses (load balance, z) in the middle, the LR below; NaN
    points skipped (a line through them would vanish)."""
    # Figure without pyplot: Agg rendering, no global figure registry to leak, no backend switch
    from matplotlib.figure import Figure

    fig = Figure(figsize=(10, 8), layout="constrained")
    top, middle, bottom = fig.subplots(3, 1, sharex=True, gridspec_kw={"height_ratios": [3, 1.5, 1]})
    for key, style in (("loss", "-"), ("lm_loss", "-"), ("mtp_loss", "--")):
        steps, values = finite_series(series, key)
        if len(steps):
            top.plot(steps, values, style, label=key, linewidth=1)
    top.set_ylabel("loss")
    top.set_title("training loss")
    for key in ("lb_loss", "z_loss"):
        steps, values = finite_series(series, key)
        if len(steps) and values.any():  # z_loss is all zeros when its coefficient is 0
            middle.plot(steps, values, label=key, linewidth=1)
    middle.set_ylabel("aux loss")
    steps, values = finite_series(series, "lr")
    bottom.plot(steps, values, color="tab:gray", linewidth=1)
    bottom.set_ylabel("lr")
    bottom.set_xlabel("step")
    bottom.ticklabel_format(axis="y", style="sci", scilimits=(-2, 2))
    for ax in (top, middle):
        if ax.get_legend_handles_labels()[0]:
            ax.legend(loc="upper right", fontsize="small")
    for ax in (top, middle, bottom):
        ax.grid(alpha=0.3)
    save_figure_atomically(fig, path)


def plot_expert_load(counts: np.ndarray, first_step: int, last_step: int, path: Path) -> None:
    """Heatmap of count / layer mean (rows = layers, columns = experts), white = uniform load."""
    from matplotlib.colors import TwoSlopeNorm
    from matplotlib.figure import Figure

    load = relative_expert_load(counts)
    layers, experts = load.shape
    row_max = load.max(axis=1)
    worst = int(row_max.argmax())
    fig = Figure(figsize=(min(4 + experts * 0.1, 16), min(2.5 + layers * 0.25, 10)), layout="constrained")
    ax = fig.subplots()
    # Diverging around 1: over-loaded experts red, starved ones blue
    norm = TwoSlopeNorm(vmin=0.0, vcenter=1.0, vmax=max(2.0, float(load.max())))
    image = ax.imshow(load, aspect="auto", cmap="RdBu_r", norm=norm, interpolation="nearest")
    fig.colorbar(image, ax=ax, label="tokens / layer mean")
    ax.set_xlabel("expert")
    ax.set_ylabel("layer")
    steps = f"step {last_step}" if first_step == last_step else f"steps {first_step}-{last_step}"
    ax.set_title(
        f"expert load, {steps}: max/mean {row_max.mean():.2f} (mean over layers), "
        f"worst {row_max[worst]:.2f} (layer {worst})",
        fontsize="medium",
    )
    save_figure_atomically(fig, path)
