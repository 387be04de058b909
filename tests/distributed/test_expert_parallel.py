"""Data and expert parallel layouts on 4 gloo processes give the 1-process run,
and checkpoints move between layouts.

The toy model and corpus of test_training.py, trained 3 steps by `torchrun launch/pretrain.py` at
world 1 and at dp4 and dp4 x ep4 (DeepSpeed AutoEP, ZeRO 1), and dp4 x ep2 and dp4 x ep4 with the
all-to-alls in overlapped chunks (parallel/expert_overlap.py): the same global batch each
step, so the losses and the parameters after the 3 steps must agree (fp32). The AutoEP checkpoints
are read back into our model's names and fused expert layout (`saved_weights`).
"""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch

from model.init import init_weights
from model.qwen3_next import Qwen3NextForCausalLM
from tests.distributed.test_training import (
    REPO,
    command,
    environment,
    losses,
    overrides,
    pretrain,
    read_metrics,
    saved_weights,
    write_corpus,
)
from train.checkpoint import model_config_of

STEPS = 3
# Adam's epsilon at 1 makes its update about lr x momentum, linear in the gradients, so the parameters
# measure the gradients' agreement. At the usual 1e-8, Adam divides by sqrt(v) and turns reduction-
# order noise of 1e-8 on near-zero gradients into steps of +-lr (seen: 1e-3 apart after 3 steps).
COMMON = {"trainer.max_steps": STEPS, "optim.schedule_steps": STEPS, "optim.eps": 1.0, "optim.lr": 0.3}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return write_corpus(tmp_path_factory.mktemp("corpus"))


@pytest.fixture(scope="module")
def single(corpus, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("single")
    pretrain(1, overrides(corpus, run_dir, **COMMON))
    return run_dir


def initial_weights(run_dir):
    """The seeded initial weights of the run's model (its resolved config.yaml)."""
    config = model_config_of(run_dir)
    model = Qwen3NextForCausalLM(config)
    init_weights(model, config, seed=0)
    return model.state_dict()


def final_weights(run_dir):
    return saved_weights(run_dir / "checkpoints" / f"step_{STEPS}")


@pytest.mark.parametrize(
    ("expert", "chunks"),
    [(1, 1), (2, 2), (4, 1), (4, 3)],
    ids=["dp4", "dp4-ep2-chunks2", "dp4-ep4", "dp4-ep4-chunks3"],
)
def test_four_process_layouts_train_like_one_process(corpus, single, tmp_path, expert, chunks):
    """chunks > 1: the all-to-alls of token chunks overlapped with the experts (3: uneven chunks of the
    2 x 32 tokens), the same numbers as AutoEP's sequential path and the 1-process run. AutoEP's own
    path at ep2 is covered by test_checkpoints_reshard_across_layouts' dp2 x ep2 leg."""
    run_dir = tmp_path / "run"
    layout = {"parallel.expert": expert, "parallel.expert_chunks": chunks}
    output = pretrain(4, overrides(corpus, run_dir, **COMMON, **layout), timeout=300)
    assert "4 CPU process(es)" in output
    np.testing.assert_allclose(losses(run_dir), losses(single), rtol=1e-5)
    if expert > 1:  # traffic: slots routed off-rank, about (ep - 1) / ep of all 256 tokens x 3 x 5 routers
        slots = 8 * 32 * 3 * 5
        remote = [row["a2a_remote_slots"] / slots for row in read_metrics(run_dir)]
        assert all(0.5 * (expert - 1) / expert < r < 1.0 for r in remote), remote
    reference, weights = final_weights(single), final_weights(run_dir)
    assert weights.keys() == reference.keys()
    moved = max((reference[n] - initial).abs().max().item() for n, initial in initial_weights(single).items())
    assert moved > 1e-2, "the 3 steps should move the weights far beyond the tolerance"
    for name, expected in reference.items():
        torch.testing.assert_close(
            weights[name], expected, rtol=1e-5, atol=1e-5, msg=lambda m, n=name: f"{n}: {m}"
        )


def test_checkpoints_reshard_across_layouts(corpus, tmp_path):
    """dp2 x ep2 for 2 steps, then dp4 x ep4 to step 4, then 1 process to step 6 (AutoEP's layer at
    ep 1, so the names match): each leg resumes through DeepSpeed's universal checkpoint, made
    automatically, and the whole run gives the losses and weights of 6 uninterrupted steps."""

    def args(run_dir, steps, **layout):
        return overrides(
            corpus, run_dir, **{**COMMON, "optim.schedule_steps": 6, "trainer.max_steps": steps}, **layout
        )

    reference = tmp_path / "reference"
    pretrain(1, args(reference, 6))
    run_dir = tmp_path / "resharded"
    legs = [(2, 2, {"parallel.expert": 2}), (4, 4, {"parallel.expert": 4}), (1, 6, {"parallel.autoep": True})]
    for nproc, steps, layout in legs:
        output = pretrain(nproc, args(run_dir, steps, **layout))
        if steps > 2:
            assert "converting it to universal form" in output and f"step_{steps - 2}" in output
    np.testing.assert_allclose(losses(run_dir), losses(reference), rtol=1e-5)
    expected = saved_weights(reference / "checkpoints" / "step_6")
    weights = saved_weights(run_dir / "checkpoints" / "step_6")
    for name, value in expected.items():
        message = lambda m, n=name: f"{n}: {m}"
        torch.testing.assert_close(weights[name], value, rtol=1e-5, atol=1e-5, msg=message)


def test_a_change_of_the_moe_parameter_layout_is_refused_with_the_fix(corpus, tmp_path):
    run_dir = tmp_path / "run"
    pretrain(2, overrides(corpus, run_dir, **{**COMMON, "parallel.expert": 2, "trainer.max_steps": 1}))
    plain = command(1, overrides(corpus, run_dir, **COMMON))
    result = subprocess.run(plain, cwd=REPO, env=environment(), capture_output=True, text=True)
    assert result.returncode != 0
    assert "AutoEP parameter layout" in result.stderr and "parallel.autoep=true" in result.stderr


def test_convert_hf_exports_an_expert_parallel_checkpoint_for_transformers(corpus, tmp_path):
    """to-hf on an AutoEP checkpoint: transformers loads it and computes our model's logits; from-hf
    gives the same weights back, and training starts from them (checkpoint.init_from)."""
    transformers = pytest.importorskip("transformers")
    run_dir = tmp_path / "run"
    no_bias = {"loss.expert_bias_rate": 0.0}  # HF's format has no selection bias
    ep2 = {**COMMON, **no_bias, "parallel.expert": 2, "trainer.max_steps": 1}
    pretrain(2, overrides(corpus, run_dir, **ep2))
    hf_dir, init_dir = tmp_path / "hf", tmp_path / "init"
    convert = [sys.executable, "launch/convert_hf.py"]
    subprocess.run([*convert, "to-hf", str(run_dir), str(hf_dir), "--dtype", "fp32"], cwd=REPO, check=True)
    subprocess.run([*convert, "from-hf", str(hf_dir), str(init_dir)], cwd=REPO, check=True)

    trained = saved_weights(run_dir / "checkpoints" / "step_1")
    config = model_config_of(run_dir)
    ours = Qwen3NextForCausalLM(config)
    ours.load_state_dict(trained)
    hf = transformers.Qwen3NextForCausalLM.from_pretrained(hf_dir, torch_dtype=torch.float32)
    ids = torch.randint(0, config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, ours(ids).logits, rtol=1e-4, atol=1e-4)

    from model.hf import WeightFiles
    from model.tensor_files import TensorRequest

    init_files = WeightFiles(init_dir)
    assert init_files.names() == trained.keys()
    back = {name: piece for name, _, piece in init_files.read({n: TensorRequest(n) for n in trained})}
    assert all(torch.equal(back[name], trained[name]) for name in trained)
    fresh, started = tmp_path / "fresh", tmp_path / "started"
    pretrain(1, overrides(corpus, fresh, **{**COMMON, **no_bias, "trainer.max_steps": 1}))
    start_from = {**COMMON, **no_bias, "trainer.max_steps": 1, "checkpoint.init_from": init_dir}
    output = pretrain(1, overrides(corpus, started, **start_from))
    assert "initial weights from" in output
    assert losses(started)[0] < losses(fresh)[0], "one trained step: the loaded weights start lower"
