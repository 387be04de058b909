"""train/losses.py in one process: target counts, token-weighted means and the global-batch LBL over
micro-batches, checked against straightforward whole-batch computations written here.

The reference helpers (`reference_*`, `make_global_batch`) are shared with
tests/distributed/test_losses_distributed.py.
"""

import pytest
import torch

from model.init import init_weights
from model.moe import moe_blocks, route, router_stats
from model.ops.experts import expert_token_counts
from model.qwen3_next import IGNORE_INDEX, CausalLMOutput, Qwen3NextForCausalLM
from tests.conftest import tiny_config
from train.losses import StepTokens, TrainingObjective, count_targets, global_target_counts

# ---------------------------------------------------------------------------------------------
# References: the definitions, computed on the whole global batch at once


def reference_lbl(router_logits, top_k):
    """mean over layers of E * sum_i f_i * P_i on one batch: f from the top-k of the fp32 softmax."""
    per_layer = []
    for logits in router_logits:
        probs = logits.float().softmax(dim=-1)
        num_experts = probs.shape[-1]
        chosen = probs.detach().topk(top_k, dim=-1).indices
        counts = torch.nn.functional.one_hot(chosen, num_experts).sum(dim=(0, 1)).float()
        per_layer.append(num_experts * (counts / counts.sum() * probs.mean(dim=0)).sum())
    return torch.stack(per_layer).mean()


def reference_per_micro_batch_lbl(micro_batches_logits, top_k):
    """The variant the global one replaces: each micro-batch balanced on its own, then averaged."""
    return torch.stack([reference_lbl(logits, top_k) for logits in micro_batches_logits]).mean()


def reference_z_loss(router_logits):
    return torch.stack([x.float().logsumexp(dim=-1).square().mean() for x in router_logits]).mean()


def reference_objective(out, router_logits, top_k, mtp_weight, lb_coef, z_coef):
    """The step's loss from ONE forward over the whole global batch (the model's own token counts)."""
    lm = out.lm_loss_sum / out.lm_tokens
    mtp = torch.stack([s / n for s, n in zip(out.mtp_loss_sums, out.mtp_tokens, strict=True)]).mean()
    lb = reference_lbl(router_logits, top_k)
    z = reference_z_loss(router_logits)
    loss = lm + mtp_weight * mtp + lb_coef * lb + z_coef * z
    return loss, {"lm_loss": lm, "mtp_loss": mtp, "lb_loss": lb, "z_loss": z, "loss": loss}


def make_global_batch(rows, seq_len, seed, vocab=97):
    """Packed rows: documents restart positions at 0, no label across a document end or past the row,
    and some rows end in padding (labels -100), so micro-batches hold unequal numbers of targets."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (rows, seq_len), generator=gen)
    pos = torch.empty(rows, seq_len, dtype=torch.long)
    labels = torch.full((rows, seq_len), IGNORE_INDEX)
    for r in range(rows):
        p = int(torch.randint(0, 5, (), generator=gen))  # a row may open mid-document
        for t in range(seq_len):
            if t > 0 and torch.rand((), generator=gen) < 0.15:
                p = 0
            pos[r, t] = p
            p += 1
        labels[r, :-1] = torch.where(pos[r, 1:] == 0, IGNORE_INDEX, ids[r, 1:])
        labels[r, seq_len - 3 * r :] = IGNORE_INDEX  # padding of different lengths per row
    return {"input_ids": ids, "labels": labels, "position_ids": pos}


def rows(batch, start, stop):
    return {k: v[start:stop] for k, v in batch.items()}


def build_model(seed=0, **overrides):
    config = tiny_config(**overrides)
    model = Qwen3NextForCausalLM(config)
    init_weights(model, config, seed)
    return model


def forward_with_router_logits(model, batch):
    """The model's output and every router's logits, caught by hooks on the gates."""
    logits = []
    hooks = [b.gate.register_forward_hook(lambda _m, _i, out: logits.append(out)) for b in moe_blocks(model)]
    try:
        return model(**batch), logits
    finally:
        for hook in hooks:
            hook.remove()


def routed_by_top_k(router_logits, top_k):
    """RouterStats of routers that send each token to its top-k experts by softmax probability."""
    stats = []
    for logits_te in router_logits:
        _, topk_idx_tk, probs_te = route(logits_te, top_k, renormalize=False)
        stats.append(router_stats(logits_te, probs_te, expert_token_counts(topk_idx_tk, logits_te.shape[-1])))
    return stats


def fake_output(lm_sum, lm_tokens, mtp_sums=(), mtp_tokens=(), router_logits=(), top_k=2):
    as_tensor = lambda v: torch.as_tensor(v, dtype=torch.float32)
    return CausalLMOutput(
        lm_loss_sum=as_tensor(lm_sum),
        lm_tokens=torch.tensor(lm_tokens),
        mtp_loss_sums=[as_tensor(s) for s in mtp_sums],
        mtp_tokens=[torch.tensor(n) for n in mtp_tokens],
        router_stats=routed_by_top_k(router_logits, top_k),
    )


def crafted_router_logits(num_groups, tokens, num_experts=8, layers=2, seed=0):
    """Router logits of `num_groups` micro-batches; in layer 0 micro-batch g strongly prefers experts
    2g and 2g+1, so each micro-batch alone is badly balanced and all of them together are not."""
    gen = torch.Generator().manual_seed(seed)
    groups = []
    for g in range(num_groups):
        per_layer = [torch.randn(tokens, num_experts, generator=gen) for _ in range(layers)]
        per_layer[0][:, 2 * g : 2 * g + 2] += 6.0
        groups.append(per_layer)
    return groups


def concat_layers(groups):
    return [torch.cat(layer) for layer in zip(*groups, strict=True)]


# ---------------------------------------------------------------------------------------------
# Target counts


def python_target_counts(labels, position_ids, depths):
    """Loop over tokens: a depth-k target at i exists if i + k is in the row, labels[i + k] != -100
    and i, i + k lie in the same document segment (a segment starts at position 0 or the row start)."""
    counts = [0] * (1 + depths)
    for lab, pos in zip(labels.tolist(), position_ids.tolist(), strict=True):
        seg, segment = -1, []
        for t, p in enumerate(pos):
            seg += t == 0 or p == 0
            segment.append(seg)
        for i in range(len(lab)):
            counts[0] += lab[i] != IGNORE_INDEX
            for k in range(1, depths + 1):
                j = i + k
                counts[k] += j < len(lab) and lab[j] != IGNORE_INDEX and segment[j] == segment[i]
    return counts


def test_count_targets_matches_a_token_loop():
    batch = make_global_batch(rows=4, seq_len=20, seed=1)
    for depths in (0, 1, 3):
        got = count_targets(batch["labels"], batch["position_ids"], depths)
        assert got.tolist() == python_target_counts(batch["labels"], batch["position_ids"], depths)
    unpacked = count_targets(batch["labels"], None, 2).tolist()
    assert unpacked == python_target_counts(batch["labels"], torch.ones_like(batch["labels"]), 2)


def test_count_targets_agrees_with_the_models_own_counts():
    model = build_model(mtp_num_layers=2)
    batch = make_global_batch(rows=3, seq_len=16, seed=2)
    with torch.no_grad():
        out = model(**batch)
    expected = [int(out.lm_tokens)] + [int(n) for n in out.mtp_tokens]
    assert count_targets(batch["labels"], batch["position_ids"], 2).tolist() == expected


def test_global_target_counts_sums_the_steps_micro_batches():
    batch = make_global_batch(rows=4, seq_len=12, seed=3)
    micro_batches = [rows(batch, 0, 1), rows(batch, 1, 3), rows(batch, 3, 4)]
    tokens = global_target_counts(micro_batches, mtp_depths=2)
    whole = python_target_counts(batch["labels"], batch["position_ids"], 2)
    assert tokens == StepTokens(lm=whole[0], mtp=tuple(whole[1:]), routed=48, micro_batches=3, dp_size=1)
    assert tokens.deepspeed_grad_scale == 3


# ---------------------------------------------------------------------------------------------
# Token-weighted means


def test_lm_and_mtp_losses_are_token_weighted_over_micro_batches():
    # micro-batch 1: 10 tokens of mean loss 1; micro-batch 2: 30 tokens of mean loss 3
    outs = [fake_output(10.0, 10, [5.0], [5]), fake_output(90.0, 30, [60.0], [15])]
    tokens = StepTokens(lm=40, mtp=(20,), routed=64, micro_batches=2, dp_size=1)
    objective = TrainingObjective(8, mtp_weight=0.5, lb_coef=0.0)
    objective.begin_step(tokens, grad_scale=1.0)
    micro_losses = [objective.micro_batch_loss(out) for out in outs]
    result = objective.end_step()

    assert result.lm_loss == pytest.approx(100.0 / 40)  # the mean of means would be 2.0
    assert result.mtp_loss == pytest.approx(65.0 / 20)
    assert result.loss == pytest.approx(100.0 / 40 + 0.5 * 65.0 / 20)
    assert float(sum(micro_losses)) == pytest.approx(result.loss)  # the shares add up to the value


def test_default_grad_scale_undoes_deepspeeds_average():
    out = fake_output(12.0, 6)
    tokens = StepTokens(lm=6, mtp=(), routed=8, micro_batches=2, dp_size=3)
    objective = TrainingObjective(8, mtp_weight=0.0, lb_coef=0.0)
    objective.begin_step(tokens)
    assert float(objective.micro_batch_loss(out)) == pytest.approx(3 * 2 * 12.0 / 6)


# ---------------------------------------------------------------------------------------------
# The global-batch load-balancing loss and the z-loss


def run_step(objective, outs):
    tokens = StepTokens(
        lm=sum(int(o.lm_tokens) for o in outs),
        mtp=(),
        # each token's probabilities sum to 1
        routed=sum(round(float(o.router_stats[0].prob_sums_e.detach().sum())) for o in outs),
        micro_batches=len(outs),
        dp_size=1,
    )
    objective.begin_step(tokens, grad_scale=1.0)
    for out in outs:
        loss = objective.micro_batch_loss(out)
        if loss.requires_grad:
            loss.backward()
    return objective.end_step()


def test_lbl_over_micro_batches_is_the_whole_batch_value_not_the_per_micro_batch_one():
    groups = crafted_router_logits(num_groups=4, tokens=6)
    outs = [fake_output(1.0, 1, router_logits=g) for g in groups]
    objective = TrainingObjective(8, mtp_weight=0.0, lb_coef=1.0, z_coef=1.0)
    result = run_step(objective, outs)

    whole = reference_lbl(concat_layers(groups), top_k=2)
    assert result.lb_loss == pytest.approx(float(whole), rel=1e-6, abs=1e-6)
    per_micro_batch = reference_per_micro_batch_lbl(groups, top_k=2)
    assert float(per_micro_batch) > float(whole) + 0.5  # the crafted batch tells the two apart
    assert result.z_loss == pytest.approx(float(reference_z_loss(concat_layers(groups))), rel=1e-6)


def leaf_logits(groups):
    return [[x.clone().requires_grad_() for x in g] for g in groups]


def test_z_gradient_over_micro_batches_and_lbl_gradient_of_one_micro_batch_equal_the_whole_batchs():
    """z has no batch-wide factor, so it is exact over any micro-batches; the LBL is exact for a step
    of one micro-batch (the running scheme then knows the whole step's loads)."""
    groups = crafted_router_logits(num_groups=3, tokens=5, seed=1)
    groups[2] = [x[:2] for x in groups[2]]  # a smaller micro-batch: token weighting matters
    for coefs, micro_batches in (
        (dict(lb_coef=0.0, z_coef=0.2), groups),
        (dict(lb_coef=0.7, z_coef=0.2), None),
    ):
        micro_batches = micro_batches or [concat_layers(groups)]
        leaves = leaf_logits(micro_batches)
        outs = [fake_output(1.0, 1, router_logits=g, top_k=3) for g in leaves]
        run_step(TrainingObjective(8, mtp_weight=0.0, **coefs), outs)

        whole = [torch.cat(layer).requires_grad_() for layer in zip(*groups, strict=True)]
        (
            coefs["lb_coef"] * reference_lbl(whole, top_k=3) + coefs["z_coef"] * reference_z_loss(whole)
        ).backward()
        for layer, ref in enumerate(whole):
            got = torch.cat([g[layer].grad for g in leaves])
            torch.testing.assert_close(got, ref.grad, rtol=1e-5, atol=1e-7)


def test_running_lbl_gradient_is_megatrons_running_counts_scheme():
    """Micro-batch m is weighted by the expert shares of micro-batches 1..m (Megatron-Core's
    global_aux_loss); it differs from the exact gradient except for the last micro-batch."""
    groups = crafted_router_logits(num_groups=3, tokens=5, seed=2)
    leaves = leaf_logits(groups)
    run_step(
        TrainingObjective(8, mtp_weight=0.0, lb_coef=1.0),
        [fake_output(1.0, 1, router_logits=g) for g in leaves],
    )

    total_tokens, num_layers, num_experts = 15, 2, 8
    seen = torch.zeros(num_layers, num_experts)
    for m, g in enumerate(groups):
        ref = [x.clone().requires_grad_() for x in g]
        terms = []
        for layer, x in enumerate(ref):
            probs = x.softmax(dim=-1)
            chosen = probs.detach().topk(2, dim=-1).indices.flatten()
            seen[layer] += torch.bincount(chosen, minlength=num_experts).float()
            f = seen[layer] / seen[layer].sum()
            terms.append(num_experts * (f * probs.sum(dim=0)).sum() / total_tokens)
        torch.stack(terms).mean().backward()
        for got, want in zip(leaves[m], ref, strict=True):
            torch.testing.assert_close(got.grad, want.grad, rtol=1e-5, atol=1e-7)

    # against the exact gradient of the whole batch's LBL: the last micro-batch gets it, the first not
    whole = [torch.cat(layer).requires_grad_() for layer in zip(*groups, strict=True)]
    reference_lbl(whole, top_k=2).backward()
    exact = [ref.grad.split(5) for ref in whole]
    assert not torch.allclose(leaves[0][0].grad, exact[0][0], atol=1e-4)
    torch.testing.assert_close(leaves[-1][0].grad, exact[0][-1])


def test_expert_load_metrics():
    groups = crafted_router_logits(num_groups=2, tokens=7, seed=3)
    result = run_step(
        TrainingObjective(8, mtp_weight=0.0, lb_coef=0.0),
        [fake_output(1.0, 1, router_logits=g) for g in groups],
    )
    ratios = []
    for layer, x in enumerate(concat_layers(groups)):
        counts = torch.bincount(x.softmax(-1).topk(2, dim=-1).indices.flatten(), minlength=8)
        assert result.expert_tokens[layer].tolist() == counts.tolist()
        ratios.append(counts.max().item() / counts.float().mean().item())
    assert result.expert_load_max_over_mean == pytest.approx(sum(ratios) / len(ratios))
    assert result.expert_load_max_over_mean_worst_layer == pytest.approx(max(ratios))
    assert set(result.as_metrics()) >= {"loss", "lm_loss", "mtp_loss", "lb_loss", "expert_load_max_over_mean"}


# ---------------------------------------------------------------------------------------------
# The whole objective on the tiny model, one process


def model_grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


COEFS = dict(mtp_weight=0.5, lb_coef=0.1, z_coef=0.01)


@pytest.mark.slow
@pytest.mark.parametrize("lb_coef", [0.0, 0.1])
def test_model_step_over_micro_batches_equals_one_whole_batch_forward(lb_coef):
    """Values always; gradients whenever the LBL's running scheme is not involved (lb_coef 0)."""
    model = build_model()
    batch = make_global_batch(rows=3, seq_len=16, seed=4)
    micro_batches = [rows(batch, 0, 1), rows(batch, 1, 3)]
    top_k = model.config.num_experts_per_tok
    coefs = dict(COEFS, lb_coef=lb_coef)

    objective = TrainingObjective(model.config.num_experts, **coefs)
    objective.begin_step(global_target_counts(micro_batches, mtp_depths=1))
    for mb in micro_batches:
        (objective.micro_batch_loss(model(**mb)) / len(micro_batches)).backward()  # DeepSpeed's 1/M
    result = objective.end_step()
    got = model_grads(model)

    model.zero_grad()
    loss, values = reference_objective(*forward_with_router_logits(model, batch), top_k, **coefs)
    loss.backward()
    for name, value in values.items():
        assert getattr(result, name) == pytest.approx(value.item(), rel=1e-6), name
    if lb_coef:
        return
    for name, grad in model_grads(model).items():
        torch.testing.assert_close(got[name], grad, rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.parametrize("mtp_depths", [1, 2])
def test_heads_sharing_one_weight_gradient_give_the_separate_heads_gradients(mtp_depths):
    """With the objective's head_loss_weights the heads sum the LM head's weight gradient in one
    buffer during forward; every gradient must equal the step's with each head's own gradient."""
    micro_batches = [rows(make_global_batch(rows=3, seq_len=16, seed=7), r, r + 1) for r in range(3)]
    tokens = global_target_counts(micro_batches, mtp_depths=mtp_depths)
    assert len(set((tokens.lm, *tokens.mtp))) > 1  # unequal counts: the heads' weights differ
    grads = []
    for share in (False, True):
        model = build_model(mtp_num_layers=mtp_depths)
        objective = TrainingObjective(model.config.num_experts, mtp_weight=0.3, lb_coef=0.0)
        objective.begin_step(tokens)
        for mb in micro_batches:
            weights = objective.head_loss_weights() if share else None
            (objective.micro_batch_loss(model(**mb, head_loss_weights=weights)) / 3).backward()
        objective.end_step()
        grads.append(model_grads(model))
    assert grads[0].keys() == grads[1].keys()
    for name, grad in grads[0].items():
        torch.testing.assert_close(grads[1][name], grad, rtol=1e-5, atol=1e-7, msg=name)


def test_a_loss_built_with_other_head_weights_poisons_the_gradients():
    """Weights given to the model that the loss does not use: the weight gradient would be silently
    wrong, so the other heads' input gradients turn NaN (the step is then skipped as not finite)."""
    model = build_model()
    batch = make_global_batch(rows=2, seq_len=16, seed=3)
    objective = TrainingObjective(model.config.num_experts, mtp_weight=0.3, lb_coef=0.0)
    objective.begin_step(global_target_counts([batch], mtp_depths=1))
    weights = objective.head_loss_weights()
    out = model(**batch, head_loss_weights=(weights[0], 2 * weights[1]))
    objective.micro_batch_loss(out).backward()
    objective.end_step()
    assert torch.isnan(model.model.embed_tokens.weight.grad).any()
    with pytest.raises(ValueError, match="head_loss_weights has 3 weights; this model has 2 heads"):
        model(**batch, head_loss_weights=(1.0, 1.0, 1.0))
    with pytest.raises(ValueError, match="finite and >= 0"):
        model(**batch, head_loss_weights=(1.0, float("nan")))


def test_dense_model_has_no_router_terms():
    objective = TrainingObjective(0, mtp_weight=0.0, lb_coef=0.01, z_coef=0.01)
    objective.begin_step(StepTokens(lm=4, mtp=(), routed=4, micro_batches=1, dp_size=1), grad_scale=1.0)
    assert float(objective.micro_batch_loss(fake_output(8.0, 4))) == pytest.approx(2.0)
    result = objective.end_step()
    assert (result.lb_loss, result.z_loss, result.expert_load_max_over_mean) == (0.0, 0.0, 1.0)


def test_misuse_fails_with_a_message():
    objective = TrainingObjective(8, mtp_weight=0.3, lb_coef=0.01)
    with pytest.raises(RuntimeError, match="begin_step"):
        objective.micro_batch_loss(fake_output(1.0, 1))
    objective.begin_step(StepTokens(lm=1, mtp=(1,), routed=1, micro_batches=1, dp_size=1))
    with pytest.raises(RuntimeError, match="twice"):
        objective.begin_step(StepTokens(lm=1, mtp=(1,), routed=1, micro_batches=1, dp_size=1))
    with pytest.raises(ValueError, match="MTP depths"):
        objective.micro_batch_loss(fake_output(1.0, 1))
    with pytest.raises(ValueError, match="labels"):
        objective.micro_batch_loss(CausalLMOutput(logits=torch.zeros(1, 1, 8)))


def test_micro_batch_scope_lbl_is_each_micro_batch_balanced_on_its_own():
    """loss.lb_scope=micro_batch: the mean over micro-batches of each one's own LBL, value and
    gradient (each micro-batch's term from its own loads), against the reference written here."""
    groups = crafted_router_logits(num_groups=3, tokens=5, seed=4)
    groups[2] = [x[:3] for x in groups[2]]  # a smaller micro-batch: its own mean still counts once
    leaves = leaf_logits(groups)
    objective = TrainingObjective(8, mtp_weight=0.0, lb_coef=1.0, lb_scope="micro_batch")
    result = run_step(objective, [fake_output(1.0, 1, router_logits=g) for g in leaves])
    per_micro_batch = reference_per_micro_batch_lbl(groups, top_k=2)
    assert result.lb_loss == pytest.approx(float(per_micro_batch), rel=1e-6)
    assert result.lb_loss > float(reference_lbl(concat_layers(groups), top_k=2)) + 0.5

    reference = leaf_logits(groups)
    # run_step's grad_scale 1: the micro-batches' shares add up to the mean over them
    reference_per_micro_batch_lbl(reference, top_k=2).backward()
    for got_layers, want_layers in zip(leaves, reference, strict=True):
        for got, want in zip(got_layers, want_layers, strict=True):
            torch.testing.assert_close(got.grad, want.grad, rtol=1e-5, atol=1e-7)


def test_an_unknown_lb_scope_is_refused():
    with pytest.raises(ValueError, match=r"loss\.lb_scope"):
        TrainingObjective(8, mtp_weight=0.0, lb_coef=1.0, lb_scope="batch")
