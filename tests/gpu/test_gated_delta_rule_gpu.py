"""fla's chunked gated delta rule on CUDA against the project's torch reference.

Both see the same bf16 q, k, v, beta and fp32 g (as the Gated DeltaNet mixer passes them); the
reference runs in fp32 on those values upcast. Errors are relative RMS, ||a - b|| / ||b||, with
bounds that leave room for fla's bf16 intermediates (the normalised q, k and the WY matrices).

Legend: b batch, t tokens, h q/k heads, hv value heads, k key dim, v value dim, n sequences.
"""

import pytest
import torch
import torch.nn.functional as F

if not torch.cuda.is_available():
    pytest.skip("needs CUDA", allow_module_level=True)
pytest.importorskip("fla.ops.gated_delta_rule", reason="needs fla-core (pip install fla-core==0.4.2)")

from bench.saved_activations import kept_by
from model.ops.gated_delta_rule import (
    _fla_chunk_internals,
    _load_fla_kernel,
    chunk_gated_delta_rule,
    chunk_gated_delta_rule_reference,
)

H, HV, DK, DV = 4, 8, 128, 128
INPUT_NAMES = ("q", "k", "v", "g", "beta", "initial_state")
MAX_REL_RMS = {
    "o": 5e-3,
    "final_state": 5e-3,
    "q": 8e-3,
    "k": 8e-3,
    "v": 8e-3,
    "initial_state": 8e-3,
    "g": 2e-2,
    "beta": 2e-2,
}


def rel_rms_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """||actual - expected|| / ||expected||, in fp32."""
    actual, expected = actual.float(), expected.float()
    return ((actual - expected).norm() / expected.norm()).item()


def make_inputs(b, t, n, seed):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    randn = lambda *shape: torch.randn(*shape, generator=gen, device="cuda")
    rate_hv = torch.logspace(-2, 0, HV, device="cuda")  # long- and short-memory heads
    return dict(
        q=randn(b, t, H, DK).bfloat16(),
        k=randn(b, t, H, DK).bfloat16(),
        v=randn(b, t, HV, DV).bfloat16(),
        g=-F.softplus(randn(b, t, HV)) * rate_hv,
        beta=torch.sigmoid(randn(b, t, HV)).bfloat16(),
        initial_state=randn(n, HV, DK, DV) * 0.1,
    )


def forward_backward(fn, inputs, upstream, cu_seqlens):
    leaves = {name: x.detach().clone().requires_grad_() for name, x in inputs.items()}
    q, k, v, g, beta, h0 = (leaves[name] for name in INPUT_NAMES)
    o, final_state = fn(q, k, v, g, beta, initial_state=h0, output_final_state=True, cu_seqlens=cu_seqlens)
    loss = (o.float() * upstream["o"]).sum() + (final_state.float() * upstream["final_state"]).sum()
    loss.backward()
    results = {"o": o.detach(), "final_state": final_state.detach()}
    results.update({name: leaf.grad for name, leaf in leaves.items()})
    return results


@pytest.mark.parametrize(
    ("b", "seq_lengths"),
    [(2, None), (1, [93, 424, 483])],  # packed: uneven lengths, none a multiple of the 64-token chunk
    ids=["batched", "packed"],
)
def test_fla_matches_reference(b, seq_lengths):
    assert _load_fla_kernel() is not None, "the dispatcher should have found fla"
    t = 1000
    n = b if seq_lengths is None else len(seq_lengths)
    cu_seqlens = None
    if seq_lengths is not None:
        assert sum(seq_lengths) == t
        cu_seqlens = torch.tensor([0, *torch.tensor(seq_lengths).cumsum(0).tolist()], device="cuda")
    inputs = make_inputs(b, t, n, seed=b)
    upstream = {
        "o": torch.randn(b, t, HV, DV, device="cuda"),
        "final_state": torch.randn(n, HV, DK, DV, device="cuda"),
    }

    fla = forward_backward(chunk_gated_delta_rule, inputs, upstream, cu_seqlens)
    upcast = {name: x.float() for name, x in inputs.items()}
    ref = forward_backward(chunk_gated_delta_rule_reference, upcast, upstream, cu_seqlens)

    assert fla["o"].dtype == torch.bfloat16 and fla["o"].shape == (b, t, HV, DV)
    assert fla["final_state"].dtype == torch.float32 and fla["final_state"].shape == (n, HV, DK, DV)
    errors = {name: rel_rms_error(fla[name], ref[name]) for name in MAX_REL_RMS}
    for name, bound in MAX_REL_RMS.items():
        assert torch.isfinite(fla[name]).all(), f"{name} has NaN/inf"
        assert errors[name] < bound, (
            f"{name}: relative RMS error {errors[name]:.2e} >= {bound:.0e}; all: {errors}"
        )


def _fla_with_repeated_heads(q, k, v, g, beta, **options):
    """fla's own entry point with q/k repeated to the value heads beforehand (the plain path)."""
    group = v.shape[2] // q.shape[2]
    q, k = q.repeat_interleave(group, dim=2), k.repeat_interleave(group, dim=2)
    o, final_state = _load_fla_kernel()(q, k, v, g, beta, use_qk_l2norm_in_kernel=True, **options)
    return o.to(v.dtype), final_state


def _saved_bytes(fn, inputs, cu_seqlens) -> int:
    """Bytes of the distinct tensors autograd keeps for backward of one forward call."""
    leaves = {name: x.detach().clone().requires_grad_() for name, x in inputs.items()}
    q, k, v, g, beta, h0 = (leaves[name] for name in INPUT_NAMES)

    def forward():
        o, final_state = fn(
            q, k, v, g, beta, initial_state=h0, output_final_state=True, cu_seqlens=cu_seqlens
        )
        return o.float().sum() + final_state.float().sum()

    return sum(kept_by(forward, params=[]).values())


@pytest.mark.skipif(_fla_chunk_internals() is None, reason="fla-core 0.4 only (later: grouped heads)")
def test_heads_repeated_inside_match_fla_and_keep_less():
    """Our call into fla-core 0.4's kernels with q/k repeated inside matches fla's own entry point
    with q/k repeated before it: the same forward, gradients to bf16 rounding (the copies' gradients
    are summed in fp32 before the l2norm's backward, not after it in bf16), and keeps q and k for
    backward at their own head count."""
    b, t, n = 1, 1000, 3
    cu_seqlens = torch.tensor([0, 93, 517, 1000], device="cuda")
    inputs = make_inputs(b, t, n, seed=7)
    upstream = {
        "o": torch.randn(b, t, HV, DV, device="cuda"),
        "final_state": torch.randn(n, HV, DK, DV, device="cuda"),
    }
    ours = forward_backward(chunk_gated_delta_rule, inputs, upstream, cu_seqlens)
    plain = forward_backward(_fla_with_repeated_heads, inputs, upstream, cu_seqlens)
    assert torch.equal(ours["o"], plain["o"]) and torch.equal(ours["final_state"], plain["final_state"])
    for name in INPUT_NAMES:  # the same kernels on the same values, but for q and k's last step
        error = rel_rms_error(ours[name], plain[name])
        assert error < (8e-3 if name in ("q", "k") else 1e-6), f"{name}: relative RMS {error:.2e} from fla's"

    kept_ours = _saved_bytes(chunk_gated_delta_rule, inputs, cu_seqlens)
    kept_plain = _saved_bytes(_fla_with_repeated_heads, inputs, cu_seqlens)
    repeated_qk = 2 * b * t * (HV - H) * DK * 2  # the normalised q and k's extra heads, bf16
    assert kept_plain - kept_ours >= repeated_qk, (kept_plain, kept_ours)
