"""One run per run directory, and no workers outliving their launcher.

Two trainers writing one `run.dir` clobber each other: the second moves metrics.jsonl aside and sets
checkpoints aside while the first keeps writing. So rank 0 takes an exclusive lock on `run.dir/.lock`
before anything is written there and holds it for the run's lifetime; a second run is refused with a
message naming the holder (host, pid, start time), on every rank at once (`hold_run_dir`).

The lock is `fcntl.flock` on that file, which holds JSON {host, pid, started} for the message. The
kernel drops a flock when its holder dies, however it dies, so a lock left by a dead process is
free to take: its file still names the dead holder (a clean exit empties it), and the new holder
says it took over. The file itself is never deleted: unlinking a lock file lets a process that
opened the old file and a process that creates a new one both hold "the" lock.
Across hosts on a shared filesystem: NFSv4 carries flock as a server-side lock, so another host is
refused too, and a crashed host's lock is freed when its client lease expires (about 90 s). Lustre
needs its `flock` mount option (with `localflock` only processes of one host exclude each other);
where the filesystem refuses flock altogether the run goes on unlocked, saying so.

Workers outliving their launcher: torchrun starts each worker in its own session, so a `kill -9` of
torchrun leaves them training and saving into run.dir. `watch_launcher` (under torchrun only) sees
the launcher go and stops the worker the way SIGTERM does: the trainer finishes the step, saves a
checkpoint and exits; before training has started, SIGTERM's default action ends the worker at once.

`run.dir/.clean_exit` is left by a run that ended cleanly (done, or stopped with a checkpoint), for
launch/slurm/pretrain.sbatch: torchrun exits 1 when it was signalled itself even though its
workers saved and exited 0, and the marker tells that apart from a failure.
"""

from __future__ import annotations

import atexit
import contextlib
import errno
import fcntl
import json
import os
import signal
import socket
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

LOCK_FILE = ".lock"
CLEAN_EXIT_FILE = ".clean_exit"  # launch/slurm/pretrain.sbatch reads this name
# errors of a filesystem that does not do flock (Lustre without -o flock, some FUSE mounts)
NO_FLOCK = (errno.ENOLCK, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL)
# a worker whose launcher died gets this long to finish its step and save before it is ended: more
# than a checkpoint takes, less than leaving a hung worker on its GPUs for long
LAUNCHER_GONE_GRACE_S = 120.0


class RunDirInUse(RuntimeError):
    """Another live run holds the run directory's lock (or the lock cannot be taken at all)."""


@dataclass
class RunDirLock:
    """The held lock (rank 0), or a stand-in on the other ranks and where flock is unavailable."""

    path: Path
    fd: int | None = None
    stale_holder: dict | None = None  # what the file said when taken over from a dead holder

    def release(self) -> None:
        """Empties the file (a clean exit leaves no holder named) and drops the lock. Idempotent."""
        if self.fd is None:
            return
        fd, self.fd = self.fd, None
        with contextlib.suppress(OSError):
            os.ftruncate(fd, 0)
        os.close(fd)  # closing drops the flock


def describe(holder: dict) -> str:
    pid, host, started = (holder.get(key, "?") for key in ("pid", "host", "started"))
    return f"pid {pid} on host {host}, started {started}"


def read_holder(fd: int) -> dict | None:
    """The holder the lock file names, None when it is empty (released cleanly) or unreadable."""
    os.lseek(fd, 0, os.SEEK_SET)
    text = os.read(fd, 4096).decode(errors="replace").strip()
    if not text:
        return None
    try:
        holder = json.loads(text)
    except json.JSONDecodeError:
        return {"pid": "?", "host": "?", "started": f"? (unreadable lock file: {text[:80]!r})"}
    return holder if isinstance(holder, dict) else None


def write_holder(fd: int) -> None:
    started = time.strftime("%Y-%m-%d %H:%M:%S %z")
    holder = {"host": socket.gethostname(), "pid": os.getpid(), "started": started}
    os.ftruncate(fd, 0)
    os.pwrite(fd, (json.dumps(holder) + "\n").encode(), 0)
    os.fsync(fd)  # readable by another host as soon as it is refused


def lock_run_dir(run_dir: Path) -> RunDirLock:
    """Take `run_dir/.lock` for this process, or raise RunDirInUse naming the live holder."""
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / LOCK_FILE
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = read_holder(fd) or {}
        os.close(fd)
        raise RunDirInUse(
            f"{run_dir} is in use by another run ({describe(holder)}): two runs on one run.dir would "
            f"overwrite each other's metrics and checkpoints. Wait for it, stop it (touch {run_dir / 'STOP'} "
            "or send it SIGTERM), or pick another run.dir"
        ) from None
    except OSError as error:
        os.close(fd)
        if error.errno in NO_FLOCK:
            return RunDirLock(path)  # the caller says the run is unlocked
        raise
    lock = RunDirLock(path, fd, stale_holder=read_holder(fd))
    write_holder(fd)
    atexit.register(lock.release)  # however the run ends short of its own release (an error, sys.exit)
    return lock


def hold_run_dir(run_dir: Path, is_main: bool) -> RunDirLock:
    """The run directory's lock taken by the main rank, its verdict shared: every rank raises
    RunDirInUse when it is held elsewhere, so they all stop together (the caller prints it once).
    Also clears a clean-exit marker of an earlier run."""
    import torch.distributed as dist

    lock, refusal = RunDirLock(run_dir / LOCK_FILE), None
    if is_main:
        try:
            lock = lock_run_dir(run_dir)
        except RunDirInUse as error:
            refusal = str(error)
        except OSError as error:  # e.g. no permission: the other ranks must hear of it too
            refusal = f"cannot lock the run directory {run_dir}: {error}"
    verdict = [refusal]
    dist.broadcast_object_list(verdict, src=0)
    if verdict[0] is not None:
        raise RunDirInUse(verdict[0])
    if is_main:
        (run_dir / CLEAN_EXIT_FILE).unlink(missing_ok=True)
        if lock.fd is None:
            print(f"pretrain: {run_dir}'s filesystem does not support locks: run unlocked", flush=True)
        elif lock.stale_holder:
            gone = describe(lock.stale_holder)
            print(f"pretrain: took over {run_dir}'s lock from a run that is gone ({gone})", flush=True)
    return lock


def mark_clean_exit(run_dir: Path, step: int, stopped_by: str | None) -> None:
    """Evidence that the run ended cleanly at `step`: "done", or "stopped" with a checkpoint short
    of trainer.max_steps (then the Slurm script requeues, if the time limit was near)."""
    ended = "stopped" if stopped_by else "done"
    record = {"ended": ended, "step": step, "stopped_by": stopped_by, "pid": os.getpid()}
    (run_dir / CLEAN_EXIT_FILE).write_text(json.dumps(record) + "\n")


def launched_by_torchrun() -> bool:
    return "TORCHELASTIC_RUN_ID" in os.environ  # torchrun's agent sets it for its workers


def watch_launcher(
    launcher: int | None = None, interval_s: float = 1.0, grace_s: float = LAUNCHER_GONE_GRACE_S
) -> None:
    """Under torchrun: a daemon thread that stops this worker when its launcher dies. `launcher`: its
    pid as read when the process started (default: the parent's now)."""
    if not launched_by_torchrun():
        return
    launcher = os.getppid() if launcher is None else launcher
    watcher = threading.Thread(
        target=stop_when_orphaned, args=(launcher, interval_s, grace_s), name="launcher-watch", daemon=True
    )
    watcher.start()


def stop_when_orphaned(launcher: int, interval_s: float, grace_s: float) -> None:
    """Polls the parent pid: an orphan is re-parented (to init or a subreaper), so it changes.
    (PR_SET_PDEATHSIG would fire when the launcher's forking *thread* ends, not the launcher.)"""
    while os.getppid() == launcher:
        time.sleep(interval_s)
    rank = os.environ.get("RANK", "?")
    say(f"rank {rank}: its launcher (pid {launcher}) is gone; stopping as for SIGTERM")
    os.kill(os.getpid(), signal.SIGTERM)  # the trainer's graceful stop; before fit, the default: exit
    time.sleep(grace_s)
    say(f"rank {rank}: still running {grace_s:.0f} s after its launcher died; exiting")
    os._exit(1)


def say(text: str) -> None:
    with contextlib.suppress(OSError):  # the launcher held the reading end of a pipe, maybe
        print(f"pretrain: {text}", file=sys.stderr, flush=True)
