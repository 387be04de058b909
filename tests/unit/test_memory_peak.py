"""bench/memory_peak.py on hand-made allocation traces (the event dicts of
`torch.cuda.memory._snapshot()["device_traces"]`): the peak, what is live there, and by which source
line of the project."""

from pathlib import Path

from bench.memory_peak import holders, live_at, report, running_peak, site

ROOT = Path("/project")


def frame(path: str, line: int, name: str) -> dict:
    return {"filename": path, "line": line, "name": name}


HEAD = [
    frame("/project/model/ops/cross_entropy.py", 270, "__init__"),
    frame("/project/model/mtp.py", 40, "loss"),
]
LAYER = [
    frame("/usr/lib/python3/torch/nn/functional.py", 10, "linear"),
    frame("/project/model/layer.py", 88, "forward"),
]
TORCH_ONLY = [frame("/usr/lib/python3/torch/autograd/graph.py", 5, "run_backward")]


def alloc(addr: int, mib: int, frames: list[dict]) -> dict:
    return {"action": "alloc", "addr": addr, "size": mib << 20, "frames": frames}


def free(addr: int, mib: int, action: str = "free_requested") -> dict:
    return {"action": action, "addr": addr, "size": mib << 20, "frames": []}


def test_the_peak_counts_blocks_from_allocation_to_free_request():
    trace = [
        alloc(1, 100, LAYER),  # 100
        alloc(2, 50, HEAD),  # 150
        free(9, 40),  # a block allocated before the trace began: not subtracted, 150
        free(1, 100),  # 50
        free(1, 100, "free_completed"),  # completion of the same free: 50
        alloc(3, 90, LAYER),  # 140
        alloc(4, 20, TORCH_ONLY),  # 160: the peak
        free(3, 90),  # 70
        alloc(5, 60, HEAD),  # 130
    ]
    assert running_peak(trace) == (160 << 20, 6)
    assert sorted(e["addr"] for e in live_at(trace, 6)) == [2, 3, 4]
    assert running_peak([free(1, 10)]) == (0, -1)


def test_a_site_is_the_innermost_project_frames_or_else_any_frames():
    assert site(alloc(1, 1, HEAD), ROOT) == "model/ops/cross_entropy.py:270 __init__ < model/mtp.py:40 loss"
    assert site(alloc(1, 1, HEAD), ROOT, depth=1) == "model/ops/cross_entropy.py:270 __init__"
    assert site(alloc(1, 1, LAYER), ROOT) == "model/layer.py:88 forward"  # torch's frame skipped
    assert site(alloc(1, 1, TORCH_ONLY), ROOT) == "graph.py:5 run_backward"
    assert site(alloc(1, 1, []), ROOT) == "no Python frame"
    cpp = [  # autograd's thread with C++ frames (--cpp-stacks): the backward node names the op
        frame("??", 0, "c10::cuda::CUDACachingAllocator::Native::DeviceCachingAllocator::malloc"),
        frame("??", 0, "at::native::empty_cuda"),
        frame("??", 0, "torch::autograd::generated::MmBackward0::apply"),
        frame("??", 0, "torch::autograd::Engine::evaluate_function"),
    ]
    assert site(alloc(1, 1, cpp), ROOT) == "??:0 torch::autograd::generated::MmBackward0::apply"
    venv = [frame("/project/.venv/lib/site-packages/fla/ops/chunk.py", 3, "fwd")]
    assert site(alloc(1, 1, venv), ROOT) == "chunk.py:3 fwd"  # a package installed in the project


def test_holders_group_the_live_blocks_by_site_largest_first():
    live = [alloc(1, 30, LAYER), alloc(2, 50, HEAD), alloc(3, 40, LAYER), alloc(4, 5, TORCH_ONLY)]
    assert holders(live, ROOT, depth=1) == [
        ("model/layer.py:88 forward", 70 << 20, 2),
        ("model/ops/cross_entropy.py:270 __init__", 50 << 20, 1),
        ("graph.py:5 run_backward", 5 << 20, 1),
    ]


def test_the_report_names_the_peak_its_holders_and_the_events_before_it():
    trace = [alloc(1, 100, LAYER), alloc(2, 50, HEAD), free(1, 100), alloc(3, 30, HEAD)]
    text = report(trace, ROOT, top=1, before=1, depth=1)
    assert "peak in the trace: 0.146 GiB at event 2 of 4" in text
    assert "100.0 MiB      1 blocks  model/layer.py:88 forward" in text
    assert "50.0 MiB in 1 other sites" in text
    assert text.splitlines()[-1].split() == [
        "alloc",
        "50.0",
        "MiB",
        "model/ops/cross_entropy.py:270",
        "__init__",
    ]
    assert report([], ROOT) == "no allocation in the trace"
