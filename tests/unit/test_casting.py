"""model/ops/casting.py on CPU: the torch expressions themselves, and its input checks."""

import pytest
import torch

from model.ops.casting import add_into_fp32, scale_in_place


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


def test_scale_in_place_rounds_the_fp32_product_once():
    x = torch.randn(1000, generator=torch.Generator().manual_seed(0)).bfloat16()
    factor = torch.tensor(1 / 3001)  # not a bf16 number: rounding it first would change products
    expected = (x.double() * factor.double()).float().bfloat16()  # the exact product, fp32, then bf16
    out = scale_in_place(x, factor)
    assert out is x
    assert torch.equal(out, expected)
    with pytest.raises(ValueError, match="one number"):
        scale_in_place(x, torch.ones(2))
