"""Two passes over gradients that PyTorch runs at half the memory bandwidth, as Triton kernels.

- `add_into_fp32(dst, src, overwrite=..., squares_out=None)`: dst (fp32) = src or dst + src, src in
  bf16/fp16. The optimizer's fp32 gradient buffers take every bf16 gradient this way
  (parallel/engine.py). PyTorch runs a mixed-dtype copy or add as its "unrolled" elementwise kernel,
  a cast per element through dynamic dtype dispatch: on an H200 it moved 1.9 TB/s, 8.9 ms a step at
  the 80B width (one micro-batch, 2.8B parameters). Given `squares_out`, the same pass also sums the
  squares of what it wrote, one sum per block of `BLOCK` elements: the gradient norm's share of that
  buffer, without reading it again (`blocks_of(n)` sums for n elements).
- `scale_in_place(x, factor)`: x *= factor for a low-precision x and a 0-dim fp32 factor on the
  device, the product taken in fp32 and rounded once. Eager, the 0-dim operand is a broadcast tensor,
  which also takes the unvectorized path (the LM head's saved gradient times grad_output:
  2.7 ms a step there), and PyTorch rounds the factor to x's dtype before multiplying.

The kernels took 4.3 and 0.65 ms there (bench/RESULTS.md). On CPU (outside Triton's interpreter,
model/ops/triton_support.py) and wherever Triton is missing the `*_reference` functions run instead:
plain torch, and what the GPU tests hold the kernels to, bit for bit (each element sees one fp32
operation and one rounding); tests/unit/test_triton_interpreted.py runs the kernels on the CPU.
"""

from __future__ import annotations

import torch

from model.ops.triton_support import LAUNCH_OPTIONS, runs_on_triton, triton_kernels

BLOCK = 4096


@triton_kernels
def _kernels(triton, tl):
    """The two Triton kernels and triton.cdiv (model/ops/triton_support.py)."""

    @triton.jit
    def add_into_fp32_kernel(
        dst_ptr, src_ptr, squares_ptr, n, OVERWRITE: tl.constexpr, SQUARES: tl.constexpr, BLOCK: tl.constexpr
    ):
        offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offsets < n
        value = tl.load(src_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
        if not OVERWRITE:
            value += tl.load(dst_ptr + offsets, mask=mask, other=0.0)
        tl.store(dst_ptr + offsets, value, mask=mask)
        if SQUARES:
            tl.store(squares_ptr + tl.program_id(0), tl.sum(value * value, axis=0))

    @triton.jit
    def scale_kernel(x_ptr, factor_ptr, n, BLOCK: tl.constexpr):
        offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offsets < n
        factor = tl.load(factor_ptr).to(tl.float32)
        value = tl.load(x_ptr + offsets, mask=mask).to(tl.float32) * factor
        tl.store(x_ptr + offsets, value.to(x_ptr.dtype.element_ty), mask=mask)

    return add_into_fp32_kernel, scale_kernel, triton.cdiv


def _on_triton(*tensors: torch.Tensor) -> bool:
    return runs_on_triton(*tensors) and _kernels() is not None


def blocks_of(numel: int) -> int:
    """How many sums of squares `add_into_fp32` writes for a buffer of `numel` elements."""
    return -(-numel // BLOCK)


def add_into_fp32(
    dst: torch.Tensor, src: torch.Tensor, *, overwrite: bool, squares_out: torch.Tensor | None = None
) -> torch.Tensor:
    """dst = src (overwrite) or dst += src, dst fp32, src of dst's number of elements (any shape).
    squares_out: None, or fp32 [blocks_of(dst.numel())] on dst's device, which then receives the sum
    of the squares of dst's new values, block by block (their total is dst's squared L2 norm)."""
    if dst.dtype != torch.float32 or dst.numel() != src.numel():
        raise ValueError(
            f"add_into_fp32: dst must be fp32 with src's {src.numel()} elements, got "
            f"{dst.dtype} with {dst.numel()}"
        )
    if squares_out is not None:
        _check_squares_out(squares_out, dst)
    extra = () if squares_out is None else (squares_out,)
    if not _on_triton(dst, src, *extra) or src.dtype == torch.float32:
        return add_into_fp32_reference(dst, src, overwrite=overwrite, squares_out=squares_out)
    kernel, _, _ = _kernels()
    n = dst.numel()
    kernel[(blocks_of(n),)](  # one program a block: program b writes squares_out[b]
        dst,
        src,
        dst if squares_out is None else squares_out,  # not read without SQUARES
        n,
        OVERWRITE=overwrite,
        SQUARES=squares_out is not None,
        BLOCK=BLOCK,
        num_warps=8,
        **LAUNCH_OPTIONS,
    )
    return dst


def add_into_fp32_reference(
    dst: torch.Tensor, src: torch.Tensor, *, overwrite: bool, squares_out: torch.Tensor | None = None
) -> torch.Tensor:
    src = src.view(dst.shape)
    if overwrite:
        dst.copy_(src)
    else:
        dst.add_(src)
    if squares_out is not None:
        sums_of_squares_by_block(dst, squares_out)
    return dst


def sums_of_squares_by_block(x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """out[b] = the sum of the squares of x's elements b * BLOCK .. (b + 1) * BLOCK - 1 (x flattened,
    fp32): what `add_into_fp32`'s kernel writes with `squares_out`."""
    flat = x.reshape(-1).float()
    whole = flat.numel() // BLOCK
    out[:whole] = flat[: whole * BLOCK].view(whole, BLOCK).square().sum(dim=1)
    if whole < out.numel():
        out[whole] = flat[whole * BLOCK :].square().sum()
    return out


def _check_squares_out(squares_out: torch.Tensor, dst: torch.Tensor) -> None:
    blocks = blocks_of(dst.numel())
    if (
        squares_out.dtype != torch.float32
        or squares_out.shape != (blocks,)
        or not squares_out.is_contiguous()
    ):
        raise ValueError(
            f"add_into_fp32: squares_out must be a contiguous fp32 [{blocks}] for {dst.numel()} elements "
            f"(one sum a block of {BLOCK}), got {squares_out.dtype} {tuple(squares_out.shape)}"
        )
    if squares_out.device != dst.device:
        raise ValueError(f"add_into_fp32: squares_out is on {squares_out.device}, dst on {dst.device}")


def scale_in_place(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """x *= factor (a 0-dim fp32 tensor on x's device), in fp32, rounded once to x's dtype."""
    if factor.numel() != 1:
        raise ValueError(f"scale_in_place: factor must hold one number, got shape {tuple(factor.shape)}")
    if not _on_triton(x, factor) or x.dtype == torch.float32:
        return scale_in_place_reference(x, factor)
    _, kernel, cdiv = _kernels()
    n = x.numel()
    kernel[(cdiv(n, BLOCK),)](x, factor, n, BLOCK=BLOCK, num_warps=8, **LAUNCH_OPTIONS)
    return x


def scale_in_place_reference(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    # Not x.mul_(factor): with x in bf16, PyTorch casts a 0-dim fp32 factor to bf16 first (type
    # promotion ignores 0-dim operands), a second rounding of up to 2^-9 of the scale.
    return x.copy_(x.float() * factor.reshape(()).float())
