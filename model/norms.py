"""RMSNorms of Qwen3-Next.

`RMSNorm` is zero-centred: y = x / rms(x) * (1 + w), w initialised to 0 and computed in fp32, so
that weight decay pulls the scale towards 1, not 0. `GatedRMSNorm` closes a DeltaNet block:
y = x / rms(x) * w * silu(z), w initialised to 1 (as HF's `Qwen3NextRMSNormGated`).
"""

import torch
import torch.nn.functional as F
from torch import nn


def _rms_normalize(x: torch.Tensor, eps: float) -> torch.Tensor:
    x = x.float()
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.zeros(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (_rms_normalize(x, self.eps) * (1.0 + self.weight.float())).type_as(x)


class GatedRMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
        # The weight multiplies in the input dtype before the gate, as the reference does.
        y = self.weight * _rms_normalize(x, self.eps).type_as(x)
        return (y * F.silu(gate.float())).type_as(x)
