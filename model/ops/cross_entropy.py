"""LM head + cross-entropy, summed over tokens, without materialising the [N, V] fp32 logits.

The fast path walks the rows in chunks. For each chunk it computes the logits (matmul in the input
dtype, then fp32 for the softmax), the chunk's loss and, right away, the gradients of that loss
w.r.t. the chunk's h rows and the weight (d loss / d logits = softmax - onehot, zero on ignored rows),
accumulating grad_weight in fp32. Backward only scales the stored gradients by grad_output, in
place. This is the scheme of Liger-Kernel's fused linear cross-entropy, written in plain torch.

Extra memory, bf16 in: per chunk 6 * chunk * V bytes at the peak on CPU (the fp32 logits plus a
bf16 copy, as they are made and again as the gradient is cast back), 2 on CUDA (the bf16 logits,
which a Triton kernel overwrites with their gradient), and 4 * V * D for the fp32 grad_weight --
never N x V. With V = 151936 a 2048-row chunk is 1.9 GB on CPU, 0.6 GB on CUDA.

Heads that share the weight (the main and MTP heads) can sum their weight gradients in one fp32
buffer, each weighted by its share of the loss (`SharedWeightGradient`), instead of holding one each.
Where a training engine keeps the weight's fp32 gradient for its optimizer and lends that buffer to
the weight (`Fp32GradientBuffer`), the heads' GEMMs add into it directly: no sum of their own at all.

Both functions return the SUM of per-token losses over tokens whose label != ignore_index (fp32
scalar) and the number of such tokens (int64 scalar): the trainer divides by the global token count.

Legend: n tokens (rows), d hidden, v vocabulary, c rows of one chunk.
"""

from __future__ import annotations

import math
import warnings
from typing import Protocol

import torch
import torch.nn.functional as F

from model.ops.casting import scale_in_place
from model.ops.fusion import compile_on, fused_on_cuda
from model.ops.triton_support import LAUNCH_OPTIONS, runs_on_triton, triton_kernels


def linear_cross_entropy(
    h_nd: torch.Tensor,
    weight_vd: torch.Tensor,
    labels_n: torch.Tensor,
    *,
    ignore_index: int = -100,
    chunk_size: int = 2048,
    shared: SharedWeightGradient | None = None,
    loss_weight: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of CE over non-ignored tokens, their count) of logits h @ weight.T, chunk by chunk.

    `shared`: the weight's gradient goes into that sum, with this head's `loss_weight` (its share of
    the total loss, as `SharedWeightGradient` says), instead of being this call's own.

    Labels are range-checked on CPU only: on CUDA the check would cost a host sync, and an
    out-of-range label there still fails loudly, as a device-side assert in the gather.
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")
    labels_n = labels_n.reshape(-1)
    if not labels_n.is_cuda:
        check_labels_in_range(labels_n, weight_vd.shape[0], ignore_index)
    num_tokens = (labels_n != ignore_index).sum()
    needs_grad = torch.is_grad_enabled() and (h_nd.requires_grad or weight_vd.requires_grad)
    if not needs_grad:
        return _chunked_loss_only(h_nd, weight_vd, labels_n, ignore_index, chunk_size), num_tokens
    loss_sum = _ChunkedLinearCrossEntropy.apply(
        h_nd, weight_vd, labels_n, ignore_index, chunk_size, shared, loss_weight
    )
    return loss_sum, num_tokens


def linear_cross_entropy_reference(
    h_nd: torch.Tensor, weight_vd: torch.Tensor, labels_n: torch.Tensor, *, ignore_index: int = -100
) -> tuple[torch.Tensor, torch.Tensor]:
    """The oracle: full fp32 logits and F.cross_entropy(reduction='sum')."""
    labels_n = labels_n.reshape(-1)
    logits_nv = (h_nd @ weight_vd.T).float()
    loss_sum = F.cross_entropy(logits_nv, labels_n, reduction="sum", ignore_index=ignore_index)
    return loss_sum, (labels_n != ignore_index).sum()


def check_labels_in_range(labels_n: torch.Tensor, vocab_size: int, ignore_index: int) -> None:
    """One min/max over the kept labels; raises ValueError naming the first offending value."""
    kept_n = labels_n[labels_n != ignore_index]
    if kept_n.numel() == 0:
        return
    lowest, highest = (v.item() for v in torch.aminmax(kept_n))
    if lowest < 0 or highest >= vocab_size:
        bad = lowest if lowest < 0 else highest
        raise ValueError(f"label {bad} is outside [0, {vocab_size}) and is not ignore_index ({ignore_index})")


def _row_chunks(num_rows: int, chunk_size: int) -> list[slice]:
    return [slice(start, min(start + chunk_size, num_rows)) for start in range(0, num_rows, chunk_size)]


def _chunk_logits(h_cd: torch.Tensor, weight_vd: torch.Tensor) -> torch.Tensor:
    """fp32 logits of a chunk; the matmul runs in the input dtype (as the reference's does)."""
    return (h_cd @ weight_vd.T).float()


def _safe_labels(labels_c: torch.Tensor, ignore_index: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(labels with ignored ones replaced by 0 so gather/scatter stay in range, keep mask)."""
    keep_c = labels_c != ignore_index
    return torch.where(keep_c, labels_c, 0).long(), keep_c


def _exp_in_place_and_loss(
    logits_cv: torch.Tensor, labels_c: torch.Tensor, keep_c: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(exp(logits - row max) in the logits' own storage, its row sums, the chunk's loss sum).

    Done by hand rather than with torch.logsumexp, whose exp(x - max) would be a second [c, V] fp32
    buffer: here the chunk's logits are the only one.
    """
    target_c = logits_cv.gather(1, labels_c[:, None]).squeeze(1)
    max_c = logits_cv.amax(dim=-1)
    exp_cv = logits_cv.sub_(max_c[:, None]).exp_()
    sum_exp_c = exp_cv.sum(dim=-1)
    lse_c = max_c + sum_exp_c.log()
    # where, not a multiply: an ignored row's loss must not leak a NaN/inf into the sum.
    return exp_cv, sum_exp_c, torch.where(keep_c, lse_c - target_c, 0.0).sum()


def _grad_logits_in_place(
    exp_cv: torch.Tensor, sum_exp_c: torch.Tensor, labels_c: torch.Tensor, keep_c: torch.Tensor
) -> torch.Tensor:
    """d loss / d logits = softmax - onehot on kept rows, 0 on ignored ones; reuses exp_cv's storage."""
    keep_c = keep_c.to(exp_cv.dtype)
    # One pass over [c, V] both normalises the softmax and zeroes the ignored rows.
    grad_cv = exp_cv.mul_((keep_c / sum_exp_c)[:, None])
    return grad_cv.scatter_add_(1, labels_c[:, None], -keep_c[:, None])


def _chunked_loss_only(
    h_nd: torch.Tensor, weight_vd: torch.Tensor, labels_n: torch.Tensor, ignore_index: int, chunk_size: int
) -> torch.Tensor:
    """Forward without gradients (eval, or nothing requires grad): just the chunked loss sum."""
    with torch.no_grad():
        loss_sum = torch.zeros((), dtype=torch.float32, device=h_nd.device)
        for rows in _row_chunks(h_nd.shape[0], chunk_size):
            labels_c, keep_c = _safe_labels(labels_n[rows], ignore_index)
            loss_sum += _exp_in_place_and_loss(_chunk_logits(h_nd[rows], weight_vd), labels_c, keep_c)[2]
    return loss_sum


@fused_on_cuda
def fused_loss_and_grad_logits(
    logits_cv: torch.Tensor, labels_c: torch.Tensor, keep_c: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(chunk loss sum, d loss / d logits in the logits' dtype) in one compiled pass.

    The matmul's low-precision logits go in, fp32 exists only in registers. On CUDA the Triton kernel
    of `loss_and_grad_logits_in_place` computes the same without a second [c, V] buffer; this
    compiled form runs on CPU when the tests force compilation (QWEN3NEXT_COMPILE=always), and its
    eager form is the kernel's test oracle (CPU training uses the in-place functions above).
    """
    logits_cv32 = logits_cv.float()
    lse_c = torch.logsumexp(logits_cv32, dim=-1)
    target_c = logits_cv32.gather(1, labels_c[:, None]).squeeze(1)
    loss_sum = torch.where(keep_c, lse_c - target_c, 0.0).sum()
    vocab_v = torch.arange(logits_cv.shape[1], device=logits_cv.device)
    onehot_cv = (vocab_v[None, :] == labels_c[:, None]).float()
    grad_cv = torch.where(keep_c[:, None], torch.exp(logits_cv32 - lse_c[:, None]) - onehot_cv, 0.0)
    return loss_sum, grad_cv.to(logits_cv.dtype)


IN_PLACE_BLOCK = 4096  # vocabulary entries a program reads at once


@triton_kernels
def _in_place_kernel(triton, tl):
    """The Triton kernel of `loss_and_grad_logits_in_place` (model/ops/triton_support.py)."""

    @triton.jit
    def loss_and_grad_logits_kernel(logits_ptr, labels_ptr, keep_ptr, loss_ptr, vocab, BLOCK: tl.constexpr):
        # one row a program; pass 1 finds its log-sum-exp (each lane keeps a running max and sum of
        # exponentials, merged at the end), pass 2 overwrites the logits with softmax - onehot
        row_ptr = logits_ptr + tl.program_id(0).to(tl.int64) * vocab
        label = tl.load(labels_ptr + tl.program_id(0))
        keep = tl.load(keep_ptr + tl.program_id(0)) != 0
        lane = tl.arange(0, BLOCK)
        max_b = tl.full([BLOCK], float("-inf"), tl.float32)
        sum_b = tl.zeros([BLOCK], tl.float32)
        for start in range(0, vocab, BLOCK):
            x = tl.load(row_ptr + start + lane, mask=start + lane < vocab, other=float("-inf")).to(tl.float32)
            new_max = tl.maximum(max_b, x)
            shift = tl.where(new_max == float("-inf"), 0.0, new_max)  # a lane with nothing seen yet
            sum_b = sum_b * tl.exp(max_b - shift) + tl.exp(x - shift)
            max_b = new_max
        row_max = tl.max(max_b, 0)
        lse = row_max + tl.log(tl.sum(sum_b * tl.exp(max_b - row_max), 0))
        target = tl.load(row_ptr + label).to(tl.float32)
        tl.store(loss_ptr + tl.program_id(0), tl.where(keep, lse - target, 0.0))
        for start in range(0, vocab, BLOCK):
            offsets = start + lane
            x = tl.load(row_ptr + offsets, mask=offsets < vocab, other=0.0).to(tl.float32)
            grad = tl.exp(x - lse) - tl.where(offsets == label, 1.0, 0.0)
            grad = tl.where(keep, grad, 0.0)
            tl.store(row_ptr + offsets, grad.to(row_ptr.dtype.element_ty), mask=offsets < vocab)

    return loss_and_grad_logits_kernel


def loss_and_grad_logits_in_place(
    logits_cv: torch.Tensor, labels_c: torch.Tensor, keep_c: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(chunk loss sum, d loss / d logits written over the logits), by a Triton kernel (on CUDA, or on
    the CPU under Triton's interpreter).

    `fused_loss_and_grad_logits` compiled writes the gradient into a second [c, V] buffer: 2 more
    bytes a logit at the LM head's peak (0.6 GiB for a 2048-row chunk of a 151936 vocabulary). Here
    one program a row reads its logits twice and writes their gradient once, in fp32 in registers.
    tests/gpu/test_cross_entropy_gpu.py holds it to the eager `fused_loss_and_grad_logits`.

    logits_cv: contiguous [c, V]; labels_c: [c] in [0, V) (ignored rows' labels already
    replaced, `_safe_labels`); keep_c: [c] bool."""
    if not logits_cv.is_contiguous():  # the kernel would write into a copy and return stale logits
        raise ValueError("loss_and_grad_logits_in_place needs contiguous logits")
    rows, vocab = logits_cv.shape
    loss_c = torch.empty(rows, dtype=torch.float32, device=logits_cv.device)
    _in_place_kernel()[(rows,)](
        logits_cv, labels_c, keep_c, loss_c, vocab, BLOCK=IN_PLACE_BLOCK, num_warps=8, **LAUNCH_OPTIONS
    )
    return loss_c.sum(), logits_cv


def _chunk_loss_and_grad(
    h_cd: torch.Tensor, weight_vd: torch.Tensor, labels_c: torch.Tensor, keep_c: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    # trainer.compile_fusions=false (or QWEN3NEXT_COMPILE=0) leaves the eager chunk step on CUDA too
    if runs_on_triton(labels_c, keep_c) and compile_on(h_cd) and _in_place_kernel() is not None:
        return loss_and_grad_logits_in_place(h_cd @ weight_vd.T, labels_c, keep_c)
    if compile_on(h_cd):
        return fused_loss_and_grad_logits(h_cd @ weight_vd.T, labels_c, keep_c)
    exp_cv, sum_exp_c, chunk_loss = _exp_in_place_and_loss(_chunk_logits(h_cd, weight_vd), labels_c, keep_c)
    # The gradient matmuls run in the input dtype (as the reference's backward does); for bf16 the
    # fp32 buffer is dropped right after this cast.
    return chunk_loss, _grad_logits_in_place(exp_cv, sum_exp_c, labels_c, keep_c).to(h_cd.dtype)


_ADDMM_OUT_DTYPE = True  # cleared if this torch lacks addmm(out_dtype=) on CUDA


def accumulate_grad_weight(
    grad_w_vd: torch.Tensor,
    grad_cv: torch.Tensor,
    h_cd: torch.Tensor,
    *,
    overwrite: bool = False,
    alpha: float = 1.0,
) -> torch.Tensor:
    """grad_w += alpha grad^T h (or grad_w = alpha grad^T h, whatever grad_w held, with `overwrite`),
    accumulated in fp32, in place. On CUDA the GEMM adds into the fp32 buffer itself (addmm with
    out_dtype, alpha applied to its fp32 product): no bf16 [V, D] product and no pass over it per
    chunk. Without `out=` addmm would first copy the whole buffer (4 bytes x 151936 x hidden) per
    chunk. Overwriting, it runs with beta = 0, which reads nothing of the buffer: the first chunk
    needs neither a zeroed buffer nor a read of its zeros."""
    global _ADDMM_OUT_DTYPE
    if _ADDMM_OUT_DTYPE and grad_cv.is_cuda and grad_cv.dtype != torch.float32:
        beta = 0.0 if overwrite else 1.0
        try:
            return torch.addmm(
                grad_w_vd, grad_cv.T, h_cd, beta=beta, alpha=alpha, out_dtype=torch.float32, out=grad_w_vd
            )
        except torch.OutOfMemoryError:
            raise
        except (RuntimeError, TypeError) as error:
            _ADDMM_OUT_DTYPE = False
            warnings.warn(
                f"addmm(out_dtype=float32) failed ({error}); the LM head's weight gradient is now a "
                "low-precision product added into fp32, chunk by chunk: slower and less exact",
                stacklevel=2,
            )
    product_vd = grad_cv.T @ h_cd
    if overwrite:
        grad_w_vd.copy_(product_vd)
        return grad_w_vd if alpha == 1.0 else grad_w_vd.mul_(alpha)
    return grad_w_vd.add_(product_vd, alpha=alpha)


class WeightGradient:
    """The LM head's weight gradient, summed over row chunks in fp32 and handed back in the weight's
    dtype without a second [V, D] buffer.

    `.to(bf16)` of one fp32 [V, D] sum would hold the sum and its rounded copy at once: 6 bytes a
    weight, 1.7 GiB at 151936 x 2048, while every layer's activations are still held. For a
    low-precision weight the sum is kept here in two fp32 buffers instead, the vocabulary's first
    rows and the rest, and `result` rounds the first buffer's rows into the front of its own
    storage, the second's behind them, and drops the second: the first buffer's 4 x split x D bytes
    (split: half the vocabulary, rounded up to SPLIT_ROWS rows) then hold the whole rounded gradient,
    and 4 bytes a weight is the most ever held. Other weights (fp32, fp64, a small vocabulary) get
    one buffer, rounded to their dtype (an fp32 one as it is).
    """

    def __init__(self, weight_vd: torch.Tensor):
        vocab, hidden = weight_vd.shape
        self.dtype, self.shape = weight_vd.dtype, weight_vd.shape
        sizes = weight_gradient_rows(vocab, weight_vd.dtype.itemsize)
        self.split = sizes[0]
        # not zeroed: the first `add` overwrites them (a pass over 4 bytes a weight saved)
        self.parts = [
            torch.empty(rows, hidden, dtype=torch.float32, device=weight_vd.device) for rows in sizes
        ]
        self.written = False

    def add(self, grad_cv: torch.Tensor, h_cd: torch.Tensor, alpha: float = 1.0) -> None:
        """+= alpha grad_cv^T h_cd (grad_cv: d loss / d logits of a chunk of rows, h_cd: their inputs)."""
        columns = [slice(0, self.split), slice(self.split, None)]
        for index, part in enumerate(self.parts):
            self.parts[index] = accumulate_grad_weight(
                part, grad_cv[:, columns[index]], h_cd, overwrite=not self.written, alpha=alpha
            )
        self.written = True

    def result(self) -> torch.Tensor:
        """The sum, rounded once to the weight's dtype; call once, after the last `add` (zeros if
        there was none)."""
        if not self.written:
            for part in self.parts:
                part.zero_()
        first, *rest = self.parts
        self.parts = []
        if not rest:
            return first.to(self.dtype)  # fp32 weights: the sum itself (`to` returns it)
        grad_vd = round_into_own_storage(first, self.dtype, self.shape)
        grad_vd[self.split :].copy_(rest[0])
        return grad_vd


SPLIT_ROWS = 64  # WeightGradient's split, a multiple of this many vocabulary rows


def weight_gradient_rows(vocab: int, itemsize: int = 2) -> list[int]:
    """The vocabulary rows of each of `WeightGradient`'s fp32 buffers (and of its GEMMs' outputs) for
    a weight of `itemsize` bytes an element: two parts for a 2-byte weight, else one."""
    if itemsize != 2 or vocab <= SPLIT_ROWS:
        return [vocab]
    # the split a multiple of SPLIT_ROWS, so that the second buffer's GEMM reads the chunk's gradient
    # from a 16-byte aligned column as the first does
    split = min(vocab, -(-vocab // (2 * SPLIT_ROWS)) * SPLIT_ROWS)
    return [split] + ([vocab - split] if vocab > split else [])


ROUNDING_CHUNK = 1 << 24  # elements a copy of `round_into_own_storage` rounds (64 MB of fp32)


def round_into_own_storage(x: torch.Tensor, dtype: torch.dtype, shape: torch.Size) -> torch.Tensor:
    """x (contiguous fp32) rounded to a 2-byte `dtype`, written over the front of x's own storage; the
    returned `shape` tensor starts with x's elements and may extend over the rest of that storage.

    Element i's rounded value goes to bytes [2i, 2i + 2) while its fp32 value sits at [4i, 4i + 4), so
    a copy of elements [a, a + c) overwrites fp32 elements [a / 2, (a + c) / 2): all read by the
    copies before it once a >= c. Copies of c elements in order therefore never read what was
    overwritten; only the first one goes through a temporary."""
    if x.dtype != torch.float32 or not x.is_contiguous() or dtype.itemsize != 2:
        raise ValueError(
            f"round_into_own_storage: contiguous fp32 to a 2-byte dtype, not {x.dtype} -> {dtype}"
        )
    storage = x.untyped_storage()
    if x.storage_offset() != 0 or math.prod(shape) * 2 > storage.nbytes():
        raise ValueError(f"round_into_own_storage: {tuple(shape)} in {dtype} does not fit x's storage")
    out = torch.empty(0, dtype=dtype, device=x.device).set_(storage, 0, shape)
    x_n, out_n = x.view(-1), out.view(-1)
    n = x_n.numel()
    first = min(ROUNDING_CHUNK, n)
    out_n[:first].copy_(x_n[:first].to(dtype))
    for start in range(first, n, ROUNDING_CHUNK):
        end = min(start + ROUNDING_CHUNK, n)
        out_n[start:end].copy_(x_n[start:end])
    return out


class Fp32GradientBuffer(Protocol):
    """Where a training engine keeps a parameter's fp32 gradient between backward and the optimizer's
    step, lent to the parameter as `param.fp32_grad_buffer` (parallel/engine.py does for ZeRO 1 with
    fp32 accumulation). What is written there reaches the optimizer as it is: it must already carry the
    whole factor backward would give it (the loss's scaling and the engine's), and the parameter's
    `.grad` gets nothing for it.

    `writer` is the heads' own bookkeeping (None when lent): the `SharedWeightGradient` of the last
    forward that wrote there, which checks that its backward ran before another forward adds more."""

    writer: SharedWeightGradient | None

    def tensor(self) -> torch.Tensor:
        """The fp32 buffer, of the parameter's shape."""
        ...

    def holds_gradient(self) -> bool:
        """Whether something was written this step (else its content is stale: overwrite it)."""
        ...

    def mark_written(self) -> None:
        """After a write: the buffer holds this step's gradient, to be added to from now on."""
        ...


class SharedWeightGradient:
    """One fp32 sum of the weight gradient of several cross-entropy heads over the same weight (the
    main head and the MTP heads share the LM head), each head's part weighted by its loss weight.

    Each head's cross-entropy makes its weight gradient in forward. Kept apart, every head holds its
    own: the earlier heads' rounded to the weight's dtype (2 bytes a weight) and the last one's fp32
    sum (4) while it is made, all at the end of forward, where every layer's activations are held
    (at the 80B width with one MTP head, 1.7 GiB). Summed here, the heads hold one fp32 sum between
    them. That needs each head's share of the total loss in forward: with loss weight w_h, the loss
    is c * sum_h w_h * loss_sum_h + (terms without these heads), and the weight's gradient is
    c * sum_h w_h * dloss_sum_h/dweight. The factor c (the trainer's grad_scale / token count, the
    engine's averaging) comes with backward: head h's loss sum gets the gradient g_h = c * w_h.

    So the first head to run backward hands the whole sum over, times g_h / w_h, and the others hand
    over nothing. They check that their g_h / w_h is that same c: where the loss weighs two heads
    otherwise than the weights given here, the later head's input gradient turns NaN (the trainer
    then skips the step and says so). A head with weight 0 adds nothing and takes no part.

    With the weight's `Fp32GradientBuffer` (`buffer`), the heads add into the optimizer's own fp32
    gradient instead, and there is no sum here to hand over: the weights must then be the gradients
    themselves (c = 1, the training step passes them so), and every head checks its g_h / w_h against
    1, its input gradient NaN where it differs. Gradient accumulation over micro-batches happens in
    that buffer, in fp32, where each micro-batch's rounded gradient was added before.

    The contract, which the training objective keeps by construction (it builds the loss from every
    head's sum with the weights it gives): one backward through the loss, in which every head with
    a weight above 0 takes part with that weight, and no head with weight 0 counts. What the check
    cannot see: a head whose loss never reaches backward (its part of the sum is handed over all
    the same), or a weight-0 head whose loss does count (its part is missing).
    """

    TOLERANCE = 1e-3  # relative: c from different heads differs by fp32 rounding only

    def __init__(self, weight_vd: torch.Tensor, buffer: Fp32GradientBuffer | None = None):
        self.weight_vd = weight_vd
        self.buffer = buffer
        self.sum: WeightGradient | None = None  # made at the first head's first chunk
        self.factor: torch.Tensor | None = None  # c, from the head that handed the sum over
        self.heads = self.backwards = 0  # heads that joined in forward; their backwards so far

    def join(self) -> None:
        """A head's forward takes part (before its first `add`; also with no rows to add)."""
        self.heads += 1
        if self.buffer is not None:
            self._check_the_last_writer_finished()
            self.buffer.writer = self

    def _check_the_last_writer_finished(self) -> None:
        """A forward whose heads wrote into the optimizer's buffer and whose backward never ran (an
        exception between them, caught) left its part there, which this forward would add to:
        refused while the buffer still holds it (the optimizer's step or zeroing forgets it)."""
        last = self.buffer.writer
        if last is None or last is self or last.backwards >= last.heads or not self.buffer.holds_gradient():
            return
        raise RuntimeError(
            "an earlier forward of the LM heads added their weight gradient into the optimizer's fp32 "
            "buffer and its backward never ran: that gradient is still counted in this step. Zero the "
            "optimizer's gradients (or finish the step) before the next forward with head_loss_weights"
        )

    def add(self, grad_cv: torch.Tensor, h_cd: torch.Tensor, loss_weight: float) -> None:
        if self.buffer is not None:
            overwrite = not self.buffer.holds_gradient()
            accumulate_grad_weight(
                self.buffer.tensor(), grad_cv, h_cd, overwrite=overwrite, alpha=loss_weight
            )
            self.buffer.mark_written()
            return
        if self.sum is None:
            self.sum = WeightGradient(self.weight_vd)
        self.sum.add(grad_cv, h_cd, alpha=loss_weight)

    def hand_over(
        self, grad_loss: torch.Tensor, loss_weight: float
    ) -> tuple[torch.Tensor | None, torch.Tensor]:
        """(the weight's gradient for the first head to call this, None for the others and for every
        head with a buffer; the factor to scale this head's input gradient by: grad_loss, or NaN
        where it disagrees with the first, or with a buffer's 1)."""
        self.backwards += 1
        if self.backwards > self.heads:  # the sum was handed over already: a second backward
            raise RuntimeError(
                "a second backward through LM heads that share one weight-gradient sum would give the "
                "weight no gradient; run the forward again, or without head_loss_weights"
            )
        factor = grad_loss / loss_weight
        if self.factor is None and self.buffer is not None:
            self.factor = torch.ones_like(factor)  # what went into the buffer carries c already
        if self.factor is None:
            self.factor = factor
            total = (self.sum or WeightGradient(self.weight_vd)).result()  # zeros where nothing was added
            self.sum = None
            return scale_in_place(total, factor), grad_loss
        agrees = (factor - self.factor).abs() <= self.TOLERANCE * self.factor.abs()
        return None, torch.where(agrees, grad_loss, float("nan"))


def shared_weight_gradient_of(weight_vd: torch.Tensor) -> SharedWeightGradient | None:
    """A `SharedWeightGradient` for the heads over `weight_vd` (into the optimizer's fp32 gradient where
    the weight has one, `fp32_grad_buffer`), or None where no gradient is made."""
    if not (torch.is_grad_enabled() and weight_vd.requires_grad):
        return None
    buffer = getattr(weight_vd, "fp32_grad_buffer", None)
    if buffer is not None:
        tensor = buffer.tensor()
        if tensor.shape != weight_vd.shape or tensor.dtype != torch.float32 or not tensor.is_contiguous():
            raise ValueError(
                f"the weight's fp32_grad_buffer must be a contiguous fp32 tensor of the weight's shape "
                f"{tuple(weight_vd.shape)}, got {tensor.dtype} {tuple(tensor.shape)}"
            )
    return SharedWeightGradient(weight_vd, buffer)


class HeadWeightGradient:
    """One head's weight gradient as its cross-entropy makes it: its own `WeightGradient`, its part of
    a `SharedWeightGradient`, or none (not wanted, or a weight-0 head of a shared sum). Both the
    single-device and the vocabulary-parallel cross-entropy build theirs with this."""

    def __init__(
        self,
        weight_vd: torch.Tensor,
        *,
        wanted: bool,
        shared: SharedWeightGradient | None,
        loss_weight: float,
    ):
        if shared is not None and not (math.isfinite(loss_weight) and loss_weight >= 0):
            raise ValueError(f"loss_weight must be finite and >= 0, got {loss_weight}")
        self.own = WeightGradient(weight_vd) if wanted and shared is None else None
        self.shared = shared if wanted and loss_weight != 0.0 else None
        self.loss_weight = loss_weight
        if self.shared is not None:
            self.shared.join()

    def add(self, grad_cv: torch.Tensor, h_cd: torch.Tensor) -> None:
        if self.own is not None:
            self.own.add(grad_cv, h_cd)
        elif self.shared is not None:
            self.shared.add(grad_cv, h_cd, self.loss_weight)

    def to_save(self) -> torch.Tensor | None:
        """After the last chunk: the head's own rounded gradient for backward, or None."""
        return self.own.result() if self.own is not None else None

    def backward(
        self, saved_vd: torch.Tensor | None, factor: torch.Tensor
    ) -> tuple[torch.Tensor | None, torch.Tensor]:
        """(the weight's gradient this head returns, the factor its input gradient is scaled by) for
        the loss gradient `factor` (fp32); `saved_vd`: what `to_save` gave."""
        if self.shared is not None:
            return self.shared.hand_over(factor, self.loss_weight)
        return (scale_in_place(saved_vd, factor) if saved_vd is not None else None), factor


class _ChunkedLinearCrossEntropy(torch.autograd.Function):
    """Loss sum in forward with the gradients computed alongside; backward scales them."""

    @staticmethod
    def forward(
        ctx,
        h_nd: torch.Tensor,
        weight_vd: torch.Tensor,
        labels_n: torch.Tensor,
        ignore_index: int,
        chunk_size: int,
        shared: SharedWeightGradient | None,
        loss_weight: float,
    ) -> torch.Tensor:
        want_grad_h, want_grad_w = ctx.needs_input_grad[:2]
        loss_sum = torch.zeros((), dtype=torch.float32, device=h_nd.device)
        grad_h_nd = torch.empty_like(h_nd) if want_grad_h else None
        ctx.grad_w = HeadWeightGradient(weight_vd, wanted=want_grad_w, shared=shared, loss_weight=loss_weight)
        for rows in _row_chunks(h_nd.shape[0], chunk_size):
            h_cd = h_nd[rows]
            labels_c, keep_c = _safe_labels(labels_n[rows], ignore_index)
            chunk_loss, grad_cv = _chunk_loss_and_grad(h_cd, weight_vd, labels_c, keep_c)
            loss_sum += chunk_loss
            if want_grad_h:
                grad_h_nd[rows] = grad_cv @ weight_vd
            ctx.grad_w.add(grad_cv, h_cd)
            # Freed now, not when the next chunk's result rebinds the name: otherwise this chunk's
            # gradient (2 bytes x c x V) is still held while the next chunk's logits and gradient
            # are made, a third [c, V] buffer at the peak.
            del grad_cv
        ctx.save_for_backward(grad_h_nd, ctx.grad_w.to_save())
        return loss_sum

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor):
        grad_h_nd, grad_w_vd = ctx.saved_tensors
        # In place (the saved gradients are this backward's alone), multiplied in fp32 and rounded
        # once to their dtype; model/ops/casting.py says why not `grad * grad_loss` on CUDA.
        grad_w_vd, factor = ctx.grad_w.backward(grad_w_vd, grad_loss.detach().float())
        grad_h_nd = scale_in_place(grad_h_nd, factor) if grad_h_nd is not None else None
        return grad_h_nd, grad_w_vd, None, None, None, None, None
