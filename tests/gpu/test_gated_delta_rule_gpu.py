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

# the head counts and dims of test_model_gpu.py's model: fla compiles a kernel for each set of head
# counts, dims, dtypes and flags (varlen, initial or final state), and the packed case below is the
# model's own call, so its kernels serve the model tests too (compiling them is most of these tests' time)
H, HV, DK, DV = 2, 4, 128, 128
INPUT_NAMES = ("q", "k", "v", "g", "beta", "initial_state")
STATE_NAMES = ("final_state", "initial_state")
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


def make_inputs(b, t, n, seed, *, with_states=True):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    randn = lambda *shape: torch.randn(*shape, generator=gen, device="cuda")
    rate_hv = torch.logspace(-2, 0, HV, device="cuda")  # long- and short-memory heads
    inputs = dict(
        q=randn(b, t, H, DK).bfloat16(),
        k=randn(b, t, H, DK).bfloat16(),
        v=randn(b, t, HV, DV).bfloat16(),
        g=-F.softplus(randn(b, t, HV)) * rate_hv,
        beta=torch.sigmoid(randn(b, t, HV)).bfloat16(),
    )
    if with_states:
        inputs["initial_state"] = randn(n, HV, DK, DV) * 0.1
    return inputs


def packed_offsets(seq_lengths):
    """cu_seqlens as the model passes them (model/documents.py): int32 on the GPU, int64 on the host."""
    host = torch.tensor([0, *seq_lengths]).cumsum(0)
    return host.to("cuda", torch.int32), host


def forward_backward(fn, inputs, upstream, cu_seqlens, cu_seqlens_cpu=None):
    """Outputs and input gradients of one call; the final state is asked for when an initial one is
    given (the model passes neither)."""
    leaves = {name: x.detach().clone().requires_grad_() for name, x in inputs.items()}
    q, k, v, g, beta = (leaves[name] for name in INPUT_NAMES[:5])
    h0 = leaves.get("initial_state")
    o, final_state = fn(
        q, k, v, g, beta, initial_state=h0, output_final_state=h0 is not None,
        cu_seqlens=cu_seqlens, **({"cu_seqlens_cpu": cu_seqlens_cpu} if cu_seqlens_cpu is not None else {}),
    )  # fmt: skip
    loss = (o.float() * upstream["o"]).sum()
    if h0 is not None:
        loss = loss + (final_state.float() * upstream["final_state"]).sum()
    loss.backward()
    results = {"o": o.detach(), **({"final_state": final_state.detach()} if h0 is not None else {})}
    results.update({name: leaf.grad for name, leaf in leaves.items()})
    return results


@pytest.mark.parametrize(
    ("b", "seq_lengths"),
    # batched: two rows of 1000 tokens (a partial last chunk) from initial states to final states;
    # packed: the model's call, uneven lengths none a multiple of the 64-token chunk, no states
    [(2, None), (1, [93, 424, 507])],
    ids=["batched-states", "packed-as-the-model"],
)
def test_fla_matches_reference(b, seq_lengths):
    assert _load_fla_kernel() is not None, "the dispatcher should have found fla"
    packed = seq_lengths is not None
    t = sum(seq_lengths) if packed else 1000
    n = len(seq_lengths) if packed else b
    cu_seqlens, cu_seqlens_cpu = packed_offsets(seq_lengths) if packed else (None, None)
    inputs = make_inputs(b, t, n, seed=b, with_states=not packed)
    upstream = {
        "o": torch.randn(b, t, HV, DV, device="cuda"),
        "final_state": torch.randn(n, HV, DK, DV, device="cuda"),
    }

    fla = forward_backward(chunk_gated_delta_rule, inputs, upstream, cu_seqlens, cu_seqlens_cpu)
    upcast = {name: x.float() for name, x in inputs.items()}
    ref = forward_backward(chunk_gated_delta_rule_reference, upcast, upstream, cu_seqlens, cu_seqlens_cpu)

    assert fla["o"].dtype == torch.bfloat16 and fla["o"].shape == (b, t, HV, DV)
    if not packed:
        assert fla["final_state"].dtype == torch.float32 and fla["final_state"].shape == (n, HV, DK, DV)
    compared = [name for name in MAX_REL_RMS if packed is False or name not in STATE_NAMES]
    errors = {name: rel_rms_error(fla[name], ref[name]) for name in compared}
    for name in compared:
        assert torch.isfinite(fla[name]).all(), f"{name} has NaN/inf"
        assert errors[name] < MAX_REL_RMS[name], (
            f"{name}: relative RMS error {errors[name]:.2e} >= {MAX_REL_RMS[name]:.0e}; all: {errors}"
        )


def _fla_with_repeated_heads(q, k, v, g, beta, **options):
    """fla's own entry point with q/k repeated to the value heads beforehand (the plain path)."""
    group = v.shape[2] // q.shape[2]
    q, k = q.repeat_interleave(group, dim=2), k.repeat_interleave(group, dim=2)
    o, final_state = _load_fla_kernel()(q, k, v, g, beta, use_qk_l2norm_in_kernel=True, **options)
    return o.to(v.dtype), final_state


def _saved_bytes(fn, inputs, cu_seqlens, cu_seqlens_cpu) -> int:
    """Bytes of the distinct tensors autograd keeps for backward of one forward call (no states)."""
    leaves = {name: x.detach().clone().requires_grad_() for name, x in inputs.items()}
    q, k, v, g, beta = (leaves[name] for name in INPUT_NAMES[:5])

    def forward():
        o, _ = fn(q, k, v, g, beta, cu_seqlens=cu_seqlens, cu_seqlens_cpu=cu_seqlens_cpu)
        return o.float().sum()

    return sum(kept_by(forward, params=[]).values())


@pytest.mark.skipif(_fla_chunk_internals() is None, reason="fla-core 0.4 only (later: grouped heads)")
def test_heads_repeated_inside_match_fla_and_keep_less():
    """Our call into fla-core 0.4's kernels with q/k repeated inside matches fla's own entry point
    with q/k repeated before it, on the model's packed call: the same forward, gradients to bf16
    rounding (the copies' gradients are summed in fp32 before the l2norm's backward, not after it in
    bf16), and keeps q and k for backward at their own head count."""
    seq_lengths = [93, 424, 507]
    b, t = 1, sum(seq_lengths)
    cu_seqlens, cu_seqlens_cpu = packed_offsets(seq_lengths)
    inputs = make_inputs(b, t, len(seq_lengths), seed=7, with_states=False)
    upstream = {"o": torch.randn(b, t, HV, DV, device="cuda")}
    ours = forward_backward(chunk_gated_delta_rule, inputs, upstream, cu_seqlens, cu_seqlens_cpu)
    plain = forward_backward(_fla_with_repeated_heads, inputs, upstream, cu_seqlens, cu_seqlens_cpu)
    assert torch.equal(ours["o"], plain["o"])
    for name in inputs:  # the same kernels on the same values, but for q and k's last step
        error = rel_rms_error(ours[name], plain[name])
        assert error < (8e-3 if name in ("q", "k") else 1e-6), f"{name}: relative RMS {error:.2e} from fla's"

    kept_ours = _saved_bytes(chunk_gated_delta_rule, inputs, cu_seqlens, cu_seqlens_cpu)
    kept_plain = _saved_bytes(_fla_with_repeated_heads, inputs, cu_seqlens, cu_seqlens_cpu)
    repeated_qk = 2 * b * t * (HV - H) * DK * 2  # the normalised q and k's extra heads, bf16
    assert kept_plain - kept_ours >= repeated_qk, (kept_plain, kept_ours)
