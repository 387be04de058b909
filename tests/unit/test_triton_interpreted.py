"""The Triton kernels of model/ops checked on the CPU: tests/unit/interpreted_kernels.py run by
pytest in a process of its own under Triton's interpreter (TRITON_INTERPRET=1, which Triton must see
before its first import, so not in this process). In this process, without the interpreter, CPU
tensors never go to a kernel."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from model.ops.triton_support import interpreting, runs_on_triton

pytest.importorskip("triton")

REPO = Path(__file__).resolve().parents[2]


def test_cpu_tensors_stay_with_the_torch_references_without_the_interpreter():
    if interpreting():
        pytest.skip("this process runs under TRITON_INTERPRET")
    assert not runs_on_triton(torch.zeros(4))


@pytest.mark.slow
def test_the_kernels_under_the_interpreter_match_their_references():
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(REPO)}
    cases = REPO / "tests" / "unit" / "interpreted_kernels.py"
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "no:xdist", str(cases)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-6000:] + done.stderr[-3000:]
    assert " passed" in done.stdout and "skipped" not in done.stdout, done.stdout[-2000:]
