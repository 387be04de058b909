"""Causal softmax attention with grouped KV heads and optional document masking.

Unpacked batches take SDPA's `is_causal` fast path (flash / efficient kernels on GPU). Packed batches
(on the GPU the training loop passes even single-document rows packed) keep every document to itself:
- on CUDA in bf16/fp16, torch's variable-length flash attention over the documents (`cu_seqlens`),
  which computes only the blocks inside documents (on an H100 a step on rows of 8 packed documents
  ran as fast as one on single-document rows), and takes the KV heads as they are, where torch's
  wrapper lets them through (2.11 on), instead of copies repeated to the query heads (at the 80B
  width their copies took 0.5 ms of a step's kernels on an H100, and the slice's peak fell 0.2
  GiB); `use_varlen(False)`, the trainer's
  `trainer.varlen_attention=false`, turns it off, and so does QWEN3NEXT_VARLEN=0 for tests);
- elsewhere (CPU, fp32, or a torch without `torch.nn.attention.varlen`), SDPA with a block-diagonal
  causal mask built from segment ids, which computes every [t, t] score and masks it (on an H200 its
  masked backward took 3.4x the forward's time at 4 x 4096 tokens).
Legend: b batch, h heads, t query/key position, d head dim,
n documents.
"""

import functools
import inspect
import os
from collections.abc import Callable

import torch
import torch.nn.functional as F


def document_causal_mask(segment_ids_bt: torch.Tensor) -> torch.Tensor:
    """Boolean [b, 1, t, t] mask: True where query i may attend key j (j <= i, same segment)."""
    t = segment_ids_bt.shape[1]
    causal_tt = torch.ones(t, t, dtype=torch.bool, device=segment_ids_bt.device).tril()
    same_segment_btt = segment_ids_bt[:, :, None] == segment_ids_bt[:, None, :]
    return (same_segment_btt & causal_tt)[:, None]


def _test_override() -> bool | None:
    override = os.environ.get("QWEN3NEXT_VARLEN")
    return None if override is None else override != "0"


_varlen_enabled = _test_override() is not False


def use_varlen(enabled: bool) -> None:
    """Whether packed documents on CUDA go through varlen flash attention (default True; the
    environment's QWEN3NEXT_VARLEN, a test override, wins)."""
    global _varlen_enabled
    override = _test_override()
    _varlen_enabled = enabled if override is None else override


def _varlen_kernel() -> tuple[Callable, dict, bool] | None:
    """torch's varlen flash attention, its keyword arguments (causal, and GQA where it asks for it)
    and whether it takes fewer KV heads than query heads; None if off."""
    return _find_varlen_kernel() if _varlen_enabled else None


@functools.cache
def _find_varlen_kernel() -> tuple[Callable, dict, bool] | None:
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    params = inspect.signature(varlen_attn).parameters
    if "is_causal" in params:  # its first form (torch 2.10): KV heads repeated to the query heads
        return varlen_attn, {"is_causal": True}, False
    if "window_size" not in params:
        return None
    # later forms take a (left, right) window, right 0 = causal, and hand the KV heads to flash
    # attention as they are, which shares each among its query-head group without a copy: asked
    # for with `enable_gqa` where the wrapper checks head counts, without where it checks nothing
    return (
        varlen_attn,
        {"window_size": (-1, 0), **({"enable_gqa": True} if "enable_gqa" in params else {})},
        True,
    )


def takes_varlen_path(q_bhtd: torch.Tensor, cu_seqlens_n1: torch.Tensor | None) -> bool:
    return (
        cu_seqlens_n1 is not None
        and q_bhtd.is_cuda
        and q_bhtd.dtype in (torch.bfloat16, torch.float16)
        and q_bhtd.shape[-1] <= 256
        and _varlen_kernel() is not None
    )


@torch.compiler.disable  # a kernel boundary, like fla's: dynamo need not trace the custom op
def varlen_causal_attention(
    q_bhtd: torch.Tensor,
    k_bhtd: torch.Tensor,
    v_bhtd: torch.Tensor,
    *,
    scale: float,
    cu_seqlens_n1: torch.Tensor,
    max_seqlen: int,
) -> torch.Tensor:
    """Causal attention inside each document of the flattened batch (documents at cu_seqlens)."""
    varlen_attn, options, takes_gqa = _varlen_kernel()
    b, h, t, d = q_bhtd.shape
    if not takes_gqa and k_bhtd.shape[1] != h:
        k_bhtd = k_bhtd.repeat_interleave(h // k_bhtd.shape[1], dim=1)
        v_bhtd = v_bhtd.repeat_interleave(h // v_bhtd.shape[1], dim=1)
    q_thd, k_thd, v_thd = (x.transpose(1, 2).reshape(b * t, x.shape[1], d) for x in (q_bhtd, k_bhtd, v_bhtd))
    cu = cu_seqlens_n1.to(torch.int32)
    o_thd = varlen_attn(q_thd, k_thd, v_thd, cu, cu, max_seqlen, max_seqlen, scale=scale, **options)
    return o_thd.view(b, t, h, d).transpose(1, 2)


def causal_attention(
    q_bhtd: torch.Tensor,
    k_bhtd: torch.Tensor,
    v_bhtd: torch.Tensor,
    *,
    scale: float,
    segment_ids_bt: torch.Tensor | None = None,
    cu_seqlens_n1: torch.Tensor | None = None,
    max_seqlen: int | None = None,
) -> torch.Tensor:
    """softmax(q k^T * scale) v, causal, KV heads shared by consecutive query-head groups.

    Packed batches give segment_ids_bt (the masked path) and, for the varlen path, cu_seqlens_n1 and
    max_seqlen of the same documents (model/documents.py's DocumentLayout has all three)."""
    if segment_ids_bt is not None and takes_varlen_path(q_bhtd, cu_seqlens_n1):
        return varlen_causal_attention(
            q_bhtd, k_bhtd, v_bhtd, scale=scale, cu_seqlens_n1=cu_seqlens_n1, max_seqlen=max_seqlen
        )
    groups = q_bhtd.shape[1] // k_bhtd.shape[1]
    if groups > 1:
        k_bhtd = k_bhtd.repeat_interleave(groups, dim=1)
        v_bhtd = v_bhtd.repeat_interleave(groups, dim=1)
    if segment_ids_bt is None:
        return F.scaled_dot_product_attention(q_bhtd, k_bhtd, v_bhtd, is_causal=True, scale=scale)
    mask = document_causal_mask(segment_ids_bt)
    return F.scaled_dot_product_attention(q_bhtd, k_bhtd, v_bhtd, attn_mask=mask, scale=scale)


def causal_attention_reference(
    q_bhtd: torch.Tensor,
    k_bhtd: torch.Tensor,
    v_bhtd: torch.Tensor,
    *,
    scale: float,
    segment_ids_bt: torch.Tensor | None = None,
) -> torch.Tensor:
    """Explicit softmax attention in fp32: the oracle for `causal_attention`."""
    groups = q_bhtd.shape[1] // k_bhtd.shape[1]
    k_bhtd = k_bhtd.repeat_interleave(groups, dim=1).float()
    v_bhtd = v_bhtd.repeat_interleave(groups, dim=1).float()
    scores_bhtt = q_bhtd.float() @ k_bhtd.transpose(-1, -2) * scale
    b, _, t, _ = q_bhtd.shape
    if segment_ids_bt is None:
        segment_ids_bt = torch.zeros(b, t, dtype=torch.long, device=q_bhtd.device)
    scores_bhtt = scores_bhtt.masked_fill(~document_causal_mask(segment_ids_bt), float("-inf"))
    return (scores_bhtt.softmax(-1) @ v_bhtd).to(q_bhtd.dtype)
