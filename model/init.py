"""Seeded, documented initialisation: the same weights on every run, machine and layout.

Each parameter draws from its own CPU generator seeded by (seed, parameter name), so the values do
not depend on construction order, the device, or which rank initialises which shard.

| parameter                                     | init                                       |
|-----------------------------------------------|--------------------------------------------|
| embeddings, LM head, input projections,       | N(0, initializer_range)                    |
|   router, experts' gate_up, MTP fc            |                                            |
| output projections (o_proj, out_proj,         | N(0, initializer_range / sqrt(2 * layers)) |
|   down_proj, experts' down_proj)              |                                            |
| zero-centred RMSNorm weights                  | 0 (scale 1 + w = 1)                        |
| gated RMSNorm weight (DeltaNet output norm)   | 1                                          |
| DeltaNet depthwise conv                       | U(-1/sqrt(k), 1/sqrt(k)) (torch's default) |
| DeltaNet A_log                                | log U(1, 16) (decay rates as Mamba2 / fla) |
| DeltaNet dt_bias                              | softplus^-1(dt), dt log-uniform [1e-3, 0.1]|
| biases                                        | 0                                          |

The output projections are scaled down by the depth so that the residual stream's variance does
not grow with the number of layers (GPT-2 / Megatron's scaled init).
"""

import hashlib
import math

import torch
from torch import nn

from model.config import ModelConfig

OUTPUT_PROJECTIONS = ("o_proj.weight", "out_proj.weight", "down_proj.weight", "experts.down_proj")


def parameter_generator(seed: int, name: str) -> torch.Generator:
    digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))


def initial_value(name: str, shape: torch.Size, config: ModelConfig, gen: torch.Generator) -> torch.Tensor:
    """The float32 initial value of parameter `name` (a key of the model's state dict)."""
    std = config.initializer_range
    if name.endswith(
        ("norm.weight", "layernorm.weight", "pre_fc_norm_embedding.weight", "pre_fc_norm_hidden.weight")
    ):
        if ".linear_attn.norm." in name:  # the gated norm multiplies by w itself
            return torch.ones(shape)
        return torch.zeros(shape)
    if name.endswith(".bias"):
        return torch.zeros(shape)
    if name.endswith("conv1d.weight"):
        bound = 1.0 / math.sqrt(shape[-1])
        return torch.empty(shape).uniform_(-bound, bound, generator=gen)
    if name.endswith("A_log"):
        return torch.empty(shape).uniform_(1.0, 16.0, generator=gen).log_()
    if name.endswith("dt_bias"):
        log_dt = torch.empty(shape).uniform_(math.log(1e-3), math.log(1e-1), generator=gen)
        dt = log_dt.exp()
        return dt + torch.log(-torch.expm1(-dt))  # inverse softplus
    if name.endswith(OUTPUT_PROJECTIONS):
        std = std / math.sqrt(2 * (config.num_hidden_layers + config.mtp_num_layers))
    return torch.empty(shape).normal_(0.0, std, generator=gen)


@torch.no_grad()
def init_weights(model: nn.Module, config: ModelConfig, seed: int) -> None:
    """Overwrite every parameter of `model` (on any real device) with its seeded initial value."""
    for name, param in model.named_parameters():
        value = initial_value(name, param.shape, config, parameter_generator(seed, name))
        param.copy_(value.to(device=param.device, dtype=param.dtype))
