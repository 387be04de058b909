"""AdamW parameter groups (what takes weight decay) and the learning-rate schedules."""

import math

import pytest
import torch

from model.qwen3_next import Qwen3NextForCausalLM
from tests.conftest import tiny_config
from train.optim import lr_at, param_groups


def groups_by_name(model):
    return {group["name"]: set(group["names"]) for group in param_groups(model, weight_decay=0.1)}


def test_every_parameter_is_in_exactly_one_group():
    model = Qwen3NextForCausalLM(tiny_config())
    groups = param_groups(model, weight_decay=0.1)
    grouped = [id(p) for group in groups for p in group["params"]]
    assert len(grouped) == len(set(grouped)) == len(list(model.parameters()))
    assert {g["name"]: g["weight_decay"] for g in groups} == {"decay": 0.1, "no_decay": 0.0}


def test_decay_on_matrices_and_zero_centred_norms_only():
    model = Qwen3NextForCausalLM(tiny_config())
    groups = groups_by_name(model)
    for name, param in model.named_parameters():
        leaf = name.rsplit(".", 1)[-1]
        if leaf in ("A_log", "dt_bias") or leaf == "bias" or name.endswith("linear_attn.norm.weight"):
            expected = "no_decay"
        elif "norm" in name:  # input/post-attention/final/q/k norms and MTP norms: zero-centred
            expected = "decay"
        else:
            expected = "decay" if param.ndim >= 2 else "no_decay"
        assert name in groups[expected], f"{name} should be in {expected}"
    # the zero-centred norms really are zero-centred (the reason they take decay)
    assert torch.equal(model.model.norm.weight, torch.zeros_like(model.model.norm.weight))


SCHEDULE = dict(lr=1.0, warmup_steps=10, total_steps=110, min_lr_ratio=0.1)


@pytest.mark.parametrize("schedule", ["cosine", "wsd"])
def test_warmup_is_linear_and_ends_at_the_peak(schedule):
    lrs = [lr_at(s, schedule=schedule, **SCHEDULE) for s in range(1, 11)]
    assert lrs == pytest.approx([s / 10 for s in range(1, 11)])


def test_cosine_follows_half_a_cosine_to_the_floor():
    for step in (10, 35, 60, 85, 110, 500):
        progress = min((step - 10) / 100, 1.0)
        expected = 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))
        assert lr_at(step, schedule="cosine", **SCHEDULE) == pytest.approx(expected)


def test_wsd_is_flat_then_decays_linearly_over_the_last_fraction():
    lr = lambda s: lr_at(s, schedule="wsd", decay_fraction=0.2, **SCHEDULE)
    decay_start = 110 - 22
    assert all(lr(s) == 1.0 for s in range(10, decay_start + 1))
    assert lr(decay_start + 11) == pytest.approx(1.0 - 0.9 * 0.5)
    assert lr(110) == pytest.approx(0.1) and lr(10_000) == pytest.approx(0.1)
    drops = [lr(s) - lr(s + 1) for s in range(decay_start, 110)]
    assert max(drops) - min(drops) < 1e-12 and min(drops) > 0


def test_unknown_schedule_is_named():
    with pytest.raises(ValueError, match=r"optim\.schedule"):
        lr_at(50, schedule="linear", **SCHEDULE)
