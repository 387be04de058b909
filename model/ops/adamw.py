"""AdamW over one flat fp32 buffer in a single pass that also writes the bf16 copy of the weights.

    adamw_flat_(param, grad, exp_avg, exp_avg_sq, step, bf16_out, lr=..., betas=..., eps=...,
                weight_decay=..., grad_scale=..., found_inf=...)

The mixed-precision optimizer step of parallel/engine.py holds each parameter group as one flat fp32
partition (the master weights), its fp32 gradient, Adam's two moments, and the bf16 weights the model
computes with. torch's fused AdamW updates the fp32 buffers (28 bytes a parameter moved; 4 more when
given a `grad_scale`, since it then writes the unscaled gradients back), then a second pass reads the
fp32 weights again to write the bf16 copy (6 more). On an H200 at the 80B width (2.8B parameters on
one GPU) the two took 23.4 ms (27.3 with `grad_scale`) and 3.8 ms a step. Here one Triton kernel
does both, 30 bytes a parameter, in 23.4 ms (with 2048-element blocks; bench/RESULTS.md).

The arithmetic is torch's fused AdamW's, step for step: the gradient divided by `grad_scale`, the
weight decayed by lr x weight_decay, the moments' running averages, the bias corrections of the
step count, the update step_size x m / (sqrt(v) / sqrt(bias_correction2) + eps). `grad_scale` and
`found_inf` are 0-dim fp32 tensors on the device, as torch's fused optimizers take them: a step with
`found_inf` != 0 changes nothing (weights, moments, step count), and nothing is read on the host.
`step` is the fp32 0-dim step count of torch's AdamW state, on the device.

On CPU (outside Triton's interpreter, model/ops/triton_support.py) and wherever Triton is missing,
`adamw_flat_reference` runs: plain torch with the same formula, and what tests/gpu/test_adamw_gpu.py
holds the kernel to (and both to torch's AdamW); tests/unit/test_triton_interpreted.py runs the
kernel on the CPU.
"""

from __future__ import annotations

import torch

from model.ops.triton_support import LAUNCH_OPTIONS, runs_on_triton, triton_kernels

# elements a program updates, and its warps: on an H200, over 1.07B parameters, 1024 x 4 warps took
# 8.00 ms, 2048 x 8 8.29 and 4096 x 8 8.82 (`python -m bench.adamw_kernel`, bench/RESULTS.md)
BLOCK, NUM_WARPS = 1024, 4


@triton_kernels
def _kernel(triton, tl):
    """The Triton kernel and triton.cdiv (model/ops/triton_support.py)."""

    @triton.jit
    def adamw_kernel(
        param_ptr,
        grad_ptr,
        exp_avg_ptr,
        exp_avg_sq_ptr,
        bf16_ptr,
        n,
        hyper_ptr,  # fp64 [7]: `_hyperparameters`
        found_inf_ptr,
        BLOCK: tl.constexpr,
    ):
        if tl.load(found_inf_ptr) != 0:
            return
        decay, beta1, beta2 = tl.load(hyper_ptr), tl.load(hyper_ptr + 1), tl.load(hyper_ptr + 2)
        eps, grad_scale = tl.load(hyper_ptr + 3), tl.load(hyper_ptr + 4)
        bias_correction2_sqrt, step_size = tl.load(hyper_ptr + 5), tl.load(hyper_ptr + 6).to(tl.float32)
        offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offsets < n
        # fp64 where torch's kernel mixes its double hyperparameters in, fp32 where it stores
        grad = (tl.load(grad_ptr + offsets, mask=mask).to(tl.float64) / grad_scale).to(tl.float32)
        param = tl.load(param_ptr + offsets, mask=mask).to(tl.float64)
        param = (param - decay * param).to(tl.float32)
        exp_avg = tl.load(exp_avg_ptr + offsets, mask=mask).to(tl.float64)
        exp_avg = (beta1 * exp_avg + (1 - beta1) * grad).to(tl.float32)
        exp_avg_sq = tl.load(exp_avg_sq_ptr + offsets, mask=mask).to(tl.float64)
        exp_avg_sq = (beta2 * exp_avg_sq + (1 - beta2) * grad * grad).to(tl.float32)
        denom = (tl.sqrt_rn(exp_avg_sq).to(tl.float64) / bias_correction2_sqrt + eps).to(tl.float32)
        param -= tl.div_rn(step_size * exp_avg, denom)
        tl.store(param_ptr + offsets, param, mask=mask)
        tl.store(exp_avg_ptr + offsets, exp_avg, mask=mask)
        tl.store(exp_avg_sq_ptr + offsets, exp_avg_sq, mask=mask)
        tl.store(bf16_ptr + offsets, param.to(bf16_ptr.dtype.element_ty), mask=mask)

    return adamw_kernel, triton.cdiv


def _hyperparameters(step, grad_scale, *, lr, betas, eps, weight_decay) -> torch.Tensor:
    """fp64 [7] on the step's device: lr x weight_decay, beta1, beta2, eps, grad_scale, the square
    root of bias correction 2 and the step size lr / bias correction 1 (which torch keeps in fp32),
    from the step count; the constants travel through page-locked memory (a pageable copy would
    make the host wait for the GPU)."""
    beta1, beta2 = betas
    constants = torch.tensor([lr * weight_decay, beta1, beta2, eps], dtype=torch.float64)
    if step.is_cuda:
        constants = constants.pin_memory().to(step.device, non_blocking=True)
    step = step.double()
    bias_correction1 = 1 - torch.pow(constants[1], step)
    bias_correction2_sqrt = (1 - torch.pow(constants[2], step)).sqrt()
    step_size = (lr / bias_correction1).float().double()
    pieces = (grad_scale.double().reshape(1), bias_correction2_sqrt.reshape(1), step_size.reshape(1))
    return torch.cat([constants, *pieces])


def adamw_flat_(
    param: torch.Tensor,
    grad: torch.Tensor,
    exp_avg: torch.Tensor,
    exp_avg_sq: torch.Tensor,
    step: torch.Tensor,
    bf16_out: torch.Tensor,
    *,
    lr: float,
    betas: tuple[float, float],
    eps: float,
    weight_decay: float,
    grad_scale: torch.Tensor,
    found_inf: torch.Tensor,
) -> None:
    """One AdamW step of the flat fp32 `param` in place (module docstring), its moments and step
    count, and `bf16_out` (param's number of elements) set to the new weights."""
    buffers = (param, grad, exp_avg, exp_avg_sq)
    if any(t.dtype != torch.float32 or t.numel() != param.numel() for t in buffers) or (
        bf16_out.numel() != param.numel()
    ):
        raise ValueError(
            "adamw_flat_: param, grad and the moments must be fp32 and as long as bf16_out, got "
            f"{[(t.dtype, t.numel()) for t in (*buffers, bf16_out)]}"
        )
    tensors = (*buffers, bf16_out, step, grad_scale, found_inf)
    if len({t.device for t in tensors}) > 1:
        raise ValueError(f"adamw_flat_: all tensors on one device, got {[str(t.device) for t in tensors]}")
    kernel = _kernel()
    if kernel is None or not runs_on_triton(*tensors):
        adamw_flat_reference(
            param, grad, exp_avg, exp_avg_sq, step, bf16_out, lr=lr, betas=betas, eps=eps,
            weight_decay=weight_decay, grad_scale=grad_scale, found_inf=found_inf,
        )  # fmt: skip
        return
    step.add_(1 - found_inf)  # a skipped step is not counted (torch's fused AdamW the same)
    hyper = _hyperparameters(step, grad_scale, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
    adamw_kernel, cdiv = kernel
    n = param.numel()
    adamw_kernel[(cdiv(n, BLOCK),)](
        param, grad, exp_avg, exp_avg_sq, bf16_out, n, hyper, found_inf.float(),
        BLOCK=BLOCK, num_warps=NUM_WARPS, **LAUNCH_OPTIONS,
    )  # fmt: skip


def adamw_flat_reference(
    param, grad, exp_avg, exp_avg_sq, step, bf16_out, *, lr, betas, eps, weight_decay, grad_scale, found_inf
) -> None:
    """`adamw_flat_` in plain torch, rounding to fp32 where the kernel (and torch's) does."""
    step.add_(1 - found_inf)
    decay, beta1, beta2, eps, scale, bias_correction2_sqrt, step_size = _hyperparameters(
        step, grad_scale, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay
    )
    skip = found_inf != 0
    grad = (grad.double() / scale).float()
    new_param = param.double()
    new_param = (new_param - decay * new_param).float()
    new_exp_avg = (beta1 * exp_avg.double() + (1 - beta1) * grad.double()).float()
    new_exp_avg_sq = (beta2 * exp_avg_sq.double() + (1 - beta2) * grad.double() * grad.double()).float()
    denom = (new_exp_avg_sq.sqrt().double() / bias_correction2_sqrt + eps).float()
    new_param = new_param - (step_size.float() * new_exp_avg) / denom
    for old, new in ((param, new_param), (exp_avg, new_exp_avg), (exp_avg_sq, new_exp_avg_sq)):
        old.copy_(torch.where(skip, old, new))
    bf16_out.view(param.shape).copy_(param)
