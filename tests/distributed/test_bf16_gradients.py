"""The trainer's DeepSpeed precision settings keep bf16 runs' gradients in fp32 up to the optimizer.

bf16 parameters give bf16 gradients per micro-batch; the settings must add them into fp32 buffers and
reduce those over the data-parallel ranks in fp32, so the optimizer sees the exact fp32 sum. DeepSpeed's
default casts the accumulated gradient to bf16 for the reduction, on one rank too, which rounds it
(relative error up to 2^-9); on one rank the trainer skips that reduction. Checked on CPU with
DeepSpeed's bf16 path (gloo) on 1 and 2 ranks, with ZeRO 1 and 2, against per-micro-batch gradients
computed with plain autograd and summed in fp32.
"""

from __future__ import annotations

import copy
import os
from pathlib import Path

import pytest
import torch

from tests.distributed.gloo import run_on_ranks

REPO = Path(__file__).resolve().parents[2]
GRAD_ACCUM = 2


def toy_model() -> torch.nn.Module:
    torch.manual_seed(0)
    layers = [torch.nn.Linear(48, 96), torch.nn.GELU(), torch.nn.Linear(96, 48), torch.nn.GELU()]
    return torch.nn.Sequential(*layers, torch.nn.Linear(48, 8)).to(torch.bfloat16)


def micro_batch(rank: int, index: int) -> torch.Tensor:
    return torch.randn(6, 48, generator=torch.Generator().manual_seed(100 * rank + index)).bfloat16()


def loss_of(model: torch.nn.Module, x_bd: torch.Tensor) -> torch.Tensor:
    return model(x_bd).float().pow(2).sum()


def trainer_settings(world: int, zero_stage: int) -> dict:
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from parallel.engine import deepspeed_config
    from train.build import engine_settings
    from train.config import register_configs, validate_layout

    register_configs()
    overrides = [
        "conf=tiny",
        f"parallel.zero_stage={zero_stage}",
        "trainer.micro_batch_size=1",
        f"trainer.global_batch_size={world * GRAD_ACCUM}",
        f"data.streams={world}",
    ]
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base=None):
        cfg = OmegaConf.to_object(compose("pretrain", overrides=overrides))
    return deepspeed_config(
        engine_settings(cfg, validate_layout(cfg, world), on_gpu=True, load_universal=False)
    )


def bf16_engine(model: torch.nn.Module, optimizer: torch.optim.Optimizer, world: int, zero_stage: int = 1):
    """A DeepSpeed engine under the trainer's bf16 settings, finished as the trainer finishes it."""
    import deepspeed

    from parallel.engine import finish_bf16_setup

    engine, *_ = deepspeed.initialize(
        model=model, optimizer=optimizer, config=trainer_settings(world, zero_stage), dist_init_required=False
    )
    finish_bf16_setup(engine, world)
    return engine


def gradients_at_the_step(rank: int, world: int, zero_stage: int):
    """This rank's per-micro-batch bf16 gradients (plain autograd, scaled as DeepSpeed scales the loss)
    and the full gradient DeepSpeed holds for each parameter just before the optimizer step."""
    os.environ.update(DS_ACCELERATOR="cpu", RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world))
    from deepspeed.utils import safe_get_full_grad

    from parallel.engine import quiet_deepspeed, skip_cpu_shm_build

    quiet_deepspeed()
    skip_cpu_shm_build()
    model = toy_model()
    plain = copy.deepcopy(model)
    micro_grads = []
    for index in range(GRAD_ACCUM):
        plain.zero_grad(set_to_none=True)
        (loss_of(plain, micro_batch(rank, index)) / GRAD_ACCUM).backward()
        micro_grads.append([p.grad.clone() for p in plain.parameters()])

    engine = bf16_engine(model, torch.optim.SGD(model.parameters(), lr=0.0), world, zero_stage)
    for index in range(GRAD_ACCUM):
        engine.backward(loss_of(engine, micro_batch(rank, index)))
        if index == GRAD_ACCUM - 1:  # the accumulation boundary: reduced, not yet applied
            seen = [safe_get_full_grad(p).clone() for p in engine.module.parameters()]
        engine.step()
    return micro_grads, seen


@pytest.mark.parametrize("world, zero_stage", [(1, 1), (2, 1), (2, 2)])
def test_bf16_gradients_reach_the_optimizer_as_their_fp32_sum(tmp_path, world, zero_stage):
    results = run_on_ranks(gradients_at_the_step, world, tmp_path, zero_stage, timeout=300)
    per_rank_micro = [micro for micro, _ in results]
    for name_index in range(len(results[0][1])):
        # summed in fp32: the micro-batches of each rank, then the ranks, then averaged over them
        per_rank = [sum(g[name_index].float() for g in micro) for micro in per_rank_micro]
        expected = sum(per_rank) / world
        assert not torch.equal(expected, expected.bfloat16().float())  # rounding to bf16 would show
        for rank_result in results:
            torch.testing.assert_close(rank_result[1][name_index], expected, rtol=1e-6, atol=1e-8)


def gradients_when_a_layer_sits_out(rank: int, world: int):
    """Step 1 trains the whole toy model; step 2's micro-batches skip its last layer, then only the
    first: the gradients DeepSpeed holds at step 2's boundary, plain autograd's for step 2, and the
    fp32 master weights before and after step 2."""
    os.environ.update(DS_ACCELERATOR="cpu", RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world))
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_grad

    from parallel.engine import quiet_deepspeed, skip_cpu_shm_build

    quiet_deepspeed()
    skip_cpu_shm_build()
    model = toy_model()
    plain = copy.deepcopy(model)
    depths = [len(model) - 1, 2]  # step 2's micro-batches: all but the last layer, then the first two
    engine = bf16_engine(model, torch.optim.SGD(model.parameters(), lr=1.0), world)
    for index in range(GRAD_ACCUM):  # step 1: every parameter gets a gradient
        engine.backward(loss_of(engine, micro_batch(rank, index)))
        engine.step()
    masters = [safe_get_full_fp32_param(p).clone() for p in engine.module.parameters()]
    plain.load_state_dict(engine.module.state_dict())
    expected = [torch.zeros(p.shape) for p in plain.parameters()]
    for index, depth in enumerate(depths):
        x = micro_batch(rank, 10 + index)
        plain.zero_grad(set_to_none=True)
        (plain[:depth](x).float().pow(2).sum() / GRAD_ACCUM).backward()
        for total, p in zip(expected, plain.parameters(), strict=True):
            if p.grad is not None:
                total += p.grad.float()  # the micro-batches' bf16 gradients summed in fp32
        engine.backward(engine.module[:depth](x).float().pow(2).sum())
        if index == GRAD_ACCUM - 1:
            seen = [safe_get_full_grad(p).clone() for p in engine.module.parameters()]
        engine.step()
    after = [safe_get_full_fp32_param(p).clone() for p in engine.module.parameters()]
    return expected, seen, masters, after


@pytest.mark.parametrize("world", [1, 2])
def test_a_parameter_without_gradient_in_a_step_gets_zeros_not_the_last_steps(tmp_path, world):
    results = run_on_ranks(gradients_when_a_layer_sits_out, world, tmp_path, timeout=300)
    expected = [sum(r[0][i] for r in results) / world for i in range(len(results[0][0]))]
    last = len(expected) - 2  # the last Linear's weight and bias sat out both micro-batches
    for _, seen, masters, after in results:
        for want, got in zip(expected, seen, strict=True):
            torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-8)
        for index in (last, last + 1):
            assert torch.equal(seen[index], torch.zeros_like(seen[index]))
            assert torch.equal(after[index], masters[index])  # SGD moved it by nothing
        assert not torch.equal(after[0], masters[0])


LOSS_FACTORS = (1.0, 1e-5, float("nan"), 1.0)  # clipped, not clipped, skipped, clipped again


def adamw_engine(rank: int, world: int):
    """On this rank (gloo, CPU): the toy model under the trainer's bf16 ZeRO 1 settings (clip 1.0)
    with fused AdamW, set up as the trainer does, in our Engine."""
    os.environ.update(DS_ACCELERATOR="cpu", RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world))

    from parallel.engine import Engine, EngineSettings, quiet_deepspeed, skip_cpu_shm_build

    quiet_deepspeed()
    skip_cpu_shm_build()
    model = toy_model()
    ds_engine = bf16_engine(
        model, torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1, fused=True), world
    )
    settings = EngineSettings(world, 1, 1, GRAD_ACCUM, 1, world * GRAD_ACCUM, 1.0, 1, False, False)
    return Engine(ds_engine, settings)


def steps_with_either_optimizer_step(rank: int, world: int, deepspeeds_own: bool):
    """Four steps of fused AdamW under the trainer's bf16 settings (clip 1.0), with our device-side
    step or DeepSpeed's: after each, the fp32 master weights, Adam's moments and step counts, and
    the reported norm and skip."""
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

    engine = adamw_engine(rank, world)
    ds_engine, optimizer = engine._ds, engine._ds.optimizer
    ours = getattr(optimizer, "step_without_host_sync", False)
    if deepspeeds_own:
        del optimizer.step, optimizer.step_without_host_sync  # the class's own method again
    history = []
    for step, factor in enumerate(LOSS_FACTORS):
        for index in range(GRAD_ACCUM):
            engine.backward(loss_of(ds_engine, micro_batch(rank, 10 * step + index)) * factor)
        params = list(engine.module.parameters())
        history.append(
            {
                "norm": float(engine.grad_norm),
                "skipped": bool(engine.step_skipped),
                "masters": [safe_get_full_fp32_param(p).clone() for p in params],
                "exp_avg": [safe_get_full_optimizer_state(p, "exp_avg").clone() for p in params],
                "exp_avg_sq": [safe_get_full_optimizer_state(p, "exp_avg_sq").clone() for p in params],
                "steps": [float(s["step"]) for s in optimizer.optimizer.state.values()],
            }
        )
    return ours, history


@pytest.mark.parametrize("world", [1, 2])
def test_the_device_side_optimizer_step_matches_deepspeeds(tmp_path, world):
    ours = run_on_ranks(steps_with_either_optimizer_step, world, tmp_path / "ours", False, timeout=300)
    theirs = run_on_ranks(steps_with_either_optimizer_step, world, tmp_path / "ds", True, timeout=300)
    assert all(installed for installed, _ in ours)  # the plain layout takes the device-side step
    for (_, mine), (_, reference) in zip(ours, theirs, strict=True):
        assert (
            [s["skipped"] for s in mine] == [s["skipped"] for s in reference] == [False, False, True, False]
        )
        assert mine[0]["norm"] > 1.0 > mine[1]["norm"]  # the first step is clipped, the second not
        for step, (got, want) in enumerate(zip(mine, reference, strict=True)):
            assert got["norm"] == pytest.approx(want["norm"], rel=1e-5)
            assert got["steps"] == want["steps"]  # the skipped step is not counted
            # The updates differ in their last bits: torch's CPU AdamW computes in fp32 (ours mixes
            # fp64 in, as torch's CUDA kernel), and the two norms sum in other orders. A master weight
            # an ulp apart can round to another bf16 weight, and the last step's forward and
            # gradients then differ by up to a bf16 ulp (seen on 2 ranks: 3.7e-3 of a weight).
            bound = 1e-5 if step < len(LOSS_FACTORS) - 1 else 1e-2
            for key in ("masters", "exp_avg", "exp_avg_sq"):
                for a, b in zip(got[key], want[key], strict=True):
                    assert (a - b).abs().max() <= bound * b.abs().max(), (step, key)
        for key in ("masters", "exp_avg", "exp_avg_sq"):  # the skipped step left the state as it was
            assert all(torch.equal(a, b) for a, b in zip(mine[2][key], mine[1][key], strict=True))


def steps_around_a_checkpoint(rank: int, world: int, directory: str):
    """Two steps with the device-side step, a checkpoint, a third step; then a fresh engine loads the
    checkpoint and takes the same third step. The fp32 master weights after each third step."""
    from deepspeed.utils import safe_get_full_fp32_param

    def engine():
        built = adamw_engine(rank, world)
        assert built._ds.optimizer.step_without_host_sync
        return built

    def step(engine, index: int) -> list[torch.Tensor]:
        for micro in range(GRAD_ACCUM):
            engine.backward(loss_of(engine._ds, micro_batch(rank, 10 * index + micro)))
        return [safe_get_full_fp32_param(p).clone() for p in engine.module.parameters()]

    first = engine()
    step(first, 0)
    step(first, 1)
    first.save_checkpoint(directory, "step_2")
    straight_on = step(first, 2)
    resumed = engine()
    read = lambda path, map_location=None: torch.load(path, map_location=map_location, weights_only=False)
    assert resumed.load_checkpoint(directory, "step_2", read)
    return straight_on, step(resumed, 2)


@pytest.mark.parametrize("world", [1, 2])
def test_a_checkpoint_after_device_side_steps_resumes_the_same_run(tmp_path, world):
    """The moments and the step count the one-pass AdamW keeps are torch AdamW's state, which
    DeepSpeed saves and loads: the resumed third step is the uninterrupted one, bit for bit (a step
    count lost in the round trip would change the bias corrections)."""
    results = run_on_ranks(steps_around_a_checkpoint, world, tmp_path, str(tmp_path / "ckpt"), timeout=300)
    for straight_on, resumed in results:
        assert all(torch.equal(a, b) for a, b in zip(straight_on, resumed, strict=True))


def norm_of_a_step_with_every_kind_of_last_write(rank: int, world: int):
    """Two steps of the AdamW engine. Step 2's first micro-batch trains all but the toy model's last
    layer, its second only the first layer; in the second's forward the middle layer's weight gradient
    also gets an addition through its lent buffer, as the LM heads add theirs. So at step 2 the
    buffers were last written by the boundary's casts, by the first micro-batch's casts, by the lent
    writer, or not at all (zeroed). For each step: the fp32 gradients the optimizer step reads, the
    buffers whose squares the casts did not sum, and the norm the engine reports."""
    engine = adamw_engine(rank, world)
    ds_engine, optimizer = engine._ds, engine._ds.optimizer
    squares = getattr(optimizer, "gradient_squares", None)
    seen, not_summed = [], []
    step = optimizer.step

    def step_recording(*args, **kwargs):
        gradients = optimizer.fp32_groups_gradients
        seen.append([g.clone() for group in gradients for g in group])
        not_summed.append(None if squares is None else len(squares.buffers_not_summed(gradients)))
        return step(*args, **kwargs)

    optimizer.step = step_recording
    norms = []
    for index in range(GRAD_ACCUM):  # step 1: every parameter gets a gradient
        engine.backward(loss_of(ds_engine, micro_batch(rank, index)))
    norms.append(float(engine.grad_norm))
    middle = engine.module[2].weight
    for index, depth in enumerate([len(engine.module) - 1, 2]):
        x = micro_batch(rank, 10 + index)
        if index == 1:
            lent = middle.fp32_grad_buffer
            lent.tensor().add_(torch.linspace(-3.0, 3.0, middle.numel()).view(middle.shape))
            lent.mark_written()
        engine.backward(ds_engine.module[:depth](x).float().pow(2).sum())
    norms.append(float(engine.grad_norm))
    return norms, seen, not_summed


def test_the_norm_summed_by_the_casts_is_the_norm_of_what_the_step_reads(tmp_path):
    """On one rank the casts sum the gradient norm's squares as they write (parallel/engine.py's
    GradientSquares); the buffers written otherwise, or not at all, are read by the norm itself."""
    ((norms, seen, not_summed),) = run_on_ranks(norm_of_a_step_with_every_kind_of_last_write, 1, tmp_path)
    assert not_summed == [0, 3]  # step 2: the middle weight (lent), the last layer's weight and bias
    for norm, gradients in zip(norms, seen, strict=True):
        expected = torch.stack([g.double().norm() for g in gradients]).norm().item()
        assert norm == pytest.approx(expected, rel=1e-6)


def lm_head_gradients_at_the_step(rank: int, world: int, lend: bool):
    """The tiny model in bf16 under the trainer's settings, two steps of GRAD_ACCUM micro-batches with
    the training objective (lr 0: the same step twice): every parameter's gradient DeepSpeed holds
    at each step's boundary. `lend`: the heads are told their gradients (as TrainStep tells them) and
    add into the fp32 buffers the engine lends; else each head hands its own gradient to autograd,
    rounded to bf16 per micro-batch."""
    os.environ.update(DS_ACCELERATOR="cpu", RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world))
    from deepspeed.utils import safe_get_full_grad

    from model.documents import DocumentLayout
    from model.init import init_weights
    from model.qwen3_next import Qwen3NextForCausalLM
    from parallel.engine import Engine, EngineSettings, quiet_deepspeed, skip_cpu_shm_build
    from tests.conftest import tiny_config
    from tests.unit.test_losses import make_global_batch, rows
    from train.losses import TrainingObjective, global_target_counts

    quiet_deepspeed()
    skip_cpu_shm_build()
    config = tiny_config()
    model = Qwen3NextForCausalLM(config)
    init_weights(model, config, 0)
    model = model.to(torch.bfloat16)
    ds_engine = bf16_engine(model, torch.optim.SGD(model.parameters(), lr=0.0), world)
    assert hasattr(model.lm_head.weight, "fp32_grad_buffer")
    engine = Engine(
        ds_engine, EngineSettings(world, 1, 1, GRAD_ACCUM, 1, world * GRAD_ACCUM, 1.0, 1, False, False)
    )
    batch = make_global_batch(rows=world * GRAD_ACCUM, seq_len=16, seed=11, vocab=config.vocab_size)
    micro_batches = [rows(batch, rank * GRAD_ACCUM + i, rank * GRAD_ACCUM + i + 1) for i in range(GRAD_ACCUM)]
    objective = TrainingObjective(config.num_experts, mtp_weight=0.3, lb_coef=0.0)
    steps = []
    for _ in range(2):  # the second step's first write must overwrite the first step's gradient
        objective.begin_step(global_target_counts(micro_batches, config.mtp_num_layers))
        weights = tuple(w * engine.loss_scale for w in objective.head_loss_weights()) if lend else None
        for index, micro in enumerate(micro_batches):
            ids = micro["input_ids"]
            documents = DocumentLayout.from_position_ids(micro["position_ids"], *ids.shape, "cpu")
            out = engine(ids, labels=micro["labels"], documents=documents, head_loss_weights=weights)
            ds_engine.backward(objective.micro_batch_loss(out))
            if index == GRAD_ACCUM - 1:
                steps.append(
                    {n: safe_get_full_grad(p).clone() for n, p in ds_engine.module.named_parameters()}
                )
            ds_engine.step()
        objective.end_step()
    return steps


@pytest.mark.slow
@pytest.mark.parametrize("world", [1, 2])
def test_lm_heads_add_into_the_lent_fp32_buffers_what_autograd_would(tmp_path, world):
    """The step's gradients with the heads adding into the optimizer's fp32 buffer equal those with
    each head's own gradient handed to autograd: the other parameters' exactly, the LM head's to the
    bf16 rounding the latter makes of each micro-batch's (and not bit for bit: it was not rounded).
    The same step again (lr 0) gives the same LM-head gradient: the first write of a step overwrites
    what the step before left."""
    lent = run_on_ranks(lm_head_gradients_at_the_step, world, tmp_path / "lent", True, timeout=300)
    own = run_on_ranks(lm_head_gradients_at_the_step, world, tmp_path / "own", False, timeout=300)
    for rank in range(world):
        assert torch.equal(lent[rank][1]["lm_head.weight"], lent[rank][0]["lm_head.weight"])
    lent, own = [steps[1] for steps in lent], [steps[1] for steps in own]
    for rank in range(world):
        assert lent[rank].keys() == own[rank].keys()
        for name, want in own[rank].items():
            got = lent[rank][name]
            assert torch.isfinite(got).all(), name
            if name != "lm_head.weight":
                torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-9, msg=name)
        got, want = lent[rank]["lm_head.weight"], own[rank]["lm_head.weight"]
        assert not torch.equal(got, want)
        assert ((got - want).norm() / want.norm()).item() < 2**-8
