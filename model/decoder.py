"""One decoder layer: x = x + mixer(input_layernorm(x)); x = x + mlp(post_attention_layernorm(x)).

The mixer is Gated DeltaNet (`linear_attn`) or gated attention (`self_attn`); the MLP is the
sparse MoE, or a dense SwiGLU for `mlp_only_layers`. Module names follow HF's checkpoints. A layer
returns its output and the MoE's RouterStats (None for a dense MLP).
"""

import torch
from torch import nn

from model.attention import GatedAttention
from model.config import ModelConfig
from model.deltanet import GatedDeltaNet
from model.documents import DocumentLayout
from model.moe import RouterStats, SparseMoeBlock, SwiGLU
from model.norms import RMSNorm


class DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, layer_type: str, moe: bool):
        super().__init__()
        self.layer_type = layer_type
        self.moe = moe
        if layer_type == "linear_attention":
            self.linear_attn = GatedDeltaNet(config)
        elif layer_type == "full_attention":
            self.self_attn = GatedAttention(config)
        else:
            raise ValueError(f"unknown layer type {layer_type!r}")
        self.mlp = SparseMoeBlock(config) if moe else SwiGLU(config.hidden_size, config.intermediate_size)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(
        self, x_btd: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], layout: DocumentLayout
    ) -> tuple[torch.Tensor, RouterStats | None]:
        h_btd = self.input_layernorm(x_btd)
        if self.layer_type == "linear_attention":
            x_btd = x_btd + self.linear_attn(h_btd, layout)
        else:
            x_btd = x_btd + self.self_attn(h_btd, rope, layout)
        h_btd = self.post_attention_layernorm(x_btd)
        if not self.moe:
            return x_btd + self.mlp(h_btd), None
        mlp_btd, stats = self.mlp(h_btd)
        return x_btd + mlp_btd, stats
