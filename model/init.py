"""Seeded, documented initialisation: the same weights on every run, machine and layout.

Each parameter draws from its own CPU generator seeded by (seed, parameter name); each expert of a
fused expert tensor (`mlp.experts.gate_up_proj` [E, 2I, H], `mlp.experts.down_proj` [E, H, I])
from its own generator seeded by (seed, name, expert index). So the values depend neither on the
construction order nor on the device, and a rank that keeps some experts, or a slice of a matrix,
computes exactly those values of the 1-process model without drawing the others' experts
(`initial_value(..., experts=...)`).

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

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence

import torch
from torch import nn

from model.config import ModelConfig

OUTPUT_PROJECTIONS = ("o_proj.weight", "out_proj.weight", "down_proj.weight", "experts.down_proj")
FUSED_EXPERTS = ("mlp.experts.gate_up_proj", "mlp.experts.down_proj")


def parameter_generator(seed: int, name: str) -> torch.Generator:
    digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))


def is_fused_experts(name: str) -> bool:
    """Whether `name` is a fused expert tensor, whose dim 0 indexes the experts."""
    return name.endswith(FUSED_EXPERTS)


def initial_value(
    name: str,
    shape: Sequence[int],
    config: ModelConfig,
    seed: int,
    experts: Sequence[int] | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """The float32 initial value of parameter `name` (a key of the model's state dict) of full shape
    `shape`; for a fused expert tensor, only the experts `experts` (default all), stacked in order.
    Written into `out` when given (a float32 CPU tensor of the result's shape), else a new tensor."""
    shape = torch.Size(shape)
    fused = is_fused_experts(name)
    if experts is not None and not fused:
        raise ValueError(f"{name} holds no experts; `experts` applies to fused expert tensors only")
    chosen = range(shape[0]) if fused and experts is None else experts
    value = torch.empty(shape if chosen is None else (len(chosen), *shape[1:])) if out is None else out
    if chosen is None:
        draw_(name, value, config, parameter_generator(seed, name))
    for row, expert in enumerate(chosen or ()):
        draw_(name, value[row], config, parameter_generator(seed, f"{name}/{expert}"))
    return value


def draw_(name: str, out: torch.Tensor, config: ModelConfig, gen: torch.Generator) -> None:
    """Fill the float32 tensor `out` with the distribution the table above gives `name`."""
    std = config.initializer_range
    if name.endswith(
        ("norm.weight", "layernorm.weight", "pre_fc_norm_embedding.weight", "pre_fc_norm_hidden.weight")
    ):
        out.fill_(1.0 if ".linear_attn.norm." in name else 0.0)  # the gated norm multiplies by w itself
    elif name.endswith(".bias"):
        out.zero_()
    elif name.endswith("conv1d.weight"):
        bound = 1.0 / math.sqrt(out.shape[-1])
        out.uniform_(-bound, bound, generator=gen)
    elif name.endswith("A_log"):
        out.uniform_(1.0, 16.0, generator=gen).log_()
    elif name.endswith("dt_bias"):
        dt = out.uniform_(math.log(1e-3), math.log(1e-1), generator=gen).exp_()  # log-uniform
        out.copy_(dt + torch.log(-torch.expm1(-dt)))  # inverse softplus
    else:
        if name.endswith(OUTPUT_PROJECTIONS):
            std = std / math.sqrt(2 * (config.num_hidden_layers + config.mtp_num_layers))
        out.normal_(0.0, std, generator=gen)


@torch.no_grad()
def init_weights(model: nn.Module, config: ModelConfig, seed: int) -> None:
    """Overwrite every parameter of `model` (on any real device) with its seeded initial value."""
    for name, param in model.named_parameters():
        value = initial_value(name, param.shape, config, seed)
        param.copy_(value.to(device=param.device, dtype=param.dtype))
