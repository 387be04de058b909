"""What the user sees of a training run: the console, `train.log`, `metrics.jsonl`, the loss and
expert-load plots and Weights & Biases, all under the run directory.

Only the main rank does anything; on every other rank `RunMonitor` is a no-op (no files, no W&B, no
printing), so the trainer can call it unconditionally.

`metrics.jsonl` holds one JSON object per optimizer step, flushed line by line. JSON has no NaN or
infinity, so non-finite floats are written as the strings "nan", "inf" and "-inf": every numeric
field reads back with `float(value)` and a NaN step stays distinguishable from an overflow.
`read_metrics` does that conversion.

On resume from step N the lines with step > N (logged after that checkpoint) are dropped, so the file
holds each step once; a fresh start (N = 0) moves an old file aside to `metrics.jsonl.old`.

`elapsed_s`, when the trainer gives it, is seconds since some fixed start (cumulative); the ETA uses
its differences over the recent steps, otherwise the wall-clock time between calls.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import secrets
import string
import time
from collections import deque
from collections.abc import Mapping
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from data.shards import write_atomically

if TYPE_CHECKING:
    import torch
    from matplotlib.figure import Figure

METRICS_FILE = "metrics.jsonl"
LOG_FILE = "train.log"
WANDB_ID_FILE = "wandb_id.txt"
LOSS_PLOT = "loss.png"
EXPERT_LOAD_PLOT = "expert_load.png"
WANDB_MODES = ("auto", "offline", "online", "disabled")
ETA_WINDOW = 20  # steps whose mean duration predicts the rest: recent enough to forget compile time
MAX_PLOT_POINTS = 2000  # per curve; plotting 100k raw points takes seconds and shows nothing more
PLOTTED = ("loss", "lm_loss", "mtp_loss", "lb_loss", "z_loss", "lr")


# ---------------------------------------------------------------------------------------------
# metrics.jsonl


def json_safe(value: Any) -> Any:
    """A value json.dumps accepts with allow_nan=False: tensor/numpy scalars as Python numbers,
    non-finite floats as "nan" / "inf" / "-inf"."""
    if hasattr(value, "item"):  # torch or numpy scalar
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")
    return value


def metrics_line(metrics: dict[str, Any]) -> str:
    return json.dumps({k: json_safe(v) for k, v in metrics.items()}, allow_nan=False, default=str)


def parse_metrics_line(line: str) -> dict[str, Any] | None:
    """The record of one line with "nan"/"inf"/"-inf" back as floats; None for a broken line (one cut
    short by a crash) or one without a step."""
    try:
        record = json.loads(line)
    except json.JSONDecodeError:
        return None
    if not isinstance(record, dict) or not isinstance(record.get("step"), int):
        return None
    return {k: float(v) if v in ("nan", "inf", "-inf") else v for k, v in record.items()}


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """All well-formed records of a metrics.jsonl, in file order."""
    with open(path) as f:
        return [r for r in map(parse_metrics_line, f) if r is not None]


def truncate_metrics(path: Path, last_step: int) -> tuple[list[dict[str, Any]], int]:
    """Keep the records with step <= last_step (rewriting the file atomically if anything goes);
    returns them and how many lines were dropped."""
    with open(path) as f:
        lines = f.read().splitlines()
    kept_lines, kept = [], []
    for line in lines:
        record = parse_metrics_line(line)
        if record is not None and record["step"] <= last_step:
            kept_lines.append(line)
            kept.append(record)
    dropped = len(lines) - len(kept_lines)
    if dropped:
        write_atomically(path, "".join(line + "\n" for line in kept_lines).encode())
    return kept, dropped


# ---------------------------------------------------------------------------------------------
# Console formatting


def format_count(x: float) -> str:
    """12345 -> '12.3k', 4.2e6 -> '4.20M'."""
    if not math.isfinite(x):
        return str(x)
    for scale, suffix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(x) >= scale:
            v = x / scale
            return f"{v:.3g}{suffix}" if v < 100 else f"{v:.0f}{suffix}"
    return f"{x:.0f}"


def format_duration(seconds: float | None) -> str:
    """'42s', '3m12s', '2h05m', '3d04h'; '--' when unknown."""
    if seconds is None or not math.isfinite(seconds) or seconds < 0:
        return "--"
    s = round(seconds)
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 86400}d{s % 86400 // 3600:02d}h"


def format_number(x: float, spec: str) -> str:
    return format(x, spec) if math.isfinite(x) else str(x)


def console_line(metrics: dict[str, Any], total_steps: int, eta_s: float | None, moe: bool) -> str:
    def num(key: str) -> float:  # a missing value shows as nan rather than stopping the run
        value = metrics.get(key, math.nan)
        return float(value.item() if hasattr(value, "item") else value)

    width = len(str(total_steps))
    loss, lm, mtp, lb = (format_number(num(k), ".4f") for k in ("loss", "lm_loss", "mtp_loss", "lb_loss"))
    gnorm, tflops = num("grad_norm"), num("tflops_per_gpu")
    parts = [
        f"step {int(num('step')):>{width}}/{total_steps}",
        f"loss {loss} (lm {lm} mtp {mtp} lb {lb})",
        f"lr {format_number(num('lr'), '.2e')}",
        f"gnorm {format_number(gnorm, '.2f' if 0.01 <= gnorm < 1000 else '.2e')}",
        f"{format_count(num('tokens_per_s'))} tok/s",
        f"{format_number(tflops, '.1f' if tflops >= 10 else '.2f')} TFLOP/s/gpu",
    ]
    if moe:
        parts.append(f"load {format_number(num('expert_load_max_over_mean'), '.2f')}")
    parts.append(f"eta {format_duration(eta_s)}")
    if metrics.get("bad_step"):
        parts.append("BAD STEP (skipped)")
    return " | ".join(parts)


class StepClock:
    """Mean duration of the recent steps, from elapsed_s when given, else wall-clock between calls."""

    def __init__(self, window: int = ETA_WINDOW):
        self.points: deque[tuple[int, float]] = deque(maxlen=window + 1)
        self.uses_elapsed: bool | None = None

    def tick(self, step: int, elapsed_s: float | None) -> None:
        uses_elapsed = elapsed_s is not None and math.isfinite(elapsed_s)
        if uses_elapsed != self.uses_elapsed:  # the two clocks don't mix
            self.points.clear()
            self.uses_elapsed = uses_elapsed
        self.points.append((step, float(elapsed_s) if uses_elapsed else time.monotonic()))

    def seconds_per_step(self) -> float | None:
        if len(self.points) < 2:
            return None
        (s0, t0), (s1, t1) = self.points[0], self.points[-1]
        return (t1 - t0) / (s1 - s0) if s1 > s0 and t1 >= t0 else None

    def eta(self, step: int, total_steps: int) -> float | None:
        per_step = self.seconds_per_step()
        return None if per_step is None else per_step * max(total_steps - step, 0)


# ---------------------------------------------------------------------------------------------
# Plots


def as_float_array(counts: torch.Tensor | np.ndarray) -> np.ndarray:
    if hasattr(counts, "detach"):
        counts = counts.detach().cpu().numpy()
    return np.asarray(counts, dtype=np.float64)


def relative_expert_load(counts: np.ndarray) -> np.ndarray:
    """count / mean count of its layer (1 = uniform); a layer that routed nothing is all 0."""
    counts = np.asarray(counts, dtype=np.float64)
    mean = counts.mean(axis=1, keepdims=True)
    return np.divide(counts, mean, out=np.zeros_like(counts), where=mean > 0)


def save_figure_atomically(fig: Figure, path: Path) -> None:
    """Render to a temp file in the same directory, then rename, so a viewer never sees half a PNG."""
    tmp = path.with_name(f".{path.stem}.tmp.png")
    try:
        # light compression: the default zlib level is most of the time spent on a refresh
        fig.savefig(tmp, format="png", dpi=100, pil_kwargs={"compress_level": 1})
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def finite_series(
    history: dict[str, list[tuple[int, float]]], key: str, max_points: int = MAX_PLOT_POINTS
) -> tuple[np.ndarray, np.ndarray]:
    """The finite points of a series; a long one as bucket means, so a refresh stays cheap on a long run."""
    points = np.array(history.get(key, []), dtype=np.float64).reshape(-1, 2)
    points = points[np.isfinite(points[:, 1])]
    if len(points) > max_points:
        points = np.stack([chunk.mean(axis=0) for chunk in np.array_split(points, max_points)])
    return points[:, 0], points[:, 1]


def plot_losses(history: dict[str, list[tuple[int, float]]], path: Path) -> None:
    """Losses on top, the auxiliary losses (load balance, z) in the middle, the LR below; NaN
    points skipped (a line through them would vanish)."""
    # Figure without pyplot: Agg rendering, no global figure registry to leak, no backend switch
    from matplotlib.figure import Figure

    fig = Figure(figsize=(10, 8), layout="constrained")
    top, middle, bottom = fig.subplots(3, 1, sharex=True, gridspec_kw={"height_ratios": [3, 1.5, 1]})
    for key, style in (("loss", "-"), ("lm_loss", "-"), ("mtp_loss", "--")):
        steps, values = finite_series(history, key)
        if len(steps):
            top.plot(steps, values, style, label=key, linewidth=1)
    top.set_ylabel("loss")
    top.set_title("training loss")
    for key in ("lb_loss", "z_loss"):
        steps, values = finite_series(history, key)
        if len(steps) and values.any():  # z_loss is all zeros when its coefficient is 0
            middle.plot(steps, values, label=key, linewidth=1)
    middle.set_ylabel("aux loss")
    steps, values = finite_series(history, "lr")
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


# ---------------------------------------------------------------------------------------------
# Weights & Biases


def resolve_wandb_mode(mode: str, environ: Mapping[str, str] = os.environ) -> str:
    """'auto' is online when an API key is in the environment, else offline (sync later)."""
    if mode not in WANDB_MODES:
        raise ValueError(f"wandb mode must be one of {WANDB_MODES}, got {mode!r}")
    if mode == "auto":
        return "online" if environ.get("WANDB_API_KEY") else "offline"
    return mode


def new_wandb_id() -> str:
    alphabet = string.ascii_lowercase + string.digits  # the characters W&B's own ids use
    return "".join(secrets.choice(alphabet) for _ in range(8))


def wandb_scalars(metrics: dict[str, Any]) -> dict[str, float | int]:
    """The numeric metrics, step excluded (it goes as wandb.log's step)."""
    out = {}
    for key, value in metrics.items():
        value = value.item() if hasattr(value, "item") else value
        if key != "step" and isinstance(value, int | float):
            out[key] = int(value) if isinstance(value, bool) else value
    return out


# ---------------------------------------------------------------------------------------------


class RunMonitor:
    """Console, train.log, metrics.jsonl, plots and W&B of one run; a no-op off the main rank."""

    def __init__(
        self,
        run_dir: str | Path,
        *,
        is_main: bool,
        total_steps: int,
        wandb_mode: str,
        wandb_project: str,
        wandb_entity: str | None,
        wandb_name: str | None,
        config: dict,
        plot_every: int = 10,
        log_every: int = 1,
        resume_step: int = 0,
    ):
        self.active = is_main
        self.closed = False
        if not self.active:
            return
        self.run_dir = Path(run_dir)
        self.total_steps = total_steps
        self.plot_every = plot_every
        self.log_every = max(log_every, 1)
        self.history: dict[str, list[tuple[int, float]]] = {key: [] for key in PLOTTED}
        self.clock = StepClock()
        # the last plot_every steps' routed tokens, summed for the heatmap
        self.recent_expert_tokens: deque[tuple[int, np.ndarray]] = deque(maxlen=max(plot_every, 1))
        self.warned: set[str] = set()
        self.wandb = None
        self.wandb_run = None

        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.log_file = open(self.run_dir / LOG_FILE, "a", buffering=1)  # noqa: SIM115 (kept open)
        self._write_log(f"==== {'resuming after step ' + str(resume_step) if resume_step else 'new run'}")
        self._prepare_metrics_file(resume_step)
        self.metrics_file = open(self.run_dir / METRICS_FILE, "a")  # noqa: SIM115 (kept open)
        mode = resolve_wandb_mode(wandb_mode)
        if mode != "disabled":
            self._init_wandb(mode, wandb_project, wandb_entity, wandb_name, config, resume_step)

    # -- public API ---------------------------------------------------------------------------

    def log_step(self, metrics: dict[str, float | int], expert_tokens: torch.Tensor | None = None) -> None:
        """Record one optimizer step: metrics.jsonl line, history, console every log_every steps,
        plots every plot_every steps, W&B."""
        if not self.active:
            return
        if self.closed:
            raise RuntimeError("RunMonitor.log_step after close()")
        step = int(metrics["step"])
        self.metrics_file.write(metrics_line(metrics) + "\n")
        self.metrics_file.flush()
        self._remember(metrics)
        if expert_tokens is not None:
            self.recent_expert_tokens.append((step, as_float_array(expert_tokens)))

        elapsed = metrics.get("elapsed_s")
        self.clock.tick(step, None if elapsed is None else float(elapsed))
        if step == 1 or step % self.log_every == 0 or step >= self.total_steps or metrics.get("bad_step"):
            eta = self.clock.eta(step, self.total_steps)
            self.message(console_line(metrics, self.total_steps, eta, moe=expert_tokens is not None))

        plotted = self.plot_every > 0 and step % self.plot_every == 0
        if plotted:
            self._refresh_plots()
        if self.wandb_run is not None:
            self._log_wandb(step, metrics, with_heatmap=plotted)

    def message(self, text: str) -> None:
        """A line on the console (main rank only), also kept in run_dir/train.log."""
        if not self.active:
            return
        print(text, flush=True)
        if not self.closed:
            self._write_log(text)

    def close(self) -> None:
        """Final plots, W&B finish, files closed; safe to call twice."""
        self._close(exit_code=0)

    def __enter__(self) -> RunMonitor:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self._close(exit_code=0 if exc_type is None else 1)  # W&B marks the run failed

    # -- internals ----------------------------------------------------------------------------

    def _close(self, exit_code: int) -> None:
        if not self.active or self.closed:
            return
        try:
            self._refresh_plots()
        finally:
            self.closed = True
            if self.wandb_run is not None:
                with self._guard("wandb.finish"):
                    self.wandb_run.finish(exit_code=exit_code)
                self.wandb_run = None
            self.metrics_file.close()
            self.log_file.close()

    def _write_log(self, text: str) -> None:
        stamp = datetime.now().isoformat(sep=" ", timespec="seconds")
        self.log_file.write(f"{stamp}  {text}\n")

    def _prepare_metrics_file(self, resume_step: int) -> None:
        path = self.run_dir / METRICS_FILE
        if not path.exists():
            return
        if resume_step <= 0:
            # a fresh run in a used directory: never mix two runs' steps in one file
            os.replace(path, path.with_name(METRICS_FILE + ".old"))
            self.message(f"moved the previous {METRICS_FILE} aside to {METRICS_FILE}.old")
            return
        kept, dropped = truncate_metrics(path, resume_step)
        for record in kept:
            self._remember(record)
        if dropped:
            self.message(f"{METRICS_FILE}: dropped {dropped} line(s) logged after step {resume_step}")

    def _remember(self, metrics: dict[str, Any]) -> None:
        step = int(metrics["step"])
        for key in PLOTTED:
            value = metrics.get(key)
            value = value.item() if hasattr(value, "item") else value
            if isinstance(value, int | float):
                self.history[key].append((step, float(value)))

    def _refresh_plots(self) -> None:
        # A broken plot must not end a long training run: warn once, keep training
        if self.history["loss"]:
            with self._guard("loss plot"):
                plot_losses(self.history, self.run_dir / LOSS_PLOT)
        if self.recent_expert_tokens:
            steps = [s for s, _ in self.recent_expert_tokens]
            with self._guard("expert-load plot"):
                counts = sum(c for _, c in self.recent_expert_tokens)
                plot_expert_load(counts, steps[0], steps[-1], self.run_dir / EXPERT_LOAD_PLOT)

    @contextlib.contextmanager
    def _guard(self, what: str):
        try:
            yield
        except Exception as e:
            if what not in self.warned:
                self.warned.add(what)
                self.message(f"WARNING: {what} failed ({type(e).__name__}: {e}); training continues")

    def _init_wandb(
        self, mode: str, project: str, entity: str | None, name: str | None, config: dict, resume_step: int
    ) -> None:
        id_path = self.run_dir / WANDB_ID_FILE
        # A resumed run continues the same W&B run; a fresh start is a new one
        if resume_step > 0 and id_path.exists():
            run_id = id_path.read_text().strip()
        else:
            run_id = new_wandb_id()
            write_atomically(id_path, (run_id + "\n").encode())
        try:
            import wandb

            run = wandb.init(
                project=project,
                entity=entity,
                name=name,
                mode=mode,
                dir=str(self.run_dir),
                config=config,
                id=run_id,
                resume="allow",
                allow_val_change=True,  # a resumed run may change e.g. max_steps
            )
        except Exception as e:
            self.message(
                f"WARNING: W&B init failed in mode {mode!r} ({type(e).__name__}: {e}); continuing without "
                f"W&B (metrics still go to {self.run_dir / METRICS_FILE})"
            )
            return
        self.wandb, self.wandb_run = wandb, run
        self.message(f"W&B {mode}: run {run_id} ({getattr(run, 'url', None) or Path(run.dir).parent})")
        next_step = getattr(run, "step", 0) or 0
        if next_step > resume_step + 1:
            # W&B drops logs for steps below the ones it already has (steps logged after the checkpoint)
            self.message(
                f"W&B already has steps up to {next_step - 1}; it ignores this run's steps until then"
            )

    def _log_wandb(self, step: int, metrics: dict[str, Any], with_heatmap: bool) -> None:
        data: dict[str, Any] = wandb_scalars(metrics)
        heatmap = self.run_dir / EXPERT_LOAD_PLOT
        if with_heatmap and self.recent_expert_tokens and heatmap.exists():
            data["expert_load"] = self.wandb.Image(str(heatmap))
        with self._guard("wandb.log"):
            self.wandb_run.log(data, step=step)
