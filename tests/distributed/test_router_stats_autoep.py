"""Under AutoEP (2 gloo ranks, experts split 2 ways) the load-balancing loss counts the experts that
AutoEP's own router picked: the counts the objective receives equal, per layer, a histogram of the
`selected_experts` the router returned (caught by an independent hook), with an aux-loss-free bias
that makes those picks differ from a plain top-k of the router's probabilities."""

from __future__ import annotations

import torch

from tests.distributed.gloo import run_on_ranks
from tests.distributed.test_rank_build import compose, start_deepspeed


def counts_on_rank(rank: int, world: int):
    start_deepspeed(rank, world)
    from parallel.expert import autoep_layers
    from train.build import build_training
    from train.config import validate_layout

    overrides = {"parallel.expert": 2, "loss.expert_bias_rate": 1e-3, "trainer.micro_batch_size": 1}
    cfg = compose({**overrides, "trainer.global_batch_size": 2, "data.streams": 2})
    training = build_training(cfg, validate_layout(cfg, world), rank, torch.device("cpu"))
    layers = autoep_layers(training.model)
    training.balancer.biases[0][5] = 10.0  # layer 0 picks expert 5 for every token
    picks, logits = [], []
    for layer in layers:
        layer.router.register_forward_hook(lambda _r, _i, out: picks.append(out[1].clone()))
        layer.router.gate.register_forward_hook(lambda _g, _i, out: logits.append(out.detach().clone()))
    gen = torch.Generator().manual_seed(rank)
    ids = torch.randint(0, cfg.model.vocab_size, (1, cfg.data.seq_len + 1), generator=gen)
    positions = torch.arange(cfg.data.seq_len)[None]
    result = training.step.run(
        [{"input_ids": ids[:, :-1], "labels": ids[:, 1:], "position_ids": positions}], lr=0.0
    ).result()
    forward = slice(0, len(layers))  # the routers' calls of the forward (recomputation may repeat them)
    router_counts = torch.stack(
        [torch.bincount(p.flatten(), minlength=cfg.model.num_experts) for p in picks[forward]]
    )
    plain_top_k = [x.softmax(-1).topk(cfg.model.num_experts_per_tok, dim=-1).indices for x in logits[forward]]
    return result.losses.local_expert_tokens, router_counts, picks[0], plain_top_k[0]


def test_lbl_counts_are_the_autoep_routers_own_choices(tmp_path):
    for objective_counts, router_counts, picks, plain in run_on_ranks(
        counts_on_rank, 2, tmp_path, timeout=300
    ):
        assert objective_counts.shape == router_counts.shape and objective_counts.shape[0] >= 2
        assert torch.equal(objective_counts, router_counts)
        assert (picks == 5).any(dim=-1).all(), "the bias decides layer 0's picks"
        assert not torch.equal(picks.sort(-1).values, plain.sort(-1).values), "a plain top-k would differ"
