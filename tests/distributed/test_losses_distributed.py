"""train/losses.py on 2 gloo ranks x 2 micro-batches against one process holding the whole global batch.

- The global-batch LBL (and z-loss) value equals the one-process, one-micro-batch value (fp32, 1e-6),
  and the crafted batch makes it differ from the per-micro-batch LBL.
- On the tiny model: lm/mtp token-weighted means, LBL and z-loss equal the one-process values, and the
  accumulated, dp-averaged gradients (as DeepSpeed forms them: each micro-batch's loss / M, the sum
  averaged over ranks) equal the one-process gradient (fp32, 1e-5) when a step has one micro-batch a
  rank. With two micro-batches the running LBL scheme still reports the exact values, but its
  gradient is not exact (the same without the LBL is).
"""

import pytest
import torch
import torch.distributed as dist

from model.qwen3_next import CausalLMOutput
from tests.distributed.gloo import run_on_ranks
from tests.unit.test_losses import (
    build_model,
    concat_layers,
    crafted_router_logits,
    forward_with_router_logits,
    make_global_batch,
    reference_lbl,
    reference_objective,
    reference_per_micro_batch_lbl,
    reference_z_loss,
    routed_by_top_k,
    rows,
)
from train.losses import StepTokens, TrainingObjective, global_target_counts

WORLD, MICRO_BATCHES = 2, 2
TOKENS_PER_MICRO_BATCH, TOP_K = 6, 2
COEFS = dict(mtp_weight=0.5, lb_coef=0.1, z_coef=0.01)
NO_LBL = dict(COEFS, lb_coef=0.0)


def fake_micro_batch(router_logits):
    """A micro-batch of TOKENS_PER_MICRO_BATCH tokens with its router logits; the LM part is filler."""
    batch = {"labels": torch.zeros(1, TOKENS_PER_MICRO_BATCH, dtype=torch.long)}
    out = CausalLMOutput(
        lm_loss_sum=torch.tensor(1.0),
        lm_tokens=torch.tensor(TOKENS_PER_MICRO_BATCH),
        router_stats=routed_by_top_k(router_logits, TOP_K),
    )
    return batch, out


def lbl_on_rank(rank, world_size):
    groups = crafted_router_logits(num_groups=world_size * MICRO_BATCHES, tokens=TOKENS_PER_MICRO_BATCH)
    mine = [fake_micro_batch(g) for g in groups[rank * MICRO_BATCHES : (rank + 1) * MICRO_BATCHES]]
    results = {}
    for scope in ("global", "micro_batch"):
        objective = TrainingObjective(
            8, mtp_weight=0.0, lb_coef=1.0, z_coef=1.0, lb_scope=scope, group=dist.group.WORLD
        )
        objective.begin_step(global_target_counts([b for b, _ in mine], 0))
        for _, out in mine:
            objective.micro_batch_loss(out)
        results[scope] = objective.end_step()
    return results


def test_global_batch_lbl_on_two_ranks_equals_one_process_one_micro_batch(tmp_path):
    groups = crafted_router_logits(num_groups=WORLD * MICRO_BATCHES, tokens=TOKENS_PER_MICRO_BATCH)
    whole = concat_layers(groups)
    objective = TrainingObjective(8, mtp_weight=0.0, lb_coef=1.0, z_coef=1.0)
    _, out = fake_micro_batch(whole)
    objective.begin_step(StepTokens(lm=1, mtp=(), routed=whole[0].shape[0], micro_batches=1, dp_size=1))
    objective.micro_batch_loss(out)
    one_process = objective.end_step()
    expected_lbl = reference_lbl(whole, TOP_K).item()
    assert one_process.lb_loss == pytest.approx(expected_lbl, rel=1e-6, abs=1e-6)
    assert reference_per_micro_batch_lbl(groups, TOP_K).item() > expected_lbl + 0.5  # tells them apart

    per_micro_batch = reference_per_micro_batch_lbl(groups, TOP_K).item()
    for results in run_on_ranks(lbl_on_rank, WORLD, tmp_path):
        # loss.lb_scope=micro_batch: the mean over every rank's micro-batches of their own LBLs
        assert results["micro_batch"].lb_loss == pytest.approx(per_micro_batch, rel=1e-6)
        result = results["global"]
        assert result.lb_loss == pytest.approx(one_process.lb_loss, rel=1e-6, abs=1e-6)
        assert result.z_loss == pytest.approx(reference_z_loss(whole).item(), rel=1e-6, abs=1e-6)
        assert torch.equal(result.expert_tokens, one_process.expert_tokens)


def global_batch():
    return make_global_batch(rows=WORLD * MICRO_BATCHES, seq_len=16, seed=5)


def step_on_rank(model, micro_batches, coefs):
    """One optimizer step's backward as DeepSpeed runs it: loss / M per micro-batch, grads averaged."""
    model.zero_grad()
    objective = TrainingObjective(model.config.num_experts, **coefs, group=dist.group.WORLD)
    tokens = global_target_counts(micro_batches, model.config.mtp_num_layers, group=dist.group.WORLD)
    objective.begin_step(tokens)
    for mb in micro_batches:
        (objective.micro_batch_loss(model(**mb)) / len(micro_batches)).backward()
    grads = {}
    for name, param in model.named_parameters():
        grad = param.grad if param.grad is not None else torch.zeros_like(param)
        dist.all_reduce(grad)
        grads[name] = grad / dist.get_world_size()
    return {"tokens": tokens, "result": objective.end_step(), "grads": grads}


def model_step_on_rank(rank, world_size):
    model = build_model()
    mine = rows(global_batch(), rank * MICRO_BATCHES, (rank + 1) * MICRO_BATCHES)
    split = [rows(mine, m, m + 1) for m in range(MICRO_BATCHES)]
    return {
        "one micro-batch": step_on_rank(model, [mine], COEFS),
        "two micro-batches, no LBL": step_on_rank(model, split, NO_LBL),
        "two micro-batches": step_on_rank(model, split, COEFS),
    }


def one_process_reference(coefs):
    model = build_model()
    out, router_logits = forward_with_router_logits(model, global_batch())
    loss, values = reference_objective(out, router_logits, model.config.num_experts_per_tok, **coefs)
    loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    tokens = (int(out.lm_tokens), tuple(int(n) for n in out.mtp_tokens), router_logits[0].shape[0])
    return values, grads, tokens


def test_model_losses_and_gradients_on_two_ranks_equal_one_process(tmp_path):
    references = {"with LBL": one_process_reference(COEFS), "no LBL": one_process_reference(NO_LBL)}

    for rank_results in run_on_ranks(model_step_on_rank, WORLD, tmp_path):
        for scheme, got in rank_results.items():
            values, want_grads, want_tokens = references["no LBL" if "no LBL" in scheme else "with LBL"]
            tokens = got["tokens"]
            assert (tokens.lm, tokens.mtp, tokens.routed) == want_tokens
            assert tokens.dp_size == WORLD
            for name, value in values.items():
                assert getattr(got["result"], name) == pytest.approx(value.item(), rel=1e-6), (scheme, name)
            close = [
                torch.allclose(got["grads"][name], grad, rtol=1e-5, atol=1e-5)
                for name, grad in want_grads.items()
            ]
            if scheme == "two micro-batches":  # micro-batch 1's LBL weighed by its own load alone
                assert not all(close)
            else:
                for name, grad in want_grads.items():
                    torch.testing.assert_close(got["grads"][name], grad, rtol=1e-5, atol=1e-5, msg=name)
