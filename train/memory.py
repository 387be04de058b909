"""Per-rank memory estimate of a training layout, from the config alone (for `trainer.dry_run`).

Bytes per parameter on GPU: bf16 weights (2) and gradients (2), fp32 master weights and two Adam
moments (12) sharded by ZeRO: stage >= 1 shards the optimizer state, >= 2 the gradients, 3 the
weights, over the data-parallel group of the parameter (world / tensor for the attention/DeltaNet
stack, world / expert for the routed experts). Tensor parallelism splits the mixers' weights,
expert parallelism the experts; embedding, LM head and the rest are replicated.

Activations are an estimate of what autograd keeps for one micro-batch (bf16), per layer:
T * 2 bytes * (10 H + 2 * mixer width / tp + top_k * (3 I + H)), where T = micro_batch * seq_len.
Each (token, slot) pair keeps its gate/up rows and the down projection's input (3 I); the H a pair
is what the measured peaks held beyond that. Until the expert path stopped keeping the gathered
input rows and the output rows for backward (model/ops/experts.py) the pairs' term was
top_k * (3 I + 3 H), fitted to the peaks below; `python -m bench.saved_activations` counts 2 H a
pair fewer kept by the compiled MoE block since. With selective recomputation
(trainer.recompute_budget <= 0.75: torch.compile's partitioner recomputes the cheap ops of every
compiled layer) a layer kept whole holds neither the 10 H nor each pair's activation (I):
T * 2 bytes * (2 * mixer width / tp + top_k * (2 I + H)); measured, the slice's peak with no layer
recomputed fell from 56.2 to 54.2 GiB (this estimate: by 1.95). A recomputed layer (activation
checkpointing) keeps only its input (T * H * 2), plus one layer's worth
while it is recomputed; `recomputed_layers` of the decoder layers are (the first ones; MTP layers
never), and backward frees the others before it recomputes them. The LM-head cross-entropy adds one
chunk of logits (2048 x vocab x 2 bytes: the bf16 logits, which their gradient overwrites) and the
heads' fp32 weight gradient (4 x vocab x H / tp), made in forward: one sum the main and MTP heads
share (model/ops/cross_entropy.py: SharedWeightGradient), except under ZeRO 1, where the heads add
it into the optimizer's fp32 gradient buffer, counted with the gradients.
Measured on an H200 at the 80B width (4 layers + MTP, 2 x 4096 tokens, bench/RESULTS.md), peak
against the estimate: before that change (and with the pairs' 3 H) every layer recomputed 52.7 GiB
against 53.3, the first 2 of 4 56.0 against 56.7, none 59.9 against 60.4; with the current expert
path 52.0 against 52.6, 54.2 against 54.9 and 56.8 against 57.3, when the cross-entropy still held
the previous chunk's gradient (6 bytes a logit); since it frees it, every layer recomputed 51.5
against 52.1. Since the chunk's gradient overwrites its logits (2 bytes a logit): every layer
recomputed 50.9 against 51.5; with the selective budget, the first 2 layers recomputed 52.1 against
52.5 and the first one 52.8 against 53.3; since fla's calls keep q and k at their own head count,
52.0 against 52.5 and 52.7 against 53.3; since the heads share one weight-gradient sum (an H100),
51.5 against 51.4 and 52.1 against 52.2 (each head's own: 52.7, the old estimate's 53.3 counted
an fp32 sum a head where the earlier heads hold their rounded copy). Since the heads add into the
optimizer's buffer under ZeRO 1 (H100s): the first layer recomputed 51.4 against 51.0, none 52.1
against 51.8; since the attention's KV heads are no longer repeated, none 51.8 against 51.8.
"""

from __future__ import annotations

from dataclasses import dataclass

from model.accounting import attention_params, count_parameters, deltanet_params, routed_expert_params
from model.config import ModelConfig

GIB = 1024**3
CE_CHUNK = 2048


@dataclass(frozen=True)
class MemoryEstimate:
    parameters: float  # bytes per rank
    gradients: float
    optimizer: float
    activations: float

    @property
    def total(self) -> float:
        return self.parameters + self.gradients + self.optimizer + self.activations


def split_parameters(c: ModelConfig) -> tuple[int, int, int]:
    """(routed experts, tensor-parallel mixers and LM head, replicated rest), MTP included."""
    counted = count_parameters(c)
    moe_layers = sum(c.is_moe_layer(i) for i in range(c.num_hidden_layers)) + c.mtp_num_layers
    experts = routed_expert_params(c) * moe_layers
    mixers = (
        sum(attention_params(c) if t == "full_attention" else deltanet_params(c) for t in c.layer_types)
        + attention_params(c) * c.mtp_num_layers
        + (0 if c.tie_word_embeddings else c.vocab_size * c.hidden_size)  # split over the vocabulary
    )
    rest = counted.total + counted.mtp - experts - mixers
    return experts, mixers, rest


def rank_parameters(c: ModelConfig, *, tensor: int, expert: int) -> tuple[float, float]:
    """(dense, expert) parameters one rank holds: the mixers and LM head split over the tensor ranks,
    the experts over the expert ranks, the rest whole (before ZeRO partitions anything)."""
    experts, mixers, rest = split_parameters(c)
    return mixers / tensor + rest, experts / expert


def estimate_memory(
    c: ModelConfig,
    *,
    world: int,
    tensor: int,
    expert: int,
    zero_stage: int,
    micro_batch_size: int,
    seq_len: int,
    recomputed_layers: int,
    recompute_budget: float = 1.0,
    lends_gradient_buffers: bool = False,
) -> MemoryEstimate:
    """lends_gradient_buffers: whether the engine lends the LM heads the optimizer's fp32 gradient
    buffers (ZeRO 1, not folded onto tensor parallelism, a checked DeepSpeed: train/dry_run.py
    knows); by default their own fp32 sum is counted."""
    dense_local, expert_local = rank_parameters(c, tensor=tensor, expert=expert)
    dense_dp, expert_dp = world // tensor, world // expert

    def sharded(count: float, group: int, stage_from: int) -> float:
        return count / group if zero_stage >= stage_from else count

    params = 2 * (sharded(dense_local, dense_dp, 3) + sharded(expert_local, expert_dp, 3))
    if zero_stage == 1:
        # DeepSpeed's BF16_Optimizer: a whole fp32 buffer for this rank's gradients; each bf16
        # gradient is freed once added into it (parallel/engine.py)
        grads = 4 * (dense_local + expert_local)
    else:  # bf16 gradients (ZeRO 0 accumulates in them); ZeRO 2 adds fp32 partitions
        grads = 2 * (sharded(dense_local, dense_dp, 2) + sharded(expert_local, expert_dp, 2))
        if zero_stage >= 2:
            grads += 4 * (sharded(dense_local, dense_dp, 2) + sharded(expert_local, expert_dp, 2))
    optim = 12 * (sharded(dense_local, dense_dp, 1) + sharded(expert_local, expert_dp, 1))
    return MemoryEstimate(
        params,
        grads,
        optim,
        activation_bytes(
            c,
            tensor,
            micro_batch_size,
            seq_len,
            recomputed_layers,
            recompute_budget,
            lends_gradient_buffers=lends_gradient_buffers,
        ),
    )


# trainer.recompute_budget at or below which the estimate takes a kept layer's cheap ops (norms,
# gates, residual sums, SwiGLU activations) as recomputed: measured at 0.75 (bench/RESULTS.md)
SELECTIVE_BUDGET = 0.75


def activation_bytes(
    c: ModelConfig,
    tensor: int,
    micro_batch_size: int,
    seq_len: int,
    recomputed_layers: int,
    recompute_budget: float = 1.0,
    lends_gradient_buffers: bool = False,
) -> float:
    """lends_gradient_buffers: the LM heads add their weight gradient into the optimizer's fp32
    gradient buffer (counted with the gradients), not into an fp32 sum of their own."""
    tokens = micro_batch_size * seq_len
    h = c.hidden_size
    key_dim = c.linear_num_key_heads * c.linear_key_head_dim
    value_dim = c.linear_num_value_heads * c.linear_value_head_dim
    widths = {
        "linear_attention": 2 * key_dim + 2 * value_dim,
        "full_attention": 2 * c.num_attention_heads * c.head_dim + 2 * c.num_key_value_heads * c.head_dim,
    }
    if recompute_budget <= SELECTIVE_BUDGET:  # the 10 H and each pair's activation (I) recomputed
        hidden_wide, moe = 0, c.num_experts_per_tok * (2 * c.moe_intermediate_size + h)
    else:
        hidden_wide, moe = 10 * h, c.num_experts_per_tok * (3 * c.moe_intermediate_size + h)
    per_layer = {t: tokens * 2 * (hidden_wide + 2 * w / tensor + moe) for t, w in widths.items()}
    recomputed = c.layer_types[:recomputed_layers]
    mtp_layers = ["full_attention"] * c.mtp_num_layers  # MTP layers are attention, never recomputed
    kept_whole = [*c.layer_types[recomputed_layers:], *mtp_layers]
    # backward frees the layers kept whole (the last ones, and MTP) before it recomputes the first
    # ones, one at a time: the peak is the larger of the two moments
    whole = max(sum(per_layer[t] for t in kept_whole), max((per_layer[t] for t in recomputed), default=0))
    # the LM head's cross-entropy: one chunk of bf16 logits (overwritten by their gradient), and the
    # weight gradient it makes in forward, where it is not added into the optimizer's buffer: one
    # fp32 sum the main and MTP heads share (the training step gives the model its heads' loss
    # weights), of this rank's vocabulary rows
    head = CE_CHUNK * c.vocab_size * 2 + (0 if lends_gradient_buffers else 4 * c.vocab_size * h / tensor)
    return len(recomputed) * tokens * h * 2 + whole + head
