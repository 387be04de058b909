"""`launch/bench.py layout` on 2 gloo processes: the raw training step of a parallel layout runs, counts
the whole world's tokens (of every micro-batch, with gradient accumulation), and finds all-to-all
traffic exactly when the experts are spread over ranks (the toy model of test_training.py; the GPU
numbers are in bench/RESULTS.md)."""

from __future__ import annotations

import json
import subprocess

import pytest

from tests.distributed.gloo import torchrun
from tests.distributed.test_training import MODEL, REPO, environment


@pytest.mark.parametrize(("expert", "micro_batches"), [(1, 3), (2, 1)], ids=["ep1-dp2-accum3", "ep2"])
def test_layout_benchmark_times_the_step_and_its_all_to_all(tmp_path, expert, micro_batches):
    out = tmp_path / "result.json"
    options = ["--preset", "tiny", "--expert", str(expert), "--micro-batch", "2", "--seq", "32"]
    options += ["--micro-batches", str(micro_batches)]
    model = [f"model.{key}={value}" for key, value in MODEL.items()]
    result = subprocess.run(
        [*torchrun(2), "launch/bench.py", "layout", *options,
         "--steps", "2", "--warmup", "1", "--out", str(out), *model],
        cwd=REPO, env=environment(), capture_output=True, text=True, timeout=240,
    )  # fmt: skip
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    measured = json.loads(out.read_text())
    assert (measured["world"], measured["expert"], measured["data"]) == (2, expert, 2)
    assert measured["tokens_per_s"] > 0 and measured["ms_per_step"] > 0
    # 2 ranks x 2 rows x 32 tokens a micro-batch, micro_batches of them a step, over the measured time
    tokens_a_step = 2 * 2 * 32 * micro_batches
    assert measured["micro_batches"] == micro_batches
    step_s = measured["ms_per_step"] / 1e3
    assert measured["tokens_per_s"] == pytest.approx(tokens_a_step / step_s, rel=1e-6)
    assert measured["moe_layers"] == (
        MODEL["num_hidden_layers"] + MODEL["mtp_num_layers"] if expert > 1 else 0
    )
    if expert > 1:
        assert measured["a2a_ms_per_moe_layer"] > 0
    else:
        assert measured["a2a_ms_per_step"] == 0
