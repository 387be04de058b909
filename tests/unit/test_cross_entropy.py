"""Chunked LM-head cross-entropy on CPU against the full-logits reference: loss, token count and the
gradients of h and weight, in fp32 and bf16, with ignored labels and a ragged last chunk; plus the
edge cases (nothing to predict, bad labels, frozen weight, no grad) and a bound on tensor sizes.

Legend: n tokens, d hidden, v vocabulary.
"""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import model.ops.cross_entropy as cross_entropy
from model.ops.cross_entropy import (
    WeightGradient,
    linear_cross_entropy,
    linear_cross_entropy_reference,
    round_into_own_storage,
)

IGNORE = -100


def _inputs(num_tokens: int, hidden: int, vocab: int, dtype: torch.dtype, ignored_frac: float = 0.25):
    gen = torch.Generator().manual_seed(0)
    h_nd = torch.randn(num_tokens, hidden, generator=gen).to(dtype)
    weight_vd = (torch.randn(vocab, hidden, generator=gen) / hidden**0.5).to(dtype)
    labels_n = torch.randint(vocab, (num_tokens,), generator=gen)
    labels_n[torch.rand(num_tokens, generator=gen) < ignored_frac] = IGNORE
    return h_nd, weight_vd, labels_n


def _loss_count_and_grads(fn, h_nd, weight_vd, labels_n, upstream: float, **kwargs):
    h_leaf, w_leaf = h_nd.clone().requires_grad_(), weight_vd.clone().requires_grad_()
    loss_sum, num_tokens = fn(h_leaf, w_leaf, labels_n, **kwargs)
    # A non-unit upstream gradient (like the trainer's 1 / global token count) checks the scaling.
    (loss_sum * upstream).backward()
    return loss_sum.detach(), num_tokens, h_leaf.grad, w_leaf.grad


def _rel_rms(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


@pytest.mark.parametrize("chunk_size", [7, 16, 4096])
def test_fp32_matches_reference(chunk_size):
    h_nd, weight_vd, labels_n = _inputs(50, 24, 40, torch.float32)
    fast = _loss_count_and_grads(linear_cross_entropy, h_nd, weight_vd, labels_n, 0.37, chunk_size=chunk_size)
    ref = _loss_count_and_grads(linear_cross_entropy_reference, h_nd, weight_vd, labels_n, 0.37)
    assert fast[0].dtype == torch.float32 and fast[1].dtype == torch.int64
    assert fast[1].item() == ref[1].item() == (labels_n != IGNORE).sum().item()
    torch.testing.assert_close(fast[0], ref[0], rtol=1e-5, atol=0)
    for fast_grad, ref_grad in zip(fast[2:], ref[2:], strict=True):
        torch.testing.assert_close(fast_grad, ref_grad, rtol=1e-5, atol=1e-6)


def test_bf16_inputs_match_reference_loosely():
    h_nd, weight_vd, labels_n = _inputs(200, 64, 96, torch.bfloat16)
    fast = _loss_count_and_grads(linear_cross_entropy, h_nd, weight_vd, labels_n, 1.0, chunk_size=48)
    ref = _loss_count_and_grads(linear_cross_entropy_reference, h_nd, weight_vd, labels_n, 1.0)
    assert fast[0].dtype == torch.float32
    assert fast[2].dtype == fast[3].dtype == torch.bfloat16
    assert abs(fast[0].item() - ref[0].item()) / ref[0].item() < 1e-3
    assert _rel_rms(fast[2], ref[2]) < 1e-2
    assert _rel_rms(fast[3], ref[3]) < 1e-2


def test_all_ignored_gives_zero_loss_count_and_grads():
    h_nd, weight_vd, _ = _inputs(20, 8, 16, torch.float32)
    labels_n = torch.full((20,), IGNORE)
    loss_sum, num_tokens, grad_h, grad_w = _loss_count_and_grads(
        linear_cross_entropy, h_nd, weight_vd, labels_n, 1.0, chunk_size=6
    )
    assert loss_sum.item() == 0.0 and num_tokens.item() == 0
    assert not grad_h.any() and not grad_w.any()


def test_custom_ignore_index():
    h_nd, weight_vd, labels_n = _inputs(30, 8, 16, torch.float32)
    labels_n[labels_n == IGNORE] = -1
    fast = linear_cross_entropy(h_nd, weight_vd, labels_n, ignore_index=-1, chunk_size=8)
    ref = linear_cross_entropy_reference(h_nd, weight_vd, labels_n, ignore_index=-1)
    torch.testing.assert_close(fast[0], ref[0], rtol=1e-5, atol=0)
    assert fast[1].item() == ref[1].item()


@pytest.mark.parametrize("bad_label", [16, 1000, -1])
def test_out_of_range_label_raises_value_error_naming_it(bad_label):
    h_nd, weight_vd, labels_n = _inputs(10, 8, 16, torch.float32)
    labels_n[3] = bad_label
    with pytest.raises(ValueError, match=f"label {bad_label} "):
        linear_cross_entropy(h_nd, weight_vd, labels_n)


def test_frozen_weight_and_no_grad_mode():
    h_nd, weight_vd, labels_n = _inputs(30, 8, 16, torch.float32)
    ref_loss, _ = linear_cross_entropy_reference(h_nd, weight_vd, labels_n)

    h_leaf = h_nd.clone().requires_grad_()
    loss_sum, _ = linear_cross_entropy(h_leaf, weight_vd, labels_n, chunk_size=8)
    loss_sum.backward()
    ref_h = h_nd.clone().requires_grad_()
    linear_cross_entropy_reference(ref_h, weight_vd, labels_n)[0].backward()
    torch.testing.assert_close(h_leaf.grad, ref_h.grad, rtol=1e-5, atol=1e-6)

    with torch.no_grad():
        eval_loss, _ = linear_cross_entropy(h_nd.requires_grad_(), weight_vd, labels_n, chunk_size=8)
    assert not eval_loss.requires_grad
    torch.testing.assert_close(eval_loss, ref_loss, rtol=1e-5, atol=0)


class _OpOutputs(TorchDispatchMode):
    """Watches what aten ops return: the largest number of elements of any tensor, and the bytes of
    every storage that none of the op's inputs had (new allocations)."""

    def __init__(self):
        super().__init__()
        self.largest = 0
        self.new_bytes = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = [a for a in torch.utils._pytree.tree_leaves((args, kwargs)) if isinstance(a, torch.Tensor)]
        known = {t.untyped_storage().data_ptr() for t in inputs}
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
                if t.untyped_storage().data_ptr() not in known:
                    self.new_bytes += t.untyped_storage().nbytes()
                    known.add(t.untyped_storage().data_ptr())
        return out


def test_no_tensor_as_large_as_all_logits_is_made():
    """With d < chunk the biggest allowed tensor is one chunk's logits [chunk, v], not [n, v]."""
    num_tokens, hidden, vocab, chunk = 96, 8, 50, 16
    h_nd, weight_vd, labels_n = _inputs(num_tokens, hidden, vocab, torch.float32)
    h_leaf, w_leaf = h_nd.requires_grad_(), weight_vd.requires_grad_()
    with _OpOutputs() as seen:
        loss_sum, _ = linear_cross_entropy(h_leaf, w_leaf, labels_n, chunk_size=chunk)
        loss_sum.backward()
    assert seen.largest == chunk * vocab < num_tokens * vocab


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_chunk_step_matches_reference_gradient(dtype):
    """The CUDA path's fused chunk step (run eagerly here) against autograd through F.cross_entropy."""
    from model.ops.cross_entropy import fused_loss_and_grad_logits

    gen = torch.Generator().manual_seed(11)
    logits = torch.randn(13, 50, generator=gen).to(dtype)
    labels = torch.randint(0, 50, (13,), generator=gen)
    labels[[2, 7]] = -100
    keep = labels != -100
    loss, grad = fused_loss_and_grad_logits.eager(logits, torch.where(keep, labels, 0), keep)

    ref_logits = logits.float().requires_grad_()
    ref_loss = torch.nn.functional.cross_entropy(ref_logits, labels, reduction="sum", ignore_index=-100)
    ref_loss.backward()
    torch.testing.assert_close(loss, ref_loss.detach(), rtol=1e-5, atol=1e-5)
    assert grad.dtype == dtype
    tol = 1e-6 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(grad.float(), ref_logits.grad, rtol=tol, atol=tol)


def test_a_chunks_logit_gradient_is_freed_before_the_next_chunk_starts(monkeypatch):
    """The [c, V] gradient of one chunk must not outlive its use: held while the next chunk's logits
    and gradient are made, it would be a third [c, V] buffer at the head's peak."""
    import weakref

    import model.ops.cross_entropy as ce

    made, live_at_start = [], []
    original = ce._chunk_loss_and_grad

    def watched(*args):
        live_at_start.append(sum(ref() is not None for ref in made))
        loss, grad_cv = original(*args)
        made.append(weakref.ref(grad_cv))
        return loss, grad_cv

    monkeypatch.setattr(ce, "_chunk_loss_and_grad", watched)
    h_nd, weight_vd, labels_n = _inputs(40, 8, 32, torch.float32)
    loss_sum, _ = linear_cross_entropy(
        h_nd.requires_grad_(), weight_vd.requires_grad_(), labels_n, ignore_index=IGNORE, chunk_size=8
    )
    loss_sum.backward()
    assert live_at_start == [0, 0, 0, 0, 0]  # five chunks, none begun with an earlier one's gradient


@pytest.mark.parametrize("numel", [1, 5, 6, 23, 64])
def test_rounding_into_own_storage_equals_a_plain_cast(monkeypatch, numel):
    """Copies of 5 elements at a time (the first through a temporary, a short last one): each value
    rounds as `.to(bf16)` rounds it, and the result lives in the fp32 tensor's own storage."""
    monkeypatch.setattr(cross_entropy, "ROUNDING_CHUNK", 5)
    x = torch.randn(numel, generator=torch.Generator().manual_seed(numel)) * 1e3
    expected = x.to(torch.bfloat16)
    out = round_into_own_storage(x, torch.bfloat16, torch.Size([numel]))
    assert out.untyped_storage().data_ptr() == x.untyped_storage().data_ptr()
    assert torch.equal(out, expected)


@pytest.mark.parametrize("vocab", [1, 2, 7, 40])
def test_weight_gradient_is_the_fp32_sum_rounded_once(monkeypatch, vocab):
    """bf16 weight: the chunks' products summed in fp32 (by hand here) and rounded once, bit for bit,
    held in the first buffer's fp32 storage (4 x split x D bytes: SPLIT_ROWS is 2 here, so even these
    vocabularies are split); fp32 weight: the sum itself; fp64: the fp32 sum, widened.
    Integer values keep every sum exact in fp32, whatever order a GEMM adds in; most need rounding
    in bf16 (8 significant bits). The buffers start as NaN: the first chunk overwrites them."""
    monkeypatch.setattr(cross_entropy, "ROUNDING_CHUNK", 7)
    monkeypatch.setattr(cross_entropy, "SPLIT_ROWS", 2)
    gen = torch.Generator().manual_seed(vocab)
    integers = lambda *shape: torch.randint(-60, 60, shape, generator=gen).float()
    hidden, chunks = 6, [integers(3, vocab) for _ in range(4)]
    inputs = [integers(3, hidden) for _ in range(4)]
    expected = sum(g.T @ h for g, h in zip(chunks, inputs, strict=True))
    for dtype in (torch.bfloat16, torch.float32, torch.float64):
        grad = WeightGradient(torch.empty(vocab, hidden, dtype=dtype))
        for part in grad.parts:  # unzeroed memory: the first chunk must overwrite, not add to it
            part.fill_(float("nan"))
        for g, h in zip(chunks, inputs, strict=True):
            grad.add(g, h)
        result = grad.result()
        assert result.shape == (vocab, hidden) and result.dtype == dtype
        assert torch.equal(result, expected.to(dtype))
        if dtype == torch.bfloat16 and vocab > 2:  # split: half the vocabulary, rounded up to 2 rows
            assert result.untyped_storage().nbytes() == 4 * (-(-vocab // 4) * 2) * hidden


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_weight_gradient_of_no_chunk_is_zero(dtype):
    grad = WeightGradient(torch.empty(9, 4, dtype=dtype))
    for part in grad.parts:
        part.fill_(float("nan"))
    assert torch.equal(grad.result(), torch.zeros(9, 4, dtype=dtype))


def test_fp64_head_matches_the_reference():
    h_nd, weight_vd, labels_n = _inputs(40, 8, 30, torch.float64)
    fast = _loss_count_and_grads(linear_cross_entropy, h_nd, weight_vd, labels_n, 0.5, chunk_size=16)
    ref = _loss_count_and_grads(linear_cross_entropy_reference, h_nd, weight_vd, labels_n, 0.5)
    assert fast[3].dtype == torch.float64
    for a, b in zip(fast, ref, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


def test_rounding_into_own_storage_refuses_what_does_not_fit():
    with pytest.raises(ValueError, match="does not fit"):
        round_into_own_storage(torch.zeros(4), torch.bfloat16, torch.Size([9]))
    with pytest.raises(ValueError, match="2-byte"):
        round_into_own_storage(torch.zeros(4), torch.float32, torch.Size([4]))


def test_rounding_the_weight_gradient_allocates_no_vocabulary_sized_buffer(monkeypatch):
    """What the split is for: `result` rounds the fp32 sum into its own storage and frees the second
    buffer, allocating one rounding chunk's temporary and nothing of the weight's size (a plain
    `.to(bf16)` of the sum would allocate 2 bytes a weight while the 4 are still held)."""
    import weakref

    monkeypatch.setattr(cross_entropy, "ROUNDING_CHUNK", 64)
    vocab, hidden = 1000, 16
    grad = WeightGradient(torch.empty(vocab, hidden, dtype=torch.bfloat16))
    grad.add(torch.randn(3, vocab).bfloat16(), torch.randn(3, hidden).bfloat16())
    second = weakref.ref(grad.parts[1])
    with _OpOutputs() as allocated:
        result = grad.result()
    assert allocated.new_bytes <= 2 * 64  # the first chunk's bf16 temporary
    assert second() is None
    assert result.untyped_storage().nbytes() == 4 * grad.split * hidden < 6 * vocab * hidden


@pytest.mark.parametrize("chunk_size", [5, 64])
def test_heads_sharing_a_weight_gradient_sum_equal_the_reference(chunk_size):
    """Three heads over one weight with loss weights 1, 0.25 and 0, the loss built with them: the
    weight's gradient (handed over by one head alone) and every input's equal the full-logits
    reference's; the weight-0 head adds nothing to the weight's gradient."""
    weights = (1.0, 0.25, 0.0)
    heads = [_inputs(37 + i, 16, 50, torch.float32) for i in range(len(weights))]
    weight_vd = heads[0][1].clone()
    c = 0.7  # what backward brings on top of the loss weights (token counts, the engine's scaling)

    def grads(fn, **kwargs):
        w_leaf = weight_vd.clone().requires_grad_()
        h_leaves = [h.clone().requires_grad_() for h, _, _ in heads]
        shared = cross_entropy.SharedWeightGradient(w_leaf) if kwargs else None
        loss = sum(
            c
            * weight
            * fn(h, w_leaf, labels, ignore_index=IGNORE, **kwargs, shared=shared, loss_weight=weight)[0]
            if kwargs
            else c * weight * fn(h, w_leaf, labels, ignore_index=IGNORE)[0]
            for h, (_, _, labels), weight in zip(h_leaves, heads, weights, strict=True)
        )
        loss.backward()
        return w_leaf.grad, [h.grad for h in h_leaves]

    got_w, got_h = grads(linear_cross_entropy, chunk_size=chunk_size)
    ref_w, ref_h = grads(linear_cross_entropy_reference)
    torch.testing.assert_close(got_w, ref_w, rtol=1e-5, atol=1e-6)
    for got, ref in zip(got_h, ref_h, strict=True):
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)


def test_a_head_whose_loss_weight_disagrees_poisons_its_input_gradient():
    """A loss built with other weights than the shared sum was given: the heads after the first to
    run backward find their factor differs and turn their input's gradient NaN."""
    (h1, weight_vd, labels1), (h2, _, labels2) = (
        _inputs(9, 8, 20, torch.float64),
        _inputs(9, 8, 20, torch.float64),
    )
    w_leaf, h1, h2 = weight_vd.requires_grad_(), h1.requires_grad_(), h2.requires_grad_()
    shared = cross_entropy.SharedWeightGradient(w_leaf)
    loss1 = linear_cross_entropy(h1, w_leaf, labels1, ignore_index=IGNORE, shared=shared, loss_weight=1.0)[0]
    loss2 = linear_cross_entropy(h2, w_leaf, labels2, ignore_index=IGNORE, shared=shared, loss_weight=0.5)[0]
    (loss1 + loss2).backward()  # the loss weighs the second head 1, not 0.5
    grads = [h1.grad, h2.grad]
    assert sum(bool(torch.isnan(g).all()) for g in grads) == 1  # the one that ran second
    assert sum(bool(torch.isfinite(g).all()) for g in grads) == 1
    with pytest.raises(ValueError, match="loss_weight"):
        linear_cross_entropy(h1, w_leaf, labels1, shared=shared, loss_weight=-1.0)


def test_a_second_backward_through_heads_sharing_a_sum_fails():
    """The sum is handed over once: a second backward (retain_graph) would leave the weight without
    its gradient, so it fails instead. (With h's gradient saved, autograd already refuses: backward
    scales it in place; here h needs none.)"""
    h_nd, weight_vd, labels_n = _inputs(9, 8, 20, torch.float32)
    w_leaf = weight_vd.requires_grad_()
    shared = cross_entropy.SharedWeightGradient(w_leaf)
    loss = linear_cross_entropy(h_nd, w_leaf, labels_n, ignore_index=IGNORE, shared=shared)[0]
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="second backward"):
        loss.backward()


class _Buffer:
    """An optimizer's fp32 gradient buffer as `Fp32GradientBuffer` lends it (the engine's holds the
    flag in the optimizer)."""

    def __init__(self, like_vd: torch.Tensor, *, holds: torch.Tensor | None = None):
        # stale values where nothing is held yet: the first write must overwrite them
        self.values = holds.clone() if holds is not None else torch.full(like_vd.shape, 1e6)
        self.written = holds is not None
        self.writer = None

    def tensor(self) -> torch.Tensor:
        return self.values

    def holds_gradient(self) -> bool:
        return self.written

    def mark_written(self) -> None:
        self.written = True


def _heads_into_buffer(heads, weight_vd, weights, upstream, buffer, chunk_size=5):
    """Each head's loss sum x its weight x upstream backpropagated, the heads told `weights` and
    writing into `buffer`: (the weight's .grad, the inputs' gradients)."""
    w_leaf = weight_vd.clone().requires_grad_()
    w_leaf.fp32_grad_buffer = buffer
    shared = cross_entropy.shared_weight_gradient_of(w_leaf)
    assert shared.buffer is buffer
    h_leaves = [h.clone().requires_grad_() for h, _, _ in heads]
    loss = sum(
        upstream
        * weight
        * linear_cross_entropy(
            h, w_leaf, labels, ignore_index=IGNORE, chunk_size=chunk_size, shared=shared, loss_weight=told
        )[0]
        for h, (_, _, labels), weight, told in zip(
            h_leaves, heads, weights, [w * upstream for w in weights], strict=True
        )
    )
    loss.backward()
    return w_leaf.grad, [h.grad for h in h_leaves]


@pytest.mark.parametrize("holds", [False, True])
def test_heads_add_their_weight_gradient_into_the_optimizers_buffer(holds):
    """With the weight's fp32 buffer lent and the heads told the gradients backward will send them
    (weight x upstream), the weight gets no .grad: its gradient is in the buffer, overwriting what
    was stale there, or added to what a micro-batch before left; every input's gradient as the
    reference's."""
    weights = (1.0, 0.25, 0.0)
    heads = [_inputs(37 + i, 16, 50, torch.float32) for i in range(len(weights))]
    weight_vd = heads[0][1]
    earlier_vd = torch.randn(weight_vd.shape, generator=torch.Generator().manual_seed(5))
    buffer = _Buffer(weight_vd, holds=earlier_vd if holds else None)
    got_w, got_h = _heads_into_buffer(heads, weight_vd, weights, 0.7, buffer)
    assert got_w is None and buffer.written

    w_ref = weight_vd.clone().requires_grad_()
    h_ref = [h.clone().requires_grad_() for h, _, _ in heads]
    loss = sum(
        0.7 * weight * linear_cross_entropy_reference(h, w_ref, labels, ignore_index=IGNORE)[0]
        for h, (_, _, labels), weight in zip(h_ref, heads, weights, strict=True)
    )
    loss.backward()
    expected_vd = w_ref.grad + (earlier_vd if holds else 0)
    torch.testing.assert_close(buffer.values, expected_vd, rtol=1e-5, atol=1e-6)
    for got, ref in zip(got_h, h_ref, strict=True):
        torch.testing.assert_close(got, ref.grad, rtol=1e-5, atol=1e-6)


def test_heads_told_other_gradients_than_backward_sends_poison_every_input():
    """Into the optimizer's buffer the weight gradient goes with the factor the heads were told: if
    backward sends another (here the loss is scaled by 2 after the fact), nothing can rescale it, so
    every head's input gradient turns NaN and the step is skipped."""
    heads = [_inputs(9 + i, 8, 20, torch.float32) for i in range(2)]
    buffer = _Buffer(heads[0][1])
    w_leaf = heads[0][1].clone().requires_grad_()
    w_leaf.fp32_grad_buffer = buffer
    shared = cross_entropy.shared_weight_gradient_of(w_leaf)
    h_leaves = [h.clone().requires_grad_() for h, _, _ in heads]
    sums = [
        linear_cross_entropy(h, w_leaf, labels, ignore_index=IGNORE, shared=shared, loss_weight=0.5)[0]
        for h, (_, _, labels) in zip(h_leaves, heads, strict=True)
    ]
    (2 * 0.5 * (sums[0] + sums[1])).backward()
    assert all(bool(torch.isnan(h.grad).all()) for h in h_leaves)


def test_a_buffer_not_of_the_weights_shape_and_dtype_is_refused():
    w_leaf = torch.zeros(20, 8, requires_grad=True)
    w_leaf.fp32_grad_buffer = _Buffer(torch.zeros(8, 20))
    with pytest.raises(ValueError, match="contiguous fp32 tensor of the weight's shape"):
        cross_entropy.shared_weight_gradient_of(w_leaf)
    w_leaf.fp32_grad_buffer = _Buffer(torch.zeros(20, 8))
    w_leaf.fp32_grad_buffer.values = w_leaf.fp32_grad_buffer.values.double()
    with pytest.raises(ValueError, match=r"got torch\.float64"):
        cross_entropy.shared_weight_gradient_of(w_leaf)


def test_a_forward_whose_backward_never_ran_is_refused_before_another_adds_to_its_gradient():
    """Heads that wrote into the optimizer's buffer in forward and never ran backward (an exception
    between them, caught) left their part there: the next forward must not add to it silently. Once
    the buffer is cleared (the optimizer's step), a forward may write again."""
    h_nd, weight_vd, labels_n = _inputs(9, 8, 20, torch.float32)
    buffer = _Buffer(weight_vd)
    w_leaf = weight_vd.clone().requires_grad_()
    w_leaf.fp32_grad_buffer = buffer

    def forward():
        shared = cross_entropy.shared_weight_gradient_of(w_leaf)
        return linear_cross_entropy(h_nd, w_leaf, labels_n, ignore_index=IGNORE, shared=shared)[0]

    forward().backward()  # a whole micro-batch: the next forward may add to what it wrote
    forward()  # forward only: its part is in the buffer, its backward never comes
    with pytest.raises(RuntimeError, match="its backward never ran"):
        forward()
    buffer.written = False  # the optimizer's step: the next write overwrites
    forward().backward()
