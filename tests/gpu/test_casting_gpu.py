"""model/ops/casting.py's Triton kernels against their references, bit for bit (each element sees
one fp32 operation and one rounding either way), at sizes that are not a multiple of the kernels'
block. The scaling is also held to the exact product rounded once: PyTorch's own `x.mul_(factor)`
on CUDA is not (it rounds the fp32 factor to x's dtype first)."""

import pytest
import torch

from model.ops.casting import (
    BLOCK,
    add_into_fp32,
    add_into_fp32_reference,
    blocks_of,
    scale_in_place,
    scale_in_place_reference,
)

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

SIZES = [1, 4095, 4097, 3_000_017]


@pytest.mark.parametrize("numel", SIZES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("overwrite", [True, False])
def test_add_into_fp32_equals_the_torch_expression(numel, dtype, overwrite):
    gen = torch.Generator(device="cuda").manual_seed(numel)
    src = torch.randn(numel, device="cuda", generator=gen).to(dtype).view(-1, 1)  # any shape
    start = torch.randn(numel, device="cuda", generator=gen)
    ours = add_into_fp32(start.clone(), src, overwrite=overwrite)
    expected = start.clone().copy_(src.view(-1)) if overwrite else start + src.view(-1).float()
    assert torch.equal(ours, expected)
    assert torch.equal(ours, add_into_fp32_reference(start.clone(), src, overwrite=overwrite))


@pytest.mark.parametrize("numel", SIZES)
@pytest.mark.parametrize("overwrite", [True, False])
def test_add_into_fp32_sums_the_squares_it_wrote_block_by_block(numel, overwrite):
    gen = torch.Generator(device="cuda").manual_seed(numel)
    src = torch.randn(numel, device="cuda", generator=gen).bfloat16()
    start = torch.randn(numel, device="cuda", generator=gen)
    squares = torch.full((blocks_of(numel),), float("nan"), device="cuda")
    ours = add_into_fp32(start.clone(), src, overwrite=overwrite, squares_out=squares)
    assert torch.equal(ours, add_into_fp32_reference(start.clone(), src, overwrite=overwrite))
    padded = torch.zeros(blocks_of(numel) * BLOCK, dtype=torch.float64, device="cuda")
    padded[:numel] = ours.double()
    torch.testing.assert_close(
        squares.double(), padded.view(-1, BLOCK).square().sum(dim=1), rtol=1e-6, atol=0
    )


@pytest.mark.parametrize("numel", SIZES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_scale_in_place_equals_one_fp32_product_rounded_once(numel, dtype):
    gen = torch.Generator(device="cuda").manual_seed(numel)
    x = torch.randn(numel, device="cuda", generator=gen).to(dtype)
    factor = torch.tensor(1 / 3001, device="cuda")  # not representable in x's dtype
    expected = (x.double() * factor.double()).float().to(dtype)  # fp32-exact product, then rounded
    ours = scale_in_place(x.clone(), factor)
    assert ours.dtype == dtype
    assert torch.equal(ours, scale_in_place_reference(x.clone(), factor))
    torch.testing.assert_close(ours, expected, rtol=0, atol=0)
