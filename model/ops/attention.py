"""Causal softmax attention with grouped KV heads and optional document masking.

One path for now, PyTorch SDPA: unpacked batches take its `is_causal` fast path (flash / efficient
kernels on GPU); packed batches pass a block-diagonal causal mask built from segment ids, so no
token attends across a document boundary. Legend: b batch, h heads, t query/key position, d head dim.
"""

import torch
import torch.nn.functional as F


def document_causal_mask(segment_ids_bt: torch.Tensor) -> torch.Tensor:
    """Boolean [b, 1, t, t] mask: True where query i may attend key j (j <= i, same segment)."""
    t = segment_ids_bt.shape[1]
    causal_tt = torch.ones(t, t, dtype=torch.bool, device=segment_ids_bt.device).tril()
    same_segment_btt = segment_ids_bt[:, :, None] == segment_ids_bt[:, None, :]
    return (same_segment_btt & causal_tt)[:, None]


def causal_attention(
    q_bhtd: torch.Tensor,
    k_bhtd: torch.Tensor,
    v_bhtd: torch.Tensor,
    *,
    scale: float,
    segment_ids_bt: torch.Tensor | None = None,
) -> torch.Tensor:
    """softmax(q k^T * scale) v, causal, KV heads shared by consecutive query-head groups."""
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
