"""The project's own Triton kernels, run on the CPU by Triton's interpreter, against their torch
references: the AdamW step (model/ops/adamw.py), the two gradient casts (model/ops/casting.py) and
the cross-entropy's in-place softmax gradient (model/ops/cross_entropy.py).

Not collected by itself: tests/unit/test_triton_interpreted.py runs this file in a pytest process of
its own with TRITON_INTERPRET=1 in its environment from the start, as the interpreter needs.

The interpreter runs each kernel program as numpy code with the kernel's own arithmetic (dtypes,
masks, block loops, program ids), so what these tests catch is a wrong formula, index or mask, not
a code-generation bug: tests/gpu holds the compiled kernels to the same references on CUDA. Each
test makes the torch fallback raise, so that it cannot pass by not running the kernel.

One difference from the GPU: the interpreter (Triton 3.9, and 3.6 by its source) casts fp32 to bf16
by dropping the low bits, where the GPU rounds to nearest even. Every bf16 result is therefore held
here to "the exact fp32 value rounded to one of its two bf16 neighbours" (`assert_a_bf16_rounding_of`),
and bit for bit in tests/gpu; fp16 and fp32 results are bit for bit in both.
"""

import pytest
import torch

import model.ops.adamw as adamw
import model.ops.casting as casting
import model.ops.cross_entropy as cross_entropy
from model.ops.triton_support import interpreting, runs_on_triton
from tests.kernel_checks import check_adamw_steps, cross_entropy_chunk

if not interpreting():
    pytest.skip(
        "runs under TRITON_INTERPRET=1 (tests/unit/test_triton_interpreted.py)", allow_module_level=True
    )

ADAMW_REFERENCE = adamw.adamw_flat_reference
ADD_REFERENCE = casting.add_into_fp32_reference
SCALE_REFERENCE = casting.scale_in_place_reference


def _refuse(name):
    def refuse(*args, **kwargs):
        raise AssertionError(f"{name} ran: the kernel was not used")

    return refuse


@pytest.fixture(autouse=True)
def torch_fallbacks_fail(monkeypatch):
    monkeypatch.setattr(adamw, "adamw_flat_reference", _refuse("adamw_flat_reference"))
    monkeypatch.setattr(casting, "add_into_fp32_reference", _refuse("add_into_fp32_reference"))
    monkeypatch.setattr(casting, "scale_in_place_reference", _refuse("scale_in_place_reference"))


def test_cpu_tensors_go_to_the_kernels_if_contiguous():
    assert runs_on_triton(torch.zeros(4), torch.zeros(2, 3))
    assert not runs_on_triton(torch.zeros(4, 2).T)  # the kernels index flat memory


def assert_a_bf16_rounding_of(ours: torch.Tensor, exact: torch.Tensor, atol: float = 0.0) -> None:
    """Each bf16 element of `ours` is the fp32 `exact` rounded down or up to bf16 (within `atol` where
    `exact` is itself known only to fp32 rounding)."""
    assert ours.dtype == torch.bfloat16
    exact = exact.float()
    # a bf16 ulp is 2^-7 of the bottom of its binade, so at most 2^-7 of the value
    down_or_up = (ours.float() - exact).abs() <= exact.abs() * 2.0**-7 + atol
    off = int((~down_or_up).sum())
    assert off == 0, f"{off} of {exact.numel()} elements off by more than a bf16 ulp"


ADAMW_STEPS = [(1.0, 0.0), (2.5, 0.0), (1.0, 1.0), (4.0, 0.0)]  # (grad_scale, found_inf)


def test_adamw_kernel_steps_as_its_reference_and_torchs_adamw():
    """Plain, clipped (grad_scale > 1) and skipped (found_inf) steps, with weight decay, over a length
    that is no multiple of the kernel's block."""
    check_adamw_steps(
        adamw.adamw_flat_, ADAMW_REFERENCE, device="cpu", n=2 * adamw.BLOCK + 123, steps=ADAMW_STEPS,
        check_bf16=assert_a_bf16_rounding_of,
    )  # fmt: skip


@pytest.mark.parametrize("numel", [1, casting.BLOCK - 1, casting.BLOCK + 1])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("overwrite", [True, False])
def test_add_into_fp32_kernel_equals_the_torch_expression(numel, dtype, overwrite):
    gen = torch.Generator().manual_seed(numel)
    src = torch.randn(numel, generator=gen).to(dtype).view(-1, 1)  # any shape
    start = torch.randn(numel, generator=gen)
    ours = casting.add_into_fp32(start.clone(), src, overwrite=overwrite)
    expected = start.clone().copy_(src.view(-1)) if overwrite else start + src.view(-1).float()
    assert torch.equal(ours, expected)
    assert torch.equal(ours, ADD_REFERENCE(start.clone(), src, overwrite=overwrite))


@pytest.mark.parametrize("numel", [1, casting.BLOCK - 1, 2 * casting.BLOCK + 1])
@pytest.mark.parametrize("overwrite", [True, False])
def test_add_into_fp32_kernel_sums_the_squares_it_wrote_block_by_block(numel, overwrite):
    gen = torch.Generator().manual_seed(numel)
    src = torch.randn(numel, generator=gen).bfloat16()
    start = torch.randn(numel, generator=gen)
    squares = torch.full((casting.blocks_of(numel),), float("nan"))
    ours = casting.add_into_fp32(start.clone(), src, overwrite=overwrite, squares_out=squares)
    assert torch.equal(ours, ADD_REFERENCE(start.clone(), src, overwrite=overwrite))
    torch.testing.assert_close(squares.double(), squares_by_block_in_fp64(ours), rtol=1e-6, atol=0)


def squares_by_block_in_fp64(x: torch.Tensor) -> torch.Tensor:
    padded = torch.zeros(casting.blocks_of(x.numel()) * casting.BLOCK, dtype=torch.float64)
    padded[: x.numel()] = x.reshape(-1).double()
    return padded.view(-1, casting.BLOCK).square().sum(dim=1)


@pytest.mark.parametrize("numel", [1, casting.BLOCK + 1])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_scale_kernel_equals_one_fp32_product_rounded_once(numel, dtype):
    gen = torch.Generator().manual_seed(numel)
    x = torch.randn(numel, generator=gen).to(dtype)
    factor = torch.tensor(1 / 3001)  # not representable in x's dtype
    exact = (x.double() * factor.double()).float()  # the fp32-exact product
    ours = casting.scale_in_place(x.clone(), factor)
    assert ours.dtype == dtype
    if dtype == torch.bfloat16:
        assert_a_bf16_rounding_of(ours, exact)
    else:
        assert torch.equal(ours, exact.to(dtype))
        assert torch.equal(ours, SCALE_REFERENCE(x.clone(), factor))


# a block and a tail; two whole blocks
@pytest.mark.parametrize("vocab", [5000, 2 * cross_entropy.IN_PLACE_BLOCK])
def test_cross_entropy_kernel_writes_the_gradient_over_the_logits(vocab):
    logits_cv, labels_c, keep_c = cross_entropy_chunk(24, vocab, device="cpu", seed=vocab, drop=0.2)
    ref_loss, ref_grad = cross_entropy.fused_loss_and_grad_logits.eager(logits_cv.float(), labels_c, keep_c)
    loss, grad = cross_entropy.loss_and_grad_logits_in_place(logits_cv, labels_c, keep_c)
    assert grad.data_ptr() == logits_cv.data_ptr()
    assert abs(loss.item() - ref_loss.item()) / abs(ref_loss.item()) < 1e-6
    # each gradient is the fp32 one rounded once to bf16, up to the log-sum-exp's last bits
    assert_a_bf16_rounding_of(grad, ref_grad, atol=1e-6)
    assert (grad[~keep_c] == 0).all()
    row_sums = grad.float().sum(dim=1)[keep_c]  # softmax - onehot sums to 0 over the vocabulary
    torch.testing.assert_close(row_sums, torch.zeros_like(row_sums), atol=2e-2, rtol=0)


def test_linear_cross_entropy_through_the_kernel_matches_the_full_logits(monkeypatch):
    """The chunked LM head + CE with the kernel as its chunk step (what CUDA runs): loss and both
    gradients against the fp32 logits' F.cross_entropy, over chunks that split the rows unevenly."""
    monkeypatch.setenv("QWEN3NEXT_COMPILE", "always")  # the compiled-path choice, on CPU
    monkeypatch.setattr(cross_entropy, "fused_loss_and_grad_logits", _refuse("fused_loss_and_grad_logits"))
    gen = torch.Generator().manual_seed(3)
    rows, hidden, vocab = 40, 32, 4500
    h_nd = torch.randn(rows, hidden, generator=gen, dtype=torch.float64)
    weight_vd = torch.randn(vocab, hidden, generator=gen, dtype=torch.float64) * 0.3
    labels_n = torch.randint(vocab, (rows,), generator=gen)
    labels_n[::7] = -100

    def loss_and_grads(fn, dtype, **kwargs):
        h, w = (t.to(dtype).requires_grad_() for t in (h_nd, weight_vd))
        loss_sum, count = fn(h, w, labels_n, **kwargs)
        (loss_sum / count).backward()
        return float(loss_sum.detach()), h.grad.double(), w.grad.double()

    ours = loss_and_grads(cross_entropy.linear_cross_entropy, torch.bfloat16, chunk_size=16)
    reference = loss_and_grads(cross_entropy.linear_cross_entropy_reference, torch.float64)
    assert abs(ours[0] - reference[0]) / abs(reference[0]) < 2e-2  # bf16 inputs and logits
    for got, expected in zip(ours[1:], reference[1:], strict=True):
        assert (got - expected).norm() / expected.norm() < 2e-2
