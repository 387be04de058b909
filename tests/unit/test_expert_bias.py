"""Aux-loss-free load balancing (DeepSeek-V3's selection bias): routing and the bias update."""

import torch

from model.moe import moe_blocks, route
from model.qwen3_next import Qwen3NextForCausalLM
from tests.conftest import tiny_config
from train.losses import expert_counts, load_max_over_mean, update_expert_biases


def test_zero_bias_routes_like_no_bias():
    logits = torch.randn(50, 8)
    plain, zero_bias = route(logits, 3, True), route(logits, 3, True, torch.zeros(8))
    assert all(torch.equal(a, b) for a, b in zip(plain, zero_bias, strict=True))


def test_bias_changes_the_choice_but_not_the_weights():
    logits = torch.randn(50, 8)
    bias = torch.zeros(8)
    bias[5] = 10.0  # expert 5 gets picked by every token
    weights, idx = route(logits, 3, renormalize=False, selection_bias_e=bias)
    assert (idx == 5).any(dim=-1).all()
    probs = logits.softmax(dim=-1)
    assert torch.equal(weights, probs.gather(-1, idx)), "weights must be the unbiased probabilities"
    renormed, idx_r = route(logits, 3, renormalize=True, selection_bias_e=bias)
    assert torch.equal(idx_r, idx)
    torch.testing.assert_close(renormed, weights / weights.sum(-1, keepdim=True))


def test_updates_balance_a_skewed_router_without_touching_its_logits():
    """A fixed router that prefers a few experts: the bias updates alone bring its load close to even."""
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(4096, 16, generator=gen) + torch.linspace(2.0, 0.0, 16)  # expert 0 preferred
    bias = torch.zeros(16)
    before = load_max_over_mean(expert_counts([logits], 4, [bias])).item()
    for _ in range(300):
        update_expert_biases([bias], expert_counts([logits], 4, [bias]), rate=1e-3)
    after = load_max_over_mean(expert_counts([logits], 4, [bias])).item()
    assert before > 2.0 and after < 1.2, (before, after)
    assert bias[0] < 0 < bias[-1], "the favoured expert is pushed down, the neglected one up"


def test_the_bias_is_a_checkpointed_buffer_of_every_moe_block():
    model = Qwen3NextForCausalLM(tiny_config())
    blocks = moe_blocks(model)
    assert "model.layers.0.mlp.expert_bias" not in model.state_dict()
    for block in blocks:
        block.enable_expert_bias()
    names = [n for n in model.state_dict() if n.endswith("expert_bias")]
    assert len(names) == len(blocks) == tiny_config().num_hidden_layers + tiny_config().mtp_num_layers
    assert names[-1].startswith("mtp."), "call order: the main stack, then MTP"
