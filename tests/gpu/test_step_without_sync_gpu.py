"""A training step is launched without the host waiting for the GPU, and its results read later are
the step's own.

`TrainStep.run` (train/step.py) runs under `torch.cuda.set_sync_debug_mode("error")`, which raises at
any CUDA call that makes the host wait for the device (a `.item()`, a copy to pageable memory, a
stream synchronisation): the engine's optimizer step decides clipping and skipping on the device,
and the losses and gradient norm travel back behind the step's kernels. Then the results read after
the next step was launched must equal those read at once. The `tiny` preset, one GPU, ZeRO 1 in bf16
(the engine's device-side step), eager layers, DeltaNet heads of 128. Runs in a child process: it
starts torch.distributed. Skipped without CUDA.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]

if not torch.cuda.is_available():
    pytest.skip("needs CUDA", allow_module_level=True)


def run_steps() -> None:
    from bench.layout import compose_config, parse, random_batch
    from bench.pinned_autotune import pin_autotuned_kernels, pinning_wanted
    from parallel.engine import setup_distributed
    from train.build import build_training
    from train.config import validate_layout

    # as in the tests' own process (conftest.py). `pinning_wanted` imports fla first: the model imports it
    # only at its first DeltaNet call, and pinning before that pinned nothing: fla autotuned in full, and
    # this test took 182-202 s of tests/gpu's 231-261 s on an H200
    if pinning_wanted():
        assert pin_autotuned_kernels("fla") > 0, "no fla autotuner found to pin"
    # DeltaNet heads as test_model_gpu.py's (2 / 4 heads of 128): fla's kernels compiled for those
    # tests come from Triton's disk cache here instead of compiling again at tiny's head dim 32
    heads = ["model.linear_key_head_dim=128", "model.linear_value_head_dim=128"]
    args = parse(["--preset", "tiny", "--no-compile", "--micro-batch", "2", *heads])
    cfg = compose_config(args, world=1)
    device, _ = setup_distributed()
    training = build_training(cfg, validate_layout(cfg, 1), 0, device)
    assert training.engine.steps_without_host_sync
    batch = random_batch(cfg, 0)
    training.step.run([batch], lr=1e-3).result()  # first step: kernels compiled, state created
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        first = training.step.run([batch], lr=1e-3)
        first_norm = training.engine.grad_norm  # the step's own device tensor
        second = training.step.run([batch], lr=1e-3)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    read_late = first.result()  # after the second step was launched
    assert not read_late.bad and read_late.grad_norm > 0
    assert read_late.grad_norm == first_norm.item()  # the first step's norm, not the second's
    # the second step ran on the parameters the first one updated: another loss
    assert second.result().losses.loss != read_late.losses.loss
    assert second.result().grad_norm != read_late.grad_norm
    print("ok")


def test_a_step_is_launched_without_waiting_for_the_gpu(tmp_path):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    code = "from tests.gpu.test_step_without_sync_gpu import run_steps; run_steps()"
    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True)
    output = done.stdout[-3000:] + done.stderr[-6000:]
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), output
