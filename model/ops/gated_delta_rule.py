"""The gated delta rule, the recurrence inside the Gated DeltaNet mixer, behind one function.

`chunk_gated_delta_rule` runs fla's Triton kernel on CUDA when fla is importable and the pure-torch
chunked reference otherwise (the CPU training path, differentiable by autograd). Both follow fla's
"head-first=False" convention; per sequence and value head, with fp32 state S [K, V]:

    S = S * exp(g_t);  u_t = beta_t * (v_t - S^T k_t);  S = S + k_t u_t^T;  o_t = scale * S^T q_t

`naive_recurrent_gated_delta_rule` is that loop written out token by token: the test oracle.

Shape legend: b batch, t tokens, h query/key heads, hv value heads (a multiple of h: each q/k head
serves hv // h consecutive value heads, as in HF Qwen3-Next), k key dim, v value dim, n sequences
(b, or len(cu_seqlens) - 1 when packed), m total tokens (b * t), c chunk length, nc chunks.
"""

import contextlib
import functools
import itertools
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from model.ops.fusion import fused_on_cuda

__all__ = [
    "chunk_gated_delta_rule",
    "chunk_gated_delta_rule_reference",
    "naive_recurrent_gated_delta_rule",
]

L2NORM_EPS = 1e-6  # inside the rsqrt, as HF transformers' and fla's l2norm have it


# A kernel boundary for torch.compile, on both paths: fla's entry point is compiler-disabled itself,
# and inductor mis-compiled the reference's backward (wrong dA_log / ddt_bias gradients with the
# decoder layers compiled on CPU, torch 2.13), so compiled layers call this eagerly.
@torch.compiler.disable
def chunk_gated_delta_rule(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    g: Tensor,
    beta: Tensor,
    *,
    scale: float | None = None,
    initial_state: Tensor | None = None,
    output_final_state: bool = False,
    cu_seqlens: Tensor | None = None,
    cu_seqlens_cpu: Tensor | None = None,
    use_qk_l2norm: bool = True,
    chunk_size: int = 64,
) -> tuple[Tensor, Tensor | None]:
    """Gated delta rule over [b, t, ...] inputs; fla's kernel on CUDA, the torch reference elsewhere.

    q, k: [b, t, h, k]; v: [b, t, hv, v]; g (log-decay, <= 0), beta (in (0, 1)): [b, t, hv].
    scale defaults to k ** -0.5. With use_qk_l2norm, q and k are L2-normalised over their last dim.
    cu_seqlens: optional [n+1] cumulative lengths of sequences packed into the single row of a b=1
    batch; each sequence starts from its own initial_state [n, hv, k, v] (zeros when None).
    cu_seqlens_cpu: the same offsets on the host, if the caller has them: both paths plan their
    chunks from the lengths, and reading them off a CUDA tensor would wait for the GPU.
    Returns o [b, t, hv, v] in v's dtype and, if output_final_state, the final state [n, hv, k, v]
    in fp32 (float64 for float64 inputs on the reference path). chunk_size only steers the
    reference: fla's kernel always uses 64.
    """
    check_inputs(q, k, v, g, beta, initial_state, cu_seqlens, cu_seqlens_cpu)
    options = dict(
        scale=scale,
        initial_state=initial_state,
        output_final_state=output_final_state,
        cu_seqlens=cu_seqlens,
        cu_seqlens_cpu=cu_seqlens_cpu,
        use_qk_l2norm=use_qk_l2norm,
    )
    fla_kernel = _load_fla_kernel() if q.is_cuda else None
    if fla_kernel is None:
        return chunk_gated_delta_rule_reference(q, k, v, g, beta, chunk_size=chunk_size, **options)
    grouped_heads = _fla_takes_grouped_value_heads()
    internals = None if grouped_heads else _fla_chunk_internals()
    return _run_fla(fla_kernel, q, k, v, g, beta, grouped_heads=grouped_heads, internals=internals, **options)


# ---------------------------------------------------------------------------------------------
# Input checks and the preprocessing shared by the reference and the oracle
# ---------------------------------------------------------------------------------------------


def check_inputs(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    g: Tensor,
    beta: Tensor,
    initial_state: Tensor | None,
    cu_seqlens: Tensor | None,
    cu_seqlens_cpu: Tensor | None = None,
) -> None:
    """Raise ValueError, naming the argument, on shapes that the convention does not allow."""
    if q.dim() != 4 or k.shape != q.shape:
        raise ValueError(f"q and k must both be [b, t, h, k]; got q {tuple(q.shape)}, k {tuple(k.shape)}")
    b, t, h, dk = q.shape
    if v.dim() != 4 or v.shape[:2] != (b, t):
        raise ValueError(f"v must be [b, t, hv, v] with q's b, t = {b}, {t}; got {tuple(v.shape)}")
    hv, dv = v.shape[2:]
    if hv % h != 0:
        raise ValueError(f"v's head count {hv} must be a multiple of q/k's head count {h}")
    for name, x in (("g", g), ("beta", beta)):
        if x.shape != (b, t, hv):
            raise ValueError(f"{name} must be [b, t, hv] = {(b, t, hv)}; got {tuple(x.shape)}")
    n = b
    if cu_seqlens is not None:
        if b != 1:
            raise ValueError(f"cu_seqlens packs sequences into one row: the batch size must be 1, not {b}")
        if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2:
            raise ValueError(f"cu_seqlens must be [n+1] with n >= 1; got {tuple(cu_seqlens.shape)}")
        n = cu_seqlens.numel() - 1
        if cu_seqlens_cpu is not None and cu_seqlens_cpu.shape != cu_seqlens.shape:
            raise ValueError(
                f"cu_seqlens_cpu {tuple(cu_seqlens_cpu.shape)} must copy cu_seqlens {tuple(cu_seqlens.shape)}"
            )
    if initial_state is not None and initial_state.shape != (n, hv, dk, dv):
        raise ValueError(
            f"initial_state must be [n, hv, k, v] = {(n, hv, dk, dv)}; got {tuple(initial_state.shape)}"
        )


def compute_dtype(*tensors: Tensor | None) -> torch.dtype:
    """fp32, or float64 when an input is float64 (so tests can check to ~1e-10)."""
    return (
        torch.float64 if any(x is not None and x.dtype == torch.float64 for x in tensors) else torch.float32
    )


def l2norm(x: Tensor) -> Tensor:
    """x / ||x|| over the last dim, with HF's and fla's eps under the square root."""
    return x * torch.rsqrt((x * x).sum(dim=-1, keepdim=True) + L2NORM_EPS)


def prepare_qk(
    q_bthk: Tensor, k_bthk: Tensor, hv: int, scale: float | None, use_qk_l2norm: bool, dtype: torch.dtype
):
    """Upcast, optionally L2-normalise, fold the scale into q, and give each value head its q/k head."""
    q_bthk, k_bthk = q_bthk.to(dtype), k_bthk.to(dtype)
    if use_qk_l2norm:
        q_bthk, k_bthk = l2norm(q_bthk), l2norm(k_bthk)
    scale = q_bthk.shape[-1] ** -0.5 if scale is None else scale
    group = hv // q_bthk.shape[2]  # value heads per q/k head, which serves them consecutively
    return (q_bthk * scale).repeat_interleave(group, dim=2), k_bthk.repeat_interleave(group, dim=2)


def sequence_bounds(cu_seqlens: Tensor | None, b: int, t: int) -> tuple[list[int], list[int]]:
    """Start and length of each sequence in the flattened [b * t] token stream."""
    if cu_seqlens is None:
        return [i * t for i in range(b)], [t] * b
    bounds = cu_seqlens.tolist()
    lengths = [end - start for start, end in itertools.pairwise(bounds)]
    if bounds[0] != 0 or bounds[-1] != b * t or min(lengths) < 0:
        raise ValueError(f"cu_seqlens must rise from 0 to the token count {b * t}; got {bounds}")
    return bounds[:-1], lengths


# ---------------------------------------------------------------------------------------------
# Chunked reference (the CPU training path)
# ---------------------------------------------------------------------------------------------
#
# Inside a chunk, with G_t = sum of g over the chunk up to and including t, and the state S0 it
# starts from, unrolling the recurrence gives
#     S_t = e^{G_t} S0 + sum_{s<=t} e^{G_t - G_s} k_s u_s^T,
# so the corrections u solve a unit lower-triangular system (the WY / UT transform):
#     (I + A) u = beta v - (beta e^{G} k) S0,   A[t, s] = beta_t e^{G_t - G_s} k_t.k_s  (s < t),
# i.e. u = u0 - w S0 with u0, w found once per chunk, all chunks at once. Only the hand-over of
# S0 from chunk to chunk is sequential:
#     o = (e^{G} q) S0 + (q k^T * e^{G_t - G_s}, s <= t) u,    S_end = e^{G_c} S0 + (e^{G_c - G} k)^T u.
# A chunk's padding (g = 0, beta = 0, k = 0) leaves the state as it is, so a sequence whose length
# is not a multiple of c ends with the right final state.


@dataclass(frozen=True)
class ChunkPlan:
    """Where each sequence's chunks live once every sequence is cut into zero-padded chunks.

    Chunks are ordered step-major: first chunk 0 of every sequence, then chunk 1, ...; within a step,
    sequences go by descending chunk count, so the sequences still running at step j are a prefix of
    that order and the scan over chunks handles all sequences at once without crossing boundaries.
    """

    token_idx_nc_c: Tensor  # token each chunk slot reads; m (a zero row) for padding slots
    slot_of_token_m: Tensor  # flat chunk slot that holds each token
    active_per_step: list[int]  # sequences that have a chunk at step j, a prefix of seq_order_n
    seq_order_n: Tensor  # sequence ids by descending chunk count
    rank_of_seq_n: Tensor  # inverse permutation of seq_order_n

    @staticmethod
    def build(starts: list[int], lengths: list[int], chunk_size: int, device: torch.device) -> "ChunkPlan":
        starts_n = torch.tensor(starts, dtype=torch.long)
        lengths_n = torch.tensor(lengths, dtype=torch.long)
        total = int(lengths_n.sum())
        chunks_n = (lengths_n + chunk_size - 1) // chunk_size
        seq_order_n = torch.argsort(chunks_n, descending=True, stable=True)
        steps = int(chunks_n.max())
        has_chunk_sn = torch.arange(steps)[:, None] < chunks_n[seq_order_n][None, :]
        step_nc, rank_nc = has_chunk_sn.nonzero(as_tuple=True)  # row-major: step-major, rank-minor
        seq_nc = seq_order_n[rank_nc]
        pos_nc_c = starts_n[seq_nc, None] + step_nc[:, None] * chunk_size + torch.arange(chunk_size)
        real_nc_c = pos_nc_c < (starts_n + lengths_n)[seq_nc, None]
        token_idx_nc_c = torch.where(real_nc_c, pos_nc_c, total)
        slot_of_token_m = torch.empty(total, dtype=torch.long)
        slot_of_token_m[token_idx_nc_c[real_nc_c]] = real_nc_c.flatten().nonzero().squeeze(1)
        return ChunkPlan(
            token_idx_nc_c=token_idx_nc_c.to(device),
            slot_of_token_m=slot_of_token_m.to(device),
            active_per_step=has_chunk_sn.sum(dim=1).tolist(),
            seq_order_n=seq_order_n.to(device),
            rank_of_seq_n=torch.argsort(seq_order_n).to(device),
        )

    def to_chunks(self, x_mh: Tensor) -> Tensor:
        """[m, hv, *d] token stream -> [nc, hv, c, *d] zero-padded chunks."""
        padded = torch.cat([x_mh, x_mh.new_zeros(1, *x_mh.shape[1:])])
        # index_select rather than indexing: its backward is index_add, much faster on CPU than index_put.
        chunks = padded.index_select(0, self.token_idx_nc_c.flatten())
        return chunks.unflatten(0, self.token_idx_nc_c.shape).transpose(1, 2)

    def from_chunks(self, x_nc_hv_c_d: Tensor) -> Tensor:
        """[nc, hv, c, d] chunks -> [m, hv, d] token stream, padding dropped."""
        return x_nc_hv_c_d.transpose(1, 2).flatten(0, 1).index_select(0, self.slot_of_token_m)


@dataclass
class ChunkTerms:
    """Per-chunk quantities of the derivation above, all [nc, hv, c, ...]."""

    u0: Tensor  # [nc, hv, c, v] corrections if the chunk started from S0 = 0
    w: Tensor  # [nc, hv, c, k] how the corrections shrink with S0: u = u0 - w S0
    q_decayed: Tensor  # [nc, hv, c, k] e^{G_t} q_t: reads S0
    attn: Tensor  # [nc, hv, c, c] decayed causal q.k within the chunk
    k_to_end: Tensor  # [nc, hv, c, k] e^{G_c - G_t} k_t: writes u into the end state
    chunk_decay: Tensor  # [nc, hv] e^{G_c}


def intra_chunk_terms(q: Tensor, k: Tensor, v: Tensor, g: Tensor, beta: Tensor) -> ChunkTerms:
    """Everything that needs no state, for all chunks at once.

    q, k: [nc, hv, c, k]; v: [nc, hv, c, v]; g, beta: [nc, hv, c].
    """
    c = g.shape[-1]
    g_cum = g.cumsum(dim=-1)
    causal_cc = torch.ones(c, c, dtype=torch.bool, device=g.device).tril()
    # Mask before exp: above the diagonal the difference is positive and could overflow.
    decay_tc = (g_cum[..., :, None] - g_cum[..., None, :]).masked_fill(~causal_cc, float("-inf")).exp()
    k_beta = k * beta[..., None]
    a_strict = ((k_beta @ k.transpose(-1, -2)) * decay_tc).tril(-1)
    rhs = torch.cat([v * beta[..., None], k_beta * g_cum.exp()[..., None]], dim=-1)
    # unitriangular: the solver takes the diagonal as ones, so (I + A) is never built.
    solved = torch.linalg.solve_triangular(a_strict, rhs, upper=False, unitriangular=True)
    u0, w = solved.split([v.shape[-1], k.shape[-1]], dim=-1)
    return ChunkTerms(
        u0=u0,
        w=w,
        q_decayed=q * g_cum.exp()[..., None],
        attn=(q @ k.transpose(-1, -2)) * decay_tc,
        k_to_end=k * (g_cum[..., -1:] - g_cum).exp()[..., None],
        chunk_decay=g_cum[..., -1].exp(),
    )


def scan_chunks(plan: ChunkPlan, terms: ChunkTerms, state_n_hv_k_v: Tensor) -> tuple[Tensor, Tensor]:
    """Hand the state from chunk to chunk; returns outputs [nc, hv, c, v] and final states [n, ...]."""
    state = state_n_hv_k_v[plan.seq_order_n]  # rank order: running sequences are a prefix
    finished: list[Tensor] = []  # states of sequences that ran out of chunks, highest ranks first
    outputs: list[Tensor] = []
    # One split per tensor rather than a slice per step: a slice's backward fills a zero tensor the
    # size of the whole input, which made the backward quadratic in the chunk count.
    steps = zip(
        *(
            x.split(plan.active_per_step)
            for x in (terms.u0, terms.w, terms.q_decayed, terms.attn, terms.k_to_end)
        ),
        terms.chunk_decay[..., None, None].split(plan.active_per_step),
        strict=True,
    )
    for u0, w, q_decayed, attn, k_to_end, chunk_decay in steps:
        active = u0.shape[0]
        if active < state.shape[0]:
            finished.append(state[active:])
            state = state[:active]
        u = u0 - w @ state
        outputs.append(q_decayed @ state + attn @ u)
        state = chunk_decay * state + k_to_end.transpose(-1, -2) @ u
    finished.append(state)
    final_ranked = torch.cat(finished[::-1])
    out = torch.cat(outputs) if outputs else terms.u0.new_zeros(terms.u0.shape)
    return out, final_ranked[plan.rank_of_seq_n]


def chunk_gated_delta_rule_reference(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    g: Tensor,
    beta: Tensor,
    *,
    scale: float | None = None,
    initial_state: Tensor | None = None,
    output_final_state: bool = False,
    cu_seqlens: Tensor | None = None,
    cu_seqlens_cpu: Tensor | None = None,
    use_qk_l2norm: bool = True,
    chunk_size: int = 64,
) -> tuple[Tensor, Tensor | None]:
    """Pure-torch chunked gated delta rule; same contract as `chunk_gated_delta_rule`.

    Computes in fp32 (float64 for float64 inputs), vectorised over sequences and heads, looping only
    over chunk positions; autograd gives gradients for every tensor input.
    """
    check_inputs(q, k, v, g, beta, initial_state, cu_seqlens, cu_seqlens_cpu)
    b, t, _, dk = q.shape
    hv, dv = v.shape[2:]
    dtype = compute_dtype(q, k, v, g, beta, initial_state)
    q_bthk, k_bthk = prepare_qk(q, k, hv, scale, use_qk_l2norm, dtype)
    starts, lengths = sequence_bounds(cu_seqlens if cu_seqlens_cpu is None else cu_seqlens_cpu, b, t)
    plan = ChunkPlan.build(starts, lengths, chunk_size, q.device)

    q_c, k_c, v_c, g_c, beta_c = (
        plan.to_chunks(x.to(dtype).flatten(0, 1)) for x in (q_bthk, k_bthk, v, g, beta)
    )
    terms = intra_chunk_terms(q_c, k_c, v_c, g_c, beta_c)
    if initial_state is None:
        initial_state = q_c.new_zeros(len(lengths), hv, dk, dv)
    o_c, final_state = scan_chunks(plan, terms, initial_state.to(dtype))
    o_bthv = plan.from_chunks(o_c).reshape(b, t, hv, dv).to(v.dtype)
    return o_bthv, (final_state if output_final_state else None)


# ---------------------------------------------------------------------------------------------
# Token-by-token oracle
# ---------------------------------------------------------------------------------------------


def naive_recurrent_gated_delta_rule(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    g: Tensor,
    beta: Tensor,
    *,
    scale: float | None = None,
    initial_state: Tensor | None = None,
    output_final_state: bool = False,
    cu_seqlens: Tensor | None = None,
    use_qk_l2norm: bool = True,
) -> tuple[Tensor, Tensor | None]:
    """The recurrence, one token at a time: slow and obviously right, the oracle of the tests.

    Computes in the inputs' precision (float64 stays float64; bf16/fp16 are raised to fp32).
    """
    check_inputs(q, k, v, g, beta, initial_state, cu_seqlens)
    b, t, _, dk = q.shape
    hv, dv = v.shape[2:]
    dtype = compute_dtype(q, k, v, g, beta, initial_state)
    q_mhk, k_mhk = (x.flatten(0, 1) for x in prepare_qk(q, k, hv, scale, use_qk_l2norm, dtype))
    v_mhv, g_mh, beta_mh = (x.to(dtype).flatten(0, 1) for x in (v, g, beta))
    starts, lengths = sequence_bounds(cu_seqlens, b, t)

    outputs: list[Tensor] = []  # [hv, v] per token, in token order
    finals: list[Tensor] = []
    for seq, (start, length) in enumerate(zip(starts, lengths, strict=True)):
        state = q_mhk.new_zeros(hv, dk, dv) if initial_state is None else initial_state[seq].to(dtype)
        for i in range(start, start + length):
            state = state * g_mh[i].exp()[:, None, None]
            recalled_hv = torch.einsum("hkv,hk->hv", state, k_mhk[i])
            u_hv = beta_mh[i][:, None] * (v_mhv[i] - recalled_hv)
            state = state + k_mhk[i][:, :, None] * u_hv[:, None, :]
            outputs.append(torch.einsum("hkv,hk->hv", state, q_mhk[i]))
        finals.append(state)
    o_bthv = torch.stack(outputs).reshape(b, t, hv, dv).to(v.dtype) if outputs else v.new_zeros(v.shape)
    return o_bthv, (torch.stack(finals) if output_final_state else None)


# ---------------------------------------------------------------------------------------------
# fla (CUDA)
# ---------------------------------------------------------------------------------------------


@functools.cache
def _load_fla_kernel() -> Callable | None:
    """fla's chunk kernel if fla-core is installed; imported on first CUDA use only."""
    try:
        from fla.ops.gated_delta_rule import chunk_gated_delta_rule as fla_chunk_gated_delta_rule
    except ImportError:
        return None
    return fla_chunk_gated_delta_rule


# fla-core 0.6.0 was measured taking 16 q/k heads for 32 value heads as they are (bench/RESULTS.md);
# 0.4.2's chunk kernels take the head count from k and index v with it, so there q/k are repeated.
FLA_GROUPED_VALUE_HEADS_SINCE = (0, 6)


def fla_takes_grouped_value_heads(version: str) -> bool:
    """Whether fla-core `version`'s chunk kernel takes fewer q/k heads than value heads as they are."""
    release = tuple(int(part) for part in version.split(".")[:2] if part.isdigit())
    return release >= FLA_GROUPED_VALUE_HEADS_SINCE


@functools.cache
def _fla_takes_grouped_value_heads() -> bool:
    try:
        import fla
    except ImportError:
        return False
    return fla_takes_grouped_value_heads(fla.__version__)


def _run_fla(
    fla_kernel: Callable,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    g: Tensor,
    beta: Tensor,
    *,
    scale: float | None,
    initial_state: Tensor | None,
    output_final_state: bool,
    cu_seqlens: Tensor | None,
    cu_seqlens_cpu: Tensor | None,
    use_qk_l2norm: bool,
    grouped_heads: bool = False,
    internals: tuple[Callable, ...] | None = None,
) -> tuple[Tensor, Tensor | None]:
    """fla's kernel on [b, t, ...] inputs. A kernel without grouped value heads gets q/k repeated
    to them: inside our call into fla-core 0.4's functions when `internals` holds them
    (`_fla_chunk_internals`), else before fla's own entry point."""
    hv, h = v.shape[2], q.shape[2]
    if cu_seqlens is not None:
        # Left in its dtype (int32 from HF works): fla caches derived indices per cu_seqlens tensor.
        cu_seqlens = cu_seqlens.to(q.device)
    if hv != h and not grouped_heads:
        if internals is not None:
            scale = q.shape[-1] ** -0.5 if scale is None else scale
            o, final_state = _FlaWithHeadsRepeatedInside.apply(
                internals, q, k, v, g, beta, scale, initial_state, output_final_state, cu_seqlens,
                cu_seqlens_cpu, use_qk_l2norm,
            )  # fmt: skip
            return o.to(v.dtype), final_state
        # Repeating q/k for a kernel without grouped value heads is exact, and autograd sums the
        # repeated heads' gradients back; each q/k head serves consecutive value heads either way.
        q, k = q.repeat_interleave(hv // h, dim=2), k.repeat_interleave(hv // h, dim=2)
    o, final_state = fla_kernel(
        q,
        k,
        v,
        g,
        beta,
        scale=scale,
        initial_state=initial_state,
        output_final_state=output_final_state,
        use_qk_l2norm_in_kernel=use_qk_l2norm,
        cu_seqlens=cu_seqlens,
        cu_seqlens_cpu=cu_seqlens_cpu,  # int64: model/documents.py makes it so once per batch
    )
    return o.to(v.dtype), final_state


# ---------------------------------------------------------------------------------------------
# fla-core 0.4.x with grouped value heads
# ---------------------------------------------------------------------------------------------
#
# fla-core 0.4.2 takes one q/k head per value head. Repeating q and k before its autograd Function
# (the plain fallback above) makes it keep the normalised, repeated q and k for backward: at the
# 80B width (16 q/k heads, 32 value heads, head dim 128) 8 KB a token a layer more than the heads
# themselves. `_FlaWithHeadsRepeatedInside` calls the same forward and backward kernels, but keeps
# q and k at their own head count and repeats them only while a kernel runs.


FLA_INTERNALS_CHECKED_ON = ("0.4.2",)  # the releases whose functions below were read


@functools.cache
def _fla_chunk_internals() -> tuple[Callable, ...] | None:
    """(l2norm_fwd, l2norm_bwd, prepare_chunk_indices, chunk_gated_delta_rule_fwd, ..._bwd) of a
    fla-core release in FLA_INTERNALS_CHECKED_ON, or None (another release, or fla missing: the plain
    path runs)."""
    try:
        import fla
        from fla.modules.l2norm import l2norm_bwd, l2norm_fwd
        from fla.ops.gated_delta_rule.chunk import chunk_gated_delta_rule_bwd, chunk_gated_delta_rule_fwd
        from fla.ops.utils.index import prepare_chunk_indices
    except ImportError:
        return None
    if fla.__version__ not in FLA_INTERNALS_CHECKED_ON:
        return None
    fla_fwd, fla_bwd = chunk_gated_delta_rule_fwd, chunk_gated_delta_rule_bwd
    return l2norm_fwd, l2norm_bwd, prepare_chunk_indices, fla_fwd, fla_bwd


def _contiguous(x: Tensor | None) -> Tensor | None:
    return None if x is None else x.contiguous()


def _on_device_of(x: Tensor):
    """fla's kernels launch on the current CUDA device: make it x's (as fla's input_guard does)."""
    return torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext()


def _repeat_heads(x_bthd: Tensor, group: int) -> Tensor:
    return _repeat_heads_fused(x_bthd, group) if group > 1 else x_bthd


# Compiled on CUDA (model/ops/fusion.py): eager, each is a strided copy or reduction kernel over a
# [T, 32, 128] tensor, run twice a layer in forward and twice in backward. Called at every batch
# shape the layer sees (evaluation, tests), hence dynamic shapes.
@fused_on_cuda(dynamic=None)
def _repeat_heads_fused(x_bthd: Tensor, group: int) -> Tensor:
    return x_bthd.repeat_interleave(group, dim=2)


@fused_on_cuda(dynamic=None)
def _sum_repeated_heads(dx_btHd: Tensor, group: int) -> Tensor:
    """The gradient of `_repeat_heads`: each head's copies summed, in fp32 at least."""
    return dx_btHd.unflatten(2, (-1, group)).sum(3, dtype=torch.promote_types(dx_btHd.dtype, torch.float32))


class _FlaWithHeadsRepeatedInside(torch.autograd.Function):
    """fla-core 0.4.2's ChunkGatedDeltaRuleFunction (its forward and backward, step for step, every
    tensor made contiguous and the device set as its input_guard does), with q/k normalised at their
    own head count and repeated to the value heads only inside each call."""

    @staticmethod
    def forward(ctx, internals, q, k, v, g, beta, scale, initial_state, output_final_state, cu_seqlens,
                cu_seqlens_cpu, use_qk_l2norm):  # fmt: skip
        l2norm_fwd, _, prepare_chunk_indices, fla_fwd, _ = internals
        q, k, v, g, beta, initial_state = (_contiguous(x) for x in (q, k, v, g, beta, initial_state))
        group = v.shape[2] // q.shape[2]
        with _on_device_of(q):
            q_rstd = k_rstd = None
            if use_qk_l2norm:  # per (token, head): the same whether done before or after repeating
                q, q_rstd = l2norm_fwd(q)
                k, k_rstd = l2norm_fwd(k)
            chunk_indices = None
            if cu_seqlens is not None:
                chunk_indices = prepare_chunk_indices(cu_seqlens, 64, cu_seqlens_cpu=cu_seqlens_cpu)
            g_cum, o, A, final_state, initial_state = fla_fwd(
                q=_repeat_heads(q, group), k=_repeat_heads(k, group), v=v, g=g, beta=beta, scale=scale,
                initial_state=initial_state, output_final_state=output_final_state, cu_seqlens=cu_seqlens,
                chunk_indices=chunk_indices,
            )  # fmt: skip
        saved = (q, q_rstd, k, k_rstd, v, g_cum, beta, A, initial_state, cu_seqlens, chunk_indices)
        ctx.save_for_backward(*saved)
        ctx.internals, ctx.scale, ctx.group, ctx.use_qk_l2norm = internals, scale, group, use_qk_l2norm
        ctx.dtypes = (q.dtype, k.dtype, v.dtype, g.dtype, beta.dtype)
        return o.to(q.dtype), final_state

    @staticmethod
    def backward(ctx, do, dht):
        _, l2norm_bwd, _, _, fla_bwd = ctx.internals
        q, q_rstd, k, k_rstd, v, g_cum, beta, A, initial_state, cu_seqlens, chunk_indices = ctx.saved_tensors
        with _on_device_of(q):
            dq, dk, dv, dbeta, dg, dh0 = fla_bwd(
                q=_repeat_heads(q, ctx.group), k=_repeat_heads(k, ctx.group), v=v, g=g_cum, beta=beta, A=A,
                scale=ctx.scale, initial_state=initial_state, do=do.contiguous(), dht=_contiguous(dht),
                cu_seqlens=cu_seqlens, chunk_indices=chunk_indices,
            )  # fmt: skip
            dq, dk = _sum_repeated_heads(dq, ctx.group), _sum_repeated_heads(dk, ctx.group)
            if ctx.use_qk_l2norm:  # linear in its gradient: summing the copies first is the same sum
                dq, dk = l2norm_bwd(q, q_rstd, dq), l2norm_bwd(k, k_rstd, dk)
        q_dtype, k_dtype, v_dtype, g_dtype, beta_dtype = ctx.dtypes
        grads = (dq.to(q_dtype), dk.to(k_dtype), dv.to(v_dtype), dg.to(g_dtype), dbeta.to(beta_dtype))
        return None, *grads, None, dh0, None, None, None, None
