"""Gated DeltaNet, the linear-attention mixer of three layers in four.

HF's grouped projection layout: `in_proj_qkvz` emits, per key head, [q | k | v's of its value heads |
z's of its value heads]; `in_proj_ba` likewise [b's | a's]. q, k, v go through a depthwise causal
conv + SiLU, then the chunked gated delta rule with L2-normalised q, k, beta = sigmoid(b) and
log-decay g = -exp(A_log) * softplus(a + dt_bias); the output is normed, gated by silu(z), projected.
"""

import torch
import torch.nn.functional as F
from torch import nn

from model.config import ModelConfig
from model.documents import DocumentLayout
from model.norms import GatedRMSNorm
from model.ops.conv import causal_conv1d_silu
from model.ops.gated_delta_rule import chunk_gated_delta_rule


class GatedDeltaNet(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.num_k_heads = config.linear_num_key_heads
        self.num_v_heads = config.linear_num_value_heads
        self.head_k_dim = config.linear_key_head_dim
        self.head_v_dim = config.linear_value_head_dim
        self.key_dim = self.num_k_heads * self.head_k_dim
        self.value_dim = self.num_v_heads * self.head_v_dim
        self.v_per_k = self.num_v_heads // self.num_k_heads
        hidden = config.hidden_size

        self.in_proj_qkvz = nn.Linear(hidden, 2 * self.key_dim + 2 * self.value_dim, bias=False)
        self.in_proj_ba = nn.Linear(hidden, 2 * self.num_v_heads, bias=False)
        conv_dim = 2 * self.key_dim + self.value_dim
        kernel = config.linear_conv_kernel_dim
        self.conv1d = nn.Conv1d(conv_dim, conv_dim, kernel, groups=conv_dim, padding=kernel - 1, bias=False)
        self.dt_bias = nn.Parameter(torch.ones(self.num_v_heads))
        self.A_log = nn.Parameter(torch.zeros(self.num_v_heads))
        self.norm = GatedRMSNorm(self.head_v_dim, eps=config.rms_norm_eps)
        self.out_proj = nn.Linear(self.value_dim, hidden, bias=False)

    def split_projections(self, qkvz_btf: torch.Tensor, ba_btf: torch.Tensor):
        """Undo the per-key-head grouping into q, k [b,t,Hk*dk], v, z [b,t,Hv,dv], b, a [b,t,Hv]."""
        b, t, _ = qkvz_btf.shape
        dk, dv, g = self.head_k_dim, self.head_v_dim, self.v_per_k
        qkvz = qkvz_btf.view(b, t, self.num_k_heads, 2 * dk + 2 * g * dv)
        q, k, v, z = qkvz.split([dk, dk, g * dv, g * dv], dim=-1)
        beta_logit, a = ba_btf.view(b, t, self.num_k_heads, 2 * g).split([g, g], dim=-1)
        return (
            q.reshape(b, t, self.key_dim),
            k.reshape(b, t, self.key_dim),
            v.reshape(b, t, self.value_dim),
            z.reshape(b, t, self.num_v_heads, dv),
            beta_logit.reshape(b, t, self.num_v_heads),
            a.reshape(b, t, self.num_v_heads),
        )

    def forward(self, x_btd: torch.Tensor, layout: DocumentLayout) -> torch.Tensor:
        b, t, _ = x_btd.shape
        q, k, v, z_bthv, beta_logit_bth, a_bth = self.split_projections(
            self.in_proj_qkvz(x_btd), self.in_proj_ba(x_btd)
        )
        qkv_btc = causal_conv1d_silu(torch.cat([q, k, v], dim=-1), self.conv1d.weight, layout.segment_pos_bt)
        # Contiguous here, where a compiled layer writes them so from the convolution's own kernel:
        # fla's entry would otherwise copy these strided slices eagerly, a strided copy kernel each.
        widths = [self.key_dim, self.key_dim, self.value_dim]
        q, k, v = (x.contiguous() for x in qkv_btc.split(widths, dim=-1))

        beta_bth = beta_logit_bth.sigmoid()
        g_bth = -self.A_log.float().exp() * F.softplus(a_bth.float() + self.dt_bias.float())
        q_bthk = q.reshape(b, t, self.num_k_heads, self.head_k_dim)
        k_bthk = k.reshape(b, t, self.num_k_heads, self.head_k_dim)
        v_bthv = v.reshape(b, t, self.num_v_heads, self.head_v_dim)
        if layout.is_packed:  # varlen kernels see the batch as one stream of segments
            q_bthk, k_bthk, v_bthv, g_bth, beta_bth = (
                x.flatten(0, 1).unsqueeze(0) for x in (q_bthk, k_bthk, v_bthv, g_bth, beta_bth)
            )
        o_bthv, _ = chunk_gated_delta_rule(
            q_bthk,
            k_bthk,
            v_bthv,
            g_bth,
            beta_bth,
            use_qk_l2norm=True,
            cu_seqlens=layout.cu_seqlens_n1,
            cu_seqlens_cpu=layout.cu_seqlens_host_n1,
        )
        o_bthv = self.norm(o_bthv.reshape(b, t, self.num_v_heads, self.head_v_dim), z_bthv)
        return self.out_proj(o_bthv.reshape(b, t, self.value_dim))
