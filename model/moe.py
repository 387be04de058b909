"""Sparse MoE of Qwen3-Next: fp32 softmax router, top-k renormalised, SwiGLU experts, gated shared expert.

The block keeps HF's module names and fused expert storage (`gate`, `experts.gate_up_proj`
[E, 2I, H], `experts.down_proj` [E, H, I], `shared_expert`, `shared_expert_gate`) because
DeepSpeed's AutoEP finds and replaces MoE blocks of exactly this shape for expert parallelism.
The router logits reach the load-balancing loss through `RouterLogitsRecorder`, a forward hook on
the router, which works the same on this block and on AutoEP's replacement.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from model.config import ModelConfig
from model.ops.experts import routed_experts
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


def route(
    router_logits_te: torch.Tensor,
    top_k: int,
    renormalize: bool,
    selection_bias_e: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k experts per token by softmax probability (fp32), optionally renormalised to sum to 1.

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
    return topk_prob_tk, topk_idx_tk


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
        self.register_buffer("expert_bias", None)  # fp32 [E] once enable_expert_bias() ran

    def enable_expert_bias(self) -> None:
        """Add the aux-loss-free selection bias (zeros; a buffer, so checkpoints keep it). The
        trainer updates it between steps from the step's expert loads."""
        if self.expert_bias is None:
            self.expert_bias = torch.zeros(self.num_experts, device=self.gate.weight.device)

    def forward(self, x_btd: torch.Tensor) -> torch.Tensor:
        x_td = x_btd.reshape(-1, x_btd.shape[-1])
        topk_weight_tk, topk_idx_tk = route(
            self.gate(x_td), self.num_experts_per_tok, self.norm_topk_prob, self.expert_bias
        )
        routed_td = self.experts(x_td, topk_idx_tk, topk_weight_tk.to(x_td.dtype))
        shared_td = self.shared_expert(x_td)
        return add_gated_shared(routed_td, shared_td, self.shared_expert_gate(x_td)).view_as(x_btd)


def moe_blocks(model: nn.Module) -> list[SparseMoeBlock]:
    """The model's MoE blocks in call order (main stack, then MTP): the order of the router logits."""
    return [module for module in model.modules() if isinstance(module, SparseMoeBlock)]


class RouterLogitsRecorder:
    """Collects the output of every router module during one forward, in call order.

    `router_suffix` names the router inside a MoE block: "mlp.gate" for ours; a wrapper that
    replaces the block (AutoEP: "mlp.router.gate") attaches a recorder of its own.
    """

    def __init__(self, model: nn.Module, router_suffix: str = "mlp.gate"):
        self.logits: list[torch.Tensor] = []
        self._handles = [
            module.register_forward_hook(self._record)
            for name, module in model.named_modules()
            if name.endswith(router_suffix)
        ]

    def _record(self, module, inputs, output) -> None:
        self.logits.append(output)

    def pop(self) -> list[torch.Tensor]:
        logits, self.logits = self.logits, []
        return logits

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
