"""Gated delta rule kernels at the 80B-A3B's head shape: speed, and agreement with the reference.

    python bench/deltanet_kernels.py                          # model.ops' path (the installed fla)
    python bench/deltanet_kernels.py --backend fla-gva        # fla called with grouped value heads
    python bench/deltanet_kernels.py --backend flash-qla      # Qwen's TileLang kernels (Hopper)

Each backend runs in its own process, so that two fla versions can be compared by changing
PYTHONPATH between runs. The inputs are what a Gated DeltaNet layer of the 80B-A3B passes in
training: 16 q/k heads, 32 value heads, head dims 128, q and k L2-normalised inside the kernel,
8192 tokens packed into one row (`cu_seqlens`), no initial or final state. Two document layouts:
two 4096-token sequences (the benchmark's rows) and uneven documents (real packed data).

Several runs can share one GPU (`--sync-dir`, `--expect`): each compiles (fla autotunes) alongside
the others, marks itself ready, waits for the rest, then times while holding a lock, so no
measurement overlaps another process's GPU work. Printed per case: forward and forward + backward
milliseconds (CUDA events, median of --iters after --warmup), and the relative RMS error
||x - ref|| / ||ref|| of o and of every input gradient against `chunk_gated_delta_rule_reference`
run in fp32 on the same (bf16) values.
"""

from __future__ import annotations

import argparse
import fcntl
import json
import statistics
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from model.ops.gated_delta_rule import chunk_gated_delta_rule, chunk_gated_delta_rule_reference

H, HV, DK, DV = 16, 32, 128, 128  # the 80B-A3B's linear_num_key_heads, _value_heads, head dims
TOKENS = 8192
LAYOUTS = {"two_rows": [4096, 4096], "uneven_docs": [301, 1873, 96, 2500, 777, 1024, 1621]}
GRADIENTS = ("q", "k", "v", "g", "beta")


def make_inputs(seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator(device="cuda").manual_seed(seed)
    randn = lambda *shape: torch.randn(*shape, generator=gen, device="cuda")
    rate_hv = torch.logspace(-2, 0, HV, device="cuda")  # long- and short-memory heads
    return dict(
        q=randn(1, TOKENS, H, DK).bfloat16(),
        k=randn(1, TOKENS, H, DK).bfloat16(),
        v=randn(1, TOKENS, HV, DV).bfloat16(),
        g=-F.softplus(randn(1, TOKENS, HV)) * rate_hv,
        beta=torch.sigmoid(randn(1, TOKENS, HV)).bfloat16(),
    )


def cumulative(lengths: list[int]) -> torch.Tensor:
    assert sum(lengths) == TOKENS, lengths
    return torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int64)


def backend_fn(name: str):
    """fn(q, k, v, g, beta, cu_seqlens, cu_seqlens_cpu) -> o for the named backend."""
    if name == "model":
        return lambda q, k, v, g, beta, cu, cu_cpu: chunk_gated_delta_rule(
            q, k, v, g, beta, use_qk_l2norm=True, cu_seqlens=cu, cu_seqlens_cpu=cu_cpu
        )[0]
    if name == "fla-gva":
        from fla.ops.gated_delta_rule import chunk_gated_delta_rule as fla_kernel

        return lambda q, k, v, g, beta, cu, cu_cpu: fla_kernel(
            q, k, v, g, beta, use_qk_l2norm_in_kernel=True, cu_seqlens=cu
        )[0]
    if name == "flash-qla":
        from flash_qla import chunk_gated_delta_rule as qla_kernel

        return lambda q, k, v, g, beta, cu, cu_cpu: qla_kernel(
            q, k, v, g, beta, use_qk_l2norm_in_kernel=True, cu_seqlens=cu
        )[0]
    raise ValueError(f"unknown backend {name!r}")


def reference_fn(q, k, v, g, beta, cu, cu_cpu):
    return chunk_gated_delta_rule_reference(q, k, v, g, beta, use_qk_l2norm=True, cu_seqlens=cu)[0]


def forward_backward(fn, inputs, upstream_o, cu, cu_cpu, dtype=None) -> dict[str, torch.Tensor]:
    leaves = {n: (x if dtype is None else x.to(dtype)).detach().requires_grad_() for n, x in inputs.items()}
    o = fn(*(leaves[n] for n in GRADIENTS), cu, cu_cpu)
    (o.float() * upstream_o).sum().backward()
    return {"o": o.detach(), **{n: leaves[n].grad for n in GRADIENTS}}


def rel_rms(actual: torch.Tensor, expected: torch.Tensor) -> float:
    actual, expected = actual.float(), expected.float()
    return ((actual - expected).norm() / expected.norm()).item()


def median_ms(run, warmup: int, iters: int) -> float:
    for _ in range(warmup):
        run()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        run()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def prepare(backend: str, layout: str) -> dict:
    """Inputs, the backend's first run (its compilation) and its errors against the reference."""
    fn = backend_fn(backend)
    inputs = make_inputs()
    upstream_gen = torch.Generator("cuda").manual_seed(1)
    upstream_o = torch.randn(1, TOKENS, HV, DV, device="cuda", generator=upstream_gen)
    cu_cpu = cumulative(LAYOUTS[layout])
    cu = cu_cpu.cuda()
    ours = forward_backward(fn, inputs, upstream_o, cu, cu_cpu)
    ref = forward_backward(reference_fn, inputs, upstream_o, cu, cu_cpu, dtype=torch.float32)
    return dict(
        fn=fn,
        inputs=inputs,
        upstream_o=upstream_o,
        cu=cu,
        cu_cpu=cu_cpu,
        errors={name: rel_rms(ours[name], ref[name]) for name in ref},
        finite=all(bool(torch.isfinite(x).all()) for x in ours.values()),
    )


def time_case(case: dict, warmup: int, iters: int) -> dict[str, float]:
    fn, inputs, upstream_o, cu, cu_cpu = (case[n] for n in ("fn", "inputs", "upstream_o", "cu", "cu_cpu"))
    leaves = {n: x.detach().requires_grad_() for n, x in inputs.items()}

    def forward():
        with torch.no_grad():
            fn(*(inputs[n] for n in GRADIENTS), cu, cu_cpu)

    def step():
        (fn(*(leaves[n] for n in GRADIENTS), cu, cu_cpu).float() * upstream_o).sum().backward()

    return {
        "forward_ms": median_ms(forward, warmup, iters),
        "forward_backward_ms": median_ms(step, warmup, iters),
    }


def wait_for_others(sync_dir: Path | None, tag: str, expect: int, timeout_s: float) -> None:
    """Mark this run ready (compiled) and wait until `expect` runs are, or the timeout passes."""
    if sync_dir is None:
        return
    sync_dir.mkdir(parents=True, exist_ok=True)
    (sync_dir / f"{tag}.ready").touch()
    deadline = time.monotonic() + timeout_s
    while len(list(sync_dir.glob("*.ready"))) < expect and time.monotonic() < deadline:
        time.sleep(1)


@contextmanager
def gpu_to_myself(sync_dir: Path | None):
    if sync_dir is None:
        yield
        return
    with (sync_dir / "timing.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def versions() -> dict[str, str]:
    found = {"torch": torch.__version__}
    for package in ("fla", "flash_qla", "tilelang", "triton"):
        try:
            found[package] = __import__(package).__version__
        except Exception:  # absent or broken: reported as such
            found[package] = "absent"
    return found


def main() -> int:
    formatter = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=formatter)
    parser.add_argument("--backend", default="model", choices=("model", "fla-gva", "flash-qla"))
    parser.add_argument("--tag", default=None, help="this run's name in the output (default: the backend)")
    parser.add_argument("--layouts", nargs="+", default=list(LAYOUTS), choices=list(LAYOUTS))
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--out", type=Path, default=None, help="append one JSON line per layout")
    parser.add_argument("--sync-dir", type=Path, default=None, help="shared by runs on one GPU")
    parser.add_argument("--expect", type=int, default=1, help="runs (ready files) to wait for")
    parser.add_argument("--sync-timeout", type=float, default=300.0)
    args = parser.parse_args()
    tag = args.tag or args.backend
    if not torch.cuda.is_available():
        sys.exit("bench/deltanet_kernels.py needs a CUDA GPU")
    found = versions()
    print(f"{tag} ({args.backend}) on {torch.cuda.get_device_name()}: {found}", flush=True)
    try:
        cases = {layout: prepare(args.backend, layout) for layout in args.layouts}
    finally:  # a run that failed must not hold the others back
        wait_for_others(args.sync_dir, tag, args.expect, args.sync_timeout)
    with gpu_to_myself(args.sync_dir):
        for layout, case in cases.items():
            result = {
                "tag": tag,
                "backend": args.backend,
                "layout": layout,
                **time_case(case, args.warmup, args.iters),
            }
            result.update(rel_rms_error=case["errors"], finite=case["finite"], versions=found)
            result["gpu"] = torch.cuda.get_device_name()
            worst = max(result["rel_rms_error"], key=result["rel_rms_error"].get)
            print(
                f"  {tag} {layout:12s} forward {result['forward_ms']:7.3f} ms   forward+backward "
                f"{result['forward_backward_ms']:7.3f} ms   worst rel. RMS error {worst} "
                f"{result['rel_rms_error'][worst]:.2e}   finite {result['finite']}",
                flush=True,
            )
            if args.out:
                with args.out.open("a") as out:
                    out.write(json.dumps(result) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
