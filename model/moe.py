"""Sparse MoE of Qwen3-Next: fp32 softmax router, top-k renormalised, SwiGLU experts, gated shared expert.

The block keeps HF's module names and fused expert storage (`gate`, `experts.gate_up_proj`
[E, 2I, H], `experts.down_proj` [E, H, I], `shared_expert`, `shared_expert_gate`) because
DeepSpeed's AutoEP finds and replaces MoE blocks of exactly this shape for expert parallelism.

The block returns its output together with its `RouterStats`: how many (token, slot) pairs it sent
to each expert (from the experts it actually picked, selection bias included), and the sums of its
softmax probabilities and squared logsumexps, the inputs of the load-balancing and z losses. They
travel out as return values, not through a side channel, so that compiled layers, activation
checkpointing's recomputation and any number of layers need nothing special. A layer that replaces
the block (AutoEP's) is adapted to return the same (parallel/engine.py).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from model.config import ModelConfig
from model.ops.experts import expert_token_counts, routed_experts
from model.ops.fusion import fused_on_cuda


@fused_on_cuda
def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return F.silu(gate) * up


@fused_on_cuda
def add_gated_shared(
    routed_td: torch.Tensor, shared_td: torch.Tensor, shared_logit_t1: torch.Tensor
) -> torch.Tensor:
    return routed_td + torch.sigmoid(shared_logit_t1) * shared_td


class SwiGLU(nn.Module):
    """Dense SwiGLU MLP: the shared expert, and the MLP of any `mlp_only_layers`."""

    def __init__(self, hidden: int, intermediate: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden, intermediate, bias=False)
        self.up_proj = nn.Linear(hidden, intermediate, bias=False)
        self.down_proj = nn.Linear(intermediate, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(swiglu(self.gate_proj(x), self.up_proj(x)))


class Experts(nn.Module):
    """E SwiGLU experts stored fused; rows 0..I-1 of gate_up_proj are the gate, I..2I-1 the up."""

    def __init__(self, num_experts: int, hidden: int, intermediate: int):
        super().__init__()
        self.num_experts = num_experts
        self.gate_up_proj = nn.Parameter(torch.empty(num_experts, 2 * intermediate, hidden))
        self.down_proj = nn.Parameter(torch.empty(num_experts, hidden, intermediate))

    def forward(
        self, x_td: torch.Tensor, topk_idx_tk: torch.Tensor, topk_weight_tk: torch.Tensor
    ) -> torch.Tensor:
        return routed_experts(x_td, topk_idx_tk, topk_weight_tk, self.gate_up_proj, self.down_proj)


class RouterStats(NamedTuple):
    """One MoE layer's routing in one forward, over its T tokens."""

    counts_e: torch.Tensor  # int64 [E]: (token, slot) pairs sent to each expert
    prob_sums_e: torch.Tensor  # fp32 [E]: sum over tokens of the softmax probabilities (differentiable)
    z_sum: torch.Tensor  # fp32 []: sum over tokens of logsumexp(logits)^2 (differentiable)


def router_stats(logits_te: torch.Tensor, probs_te: torch.Tensor, counts_e: torch.Tensor) -> RouterStats:
    """The statistics of a routing: `probs_te` the fp32 softmax of `logits_te`, `counts_e` how many
    (token, slot) pairs went to each expert."""
    # logsumexp(x) = x_j - log softmax(x)_j for any j. With j the most probable expert (p_j >= 1/E,
    # so the log is accurate) this reuses the softmax that routing keeps for its backward anyway,
    # where logsumexp would keep another fp32 copy of the logits.
    top_prob_t, top_idx_t = probs_te.max(dim=-1)
    logsumexp_t = logits_te.gather(-1, top_idx_t[:, None]).squeeze(-1).float() - top_prob_t.log()
    return RouterStats(
        counts_e=counts_e.long(),
        prob_sums_e=probs_te.sum(dim=0),
        z_sum=logsumexp_t.square().sum(),
    )


def route(
    router_logits_te: torch.Tensor,
    top_k: int,
    renormalize: bool,
    selection_bias_e: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top-k experts per token by softmax probability (fp32), optionally renormalised to sum to 1.
    Returns the weights [T, k], the experts [T, k] and the probabilities [T, E].

    selection_bias_e (aux-loss-free balancing, DeepSeek-V3): added to the probabilities only to pick
    the experts; the weights stay the picked experts' unbiased probabilities.
    """
    probs_te = router_logits_te.float().softmax(dim=-1)
    if selection_bias_e is None:
        topk_prob_tk, topk_idx_tk = probs_te.topk(top_k, dim=-1)
    else:
        topk_idx_tk = (probs_te + selection_bias_e.float()).topk(top_k, dim=-1).indices
        topk_prob_tk = probs_te.gather(-1, topk_idx_tk)
    if renormalize:
        topk_prob_tk = topk_prob_tk / topk_prob_tk.sum(dim=-1, keepdim=True)
    return topk_prob_tk, topk_idx_tk, probs_te


class SparseMoeBlock(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.num_experts = config.num_experts
        self.num_experts_per_tok = config.num_experts_per_tok
        self.norm_topk_prob = config.norm_topk_prob
        hidden = config.hidden_size
        self.gate = nn.Linear(hidden, config.num_experts, bias=False)
        self.experts = Experts(config.num_experts, hidden, config.moe_intermediate_size)
        self.shared_expert = SwiGLU(hidden, config.shared_expert_intermediate_size)
        self.shared_expert_gate = nn.Linear(hidden, 1, bias=False)
        # the aux-loss-free selection bias, fp32 [E]: a buffer (checkpointed) that the training loop's
        # balancer fills and updates (train/balancer.py); None without it
        self.register_buffer("expert_bias", None)

    def forward(self, x_btd: torch.Tensor) -> tuple[torch.Tensor, RouterStats]:
        x_td = x_btd.reshape(-1, x_btd.shape[-1])
        logits_te = self.gate(x_td)
        topk_weight_tk, topk_idx_tk, probs_te = route(
            logits_te, self.num_experts_per_tok, self.norm_topk_prob, self.expert_bias
        )
        stats = router_stats(logits_te, probs_te, expert_token_counts(topk_idx_tk, self.num_experts))
        routed_td = self.experts(x_td, topk_idx_tk, topk_weight_tk.to(x_td.dtype))
        shared_td = self.shared_expert(x_td)
        out_td = add_gated_shared(routed_td, shared_td, self.shared_expert_gate(x_td))
        return out_td.view_as(x_btd), stats


def moe_blocks(model: nn.Module) -> list[SparseMoeBlock]:
    """The model's MoE blocks in call order (main stack, then MTP): the order of their RouterStats."""
    return [module for module in model.modules() if isinstance(module, SparseMoeBlock)]
