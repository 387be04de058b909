"""Routed SwiGLU experts of the sparse MoE block: a grouped-GEMM fast path beside a per-expert loop.

Weights keep HF transformers 5's Qwen3-Next layout: gate_up_proj_eih [E, 2I, H] (rows :I are the gate,
rows I: the up projection) and down_proj_ehi [E, H, I]. For every (token, slot) pair routed to expert e
with weight w:  y[t] += w * down[e] @ (silu(gate[e] @ x[t]) * (up[e] @ x[t])).
As in HF, the routing weight is cast to the activation dtype; the reference scales each expert's
output with it, as HF does, the fast path the SwiGLU activation before the down projection (the
same by linearity, see below).

Legend: t tokens, k slots per token, s = t*k (token, slot) pairs, e experts, h hidden, i expert width.

The fast path sorts the pairs by expert so each expert's rows are contiguous, runs both projections as
one torch._grouped_mm each (offs = cumulative end row per expert, int32), and puts the rows back.
It never waits on the GPU from the host (no .item(), no data-dependent shapes), forward or backward;
the reference syncs once per call to list the busy experts.

What the fast path keeps for backward is what its memory at scale turns on: per (token, slot) pair,
k = 10 of them a token, a row of width h costs 5x a row of width i at the 80B's h = 2048, i = 512. So
- the gathered input rows x[pair's token] are not kept: the first projection's backward gathers them
  again from the token rows (which the router keeps anyway) for its weight gradient
  (`_GatherThenGroupedMM`, a gather instead of k rows of h values a token);
- the routing weight scales the SwiGLU activation before the down projection instead of the
  projection's output after it (equal by linearity): its gradient then needs the i-wide activation,
  recomputed from the gate/up rows, instead of the h-wide output rows.
That leaves the gate/up rows (2 i) and the down projection's input (i) a pair, where autograd kept
2 h + 3 i (counted on the compiled block, bench/saved_activations.py).
"""

import torch
import torch.nn.functional as F

from model.ops.fusion import fused_on_cuda

# torch._grouped_mm's bf16 kernel wants every row stride to be a multiple of 16 bytes.
_BF16_ROW_ALIGNMENT = 16 // torch.bfloat16.itemsize


def routed_experts(
    x_td: torch.Tensor,
    topk_idx_tk: torch.Tensor,
    topk_weight_tk: torch.Tensor,
    gate_up_proj_eih: torch.Tensor,
    down_proj_ehi: torch.Tensor,
) -> torch.Tensor:
    """Sum over each token's k slots of its routing weight times its expert's SwiGLU output: y_td."""
    if _grouped_mm_fast_path_applies(x_td, gate_up_proj_eih, down_proj_ehi):
        return routed_experts_grouped_mm(x_td, topk_idx_tk, topk_weight_tk, gate_up_proj_eih, down_proj_ehi)
    return routed_experts_reference(x_td, topk_idx_tk, topk_weight_tk, gate_up_proj_eih, down_proj_ehi)


def expert_token_counts(topk_idx_tk: torch.Tensor, num_experts: int) -> torch.Tensor:
    """How many (token, slot) pairs each expert receives: int64 [E].

    Same result as bincount(minlength=E), but with a fixed output size, so there is no host sync on
    CUDA (bincount reads the max back to size its output). An index >= E raises (an index error on
    CPU, a device-side assert on CUDA) instead of silently growing the result.
    """
    idx_s = topk_idx_tk.reshape(-1).long()
    counts_e = torch.zeros(num_experts, dtype=torch.int64, device=idx_s.device)
    return counts_e.scatter_add_(0, idx_s, torch.ones_like(idx_s))


def routed_experts_reference(
    x_td: torch.Tensor,
    topk_idx_tk: torch.Tensor,
    topk_weight_tk: torch.Tensor,
    gate_up_proj_eih: torch.Tensor,
    down_proj_ehi: torch.Tensor,
) -> torch.Tensor:
    """HF's loop: for every expert that got tokens, gather them, run its SwiGLU, index_add back."""
    num_experts = gate_up_proj_eih.shape[0]
    y_td = torch.zeros_like(x_td)
    busy_experts = expert_token_counts(topk_idx_tk, num_experts).nonzero().flatten().tolist()
    for expert in busy_experts:
        token_idx, slot_idx = torch.where(topk_idx_tk == expert)
        out_nh = _swiglu_expert(x_td[token_idx], gate_up_proj_eih[expert], down_proj_ehi[expert])
        out_nh = out_nh * topk_weight_tk[token_idx, slot_idx, None].to(out_nh.dtype)
        y_td.index_add_(0, token_idx, out_nh.to(y_td.dtype))
    return y_td


def routed_experts_grouped_mm(
    x_td: torch.Tensor,
    topk_idx_tk: torch.Tensor,
    topk_weight_tk: torch.Tensor,
    gate_up_proj_eih: torch.Tensor,
    down_proj_ehi: torch.Tensor,
) -> torch.Tensor:
    """Sort the (token, slot) pairs by expert, one grouped GEMM per projection (the routing weight
    scaling the activation between them), unsort, sum each token's slots."""
    num_tokens, top_k = topk_idx_tk.shape
    order_s, inverse_s, offs_e = _sort_pairs_by_expert(topk_idx_tk, gate_up_proj_eih.shape[0])

    x_th = x_td.to(gate_up_proj_eih.dtype)
    gate_up_s2i = _GatherThenGroupedMM.apply(x_th, gate_up_proj_eih, order_s, inverse_s, offs_e, top_k)
    weight_s = _PermuteRows.apply(topk_weight_tk.reshape(-1), order_s, inverse_s)  # backward: no scatter
    act_si = _weighted_swiglu(gate_up_s2i, weight_s)
    # grouped_mm computes a @ b per group, so it takes the weights as an [E, in, out] transposed view.
    out_sh = _grouped_mm(act_si, down_proj_ehi.transpose(-2, -1), offs_e)

    out_tkh = _PermuteRows.apply(out_sh, inverse_s, order_s).view(num_tokens, top_k, out_sh.shape[-1])
    return _sum_slots_in_fp32(out_tkh).to(x_td.dtype)


def _grouped_mm_fast_path_applies(
    x_td: torch.Tensor, gate_up_proj_eih: torch.Tensor, down_proj_ehi: torch.Tensor
) -> bool:
    """CUDA, bf16, Hopper or newer, and shapes/strides the grouped GEMM kernel accepts."""
    if not (hasattr(torch, "_grouped_mm") and x_td.is_cuda):
        return False
    if not all(t.dtype == torch.bfloat16 for t in (x_td, gate_up_proj_eih, down_proj_ehi)):
        return False
    if torch.cuda.get_device_capability(x_td.device) < (9, 0):
        return False
    hidden, inter = down_proj_ehi.shape[1:]
    aligned = hidden % _BF16_ROW_ALIGNMENT == 0 and inter % _BF16_ROW_ALIGNMENT == 0
    return aligned and gate_up_proj_eih.is_contiguous() and down_proj_ehi.is_contiguous()


def _sort_pairs_by_expert(
    topk_idx_tk: torch.Tensor, num_experts: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Flat pair ids (t*k + slot) ordered by expert, the inverse permutation (the row each pair
    lands on) and each expert's cumulative end row (int32 [E])."""
    # Stable, so that the order inside an expert's group (hence the result) does not vary run to run.
    # The keys in the narrowest integer type that holds the expert ids: the GPU's radix sort makes a
    # pass per key byte, 1 or 2 for these where int64 ids took 8.
    order_s = torch.argsort(topk_idx_tk.reshape(-1).to(sort_key_dtype(num_experts)), stable=True)
    # the inverse of a permutation is a scatter, not a second sort
    positions_s = torch.arange(order_s.numel(), device=order_s.device)
    inverse_s = torch.empty_like(order_s).scatter_(0, order_s, positions_s)
    offs_e = torch.cumsum(expert_token_counts(topk_idx_tk, num_experts), dim=0, dtype=torch.int32)
    return order_s, inverse_s, offs_e


def sort_key_dtype(num_experts: int) -> torch.dtype:
    """The narrowest integer dtype that holds the ids 0 .. num_experts - 1."""
    for dtype in (torch.uint8, torch.int16, torch.int32):
        if num_experts - 1 <= torch.iinfo(dtype).max:
            return dtype
    return torch.int64


def _grouped_mm(a_sk: torch.Tensor, b_ekn: torch.Tensor, offs_e: torch.Tensor) -> torch.Tensor:
    """Rows offs[e-1]:offs[e] of a times b[e], stacked: torch._grouped_mm, else a loop of matmuls."""
    if hasattr(torch, "_grouped_mm"):
        return torch._grouped_mm(a_sk, b_ekn, offs=offs_e)
    return _grouped_mm_loop(a_sk, b_ekn, offs_e)


def _grouped_weight_grad(g_sn: torch.Tensor, a_sk: torch.Tensor, offs_e: torch.Tensor) -> torch.Tensor:
    """[E, n, k]: g[rows of e]^T @ a[rows of e] for every group e (zeros for an empty one): the gradient
    of the [E, n, k] weight b in `_grouped_mm(a, b.transpose(-2, -1), offs)`, contiguous like b. One
    torch._grouped_mm of two 2-D operands grouped along their shared dim (autograd forms the same
    product transposed), else a loop of matmuls."""
    if hasattr(torch, "_grouped_mm"):
        return torch._grouped_mm(g_sn.t(), a_sk, offs=offs_e)
    return torch.stack([g_sn[start:end].t() @ a_sk[start:end] for start, end in _group_rows(offs_e)])


def _group_rows(offs_e: torch.Tensor) -> list[tuple[int, int]]:
    """(first row, end row) of each group, from its cumulative end rows; syncs once on CUDA."""
    ends = offs_e.tolist()
    return list(zip([0, *ends[:-1]], ends, strict=True))


def _grouped_mm_loop(a_sk: torch.Tensor, b_ekn: torch.Tensor, offs_e: torch.Tensor) -> torch.Tensor:
    """torch._grouped_mm's contract (2-D a, 3-D b, offs) as a Python loop; syncs once for the offsets."""
    pieces = [a_sk[start:end] @ b_ekn[group] for group, (start, end) in enumerate(_group_rows(offs_e))]
    return torch.cat(pieces)


@fused_on_cuda
def _swiglu(gate_up_n2i: torch.Tensor) -> torch.Tensor:
    gate_ni, up_ni = gate_up_n2i.chunk(2, dim=-1)
    return F.silu(gate_ni) * up_ni


def _swiglu_expert(x_nh: torch.Tensor, gate_up_2ih: torch.Tensor, down_hi: torch.Tensor) -> torch.Tensor:
    return F.linear(_swiglu(F.linear(x_nh, gate_up_2ih)), down_hi)


def _sum_over_slots(terms_tkh) -> torch.Tensor:
    """sum_k of terms[:, k], slot after slot. Written as k additions rather than a reduction over dim 1
    because out_tkh arrives as a gather (rows picked by the inverse permutation): compiled, the additions
    become one elementwise kernel reading each slot's row contiguously, where the reduction over the
    strided slot dim ran at a ninth of the memory bandwidth (H200, k = 10, hidden 2048)."""
    total_th = terms_tkh[:, 0]
    for slot in range(1, terms_tkh.shape[1]):
        total_th = total_th + terms_tkh[:, slot]
    return total_th


@fused_on_cuda
def _weighted_swiglu(gate_up_s2i: torch.Tensor, weight_s: torch.Tensor) -> torch.Tensor:
    """w * silu(gate) * up per pair, w cast to the activation dtype as HF casts it (one fused kernel on
    CUDA, whose backward recomputes the activation from the gate/up rows instead of keeping it)."""
    return _swiglu(gate_up_s2i) * weight_s.to(gate_up_s2i.dtype).unsqueeze(-1)


@fused_on_cuda
def _sum_slots_in_fp32(out_tkh: torch.Tensor) -> torch.Tensor:
    """sum_k out[t, k], the k terms added in fp32 (one fused kernel on CUDA)."""
    return _sum_over_slots(out_tkh.float()).to(out_tkh.dtype)


class _PermuteRows(torch.autograd.Function):
    """a[perm] whose backward is the gather by the inverse permutation (no scatter, no atomics)."""

    @staticmethod
    def forward(ctx, a_nh: torch.Tensor, perm_n: torch.Tensor, inverse_n: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(inverse_n)
        return a_nh.index_select(0, perm_n)

    @staticmethod
    def backward(ctx, grad_nh: torch.Tensor):
        (inverse_n,) = ctx.saved_tensors
        return grad_nh.index_select(0, inverse_n), None, None


# One opaque op for the weight gradient's gather and GEMM. Compiled, the gather would otherwise be a
# separate node that needs only forward values, which torch.compile's partitioner computes in forward
# and keeps (the very rows this is meant not to keep); as part of an op that also reads the incoming
# gradient it can only run in backward.
@torch.library.custom_op("qwen3next::gathered_rows_weight_grad", mutates_args=())
def _gathered_rows_weight_grad(
    x_th: torch.Tensor, token_of_pair_s: torch.Tensor, grad_sn: torch.Tensor, offs_e: torch.Tensor
) -> torch.Tensor:
    """[E, n, h]: grad^T @ x[token of each pair] over each expert's rows."""
    return _grouped_weight_grad(grad_sn, x_th.index_select(0, token_of_pair_s), offs_e)


@_gathered_rows_weight_grad.register_fake
def _(x_th, token_of_pair_s, grad_sn, offs_e):
    return grad_sn.new_empty(offs_e.shape[0], grad_sn.shape[1], x_th.shape[1])


class _GatherThenGroupedMM(torch.autograd.Function):
    """x[order // k] @ gate_up[e]^T for each pair (rows in expert order), keeping only the token rows
    x for backward, not the k-times-larger gathered rows: backward gathers them again for the weight
    gradient. The input gradient puts the pair gradients back in (token, slot) order with a gather
    and sums the k slots in fp32 (`_sum_over_slots`), where index_select's own backward would
    index_add them with bf16 atomics."""

    @staticmethod
    def forward(ctx, x_th, gate_up_eih, order_s, inverse_s, offs_e, top_k: int):
        token_of_pair_s = torch.div(order_s, top_k, rounding_mode="floor")
        ctx.save_for_backward(x_th, gate_up_eih, token_of_pair_s, inverse_s, offs_e)
        ctx.top_k = top_k
        x_sh = x_th.index_select(0, token_of_pair_s)
        return _grouped_mm(x_sh, gate_up_eih.transpose(-2, -1), offs_e)

    @staticmethod
    def backward(ctx, grad_s2i: torch.Tensor):
        x_th, gate_up_eih, token_of_pair_s, inverse_s, offs_e = ctx.saved_tensors
        grad_x = grad_gate_up = None
        grad_s2i = grad_s2i.contiguous()
        if ctx.needs_input_grad[0]:
            grad_sh = _grouped_mm(grad_s2i, gate_up_eih, offs_e)
            grad_tkh = grad_sh.index_select(0, inverse_s).view(x_th.shape[0], ctx.top_k, x_th.shape[1])
            grad_x = _sum_over_slots(grad_tkh.float()).to(grad_sh.dtype)  # added in fp32
        if ctx.needs_input_grad[1]:
            grad_gate_up = _gathered_rows_weight_grad(x_th, token_of_pair_s, grad_s2i, offs_e)
        return grad_x, grad_gate_up, None, None, None, None
