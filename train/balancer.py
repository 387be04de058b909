"""Aux-loss-free load balancing (DeepSeek-V3): the one owner of the MoE layers' selection biases.

Each MoE layer (our `SparseMoeBlock`, or the AutoEP layer that replaces it) adds an fp32 bias per
expert to its router's probabilities when it picks a token's experts, and only then: the weights stay
the unbiased probabilities. After every good optimizer step the balancer raises the bias of each layer's
under-loaded experts by `rate` and lowers the over-loaded ones' (the sign of mean load - load), from
the step's global expert loads, which are the same on every rank: the biases stay equal everywhere
without a collective.

The biases are buffers named `expert_bias` on the layers, so the engine's checkpoints save and load
them with the model. They are fp32 in a model whose parameters are bf16 (on GPUs): bias steps of
1e-3 would round away in bf16. They are created after the engine is built, before any checkpoint is
loaded into it.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn


class ExpertBiasBalancer:
    """Creates a zero fp32 `expert_bias` buffer on every MoE layer and updates them after each step.

    `layers`: the MoE layers in the order of the model's RouterStats (main stack, then MTP); each has
    `num_experts` and an `expert_bias` buffer slot that is None (the engine opens one on AutoEP's).
    """

    def __init__(self, layers: Sequence[nn.Module], rate: float):
        if not layers:
            raise ValueError("loss.expert_bias_rate > 0 needs a model with MoE layers")
        self.rate = rate
        self.biases: list[torch.Tensor] = []
        for layer in layers:
            if layer.expert_bias is not None:
                raise RuntimeError(f"{type(layer).__name__} already holds an expert_bias")
            device = next(layer.parameters()).device
            layer.expert_bias = torch.zeros(layer.num_experts, dtype=torch.float32, device=device)
            self.biases.append(layer.expert_bias)

    @torch.no_grad()
    def update(self, expert_tokens_le: torch.Tensor, apply: torch.Tensor | None = None) -> None:
        """One step of the rule from the step's global counts [L, E] in the layers' order (integers,
        in any dtype). `apply`: a 0-dim bool on the biases' device, the step's `good` flag: the rule
        is applied where it is true, decided on the device so that the host need not wait for it."""
        if expert_tokens_le.shape[0] != len(self.biases):
            layers = expert_tokens_le.shape[0]
            raise ValueError(f"expert loads of {layers} layers for {len(self.biases)} biases")
        for bias_e, counts_e in zip(self.biases, expert_tokens_le, strict=True):
            counts_e = counts_e.to(bias_e.device, torch.float32)
            step_e = self.rate * torch.sign(counts_e.mean() - counts_e)
            bias_e.add_(step_e if apply is None else step_e * apply)
