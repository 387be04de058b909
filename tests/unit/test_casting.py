"""model/ops/casting.py on CPU: the torch expressions themselves, and its input checks."""

import pytest
import torch

from model.ops.casting import BLOCK, add_into_fp32, blocks_of, scale_in_place


def test_add_into_fp32_adds_or_overwrites_through_any_shape():
    dst = torch.arange(6, dtype=torch.float32).view(2, 3)
    src = torch.tensor([0.5, 1.5, 2.5, 3.5, 4.5, 5.5], dtype=torch.bfloat16)
    assert add_into_fp32(dst.clone(), src, overwrite=False).tolist() == [[0.5, 2.5, 4.5], [6.5, 8.5, 10.5]]
    assert add_into_fp32(dst.clone(), src, overwrite=True).tolist() == [[0.5, 1.5, 2.5], [3.5, 4.5, 5.5]]


def test_add_into_fp32_names_a_wrong_buffer():
    with pytest.raises(ValueError, match="fp32"):
        add_into_fp32(torch.zeros(3, dtype=torch.bfloat16), torch.zeros(3), overwrite=True)
    with pytest.raises(ValueError, match="4 elements"):
        add_into_fp32(torch.zeros(3), torch.zeros(4, dtype=torch.bfloat16), overwrite=True)


def test_add_into_fp32_sums_the_squares_of_each_block_of_the_result():
    numel = 2 * BLOCK + 5  # two whole blocks and a tail
    dst = torch.randn(numel, generator=torch.Generator().manual_seed(1))
    src = torch.randn(numel, generator=torch.Generator().manual_seed(2)).bfloat16()
    squares = torch.full((blocks_of(numel),), float("nan"))
    out = add_into_fp32(dst.clone(), src, overwrite=False, squares_out=squares)
    result = dst.double() + src.double()  # the exact sum; fp32's rounding of it is below the tolerance
    expected = [result[:BLOCK], result[BLOCK : 2 * BLOCK], result[2 * BLOCK :]]
    torch.testing.assert_close(out.double(), result, rtol=1e-7, atol=1e-7)
    torch.testing.assert_close(
        squares.double(), torch.stack([b.square().sum() for b in expected]), rtol=1e-6, atol=0
    )


def test_add_into_fp32_names_a_wrong_squares_buffer():
    dst, src = torch.zeros(BLOCK + 1), torch.zeros(BLOCK + 1, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match=r"fp32 \[2\]"):
        add_into_fp32(dst, src, overwrite=True, squares_out=torch.zeros(1))
    with pytest.raises(ValueError, match=r"fp32 \[2\]"):
        add_into_fp32(dst, src, overwrite=True, squares_out=torch.zeros(2, dtype=torch.float64))


def test_scale_in_place_rounds_the_fp32_product_once():
    x = torch.randn(1000, generator=torch.Generator().manual_seed(0)).bfloat16()
    factor = torch.tensor(1 / 3001)  # not a bf16 number: rounding it first would change products
    expected = (x.double() * factor.double()).float().bfloat16()  # the exact product, fp32, then bf16
    out = scale_in_place(x, factor)
    assert out is x
    assert torch.equal(out, expected)
    with pytest.raises(ValueError, match="one number"):
        scale_in_place(x, torch.ones(2))
