"""`model.layer_types`, the layer pattern: any mix of Gated DeltaNet and gated attention layers, given
as the list or as `full_attention_interval`, validated, carried through HF config.json both ways
(logits equal transformers'), old run configs, Hydra overrides, and the accounting."""

import json

import pytest
import torch
import yaml

from model.accounting import count_parameters
from model.config import ModelConfig
from model.hf import hf_config_dict, load_hf, model_config_from_hf, save_hf
from model.qwen3_next import Qwen3NextForCausalLM
from tests.conftest import tiny_config
from tests.unit.test_model import build
from train.memory import estimate_memory

L, F = "linear_attention", "full_attention"
IRREGULAR = [F, L, L, F]


def patterned(layer_types: list[str], **overrides) -> ModelConfig:
    """tiny_config with this pattern as the list (tiny_config itself gives an interval of 4)."""
    return tiny_config(full_attention_interval=None, layer_types=layer_types, **overrides)


# -- the config ---------------------------------------------------------------------------------------


def test_the_interval_fills_layer_types_and_neither_means_every_4th():
    assert tiny_config(full_attention_interval=2).layer_types == [L, F, L, F]
    assert tiny_config(full_attention_interval=1).layer_types == [F, F, F, F]
    assert ModelConfig().layer_types == [L, L, L, F] * 12  # the 80B's


def test_a_pattern_given_either_way_is_the_same_config():
    assert patterned([L, F, L, F]) == tiny_config(full_attention_interval=2)
    assert patterned([L, F, L, F]).full_attention_interval == 2
    assert patterned(IRREGULAR).full_attention_interval is None  # no interval makes it
    assert tiny_config(full_attention_interval=2, layer_types=[L, F, L, F]).layer_types == [L, F, L, F]


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (dict(layer_types=[F, L, L]), r"model\.layer_types has 3 entries, but model\.num_hidden_layers is 4"),
        (dict(layer_types=[F, L, "attention", F]), r"model\.layer_types\[2\] is 'attention'"),
        (dict(layer_types=F), r"model\.layer_types must be a list"),
        (dict(full_attention_interval=0), r"model\.full_attention_interval must be positive"),
        (
            dict(full_attention_interval=4, layer_types=IRREGULAR),
            r"model\.full_attention_interval \(4\) puts attention at layers \[3\], "
            r"but model\.layer_types at \[0, 3\]",
        ),
    ],
)
def test_a_bad_pattern_names_the_key(overrides, message):
    with pytest.raises(ValueError, match=message):
        tiny_config(**{"full_attention_interval": None, **overrides})


def test_old_run_configs_with_only_the_interval_still_load(tmp_path):
    from train.checkpoint import model_config_of

    old = {k: v for k, v in tiny_config().to_dict().items() if k != "layer_types"}
    (tmp_path / "config.yaml").write_text(yaml.safe_dump({"model": {**old, "full_attention_interval": 2}}))
    assert model_config_of(tmp_path).layer_types == [L, F, L, F]
    (tmp_path / "config.yaml").write_text(yaml.safe_dump({"model": patterned(IRREGULAR).to_dict()}))
    assert model_config_of(tmp_path) == patterned(IRREGULAR)  # what a run with a list saves


def test_hydra_overrides_of_the_pattern():
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from model.config import PRESET_DIR
    from train.config import register_configs

    register_configs()
    with initialize_config_dir(config_dir=str(PRESET_DIR.parent), version_base=None):

        def model_of(*overrides: str) -> ModelConfig:
            return OmegaConf.to_object(compose("pretrain", ["conf=tiny", *overrides])).model

        assert model_of().layer_types == [L, L, L, F]
        assert model_of("model.full_attention_interval=2").layer_types == [L, F, L, F]
        assert model_of(f"model.layer_types=[{','.join(IRREGULAR)}]").layer_types == IRREGULAR
        with pytest.raises(ValueError, match=r"model\.full_attention_interval \(2\).*model\.layer_types"):
            model_of("model.full_attention_interval=2", f"model.layer_types=[{','.join(IRREGULAR)}]")


@pytest.mark.parametrize("layer_types", [IRREGULAR, [F] * 4, [L] * 4])
def test_accounting_and_memory_estimate_follow_the_pattern(layer_types):
    config = patterned(layer_types)
    with torch.device("meta"):
        model = Qwen3NextForCausalLM(config)
    assert [layer.layer_type for layer in model.model.layers] == layer_types
    built = sum(p.numel() for p in model.parameters())
    assert count_parameters(config).total + count_parameters(config).mtp == built
    memory = estimate_memory(
        config, world=1, tensor=1, expert=1, zero_stage=0, micro_batch_size=1, seq_len=64,
        recomputed_layers=0,
    )  # fmt: skip
    assert memory.parameters == pytest.approx(2 * built)


# -- HF config.json -----------------------------------------------------------------------------------


def test_config_json_carries_the_pattern():
    regular, irregular = tiny_config(full_attention_interval=2), patterned(IRREGULAR)
    assert hf_config_dict(regular, torch.float32)["layer_types"] == [L, F, L, F]
    assert hf_config_dict(regular, torch.float32)["full_attention_interval"] == 2  # for readers of only it
    assert hf_config_dict(irregular, torch.float32)["layer_types"] == IRREGULAR
    assert "full_attention_interval" not in hf_config_dict(irregular, torch.float32)
    # the hub's 80B config.json has only the interval; transformers' may keep a stale one beside the
    # list, which it ignores, and so do we
    hub = {**hf_config_dict(tiny_config(), torch.float32), "full_attention_interval": 2}
    assert model_config_from_hf({k: v for k, v in hub.items() if k != "layer_types"}).layer_types == [
        L,
        F,
        L,
        F,
    ]
    assert model_config_from_hf({**hub, "layer_types": IRREGULAR}).layer_types == IRREGULAR


PATTERNS = {  # ours, and the same pattern in the words a transformers user would write
    "interval 2": ([L, F, L, F], dict(full_attention_interval=2, layer_types=None)),
    "interval 1": ([F, F, F, F], dict(full_attention_interval=1, layer_types=None)),
    "irregular": (IRREGULAR, dict(layer_types=IRREGULAR)),
}


@pytest.mark.parametrize("pattern", PATTERNS, ids=list(PATTERNS))
def test_patterns_round_trip_with_transformers(tmp_path, pattern):
    from tests.unit.test_hf_interop import random_hf_model, transformers

    layer_types, hf_pattern = PATTERNS[pattern]
    ids = torch.randint(0, 97, (2, 23))
    # theirs -> ours: transformers writes layer_types and no full_attention_interval
    hf_model = random_hf_model(patterned(layer_types, mtp_num_layers=0), **hf_pattern)
    hf_model.save_pretrained(tmp_path / "theirs")
    assert "full_attention_interval" not in json.loads((tmp_path / "theirs" / "config.json").read_text())
    ours = load_hf(tmp_path / "theirs").eval()
    assert ours.config.layer_types == layer_types
    with torch.no_grad():
        torch.testing.assert_close(ours(ids).logits, hf_model(ids).logits, rtol=1e-4, atol=1e-4)
    # ours -> theirs, with an MTP layer (always gated attention) in the files
    ours = build(patterned(layer_types, mtp_num_layers=1), seed=3).eval()
    save_hf(ours, tmp_path / "ours")
    hf_model = transformers.Qwen3NextForCausalLM.from_pretrained(tmp_path / "ours", dtype=torch.float32)
    assert hf_model.config.layer_types == layer_types
    with torch.no_grad():
        torch.testing.assert_close(hf_model.eval()(ids).logits, ours(ids).logits, rtol=1e-4, atol=1e-4)
    assert load_hf(tmp_path / "ours").config == ours.config
