"""train/monitor.py: metrics.jsonl contents and resume, the main-rank-only rule, plots (rendered by a
background process that log_step never waits for, current after close; what the figures show), the
console line, and W&B (never imported when disabled; an offline run when asked, of which the process
prints one line and W&B nothing)."""

import json
import math
import os
import re
import subprocess
import sys
import textwrap
import time
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from data.shards import PARTIAL_SUFFIX
from model.config import ModelConfig
from tests.unit import plot_renderers
from tests.unit.plot_renderers import RENDERS_LOG, SLOW_RENDER_S
from train.monitor import (
    EXPERT_LOAD_PLOT,
    LOSS_PLOT,
    METRICS_FILE,
    RunMonitor,
    format_count,
    format_duration,
    read_metrics,
    resolve_wandb_mode,
)
from train.plots import expert_load_figure, expert_row_labels, loss_figure, relative_expert_load

REPO = Path(__file__).resolve().parents[2]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture
def no_plots(monkeypatch):
    """Plots cost ~0.3 s each to render; tests about other things skip them. (The monitor's default
    renderer, wherever it runs: in close()'s final render here, or in a worker if a test refreshes.)"""
    monkeypatch.setattr("train.monitor.render_plots", plot_renderers.skip_render)


def make_monitor(run_dir, **overrides) -> RunMonitor:
    kwargs = dict(
        is_main=True,
        total_steps=20,
        wandb_mode="disabled",
        wandb_project="test",
        wandb_entity=None,
        wandb_name=None,
        config={"model": "tiny"},
        plot_every=1000,  # plots only where a test asks for them
    )
    kwargs.update(overrides)
    return RunMonitor(run_dir, **kwargs)


def fake_metrics(step: int, **overrides) -> dict:
    metrics = dict(
        step=step,
        loss=10.0 - 0.1 * step,
        lm_loss=9.5 - 0.1 * step,
        mtp_loss=10.5 - 0.1 * step,
        lb_loss=1.0 + 0.01 * step,
        lr=1e-3 * min(step, 5) / 5,
        grad_norm=1.5,
        tokens=4096 * step,
        tokens_per_s=12345.0,
        tflops_per_gpu=0.05,
        expert_load_max_over_mean=1.3,
        elapsed_s=2.0 * step,
    )
    metrics.update(overrides)
    return metrics


def fake_expert_tokens(step: int, layers: int = 3, experts: int = 8) -> torch.Tensor:
    g = torch.Generator().manual_seed(step)
    return torch.randint(0, 100, (layers, experts), generator=g, dtype=torch.int64)


def steps_in(run_dir: Path) -> list[int]:
    return [json.loads(line)["step"] for line in (run_dir / METRICS_FILE).read_text().splitlines()]


@pytest.mark.usefixtures("no_plots")
def test_metrics_jsonl_has_one_parsable_line_per_step_with_the_values(tmp_path):
    monitor = make_monitor(tmp_path)
    logged = [fake_metrics(1), fake_metrics(2, loss=float("nan"), grad_norm=float("inf")), fake_metrics(3)]
    for m in logged:
        monitor.log_step(m)
    lines = (tmp_path / METRICS_FILE).read_text().splitlines()
    assert len(lines) == 3
    records = [json.loads(line) for line in lines]  # strict JSON: no bare NaN / Infinity
    assert [r["step"] for r in records] == [1, 2, 3]
    assert records[0] == logged[0]
    assert records[1]["loss"] == "nan" and records[1]["grad_norm"] == "inf"
    assert records[1]["lm_loss"] == logged[1]["lm_loss"]
    assert isinstance(records[2]["tokens"], int) and isinstance(records[2]["lr"], float)
    # read_metrics gives the floats back
    back = read_metrics(tmp_path / METRICS_FILE)
    assert math.isnan(back[1]["loss"]) and back[1]["grad_norm"] == math.inf
    monitor.close()


@pytest.mark.usefixtures("no_plots")
def test_lines_are_on_disk_before_close(tmp_path):
    monitor = make_monitor(tmp_path)
    monitor.log_step(fake_metrics(1))
    assert steps_in(tmp_path) == [1]  # flushed: a crash now loses nothing
    monitor.close()


@pytest.mark.usefixtures("no_plots")
def test_resume_drops_steps_after_the_checkpoint_and_keeps_the_rest(tmp_path):
    first = make_monitor(tmp_path)
    for step in range(1, 11):
        first.log_step(fake_metrics(step))
    first.close()

    resumed = make_monitor(tmp_path, resume_step=6)
    assert list(resumed.history["loss"][::2]) == [1, 2, 3, 4, 5, 6]  # loaded: (step, value) pairs, flat
    for step in (7, 8):
        resumed.log_step(fake_metrics(step))
    resumed.close()
    assert steps_in(tmp_path) == [1, 2, 3, 4, 5, 6, 7, 8]
    assert not list(tmp_path.glob(".*tmp*"))
    assert not list(tmp_path.glob(f".*{PARTIAL_SUFFIX}")), "the rewritten metrics.jsonl's temporary file"


@pytest.mark.usefixtures("no_plots")
def test_resume_drops_a_line_cut_short_by_a_crash(tmp_path):
    good = [json.dumps(fake_metrics(s)) for s in (1, 2)]
    (tmp_path / METRICS_FILE).write_text("\n".join(good) + '\n{"step": 3, "loss": 7.')
    monitor = make_monitor(tmp_path, resume_step=2)
    monitor.log_step(fake_metrics(3))
    monitor.close()
    assert steps_in(tmp_path) == [1, 2, 3]


@pytest.mark.usefixtures("no_plots")
def test_fresh_start_moves_an_old_metrics_file_aside(tmp_path):
    old = json.dumps(fake_metrics(1, loss=123.0)) + "\n"
    (tmp_path / METRICS_FILE).write_text(old)
    monitor = make_monitor(tmp_path, resume_step=0)
    monitor.log_step(fake_metrics(1))
    monitor.close()
    assert (tmp_path / (METRICS_FILE + ".old")).read_text() == old
    assert read_metrics(tmp_path / METRICS_FILE)[0]["loss"] == fake_metrics(1)["loss"]


def test_non_main_rank_writes_and_prints_nothing(tmp_path, capsys, monkeypatch):
    started = []
    monkeypatch.setattr("train.monitor.start_plot_worker", lambda: started.append("worker"))
    run_dir = tmp_path / "run"
    monitor = make_monitor(run_dir, is_main=False, wandb_mode="offline", plot_every=1)
    for step in (1, 2):
        monitor.log_step(fake_metrics(step), fake_expert_tokens(step))
    monitor.message("hello")
    monitor.close()
    assert not run_dir.exists()
    assert capsys.readouterr().out == ""
    assert started == []  # no plot process either


def test_disabled_wandb_is_never_imported(tmp_path):
    script = textwrap.dedent(
        f"""
        import sys
        import numpy as np
        from train.monitor import RunMonitor
        m = RunMonitor({str(tmp_path)!r}, is_main=True, total_steps=3, wandb_mode="disabled",
                       wandb_project="p", wandb_entity=None, wandb_name=None, config={{}}, plot_every=2)
        for step in (1, 2, 3):
            m.log_step(dict(step=step, loss=1.0, lm_loss=1.0, mtp_loss=1.0, lb_loss=1.0, lr=1e-3,
                            grad_norm=1.0, tokens=step, tokens_per_s=1.0, tflops_per_gpu=1.0,
                            expert_load_max_over_mean=1.0), np.ones((2, 4), dtype=np.int64))
        m.close()
        assert "wandb" not in sys.modules, "wandb was imported"
        """
    )
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    result = subprocess.run(
        [sys.executable, "-c", script], cwd=REPO, env=env, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert (tmp_path / LOSS_PLOT).exists()  # it did run to the end


def assert_valid_png(path: Path):
    from matplotlib.image import imread

    assert path.read_bytes()[:8] == PNG_MAGIC
    pixels = imread(path)
    assert pixels.ndim == 3 and pixels.shape[0] > 100 and pixels.shape[1] > 100
    assert pixels.std() > 0.01  # not a blank canvas


def wait_for(condition, what: str, timeout: float = 60.0) -> None:
    """Poll until condition() holds; generous, since a worker starts slowly on a loaded 2-core machine."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"{what} did not happen in {timeout} s"
        time.sleep(0.05)


def wait_for_plot_job(monitor: RunMonitor) -> None:
    wait_for(lambda: monitor.plot_job is None or monitor.plot_job[0].done(), "the plot job")


def warnings_in(output: str) -> list[str]:
    return [line for line in output.splitlines() if line.startswith("WARNING")]


def process_is_gone(pid: int) -> bool:
    """Also true of a zombie: dead, but not reaped yet (or never, without an init in a container).
    A process reaped while its status is read fails the read with ESRCH, not ENOENT."""
    try:
        return "State:\tZ" in Path(f"/proc/{pid}/status").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return True


needs_proc = pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads /proc (Linux)")


def test_plots_are_valid_pngs_and_no_temp_files_remain(tmp_path):
    monitor = make_monitor(tmp_path, plot_every=4)
    for step in range(1, 7):
        loss = float("nan") if step == 3 else None
        metrics = fake_metrics(step) if loss is None else fake_metrics(step, loss=loss)
        monitor.log_step(metrics, fake_expert_tokens(step))
    assert monitor.plot_pool is not None, "the step-4 refresh went to the worker"
    wait_for(lambda: (tmp_path / EXPERT_LOAD_PLOT).exists(), "the step-4 plots")  # drawn before close
    monitor.close()
    monitor.close()  # idempotent
    assert monitor.plot_pool is None  # shut down
    assert_valid_png(tmp_path / LOSS_PLOT)
    assert_valid_png(tmp_path / EXPERT_LOAD_PLOT)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        [METRICS_FILE, "train.log", LOSS_PLOT, EXPERT_LOAD_PLOT]
    )


@pytest.mark.slow
def test_log_step_never_waits_for_a_slow_render_and_close_leaves_current_plots(tmp_path):
    monitor = make_monitor(tmp_path, plot_every=2, plot_renderer=plot_renderers.slow_render)
    submitted = time.monotonic()
    for step in range(1, 6):
        started = time.monotonic()
        monitor.log_step(fake_metrics(step), fake_expert_tokens(step))
        # step 2 starts the worker and hands it a job; step 4 finds it busy and skips its refresh
        assert time.monotonic() - started < 1.0, f"log_step({step}) waited for the plots"
    assert time.monotonic() - submitted < SLOW_RENDER_S
    assert monitor.plot_job is not None and monitor.plot_job[1].step == 2
    assert not (tmp_path / LOSS_PLOT).exists()  # the job is still asleep

    monitor.close()  # waits for the step-2 job, then draws the final plots of step 5
    assert monitor.plotted_step == 5
    assert_valid_png(tmp_path / LOSS_PLOT)
    assert_valid_png(tmp_path / EXPERT_LOAD_PLOT)
    assert not list(tmp_path.glob(".*tmp*"))


@pytest.mark.slow
def test_close_draws_the_final_plots_only_if_the_last_job_did_not(tmp_path):
    current = tmp_path / "current"
    monitor = make_monitor(current, plot_every=2, plot_renderer=plot_renderers.counting_render)
    for step in range(1, 5):
        monitor.log_step(fake_metrics(step), fake_expert_tokens(step))
        wait_for_plot_job(monitor)  # so that step 4's refresh is not skipped
    monitor.close()
    assert (current / RENDERS_LOG).read_text().split() == ["2", "4"]  # step 4's plots were already drawn

    behind = tmp_path / "behind"
    monitor = make_monitor(behind, plot_every=2, plot_renderer=plot_renderers.counting_render)
    for step in range(1, 4):
        monitor.log_step(fake_metrics(step), fake_expert_tokens(step))
    monitor.close()
    assert (behind / RENDERS_LOG).read_text().split() == ["2", "3"]


def test_finish_plots_leaves_the_last_steps_plots_on_disk_and_close_draws_them_no_more(tmp_path):
    """The trainer's last line names the plots: they are current before it is printed, not only once
    the monitor closes after it."""
    monitor = make_monitor(tmp_path, plot_every=2, plot_renderer=plot_renderers.counting_render)
    for step in range(1, 4):
        monitor.log_step(fake_metrics(step), fake_expert_tokens(step))
    monitor.finish_plots()
    assert (tmp_path / RENDERS_LOG).read_text().split() == ["2", "3"]
    monitor.close()
    assert (tmp_path / RENDERS_LOG).read_text().split() == ["2", "3"]


def test_a_failing_render_warns_once_and_training_goes_on(tmp_path, capsys):
    monitor = make_monitor(tmp_path, plot_every=1, plot_renderer=plot_renderers.failing_render)
    monitor.log_step(fake_metrics(1), fake_expert_tokens(1))
    wait_for_plot_job(monitor)
    monitor.log_step(fake_metrics(2), fake_expert_tokens(2))  # takes in the failure
    assert warnings_in(capsys.readouterr().out) == [
        "WARNING: plot rendering failed (RuntimeError: no fonts here); training continues"
    ]
    for step in range(3, 8):
        monitor.log_step(fake_metrics(step), fake_expert_tokens(step))  # more jobs, failing again
    monitor.close()
    assert warnings_in(capsys.readouterr().out) == []  # once only
    assert steps_in(tmp_path) == list(range(1, 8))
    assert not (tmp_path / LOSS_PLOT).exists()


def test_plots_are_drawn_in_process_when_the_worker_cannot_start(tmp_path, monkeypatch, capsys):
    def no_processes():
        raise OSError("no sem_open here")

    monkeypatch.setattr("train.monitor.start_plot_worker", no_processes)
    monitor = make_monitor(tmp_path, plot_every=2)
    for step in (1, 2):
        monitor.log_step(fake_metrics(step), fake_expert_tokens(step))
    assert_valid_png(tmp_path / LOSS_PLOT)  # drawn in log_step itself
    for step in (3, 4):
        monitor.log_step(fake_metrics(step), fake_expert_tokens(step))
    monitor.close()
    warnings = warnings_in(capsys.readouterr().out)
    assert len(warnings) == 1 and "plot worker failed (OSError: no sem_open here)" in warnings[0]
    assert monitor.plotted_step == 4


def test_a_dead_worker_falls_back_to_drawing_in_process(tmp_path, capsys):
    monitor = make_monitor(tmp_path, plot_every=2, plot_renderer=plot_renderers.dying_render)
    for step in (1, 2):
        monitor.log_step(fake_metrics(step), fake_expert_tokens(step))
    wait_for_plot_job(monitor)
    monitor.log_step(fake_metrics(3), fake_expert_tokens(3))  # finds the pool broken: draws step 2 here
    assert monitor.plotted_step == 2 and monitor.plot_pool is None
    assert_valid_png(tmp_path / LOSS_PLOT)
    monitor.log_step(fake_metrics(4), fake_expert_tokens(4))
    assert monitor.plotted_step == 4  # in log_step, from now on
    monitor.close()
    warnings = warnings_in(capsys.readouterr().out)
    assert len(warnings) == 1 and "plot worker failed (BrokenProcessPool" in warnings[0]


@needs_proc
@pytest.mark.parametrize("finished_first", [False, True], ids=["close", "finish_plots-then-close"])
def test_close_gives_up_on_a_stuck_worker(tmp_path, monkeypatch, capsys, finished_first):
    """Given up on, the worker is not replaced by a render here, by close() nor by the trainer's
    finish_plots() and the close() after it."""
    monkeypatch.setattr("train.monitor.PLOT_WAIT_S", 0.5)
    monitor = make_monitor(tmp_path, plot_every=2, plot_renderer=plot_renderers.slow_render)
    for step in (1, 2, 3):
        monitor.log_step(fake_metrics(step), fake_expert_tokens(step))
    (worker,) = monitor.plot_pool._processes  # its pid
    started = time.monotonic()
    if finished_first:
        monitor.finish_plots()
    monitor.close()
    assert time.monotonic() - started < SLOW_RENDER_S - 0.5, "close waited for the render"
    # killed, not left behind (by pid: Process.is_alive races the pool's own thread reaping it)
    wait_for(lambda: process_is_gone(worker), "the stuck worker's exit", timeout=30)
    warnings = warnings_in(capsys.readouterr().out)
    assert len(warnings) == 1 and "still busy after 0.5 s and was stopped" in warnings[0]
    assert not (tmp_path / LOSS_PLOT).exists()  # no final render after a hang: it might hang too


@needs_proc
@pytest.mark.slow
def test_the_worker_exits_when_the_training_process_dies_without_closing(tmp_path):
    script = textwrap.dedent(
        f"""
        import os
        import numpy as np
        from train.monitor import RunMonitor
        m = RunMonitor({str(tmp_path)!r}, is_main=True, total_steps=3, wandb_mode="disabled",
                       wandb_project="p", wandb_entity=None, wandb_name=None, config={{}}, plot_every=1)
        m.log_step(dict(step=1, loss=1.0, lr=1e-3), np.ones((2, 4), dtype=np.int64))
        m.plot_job[0].result(timeout=60)  # the worker is up
        print("worker", *m.plot_pool._processes, flush=True)
        os._exit(0)  # as if killed: no close()
        """
    )
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    result = subprocess.run(
        [sys.executable, "-c", script], cwd=REPO, env=env, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    (pid,) = map(int, result.stdout.splitlines()[-1].split()[1:])
    wait_for(lambda: process_is_gone(pid), "the orphaned worker's exit", timeout=30)


def test_relative_expert_load_is_count_over_layer_mean():
    counts = torch.tensor([[1, 1, 2, 0], [0, 0, 0, 0]])
    load = relative_expert_load(counts.numpy())
    assert load[0].tolist() == [1.0, 1.0, 2.0, 0.0]
    assert load[1].tolist() == [0.0, 0.0, 0.0, 0.0]  # a layer that routed nothing


TINY_MODEL = {"num_hidden_layers": 4, "num_experts": 16, "mtp_num_layers": 1}  # 4 MoE layers + MTP


def title_fits_in_figure(fig) -> bool:
    fig.draw_without_rendering()  # lays the figure out
    (ax,) = (ax for ax in fig.axes if ax.get_title())
    title = ax.title.get_window_extent()
    return fig.bbox.contains(*title.p0) and fig.bbox.contains(*title.p1)


def y_tick_labels(ax) -> list[str]:
    return [label.get_text() for label in ax.get_yticklabels()]


@pytest.mark.parametrize(
    ("rows", "experts"), [(5, 4), (5, 16), (49, 64)], ids=["4-experts", "tiny", "49-rows"]
)
def test_expert_load_title_fits_and_the_mtp_row_is_labelled(rows, experts):
    counts = np.ones((rows, experts))
    counts[-1, 0] = 10 * experts  # the MTP layer is the worst
    labels = expert_row_labels({**TINY_MODEL, "num_hidden_layers": rows - 1}, rows)
    fig = expert_load_figure(counts, 1234561, 1234570, labels)
    assert title_fits_in_figure(fig)
    ax = fig.axes[0]
    assert "(MTP 1)" in ax.get_title()
    ticks = y_tick_labels(ax)
    assert ticks[-1] == "MTP 1" and ticks[:3] == (["0", "1", "2"] if rows < 48 else ["0", "2", "4"])


def test_expert_rows_are_the_models_moe_layers_then_the_mtp_depths():
    model = ModelConfig(num_hidden_layers=8, decoder_sparse_step=2, mlp_only_layers=[3], mtp_num_layers=2)
    config = OmegaConf.to_container(OmegaConf.structured(model))  # as the trainer hands it over
    moe = [str(layer) for layer in range(8) if model.is_moe_layer(layer)]
    assert moe == ["1", "5", "7"]
    assert expert_row_labels(config, 5) == (*moe, "MTP 1", "MTP 2")
    assert expert_row_labels({}, 3) == ("0", "1", "2")  # a config that says nothing: numbered
    assert expert_row_labels(TINY_MODEL, 3) == ("0", "1", "MTP 1")  # rows the config does not explain


def aux_loss_lines(series) -> dict[str, object]:
    """The label of each line on the aux-loss panel (its left axis or a twin) -> its axes."""
    middle = loss_figure(series).axes[1]
    twins = [ax for ax in middle.figure.axes if ax is not middle and ax.bbox.bounds == middle.bbox.bounds]
    return {line.get_label(): ax for ax in (middle, *twins) for line in ax.get_lines()}


def test_z_loss_is_plotted_only_when_nonzero_and_on_its_own_axis():
    steps = np.arange(1, 11, dtype=np.float64)
    series = {key: np.column_stack([steps, np.full(10, 2.0)]) for key in ("loss", "lb_loss", "lr")}
    assert set(aux_loss_lines({**series, "z_loss": np.column_stack([steps, np.zeros(10)])})) == {"lb_loss"}
    lines = aux_loss_lines({**series, "z_loss": np.column_stack([steps, np.full(10, 40.0)])})
    assert set(lines) == {"lb_loss", "z_loss (right axis)"}
    assert lines["lb_loss"] is not lines["z_loss (right axis)"]  # z in the tens does not flatten lb


@pytest.mark.usefixtures("no_plots")
def test_the_monitor_plots_z_loss_only_when_the_loss_uses_it_and_names_the_rows(tmp_path):
    unused = make_monitor(tmp_path / "a", config={"loss": {"z_coef": 0.0}, "model": TINY_MODEL})
    unused.log_step(fake_metrics(1, z_loss=7.5), fake_expert_tokens(1, layers=5))
    job = unused._plot_job()
    assert "z_loss" not in job.series and job.expert_rows == ("0", "1", "2", "3", "MTP 1")
    unused.close()
    used = make_monitor(tmp_path / "b", config={"loss": {"z_coef": 1e-3}})
    used.log_step(fake_metrics(1, z_loss=7.5))
    assert used._plot_job().series["z_loss"].tolist() == [[1.0, 7.5]]
    used.close()


@pytest.mark.usefixtures("no_plots")
def test_console_line_shows_step_loss_and_eta_and_goes_to_train_log(tmp_path, capsys):
    monitor = make_monitor(tmp_path, total_steps=200, log_every=10)
    for step in range(1, 13):
        monitor.log_step(fake_metrics(step), fake_expert_tokens(step))
    monitor.message("a note")
    monitor.close()
    lines = capsys.readouterr().out.splitlines()
    step_lines = [line for line in lines if line.startswith("step")]
    assert len(step_lines) == 2  # step 1 and step 10 only
    line = step_lines[-1]
    assert line.startswith("step  10/200 | loss 9.0000 (lm 8.5000 mtp 9.5000 lb 1.1000)")
    assert "12.3k tok/s" in line and "lr 1.00e-03" in line
    assert line.endswith("eta 6m20s")  # 2 s per step (elapsed_s) x 190 remaining
    assert step_lines[0].endswith("eta --")  # nothing to time yet
    log = (tmp_path / "train.log").read_text()
    assert line in log and "a note" in log


@pytest.mark.usefixtures("no_plots")
def test_last_step_is_always_printed(tmp_path, capsys):
    monitor = make_monitor(tmp_path, total_steps=7, log_every=5)
    for step in range(1, 8):
        monitor.log_step(fake_metrics(step))
    monitor.close()
    out = capsys.readouterr().out
    assert [line.split("|")[0].split()[1] for line in out.splitlines() if line.startswith("step")] == [
        "1/7",
        "5/7",
        "7/7",
    ]
    assert "eta 0s" in out


def test_number_formats():
    assert format_count(950) == "950"
    assert format_count(12345) == "12.3k"
    assert format_count(4.2e6) == "4.2M"
    assert format_duration(42) == "42s"
    assert format_duration(192) == "3m12s"
    assert format_duration(7500) == "2h05m"
    assert format_duration(None) == "--"


@pytest.mark.slow
def test_wandb_offline_prints_one_line_and_nothing_of_its_own(tmp_path):
    """What a user sees of an offline run (the default without an API key): one line saying how to
    upload it, which names its directory; no `wandb:` lines, before or after the run's last message."""
    pytest.importorskip("wandb")
    script = textwrap.dedent(
        """
        import numpy as np
        import wandb
        from train.monitor import RunMonitor
        m = RunMonitor("run", is_main=True, total_steps=3, wandb_mode="offline", wandb_project="p",
                       wandb_entity=None, wandb_name=None, config={}, plot_every=0)
        for step in (1, 2, 3):
            m.log_step(dict(step=step, loss=1.0, lr=1e-3), np.ones((2, 4), dtype=np.int64))
        m.message("done: 3 steps")  # the trainer's last message, before it closes the monitor
        m.close()
        assert wandb.run is None, "the W&B run was not finished"
        """
    )
    # none of the caller's W&B settings (WANDB_SILENT would hide what this test looks for); its
    # per-user files in tmp_path, not in the home directory
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    env.update(PYTHONPATH=str(REPO), **{f"WANDB_{d}_DIR": str(tmp_path) for d in ("CONFIG", "CACHE", "DATA")})
    result = subprocess.run(
        [sys.executable, "-c", script], cwd=tmp_path, env=env, timeout=120,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,  # one stream: the order as printed
    )  # fmt: skip
    lines = result.stdout.splitlines()
    assert result.returncode == 0, result.stdout
    run_id = (tmp_path / "run" / "wandb_id.txt").read_text().strip()
    (offline_dir,) = (tmp_path / "run" / "wandb").glob(f"offline-run-*-{run_id}")
    shown = Path("run") / "wandb" / offline_dir.name  # under the run directory as it was given
    assert [line for line in lines if line.startswith("wandb")] == []
    assert [line for line in lines if "W&B" in line or "wandb sync" in line] == [
        f"W&B offline: to upload this run, `wandb sync {shown}`"
    ]
    assert lines[-1] == "done: 3 steps"


class FakeWandb(types.ModuleType):
    """Stands in for the wandb module: records init arguments and logged steps; no real W&B."""

    def __init__(self, fail_init: bool = False, url: str | None = None):
        super().__init__("wandb")
        self.fail_init = fail_init
        self.url = url
        self.inits: list[dict] = []
        self.logged: list[tuple[int, dict]] = []
        self.finished: list[int] = []

    def init(self, **kwargs):
        if self.fail_init:
            raise ConnectionError("no network")
        self.inits.append(kwargs)
        fake = self
        return types.SimpleNamespace(
            url=self.url,
            offline=kwargs["mode"] == "offline",
            dir=str(Path(kwargs["dir"]) / "wandb" / f"offline-run-{kwargs['id']}" / "files"),
            step=0,
            log=lambda data, step: fake.logged.append((step, data)),
            finish=lambda exit_code=0: fake.finished.append(exit_code),
        )

    def Image(self, path):
        return ("image", Path(path).read_bytes()[:8])

    def Settings(self, **kwargs):
        return kwargs


def test_wandb_auto_mode_is_online_only_with_an_api_key():
    assert resolve_wandb_mode("auto", {"WANDB_API_KEY": "x"}) == "online"
    assert resolve_wandb_mode("auto", {}) == "offline"
    with pytest.raises(ValueError):
        resolve_wandb_mode("sometimes", {})


@pytest.mark.usefixtures("no_plots")
def test_wandb_init_failure_warns_and_training_goes_on(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "wandb", FakeWandb(fail_init=True))
    monitor = make_monitor(tmp_path, wandb_mode="online")
    monitor.log_step(fake_metrics(1))
    monitor.close()
    out = capsys.readouterr().out
    assert "W&B init failed in mode 'online'" in out and "ConnectionError" in out
    assert steps_in(tmp_path) == [1]


@pytest.mark.usefixtures("no_plots")
def test_wandb_online_prints_one_line_with_the_url_and_silences_wandb(tmp_path, monkeypatch, capsys):
    fake = FakeWandb(url="https://wandb.ai/team/test/runs/abc123")
    monkeypatch.setitem(sys.modules, "wandb", fake)
    make_monitor(tmp_path, wandb_mode="online").close()
    assert capsys.readouterr().out.splitlines() == ["W&B online: https://wandb.ai/team/test/runs/abc123"]
    settings = fake.inits[0]["settings"]
    assert settings["silent"] and settings["quiet"] and settings["console"] == "off"


def test_wandb_gets_the_scalars_at_their_step_and_a_resumed_run_keeps_its_id(tmp_path, monkeypatch):
    fake = FakeWandb()
    monkeypatch.setitem(sys.modules, "wandb", fake)
    first = make_monitor(tmp_path, wandb_mode="offline", plot_every=2)
    for step in (1, 2, 3):
        first.log_step(fake_metrics(step), fake_expert_tokens(step))
        wait_for_plot_job(first)
    first.close()
    run_id = (tmp_path / "wandb_id.txt").read_text().strip()
    assert fake.inits[0]["id"] == run_id and fake.inits[0]["resume"] == "allow"
    assert fake.inits[0]["mode"] == "offline" and fake.inits[0]["dir"] == str(tmp_path)
    # each heatmap once: step 2's with the first log after it was drawn, the final one at close
    assert [step for step, _ in fake.logged] == [1, 2, 3, 3]
    assert fake.logged[0][1]["loss"] == fake_metrics(1)["loss"] and "step" not in fake.logged[0][1]
    assert [("expert_load" in data) for _, data in fake.logged] == [False, False, True, True]
    assert fake.logged[2][1]["expert_load"] == ("image", PNG_MAGIC)
    assert fake.logged[3][1] == {"expert_load": ("image", PNG_MAGIC)}
    assert fake.finished == [0]

    make_monitor(tmp_path, wandb_mode="offline", resume_step=2).close()
    assert fake.inits[1]["id"] == run_id  # same W&B run continues
    make_monitor(tmp_path, wandb_mode="offline", resume_step=0).close()
    assert fake.inits[2]["id"] != run_id  # a fresh start is a new W&B run


def test_the_loss_figure_marks_the_held_out_losses_at_their_steps():
    steps = np.arange(1, 11, dtype=np.float64)
    series = {key: np.column_stack([steps, np.full(10, 2.0)]) for key in ("loss", "lm_loss", "lr")}
    series["eval_lm_loss"] = np.array([[5.0, 1.5], [10.0, 1.25]])
    top = loss_figure(series).axes[0]
    lines = {line.get_label(): line for line in top.get_lines()}
    assert list(lines["eval_lm_loss"].get_xdata()) == [5.0, 10.0]
    assert list(lines["eval_lm_loss"].get_ydata()) == [1.5, 1.25]


def test_domain_routing_lines_resume_like_the_metrics_and_the_plot_is_drawn(tmp_path):
    """domain_routing.jsonl keeps the evaluations up to the resumed step (a rerun logs the later ones
    again), and close() leaves domain_routing.png of the last evaluation."""
    from train.plots import DomainRouting

    def routing(step: int) -> DomainRouting:
        counts = np.arange(2 * 3 * 4).reshape(2, 3, 4) + step
        return DomainRouting(step, ("code", "prose"), (100, 120), counts)

    config = {"model": {"num_experts": 4, "num_hidden_layers": 2, "mtp_num_layers": 1}}
    first = make_monitor(tmp_path, config=config)
    for step in (2, 4, 6):
        first.log_step(fake_metrics(step))
        first.log_domain_routing(routing(step))
    first.close()
    resumed = make_monitor(tmp_path, resume_step=4, config=config)
    resumed.log_step(fake_metrics(5))
    resumed.close()
    lines = read_metrics(tmp_path / "domain_routing.jsonl")
    assert [line["step"] for line in lines] == [2, 4]
    assert lines[1]["domains"] == ["code", "prose"] and lines[1]["layers"] == ["0", "1", "MTP 1"]
    np.testing.assert_array_equal(lines[1]["counts"], routing(4).counts_dle)
    assert (tmp_path / "domain_routing.png").stat().st_size > 0


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs /dev/full (writes fail: no space)")
def test_a_full_disk_under_the_run_files_is_warned_about_once_and_training_goes_on(tmp_path, capsys):
    """metrics.jsonl, train.log and domain_routing.jsonl failing to write: one warning each, no
    exception from logging or closing, and an error already in flight is the one that leaves."""
    monitor = make_monitor(tmp_path)
    for name in ("metrics_file", "log_file"):
        getattr(monitor, name).close()
        setattr(monitor, name, open("/dev/full", "w"))  # noqa: SIM115 (closed by the monitor)
    with pytest.raises(KeyError, match="in flight"), monitor:
        for step in (1, 2, 3):
            monitor.log_step(fake_metrics(step))
        raise KeyError("in flight")
    out = capsys.readouterr().out
    assert out.count("WARNING: metrics.jsonl: cannot write") == 1 and "No space left on device" in out
    assert out.count("WARNING: train.log: cannot write") == 1
    assert re.search(r"step +1/20", out), "the console goes on"
