"""Run a function on N local CPU processes joined in a gloo process group, for distributed tests.

`run_on_ranks(fn, world_size, tmp_path, *args)` spawns the processes, calls `fn(rank, world_size,
*args)` in each after `init_process_group("gloo")`, and returns the ranks' return values (through
`torch.save` files in tmp_path). `fn` must be importable by name (a module-level function of a test
module) because the processes are spawned, not forked: a fork would copy the parent's torch threads
and state. Never hangs: collectives time out, and so does the wait for the processes, which are
killed if they overrun; a rank's exception comes back as the test's failure, with its traceback.
"""

from __future__ import annotations

import os
import socket
import time
import traceback
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _rank_main(fn, rank: int, world_size: int, port: int, out_dir: str, args: tuple) -> None:
    torch.set_num_threads(1)  # N processes share the machine's few cores
    out = Path(out_dir)
    try:
        dist.init_process_group(
            "gloo",
            init_method=f"tcp://127.0.0.1:{port}",
            rank=rank,
            world_size=world_size,
            timeout=timedelta(seconds=60),
        )
        try:
            result = fn(rank, world_size, *args)
            torch.save(result, out / f"rank{rank}.pt.part")
            os.replace(out / f"rank{rank}.pt.part", out / f"rank{rank}.pt")  # whole, or not there
        finally:
            dist.destroy_process_group()
    except BaseException:
        (out / f"rank{rank}.error").write_text(traceback.format_exc())
        raise


def run_on_ranks(fn, world_size: int, tmp_path: Path, *args, timeout: float = 120.0) -> list:
    """fn(rank, world_size, *args) on `world_size` gloo ranks; their return values, by rank."""
    out_dir = Path(tmp_path) / f"ranks-{fn.__name__}"
    out_dir.mkdir(parents=True, exist_ok=True)
    context = mp.get_context("spawn")
    port = free_port()
    procs = [
        context.Process(target=_rank_main, args=(fn, rank, world_size, port, str(out_dir), args))
        for rank in range(world_size)
    ]
    for proc in procs:
        proc.start()
    try:
        _join_all(procs, timeout)
    finally:
        for proc in procs:
            if proc.is_alive():
                proc.kill()
                proc.join(5)
    errors = [
        f"rank {r}:\n{p.read_text()}" for r in range(world_size) if (p := out_dir / f"rank{r}.error").exists()
    ]
    if errors:
        raise RuntimeError("a rank failed\n" + "\n".join(errors))
    failed = [(r, p.exitcode) for r, p in enumerate(procs) if p.exitcode != 0]
    handed_in = all((out_dir / f"rank{r}.pt").exists() for r in range(world_size))
    # A rank that dies after handing in its result died in teardown: on the loaded 2-core CI machine
    # gloo's threads were seen to abort the process at exit ("terminate called without an active
    # exception", -6) once every rank had saved its result; what fn computed is whole, so that is not
    # the test's failure. A rank that dies before handing in is.
    if failed and not handed_in:
        raise RuntimeError(f"ranks exited abnormally (rank, exit code): {failed}")
    return [torch.load(out_dir / f"rank{r}.pt", weights_only=False) for r in range(world_size)]


def _join_all(procs, timeout: float) -> None:
    """Wait for every process; stop early when one fails (the others may wait on it in a collective)."""
    deadline = time.monotonic() + timeout
    while any(proc.is_alive() for proc in procs):
        if any(proc.exitcode not in (None, 0) for proc in procs):
            return
        if time.monotonic() > deadline:
            raise TimeoutError(f"ranks still running after {timeout:.0f} s")
        time.sleep(0.05)
