"""One run per run directory, end to end (train/run_dir.py):
- a second run started on a running run's directory stops at once, saying who holds it, and the
  first run goes on intact;
- `kill -9` of torchrun (whose workers run in their own sessions) makes the workers stop within
  seconds, the way SIGTERM stops them: a checkpoint of their last step, the lock released.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest

from tests.conftest import running
from tests.distributed.test_training import (
    REPO,
    command,
    environment,
    overrides,
    pretrain,
    read_metrics,
    write_corpus,
)
from train.run_dir import CLEAN_EXIT_FILE, LOCK_FILE, lock_run_dir

LONG = {"trainer.max_steps": 100000, "optim.schedule_steps": 100}  # runs until stopped


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    return write_corpus(tmp_path_factory.mktemp("corpus"))


def start(nproc: int, args: list[str], log: Path) -> subprocess.Popen:
    with log.open("w") as out:  # a file, not a pipe: orphaned workers must not block on a full pipe
        return subprocess.Popen(
            command(nproc, args), cwd=REPO, env=environment(), stdout=out, stderr=subprocess.STDOUT
        )


def wait_for_steps(run_dir: Path, steps: int, proc: subprocess.Popen, log: Path, timeout: float = 60) -> None:
    metrics = run_dir / "metrics.jsonl"
    deadline = time.monotonic() + timeout
    while not (metrics.exists() and len(metrics.read_text().splitlines()) >= steps):
        assert proc.poll() is None, f"the run ended ({proc.returncode}):\n{log.read_text()[-3000:]}"
        assert time.monotonic() < deadline, f"fewer than {steps} steps within {timeout:.0f} s"
        time.sleep(0.2)


def wait_for_lock(run_dir: Path, proc: subprocess.Popen, log: Path, timeout: float = 60) -> None:
    """Until `proc` holds run_dir's lock (taken before its model is built)."""
    deadline = time.monotonic() + timeout
    while lock_holder_pid(run_dir) != proc.pid:
        assert proc.poll() is None, f"the run ended ({proc.returncode}):\n{log.read_text()[-3000:]}"
        assert time.monotonic() < deadline, f"no lock taken within {timeout:.0f} s"
        time.sleep(0.2)


def lock_holder_pid(run_dir: Path) -> int | None:
    try:
        return json.loads((run_dir / LOCK_FILE).read_text())["pid"]
    except (OSError, ValueError, KeyError):  # not there yet, or being written
        return None


def children_of(pid: int) -> list[int]:
    children = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:  # after the command's name: state, ppid, ...
            children.append(int(stat.parent.name))
    return children


def test_a_second_run_on_a_running_run_dir_is_refused_and_the_first_goes_on(corpus, tmp_path):
    run_dir = tmp_path / "run"
    first_log = tmp_path / "first.log"
    first = start(1, overrides(corpus, run_dir, **LONG, **{"checkpoint.resume": "none"}), first_log)
    try:
        wait_for_lock(run_dir, first, first_log)
        second = subprocess.run(  # not refused, it would end after its 6 steps
            command(2, overrides(corpus, run_dir)),
            cwd=REPO, env=environment(), capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        output = second.stdout + second.stderr
        assert second.returncode != 0, output[-3000:]
        holder = f"pid {first.pid} on host {socket.gethostname()}"
        assert output.count(f"{run_dir} is in use by another run ({holder}") == 1, output[-3000:]
        assert "building the model" not in output, "refused before anything was built or written"

        wait_for_steps(run_dir, 2, first, first_log)
        (run_dir / "STOP").touch()
        assert first.wait(60) == 0, first_log.read_text()[-3000:]
    finally:
        first.kill()
    # the same command would start over again: the stop says how to resume instead
    assert "rerun with checkpoint.resume=auto to resume (this command's checkpoint.resume=none" in (
        first_log.read_text()
    )
    steps = [row["step"] for row in read_metrics(run_dir)]
    assert steps == list(range(1, len(steps) + 1)), f"the first run's metrics were disturbed: {steps}"
    state = json.loads((run_dir / "checkpoints" / f"step_{steps[-1]}" / "trainer_state.json").read_text())
    assert state["step"] == steps[-1]
    assert (run_dir / LOCK_FILE).read_text() == "", "released at the end"
    marker = json.loads((run_dir / CLEAN_EXIT_FILE).read_text())
    assert (marker["ended"], marker["step"]) == ("stopped", steps[-1]), marker


def test_workers_stop_when_torchrun_is_killed(corpus, tmp_path):
    run_dir, log = tmp_path / "run", tmp_path / "run.log"
    launcher = start(2, overrides(corpus, run_dir, **LONG), log)
    workers = []
    try:
        wait_for_steps(run_dir, 2, launcher, log)
        workers = children_of(launcher.pid)
        assert len(workers) == 2, workers
        launcher.send_signal(signal.SIGKILL)
        launcher.wait(10)
        killed = time.monotonic()
        while any(running(pid) for pid in workers) and time.monotonic() < killed + 30:
            time.sleep(0.2)
        still = [pid for pid in workers if running(pid)]
        assert not still, f"workers {still} still running 30 s on:\n{log.read_text()[-3000:]}"
    finally:
        launcher.kill()
        for pid in workers:
            if running(pid):
                os.kill(pid, signal.SIGKILL)
    output = log.read_text()
    assert f"its launcher (pid {launcher.pid}) is gone" in output, output[-3000:]
    last = read_metrics(run_dir)[-1]["step"]
    state = json.loads((run_dir / "checkpoints" / f"step_{last}" / "trainer_state.json").read_text())
    assert state["step"] == last, "stopped as for SIGTERM: a checkpoint of the last step"
    lock = lock_run_dir(run_dir)
    assert lock.stale_holder is None, "the workers released the lock on their way out"
    lock.release()


def test_a_stop_request_that_comes_too_late_does_not_stop_the_next_run(corpus, tmp_path):
    """A STOP left by a run that finished anyway (here: one with nothing to train) is spent: the next
    run in the directory, a resume with more steps, must train rather than stop at once."""
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "STOP").touch()
    pretrain(1, overrides(corpus, run_dir, **{"trainer.max_steps": 0}))
    assert not (run_dir / "STOP").exists()
