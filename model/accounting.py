"""Parameter and FLOP accounting from the config alone (works for 80B without building anything).

Counts follow Megatron's convention for training FLOPs: every GEMM costs 6 x its parameters per
token (2 forward, 4 backward); softmax attention adds QK^T and AV, halved for causality; the Gated
DeltaNet core adds its chunked state and intra-chunk products (documented in `deltanet_core_flops`).
"Active" parameters are those one token touches: everything but the experts, plus top-k of them.
"""

from __future__ import annotations

from dataclasses import dataclass

from model.config import ModelConfig

DELTANET_CHUNK = 64


@dataclass(frozen=True)
class ParameterCount:
    total: int  # whole model without MTP
    active: int  # per token, without MTP (embedding and LM head included)
    embedding: int  # input embedding + LM head (one copy if tied)
    experts: int  # routed experts without MTP
    mtp: int  # the MTP module(s), not in `total`

    @property
    def active_without_embedding(self) -> int:
        return self.active - self.embedding


def attention_params(c: ModelConfig) -> int:
    h, d = c.hidden_size, c.head_dim
    q_gate = h * 2 * c.num_attention_heads * d
    kv = 2 * h * c.num_key_value_heads * d
    out = c.num_attention_heads * d * h
    bias = (2 * c.num_attention_heads + 2 * c.num_key_value_heads) * d + h if c.attention_bias else 0
    return q_gate + kv + out + bias + mixer_small_params(c, "full_attention")


def deltanet_params(c: ModelConfig) -> int:
    h = c.hidden_size
    key_dim = c.linear_num_key_heads * c.linear_key_head_dim
    value_dim = c.linear_num_value_heads * c.linear_value_head_dim
    projections = h * (2 * key_dim + 2 * value_dim) + h * 2 * c.linear_num_value_heads + value_dim * h
    return projections + mixer_small_params(c, "linear_attention")


def mixer_small_params(c: ModelConfig, layer_type: str) -> int:
    """A mixer's parameters that are no GEMM weights: q/k norms; or conv, A_log, dt_bias, gated norm."""
    if layer_type == "full_attention":
        return 2 * c.head_dim
    conv_channels = (
        2 * c.linear_num_key_heads * c.linear_key_head_dim
        + c.linear_num_value_heads * c.linear_value_head_dim
    )
    return conv_channels * c.linear_conv_kernel_dim + 2 * c.linear_num_value_heads + c.linear_value_head_dim


def routed_expert_params(c: ModelConfig) -> int:
    return c.num_experts * 3 * c.moe_intermediate_size * c.hidden_size


def moe_dense_params(c: ModelConfig) -> int:
    """Router, shared expert and its gate: the MoE parameters every token uses."""
    h = c.hidden_size
    return h * c.num_experts + 3 * h * c.shared_expert_intermediate_size + h


def layer_params(c: ModelConfig, layer_type: str, moe: bool) -> tuple[int, int]:
    """(total, active) parameters of one decoder layer."""
    mixer = deltanet_params(c) if layer_type == "linear_attention" else attention_params(c)
    norms = 2 * c.hidden_size
    if moe:
        routed = routed_expert_params(c)
        active_routed = routed * c.num_experts_per_tok // c.num_experts
        dense = mixer + norms + moe_dense_params(c)
        return dense + routed, dense + active_routed
    mlp = 3 * c.hidden_size * c.intermediate_size
    return mixer + norms + mlp, mixer + norms + mlp


def mtp_params(c: ModelConfig) -> tuple[int, int]:
    h = c.hidden_size
    total, active = 2 * h * h + 3 * h, 2 * h * h + 3 * h  # fc, two pre-fc norms, final norm
    for _ in range(c.mtp_num_layers):
        layer_total, layer_active = layer_params(c, "full_attention", moe=True)
        total, active = total + layer_total, active + layer_active
    return (total, active) if c.mtp_num_layers else (0, 0)


def count_parameters(c: ModelConfig) -> ParameterCount:
    embedding = c.vocab_size * c.hidden_size * (1 if c.tie_word_embeddings else 2)
    total = active = embedding + c.hidden_size  # + final norm
    experts = 0
    for i, layer_type in enumerate(c.layer_types):
        layer_total, layer_active = layer_params(c, layer_type, c.is_moe_layer(i))
        total, active = total + layer_total, active + layer_active
        experts += routed_expert_params(c) if c.is_moe_layer(i) else 0
    return ParameterCount(total, active, embedding, experts, mtp_params(c)[0])


def attention_core_flops(c: ModelConfig, seq_len: int) -> float:
    """Training FLOPs per token of QK^T and AV in one gated-attention layer (causal: half)."""
    forward = 2 * 2 * c.num_attention_heads * c.head_dim * seq_len / 2
    return 3 * forward


def deltanet_core_flops(c: ModelConfig) -> float:
    """Training FLOPs per token of the chunked gated delta rule in one layer.

    Per value head and token, forward: three dk x dv state products (read by q, read by k, write
    k^T u) and the intra-chunk products q k^T, k k^T (dk each), A u and the WY terms (dv, dk),
    triangular within a chunk (so C / 2 partners on average).
    """
    dk, dv, chunk = c.linear_key_head_dim, c.linear_value_head_dim, DELTANET_CHUNK
    forward = 2 * (3 * dk * dv + chunk / 2 * (3 * dk + 2 * dv))
    return 3 * forward * c.linear_num_value_heads


def flops_per_token(c: ModelConfig, seq_len: int, with_mtp: bool = True) -> float:
    """Training FLOPs (forward + backward) per token at `seq_len`, Megatron's convention."""
    params = count_parameters(c)
    embedding_lookup = c.vocab_size * c.hidden_size  # a gather, not a GEMM
    gemm_params = params.active - embedding_lookup - _norm_and_small_params(c)
    flops = 6 * gemm_params
    for layer_type in c.layer_types:
        flops += (
            attention_core_flops(c, seq_len) if layer_type == "full_attention" else deltanet_core_flops(c)
        )
    if with_mtp and c.mtp_num_layers:
        h = c.hidden_size
        _, mtp_layer_active = layer_params(c, "full_attention", moe=True)
        per_depth = 2 * h * h + mtp_layer_active - _layer_small_params(c, "full_attention") + c.vocab_size * h
        flops += c.mtp_num_layers * (6 * per_depth + attention_core_flops(c, seq_len))
    return float(flops)


def _layer_small_params(c: ModelConfig, layer_type: str) -> int:
    """Parameters of a layer that are not GEMM weights (norms, conv, decay), left out of 6N."""
    return 2 * c.hidden_size + mixer_small_params(c, layer_type)


def _norm_and_small_params(c: ModelConfig) -> int:
    return c.hidden_size + sum(_layer_small_params(c, t) for t in c.layer_types)
