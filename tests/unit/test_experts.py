"""Routed SwiGLU experts on CPU: the loop reference against a per-token dense oracle, the sorted
grouped-GEMM path (and its loop-of-matmuls fallback) against the reference, and the token counts.

Legend: t tokens, k slots per token, e experts, h hidden, i expert width.
"""

from collections import Counter

import pytest
import torch
import torch.nn.functional as F

from model.ops.experts import (
    _grouped_mm_loop,
    _sort_pairs_by_expert,
    expert_token_counts,
    routed_experts,
    routed_experts_grouped_mm,
    routed_experts_reference,
    sort_key_dtype,
)

# grouped_mm needs 16-byte row strides, so h and i are multiples of 8 (bf16) / 4 (fp32).
NUM_EXPERTS, HIDDEN, INTER = 8, 16, 8


def _grouped_mm_runs_on_cpu() -> bool:
    if not hasattr(torch, "_grouped_mm"):
        return False
    try:
        a_sk, b_ekn = torch.randn(4, 8), torch.randn(2, 8, 8)
        torch._grouped_mm(a_sk, b_ekn, offs=torch.tensor([1, 4], dtype=torch.int32))
    except (RuntimeError, NotImplementedError):
        return False
    return True


needs_cpu_grouped_mm = pytest.mark.skipif(
    not _grouped_mm_runs_on_cpu(), reason="torch._grouped_mm has no CPU kernel in this torch"
)


def _expert_weights(
    dtype: torch.dtype, seed: int = 0, inter: int = INTER
) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    gate_up_eih = torch.randn(NUM_EXPERTS, 2 * inter, HIDDEN, generator=gen, dtype=dtype) / HIDDEN**0.5
    down_ehi = torch.randn(NUM_EXPERTS, HIDDEN, inter, generator=gen, dtype=dtype) / inter**0.5
    return gate_up_eih, down_ehi


def _routing(num_tokens: int, top_k: int, kind: str, dtype: torch.dtype, seed: int = 1):
    """(x_td, idx_tk, weight_tk). 'random': distinct experts per token from all E; 'skewed': only
    experts 0, 3, 5 are used (the rest get zero rows), most pairs go to 0, and a token may pick the
    same expert in several slots."""
    gen = torch.Generator().manual_seed(seed)
    x_td = torch.randn(num_tokens, HIDDEN, generator=gen, dtype=dtype)
    if kind == "random":
        idx_tk = torch.stack([torch.randperm(NUM_EXPERTS, generator=gen)[:top_k] for _ in range(num_tokens)])
    else:
        choices = torch.tensor([0, 0, 0, 0, 0, 3, 5])
        idx_tk = choices[torch.randint(len(choices), (num_tokens, top_k), generator=gen)]
    weight_tk = torch.softmax(torch.randn(num_tokens, top_k, generator=gen, dtype=dtype), dim=-1)
    return x_td, idx_tk, weight_tk


def _dense_per_token(x_td, idx_tk, weight_tk, gate_up_eih, down_ehi) -> torch.Tensor:
    """The oracle: for each token and slot, the SwiGLU written out with F.linear."""
    rows = []
    for t in range(x_td.shape[0]):
        y_h = torch.zeros_like(x_td[t])
        for k in range(idx_tk.shape[1]):
            e = int(idx_tk[t, k])
            gate_i = F.linear(x_td[t], gate_up_eih[e, :INTER])
            up_i = F.linear(x_td[t], gate_up_eih[e, INTER:])
            y_h = y_h + weight_tk[t, k] * F.linear(F.silu(gate_i) * up_i, down_ehi[e])
        rows.append(y_h)
    return torch.stack(rows)


def _output_and_grads(fn, x_td, idx_tk, weight_tk, gate_up_eih, down_ehi, grad_out_td):
    leaves = [t.detach().clone().requires_grad_() for t in (x_td, weight_tk, gate_up_eih, down_ehi)]
    x_leaf, w_leaf, gu_leaf, d_leaf = leaves
    y_td = fn(x_leaf, idx_tk, w_leaf, gu_leaf, d_leaf)
    y_td.backward(grad_out_td)
    return [y_td.detach()] + [leaf.grad for leaf in leaves]


@pytest.mark.parametrize("kind", ["random", "skewed"])
def test_reference_matches_dense_per_token_float64(kind):
    gate_up_eih, down_ehi = _expert_weights(torch.float64)
    x_td, idx_tk, weight_tk = _routing(20, 3, kind, torch.float64)
    expected = _dense_per_token(x_td, idx_tk, weight_tk, gate_up_eih, down_ehi)
    actual = routed_experts_reference(x_td, idx_tk, weight_tk, gate_up_eih, down_ehi)
    torch.testing.assert_close(actual, expected, rtol=1e-12, atol=1e-12)


@needs_cpu_grouped_mm
@pytest.mark.parametrize("kind", ["random", "skewed"])
def test_grouped_mm_matches_reference_fp32_output_and_grads(kind):
    gate_up_eih, down_ehi = _expert_weights(torch.float32)
    x_td, idx_tk, weight_tk = _routing(37, 4, kind, torch.float32)
    grad_out_td = torch.randn(x_td.shape, generator=torch.Generator().manual_seed(2))
    args = (x_td, idx_tk, weight_tk, gate_up_eih, down_ehi, grad_out_td)
    fast = _output_and_grads(routed_experts_grouped_mm, *args)
    ref = _output_and_grads(routed_experts_reference, *args)
    for name, a, b in zip(["y", "d_x", "d_weight", "d_gate_up", "d_down"], fast, ref, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5, msg=lambda m, name=name: f"{name}: {m}")
    if kind == "skewed":
        assert (fast[3][[1, 2, 4, 6, 7]] == 0).all()  # unused experts: zero grads, and no NaN from garbage


def test_grouped_path_falls_back_to_a_matmul_loop_without_the_kernel(monkeypatch):
    """Torches without torch._grouped_mm run the same sorted layout through _grouped_mm_loop."""
    gate_up_eih, down_ehi = _expert_weights(torch.float32)
    x_td, idx_tk, weight_tk = _routing(23, 3, "skewed", torch.float32)
    grad_out_td = torch.randn(x_td.shape, generator=torch.Generator().manual_seed(3))
    args = (x_td, idx_tk, weight_tk, gate_up_eih, down_ehi, grad_out_td)
    ref = _output_and_grads(routed_experts_reference, *args)
    monkeypatch.delattr(torch, "_grouped_mm", raising=False)
    fast = _output_and_grads(routed_experts_grouped_mm, *args)
    for a, b in zip(fast, ref, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@needs_cpu_grouped_mm
def test_matmul_loop_has_the_grouped_mm_contract_with_empty_groups():
    gen = torch.Generator().manual_seed(4)
    a_sk = torch.randn(11, 8, generator=gen)
    b_ekn = torch.randn(5, 12, 8, generator=gen).transpose(-2, -1)  # a transposed view, as in the op
    offs_e = torch.tensor([0, 4, 4, 11, 11], dtype=torch.int32)
    expected = torch._grouped_mm(a_sk, b_ekn, offs=offs_e)
    torch.testing.assert_close(_grouped_mm_loop(a_sk, b_ekn, offs_e), expected, rtol=1e-6, atol=1e-6)


def test_dispatch_takes_the_reference_on_cpu():
    gate_up_eih, down_ehi = _expert_weights(torch.float32)
    x_td, idx_tk, weight_tk = _routing(9, 2, "random", torch.float32)
    expected = routed_experts_reference(x_td, idx_tk, weight_tk, gate_up_eih, down_ehi)
    assert torch.equal(routed_experts(x_td, idx_tk, weight_tk, gate_up_eih, down_ehi), expected)


def test_no_tokens_gives_an_empty_output_and_zero_weight_grads():
    gate_up_eih, down_ehi = _expert_weights(torch.float32)
    x_td, idx_tk, weight_tk = _routing(0, 2, "skewed", torch.float32)
    assert routed_experts_reference(x_td, idx_tk, weight_tk, gate_up_eih, down_ehi).shape == (0, HIDDEN)
    y_td, d_x, _, d_gate_up, d_down = _output_and_grads(
        routed_experts_grouped_mm, x_td, idx_tk, weight_tk, gate_up_eih, down_ehi, torch.zeros(0, HIDDEN)
    )
    assert y_td.shape == d_x.shape == (0, HIDDEN)
    assert not d_gate_up.any() and not d_down.any()


@pytest.mark.parametrize("kind", ["random", "skewed"])
def test_expert_token_counts_match_a_counter(kind):
    _, idx_tk, _ = _routing(50, 4, kind, torch.float32)
    counts_e = expert_token_counts(idx_tk, NUM_EXPERTS)
    tally = Counter(idx_tk.flatten().tolist())
    assert counts_e.dtype == torch.int64
    assert counts_e.tolist() == [tally[e] for e in range(NUM_EXPERTS)]


@pytest.mark.parametrize("num_experts", [8, 256, 257, 512, 70_000])
def test_pairs_sorted_by_expert_match_a_stable_python_sort(num_experts):
    # ids drawn from the top of the range too, where a too-narrow key type would wrap
    gen = torch.Generator().manual_seed(num_experts)
    idx_tk = torch.randint(max(0, num_experts - 20), num_experts, (60, 4), generator=gen)
    idx_tk[::7] = torch.randint(0, num_experts, (idx_tk[::7].shape), generator=gen)
    ids = idx_tk.flatten().tolist()

    order_s, inverse_s, offs_e = _sort_pairs_by_expert(idx_tk, num_experts)

    expected_order = sorted(range(len(ids)), key=lambda pair: (ids[pair], pair))
    assert order_s.tolist() == expected_order
    assert [inverse_s[pair].item() for pair in expected_order] == list(range(len(ids)))
    tally = Counter(ids)
    ends, total = [], 0
    for expert in range(num_experts):
        total += tally[expert]
        ends.append(total)
    assert offs_e.dtype == torch.int32 and offs_e.tolist() == ends


def test_sort_key_dtype_is_the_narrowest_that_holds_every_id():
    for num_experts, dtype in [(1, torch.uint8), (256, torch.uint8), (257, torch.int16), (512, torch.int16)]:
        assert sort_key_dtype(num_experts) == dtype
        assert torch.iinfo(dtype).max >= num_experts - 1
    assert sort_key_dtype(32_769) == torch.int32


@needs_cpu_grouped_mm
def test_weight_gradient_loop_has_the_grouped_mm_contract_with_empty_groups(monkeypatch):
    from model.ops.experts import _grouped_weight_grad

    gen = torch.Generator().manual_seed(3)
    g_sn, a_sk = torch.randn(9, 12, generator=gen), torch.randn(9, 8, generator=gen)
    offs_e = torch.tensor([0, 4, 4, 9], dtype=torch.int32)  # groups 0 and 2 empty
    zeros = torch.zeros(12, 8)
    expected = torch.stack([zeros, g_sn[:4].t() @ a_sk[:4], zeros, g_sn[4:].t() @ a_sk[4:]])
    torch.testing.assert_close(_grouped_weight_grad(g_sn, a_sk, offs_e), expected, rtol=1e-6, atol=1e-6)
    monkeypatch.delattr(torch, "_grouped_mm", raising=False)
    torch.testing.assert_close(_grouped_weight_grad(g_sn, a_sk, offs_e), expected, rtol=1e-6, atol=1e-6)


def _kept_activations(fn, *args, params) -> list[torch.Tensor]:
    """Every tensor autograd keeps for the backward of fn(*args), the parameters (and slices of them)
    left out."""
    storages = {p.untyped_storage().data_ptr() for p in params}
    saved = []

    def keep(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t):
        fn(*args)
    return [t for t in saved if t.untyped_storage().data_ptr() not in storages]


def _hidden_wide_pair_rows(kept, pairs: int) -> list[tuple]:
    """Shapes of the kept tensors that hold a hidden-wide row for every (token, slot) pair."""
    return [tuple(t.shape) for t in kept if t.shape[-1] == HIDDEN and t.numel() // HIDDEN >= pairs]


def _routed_problem_needing_every_gradient(dtype: torch.dtype, top_k: int = 4):
    # an expert width whose gate/up rows (2 i) are not hidden-wide either, so shapes tell them apart
    gate_up_eih, down_ehi = (w.requires_grad_() for w in _expert_weights(dtype, inter=24))
    x_td, idx_tk, weight_tk = _routing(37, top_k, "random", dtype)
    return x_td.requires_grad_(), idx_tk, weight_tk.requires_grad_(), gate_up_eih, down_ehi


def test_grouped_path_keeps_no_hidden_wide_row_per_pair():
    """Per (token, slot) pair the grouped path keeps expert-width rows only (gate/up, activation): the
    gathered input rows and the output rows, hidden-wide, are gathered again or not needed (model/ops/
    experts.py). The reference loop, for contrast, keeps hidden-wide rows for the pairs."""
    args = _routed_problem_needing_every_gradient(torch.float32)
    params, pairs = args[3:], args[1].numel()
    fast = _kept_activations(routed_experts_grouped_mm, *args, params=params)
    assert _hidden_wide_pair_rows(fast, pairs) == []
    assert any(t.shape == (pairs, 24) for t in fast)  # it does keep expert-width rows (gate, up)
    ref = _kept_activations(routed_experts_reference, *args, params=params)
    assert sum(t.numel() // HIDDEN for t in ref if t.shape[-1] == HIDDEN) >= pairs


@needs_cpu_grouped_mm
@pytest.mark.slow
def test_compiled_grouped_path_keeps_no_hidden_wide_row_per_pair():
    """The same under torch.compile (bf16, as trained), whose partitioner picks what to keep itself:
    written as plain ops, the weight gradient's gather was moved to forward and its rows kept."""
    torch._dynamo.reset()
    args = _routed_problem_needing_every_gradient(torch.bfloat16)
    params, pairs = args[3:], args[1].numel()
    compiled = torch.compile(routed_experts_grouped_mm)
    compiled(*args).float().sum().backward()  # compile first: count what a step keeps, not the compiler
    kept = _kept_activations(compiled, *args, params=params)
    assert kept, "nothing kept: the count does not see the compiled graph"
    assert _hidden_wide_pair_rows(kept, pairs) == []
