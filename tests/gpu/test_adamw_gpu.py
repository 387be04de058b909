"""The one-pass AdamW kernel (model/ops/adamw.py) against torch's fused AdamW on CUDA and against its
torch reference, over steps that are plain, clipped (grad_scale > 1) and skipped (found_inf), with
weight decay, on a length that is no multiple of the kernel's block; and it never makes the host
wait for the GPU. Skipped without CUDA."""

import pytest
import torch

from model.ops.adamw import adamw_flat_, adamw_flat_reference

if not torch.cuda.is_available():
    pytest.skip("needs CUDA", allow_module_level=True)

N = 3 * 2048 * 7 + 123
HYPER = dict(lr=3e-3, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
STEPS = [(1.0, 0.0), (2.5, 0.0), (1.0, 1.0), (1.0, 0.0), (4.0, 0.0)]  # (grad_scale, found_inf)


def fresh_state(param: torch.Tensor) -> dict:
    return {
        "param": param.clone(),
        "exp_avg": torch.zeros_like(param),
        "exp_avg_sq": torch.zeros_like(param),
        "step": torch.zeros((), device=param.device),
        "bf16": torch.empty_like(param, dtype=torch.bfloat16),
    }


def run(state: dict, step_fn, grad, grad_scale, found_inf):
    step_fn(
        state["param"], grad, state["exp_avg"], state["exp_avg_sq"], state["step"], state["bf16"],
        grad_scale=grad_scale, found_inf=found_inf, **HYPER,
    )  # fmt: skip


def normwise_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


def test_the_kernel_steps_as_torchs_fused_adamw_and_its_reference():
    gen = torch.Generator(device="cuda").manual_seed(0)
    param = torch.randn(N, device="cuda", generator=gen) * 0.05
    kernel, reference = fresh_state(param), fresh_state(param)
    torch_param = torch.nn.Parameter(param.clone())
    torch_adamw = torch.optim.AdamW([torch_param], fused=True, **HYPER)
    for index, (scale, inf) in enumerate(STEPS):
        grad = torch.randn(N, device="cuda", generator=gen) * 1e-3 * (index + 1)
        grad_scale = torch.tensor(scale, device="cuda")
        found_inf = torch.tensor(inf, device="cuda")
        before = kernel["param"].clone()
        run(kernel, adamw_flat_, grad, grad_scale, found_inf)
        run(reference, adamw_flat_reference, grad, grad_scale, found_inf)
        torch_param.grad = grad.clone()
        torch_adamw.grad_scale, torch_adamw.found_inf = grad_scale, found_inf
        torch_adamw.step()
        torch_state = torch_adamw.state[torch_param]
        if inf:
            assert torch.equal(kernel["param"], before)
        else:
            assert not torch.equal(kernel["param"], before)
        assert float(kernel["step"]) == float(torch_state["step"]) == float(reference["step"])
        assert torch.equal(kernel["bf16"], kernel["param"].bfloat16())
        for key, theirs in (("param", torch_param.detach()), ("exp_avg", None), ("exp_avg_sq", None)):
            theirs = torch_state[key] if theirs is None else theirs
            # against the reference, which rounds where the kernel does: an ulp at most
            assert normwise_error(kernel[key], reference[key]) < 2e-7, (index, key)
            assert normwise_error(kernel[key], theirs) < 1e-6, (index, key)


def test_the_kernel_does_not_wait_for_the_gpu():
    param = torch.randn(N, device="cuda")
    state = fresh_state(param)
    grad = torch.randn(N, device="cuda")
    one, zero = torch.ones((), device="cuda"), torch.zeros((), device="cuda")
    run(state, adamw_flat_, grad, one, zero)  # compiled
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        run(state, adamw_flat_, grad, one, zero)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert float(state["step"]) == 2.0
