"""Config validation and parameter/FLOP accounting against the model actually built."""

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from model.accounting import count_parameters, flops_per_token
from model.config import ModelConfig, load_model_config
from model.init import init_weights
from model.qwen3_next import Qwen3NextForCausalLM
from tests.conftest import tiny_config


def numel(module) -> int:
    return sum(p.numel() for p in module.parameters())


@pytest.mark.parametrize("preset", ["tiny", "small", "80b_a3b"])
def test_analytic_count_matches_the_built_model(preset):
    config = load_model_config(preset)
    with torch.device("meta"):
        model = Qwen3NextForCausalLM(config)
    counted = count_parameters(config)
    mtp = numel(model.mtp) if model.mtp is not None else 0
    assert counted.total == numel(model) - mtp
    assert counted.mtp == mtp
    experts = sum(
        p.numel() for n, p in model.named_parameters() if ".experts." in n and not n.startswith("mtp.")
    )
    assert counted.experts == experts


def test_80b_a3b_matches_the_published_sizes():
    counted = count_parameters(load_model_config("80b_a3b"))
    assert counted.total == pytest.approx(79.67e9, rel=5e-3)
    assert counted.experts == pytest.approx(77.31e9, rel=5e-3)
    assert counted.active == pytest.approx(3.88e9, rel=5e-3)
    assert counted.active_without_embedding == pytest.approx(3.25e9, rel=5e-3)


def test_80b_a3b_layer_pattern():
    config = load_model_config("80b_a3b")
    attention = [i for i, t in enumerate(config.layer_types) if t == "full_attention"]
    assert attention == list(range(3, 48, 4))
    assert config.layer_types.count("linear_attention") == 36


def test_flops_per_token_against_torch_flop_counter():
    """Our analytic count vs torch's own count of the matmuls a training step runs on the tiny
    model (one chunk so the DeltaNet's within-chunk work is what the formula assumes)."""
    config = tiny_config(vocab_size=512, num_experts=4, num_experts_per_tok=4)
    model = Qwen3NextForCausalLM(config)
    init_weights(model, config, seed=0)
    seq = 64
    ids = torch.randint(0, config.vocab_size, (2, seq))
    with FlopCounterMode(display=False) as counter:
        out = model(ids, labels=ids)
        (out.lm_loss_sum + out.mtp_loss_sums[0]).backward()
    measured = counter.get_total_flops() / ids.numel()
    predicted = flops_per_token(config, seq)
    # torch counts attention without the causal saving and the DeltaNet reference's exact chunk
    # algebra; the GEMMs (here ~90% of the total) must agree, so the totals agree within 10%.
    assert predicted == pytest.approx(measured, rel=0.10)


@pytest.mark.parametrize(
    ("field", "overrides"),
    [
        ("num_key_value_heads", dict(num_attention_heads=5, num_key_value_heads=2)),
        ("linear_num_value_heads", dict(linear_num_key_heads=3, linear_num_value_heads=4)),
        ("num_experts_per_tok", dict(num_experts=4, num_experts_per_tok=5)),
        ("partial_rotary_factor", dict(partial_rotary_factor=0.3)),
        ("hidden_size", dict(hidden_size=0)),
        ("mlp_only_layers", dict(mlp_only_layers=[7])),
    ],
)
def test_bad_config_names_the_field(field, overrides):
    with pytest.raises(ValueError, match=field):
        tiny_config(**overrides)


def test_unknown_preset_and_field_are_named():
    with pytest.raises(ValueError, match="nope"):
        load_model_config("nope")
    with pytest.raises(TypeError, match="hiden_size"):
        ModelConfig(hiden_size=3)
