"""Gated attention, every `full_attention_interval`-th layer of Qwen3-Next.

q_proj emits a query and an output gate per head; queries and keys get a per-head zero-centred
RMSNorm, then RoPE on the first `rotary_dim` dimensions only (partial rotary); KV heads are shared
by groups of query heads (GQA); the attention output is multiplied by sigmoid(gate) before o_proj.
"""

import torch
from torch import nn

from model.config import ModelConfig
from model.documents import DocumentLayout
from model.norms import RMSNorm
from model.ops.attention import causal_attention
from model.ops.fusion import fused_on_cuda


class RotaryEmbedding(nn.Module):
    """cos/sin tables for the rotated part of each head (NeoX half-split layout, as HF).

    The inverse frequencies are recomputed per call (rotary_dim / 2 numbers) rather than kept in a
    buffer, so a model built on the meta device and materialised later needs no buffer fix-up.
    """

    def __init__(self, rotary_dim: int, theta: float):
        super().__init__()
        self.rotary_dim, self.theta = rotary_dim, theta

    def forward(self, position_ids_bt: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        exponents = torch.arange(0, self.rotary_dim, 2, dtype=torch.float32, device=position_ids_bt.device)
        inv_freq = 1.0 / (self.theta ** (exponents / self.rotary_dim))
        freqs_btr = position_ids_bt[..., None].float() * inv_freq
        angles_btd = torch.cat([freqs_btr, freqs_btr], dim=-1)
        return angles_btd.cos().to(dtype), angles_btd.sin().to(dtype)


@fused_on_cuda
def apply_partial_rotary(x_bhtd: torch.Tensor, cos_btr: torch.Tensor, sin_btr: torch.Tensor) -> torch.Tensor:
    rot = cos_btr.shape[-1]
    x_rot, x_pass = x_bhtd[..., :rot], x_bhtd[..., rot:]
    half = rot // 2
    rotated_half = torch.cat([-x_rot[..., half:], x_rot[..., :half]], dim=-1)
    x_rot = x_rot * cos_btr[:, None] + rotated_half * sin_btr[:, None]
    return torch.cat([x_rot, x_pass], dim=-1)


@fused_on_cuda
def gate_output(o_btf: torch.Tensor, gate_btf: torch.Tensor) -> torch.Tensor:
    return o_btf * torch.sigmoid(gate_btf)


class GatedAttention(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        hidden, bias = config.hidden_size, config.attention_bias
        self.q_proj = nn.Linear(hidden, self.num_heads * self.head_dim * 2, bias=bias)
        self.k_proj = nn.Linear(hidden, self.num_kv_heads * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(hidden, self.num_kv_heads * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, hidden, bias=bias)
        self.q_norm = RMSNorm(self.head_dim, eps=config.rms_norm_eps)
        self.k_norm = RMSNorm(self.head_dim, eps=config.rms_norm_eps)

    def forward(
        self, x_btd: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], layout: DocumentLayout
    ) -> torch.Tensor:
        b, t, _ = x_btd.shape
        # Per head, q_proj's output is [query (head_dim) | gate (head_dim)].
        q_bthd, gate_bthd = self.q_proj(x_btd).view(b, t, self.num_heads, 2 * self.head_dim).chunk(2, dim=-1)
        q_bhtd = self.q_norm(q_bthd).transpose(1, 2)
        k_bhtd = self.k_norm(self.k_proj(x_btd).view(b, t, self.num_kv_heads, self.head_dim)).transpose(1, 2)
        v_bhtd = self.v_proj(x_btd).view(b, t, self.num_kv_heads, self.head_dim).transpose(1, 2)
        cos, sin = rope
        q_bhtd, k_bhtd = apply_partial_rotary(q_bhtd, cos, sin), apply_partial_rotary(k_bhtd, cos, sin)
        o_bhtd = causal_attention(
            q_bhtd,
            k_bhtd,
            v_bhtd,
            scale=self.head_dim**-0.5,
            segment_ids_bt=layout.segment_ids_bt,
            cu_seqlens_n1=layout.cu_seqlens_n1,
            max_seqlen=layout.max_seqlen,
        )
        return self.o_proj(gate_output(o_bhtd.transpose(1, 2).reshape(b, t, -1), gate_bthd.reshape(b, t, -1)))
