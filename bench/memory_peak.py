"""What holds GPU memory at a run's peak: the allocations live at the moment of most allocated bytes,
grouped by the project source line that made them.

    python -m bench.memory_peak --preset 80b_a3b-slice --steps 1 --warmup 1 trainer.recompute_layers=1

It takes `launch/bench.py layout`'s arguments and runs that benchmark while torch records every
allocation with its Python stack (`torch.cuda.memory._record_memory_history`), then prints:
- the trace's peak of allocated bytes (the whole run's: compare `peak_mem_all_gib` in the JSON of
  `--out`; a trace peak below it means the trace dropped early events, and `--max-entries` keeps
  more);
- the allocations live at that peak by site, largest first: a site is the innermost frames in this
  repository (model/, parallel/, train/, ...), or the innermost frames of any file when none is.
  Backward runs on autograd's C++ thread: its allocations have Python frames only inside a Python
  `autograd.Function` or a compiled graph's backward, and the others come under "no Python frame"
  unless `--cpp-stacks` records C++ frames too (slower);
- the allocations and frees just before the peak, which name the moment it was reached.

A block counts from its allocation to its free request (the allocator holds a block freed while
another stream still uses it a little longer). Recomputation and memory work want the sites, not
the total: the dry run's estimate (train/memory.py) says how much, this says what. Needs CUDA; the
analysis takes the snapshot's trace (a list of event dicts) and runs anywhere.

On the 80B slice (torch 2.11) recording history made backward fail inside a recomputed layer's
compiled graph ("returned NULL without setting an exception"); bench/memory_phases.py finds the
peak's phase there instead, from the allocator's peaks between marks, without recording anything.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections import defaultdict
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
GiB = 2**30


def replay(trace: list[dict]):
    """After each event of the trace: (its index, the live allocation events by address, their bytes).
    A block counts from its allocation to its free request; a free of a block allocated before the
    trace began is not counted. The dict is the same object throughout, updated in place."""
    live: dict[int, dict] = {}
    total = 0
    for index, event in enumerate(trace):
        if event["action"] == "alloc":
            live[event["addr"]] = event
            total += event["size"]
        elif event["action"] == "free_requested" and event["addr"] in live:
            total -= live.pop(event["addr"])["size"]
        yield index, live, total


def running_peak(trace: list[dict]) -> tuple[int, int]:
    """(most bytes allocated at once, index of the event that reached it; -1 when none did)."""
    peak, at = 0, -1
    for index, _, total in replay(trace):
        if total > peak:
            peak, at = total, index
    return peak, at


def live_at(trace: list[dict], index: int) -> list[dict]:
    """The allocation events whose blocks are live just after `trace[index]`."""
    for at, live, _ in replay(trace):
        if at == index:
            return list(live.values())
    return []


def site(event: dict, root: Path = REPO, depth: int = 3) -> str:
    """Where `event` happened: its innermost `depth` frames in files under `root`, innermost first;
    when none is under it, the innermost backward node among C++ frames (`...Backward0::apply`), or
    else the innermost two frames of any file."""
    frames = event.get("frames") or []
    ours = [f for f in frames if _under(f["filename"], root)]
    backward = [f for f in frames if "Backward" in f["name"]]
    chosen = ours[:depth] or backward[:1] or frames[:2]
    return " < ".join(_frame(f, root) for f in chosen) or "no Python frame"


def _under(filename: str, root: Path) -> bool:
    return filename.startswith(str(root) + os.sep) and f"{os.sep}.venv{os.sep}" not in filename


def _frame(frame: dict, root: Path) -> str:
    name = frame["filename"]
    shown = os.path.relpath(name, root) if _under(name, root) else Path(name).name
    return f"{shown}:{frame['line']} {frame['name']}"


def holders(live: list[dict], root: Path = REPO, depth: int = 3) -> list[tuple[str, int, int]]:
    """(site, bytes, blocks) of the live allocations, the largest sites first."""
    by_site: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    for event in live:
        entry = by_site[site(event, root, depth)]
        entry[0] += event["size"]
        entry[1] += 1
    return sorted(((s, b, n) for s, (b, n) in by_site.items()), key=lambda row: -row[1])


def report(trace: list[dict], root: Path = REPO, top: int = 30, before: int = 12, depth: int = 3) -> str:
    """The peak, what is live there by site, and the events leading to it, as text."""
    peak, at = running_peak(trace)
    if at < 0:
        return "no allocation in the trace"
    rows = holders(live_at(trace, at), root, depth)
    lines = [
        f"peak in the trace: {peak / GiB:.3f} GiB at event {at + 1} of {len(trace)}",
        "",
        "live at the peak:",
    ]
    lines += [f"{b / 2**20:10.1f} MiB {n:6d} blocks  {s}" for s, b, n in rows[:top]]
    rest = rows[top:]
    if rest:
        lines.append(f"{sum(b for _, b, _ in rest) / 2**20:10.1f} MiB in {len(rest)} other sites")
    lines += ["", "events up to the peak:"]
    for event in trace[max(0, at - before) : at + 1]:
        lines.append(f"  {event['action']:15s} {event['size'] / 2**20:9.1f} MiB  {site(event, root, depth)}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    import torch

    parser = argparse.ArgumentParser(
        prog="python -m bench.memory_peak", description=__doc__.splitlines()[0], allow_abbrev=False
    )
    parser.add_argument("--top", type=int, default=30, help="sites listed (default 30)")
    parser.add_argument("--depth", type=int, default=3, help="project frames a site names (default 3)")
    parser.add_argument("--max-entries", type=int, default=1_000_000, help="events the trace keeps")
    parser.add_argument("--cpp-stacks", action="store_true", help="record C++ frames too (backward's sites)")
    args, layout_argv = parser.parse_known_args(argv)
    if not torch.cuda.is_available():
        sys.exit("bench.memory_peak: needs CUDA (torch records allocation history on GPUs only)")
    from bench import layout

    stacks = "all" if args.cpp_stacks else "python"
    torch.cuda.memory._record_memory_history(max_entries=args.max_entries, stacks=stacks)
    try:
        layout.main(layout_argv)
        trace = torch.cuda.memory._snapshot()["device_traces"][torch.cuda.current_device()]
    finally:
        torch.cuda.memory._record_memory_history(enabled=None)
    print(report(trace, top=args.top, depth=args.depth))


if __name__ == "__main__":
    main()
