"""Gated delta rule on CPU: the chunked reference against the token-by-token recurrence (values,
final states and gradients, in float64), packed sequences against separate runs, the dispatcher's
CPU route, its fla route's head handling (with a stand-in kernel) and its argument checks, and HF
Qwen3-Next's torch implementation as an outside witness.

Legend: b batch, t tokens, h q/k heads, hv value heads, k key dim, v value dim, n sequences.
"""

import importlib.util

import pytest
import torch
import torch.nn.functional as F

from model.ops.gated_delta_rule import (
    L2NORM_EPS,
    _repeat_heads,
    _run_fla,
    _sum_repeated_heads,
    chunk_gated_delta_rule,
    chunk_gated_delta_rule_reference,
    naive_recurrent_gated_delta_rule,
)

H, HV, DK, DV = 2, 4, 8, 6  # two value heads per q/k head; k != v so a transposed state shows


def make_inputs(b, t, *, n_states=None, dtype=torch.float64, seed=0, requires_grad=False):
    """Fresh random q, k, v, g, beta and an initial state for n_states (default b) sequences.

    g = -softplus(noise) * rate with one rate per value head from 0.01 to 1: some heads keep their
    state for hundreds of tokens, others forget within a few. beta is a sigmoid, in (0, 1).
    """
    gen = torch.Generator().manual_seed(seed)
    randn = lambda *shape: torch.randn(*shape, generator=gen, dtype=dtype)
    rate_hv = torch.logspace(-2, 0, HV, dtype=dtype)
    inputs = dict(
        q=randn(b, t, H, DK),
        k=randn(b, t, H, DK),
        v=randn(b, t, HV, DV),
        g=-F.softplus(randn(b, t, HV)) * rate_hv,
        beta=torch.sigmoid(randn(b, t, HV)),
        initial_state=randn(b if n_states is None else n_states, HV, DK, DV),
    )
    return {name: x.requires_grad_(requires_grad) for name, x in inputs.items()}


def run(fn, inputs, **kwargs):
    q, k, v, g, beta, h0 = (inputs[name] for name in ("q", "k", "v", "g", "beta", "initial_state"))
    return fn(q, k, v, g, beta, initial_state=h0, output_final_state=True, **kwargs)


def grads_of(fn, inputs, weights, **kwargs):
    """Gradients of a fixed random linear function of (o, final state) w.r.t. every input."""
    o, final = run(fn, inputs, **kwargs)
    loss = (o * weights["o"]).sum() + (final * weights["final"]).sum()
    return dict(zip(inputs, torch.autograd.grad(loss, list(inputs.values())), strict=True))


def random_weights(o_shape, final_shape, dtype, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return {
        "o": torch.randn(o_shape, generator=gen, dtype=dtype),
        "final": torch.randn(final_shape, generator=gen, dtype=dtype),
    }


@pytest.mark.parametrize("with_initial_state", [True, False], ids=["h0", "zero-h0"])
@pytest.mark.parametrize(("t", "chunk_size"), [(1, 16), (37, 16), (64, 16), (130, 64), (37, 64)])
def test_chunked_matches_recurrence(t, chunk_size, with_initial_state):
    inputs = make_inputs(2, t, seed=t)
    if not with_initial_state:
        inputs["initial_state"] = None
    o_ref, final_ref = run(naive_recurrent_gated_delta_rule, inputs)
    o, final = run(chunk_gated_delta_rule_reference, inputs, chunk_size=chunk_size)
    assert o.dtype == final.dtype == torch.float64
    assert o.shape == (2, t, HV, DV) and final.shape == (2, HV, DK, DV)
    torch.testing.assert_close(o, o_ref, atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(final, final_ref, atol=1e-10, rtol=1e-10)


def test_chunked_matches_recurrence_without_l2norm_and_with_explicit_scale():
    inputs = make_inputs(1, 50, seed=3)
    # Without the in-kernel norm the delta rule only stays stable for beta * |k|^2 < 2.
    inputs["k"] = 0.9 * F.normalize(inputs["k"], dim=-1)
    options = dict(use_qk_l2norm=False, scale=0.3)
    o_ref, final_ref = run(naive_recurrent_gated_delta_rule, inputs, **options)
    o, final = run(chunk_gated_delta_rule_reference, inputs, chunk_size=16, **options)
    torch.testing.assert_close(o, o_ref, atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(final, final_ref, atol=1e-10, rtol=1e-10)


def test_chunked_gradients_match_recurrence():
    inputs = make_inputs(2, 37, seed=5, requires_grad=True)
    weights = random_weights((2, 37, HV, DV), (2, HV, DK, DV), torch.float64)
    expected = grads_of(naive_recurrent_gated_delta_rule, inputs, weights)
    actual = grads_of(chunk_gated_delta_rule_reference, inputs, weights, chunk_size=16)
    for name in inputs:
        torch.testing.assert_close(actual[name], expected[name], atol=1e-10, rtol=1e-10, msg=name)


LENGTHS = [23, 64, 1, 50]  # around and across 16-token chunk borders, one single-token sequence


def packed_and_separate(lengths, dtype, requires_grad=False):
    packed = make_inputs(
        1, sum(lengths), n_states=len(lengths), dtype=dtype, seed=7, requires_grad=requires_grad
    )
    cu_seqlens = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    return packed, cu_seqlens


def test_packed_sequences_match_separate_runs():
    packed, cu_seqlens = packed_and_separate(LENGTHS, torch.float32)
    o, final = run(chunk_gated_delta_rule_reference, packed, cu_seqlens=cu_seqlens, chunk_size=16)
    assert final.shape == (len(LENGTHS), HV, DK, DV) and final.dtype == torch.float32
    for i, (start, end) in enumerate(zip(cu_seqlens[:-1].tolist(), cu_seqlens[1:].tolist(), strict=True)):
        alone = {name: x[:, start:end] for name, x in packed.items() if name != "initial_state"}
        alone["initial_state"] = packed["initial_state"][i : i + 1]
        o_alone, final_alone = run(chunk_gated_delta_rule_reference, alone, chunk_size=16)
        torch.testing.assert_close(o[:, start:end], o_alone, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(final[i : i + 1], final_alone, atol=1e-5, rtol=1e-5)


def test_packed_gradients_match_separate_runs():
    packed, cu_seqlens = packed_and_separate(LENGTHS, torch.float32, requires_grad=True)
    total = sum(LENGTHS)
    weights = random_weights((1, total, HV, DV), (len(LENGTHS), HV, DK, DV), torch.float32)
    actual = grads_of(chunk_gated_delta_rule_reference, packed, weights, cu_seqlens=cu_seqlens, chunk_size=16)

    expected = {name: torch.zeros_like(x) for name, x in packed.items()}
    for i, (start, end) in enumerate(zip(cu_seqlens[:-1].tolist(), cu_seqlens[1:].tolist(), strict=True)):
        alone = {name: x.detach()[:, start:end].requires_grad_() for name, x in packed.items()}
        alone["initial_state"] = packed["initial_state"].detach()[i : i + 1].requires_grad_()
        alone_weights = {"o": weights["o"][:, start:end], "final": weights["final"][i : i + 1]}
        grads = grads_of(chunk_gated_delta_rule_reference, alone, alone_weights, chunk_size=16)
        for name, grad in grads.items():
            if name == "initial_state":
                expected[name][i : i + 1] = grad
            else:
                expected[name][:, start:end] = grad
    for name in packed:
        torch.testing.assert_close(actual[name], expected[name], atol=1e-5, rtol=1e-5, msg=name)


def test_packed_sequences_match_recurrence_with_an_empty_sequence():
    lengths = [40, 0, 29]  # an empty sequence hands its initial state straight back
    packed, cu_seqlens = packed_and_separate(lengths, torch.float64)
    o_ref, final_ref = run(naive_recurrent_gated_delta_rule, packed, cu_seqlens=cu_seqlens)
    o, final = run(chunk_gated_delta_rule_reference, packed, cu_seqlens=cu_seqlens, chunk_size=16)
    torch.testing.assert_close(o, o_ref, atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(final, final_ref, atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(final[1], packed["initial_state"][1], atol=0, rtol=0)


def test_dispatcher_on_cpu_is_the_reference():
    inputs = make_inputs(2, 45, dtype=torch.float32, seed=11)
    o_ref, final_ref = run(chunk_gated_delta_rule_reference, inputs)
    o, final = run(chunk_gated_delta_rule, inputs)
    assert torch.equal(o, o_ref) and torch.equal(final, final_ref)


def fla_like_kernel(takes_grouped_heads: bool, seen_heads: list[int]):
    """A stand-in for fla's chunk kernel with its keyword names, computing the reference; one without
    grouped value heads refuses q/k with fewer heads than v, as fla-core 0.4.2's indexing needs."""

    def kernel(q, k, v, g, beta, *, scale, initial_state, output_final_state, use_qk_l2norm_in_kernel,
               cu_seqlens, cu_seqlens_cpu):  # fmt: skip
        seen_heads.append(q.shape[2])
        assert takes_grouped_heads or q.shape[2] == v.shape[2], "this kernel needs one q/k head a value head"
        return chunk_gated_delta_rule_reference(
            q, k, v, g, beta, scale=scale, initial_state=initial_state, output_final_state=output_final_state,
            use_qk_l2norm=use_qk_l2norm_in_kernel, cu_seqlens=cu_seqlens,
        )  # fmt: skip

    return kernel


@pytest.mark.parametrize("grouped_heads", [False, True], ids=["heads-repeated", "heads-grouped"])
def test_fla_route_gives_a_kernel_the_heads_it_takes_and_the_reference_values(grouped_heads):
    inputs = make_inputs(1, 30, seed=29, requires_grad=True)
    weights = random_weights((1, 30, HV, DV), (1, HV, DK, DV), torch.float64)
    seen_heads = []
    kernel = fla_like_kernel(grouped_heads, seen_heads)
    options = dict(scale=None, cu_seqlens=None, cu_seqlens_cpu=None, use_qk_l2norm=True)
    route = lambda *args, **kwargs: _run_fla(kernel, *args, grouped_heads=grouped_heads, **options, **kwargs)
    expected = grads_of(chunk_gated_delta_rule_reference, inputs, weights)
    got = grads_of(route, inputs, weights)
    assert seen_heads == [H if grouped_heads else HV]
    for name in inputs:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-10, atol=1e-10, msg=name)


def test_low_precision_inputs_give_v_dtype_output_and_fp32_state():
    inputs = {name: x.bfloat16() for name, x in make_inputs(1, 20, dtype=torch.float32, seed=13).items()}
    o, final = run(chunk_gated_delta_rule, inputs)
    assert o.dtype == torch.bfloat16 and final.dtype == torch.float32
    o_ref, _ = run(naive_recurrent_gated_delta_rule, inputs)  # fp32 from the same bf16 values
    torch.testing.assert_close(o, o_ref, atol=1e-2, rtol=1e-2)


def test_final_state_only_on_request():
    inputs = make_inputs(1, 10, seed=17)
    q, k, v, g, beta = (inputs[name] for name in ("q", "k", "v", "g", "beta"))
    assert chunk_gated_delta_rule(q, k, v, g, beta)[1] is None


def test_rejects_batch_with_cu_seqlens():
    inputs = make_inputs(2, 8, n_states=2, seed=19)
    with pytest.raises(ValueError, match="cu_seqlens"):
        run(chunk_gated_delta_rule, inputs, cu_seqlens=torch.tensor([0, 3, 8]))


def test_rejects_value_heads_not_a_multiple_of_key_heads():
    inputs = make_inputs(1, 8, seed=23)
    inputs["q"], inputs["k"] = (
        inputs["q"][:, :, :1].repeat(1, 1, 3, 1),
        inputs["k"][:, :, :1].repeat(1, 1, 3, 1),
    )
    with pytest.raises(ValueError, match="multiple"):
        run(chunk_gated_delta_rule, inputs)


def test_rejects_initial_state_of_wrong_count():
    packed, cu_seqlens = packed_and_separate([5, 6], torch.float64)
    packed["initial_state"] = packed["initial_state"][:1]
    with pytest.raises(ValueError, match="initial_state"):
        run(chunk_gated_delta_rule, packed, cu_seqlens=cu_seqlens)


@pytest.mark.skipif(
    importlib.util.find_spec("fla") is not None, reason="HF would route to fla's CUDA kernels instead"
)
def test_matches_hf_qwen3_next_torch_implementation():
    """An outside witness for the convention: grouped value heads, output read after the update."""
    hf = pytest.importorskip("transformers.models.qwen3_next.modeling_qwen3_next")
    inputs = make_inputs(2, 70, dtype=torch.float32, seed=29)
    q, k, v, g, beta, h0 = inputs.values()
    o_hf, final_hf = hf.torch_chunk_gated_delta_rule(
        q, k, v, g, beta, initial_state=h0, output_final_state=True, use_qk_l2norm_in_kernel=True
    )
    o, final = run(chunk_gated_delta_rule, inputs)
    torch.testing.assert_close(o, o_hf, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(final, final_hf, atol=1e-5, rtol=1e-5)


def fla_like_internals(calls: list[str]):
    """Stand-ins for the fla-core 0.4.2 functions `_FlaWithHeadsRepeatedInside` calls, with their
    keyword names, computing with the reference: l2norm forward/backward, the chunk indices, and the
    delta rule's forward and backward, which (as fla's) need one q/k head a value head. What fla's
    forward hands its backward (the cumulative g, the WY matrix A, the chunk indices) are stand-in
    objects here, and backward checks it gets those very objects back."""
    handed = {}

    def l2norm_fwd(x):
        rstd = torch.rsqrt((x * x).sum(-1) + L2NORM_EPS)
        return x * rstd[..., None], rstd

    def l2norm_bwd(y, rstd, dy):
        return (dy - (dy * y).sum(-1, keepdim=True) * y) * rstd[..., None]

    def prepare_chunk_indices(cu_seqlens, chunk_size, cu_seqlens_cpu=None):
        assert chunk_size == 64 and cu_seqlens_cpu is not None
        handed["chunk_indices"] = torch.zeros(1)
        return handed["chunk_indices"]

    def delta_rule(q, k, v, g, beta, scale, initial_state, cu_seqlens):
        assert q.shape[2] == k.shape[2] == v.shape[2], "this kernel needs one q/k head a value head"
        return chunk_gated_delta_rule_reference(
            q, k, v, g, beta, scale=scale, initial_state=initial_state, output_final_state=True,
            use_qk_l2norm=False, cu_seqlens=cu_seqlens,
        )  # fmt: skip

    def fla_fwd(*, q, k, v, g, beta, scale, initial_state, output_final_state, cu_seqlens, chunk_indices):
        calls.append("forward")
        assert chunk_indices is handed.get("chunk_indices")
        o, final_state = delta_rule(q, k, v, g, beta, scale, initial_state, cu_seqlens)
        handed["g"], handed["A"] = g.clone(), torch.ones(1)  # fla's: the chunk-local cumsum of g, and A
        return handed["g"], o, handed["A"], final_state if output_final_state else None, initial_state

    def fla_bwd(*, q, k, v, g, beta, A, scale, initial_state, do, dht, cu_seqlens, chunk_indices):
        calls.append("backward")
        assert g is handed["g"] and A is handed["A"] and chunk_indices is handed.get("chunk_indices")
        with torch.enable_grad():
            leaves = [None if x is None else x.detach().requires_grad_() for x in (q, k, v, g, beta)]
            h0 = None if initial_state is None else initial_state.detach().requires_grad_()
            o, final_state = delta_rule(*leaves, scale, h0, cu_seqlens)
            upstream = (o * do).sum() + (0 if dht is None else (final_state * dht).sum())
            grads = torch.autograd.grad(upstream, [*leaves, *([h0] if h0 is not None else [])])
        dq, dk, dv, dg, dbeta = grads[:5]
        return dq, dk, dv, dbeta, dg, grads[5] if h0 is not None else None

    return l2norm_fwd, l2norm_bwd, prepare_chunk_indices, fla_fwd, fla_bwd


@pytest.mark.parametrize("as_trained", [False, True], ids=["states-in-and-out", "packed-no-states"])
def test_heads_repeated_inside_fla_calls_give_the_reference_values_and_gradients(as_trained):
    """q/k normalised at their own head count and repeated only inside fla-core 0.4.2's calls (the
    path CUDA takes with it): outputs and every input's gradient as the reference's, with the
    stand-ins above in fla's place; backward goes through fla's backward once. Both with initial and
    final states, and as the mixer trains: packed documents, no state in or out."""
    inputs = make_inputs(1, 30, seed=31, requires_grad=True)
    options = dict(scale=None, use_qk_l2norm=True, output_final_state=not as_trained)
    options.update(cu_seqlens=None, cu_seqlens_cpu=None)
    if as_trained:
        del inputs["initial_state"]
        bounds = [0, 7, 30]
        options.update(cu_seqlens=torch.tensor(bounds), cu_seqlens_cpu=torch.tensor(bounds))
    calls = []
    internals = fla_like_internals(calls)

    def outputs(fn):
        q, k, v, g, beta = (inputs[name] for name in ("q", "k", "v", "g", "beta"))
        o, final_state = fn(q, k, v, g, beta, initial_state=inputs.get("initial_state"), **options)
        weights = random_weights(o.shape, (1, HV, DK, DV), torch.float64)
        loss = (o * weights["o"]).sum() + (0 if as_trained else (final_state * weights["final"]).sum())
        return dict(zip(inputs, torch.autograd.grad(loss, list(inputs.values())), strict=True)), o

    def route(*args, **kwargs):
        return _run_fla(None, *args, grouped_heads=False, internals=internals, **kwargs)

    (expected, o_expected), (got, o) = outputs(chunk_gated_delta_rule_reference), outputs(route)
    assert calls == ["forward", "backward"]
    torch.testing.assert_close(o, o_expected, rtol=1e-10, atol=1e-10)
    for name in inputs:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-10, atol=1e-10, msg=name)


@pytest.mark.slow
def test_compiled_head_repeat_and_its_gradient_sum_equal_plain_torch(monkeypatch):
    """The two compiled helpers around fla-core 0.4.2's calls (inductor's C++ backend here, Triton on
    CUDA): a copy and a sum of two bf16 values in fp32, so equal bit for bit to the eager ops."""
    monkeypatch.setenv("QWEN3NEXT_COMPILE", "always")
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(1, 24, 3, 8, generator=gen).bfloat16()
    dx = torch.randn(1, 24, 6, 8, generator=gen).bfloat16()
    assert torch.equal(_repeat_heads(x, 2), x.repeat_interleave(2, dim=2))
    summed = _sum_repeated_heads(dx, 2)
    assert summed.dtype == torch.float32
    assert torch.equal(summed, dx[:, :, 0::2].float() + dx[:, :, 1::2].float())
