"""Plot renderers that test_monitor.py gives RunMonitor in place of train.plots.render_plots.

They are module-level, because the spawned plot worker imports a renderer by name, and they live
apart from the tests so that the worker imports only this and train.plots, not torch: each test's
worker starts in a fraction of a second.
"""

import multiprocessing
import os
import time
from pathlib import Path

from train.plots import PlotJob, render_plots

SLOW_RENDER_S = 3.0  # long enough that a log_step which waited for it could not pass as fast
RENDERS_LOG = "renders.log"


def skip_render(job: PlotJob) -> dict[str, str]:
    return {}


def slow_render(job: PlotJob) -> dict[str, str]:
    time.sleep(SLOW_RENDER_S)
    return render_plots(job)


def failing_render(job: PlotJob) -> dict[str, str]:
    raise RuntimeError("no fonts here")


def dying_render(job: PlotJob) -> dict[str, str]:
    """Ends the worker process it runs in, as the out-of-memory killer would; renders normally in
    the training process (the fallback)."""
    if multiprocessing.parent_process() is not None:
        os._exit(1)
    return render_plots(job)


def counting_render(job: PlotJob) -> dict[str, str]:
    """Renders, and notes the job's step in run_dir/renders.log."""
    with open(Path(job.run_dir) / RENDERS_LOG, "a") as f:
        f.write(f"{job.step}\n")
    return render_plots(job)
