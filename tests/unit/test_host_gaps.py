"""bench/host_gaps.py: idle stretches of the GPU and the host op that ended each."""

import random

import pytest

from bench.host_gaps import find_gaps, host_syncs, idle_gaps


def idle_runs_on_a_grid(busy, step=0.5):
    """Independent count: walk a fine grid and collect the maximal runs no interval covers."""
    lo, hi = min(a for a, _ in busy), max(b for _, b in busy)
    runs, start, t = [], None, lo
    while t < hi:
        covered = any(a <= t < b for a, b in busy)
        if not covered and start is None:
            start = t
        if covered and start is not None:
            runs.append((start, t))
            start = None
        t += step
    return runs


@pytest.mark.parametrize("seed", range(5))
def test_idle_gaps_match_a_grid_walk(seed):
    rng = random.Random(seed)
    busy = []
    for _ in range(40):  # two streams' worth of overlapping kernels, on a half-microsecond grid
        start = rng.randrange(0, 800) / 2
        busy.append((start, start + rng.randrange(1, 40) / 2))
    expected = [run for run in idle_runs_on_a_grid(busy) if run[1] - run[0] >= 3.0]
    assert idle_gaps(busy, min_us=3.0) == expected  # every time is a multiple of 0.5: exact


def kernel(ts, dur, correlation):
    return {
        "ph": "X",
        "cat": "kernel",
        "name": f"k{correlation}",
        "ts": ts,
        "dur": dur,
        "args": {"correlation": correlation},
    }


def launch(ts, correlation, tid=1):
    args = {"correlation": correlation}
    return {
        "ph": "X",
        "cat": "cuda_runtime",
        "name": "cudaLaunchKernel",
        "ts": ts,
        "dur": 2,
        "pid": 0,
        "tid": tid,
        "args": args,
    }


def op(name, ts, dur, tid=1, cat="cpu_op"):
    return {"ph": "X", "cat": cat, "name": name, "ts": ts, "dur": dur, "pid": 0, "tid": tid}


def test_a_gap_is_charged_to_the_op_that_launched_the_next_kernel():
    events = [
        op("## forward ##", 0, 100, cat="user_annotation"),
        op("aten::mm", 1, 5),
        launch(2, correlation=1),
        kernel(10, 20, 1),  # busy 10-30
        op("aten::add", 60, 5),
        launch(61, correlation=2),  # launched after the GPU ran dry at 30: host-bound
        kernel(63, 10, 2),
        launch(70, correlation=3, tid=2),  # queued while k2 ran, started late: not host-bound
        op("autograd::engine::evaluate_function: MmBackward0", 69, 5, tid=2),
        kernel(90, 5, 3),
    ]
    gaps = find_gaps(events, min_us=10)
    assert [(g.start, g.end) for g in gaps] == [(30, 63), (73, 90)]
    first, second = gaps
    assert (first.op, first.outer, first.host_bound) == ("aten::add", "## forward ##", True)
    assert (second.op, second.host_bound) == ("autograd::engine::evaluate_function: MmBackward0", False)


def test_host_syncs_name_their_caller_and_skip_async_copies():
    events = [
        op("aten::item", 0, 50),
        {
            "ph": "X",
            "cat": "cuda_runtime",
            "name": "cudaStreamSynchronize",
            "ts": 1,
            "dur": 40,
            "pid": 0,
            "tid": 1,
        },
        op("aten::copy_", 60, 10),
        {"ph": "X", "cat": "cuda_runtime", "name": "cudaMemcpyAsync", "ts": 61, "dur": 3, "pid": 0, "tid": 1},
    ]
    assert host_syncs(events) == [("cudaStreamSynchronize", "aten::item", 40)]
