"""AutoEP's token dispatch is a bijection: each (token, slot) reaches its expert once and comes back
to its place, also with experts that get no tokens.

On 2 and 4 gloo ranks each rank routes its own random tokens through the AutoEP layer that DeepSpeed
made from our SparseMoeBlock (parallel/expert.py's config). The reference is our own block with the
same weights on the same tokens, run locally: equal outputs and input gradients (fp32, 1e-5) mean
every slot's token went to the expert the router picked and its result was combined into that
token. The router is skewed per seed so that some experts get nothing and others most tokens.
"""

from __future__ import annotations

import os

import pytest
import torch
from torch import nn

from tests.conftest import tiny_config
from tests.distributed.gloo import run_on_ranks

TOKENS_PER_RANK = 37  # not a multiple of anything: uneven splits everywhere


class OneMoeLayer(nn.Module):
    """A model with one MoE block at the path AutoEP's pattern matches."""

    def __init__(self, config):
        from model.moe import SparseMoeBlock

        super().__init__()
        self.config = config
        self.model = nn.Module()
        self.model.layers = nn.ModuleList([nn.Module()])
        self.model.layers[0].mlp = SparseMoeBlock(config)

    def forward(self, x):
        out = self.model.layers[0].mlp(x)
        return out[0] if isinstance(out, tuple) else out  # ours returns its RouterStats too


def skewed_block(config, seed: int):
    """Random weights; the router's weight on feature 0 (3 for every token) pushes a third of the
    experts far down (never picked) and one up (picked by most tokens)."""
    model = OneMoeLayer(config)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            param.copy_(torch.randn(param.shape, generator=gen) * 0.3)
        gate = model.model.layers[0].mlp.gate.weight
        experts = torch.randperm(config.num_experts, generator=gen)
        gate[experts[: config.num_experts // 3], 0] = -5.0  # with feature 0 of every token at 3
        gate[experts[-1], 0] = 1.0
    return model


def dispatch_on_ranks(rank, world, ep, seed):
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), DS_ACCELERATOR="cpu")
    import deepspeed

    from parallel.engine import skip_cpu_shm_build
    from parallel.expert import autoep_config

    skip_cpu_shm_build()
    deepspeed.init_distributed(dist_backend="gloo", verbose=False)
    config = tiny_config(num_experts=8, num_experts_per_tok=3)
    reference = skewed_block(config, seed)
    replaced = skewed_block(config, seed)
    ds_config = {
        "train_batch_size": world,
        "train_micro_batch_size_per_gpu": 1,
        "expert_parallel": autoep_config(ep),
        "zero_optimization": {"stage": 0},  # forward and backward only
    }
    idle = torch.optim.SGD(replaced.parameters(), lr=0.0)  # engine.backward wants one; never stepped
    engine, *_ = deepspeed.initialize(
        model=replaced, optimizer=idle, config=ds_config, dist_init_required=False
    )
    gen = torch.Generator().manual_seed(1000 * seed + rank)  # each rank its own tokens
    x = torch.randn(1, TOKENS_PER_RANK, config.hidden_size, generator=gen)
    x[..., 0] = 3.0  # the feature the skewed router rows read
    x_ref, x_ep = x.clone().requires_grad_(), x.clone().requires_grad_()
    upstream = torch.randn(x.shape, generator=gen)
    out_ref = reference(x_ref)
    out_ep = engine(x_ep)
    (out_ref * upstream).sum().backward()
    engine.backward((out_ep * upstream).sum())
    picked = reference.model.layers[0].mlp.gate(x.view(-1, config.hidden_size)).topk(3, dim=-1).indices
    used = torch.bincount(picked.flatten(), minlength=config.num_experts)
    torch.distributed.all_reduce(used)
    return out_ep.detach(), out_ref.detach(), x_ep.grad, x_ref.grad, used


@pytest.mark.parametrize(("world", "ep", "seed"), [(2, 2, 0), (4, 4, 1), (4, 2, 2)])
def test_every_slot_reaches_its_expert_and_returns(tmp_path, world, ep, seed):
    results = run_on_ranks(dispatch_on_ranks, world, tmp_path, ep, seed, timeout=180)
    used = results[0][4]
    assert (used == 0).any(), f"the skewed router should leave some expert without tokens: {used.tolist()}"
    for rank, (out_ep, out_ref, grad_ep, grad_ref, _) in enumerate(results):
        torch.testing.assert_close(
            out_ep, out_ref, rtol=1e-5, atol=1e-6, msg=lambda m, r=rank: f"rank {r}: {m}"
        )
        torch.testing.assert_close(
            grad_ep, grad_ref, rtol=1e-5, atol=1e-6, msg=lambda m, r=rank: f"rank {r}: {m}"
        )
