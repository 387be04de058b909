"""The LM head split over the vocabulary across a tensor-parallel group, with its cross-entropy.

Each TP rank keeps the rows [r * V // tp, (r + 1) * V // tp) of the output projection (uneven when tp
does not divide V). The cross-entropy runs chunk by chunk over the tokens like model/ops/
cross_entropy.py's: per chunk, local logits in fp32; the row max, the sum of exponentials and the
target's logit (held by one rank) are all-reduced over the group, so every rank gets the exact loss;
the gradient for the logits is local, the weight's gradient stays on its shard, and the hidden
states' gradient is summed over the group (each rank's covers its part of the vocabulary). The main
and MTP heads can sum their shard's weight gradients in one buffer, as the single-device head's do
(model/ops/cross_entropy.py: SharedWeightGradient).
Legend: n tokens, c a chunk of them, d hidden, v this rank's vocabulary rows, V the whole vocabulary.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from model.ops.casting import scale_in_place
from model.ops.cross_entropy import (
    HeadWeightGradient,
    SharedWeightGradient,
    check_labels_in_range,
    shared_weight_gradient_of,
)
from parallel.tensor import rank_slice, sharded_parameter


def _all_reduce(x: torch.Tensor, group, op=dist.ReduceOp.SUM) -> torch.Tensor:
    dist.all_reduce(x, op=op, group=group)
    return x


class _VocabParallelLinearCrossEntropy(torch.autograd.Function):
    """Loss sum in forward with the gradients computed alongside (as the single-device op does)."""

    @staticmethod
    def forward(
        ctx, h_nd, weight_vd, labels_n, ignore_index, chunk_size, vocab_start, group, shared, loss_weight
    ):
        loss_sum = torch.zeros((), dtype=torch.float32, device=h_nd.device)
        grad_h_nd = torch.empty(h_nd.shape, dtype=torch.float32, device=h_nd.device)
        ctx.grad_w = HeadWeightGradient(weight_vd, wanted=True, shared=shared, loss_weight=loss_weight)
        local_vocab = weight_vd.shape[0]
        for start in range(0, h_nd.shape[0], chunk_size):
            rows = slice(start, min(start + chunk_size, h_nd.shape[0]))
            h_cd, labels_c = h_nd[rows], labels_n[rows]
            keep_c = labels_c != ignore_index
            local_label_c = labels_c - vocab_start
            mine_c = keep_c & (local_label_c >= 0) & (local_label_c < local_vocab)
            local_label_c = torch.where(mine_c, local_label_c, 0).long()

            # a kept label that no rank holds is out of the vocabulary: on CUDA, where the caller does
            # not range-check (a host sync), that fails here as a device-side assert
            owners_c = _all_reduce(mine_c.int(), group)
            owned_c = (owners_c == 1).logical_or(~keep_c)
            torch._assert_async(owned_c.all(), "a label is outside the vocabulary")

            logits_cv = (h_cd @ weight_vd.T).float()
            target_c = torch.where(mine_c, logits_cv.gather(1, local_label_c[:, None]).squeeze(1), 0.0)
            target_c = _all_reduce(target_c, group)
            max_c = _all_reduce(logits_cv.amax(dim=-1), group, dist.ReduceOp.MAX)
            exp_cv = logits_cv.sub_(max_c[:, None]).exp_()  # in place: one [c, v] fp32 buffer a chunk
            sum_exp_c = _all_reduce(exp_cv.sum(dim=-1), group)
            lse_c = max_c + sum_exp_c.log()
            loss_sum += torch.where(keep_c, lse_c - target_c, 0.0).sum()

            grad_cv = exp_cv.mul_((keep_c.float() / sum_exp_c)[:, None])
            grad_cv.scatter_add_(1, local_label_c[:, None], -mine_c.float()[:, None])
            grad_cv = grad_cv.to(h_cd.dtype)
            grad_h_nd[rows] = grad_cv @ weight_vd
            ctx.grad_w.add(grad_cv, h_cd)
            # freed before the next chunk's logits are made, not when their names are rebound
            del logits_cv, exp_cv, grad_cv
        _all_reduce(grad_h_nd, group)  # each rank's part covers its vocabulary rows only
        ctx.save_for_backward(grad_h_nd.to(h_nd.dtype), ctx.grad_w.to_save())
        return loss_sum

    @staticmethod
    def backward(ctx, grad_loss):
        grad_h_nd, grad_w_vd = ctx.saved_tensors
        # as model/ops/cross_entropy.py's: in place, in fp32, rounded once (not `grad * grad_loss`)
        grad_w_vd, factor = ctx.grad_w.backward(grad_w_vd, grad_loss.detach().float())
        return (scale_in_place(grad_h_nd, factor), grad_w_vd, *[None] * 7)


class VocabParallelLMHead(nn.Module):
    """This rank's rows of the LM head: the loss over the whole vocabulary, and whole logits."""

    def __init__(self, full: nn.Linear, tp: int, tp_rank: int, group, chunk_size: int = 2048):
        super().__init__()
        self.vocab_size = full.weight.shape[0]
        rows = rank_slice(self.vocab_size, tp, tp_rank)
        self.weight = sharded_parameter(full.weight, 0, rows)
        self.vocab_start, self.tp, self.group, self.chunk_size = int(rows[0]), tp, group, chunk_size

    def cross_entropy(
        self,
        h_nd: torch.Tensor,
        targets_n: torch.Tensor,
        ignore_index: int,
        *,
        shared: SharedWeightGradient | None = None,
        loss_weight: float = 1.0,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        targets_n = targets_n.reshape(-1)
        if not targets_n.is_cuda:  # on CUDA a host sync: the kernel asserts instead
            check_labels_in_range(targets_n, self.vocab_size, ignore_index)
        loss_sum = _VocabParallelLinearCrossEntropy.apply(
            h_nd,
            self.weight,
            targets_n,
            ignore_index,
            self.chunk_size,
            self.vocab_start,
            self.group,
            shared,
            loss_weight,
        )
        return loss_sum, (targets_n != ignore_index).sum()

    def shared_weight_gradient(self) -> SharedWeightGradient | None:
        """One sum of this rank's shard's weight gradient for the heads of a forward, or None."""
        return shared_weight_gradient_of(self.weight)

    def forward(self, h_btd: torch.Tensor) -> torch.Tensor:
        """Whole-vocabulary logits (evaluation: no gradient flows back through the gather)."""
        local_btv = h_btd @ self.weight.T
        width = -(-self.vocab_size // self.tp)  # shards differ by a row at most: pad, gather, trim
        padded = nn.functional.pad(local_btv, (0, width - local_btv.shape[-1]))
        pieces = [torch.empty_like(padded) for _ in range(self.tp)]
        dist.all_gather(pieces, padded.contiguous(), group=self.group)
        sizes = [len(rank_slice(self.vocab_size, self.tp, r)) for r in range(self.tp)]
        return torch.cat([piece[..., :size] for piece, size in zip(pieces, sizes, strict=True)], dim=-1)
