"""The run's plots, `loss.png`, `expert_load.png` and `domain_routing.png`, from plain numpy arrays.

`RunMonitor` (train/monitor.py) hands a `PlotJob` to `render_plots` in a separate process, because a
refresh costs about as much CPU time as a training step. So this module imports only numpy and
matplotlib, never torch, and a job is arrays that pickle in a memcpy. Matplotlib is imported inside the
functions: importing this module costs nothing until a plot is drawn. `loss_figure` and
`expert_load_figure` build the figures (the tests look at their artists), `plot_*` save them.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D

LOSS_PLOT = "loss.png"
EXPERT_LOAD_PLOT = "expert_load.png"
DOMAIN_ROUTING_PLOT = "domain_routing.png"
MAX_PLOT_POINTS = 2000  # per curve; plotting 100k raw points takes seconds and shows nothing more
EXPERT_LOAD_MIN_WIDTH = 6.0  # inches: the heatmap's two-line title, beside its colorbar, fits in this
MAX_ROW_LABELS = 48  # y tick labels of the heatmap; on 10 inches more would overlap

# A series is an (n, 2) array of (step, value) rows (or anything np.asarray turns into one)
Series = Mapping[str, Any]


@dataclass(frozen=True)
class DomainRouting:
    """One evaluation's routing per held-out domain (train/evaluate.py): counts_dle[d, l, e] = (token,
    slot) pairs of domain d's tokens that MoE layer l (main stack, then MTP depths) sent to expert e."""

    step: int
    domains: tuple[str, ...]
    tokens_d: tuple[int, ...]  # the held-out tokens read of each domain
    counts_dle: np.ndarray  # int64 [D, L, E]
    rows: tuple[str, ...] = ()  # layer labels, as expert_load.png's (the monitor adds them)


@dataclass(frozen=True)
class PlotJob:
    """One refresh: everything the plots show, as of the step `step`."""

    run_dir: str
    step: int  # the last step logged when the job was made
    series: dict[str, np.ndarray]  # metric -> (n, 2) float64 rows of (step, value)
    expert_counts: np.ndarray | None = None  # layers x experts, routed tokens summed over expert_steps
    expert_steps: tuple[int, int] = (0, 0)  # first and last step of those counts
    expert_rows: tuple[str, ...] = ()  # row labels: MoE layer numbers, then "MTP 1", ...; () = 0, 1, ...
    domain_routing: DomainRouting | None = None  # a new evaluation by domain to draw


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
            path = run_dir / EXPERT_LOAD_PLOT
            plot_expert_load(job.expert_counts, *job.expert_steps, path, job.expert_rows)
        except Exception as e:
            failures["expert-load plot"] = f"{type(e).__name__}: {e}"
    if job.domain_routing is not None:
        try:
            save_figure_atomically(domain_routing_figure(job.domain_routing), run_dir / DOMAIN_ROUTING_PLOT)
        except Exception as e:
            failures["domain-routing plot"] = f"{type(e).__name__}: {e}"
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
    """`loss_figure`, saved as `path`."""
    save_figure_atomically(loss_figure(series), path)


def loss_figure(series: Series) -> Figure:
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
    for key, marker in (("eval_lm_loss", "o"), ("eval_mtp_loss", "s")):  # held-out, at evaluation steps
        steps, values = finite_series(series, key)
        if len(steps):
            top.plot(steps, values, marker + ":", label=key, markersize=4, linewidth=1)
    top.set_ylabel("loss")
    top.set_title("training loss")
    if top.get_legend_handles_labels()[0]:
        top.legend(loc="upper right", fontsize="small")
    aux_handles = plot_aux_losses(middle, series)
    if aux_handles:
        middle.legend(handles=aux_handles, loc="upper right", fontsize="small")
    steps, values = finite_series(series, "lr")
    bottom.plot(steps, values, color="tab:gray", linewidth=1)
    bottom.set_ylabel("lr")
    bottom.set_xlabel("step")
    bottom.ticklabel_format(axis="y", style="sci", scilimits=(-2, 2))
    for ax in (top, middle, bottom):
        ax.grid(alpha=0.3)
    return fig


def plot_aux_losses(ax: Axes, series: Series) -> list[Line2D]:
    """lb_loss, and z_loss on its own axis at the right when it has a nonzero point: the router z is
    tens where lb_loss is about 1, so on one scale lb_loss would be a flat line. Returns the lines."""
    lines = []
    steps, values = finite_series(series, "lb_loss")
    if len(steps):
        lines += ax.plot(steps, values, label="lb_loss", linewidth=1)
    ax.set_ylabel("lb loss")
    steps, values = finite_series(series, "z_loss")
    if len(steps) and values.any():  # all zeros: a dense model (the monitor leaves out an unused z_loss)
        right = ax.twinx()
        lines += right.plot(steps, values, color="tab:orange", label="z_loss (right axis)", linewidth=1)
        right.set_ylabel("z loss")
    return lines


def plot_expert_load(
    counts: np.ndarray, first_step: int, last_step: int, path: Path, row_labels: Sequence[str] = ()
) -> None:
    """`expert_load_figure`, saved as `path`."""
    save_figure_atomically(expert_load_figure(counts, first_step, last_step, row_labels), path)


def expert_load_figure(
    counts: np.ndarray, first_step: int, last_step: int, row_labels: Sequence[str] = ()
) -> Figure:
    """Heatmap of count / layer mean (rows = MoE layers, then MTP depths; columns = experts), white =
    uniform load. `row_labels` name the rows (default 0, 1, ...)."""
    from matplotlib.colors import TwoSlopeNorm
    from matplotlib.figure import Figure

    load = relative_expert_load(counts)
    layers, experts = load.shape
    labels = list(row_labels) if len(row_labels) == layers else [str(row) for row in range(layers)]
    row_max = load.max(axis=1)
    worst = int(row_max.argmax())
    width = min(max(4 + experts * 0.1, EXPERT_LOAD_MIN_WIDTH), 16)
    fig = Figure(figsize=(width, min(2.5 + layers * 0.25, 10)), layout="constrained")
    ax = fig.subplots()
    # Diverging around 1: over-loaded experts red, starved ones blue
    norm = TwoSlopeNorm(vmin=0.0, vcenter=1.0, vmax=max(2.0, float(load.max())))
    image = ax.imshow(load, aspect="auto", cmap="RdBu_r", norm=norm, interpolation="nearest")
    fig.colorbar(image, ax=ax, label="tokens / layer mean")
    ax.set_xlabel("expert")
    ax.set_ylabel("layer")
    label_rows(ax, labels)
    steps = f"step {last_step}" if first_step == last_step else f"steps {first_step}-{last_step}"
    ax.set_title(
        f"expert load, {steps}\nmax/mean {row_max.mean():.2f} (mean over layers), "
        f"worst {row_max[worst]:.2f} ({row_name(labels[worst])})",
        fontsize="medium",
    )
    return fig


def domain_shares(counts_dle: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """[D, L, E] each domain's share of a layer's (token, slot) pairs per expert, and [L, E] the same
    over all domains together (the pool)."""
    counts = np.asarray(counts_dle, dtype=np.float64)
    share = counts / np.maximum(counts.sum(axis=-1, keepdims=True), 1.0)
    pooled = counts.sum(axis=0)
    return share, pooled / np.maximum(pooled.sum(axis=-1, keepdims=True), 1.0)


def domain_load_ratios(counts_dle: np.ndarray) -> np.ndarray:
    """[D, L, E]: each domain's share of a layer's (token, slot) pairs per expert over the pooled share;
    1 where the domain uses an expert as all domains together do (and where the pool never uses it)."""
    share, pooled_share = domain_shares(counts_dle)
    return np.divide(share, pooled_share, out=np.ones_like(share), where=pooled_share > 0)


def routing_kl(counts_dle: np.ndarray) -> np.ndarray:
    """KL(p_dl || p_l) [D, L] in nats: each domain's expert distribution per layer against the pooled
    one. The evaluation's specialisation score (eval_routing_kl) and the plot's panel titles."""
    share, pooled_share = domain_shares(counts_dle)
    # terms with share 0 contribute 0; where share > 0, the pool's is > 0 too (it contains the domain)
    ratio = np.divide(share, pooled_share, out=np.ones_like(share), where=share > 0)
    return (share * np.log(ratio)).sum(axis=-1)


def domain_routing_figure(routing: DomainRouting) -> Figure:
    """One panel per domain (rows = MoE layers, then MTP; columns = experts): the domain's share of
    each expert over all domains' share, on a log scale, white = routed like the pool, red = the
    domain's expert, blue = one it avoids; each panel's title gives its mean KL to the pool."""
    from matplotlib.colors import LogNorm
    from matplotlib.figure import Figure

    ratios = domain_load_ratios(routing.counts_dle)
    domains, layers, experts = ratios.shape
    kl_dl = routing_kl(routing.counts_dle)
    labels = list(routing.rows) if len(routing.rows) == layers else [str(row) for row in range(layers)]
    width = min(max(4 + experts * 0.08, EXPERT_LOAD_MIN_WIDTH), 16)
    panel_height = min(1.0 + layers * 0.2, 6)
    fig = Figure(figsize=(width, 1.0 + domains * panel_height), layout="constrained")
    axes = np.atleast_1d(fig.subplots(domains, 1, sharex=True))
    norm = LogNorm(vmin=0.125, vmax=8.0)
    image = None
    for ax, name, ratio, kl_l in zip(axes, routing.domains, ratios, kl_dl, strict=True):
        clipped = np.clip(ratio, 0.125, 8.0)
        image = ax.imshow(clipped, aspect="auto", cmap="RdBu_r", norm=norm, interpolation="nearest")
        ax.set_title(f"{name}: KL to all domains {kl_l.mean():.3f} nats (layer mean)", fontsize="medium")
        ax.set_ylabel("layer")
        label_rows(ax, labels)
    axes[-1].set_xlabel("expert")
    ticks = [0.125, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0]
    bar = fig.colorbar(image, ax=list(axes), label="domain share / all domains' share")
    bar.set_ticks(ticks, labels=["1/8", "1/4", "1/2", "1", "2", "4", "8"])
    bar.minorticks_off()
    fig.suptitle(f"expert routing by domain, held-out data at step {routing.step}", fontsize="medium")
    return fig


def label_rows(ax: Axes, labels: Sequence[str]) -> None:
    """A y tick for every row, or for every k-th one where there are more than MAX_ROW_LABELS; the MTP
    rows (last) always get theirs, without a main-stack label crowding the first of them."""
    mtp_rows = [row for row, label in enumerate(labels) if label.startswith("MTP")]
    main = len(labels) - len(mtp_rows)
    stride = math.ceil(len(labels) / MAX_ROW_LABELS)
    rows = [*range(0, main - stride + 1, stride), *mtp_rows]
    ax.set_yticks(rows, [labels[row] for row in rows], fontsize="small")


def row_name(label: str) -> str:
    """'layer 3' for a main-stack row, 'MTP 1' as it is."""
    return f"layer {label}" if label.isdigit() else label


def expert_row_labels(model: Mapping[str, Any], rows: int) -> tuple[str, ...]:
    """The expert-load rows' labels for a model config (as a dict): each MoE layer of the main stack by
    its layer number, then one row per MTP depth, "MTP 1", ... (the order of the model's router
    logits). Where the config does not account for the rows, they are numbered 0, 1, ..."""
    mtp = int(model.get("mtp_num_layers") or 0)
    if not 0 <= mtp <= rows:
        mtp = 0
    layers = moe_layers(model)
    if len(layers) != rows - mtp:
        layers = list(range(rows - mtp))
    return (*map(str, layers), *(f"MTP {depth}" for depth in range(1, mtp + 1)))


def moe_layers(model: Mapping[str, Any]) -> list[int]:
    """The main stack's MoE layers, as model.config.ModelConfig.is_moe_layer picks them; restated here
    because importing the model package would bring torch into the plot worker."""
    if not model.get("num_experts"):
        return []
    step = int(model.get("decoder_sparse_step") or 1)
    dense = set(model.get("mlp_only_layers") or ())
    layers = range(int(model.get("num_hidden_layers") or 0))
    return [layer for layer in layers if layer not in dense and (layer + 1) % step == 0]
