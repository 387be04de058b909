"""Aux-loss-free load balancing (DeepSeek-V3's selection bias): routing, the balancer's update, and
the routing statistics, which follow the experts the biased router actually picked."""

import torch
from torch import nn

from model.moe import moe_blocks, route
from model.ops.experts import expert_token_counts
from model.qwen3_next import Qwen3NextForCausalLM
from tests.conftest import tiny_config
from train.balancer import ExpertBiasBalancer
from train.losses import load_max_over_mean


def test_zero_bias_routes_like_no_bias():
    logits = torch.randn(50, 8)
    plain, zero_bias = route(logits, 3, True), route(logits, 3, True, torch.zeros(8))
    assert all(torch.equal(a, b) for a, b in zip(plain, zero_bias, strict=True))


def test_bias_changes_the_choice_but_not_the_weights():
    logits = torch.randn(50, 8)
    bias = torch.zeros(8)
    bias[5] = 10.0  # expert 5 gets picked by every token
    weights, idx, probs = route(logits, 3, renormalize=False, selection_bias_e=bias)
    assert (idx == 5).any(dim=-1).all()
    torch.testing.assert_close(probs, logits.softmax(dim=-1))
    assert torch.equal(weights, probs.gather(-1, idx)), "weights must be the unbiased probabilities"
    renormed, idx_r, _ = route(logits, 3, renormalize=True, selection_bias_e=bias)
    assert torch.equal(idx_r, idx)
    torch.testing.assert_close(renormed, weights / weights.sum(-1, keepdim=True))


class FixedRouterLayer(nn.Module):
    """A stand-in MoE layer: what the balancer needs of one (`num_experts`, an `expert_bias` slot)."""

    def __init__(self, num_experts: int):
        super().__init__()
        self.num_experts = num_experts
        self.weight = nn.Parameter(torch.zeros(1))
        self.register_buffer("expert_bias", None)


def test_balancer_evens_a_skewed_router_without_touching_its_logits():
    """A fixed router that prefers a few experts: the bias updates alone bring its load close to even."""
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(4096, 16, generator=gen) + torch.linspace(2.0, 0.0, 16)  # expert 0 preferred
    layer = FixedRouterLayer(16)
    balancer = ExpertBiasBalancer([layer], rate=1e-3)

    def counts():
        return expert_token_counts(route(logits, 4, False, layer.expert_bias)[1], 16)[None]

    before = load_max_over_mean(counts()).item()
    for _ in range(300):
        balancer.update(counts())
    after = load_max_over_mean(counts()).item()
    assert before > 2.0 and after < 1.2, (before, after)
    assert layer.expert_bias[0] < 0 < layer.expert_bias[-1], "the favoured expert down, the neglected up"


def test_a_step_that_was_not_good_leaves_the_biases_alone():
    """The trainer applies the rule with the step's `good` flag, a device tensor it does not read."""
    layers = [FixedRouterLayer(6), FixedRouterLayer(6)]
    balancer = ExpertBiasBalancer(layers, rate=0.5)
    counts_le = torch.tensor([[9, 1, 1, 1, 1, 5], [2, 2, 2, 2, 2, 2]], dtype=torch.float64)
    balancer.update(counts_le, apply=torch.tensor(False))
    assert all(torch.equal(b, torch.zeros(6)) for b in balancer.biases)
    balancer.update(counts_le, apply=torch.tensor(True))
    mean = 18 / 6  # layer 0: experts above the mean load go down by the rate, those below go up
    assert balancer.biases[0].tolist() == [-0.5 if c > mean else 0.5 for c in counts_le[0].tolist()]
    assert torch.equal(balancer.biases[1], torch.zeros(6))  # an even layer: no change


def test_the_bias_is_an_fp32_checkpointed_buffer_of_every_moe_block():
    model = Qwen3NextForCausalLM(tiny_config()).to(torch.bfloat16)
    blocks = moe_blocks(model)
    assert not any(n.endswith("expert_bias") for n in model.state_dict())
    ExpertBiasBalancer(blocks, rate=1e-3)
    state = model.state_dict()
    names = [n for n, v in state.items() if n.endswith("expert_bias") and v.dtype == torch.float32]
    assert len(names) == len(blocks) == tiny_config().num_hidden_layers + tiny_config().mtp_num_layers
    assert names[-1].startswith("mtp."), "call order: the main stack, then MTP"


def test_router_stats_count_the_experts_the_biased_router_picked():
    config = tiny_config()
    model = Qwen3NextForCausalLM(config)
    balancer = ExpertBiasBalancer(moe_blocks(model), rate=1e-3)
    balancer.biases[0][5] = 10.0  # layer 0 sends every token to expert 5, whatever its logits say
    ids = torch.randint(0, config.vocab_size, (2, 9))
    out = model(ids, labels=ids)
    counts_e = out.router_stats[0].counts_e
    assert counts_e[5] == 18 and counts_e.sum() == 18 * config.num_experts_per_tok
