"""launch/pretrain.py's configuration: typed Hydra configs, layout validation, the dry run."""

import itertools
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from model.config import load_model_config
from model.qwen3_next import Qwen3NextForCausalLM
from tests.unit.test_command_line import composed
from train.memory import estimate_memory

ROOT = Path(__file__).resolve().parents[2]


def pretrain(*overrides: str) -> subprocess.CompletedProcess:
    command = [sys.executable, str(ROOT / "launch" / "pretrain.py"), *overrides]
    return subprocess.run(command, capture_output=True, text=True, timeout=120, cwd=ROOT)


@pytest.mark.slow
def test_dry_run_of_80b_a3b_reports_the_published_sizes():
    result = pretrain("conf=80b_a3b", "trainer.dry_run=true")
    assert result.returncode == 0, result.stderr
    assert "79.67B total without MTP" in result.stdout
    assert "3.87B active per token" in result.stdout
    assert "memory per rank" in result.stdout


def test_dry_run_of_tiny_counts_in_millions_and_says_there_is_no_memory_limit():
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from train.config import register_configs, validate_layout
    from train.dry_run import dry_run_report, format_parameters

    register_configs()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base=None):
        cfg = OmegaConf.to_object(compose("pretrain", ["conf=tiny"]))
    report, fits = dry_run_report(cfg, validate_layout(cfg, 1))
    assert "0.00B" not in report and "M in routed experts" in report, report
    assert report.splitlines()[-1] == "no GPU memory limit (trainer.gpu_memory_gb=0)" and fits
    assert (format_parameters(4.2e6), format_parameters(79.67e9)) == ("4.2M", "79.67B")


@pytest.mark.slow
@pytest.mark.parametrize(
    ("override", "named"),
    [
        ("trainer.foo=1", "trainer.foo"),
        ("trainer.max_steps=abc", "trainer.max_steps"),
        ("trainer.global_batch_size=7", "trainer.global_batch_size"),
        ("parallel.expert=3", "parallel.expert"),
        ("model.num_key_value_heads=3", "model.num_key_value_heads"),
        ("data.streams=3", "data.streams"),
        ("parallel.zero_stage=3", "parallel.zero_stage"),
    ],
)
def test_bad_settings_fail_at_start_naming_the_key(override, named):
    world = ["trainer.dry_run_world_size=2"] if override.startswith("data.streams") else []
    result = pretrain("conf=tiny", "trainer.dry_run=true", override, *world)
    assert result.returncode != 0
    assert named in result.stderr


@pytest.mark.parametrize(
    ("override", "named"),
    [
        ("parallel.tensor=0", "parallel.tensor=0 is out of range"),  # was a ZeroDivisionError
        ("parallel.expert=0", "parallel.expert=0 is out of range"),
        ("optim.lr=inf", "optim.lr=inf is out of range: it must be finite and > 0"),  # trained on NaN
        ("model.rope_theta=0", "model.rope_theta must be positive"),
        ("model.rms_norm_eps=-1", "model.rms_norm_eps must be positive"),
        ("run.dir=", "run.dir is empty"),  # wrote the run into the current directory
    ],
)
def test_settings_that_would_train_on_nonsense_are_refused_at_start(override, named):
    from train.config import validate_layout

    with pytest.raises(ValueError, match=re.escape(named)):
        validate_layout(composed(override), 1)


def test_memory_estimate_of_the_plain_layout_counts_every_built_parameter():
    """World 1, no sharding: weights and gradients are 2 bytes and the optimizer 12 bytes for
    every parameter of the model actually built (MTP included)."""
    config = load_model_config("small")
    with torch.device("meta"):
        numel = sum(p.numel() for p in Qwen3NextForCausalLM(config).parameters())
    memory = estimate_memory(
        config, world=1, tensor=1, expert=1, zero_stage=0, micro_batch_size=1, seq_len=128,
        recomputed_layers=0,
    )  # fmt: skip
    assert memory.parameters == pytest.approx(2 * numel)
    assert memory.gradients == pytest.approx(2 * numel)
    assert memory.optimizer == pytest.approx(12 * numel)


def test_zero_and_expert_parallelism_shard_what_they_should():
    config = load_model_config("small")
    kwargs = dict(micro_batch_size=1, seq_len=128, recomputed_layers=0)
    plain = estimate_memory(config, world=4, tensor=1, expert=1, zero_stage=0, **kwargs)
    zero1 = estimate_memory(config, world=4, tensor=1, expert=1, zero_stage=1, **kwargs)
    ep4 = estimate_memory(config, world=4, tensor=1, expert=4, zero_stage=0, **kwargs)
    zero2 = estimate_memory(config, world=4, tensor=1, expert=1, zero_stage=2, **kwargs)
    assert zero1.optimizer == pytest.approx(plain.optimizer / 4)  # one dp group of 4 for everything
    assert zero1.parameters == plain.parameters
    assert ep4.parameters < plain.parameters  # experts split 4 ways
    with torch.device("meta"):
        numel = sum(p.numel() for p in Qwen3NextForCausalLM(config).parameters())
    # ZeRO 1 (DeepSpeed's BF16_Optimizer) keeps a whole fp32 gradient buffer; ZeRO 2 shards bf16 and fp32
    assert zero1.gradients == pytest.approx(4 * numel)
    assert zero2.gradients == pytest.approx(6 * numel / 4)


@pytest.mark.slow
def test_80b_a3b_without_gpus_stops_at_once_saying_what_it_needs():
    result = pretrain("conf=80b_a3b")
    assert result.returncode != 0
    message = result.stderr
    assert "no CUDA GPU here" in message and "needs at least 64 GPU(s)" in message, message
    # the number is the smallest layout the dry run says fits: 64 does, 32 does not
    for world, verdict in ((64, "fits"), (32, "does NOT fit")):
        plan = pretrain("conf=80b_a3b", "trainer.dry_run=true", f"trainer.dry_run_world_size={world}")
        assert f"{verdict} trainer.gpu_memory_gb" in plan.stdout


@pytest.mark.slow
@pytest.mark.parametrize(
    ("overrides", "named"),
    [
        (["parallel.tensor=2", "parallel.autoep=true"], "parallel.expert >= 2"),
        (
            ["parallel.tensor=4", "parallel.expert=2", "model.linear_num_key_heads=4"],
            "model.num_key_value_heads (2) divisible by parallel.tensor",
        ),
        (
            ["parallel.tensor=2", "parallel.expert=2", "model.num_key_value_heads=1"],
            "model.num_key_value_heads (1) divisible by parallel.tensor",
        ),
    ],
    ids=["autoep-at-expert-1", "kv-heads-split-under-folding", "one-kv-head-under-folding"],
)
def test_tensor_with_expert_parallel_refuses_what_folding_cannot_do(overrides, named):
    result = pretrain("conf=tiny", "trainer.dry_run=true", "trainer.dry_run_world_size=4", *overrides)
    assert result.returncode != 0
    assert named in result.stderr


def test_the_dry_run_names_the_fewest_recomputed_layers_that_fit():
    """At the documented 64 GPUs the 80B preset fits as configured; on GPUs of 60 GiB it fits
    recomputing only some layers: the dry run's count fits trainer.gpu_memory_gb and one layer fewer
    does not; more recomputation never costs memory."""
    import dataclasses

    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from train.config import register_configs, validate_layout
    from train.dry_run import dry_run_report, fewest_recomputed_layers, layout_memory

    register_configs()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base=None):
        cfg = OmegaConf.to_object(compose("pretrain", ["conf=80b_a3b"]))
    layout = validate_layout(cfg, 64)
    preset_fits = dry_run_report(cfg, layout)[1]
    cfg = dataclasses.replace(cfg, trainer=dataclasses.replace(cfg.trainer, gpu_memory_gb=60))

    def total_gib(recomputed: int) -> float:
        trainer = dataclasses.replace(cfg.trainer, activation_checkpointing=True, recompute_layers=recomputed)
        return layout_memory(dataclasses.replace(cfg, trainer=trainer), layout).total / 2**30

    fewest = fewest_recomputed_layers(cfg, layout)
    assert 0 < fewest < cfg.model.num_hidden_layers
    assert total_gib(fewest) <= cfg.trainer.gpu_memory_gb < total_gib(fewest - 1)
    totals = [total_gib(n) for n in range(cfg.model.num_hidden_layers + 1)]
    assert all(a >= b for a, b in itertools.pairwise(totals))
    assert preset_fits
    trainer = dataclasses.replace(cfg.trainer, recompute_layers=fewest)
    report, fits = dry_run_report(dataclasses.replace(cfg, trainer=trainer), layout)
    assert fits and f"the fewest that fit trainer.gpu_memory_gb: {fewest}" in report


def test_evaluation_without_held_out_shards_an_unknown_lb_scope_and_chunks_without_ep_are_refused():
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from train.config import register_configs, validate_layout

    register_configs()
    for override, named in (
        ("trainer.eval_every=10", "data.eval_path"),
        ("loss.lb_scope=batch", "loss.lb_scope"),
        ("parallel.expert_chunks=2", "parallel.expert_chunks"),  # at expert 1: nothing to overlap
    ):
        with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base=None):
            cfg = OmegaConf.to_object(compose("pretrain", ["conf=tiny", override]))
        with pytest.raises(ValueError, match=named.replace(".", r"\.")):
            validate_layout(cfg, 1)


def test_the_estimate_of_selective_recomputation_drops_each_kept_layers_cheap_activations():
    """At trainer.recompute_budget <= 0.75 a layer kept whole no longer holds its hidden-wide values
    (10 H a token: norms, gates, residual sums) nor each (token, slot) pair's SwiGLU activation (I); a
    layer recomputed whole keeps its input either way; budgets above 0.75 are estimated as 1 (the
    partitioner may recompute less there)."""
    from train.memory import activation_bytes

    config = load_model_config("80b_a3b")
    tokens, h = 4096, config.hidden_size
    per_layer_drop = tokens * 2 * (10 * h + config.num_experts_per_tok * config.moe_intermediate_size)
    kept_layers = config.num_hidden_layers + config.mtp_num_layers

    def estimate(recomputed: int, budget: float) -> float:
        return activation_bytes(config, 1, 1, tokens, recomputed, budget)

    assert estimate(0, 1.0) - estimate(0, 0.75) == pytest.approx(kept_layers * per_layer_drop)
    assert estimate(0, 0.9) == estimate(0, 1.0)
    assert estimate(0, 0.5) == estimate(0, 0.75)
    # every decoder layer recomputed: the peak is one layer's worth (the one being recomputed, or the
    # MTP layer, never recomputed), so the drop is one layer's
    drop_all = estimate(config.num_hidden_layers, 1.0) - estimate(config.num_hidden_layers, 0.75)
    assert drop_all == pytest.approx(per_layer_drop)


def test_selective_recomputation_is_neither_counted_nor_allowed_for_eager_layers():
    """trainer.recompute_budget steers torch.compile's partitioner: with trainer.compile=false the
    layers keep what eager autograd keeps, and the dry run must not count the savings."""
    import dataclasses

    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from train.config import register_configs, validate_layout
    from train.dry_run import layout_memory

    register_configs()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base=None):
        cfg = OmegaConf.to_object(compose("pretrain", ["conf=80b_a3b"]))
    layout = validate_layout(cfg, 64)

    def total(**trainer) -> float:
        return layout_memory(
            dataclasses.replace(cfg, trainer=dataclasses.replace(cfg.trainer, **trainer)), layout
        ).total

    assert cfg.trainer.recompute_budget < 1 and cfg.trainer.compile
    assert total() < total(recompute_budget=1.0)
    assert total(compile=False) == total(recompute_budget=1.0)
    # and such a config is refused, naming both settings
    eager = dataclasses.replace(cfg, trainer=dataclasses.replace(cfg.trainer, compile=False))
    with pytest.raises(ValueError, match=r"trainer.recompute_budget=0.75 .* needs trainer.compile=true"):
        validate_layout(eager, 64)


def test_the_dry_run_counts_the_heads_fp32_sum_only_where_no_buffer_is_lent():
    """Under ZeRO 1 the engine lends the LM heads the optimizer's fp32 gradient buffer, so their
    own fp32 sum (4 bytes x vocab x hidden) is not counted; under ZeRO 2, or with an untested
    DeepSpeed allowed (whose engine lends nothing), it is."""
    import dataclasses

    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from train.config import register_configs, validate_layout
    from train.dry_run import layout_memory

    register_configs()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base=None):
        cfg = OmegaConf.to_object(compose("pretrain", ["conf=80b_a3b", "parallel.zero_stage=1"]))
    layout = validate_layout(cfg, 64)

    def activations(**parallel) -> float:
        changed = dataclasses.replace(cfg, parallel=dataclasses.replace(cfg.parallel, **parallel))
        return layout_memory(changed, layout).activations

    head_sum = 4 * cfg.model.vocab_size * cfg.model.hidden_size
    assert activations(untested_deepspeed=True) - activations() == head_sum
    assert activations(zero_stage=2) - activations() == head_sum


def test_settings_without_effect_are_noted_and_the_presets_have_none():
    from train.config import unused_settings

    def notes(*overrides, preset="tiny"):
        return unused_settings(composed(*overrides, preset=preset))

    for preset in sorted(path.stem for path in (ROOT / "conf" / "conf").glob("*.yaml")):
        assert notes(preset=preset) == [], preset
    (held_out,) = notes("trainer.eval_every=0", preset="experiments")
    assert held_out.startswith("data.eval_path=data/mixed/eval is set but trainer.eval_every=0")
    (warmup,) = notes("trainer.max_steps=5", "optim.warmup_steps=5")
    assert "optim.warmup_steps=5 spans the whole schedule (5 steps)" in warmup
    assert notes("trainer.max_steps=5", "optim.warmup_steps=5", "optim.schedule_steps=1000") == []
