"""Depthwise causal convolution + SiLU of the Gated DeltaNet, restarting at document boundaries.

Written as a sum of shifted copies (kernel 4: four multiply-adds over [b, t, c]) so that a tap that
would reach back across a segment start is simply masked; this is exact for packed batches and
needs no transposes. The weight keeps nn.Conv1d's depthwise layout [c, 1, k] (HF's checkpoints).
"""

import torch
import torch.nn.functional as F

from model.ops.fusion import fused_on_cuda


@fused_on_cuda
def causal_conv1d_silu(
    x_btc: torch.Tensor, weight_c1k: torch.Tensor, segment_pos_bt: torch.Tensor
) -> torch.Tensor:
    """y[t] = silu(sum_j w[k-1-j] * x[t-j]) over taps j that stay inside the token's segment."""
    kernel, seq_len = weight_c1k.shape[-1], x_btc.shape[1]
    w_kc = weight_c1k.squeeze(1).t().to(x_btc.dtype)
    y_btc = x_btc * w_kc[kernel - 1]
    for shift in range(1, kernel):
        shifted_btc = F.pad(x_btc, (0, 0, shift, 0))[:, :seq_len]
        inside_bt1 = (segment_pos_bt >= shift).unsqueeze(-1)
        y_btc = y_btc + shifted_btc * inside_bt1 * w_kc[kernel - 1 - shift]
    return F.silu(y_btc)


def causal_conv1d_silu_reference(x_btc: torch.Tensor, weight_c1k: torch.Tensor) -> torch.Tensor:
    """nn.Conv1d's own depthwise causal convolution for one segment a row: the oracle."""
    kernel, channels = weight_c1k.shape[-1], x_btc.shape[-1]
    y_bct = F.conv1d(x_btc.transpose(1, 2), weight_c1k, padding=kernel - 1, groups=channels)
    return F.silu(y_bct[..., : x_btc.shape[1]].transpose(1, 2))
