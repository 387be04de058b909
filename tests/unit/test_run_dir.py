"""The run directory's lock (train/run_dir.py): held by another live process it refuses, naming the
holder's host and pid; a lock file left by a dead process is taken over; a clean exit releases it."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from train.run_dir import LOCK_FILE, RunDirInUse, lock_run_dir

REPO = Path(__file__).resolve().parents[2]

HOLDER = """
import sys
from pathlib import Path
from train.run_dir import lock_run_dir
lock_run_dir(Path(sys.argv[1]))
print("locked", flush=True)
sys.stdin.read()  # holds the lock until the test closes stdin
"""


def start_holder(run_dir: Path) -> subprocess.Popen:
    """A live process holding run_dir's lock, once this returns."""
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(run_dir)],
        cwd=REPO,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert holder.stdout.readline().strip() == "locked"
    return holder


def test_a_lock_held_by_a_live_process_is_refused_naming_its_host_and_pid(tmp_path):
    holder = start_holder(tmp_path / "run")
    try:
        with pytest.raises(RunDirInUse) as refused:
            lock_run_dir(tmp_path / "run")
        assert f"pid {holder.pid} on host {socket.gethostname()}" in str(refused.value)
        assert "in use by another run" in str(refused.value)
    finally:
        holder.stdin.close()
        holder.wait(10)


def test_a_clean_exit_releases_the_lock(tmp_path):
    holder = start_holder(tmp_path / "run")
    holder.stdin.close()
    assert holder.wait(10) == 0
    assert (tmp_path / "run" / LOCK_FILE).read_text() == "", "a clean exit names no holder"
    lock = lock_run_dir(tmp_path / "run")
    assert lock.stale_holder is None
    lock.release()


def test_a_lock_left_by_a_dead_process_is_taken_over(tmp_path):
    holder = start_holder(tmp_path / "run")
    holder.kill()  # no clean exit: the file still names it, but the kernel dropped its flock
    holder.wait(10)
    assert json.loads((tmp_path / "run" / LOCK_FILE).read_text())["pid"] == holder.pid

    lock = lock_run_dir(tmp_path / "run")
    assert lock.stale_holder["pid"] == holder.pid
    assert json.loads((tmp_path / "run" / LOCK_FILE).read_text())["pid"] != holder.pid
    lock.release()


def test_a_stale_lock_file_of_a_dead_pid_is_taken_over(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    ended = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True)
    stale = {"host": socket.gethostname(), "pid": int(ended.stdout), "started": "yesterday"}
    (run_dir / LOCK_FILE).write_text(json.dumps(stale))
    lock = lock_run_dir(run_dir)
    assert lock.stale_holder == stale
    lock.release()


def test_one_process_cannot_take_the_lock_twice_until_it_releases(tmp_path):
    first = lock_run_dir(tmp_path)
    with pytest.raises(RunDirInUse):
        lock_run_dir(tmp_path)
    first.release()
    first.release()  # idempotent
    lock_run_dir(tmp_path).release()
