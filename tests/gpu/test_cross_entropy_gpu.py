"""Chunked LM-head cross-entropy on a GPU at Qwen3-Next's vocabulary (N=16384, V=151936, D=1024, bf16):
loss and gradients against the full-logits reference, and the peak memory of the chunked path.

The reference's fp32 logits alone take N * V * 4 bytes (10 GB); the chunked path must stay under a
quarter of that. Its peak is about 6 * chunk * V bytes + 4 * V * D (see cross_entropy.py), so this
runs with 1024-row chunks (1.8 GiB measured on an H200, with the returned grads); the 4096-row default
peaks at 5.3 GiB there, over the bar.
"""

import pytest
import torch

import model.ops.cross_entropy as cross_entropy
from model.ops.cross_entropy import WeightGradient, linear_cross_entropy, linear_cross_entropy_reference
from tests.kernel_checks import cross_entropy_chunk

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

TOKENS, VOCAB, HIDDEN, CHUNK = 16384, 151936, 1024, 1024


def _rel_rms(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def _problem():
    gen = torch.Generator(device="cuda").manual_seed(0)
    h_nd = torch.randn(TOKENS, HIDDEN, device="cuda", generator=gen).bfloat16()
    weight_vd = (torch.randn(VOCAB, HIDDEN, device="cuda", generator=gen) * 2 / HIDDEN**0.5).bfloat16()
    labels_n = torch.randint(VOCAB, (TOKENS,), device="cuda", generator=gen)
    labels_n[torch.rand(TOKENS, device="cuda", generator=gen) < 0.1] = -100
    return h_nd, weight_vd, labels_n


def _loss_and_grads(fn, h_nd, weight_vd, labels_n, **kwargs):
    # detach() makes new leaves that share storage: no copies inflate the measured peak.
    h_leaf, w_leaf = h_nd.detach().requires_grad_(), weight_vd.detach().requires_grad_()
    loss_sum, num_tokens = fn(h_leaf, w_leaf, labels_n, **kwargs)
    (loss_sum / num_tokens).backward()  # as the trainer does, with a global count
    return loss_sum.detach(), num_tokens, h_leaf.grad, w_leaf.grad


def test_chunked_matches_reference_in_a_quarter_of_the_logits_memory():
    h_nd, weight_vd, labels_n = _problem()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    fast = _loss_and_grads(linear_cross_entropy, h_nd, weight_vd, labels_n, chunk_size=CHUNK)
    torch.cuda.synchronize()
    fast_peak = torch.cuda.max_memory_allocated() - before

    ref = _loss_and_grads(linear_cross_entropy_reference, h_nd, weight_vd, labels_n)
    logits_bytes = TOKENS * VOCAB * 4
    loss_err = abs(fast[0].item() - ref[0].item()) / abs(ref[0].item())
    grad_h_err, grad_w_err = _rel_rms(fast[2], ref[2]), _rel_rms(fast[3], ref[3])
    print(f"loss rel err {loss_err:.2e}, grad h {grad_h_err:.2e}, grad w {grad_w_err:.2e}, ")
    print(f"peak {fast_peak / 2**30:.2f} GiB = {fast_peak / logits_bytes:.3f} of the fp32 logits")

    assert fast[1].item() == ref[1].item()
    assert fast[2].dtype == fast[3].dtype == torch.bfloat16
    assert loss_err < 1e-3
    assert grad_h_err < 8e-3 and grad_w_err < 8e-3
    assert fast_peak < 0.25 * logits_bytes


def test_chunked_path_never_syncs_with_the_host():
    h_nd, weight_vd, labels_n = _problem()
    h_leaf, w_leaf = h_nd[:4096].detach().requires_grad_(), weight_vd.detach().requires_grad_()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        loss_sum, num_tokens = linear_cross_entropy(h_leaf, w_leaf, labels_n[:4096], chunk_size=CHUNK)
        (loss_sum / num_tokens).backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")


@pytest.mark.parametrize("vocab", [151936, 5000])  # the model's, and one past a block (4096) by a tail
def test_in_place_chunk_kernel_matches_the_fused_reference(vocab):
    """The Triton kernel that writes softmax - onehot over the logits, against the eager chunk step it
    replaces (fp32 throughout): ignored rows, labels at both ends of the vocabulary, a row whose
    logits are all equal. It allocates nothing of the chunk's size."""
    from model.ops.cross_entropy import fused_loss_and_grad_logits, loss_and_grad_logits_in_place

    rows = 512
    logits_cv, labels_c, keep_c = cross_entropy_chunk(rows, vocab, device="cuda", seed=1, drop=0.1)
    ref_loss, ref_grad = fused_loss_and_grad_logits.eager(logits_cv, labels_c, keep_c)

    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    loss, grad = loss_and_grad_logits_in_place(logits_cv, labels_c, keep_c)
    torch.cuda.synchronize()
    assert torch.cuda.max_memory_allocated() - before < rows * vocab * 2 / 8
    assert grad.data_ptr() == logits_cv.data_ptr() and grad.dtype == torch.bfloat16
    assert abs(loss.item() - ref_loss.item()) / abs(ref_loss.item()) < 1e-6
    # each gradient is the same fp32 value rounded once to bf16, up to the lse's last bits
    assert _rel_rms(grad, ref_grad) < 2e-3
    assert (grad[~keep_c] == 0).all()
    assert torch.allclose(grad.float().sum(dim=1)[keep_c], torch.zeros(()), atol=2e-2)


@pytest.mark.parametrize("vocab", [151936, 5001])  # the model's, and an odd one
def test_weight_gradient_rounds_its_fp32_sum_in_its_own_storage_on_cuda(vocab):
    """bf16 chunks' products summed in fp32 on the GEMM (addmm into fp32, one buffer a part of the
    vocabulary) and rounded into the first part's storage: the plain fp32 sum of the same products
    rounded once, to fp32 rounding of the two GEMMs' orders; the fp32-output GEMM still in use, and
    the first chunk's overwriting the NaN the buffers start with. At
    the model's vocabulary, no more than 4 bytes a weight allocated at any time, beside the first
    rounded copy's temporary (32 MiB) and the GEMM's workspace: a plain `.to(bf16)` of one fp32 sum
    would add 2 bytes a weight (297 MiB here)."""
    gen = torch.Generator(device="cuda").manual_seed(vocab)
    grads = [torch.randn(512, vocab, device="cuda", generator=gen).bfloat16() for _ in range(3)]
    inputs = [torch.randn(512, HIDDEN, device="cuda", generator=gen).bfloat16() for _ in range(3)]
    expected = sum(g.float().T @ h.float() for g, h in zip(grads, inputs, strict=True))
    weight = torch.empty(vocab, HIDDEN, device="cuda", dtype=torch.bfloat16)  # not counted: the model's
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    grad = WeightGradient(weight)
    for part in grad.parts:  # unzeroed memory: the first GEMM (beta = 0) must not read it
        part.fill_(float("nan"))
    for g, h in zip(grads, inputs, strict=True):
        grad.add(g, h)
    result = grad.result()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - before
    assert cross_entropy._ADDMM_OUT_DTYPE, "addmm(out_dtype=fp32) fell back to a bf16 product"
    assert result.dtype == torch.bfloat16 and result.shape == (vocab, HIDDEN)
    assert _rel_rms(result, expected) < 4e-3  # bf16's rounding, nothing more
    if vocab == VOCAB:
        assert peak <= 4 * (2 * grad.split) * HIDDEN + (64 << 20), peak / 2**30


def test_heads_sharing_a_weight_gradient_match_the_reference_and_peak_lower():
    """Two heads over one weight (the main and an MTP head), the loss a * L1 + b * L2: with a shared
    weight-gradient sum (loss weights 1 and b / a, added on the GEMM by addmm's alpha into fp32) the
    gradients equal the fp32 reference's, and the second head's forward peaks at least 2 bytes a
    weight lower than with each head's own gradient (the first head's rounded copy is not held)."""
    h_nd, weight_vd, labels_n = _problem()
    tokens = TOKENS // 2
    heads = [(h_nd[:tokens], labels_n[:tokens]), (h_nd[tokens:], labels_n[tokens:])]
    a, b = 1 / 8000, 0.3 / 7000

    def run(shared: bool):
        w_leaf = weight_vd.detach().requires_grad_()
        h_leaves = [h.detach().requires_grad_() for h, _ in heads]
        sum_w = cross_entropy.SharedWeightGradient(w_leaf) if shared else None
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        losses = [
            linear_cross_entropy(h, w_leaf, t, chunk_size=CHUNK, shared=sum_w, loss_weight=weight)[0]
            for h, (_, t), weight in zip(h_leaves, heads, (1.0, b / a), strict=True)
        ]
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - before
        (a * losses[0] + b * losses[1]).backward()
        return w_leaf.grad, [h.grad for h in h_leaves], peak

    shared_w, shared_h, shared_peak = run(shared=True)
    own_w, _, own_peak = run(shared=False)
    w_ref = weight_vd.detach().float().requires_grad_()
    h_ref = [h.detach().float().requires_grad_() for h, _ in heads]
    ref_losses = [
        linear_cross_entropy_reference(h, w_ref, t)[0] for h, (_, t) in zip(h_ref, heads, strict=True)
    ]
    (a * ref_losses[0] + b * ref_losses[1]).backward()

    assert cross_entropy._ADDMM_OUT_DTYPE, "addmm(alpha, out_dtype=fp32) fell back to a bf16 product"
    assert shared_w.dtype == torch.bfloat16
    assert _rel_rms(shared_w, w_ref.grad) < 8e-3
    assert _rel_rms(shared_w, own_w) < 8e-3
    for got, ref in zip(shared_h, h_ref, strict=True):
        assert _rel_rms(got, ref.grad) < 8e-3
    assert shared_peak <= own_peak - 2 * VOCAB * HIDDEN * 0.95, (shared_peak / 2**30, own_peak / 2**30)
