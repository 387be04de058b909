"""The one-pass AdamW kernel (model/ops/adamw.py) against torch's fused AdamW on CUDA and against its
torch reference, over steps that are plain, clipped (grad_scale > 1) and skipped (found_inf), with
weight decay, on a length that is no multiple of the kernel's block; and it never makes the host
wait for the GPU. Skipped without CUDA."""

import pytest
import torch

from model.ops.adamw import adamw_flat_, adamw_flat_reference
from tests.kernel_checks import adamw_state, adamw_step, check_adamw_steps

if not torch.cuda.is_available():
    pytest.skip("needs CUDA", allow_module_level=True)

N = 3 * 2048 * 7 + 123
STEPS = [(1.0, 0.0), (2.5, 0.0), (1.0, 1.0), (1.0, 0.0), (4.0, 0.0)]  # (grad_scale, found_inf)


def _bf16_bit_for_bit(bf16: torch.Tensor, fp32: torch.Tensor) -> None:
    assert torch.equal(bf16, fp32.bfloat16())


def test_the_kernel_steps_as_torchs_fused_adamw_and_its_reference():
    check_adamw_steps(
        adamw_flat_, adamw_flat_reference, device="cuda", n=N, steps=STEPS, check_bf16=_bf16_bit_for_bit
    )


def test_the_kernel_does_not_wait_for_the_gpu():
    param = torch.randn(N, device="cuda")
    state = adamw_state(param)
    grad = torch.randn(N, device="cuda")
    one, zero = torch.ones((), device="cuda"), torch.zeros((), device="cuda")
    adamw_step(state, adamw_flat_, grad, one, zero)  # compiled
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        adamw_step(state, adamw_flat_, grad, one, zero)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert float(state["step"]) == 2.0
