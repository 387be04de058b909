"""RMSNorms of Qwen3-Next.

`RMSNorm` is zero-centred: y = x / rms(x) * (1 + w), w initialised to 0 and computed in fp32, so
that weight decay pulls the scale towards 1, not 0. `GatedRMSNorm` closes a DeltaNet block:
y = x / rms(x) * w * silu(z), w initialised to 1 (as HF's `Qwen3NextRMSNormGated`).
"""

import torch
import torch.nn.functional as F
from torch import nn

from model.ops.fusion import fused_on_cuda


def _rms_normalize(x: torch.Tensor, eps: float) -> torch.Tensor:
    x = x.float()
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)


@fused_on_cuda
def zero_centred_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return (_rms_normalize(x, eps) * (1.0 + weight.float())).type_as(x)


@fused_on_cuda
def gated_rms_norm(x: torch.Tensor, gate: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    # The weight multiplies in the input dtype before the gate, as the reference does.
    y = weight * _rms_normalize(x, eps).type_as(x)
    return (y * F.silu(gate.float())).type_as(x)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.zeros(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return zero_centred_rms_norm(x, self.weight, self.eps)


class GatedRMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
        return gated_rms_norm(x, gate, self.weight, self.eps)
