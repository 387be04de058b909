"""Run a function on N local CPU processes joined in a gloo process group, for distributed tests.

`run_on_ranks(fn, world_size, tmp_path, *args)` spawns the processes, calls `fn(rank, world_size,
*args)` in each after `init_process_group("gloo")`, and returns the ranks' return values (through
`torch.save` files in tmp_path). `fn` must be importable by name (a module-level function of a test
module) because the processes are spawned, not forked: a fork would copy the parent's torch threads
and state. Never hangs: collectives time out, and so does the wait for the processes, which are
killed if they overrun; a rank's exception comes back as the test's failure, with its traceback.

The rendezvous store is hosted by the calling process on a port the system picks as it binds, and
the ranks join it as clients. Choosing a free port first and binding it later in rank 0 raced: under
`pytest -n 2` the other worker's gloo connections took such a port in between (EADDRINUSE in CI).
"""

from __future__ import annotations

import os
import sys
import time
import traceback
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

TIMEOUT = timedelta(seconds=60)  # a collective or the rendezvous that waits longer has hung


def torchrun(nproc: int) -> list[str]:
    """torchrun on this machine, for tests that start it; `--standalone` lets its rendezvous bind a
    port the system picks (a port chosen beforehand could be taken before it is bound, as above)."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc)]


def _rank_main(fn, rank: int, world_size: int, port: int, out_dir: str, args: tuple) -> None:
    torch.set_num_threads(1)  # N processes share the machine's few cores
    out = Path(out_dir)
    try:
        store = dist.TCPStore("127.0.0.1", port, is_master=False, timeout=TIMEOUT)
        dist.init_process_group("gloo", store=store, rank=rank, world_size=world_size, timeout=TIMEOUT)
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
    store = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False, timeout=TIMEOUT)
    procs = [
        context.Process(target=_rank_main, args=(fn, rank, world_size, store.port, str(out_dir), args))
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
        del store  # the ranks are gone; the port goes with it
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
