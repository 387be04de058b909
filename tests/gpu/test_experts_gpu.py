"""Routed experts on a Hopper GPU: the bf16 torch._grouped_mm path against the loop reference run in
fp32 on the same bf16 values, at a Qwen3-Next-like size (E=64, H=1024, I=256, 8192 tokens, top-8).

Errors are relative RMS, ||fast - ref|| / ||ref||, over the output and the four gradients.
Legend: t tokens, k slots per token, e experts, h hidden, i expert width.
"""

import pytest
import torch

from model.ops.experts import _grouped_mm_fast_path_applies, routed_experts, routed_experts_reference

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

NUM_EXPERTS, HIDDEN, INTER, TOKENS, TOP_K = 64, 1024, 256, 8192, 8


def _rel_rms(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def _problem(skewed: bool):
    """bf16 inputs and a routing from a softmax router; 'skewed' keeps experts 32.. idle (empty groups)."""
    gen = torch.Generator(device="cuda").manual_seed(0)
    x_td = torch.randn(TOKENS, HIDDEN, device="cuda", generator=gen).bfloat16()
    gate_up_eih = (
        torch.randn(NUM_EXPERTS, 2 * INTER, HIDDEN, device="cuda", generator=gen) / HIDDEN**0.5
    ).bfloat16()
    down_ehi = (torch.randn(NUM_EXPERTS, HIDDEN, INTER, device="cuda", generator=gen) / INTER**0.5).bfloat16()
    logits_te = torch.randn(TOKENS, NUM_EXPERTS, device="cuda", generator=gen)
    if skewed:
        logits_te[:, NUM_EXPERTS // 2 :] -= 100.0
        logits_te[:, 0] += 3.0  # and expert 0 takes most tokens
    weight_tk, idx_tk = torch.softmax(logits_te, dim=-1).topk(TOP_K, dim=-1)
    weight_tk = (weight_tk / weight_tk.sum(-1, keepdim=True)).bfloat16()
    grad_out_td = torch.randn(TOKENS, HIDDEN, device="cuda", generator=gen).bfloat16()
    return x_td, idx_tk, weight_tk, gate_up_eih, down_ehi, grad_out_td


def _output_and_grads(fn, x_td, idx_tk, weight_tk, gate_up_eih, down_ehi, grad_out_td, dtype):
    leaves = [t.detach().to(dtype).requires_grad_() for t in (x_td, weight_tk, gate_up_eih, down_ehi)]
    x_leaf, w_leaf, gu_leaf, d_leaf = leaves
    y_td = fn(x_leaf, idx_tk, w_leaf, gu_leaf, d_leaf)
    y_td.backward(grad_out_td.to(dtype))
    return [y_td.detach()] + [leaf.grad for leaf in leaves]


@pytest.mark.parametrize("skewed", [False, True], ids=["router", "skewed"])
def test_grouped_mm_bf16_matches_fp32_reference(skewed):
    problem = _problem(skewed)
    x_td, _, _, gate_up_eih, down_ehi, _ = problem
    if not _grouped_mm_fast_path_applies(x_td, gate_up_eih, down_ehi):
        pytest.skip("no torch._grouped_mm or pre-Hopper GPU: routed_experts would take the reference")
    fast = _output_and_grads(routed_experts, *problem, torch.bfloat16)
    ref = _output_and_grads(routed_experts_reference, *problem, torch.float32)
    assert fast[0].dtype == torch.bfloat16
    names = ["y", "d_x", "d_routing_weight", "d_gate_up_proj", "d_down_proj"]
    errors = {name: _rel_rms(a, b) for name, a, b in zip(names, fast, ref, strict=True)}
    print(errors)
    assert errors["y"] < 5e-3, errors
    assert all(err < 8e-3 for name, err in errors.items() if name != "y"), errors
    assert all(torch.isfinite(t).all() for t in fast)
    if skewed:
        assert not fast[3][NUM_EXPERTS // 2 :].any() and not fast[4][NUM_EXPERTS // 2 :].any()


def test_grouped_mm_path_never_syncs_with_the_host():
    x_td, idx_tk, weight_tk, gate_up_eih, down_ehi, grad_out_td = _problem(skewed=True)
    if not _grouped_mm_fast_path_applies(x_td, gate_up_eih, down_ehi):
        pytest.skip("no torch._grouped_mm or pre-Hopper GPU")
    leaves = [t.detach().requires_grad_() for t in (x_td, weight_tk, gate_up_eih, down_ehi)]
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        routed_experts(leaves[0], idx_tk, *leaves[1:]).backward(grad_out_td)
    finally:
        torch.cuda.set_sync_debug_mode("default")
