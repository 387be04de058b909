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


def gradients_at_the_step(rank: int, world: int, zero_stage: int):
    """This rank's per-micro-batch bf16 gradients (plain autograd, scaled as DeepSpeed scales the loss)
    and the full gradient DeepSpeed holds for each parameter just before the optimizer step."""
    os.environ.update(DS_ACCELERATOR="cpu", RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world))
    import deepspeed
    from deepspeed.utils import safe_get_full_grad

    from parallel.engine import finish_bf16_setup, quiet_deepspeed, skip_cpu_shm_build

    quiet_deepspeed()
    skip_cpu_shm_build()
    model = toy_model()
    plain = copy.deepcopy(model)
    micro_grads = []
    for index in range(GRAD_ACCUM):
        plain.zero_grad(set_to_none=True)
        (loss_of(plain, micro_batch(rank, index)) / GRAD_ACCUM).backward()
        micro_grads.append([p.grad.clone() for p in plain.parameters()])

    engine, *_ = deepspeed.initialize(
        model=model,
        optimizer=torch.optim.SGD(model.parameters(), lr=0.0),
        config=trainer_settings(world, zero_stage),
        dist_init_required=False,
    )
    finish_bf16_setup(engine, world)  # as the trainer does
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
