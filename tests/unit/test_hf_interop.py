"""HF interop: logits equal transformers' Qwen3NextForCausalLM both ways; save/load is bitwise, also
through many files (tests/unit/test_hf_stream.py tests the streaming reader and writer themselves)."""

import json

import pytest
import torch

from model.hf import hf_config_dict, load_hf, save_hf
from tests.conftest import tiny_config
from tests.unit.test_model import build

transformers = pytest.importorskip("transformers")


def hf_config_of(config, **overrides):
    """transformers' config of the same model; `overrides` replace its fields (e.g. the layer pattern
    given as transformers' `full_attention_interval` instead of `layer_types`)."""
    fields = dict(
        vocab_size=config.vocab_size,
        hidden_size=config.hidden_size,
        num_hidden_layers=config.num_hidden_layers,
        layer_types=config.layer_types,
        num_attention_heads=config.num_attention_heads,
        num_key_value_heads=config.num_key_value_heads,
        head_dim=config.head_dim,
        partial_rotary_factor=config.partial_rotary_factor,
        rope_theta=config.rope_theta,
        linear_num_key_heads=config.linear_num_key_heads,
        linear_num_value_heads=config.linear_num_value_heads,
        linear_key_head_dim=config.linear_key_head_dim,
        linear_value_head_dim=config.linear_value_head_dim,
        linear_conv_kernel_dim=config.linear_conv_kernel_dim,
        num_experts=config.num_experts,
        num_experts_per_tok=config.num_experts_per_tok,
        norm_topk_prob=config.norm_topk_prob,
        moe_intermediate_size=config.moe_intermediate_size,
        shared_expert_intermediate_size=config.shared_expert_intermediate_size,
        intermediate_size=config.intermediate_size,
        rms_norm_eps=config.rms_norm_eps,
        tie_word_embeddings=False,
    )
    return transformers.Qwen3NextConfig(**{**fields, **overrides})


@torch.no_grad()
def random_hf_model(config, seed=0, **hf_overrides):
    """A transformers model whose every parameter (norms, A_log, dt_bias included) is random."""
    torch.manual_seed(seed)
    model = transformers.Qwen3NextForCausalLM(hf_config_of(config, **hf_overrides)).float().eval()
    for name, p in model.named_parameters():
        if name.endswith("A_log"):
            p.copy_(torch.rand(p.shape).mul(3).add(0.1).log())
        elif "norm" in name or "dt_bias" in name:
            p.add_(0.2 * torch.randn(p.shape))
        else:
            p.normal_(0, 0.2)
    return model


def test_fla_is_not_installed_on_the_cpu_path():
    import importlib.util

    assert importlib.util.find_spec("fla") is None, "fla makes transformers take CUDA-only kernels"


def test_load_hf_gives_transformers_logits(tmp_path):
    config = tiny_config(mtp_num_layers=0)
    hf_model = random_hf_model(config)
    hf_model.save_pretrained(tmp_path)
    ours = load_hf(tmp_path).eval()
    ids = torch.randint(0, config.vocab_size, (2, 37))
    with torch.no_grad():
        expected = hf_model(ids).logits
        got = ours(ids).logits
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    # positions that do not start at 0 (a window opening mid-document) go to RoPE the same way
    pos = torch.arange(100, 137).expand(2, 37)
    with torch.no_grad():
        torch.testing.assert_close(
            ours(ids, position_ids=pos).logits, hf_model(ids, position_ids=pos).logits, rtol=1e-4, atol=1e-4
        )


def test_save_hf_loads_in_transformers_with_same_logits(tmp_path):
    config = tiny_config(mtp_num_layers=1)
    ours = build(config, seed=5).eval()
    save_hf(ours, tmp_path, max_shard_bytes=20_000)  # several files, as the 80B's
    keys = json.loads((tmp_path / "model.safetensors.index.json").read_text())["weight_map"]
    assert len(set(keys.values())) > 5
    assert "model.layers.0.mlp.experts.7.down_proj.weight" in keys  # hub layout: one key per expert
    assert any(k.startswith("mtp.layers.0.") for k in keys)
    hf_model = transformers.Qwen3NextForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    ids = torch.randint(0, config.vocab_size, (2, 41))
    with torch.no_grad():
        torch.testing.assert_close(hf_model(ids).logits, ours(ids).logits, rtol=1e-4, atol=1e-4)


def test_save_load_round_trip_is_bitwise(tmp_path):
    config = tiny_config(mtp_num_layers=2)
    ours = build(config, seed=9)
    save_hf(ours, tmp_path, max_shard_bytes=20_000)
    assert len(list(tmp_path.glob("model-*.safetensors"))) > 5
    loaded = load_hf(tmp_path)
    assert loaded.config == config
    original, reloaded = ours.state_dict(), loaded.state_dict()
    assert original.keys() == reloaded.keys()
    for name, tensor in original.items():
        assert reloaded[name].dtype == tensor.dtype and torch.equal(reloaded[name], tensor), name


def test_load_hf_names_missing_weights(tmp_path):
    from safetensors.torch import load_file, save_file

    save_hf(build(tiny_config(mtp_num_layers=0)), tmp_path)
    shard = next(tmp_path.glob("*.safetensors"))
    tensors = load_file(shard)
    del tensors["model.layers.1.mlp.experts.3.up_proj.weight"]
    save_file(tensors, shard)
    with pytest.raises(ValueError, match=r"experts\.3\.up_proj"):
        load_hf(tmp_path)


@pytest.mark.parametrize(("vocab_size", "written"), [(97, False), (151643, False), (151644, True)])
def test_save_hf_writes_bos_and_eos_only_inside_the_vocabulary(vocab_size, written):
    saved = hf_config_dict(tiny_config(vocab_size=vocab_size), torch.float32)
    expected = {"bos_token_id": 151643, "eos_token_id": 151643} if written else {}
    assert {key: saved[key] for key in ("bos_token_id", "eos_token_id") if key in saved} == expected


def test_a_tied_model_saved_by_transformers_loads_with_its_logits(tmp_path):
    """transformers saves a tied model's embedding alone; the head is read from it."""
    config = tiny_config(mtp_num_layers=0)
    hf_model = random_hf_model(config, tie_word_embeddings=True)
    hf_model.save_pretrained(tmp_path)
    from safetensors import safe_open

    with safe_open(next(tmp_path.glob("*.safetensors")), framework="pt") as handle:
        saved = list(handle.keys())
    assert "lm_head.weight" not in saved
    ours = load_hf(tmp_path).eval()
    assert ours.lm_head.weight is ours.model.embed_tokens.weight
    ids = torch.randint(0, config.vocab_size, (2, 29))
    with torch.no_grad():
        torch.testing.assert_close(ours(ids).logits, hf_model(ids).logits, rtol=1e-4, atol=1e-4)


def edit_json(path, edit):
    path.write_text(json.dumps(edit(json.loads(path.read_text()))))


def truncate(path, by=100):
    with open(path, "r+b") as handle:
        handle.truncate(path.stat().st_size - by)


DAMAGED_HUBS = {
    # what is done to a saved hub directory, the file the error must name, what it must say
    "truncated weights": (lambda d: truncate(next(d.glob("model-00002-*"))), "model-00002-", "truncated"),
    "git-lfs pointer": (
        lambda d: next(d.glob("model-00003-*")).write_bytes(
            b"version https://git-lfs.github.com/spec/v1\noid sha256:0123\nsize 12345\n"
        ),
        "model-00003-",
        "git lfs pull",
    ),
    "config is a list": (lambda d: (d / "config.json").write_text("[]"), "config.json", "not a config"),
    "config is empty": (lambda d: (d / "config.json").write_text("{}"), "config.json", "lacks vocab_size"),
    "a number as a string": (
        lambda d: edit_json(d / "config.json", lambda c: {**c, "hidden_size": "32"}),
        "config.json",
        "hidden_size must be int",
    ),
    "rope scaling in the older spelling": (
        lambda d: edit_json(
            d / "config.json", lambda c: {**c, "rope_scaling": {"type": "yarn", "factor": 4.0}}
        ),
        "config.json",
        "rope_type 'yarn' is not supported",
    ),
    "index without a file name": (
        lambda d: edit_json(
            d / "model.safetensors.index.json",
            lambda i: {**i, "weight_map": {**i["weight_map"], "lm_head.weight": None}},
        ),
        "model.safetensors.index.json",
        "not a safetensors index",
    ),
}


@pytest.mark.parametrize("case", DAMAGED_HUBS)
def test_a_damaged_hub_directory_is_named_before_anything_is_read(tmp_path, case):
    damage, file, message = DAMAGED_HUBS[case]
    save_hf(build(tiny_config(mtp_num_layers=0)), tmp_path, max_shard_bytes=20_000)
    damage(tmp_path)
    with pytest.raises(ValueError, match=message) as caught:
        load_hf(tmp_path)
    assert str(tmp_path) in str(caught.value) and file in str(caught.value)
