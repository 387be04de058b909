"""What the user sees of a training run: the console, `train.log`, `metrics.jsonl`, the loss and
expert-load plots and Weights & Biases, all under the run directory; with held-out shards tagged by
domain also `domain_routing.jsonl` (per evaluation: step, domains, tokens, layer labels and the
expert counts [domain][layer][expert]) and its plot `domain_routing.png`.

Only the main rank does anything; on every other rank `RunMonitor` is a no-op (no files, no W&B, no
printing), so the trainer can call it unconditionally.

`metrics.jsonl` holds one JSON object per optimizer step, flushed line by line. JSON has no NaN or
infinity, so non-finite floats are written as the strings "nan", "inf" and "-inf": every numeric
field reads back with `float(value)` and a NaN step stays distinguishable from an overflow.
`read_metrics` does that conversion.

On resume from step N the lines with step > N (logged after that checkpoint) are dropped, so the file
holds each step once; a fresh start (N = 0) moves an old file aside to `metrics.jsonl.old`. The file
is rewritten atomically; on a full disk the old one stays, with no partial file, and the run stops
saying so (`OutOfSpaceError`).

`elapsed_s`, when the trainer gives it, is seconds since some fixed start (cumulative); the ETA uses
its differences over the recent steps, otherwise the wall-clock time between calls.

The plots (train/plots.py) render in one spawned worker process: a refresh takes about as long as an
H100 training step, so drawn in the training loop every plot_every steps it cost ~10% of throughput. A
refresh hands the worker a copy of the history and never waits; while the worker is still busy,
refreshes are skipped. close() waits for it (a bounded time) and draws the final plots, so they are
current when it returns. Where no worker can run (it fails to start, or dies), plots are drawn in
this process as before.

W&B prints nothing of its own (its messages go to its debug log): the run prints one line about it,
the run's URL online, offline the `wandb sync` command that uploads it, which names its directory.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import multiprocessing
import multiprocessing.connection
import os
import secrets
import signal
import string
import threading
import time
from array import array
from collections import deque
from collections.abc import Callable, Mapping
from concurrent.futures import BrokenExecutor, Future, ProcessPoolExecutor
from concurrent.futures import wait as futures_wait
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from data.shards import write_atomically
from train.disk_space import OutOfSpaceError, out_of_space_kind, out_of_space_message
from train.plots import (
    DOMAIN_ROUTING_PLOT,
    EXPERT_LOAD_PLOT,
    DomainRouting,
    PlotJob,
    expert_row_labels,
    render_plots,
)
from train.plots import LOSS_PLOT as LOSS_PLOT  # the run directory's file names are importable here

if TYPE_CHECKING:
    import torch

METRICS_FILE = "metrics.jsonl"
DOMAIN_ROUTING_FILE = "domain_routing.jsonl"  # one line per evaluation by domain: expert counts
LOG_FILE = "train.log"
WANDB_ID_FILE = "wandb_id.txt"
WANDB_MODES = ("auto", "offline", "online", "disabled")
ETA_WINDOW = 20  # steps whose mean duration predicts the rest: recent enough to forget compile time
# at most; see plotted_metrics. The eval_* points exist at evaluation steps only
PLOTTED = ("loss", "lm_loss", "mtp_loss", "lb_loss", "z_loss", "lr", "eval_lm_loss", "eval_mtp_loss")
PLOT_WAIT_S = 30.0  # the longest close() waits for one render (about a second normally) before giving up


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
# What the plots show


def config_section(config: Mapping[str, Any], name: str) -> Mapping[str, Any]:
    """One section of the run's config as a dict ({} where the config has none: tests pass little)."""
    section = config.get(name)
    return section if isinstance(section, Mapping) else {}


def plotted_metrics(config: Mapping[str, Any]) -> tuple[str, ...]:
    """The metrics loss.png shows: z_loss only when the loss uses it (loss.z_coef != 0). It is logged
    either way, but the router z of a MoE is tens where lb_loss is about 1, so an unused z_loss would
    only flatten the lb_loss curve."""
    loss = config_section(config, "loss")
    if "z_coef" in loss and not loss["z_coef"]:
        return tuple(key for key in PLOTTED if key != "z_loss")
    return PLOTTED


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


def quiet_wandb_settings(wandb: Any) -> Any:
    """W&B's own console output off. Otherwise an offline run prints some 35 `wandb:` lines (a banner,
    a warning, and at finish a history and summary that land after the run's last message) where the
    monitor prints one. silent/quiet send W&B's messages to its debug log instead (in its run
    directory); console="off" stops it wrapping stdout/stderr to upload them (train.log has them)."""
    return wandb.Settings(silent=True, quiet=True, console="off")


def wandb_run_line(run: Any, mode: str, run_id: str, run_dir: Path) -> str:
    """The one line the run prints about W&B: online, the run's URL; offline, the command that uploads
    the run, which names where it is. (An offline run's `url` would print a W&B warning: not read.)"""
    if not getattr(run, "offline", mode == "offline"):
        return f"W&B online: {getattr(run, 'url', None) or 'run ' + run_id}"
    sync_dir = Path(getattr(run, "sync_dir", None) or Path(run.dir).parent)
    return f"W&B offline: to upload this run, `wandb sync {shown_under(run_dir, sync_dir)}`"


def shown_under(run_dir: Path, path: Path) -> Path:
    """`path` as a path under `run_dir` the way the user gave run_dir (often relative), where it is one;
    else as it is."""
    try:
        return run_dir / path.relative_to(run_dir.absolute())
    except ValueError:
        return path


def wandb_scalars(metrics: dict[str, Any]) -> dict[str, float | int]:
    """The numeric metrics, step excluded (it goes as wandb.log's step)."""
    out = {}
    for key, value in metrics.items():
        value = value.item() if hasattr(value, "item") else value
        if key != "step" and isinstance(value, int | float):
            out[key] = int(value) if isinstance(value, bool) else value
    return out


# ---------------------------------------------------------------------------------------------
# The plot worker

PlotRenderer = Callable[[PlotJob], dict[str, str]]  # a job -> {plot: error} of the plots that failed


def start_plot_worker() -> ProcessPoolExecutor:
    """The one process that renders plots. Spawned, not forked: a fork of the training process would
    inherit its CUDA context and its threads' locks in whatever state they were in. Like any spawned
    process it imports the main script again, which must keep its work under `if __name__ ==
    "__main__"` (launch/pretrain.py does)."""
    context = multiprocessing.get_context("spawn")
    return ProcessPoolExecutor(max_workers=1, mp_context=context, initializer=plot_worker_setup)


def plot_worker_setup() -> None:
    """In the worker: leave stop signals to the training process, and die with it.

    Ctrl-C and srun's SIGTERM reach every process of the group; the trainer finishes its step, saves and
    closes the monitor, which stops the worker after the final plots; a worker killed first would
    leave them undrawn. The training process can also end without closing (kill -9, out of memory):
    the worker then exits instead of lingering idle forever."""
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, signal.SIG_IGN)
    parent = multiprocessing.parent_process()
    if parent is not None:
        threading.Thread(target=exit_when_ready, args=(parent.sentinel,), daemon=True).start()


def exit_when_ready(sentinel: int) -> None:
    multiprocessing.connection.wait([sentinel])
    os._exit(0)


def stop_plot_worker(pool: ProcessPoolExecutor) -> None:
    """Shut the pool down without waiting on a stuck render. Its process is killed (it ignores
    SIGTERM), since the interpreter's exit would otherwise join it forever; Python < 3.14 has no
    public call for that, hence the private attribute."""
    for process in list((getattr(pool, "_processes", None) or {}).values()):
        process.kill()
    pool.shutdown(wait=False, cancel_futures=True)


def as_float_array(counts: torch.Tensor | np.ndarray) -> np.ndarray:
    if hasattr(counts, "detach"):
        counts = counts.detach().cpu().numpy()
    return np.asarray(counts, dtype=np.float64)


# ---------------------------------------------------------------------------------------------


class RunMonitor:
    """Console, train.log, metrics.jsonl, plots and W&B of one run; a no-op off the main rank.

    `plot_renderer` draws a `PlotJob` (default `train.plots.render_plots`). It runs in the worker
    process, so it must be a module-level function (it is pickled by name); tests pass slow or failing
    ones."""

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
        plot_renderer: PlotRenderer | None = None,
    ):
        self.active = is_main
        self.closed = False
        if not self.active:
            return
        self.run_dir = Path(run_dir)
        self.total_steps = total_steps
        self.plot_every = plot_every
        self.log_every = max(log_every, 1)
        self.last_step: int | None = None
        # (step, value) pairs flattened into typed arrays: a plot job's copy is a memcpy, where pickling
        # lists of 100k tuples took ~20 ms a metric, in the training process
        self.history: dict[str, array] = {key: array("d") for key in plotted_metrics(config)}
        self.model_config = config_section(config, "model")  # names the expert-load rows
        self.clock = StepClock()
        # the last plot_every steps' routed tokens, summed for the heatmap
        self.recent_expert_tokens: deque[tuple[int, np.ndarray]] = deque(maxlen=max(plot_every, 1))
        self.warned: set[str] = set()
        self.wandb = None
        self.wandb_run = None

        # Plots render in one background process, started at the first refresh (see _refresh_plots)
        self.render = plot_renderer or render_plots
        self.plot_pool: ProcessPoolExecutor | None = None
        self.plot_job: tuple[Future, PlotJob] | None = None  # submitted, its result not yet taken in
        self.plots_in_process = False  # the worker failed: render here, stalling the step
        self.plotted_step: int | None = None  # the step the plots on disk show (all drawn without error)
        self.finished_step: int | None = None  # the last step finish_plots dealt with, however it went
        self.worker_hung = False  # finish_plots gave up on the worker: nothing is drawn after that
        self.heatmap_for_wandb = False  # a new expert_load.png that W&B has not had yet
        self.domain_routing: DomainRouting | None = None  # the last evaluation's, for its plot
        self.routing_plotted_step: int | None = None  # the evaluation domain_routing.png shows
        self.routing_for_wandb = False  # a new domain_routing.png that W&B has not had yet

        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.log_file = open(self.run_dir / LOG_FILE, "a", buffering=1)  # noqa: SIM115 (kept open)
        self._write_log(f"==== {'resuming after step ' + str(resume_step) if resume_step else 'new run'}")
        for record in self._prepare_jsonl(resume_step, METRICS_FILE):
            self._remember(record)
        self._prepare_jsonl(resume_step, DOMAIN_ROUTING_FILE)
        self.metrics_file = open(self.run_dir / METRICS_FILE, "a")  # noqa: SIM115 (kept open)
        self.routing_file = None  # domain_routing.jsonl, opened at the first evaluation by domain
        mode = resolve_wandb_mode(wandb_mode)
        if mode != "disabled":
            self._init_wandb(mode, wandb_project, wandb_entity, wandb_name, config, resume_step)

    # -- public API ---------------------------------------------------------------------------

    def log_step(self, metrics: dict[str, float | int], expert_tokens: torch.Tensor | None = None) -> None:
        """Record one optimizer step: metrics.jsonl line, history, console every log_every steps,
        plots every plot_every steps (handed to the worker: this never waits for a render), W&B."""
        if not self.active:
            return
        if self.closed:
            raise RuntimeError("RunMonitor.log_step after close()")
        step = int(metrics["step"])
        self.last_step = step
        self._append(self.metrics_file, metrics_line(metrics) + "\n", METRICS_FILE)
        self._remember(metrics)
        if expert_tokens is not None:
            self.recent_expert_tokens.append((step, as_float_array(expert_tokens)))

        elapsed = metrics.get("elapsed_s")
        self.clock.tick(step, None if elapsed is None else float(elapsed))
        if step == 1 or step % self.log_every == 0 or step >= self.total_steps or metrics.get("bad_step"):
            eta = self.clock.eta(step, self.total_steps)
            self.message(console_line(metrics, self.total_steps, eta, moe=expert_tokens is not None))

        self._collect_plots()
        if self.plot_every > 0 and step % self.plot_every == 0:
            self._refresh_plots()
        if self.wandb_run is not None:
            self._log_wandb(step, metrics)

    def log_domain_routing(self, routing: DomainRouting) -> None:
        """One evaluation's expert counts per held-out domain (train/evaluate.py): a line of
        domain_routing.jsonl now, domain_routing.png with the next plot refresh (or close)."""
        if not self.active:
            return
        rows = expert_row_labels(self.model_config, routing.counts_dle.shape[1])
        if self.routing_file is None:
            self.routing_file = open(self.run_dir / DOMAIN_ROUTING_FILE, "a")  # noqa: SIM115 (kept open)
        record = {
            "step": routing.step,
            "domains": list(routing.domains),
            "tokens": list(routing.tokens_d),
            "layers": list(rows),
            "counts": np.asarray(routing.counts_dle).tolist(),  # [domain][layer][expert]
        }
        self._append(self.routing_file, json.dumps(record) + "\n", DOMAIN_ROUTING_FILE)
        self.domain_routing = dataclasses.replace(routing, rows=rows)
        if self.plot_every > 0:
            self._refresh_plots()

    def message(self, text: str) -> None:
        """A line on the console (main rank only), also kept in run_dir/train.log."""
        if not self.active:
            return
        print(text, flush=True)
        if not self.closed:
            self._write_log(text)

    def close(self) -> None:
        """Final plots (current when this returns), W&B finish, files closed; safe to call twice."""
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
            self.finish_plots()
            new_images = self.heatmap_for_wandb or self.routing_for_wandb
            if self.wandb_run is not None and new_images and self.last_step is not None:
                self._log_wandb(self.last_step, {})  # the final heatmap, with the last step's metrics
        finally:
            self.closed = True
            self._shut_plot_worker(kill=self.plot_job is not None)  # a job left only if close was cut short
            if self.wandb_run is not None:
                with self._guard("wandb.finish"):
                    self.wandb_run.finish(exit_code=exit_code)
                self.wandb_run = None
            for file in (self.metrics_file, self.routing_file, self.log_file):
                if file is not None:
                    with contextlib.suppress(OSError):  # its write failure was warned about
                        file.close()

    def _write_log(self, text: str) -> None:
        stamp = datetime.now().isoformat(sep=" ", timespec="seconds")
        self._append(self.log_file, f"{stamp}  {text}\n", "train.log")

    def _append(self, file, text: str, name: str) -> None:
        """A line into one of the run's files. A failure to write (a full disk) is warned about once and
        training goes on: the lines are lost until there is room, and a full disk stops the run at its
        next checkpoint, on every rank alike, with the message that says how much room it needs."""
        try:
            file.write(text)
            file.flush()
        except OSError as error:
            self._warn_once(f"write {name}", f"{name}: cannot write ({error}); training goes on without it")

    def _prepare_jsonl(self, resume_step: int, name: str) -> list[dict[str, Any]]:
        """Make `name` (metrics.jsonl or domain_routing.jsonl) hold this run's lines up to resume_step;
        returns the records kept."""
        path = self.run_dir / name
        if not path.exists():
            return []
        if resume_step <= 0:
            # a fresh run in a used directory: never mix two runs' steps in one file
            os.replace(path, path.with_name(name + ".old"))
            self.message(f"moved the previous {name} aside to {name}.old")
            return []
        try:
            kept, dropped = truncate_metrics(path, resume_step)
        except OSError as error:
            if not out_of_space_kind(error):
                raise
            doing = f"cutting {path} back to step {resume_step}"
            message = out_of_space_message(path.parent, doing, path.stat().st_size)
            raise OutOfSpaceError(f"{message}: free some space, then rerun") from None
        if dropped:
            self.message(f"{name}: dropped {dropped} line(s) logged after step {resume_step}")
        return kept

    def _remember(self, metrics: dict[str, Any]) -> None:
        step = int(metrics["step"])
        for key in self.history:
            value = metrics.get(key)
            value = value.item() if hasattr(value, "item") else value
            if isinstance(value, int | float):
                self.history[key].extend((step, float(value)))

    # -- plots --------------------------------------------------------------------------------
    # One job at a time goes to the worker; its result (warnings, a new heatmap for W&B) is taken in
    # by the first log_step after it finished, or by close(). A render costs about a training step on
    # an H100 and matplotlib holds the GIL throughout, hence a process rather than a thread.

    def _plot_job(self) -> PlotJob | None:
        """The plots as of now, as plain arrays; None when there is nothing to plot."""
        if not self.history["loss"] and not self.recent_expert_tokens and self.domain_routing is None:
            return None
        # the last step logged, or before any (a resumed run closed at once) the last one loaded
        step = self.last_step if self.last_step is not None else int(self.history["loss"][-2])
        series = {key: np.array(flat, dtype=np.float64).reshape(-1, 2) for key, flat in self.history.items()}
        run_dir = str(self.run_dir.absolute())  # the worker's working directory is the one at its start
        routing = self.domain_routing
        if routing is not None and routing.step == self.routing_plotted_step:
            routing = None  # drawn already
        if not self.recent_expert_tokens:
            return PlotJob(run_dir, step, series, domain_routing=routing)
        steps = [s for s, _ in self.recent_expert_tokens]
        counts = sum(c for _, c in self.recent_expert_tokens)
        rows = expert_row_labels(self.model_config, len(counts))
        return PlotJob(run_dir, step, series, counts, (steps[0], steps[-1]), rows, routing)

    def _refresh_plots(self) -> None:
        """Hand the current plots to the worker, unless it is still busy with earlier ones: then this
        refresh is skipped, and the next one draws everything (the history is cumulative)."""
        if self.plot_job is not None:
            return
        job = self._plot_job()
        if job is None:
            return
        if self.plots_in_process:
            self._render_here(job)
        else:
            self._submit(job)

    def _submit(self, job: PlotJob) -> None:
        try:
            if self.plot_pool is None:
                self.plot_pool = start_plot_worker()
            self.plot_job = (self.plot_pool.submit(self.render, job), job)
        except Exception as e:  # no worker here (no sem_open, a process limit, a broken pool): draw here
            self._lose_plot_worker(e)
            self._render_here(job)

    def _collect_plots(self) -> None:
        """Take in the result of a finished job; never waits."""
        if self.plot_job is not None and self.plot_job[0].done():
            self._take_result()

    def _wait_for_plots(self) -> bool:
        """Wait (at most PLOT_WAIT_S) for the running job and take in its result; False if it did not
        finish, and the stuck worker was stopped."""
        if self.plot_job is None:
            return True
        done, _ = futures_wait([self.plot_job[0]], timeout=PLOT_WAIT_S)
        if not done:
            self.plot_job = None
            self.worker_hung = True
            self._shut_plot_worker(kill=True)
            self._warn_once(
                "plot worker",
                f"the plot worker was still busy after {PLOT_WAIT_S:g} s and was stopped; the plots may "
                "be stale",
            )
            return False
        self._take_result()
        return True

    def _take_result(self) -> None:
        assert self.plot_job is not None
        future, job = self.plot_job
        self.plot_job = None
        try:
            failures = future.result()
        except BrokenExecutor as e:  # the worker died (killed, out of memory, failed to start)
            self._lose_plot_worker(e)
            self._render_here(job)
            return
        except Exception as e:  # the renderer itself raised
            failures = {"plot rendering": f"{type(e).__name__}: {e}"}
        self._plots_done(job, failures)

    def _render_here(self, job: PlotJob) -> None:
        """Render in the training process: the fallback without a worker, and close()'s final plots
        when no worker was ever needed (starting one then would cost more than the render)."""
        try:
            failures = self.render(job)
        except Exception as e:
            failures = {"plot rendering": f"{type(e).__name__}: {e}"}
        self._plots_done(job, failures)

    def _plots_done(self, job: PlotJob, failures: dict[str, str]) -> None:
        # A broken plot must not end a long training run: warn once, keep training
        for what, error in failures.items():
            self._warn_once(what, f"{what} failed ({error}); training continues")
        self.plotted_step = None if failures else job.step
        if job.expert_counts is not None and not failures.keys() & {"expert-load plot", "plot rendering"}:
            self.heatmap_for_wandb = True
        if job.domain_routing is not None and not failures.keys() & {"domain-routing plot", "plot rendering"}:
            self.routing_plotted_step = job.domain_routing.step
            self.routing_for_wandb = True

    def finish_plots(self) -> None:
        """Bring the plots on disk up to the last logged step, waiting a bounded time for the worker:
        the trainer calls this before its last line names them, close() again (a no-op then, as it is
        once a hung worker was given up on: a render here might hang too)."""
        if not self.active or self.closed or self.worker_hung or self.finished_step == self.last_step:
            return
        self.finished_step = self.last_step
        if not self._wait_for_plots():
            return  # the worker hung: leave the plots as they are rather than risk hanging here too
        job = self._plot_job()
        if job is None or (job.step == self.plotted_step and job.domain_routing is None):
            return  # nothing to plot, or the last job drew exactly this
        if self.plot_pool is None:
            self._render_here(job)
        else:
            self._submit(job)
            self._wait_for_plots()

    def _lose_plot_worker(self, error: Exception) -> None:
        self._warn_once(
            "plot worker",
            f"the plot worker failed ({type(error).__name__}: {error}); plots are drawn in the training "
            "process from now on, stalling the steps that refresh them",
        )
        self.plots_in_process = True
        self._shut_plot_worker(kill=True)

    def _shut_plot_worker(self, kill: bool) -> None:
        pool, self.plot_pool = self.plot_pool, None
        if pool is None:
            return
        if kill:
            stop_plot_worker(pool)
        else:
            pool.shutdown(wait=True)  # idle by now: its process exits at once

    def _warn_once(self, key: str, text: str) -> None:
        if key not in self.warned:
            self.warned.add(key)
            self.message(f"WARNING: {text}")

    @contextlib.contextmanager
    def _guard(self, what: str):
        try:
            yield
        except Exception as e:
            self._warn_once(what, f"{what} failed ({type(e).__name__}: {e}); training continues")

    # -- W&B ----------------------------------------------------------------------------------

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
                settings=quiet_wandb_settings(wandb),
            )
        except Exception as e:
            self.message(
                f"WARNING: W&B init failed in mode {mode!r} ({type(e).__name__}: {e}); continuing without "
                f"W&B (metrics still go to {self.run_dir / METRICS_FILE})"
            )
            return
        self.wandb, self.wandb_run = wandb, run
        self.message(wandb_run_line(run, mode, run_id, self.run_dir))
        next_step = getattr(run, "step", 0) or 0
        if next_step > resume_step + 1:
            # W&B drops logs for steps below the ones it already has (steps logged after the checkpoint)
            self.message(
                f"W&B already has steps up to {next_step - 1}; it ignores this run's steps until then"
            )

    def _log_wandb(self, step: int, metrics: dict[str, Any]) -> None:
        """The scalars, and each new heatmap once: with the first log after its render finished."""
        data: dict[str, Any] = wandb_scalars(metrics)
        heatmap = self.run_dir / EXPERT_LOAD_PLOT
        if self.heatmap_for_wandb and heatmap.exists():
            data["expert_load"] = self.wandb.Image(str(heatmap))
        self.heatmap_for_wandb = False
        routing = self.run_dir / DOMAIN_ROUTING_PLOT
        if self.routing_for_wandb and routing.exists():
            data["domain_routing"] = self.wandb.Image(str(routing))
        self.routing_for_wandb = False
        if data:
            with self._guard("wandb.log"):
                self.wandb_run.log(data, step=step)
