"""Where the GPU waits for the host in a profiled step, from its Chrome trace.

    python -m bench.host_gaps trace.json[.gz]     # a trace from torch.profiler's export_chrome_trace

The GPU is idle between kernels when the host has not launched the next one yet (Python, dispatch,
a hook, a launch-bound stretch of small kernels) or when it waited for the GPU to drain (a host
sync: the queue empties and refills only as fast as the host launches). This reads the trace's GPU
activity (kernels, copies, memsets on any stream), finds the idle stretches of at least
`--min-us`, and attributes each to the CPU op that launched the kernel ending it: its own name and
the outermost op or annotation around it (e.g. `## forward ##`, `Optimizer.step`, the autograd
node). Host syncs (cudaStreamSynchronize, cudaDeviceSynchronize, cudaEventSynchronize, blocking
copies) are listed with the op that made them.

A gap is "host-bound" when the kernel after it was launched after the gap began: the GPU had
nothing queued. The rest (launched before, started late) are waits on other streams or events.
"""

from __future__ import annotations

import argparse
import bisect
import gzip
import itertools
import json
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

from bench.layout import merged

GPU_CATEGORIES = {"kernel", "gpu_memcpy", "gpu_memset"}
SYNC_CALLS = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize", "cudaMemcpy")


@dataclass(frozen=True)
class Span:
    start: float  # microseconds
    end: float
    name: str


@dataclass(frozen=True)
class Gap:
    start: float
    end: float
    launched_at: float | None  # when the host launched the kernel that ends the gap
    op: str  # the innermost CPU op around that launch
    outer: str  # the outermost CPU op or annotation around it

    @property
    def us(self) -> float:
        return self.end - self.start

    @property
    def host_bound(self) -> bool:
        return self.launched_at is not None and self.launched_at > self.start


def load_trace(path: Path) -> list[dict]:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt") as f:
        data = json.load(f)
    return [e for e in data.get("traceEvents", data) if e.get("ph") == "X"]


def idle_gaps(busy: list[tuple[float, float]], min_us: float) -> list[tuple[float, float]]:
    """The stretches of at least min_us between the union of [start, end) intervals."""
    union = merged(busy)
    return [(end, start) for (_, end), (start, _) in itertools.pairwise(union) if start - end >= min_us]


class CpuOps:
    """The CPU ops of each host thread, to find which ones enclose a moment."""

    def __init__(self, events: list[dict]):
        self.by_thread: dict[tuple, list[Span]] = defaultdict(list)
        for e in events:
            if e.get("cat") in ("cpu_op", "user_annotation", "python_function"):
                key = (e.get("pid"), e.get("tid"))
                self.by_thread[key].append(Span(e["ts"], e["ts"] + e.get("dur", 0), e["name"]))
        for spans in self.by_thread.values():
            spans.sort(key=lambda s: (s.start, -s.end))
        self.starts = {key: [s.start for s in spans] for key, spans in self.by_thread.items()}

    def around(self, thread: tuple, at: float) -> list[Span]:
        """The ops on `thread` running at `at`, outermost first."""
        spans = self.by_thread.get(thread, [])
        last = bisect.bisect_right(self.starts.get(thread, []), at)
        return [s for s in spans[:last] if s.end >= at]

    def innermost(self, call: dict, default: str = "?") -> str:
        """The innermost op around a CUDA runtime call (runtime calls themselves skipped)."""
        stack = self.around((call.get("pid"), call.get("tid")), call["ts"])
        return next((s.name for s in reversed(stack) if not s.name.startswith("cuda")), default)


def find_gaps(events: list[dict], min_us: float = 10.0, ops: CpuOps | None = None) -> list[Gap]:
    gpu = [e for e in events if e.get("cat") in GPU_CATEGORIES]
    launches = {
        e["args"]["correlation"]: e
        for e in events
        if e.get("cat") in ("cuda_runtime", "cuda_driver") and "correlation" in e.get("args", {})
    }
    ops = ops or CpuOps(events)
    starts = sorted((e["ts"], e) for e in gpu)
    start_times = [ts for ts, _ in starts]
    gaps = []
    for begin, end in idle_gaps([(e["ts"], e["ts"] + e.get("dur", 0)) for e in gpu], min_us):
        nxt = starts[bisect.bisect_left(start_times, end)][1]
        launch = launches.get(nxt.get("args", {}).get("correlation"))
        if launch is None:
            gaps.append(Gap(begin, end, None, "?", "?"))
            continue
        stack = ops.around((launch.get("pid"), launch.get("tid")), launch["ts"])
        inner = ops.innermost(launch, default=launch["name"])
        gaps.append(Gap(begin, end, launch["ts"], inner, stack[0].name if stack else "?"))
    return gaps


def host_syncs(events: list[dict], ops: CpuOps | None = None) -> list[tuple[str, str, float]]:
    """(sync call, the op around it, microseconds waited), in trace order."""
    ops = ops or CpuOps(events)
    found = []
    for e in sorted(events, key=lambda e: e["ts"]):
        if e.get("cat") in ("cuda_runtime", "cuda_driver") and e["name"].startswith(SYNC_CALLS):
            if e["name"].startswith("cudaMemcpy") and "Async" in e["name"]:
                continue
            found.append((e["name"], ops.innermost(e), e.get("dur", 0.0)))
    return found


def summarize(timed: list[tuple[str, float]]) -> list[tuple[str, int, float]]:
    """(label, count, total us) per label of (label, us) pairs, largest total first."""
    totals: dict[str, list] = defaultdict(lambda: [0, 0.0])
    for label, us in timed:
        totals[label][0] += 1
        totals[label][1] += us
    return sorted(((k, n, us) for k, (n, us) in totals.items()), key=lambda row: -row[2])


def table(rows: list[tuple[str, int, float]]) -> list[str]:
    return [f"  {label[:70]:<70} {n:>6} {us / 1e3:>8.2f}" for label, n, us in rows]


def report(events: list[dict], min_us: float = 10.0, top: int = 12) -> str:
    gpu = [e for e in events if e.get("cat") in GPU_CATEGORIES]
    if not gpu:
        return "no GPU activity in the trace"
    span = max(e["ts"] + e.get("dur", 0) for e in gpu) - min(e["ts"] for e in gpu)
    ops = CpuOps(events)
    gaps = find_gaps(events, min_us, ops)
    bound = [g for g in gaps if g.host_bound]
    lines = [
        f"GPU span {span / 1e3:.1f} ms; idle in {len(gaps)} gaps of >= {min_us:g} us: "
        f"{sum(g.us for g in gaps) / 1e3:.1f} ms, of which host-bound (next kernel launched after the "
        f"GPU ran dry) {sum(g.us for g in bound) / 1e3:.1f} ms in {len(bound)} gaps",
        "host-bound gaps by the outermost op around the launch that ended them (count, ms):",
    ]
    lines += table(summarize([(g.outer, g.us) for g in bound])[:top])
    lines.append("host-bound gaps by the op that launched the next kernel (count, ms):")
    lines += table(summarize([(g.op, g.us) for g in bound])[:top])
    syncs = host_syncs(events, ops)
    lines.append(f"host syncs: {len(syncs)}, waiting {sum(us for *_, us in syncs) / 1e3:.1f} ms")
    lines += table(summarize([(f"{call} in {caller}", us) for call, caller, us in syncs])[:top])
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.host_gaps", description=__doc__.splitlines()[0])
    parser.add_argument("trace", type=Path, help="Chrome trace JSON (.json or .json.gz)")
    parser.add_argument("--min-us", type=float, default=10.0, help="shortest idle stretch counted")
    parser.add_argument("--top", type=int, default=12)
    args = parser.parse_args(argv)
    print(report(load_trace(args.trace), args.min_us, args.top))


if __name__ == "__main__":
    main()
