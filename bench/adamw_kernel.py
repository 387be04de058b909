"""The one-pass AdamW kernel (model/ops/adamw.py) against the memory bandwidth, on one flat partition.

    python -m bench.adamw_kernel [--params 1073741824] [--reps 10]

What the slice benchmark's optimizer step does for each flat fp32 partition, on --params parameters
(default 2^30: 32 GB of state moved a step): the kernel at several block sizes and warp counts, the
same arithmetic in fp32 instead of the kernel's fp64 (the variant it does not ship: it would part
from torch's fused AdamW by a rounding now and then), and as peers in the same process torch's fused
AdamW (28 bytes a parameter: it does not write the bf16 weights) and two plain copies that show
what the GPU's memory moves (an fp32 copy, 8 bytes an element; an fp32 add, 12). Printed: the mean
milliseconds of --reps back-to-back calls (CUDA events, one warm-up call first) and the bytes moved
per second.
"""

from __future__ import annotations

import argparse

import torch

import model.ops.adamw as adamw
from model.ops.triton_support import LAUNCH_OPTIONS

BYTES_A_PARAMETER = 30  # read grad, weight and both moments (fp32); write those three and the bf16 weight


def mean_ms(run, reps: int) -> float:
    run()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        run()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / reps


def fp32_arithmetic_kernel():
    """The kernel of model/ops/adamw.py with every operation in fp32 (measured, not shipped)."""
    import triton
    import triton.language as tl

    @triton.jit
    def adamw_fp32(param_ptr, grad_ptr, exp_avg_ptr, exp_avg_sq_ptr, bf16_ptr, n, hyper_ptr, found_inf_ptr,
                   BLOCK: tl.constexpr):  # fmt: skip
        if tl.load(found_inf_ptr) != 0:
            return
        decay, beta1 = tl.load(hyper_ptr).to(tl.float32), tl.load(hyper_ptr + 1).to(tl.float32)
        beta2, eps = tl.load(hyper_ptr + 2).to(tl.float32), tl.load(hyper_ptr + 3).to(tl.float32)
        grad_scale, bias_correction2_sqrt = tl.load(hyper_ptr + 4).to(tl.float32), tl.load(hyper_ptr + 5)
        step_size = tl.load(hyper_ptr + 6).to(tl.float32)
        offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offsets < n
        grad = tl.load(grad_ptr + offsets, mask=mask) / grad_scale
        param = tl.load(param_ptr + offsets, mask=mask)
        param = param - decay * param
        exp_avg = beta1 * tl.load(exp_avg_ptr + offsets, mask=mask) + (1 - beta1) * grad
        exp_avg_sq = beta2 * tl.load(exp_avg_sq_ptr + offsets, mask=mask) + (1 - beta2) * grad * grad
        denom = tl.sqrt_rn(exp_avg_sq) / bias_correction2_sqrt.to(tl.float32) + eps
        param -= tl.div_rn(step_size * exp_avg, denom)
        tl.store(param_ptr + offsets, param, mask=mask)
        tl.store(exp_avg_ptr + offsets, exp_avg, mask=mask)
        tl.store(exp_avg_sq_ptr + offsets, exp_avg_sq, mask=mask)
        tl.store(bf16_ptr + offsets, param.to(bf16_ptr.dtype.element_ty), mask=mask)

    return adamw_fp32


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", type=int, default=1 << 30)
    parser.add_argument("--reps", type=int, default=10)
    args = parser.parse_args()
    n, reps, dev = args.params, args.reps, "cuda"
    param, grad = torch.randn(n, device=dev), torch.randn(n, device=dev) * 1e-3
    exp_avg, exp_avg_sq = torch.zeros(n, device=dev), torch.zeros(n, device=dev)
    bf16 = torch.empty(n, device=dev, dtype=torch.bfloat16)
    step, grad_scale, found_inf = (torch.zeros((), device=dev) for _ in range(3))
    grad_scale += 1
    hyper = adamw._hyperparameters(
        step + 1, grad_scale, lr=1e-4, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1
    )
    state = (param, grad, exp_avg, exp_avg_sq, bf16, n, hyper, found_inf)

    def report(name: str, ms: float, bytes_each: int) -> None:
        print(f"{name:<44} {ms:8.3f} ms  {bytes_each * n / ms / 1e6:6.0f} GB/s")

    src, dst = torch.empty(n, device=dev), torch.empty(n, device=dev)
    report("peer: fp32 copy", mean_ms(lambda: dst.copy_(src), reps), 8)
    report("peer: fp32 add", mean_ms(lambda: torch.add(param, grad, out=dst), reps), 12)
    kernel, cdiv = adamw._kernel()

    def launch(triton_kernel, block: int, warps: int):
        return lambda: triton_kernel[(cdiv(n, block),)](
            *state, BLOCK=block, num_warps=warps, **LAUNCH_OPTIONS
        )

    for block in (1024, 2048, 4096, 8192):
        for warps in (4, 8, 16):
            name = f"kernel, fp64 arithmetic, {block} x {warps} warps"
            name += " (shipped)" if (block, warps) == (adamw.BLOCK, adamw.NUM_WARPS) else ""
            report(name, mean_ms(launch(kernel, block, warps), reps), BYTES_A_PARAMETER)
    fp32_kernel = fp32_arithmetic_kernel()
    for block in (2048, 4096):
        for warps in (4, 8):
            name = f"fp32 arithmetic (not shipped), {block} x {warps}"
            report(name, mean_ms(launch(fp32_kernel, block, warps), reps), BYTES_A_PARAMETER)
    fused = lambda: torch._fused_adamw_(
        [param], [grad], [exp_avg], [exp_avg_sq], [], [step], lr=1e-4, beta1=0.9, beta2=0.95,
        weight_decay=0.1, eps=1e-8, amsgrad=False, maximize=False,
    )  # fmt: skip
    report("peer: torch's fused AdamW (no bf16 weights)", mean_ms(fused, reps), 28)


if __name__ == "__main__":
    main()
