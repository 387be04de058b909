"""Tensor parallelism of the attention / DeltaNet heads, applied to a built model from outside.

Ranks form tensor-parallel groups of `tp` consecutive ranks ({0..tp-1}, ...) and data-parallel groups
of the ranks with the same position in theirs ({r, r+tp, ...}). Each TP rank keeps a contiguous slice
of the heads of every mixer (Megatron's layout):
- gated attention: its query heads (rows of `q_proj`, query and gate together per head) and the KV
  heads they read; with tp <= KV heads those are split too, with tp > KV heads each rank keeps the one
  KV head of its query heads (replicated over tp / KV ranks). `o_proj` takes the local heads' columns.
- Gated DeltaNet: its key heads with their value heads. `in_proj_qkvz` / `in_proj_ba` are grouped
  per key head (HF's layout), so a slice of key heads is a contiguous block of rows; the conv keeps
  the matching q, k and v channels; `A_log`, `dt_bias` the local value heads; `out_proj` the columns.
Column-parallel inputs go through `copy_to_tp` (identity forward, gradient summed over the group in
backward) and row-parallel outputs through `reduce_from_tp` (sum forward, identity backward).
Parameters every TP rank holds but uses on its own heads only (q/k norms, the gated norm, a
replicated KV head) get their gradient summed over the ranks sharing them by a hook. The LM head is
split over the vocabulary (parallel/vocab.py), unless tied to the embedding. Everything else (the
embedding, norms of the residual stream, the MoE) is replicated and computed on identical inputs, so
its gradients agree without communication.

Sharded parameters carry `tensor_model_parallel = True`, which DeepSpeed's gradient norm reads (via
the `mpu` below) to count them on every rank, and replicated ones on the first rank only. A KV head
kept by some ranks of the group is marked on the first of those.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from model.attention import GatedAttention
from model.deltanet import GatedDeltaNet


class TensorParallelGroups:
    """The process groups, in the `mpu` interface DeepSpeed takes (`deepspeed.initialize(mpu=...)`)."""

    def __init__(self, tp: int):
        world, rank = dist.get_world_size(), dist.get_rank()
        if world % tp:
            raise ValueError(f"parallel.tensor ({tp}) must divide the world size ({world})")
        self.tp, self.dp = tp, world // tp
        self.tp_rank, self.dp_rank = rank % tp, rank // tp
        self.tp_group = self.dp_group = None
        for start in range(0, world, tp):  # every rank creates every group, in the same order
            group = dist.new_group(list(range(start, start + tp)))
            if start <= rank < start + tp:
                self.tp_group = group
        for offset in range(tp):
            ranks = list(range(offset, world, tp))
            group = dist.new_group(ranks)
            if rank in ranks:
                self.dp_group, self.dp_ranks = group, ranks
        self.subgroups: dict[int, object] = {}  # size -> this rank's group of `size` consecutive TP ranks
        for size in range(2, tp):
            if tp % size == 0:
                for start in range(0, world, size):
                    group = dist.new_group(list(range(start, start + size)))
                    if start <= rank < start + size:
                        self.subgroups[size] = group

    # -- DeepSpeed's mpu interface --------------------------------------------------------------
    def get_model_parallel_rank(self) -> int:
        return self.tp_rank

    def get_model_parallel_world_size(self) -> int:
        return self.tp

    def get_model_parallel_group(self):
        return self.tp_group

    get_tensor_model_parallel_rank = get_model_parallel_rank
    get_tensor_model_parallel_world_size = get_model_parallel_world_size
    get_tensor_model_parallel_group = get_model_parallel_group

    def get_tensor_model_parallel_src_rank(self) -> int:
        return dist.get_rank() - self.tp_rank

    def get_data_parallel_rank(self) -> int:
        return self.dp_rank

    def get_data_parallel_world_size(self) -> int:
        return self.dp

    def get_data_parallel_group(self):
        return self.dp_group

    def get_data_parallel_group_ranks(self) -> list[int]:
        return self.dp_ranks

    def group_of(self, size: int):
        """This rank's group of `size` consecutive TP ranks (the whole TP group for size == tp)."""
        return self.tp_group if size == self.tp else self.subgroups[size]


@dataclass(frozen=True)
class TensorParallelPosition:
    """A rank's place in a tensor-parallel group without the process groups: enough to compute its
    shards (planning a rank's shard, parallel/build.py; joining checkpoint shards offline,
    parallel/checkpoint_files.py)."""

    tp: int
    tp_rank: int
    tp_group: None = None

    def group_of(self, size: int) -> None:
        return None


class _CopyToTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


class _ReduceFromTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        x = x.contiguous().clone()
        dist.all_reduce(x, group=group)
        return x

    @staticmethod
    def backward(ctx, grad):
        return grad, None


class ColumnParallelLinear(nn.Module):
    """y_local = x @ W[rows]^T, the input's gradient summed over the TP group."""

    def __init__(self, full: nn.Linear, rows: torch.Tensor, group):
        super().__init__()
        self.weight = sharded_parameter(full.weight, 0, rows)
        self.bias = sharded_parameter(full.bias, 0, rows) if full.bias is not None else None
        self.group = group

    def forward(self, x):
        return nn.functional.linear(_CopyToTP.apply(x, self.group), self.weight, self.bias)


class RowParallelLinear(nn.Module):
    """y = sum over the TP group of x_local @ W[:, columns]^T (+ bias once)."""

    def __init__(self, full: nn.Linear, columns: torch.Tensor, group):
        super().__init__()
        self.weight = sharded_parameter(full.weight, 1, columns)
        self.bias = nn.Parameter(full.bias.detach().clone()) if full.bias is not None else None
        self.group = group

    def forward(self, x):
        y = _ReduceFromTP.apply(nn.functional.linear(x, self.weight), self.group)
        return y + self.bias if self.bias is not None else y


def sharded_parameter(full: torch.Tensor, dim: int, index: torch.Tensor) -> nn.Parameter:
    """This rank's slice `full.index_select(dim, index)`; `tp_shard` = (dim, index) says where it sits."""
    param = nn.Parameter(full.detach().index_select(dim, index).clone())
    param.tensor_model_parallel = True
    param.tp_shard = (dim, index)
    return param


def sum_gradient_over(param: nn.Parameter, group) -> None:
    """The parameter is the same on the ranks of `group` but each uses it on its own heads only."""
    if group is None:  # planning shards offline: nothing runs backward
        return

    def hook(grad):
        grad = grad.clone()
        dist.all_reduce(grad, group=group)
        return grad

    param.register_hook(hook)


def rank_slice(count: int, tp: int, tp_rank: int) -> torch.Tensor:
    """The indices [r * count // tp, (r + 1) * count // tp) a TP rank keeps of `count` heads or rows
    (slices differ by one at most when tp does not divide count)."""
    return torch.arange(tp_rank * count // tp, (tp_rank + 1) * count // tp)


def head_rows(head: torch.Tensor, rows_per_head: int) -> torch.Tensor:
    return (head[:, None] * rows_per_head + torch.arange(rows_per_head)).flatten()


def shard_attention(attn: GatedAttention, groups: TensorParallelGroups | TensorParallelPosition) -> None:
    tp, r = groups.tp, groups.tp_rank
    heads, kv_heads, hd = attn.num_heads, attn.num_kv_heads, attn.head_dim
    local_heads = rank_slice(heads, tp, r)
    if kv_heads >= tp:
        local_kv = rank_slice(kv_heads, tp, r)
    else:  # each rank's query heads read one KV head, kept whole by tp / kv_heads ranks
        local_kv = torch.tensor([local_heads[0].item() // (heads // kv_heads)])
    attn.q_proj = ColumnParallelLinear(attn.q_proj, head_rows(local_heads, 2 * hd), groups.tp_group)
    attn.k_proj = ColumnParallelLinear(attn.k_proj, head_rows(local_kv, hd), groups.tp_group)
    attn.v_proj = ColumnParallelLinear(attn.v_proj, head_rows(local_kv, hd), groups.tp_group)
    attn.o_proj = RowParallelLinear(attn.o_proj, head_rows(local_heads, hd), groups.tp_group)
    if kv_heads < tp:  # a replicated KV head: its gradient is split over the ranks sharing it
        sharing = tp // kv_heads
        for linear in (attn.k_proj, attn.v_proj):
            # DeepSpeed's gradient norm counts a parameter on every rank that marks it model-parallel,
            # and every parameter on TP rank 0: marked on the first rank of each sharing group only,
            # each KV head counts once
            linear.weight.tensor_model_parallel = r % sharing == 0
            sum_gradient_over(linear.weight, groups.group_of(sharing))
    attn.num_heads, attn.num_kv_heads = len(local_heads), len(local_kv)
    for norm in (attn.q_norm, attn.k_norm):
        sum_gradient_over(norm.weight, groups.tp_group)


def shard_deltanet(mixer: GatedDeltaNet, groups: TensorParallelGroups | TensorParallelPosition) -> None:
    tp, r = groups.tp, groups.tp_rank
    dk, dv, g = mixer.head_k_dim, mixer.head_v_dim, mixer.v_per_k
    local_k = rank_slice(mixer.num_k_heads, tp, r)
    local_v = head_rows(local_k, g)  # value heads are grouped under their key head
    mixer.in_proj_qkvz = ColumnParallelLinear(
        mixer.in_proj_qkvz, head_rows(local_k, 2 * dk + 2 * g * dv), groups.tp_group
    )
    mixer.in_proj_ba = ColumnParallelLinear(mixer.in_proj_ba, head_rows(local_k, 2 * g), groups.tp_group)
    key_dim = mixer.key_dim
    channels = torch.cat(
        [head_rows(local_k, dk), key_dim + head_rows(local_k, dk), 2 * key_dim + head_rows(local_v, dv)]
    )
    conv = mixer.conv1d
    mixer.conv1d = nn.Conv1d(
        len(channels),
        len(channels),
        conv.kernel_size[0],
        groups=len(channels),
        padding=conv.padding[0],
        bias=False,
        device=conv.weight.device,  # the meta device while a rank's shard is planned (parallel/build.py)
    )
    mixer.conv1d.weight = sharded_parameter(conv.weight, 0, channels)
    mixer.A_log = sharded_parameter(mixer.A_log, 0, local_v)
    mixer.dt_bias = sharded_parameter(mixer.dt_bias, 0, local_v)
    mixer.out_proj = RowParallelLinear(mixer.out_proj, head_rows(local_v, dv), groups.tp_group)
    mixer.num_k_heads, mixer.num_v_heads = len(local_k), len(local_v)
    mixer.key_dim, mixer.value_dim = len(local_k) * dk, len(local_v) * dv
    sum_gradient_over(mixer.norm.weight, groups.tp_group)


def apply_tensor_parallel(model: nn.Module, groups: TensorParallelGroups | TensorParallelPosition) -> None:
    """Shard every attention and DeltaNet mixer of the model (main stack and MTP) in place, and the LM
    head over the vocabulary (parallel/vocab.py) unless it is tied to the replicated embedding."""
    from parallel.vocab import VocabParallelLMHead

    for module in list(model.modules()):
        if isinstance(module, GatedAttention):
            shard_attention(module, groups)
        elif isinstance(module, GatedDeltaNet):
            shard_deltanet(module, groups)
    if not model.config.tie_word_embeddings:
        model.lm_head = VocabParallelLMHead(model.lm_head, groups.tp, groups.tp_rank, groups.tp_group)
