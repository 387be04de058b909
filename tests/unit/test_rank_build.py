"""The pieces of parallel/build.py on one process: seeded values by expert, materialisation, the
1-process build, and the dry run's materialised rank (`trainer.dry_run_rank`)."""

import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from model.config import load_model_config
from model.init import init_weights, initial_value
from model.qwen3_next import Qwen3NextForCausalLM
from parallel.build import RankPlacement, build_rank_model, materialize
from tests.conftest import tiny_config

ROOT = Path(__file__).resolve().parents[2]


def test_experts_drawn_alone_equal_their_rows_of_the_whole_tensor():
    config = tiny_config()
    name = "model.layers.0.mlp.experts.gate_up_proj"
    shape = (config.num_experts, 2 * config.moe_intermediate_size, config.hidden_size)
    whole = initial_value(name, shape, config, seed=3)
    assert torch.equal(initial_value(name, shape, config, seed=3, experts=[5, 2]), whole[[5, 2]])
    out = torch.empty(3, *shape[1:])
    initial_value(name, shape, config, seed=3, experts=range(4, 7), out=out)
    assert torch.equal(out, whole[4:7])
    assert not torch.equal(whole[0], whole[1]), "each expert draws its own values"
    with pytest.raises(ValueError, match="holds no experts"):
        initial_value("model.embed_tokens.weight", (97, 32), config, seed=3, experts=[0])


def test_materialize_keeps_attributes_hooks_and_ties():
    with torch.device("meta"):
        embed, head = nn.Embedding(5, 4), nn.Linear(4, 5, bias=False)
    head.weight = embed.weight
    model = nn.ModuleDict({"embed": embed, "head": head})
    model["embed"].weight.tp_shard = (0, torch.arange(5))
    model["embed"].weight.register_hook(lambda grad: grad * 0 + 7)
    materialize(model, "cpu", torch.float64)
    weight = model["embed"].weight
    assert weight is model["head"].weight and weight.device.type == "cpu" and weight.dtype == torch.float64
    assert weight.tp_shard[0] == 0
    with torch.no_grad():
        weight.normal_()
    model["head"](model["embed"](torch.tensor([1, 2]))).sum().backward()
    assert torch.all(weight.grad == 7), "the gradient hook registered on the meta parameter must run"


def test_the_one_process_build_is_init_weights():
    config = tiny_config()
    reference = Qwen3NextForCausalLM(config)
    init_weights(reference, config, seed=5)
    built, report = build_rank_model(config, RankPlacement(1, 0), device="cpu", dtype=torch.float32, seed=5)
    expected = reference.state_dict()
    assert built.state_dict().keys() == expected.keys()
    assert all(torch.equal(built.state_dict()[n], t) for n, t in expected.items())
    assert report.parameters == sum(p.numel() for p in reference.parameters())


def test_init_from_without_mtp_weights_loads_the_rest_and_seeds_the_mtp(tmp_path):
    """A transformers export has no MTP weights: a tensor-parallel rank reads its slices of the others
    and draws the MTP layer's from the seeded init."""
    from model.hf import save_hf

    without_mtp, config = tiny_config(mtp_num_layers=0), tiny_config()
    saved = Qwen3NextForCausalLM(without_mtp)
    init_weights(saved, without_mtp, seed=7)
    save_hf(saved, tmp_path, max_shard_bytes=16 * 1024)
    seeded = Qwen3NextForCausalLM(config)
    init_weights(seeded, config, seed=0)
    placement = RankPlacement(world=2, rank=1, tensor=2)
    built, _ = build_rank_model(
        config, placement, device="cpu", dtype=torch.float32, seed=0, init_from=tmp_path
    )
    expected, seeded_state = saved.state_dict(), seeded.state_dict()
    for name, param in built.named_parameters():
        whole = (seeded_state if name.startswith("mtp.") else expected)[name]
        if hasattr(param, "tp_shard"):
            dim, index = param.tp_shard
            whole = whole.index_select(dim, index)
        assert torch.equal(param.detach(), whole), name


def test_tied_embeddings_load_and_stay_tied(tmp_path):
    from model.hf import load_hf, save_hf

    config = tiny_config(tie_word_embeddings=True)
    saved = Qwen3NextForCausalLM(config)
    init_weights(saved, config, seed=7)
    save_hf(saved, tmp_path)
    loaded = load_hf(tmp_path)
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight
    built, _ = build_rank_model(
        config, RankPlacement(1, 0), device="cpu", dtype=torch.float32, seed=0, init_from=tmp_path
    )
    assert built.lm_head.weight is built.model.embed_tokens.weight
    assert torch.equal(built.model.embed_tokens.weight, saved.model.embed_tokens.weight)


def expected_share(config, tensor: int, expert: int) -> int:
    """Parameters one rank keeps, counted on the whole meta model by where each tensor lives: routed
    experts split over the expert ranks; attention and DeltaNet tensors and the LM head over the
    tensor ranks except the norms they keep whole; everything else whole."""
    with torch.device("meta"):
        whole = Qwen3NextForCausalLM(config)
    count = 0
    for name, param in whole.named_parameters():
        if ".mlp.experts." in name:
            count += param.numel() // expert
        elif (".self_attn." in name or ".linear_attn." in name or name == "lm_head.weight") and not re.search(
            r"(q_norm|k_norm|\.norm)\.weight$", name
        ):
            count += param.numel() // tensor
        else:
            count += param.numel()
    return count


@pytest.mark.slow
def test_dry_run_rank_builds_that_rank_and_agrees_with_the_estimate():
    sizes = ["model.num_hidden_layers=4", "model.num_experts=64", "model.vocab_size=8192"]
    layout = ["trainer.dry_run_world_size=8", "parallel.expert=8", "parallel.tensor=2"]
    command = [sys.executable, "launch/pretrain.py", "conf=80b_a3b", "trainer.dry_run=true", *sizes, *layout]
    result = subprocess.run(
        [*command, "trainer.dry_run_rank=3"], capture_output=True, text=True, cwd=ROOT, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    line = re.search(
        r"rank 3: ([\d,]+) parameters materialised \(([\d.]+) GiB\), peak host memory ([\d.]+) GiB, built in "
        r"([\d.]+) s",
        result.stdout,
    )
    assert line, result.stdout
    config = load_model_config("80b_a3b", num_hidden_layers=4, num_experts=64, vocab_size=8192)
    held = int(line[1].replace(",", ""))
    assert held == expected_share(config, tensor=2, expert=8)
    assert float(line[2]) == pytest.approx(held * 4 / 2**30, abs=0.01)
    estimate = re.search(r"estimate for rank 3: ([\d,]+) parameters", result.stdout)
    assert estimate and int(estimate[1].replace(",", "")) == pytest.approx(held, rel=0.01)


@pytest.mark.slow
@pytest.mark.parametrize(
    ("overrides", "named"),
    [
        (["trainer.dry_run_rank=0"], "trainer.dry_run=true"),
        (["trainer.dry_run=true", "trainer.dry_run_rank=2"], "0..1"),
    ],
)
def test_dry_run_rank_is_checked(overrides, named):
    command = [sys.executable, "launch/pretrain.py", "conf=tiny", "trainer.dry_run_world_size=2", *overrides]
    result = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert result.returncode != 0 and "trainer.dry_run_rank" in result.stderr and named in result.stderr
