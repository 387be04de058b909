"""Multi-token prediction (MTP), in the layout of the Qwen3-Next hub checkpoints (`mtp.*` keys).

Depth k (1-based) predicts token t[i+k+1] at position i from the previous depth's hidden state
h[i] (depth 0: the main model's final-normed output, as vLLM feeds it) and the embedding of
t[i+k]: h = fc(cat(pre_fc_norm_embedding(embed(t[i+k])), pre_fc_norm_hidden(h[i]))), then that
depth's decoder layer (gated attention + MoE) and the shared final `norm`. `fc` and the norms are
shared by all depths; each depth has its own layer. The embedding and LM head are the main model's.
"""

import torch
from torch import nn

from model.config import ModelConfig
from model.decoder import DecoderLayer
from model.documents import DocumentLayout
from model.norms import RMSNorm


class MultiTokenPredictor(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        hidden, eps = config.hidden_size, config.rms_norm_eps
        self.fc = nn.Linear(2 * hidden, hidden, bias=False)
        self.pre_fc_norm_embedding = RMSNorm(hidden, eps)
        self.pre_fc_norm_hidden = RMSNorm(hidden, eps)
        self.layers = nn.ModuleList(
            DecoderLayer(config, layer_type="full_attention", moe=True) for _ in range(config.mtp_num_layers)
        )
        self.norm = RMSNorm(hidden, eps)

    def forward(
        self,
        depth: int,
        h_prev_btd: torch.Tensor,
        next_embeds_btd: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor],
        layout: DocumentLayout,
    ) -> torch.Tensor:
        """One depth (1-based); returns its final-normed hidden state, input of the next depth, and
        its MoE layer's RouterStats."""
        x_btd = torch.cat(
            [self.pre_fc_norm_embedding(next_embeds_btd), self.pre_fc_norm_hidden(h_prev_btd)], -1
        )
        x_btd, stats = self.layers[depth - 1](self.fc(x_btd), rope, layout)
        return self.norm(x_btd), stats
