"""Expert-parallel all-to-alls overlapped with the experts: AutoEP's MoE layer, its tokens in chunks.

AutoEP (DeepSpeed 0.19.8) runs an MoE layer strictly in sequence: route, all-to-all the (token,
slot) rows to the experts' ranks, grouped GEMM, all-to-all them back, combine; each all-to-all is a
blocking collective, so the step pays communication and expert time one after the other.
`parallel.expert_chunks=C` (C >= 2) replaces the layer's `_forward` with `chunked_forward`: the
tokens are routed once, then cut into C contiguous chunks, and each chunk's dispatch and combine is
an asynchronous all-to-all, so that chunk c's experts run while chunk c+1 is being dispatched and
chunk c-1 combined:

    forward    dispatch 0..C-1 (queued) | wait d0, experts 0, combine 0 | wait d1, experts 1, ...
    backward   the same in reverse: each combine's gradient is sent back while the later chunk's
               experts compute their gradients, and likewise for the dispatches

The backward overlap needs nothing more: autograd runs the nodes in reverse creation order, and the
all-to-all of each gradient is started by one node (`_WaitExchange.backward`) and waited for by
another (`_StartExchange.backward`), with the other chunk's expert backward in between.

What is the same as AutoEP's layer: the router (called once, so its statistics, expert counts and
selection bias are those of the whole micro-batch), the (token, slot) -> expert assignment, the
experts module and its grouped GEMM, the combine with the routing weights, the shared expert, the
parameter names and so the checkpoints. A token's slots all lie in its chunk, so each token's output
is the same sum; only the order in which expert gradients add up differs (chunk by chunk).

Not covered: AutoEP folded onto tensor-parallel ranks (`parallel.tensor` > 1; train/config.py refuses
the combination) and DeepEP's communication backend. The overlap itself needs GPUs to show: on
gloo the collectives run on the calling thread, which makes the CPU tests a check of the numbers only.
"""

from __future__ import annotations

import functools
import itertools

import torch
import torch.distributed as dist
from torch import nn

from model.ops.experts import sort_key_dtype


class _Exchange:
    """One chunk's all-to-all in flight, and later the all-to-all of its gradient."""

    def __init__(self, group, send_splits: list[int], receive_splits: list[int]):
        self.group, self.send_splits, self.receive_splits = group, send_splits, receive_splits
        self.work = None
        self.sent: torch.Tensor | None = None  # kept alive until the collective is done
        self.grad_work = None
        self.grad: torch.Tensor | None = None
        self.grad_sent: torch.Tensor | None = None


def _all_to_all(rows: torch.Tensor, exchange: _Exchange, backward: bool):
    """Start an all-to-all of `rows` (async; backward: the splits reversed); returns the tensor it
    fills and its work handle."""
    send, receive = exchange.send_splits, exchange.receive_splits
    if backward:
        send, receive = receive, send
    out = rows.new_empty((sum(receive), rows.shape[1]))
    work = dist.all_to_all_single(
        out, rows, output_split_sizes=receive, input_split_sizes=send, group=exchange.group, async_op=True
    )
    return out, work


class _StartExchange(torch.autograd.Function):
    """Forward: start sending the rows. Backward: wait for the gradient sent by `_WaitExchange`."""

    @staticmethod
    def forward(ctx, rows: torch.Tensor, exchange: _Exchange) -> torch.Tensor:
        ctx.exchange = exchange
        exchange.sent = rows.contiguous()
        out, exchange.work = _all_to_all(exchange.sent, exchange, backward=False)
        return out

    @staticmethod
    def backward(ctx, _grad_placeholder: torch.Tensor):
        exchange = ctx.exchange
        exchange.grad_work.wait()
        grad, exchange.grad, exchange.grad_sent = exchange.grad, None, None
        return grad, None


class _WaitExchange(torch.autograd.Function):
    """Forward: wait for the rows. Backward: start sending their gradient back."""

    @staticmethod
    def forward(ctx, received: torch.Tensor, exchange: _Exchange) -> torch.Tensor:
        ctx.exchange = exchange
        exchange.work.wait()
        exchange.work, exchange.sent = None, None
        return received.view_as(received)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        exchange = ctx.exchange
        exchange.grad_sent = grad.contiguous()
        exchange.grad, exchange.grad_work = _all_to_all(exchange.grad_sent, exchange, backward=True)
        # what reaches _StartExchange.backward is only a placeholder: it reads the exchange's result
        return grad.new_zeros(()).expand_as(grad), None


def chunk_bounds(tokens: int, chunks: int) -> list[tuple[int, int]]:
    """[start, stop) of `chunks` contiguous, nearly equal token ranges (fewer if there are fewer
    tokens). Every rank of an expert group has the same token count, so the same chunks: each chunk
    is a collective all of them must join."""
    chunks = max(1, min(chunks, tokens))
    return list(itertools.pairwise(tokens * c // chunks for c in range(chunks + 1)))


def _route_chunk(layer, x: torch.Tensor, experts: torch.Tensor):
    """A chunk's (token, slot) rows in expert order, their order, and its all-to-all plan."""
    from deepspeed.module_inject.auto_ep_layer import compute_split_plan
    from deepspeed.moe.ep_count import count_tokens_per_expert

    order = torch.argsort(experts.reshape(-1).to(sort_key_dtype(layer.num_experts)), stable=True)
    rows = x[order // layer.top_k]
    counts = count_tokens_per_expert(experts, layer.num_experts)
    plan = compute_split_plan(
        selected_experts=experts,
        num_experts=layer.num_experts,
        ep_size=layer.ep_size,
        num_local_experts=layer.num_local_experts,
        ep_group=layer.ep_group,
        num_tokens_per_expert=counts,
    )
    return rows, order, plan


def _combine_chunk(
    layer, expert_rows: torch.Tensor, top_scores: torch.Tensor, order: torch.Tensor, tokens: int
):
    from deepspeed.module_inject.auto_ep_layer import combine_from_routed
    from deepspeed.ops.triton_ops import autoep_fused_token_ops

    shape = (1, tokens, expert_rows.shape[-1])
    if layer.combine_impl == "fused_weighted_sum":
        return autoep_fused_token_ops.fused_weighted_restore(
            expert_rows, top_scores=top_scores, token_indices_sorted=order, top_k=layer.top_k, shape=shape
        )
    return combine_from_routed(
        expert_rows,
        top_scores=top_scores,
        token_indices_sorted=order,
        top_k=layer.top_k,
        score_apply=layer.score_apply,
        combine_impl=layer.combine_impl,
        shape=shape,
    )


# Run eagerly inside a compiled decoder layer: the order of the collectives and the experts is the
# point, and dynamo cannot trace work handles held across autograd Functions anyway.
@torch.compiler.disable
def chunked_forward(layer, chunks: int, hidden_states: torch.Tensor):
    """AutoEP's `_forward` for ep > 1 without folding, the all-to-alls of `chunks` token chunks
    overlapped with the experts (module docstring)."""
    from deepspeed.module_inject.auto_ep_layer import (
        RouterOutput,
        permute_by_local_expert,
        unpermute_by_local_expert,
    )

    bsz, seqlen, hdim = hidden_states.shape
    x = hidden_states.reshape(-1, hdim)
    ro = RouterOutput(*layer.router(x, layer.expert_bias))
    with torch.no_grad():
        layer.tokens_per_expert.add_(ro.num_tokens_per_expert)

    bounds = chunk_bounds(x.shape[0], chunks)
    # every chunk's plan first: each is a blocking exchange of expert counts (and a host sync), which
    # behind a dispatch in flight would wait for it
    routed = [_route_chunk(layer, x[a:b], ro.selected_experts[a:b]) for a, b in bounds]
    dispatches = []
    for c, (rows, order, plan) in enumerate(routed):  # every dispatch queued before any expert runs
        exchange = _Exchange(layer.ep_group, plan.input_splits, plan.output_splits)
        dispatches.append((_StartExchange.apply(rows, exchange), exchange))
        routed[c] = (order, plan)  # the exchange holds the rows until they are sent
    pending = []
    for (received, exchange), (order, plan) in zip(dispatches, routed, strict=True):
        rows = _WaitExchange.apply(received, exchange)
        rows, permutation, aligned_counts, n_rows = permute_by_local_expert(rows, plan.local_counts_by_source)
        rows = unpermute_by_local_expert(layer.experts(rows, aligned_counts), permutation, n_rows)
        back = _Exchange(layer.ep_group, plan.output_splits, plan.input_splits)
        pending.append((_StartExchange.apply(rows, back), back, order))
    outputs = []
    for (received, back, order), (start, stop) in zip(pending, bounds, strict=True):
        rows = _WaitExchange.apply(received, back)
        outputs.append(_combine_chunk(layer, rows, ro.top_scores[start:stop], order, stop - start))
    output = torch.cat(outputs, dim=1).reshape(bsz, seqlen, hdim)
    return layer._finalize_output(output, x, hidden_states, hdim)


def overlap_expert_exchanges(layers: list[nn.Module], chunks: int) -> None:
    """Run each AutoEP layer's tokens in `chunks` overlapped chunks (chunks <= 1: AutoEP's own path)."""
    if chunks <= 1:
        return
    for layer in layers:
        if layer.ep_size == 1:
            continue  # nothing to send: AutoEP's local path
        if layer.folding_group_handles is not None or layer.comm_backend != "comm":
            raise ValueError(
                "parallel.expert_chunks > 1 overlaps AutoEP's NCCL/gloo all-to-alls only: not with its "
                f"tensor-parallel folding or the {layer.comm_backend!r} backend"
            )
        layer._forward = functools.partial(chunked_forward, layer, chunks)
