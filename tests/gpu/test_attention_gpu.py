"""Packed-document attention on CUDA: torch's varlen flash attention against the fp32 reference.

bf16 q/k/v at the model's attention head size (256) with grouped KV heads, documents of uneven
lengths across row boundaries; outputs and gradients within bf16 noise of the explicit masked
softmax in fp32. Skipped without CUDA or without `torch.nn.attention.varlen`.
"""

import pytest
import torch

if not torch.cuda.is_available():
    pytest.skip("needs CUDA", allow_module_level=True)

from model.documents import DocumentLayout
from model.ops.attention import (
    _varlen_kernel,
    causal_attention,
    causal_attention_reference,
    takes_varlen_path,
    use_varlen,
)

use_varlen(True)  # the path under test, whatever the environment says

if _varlen_kernel() is None:
    pytest.skip("this torch has no torch.nn.attention.varlen", allow_module_level=True)

B, H, HKV, T, D = 2, 8, 2, 1024, 256


def rel_rms(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def packed_layout():
    """Row 0: documents of 300, 500, 224 tokens; row 1 continues the last one for 100, then 924."""
    pos = torch.cat(
        [torch.arange(300), torch.arange(500), torch.arange(224), torch.arange(224, 324), torch.arange(924)]
    ).view(B, T)
    return DocumentLayout.from_position_ids(pos.cuda(), B, T, torch.device("cuda"))


def test_varlen_matches_the_masked_reference_in_bf16():
    layout = packed_layout()
    gen = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(B, h, T, D, device="cuda", generator=gen) for h in (H, HKV, HKV))
    upstream = torch.randn(B, H, T, D, device="cuda", generator=gen)
    assert takes_varlen_path(q.bfloat16(), layout.cu_seqlens_n1)

    def run(fn, dtype, **extra):
        leaves = [x.to(dtype).requires_grad_() for x in (q, k, v)]
        o = fn(*leaves, scale=D**-0.5, segment_ids_bt=layout.segment_ids_bt, **extra)
        (o.float() * upstream).sum().backward()
        return [o, *(leaf.grad for leaf in leaves)]

    documents = dict(cu_seqlens_n1=layout.cu_seqlens_n1, max_seqlen=layout.max_seqlen)
    fast = run(causal_attention, torch.bfloat16, **documents)
    ref = run(causal_attention_reference, torch.float32)
    for name, a, b, bound in zip(("o", "dq", "dk", "dv"), fast, ref, (1e-2, 2e-2, 2e-2, 2e-2), strict=True):
        assert torch.isfinite(a).all(), name
        assert rel_rms(a, b) < bound, f"{name}: relative RMS error {rel_rms(a, b):.2e}"
