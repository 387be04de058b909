"""A checkpoint that would run code when unpickled is refused on resume, end to end.

`conf=tiny` trains 2 steps on 2 CPU processes; its `mp_rank_00_model_states.pt` then gets a payload
next to the weights (an object whose `__reduce__` calls `os.system("touch MARKER")`). Resuming on the
layout it was saved with (DeepSpeed's checkpoint engine reads the file) and on another one
(`parallel.zero_stage=2`: the ds_to_universal conversion reads it first) must both fail, naming the
file, and the marker must never appear (train/safe_load.py).
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from tests.distributed.test_training import REPO, command, environment, overrides, pretrain, write_corpus
from tests.unit.test_safe_load import CreatesMarker
from train.checkpoint_integrity import write_manifest
from train.safe_load import load_file


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory) -> tuple[Path, Path]:
    """(corpus, run dir) of 2 steps on 2 processes (ZeRO 1), with the checkpoint step_2."""
    corpus = write_corpus(tmp_path_factory.mktemp("corpus"))
    run_dir = tmp_path_factory.mktemp("trained")
    pretrain(2, overrides(corpus, run_dir, **{"trainer.max_steps": 2}))
    assert (run_dir / "checkpoints" / "step_2" / "mp_rank_00_model_states.pt").is_file()
    return corpus, run_dir


def poison(model_states: Path, marker: Path) -> None:
    """The file as saved, plus the payload (whatever reads it without restriction runs `touch`), with
    the checkpoint's manifest rewritten to match."""
    state = load_file(model_states, map_location="cpu")
    state["payload"] = CreatesMarker(marker)
    torch.save(state, model_states)
    # whoever can replace a file can rewrite the manifest too: checksums find damage, not malice
    write_manifest(model_states.parent)


@pytest.mark.parametrize(
    "layout",
    [pytest.param({}, id="same-layout"), pytest.param({"parallel.zero_stage": 2}, id="zero2-universal")],
)
def test_a_resume_refuses_a_checkpoint_that_would_run_code(trained_run, tmp_path, layout):
    corpus, trained = trained_run
    run_dir = tmp_path / "run"
    shutil.copytree(trained, run_dir)
    model_states = run_dir / "checkpoints" / "step_2" / "mp_rank_00_model_states.pt"
    marker = tmp_path / "MARKER"
    poison(model_states, marker)

    args = overrides(corpus, run_dir, **{"trainer.max_steps": 4, **layout})
    result = subprocess.run(command(2, args), cwd=REPO, env=environment(), capture_output=True, text=True)
    output = result.stdout + result.stderr
    assert not marker.exists(), f"the checkpoint's payload ran:\n{output[-4000:]}"
    assert result.returncode != 0, f"the resume should have failed:\n{output[-4000:]}"
    assert f"{model_states}: refused to load this checkpoint file" in output, output[-4000:]
    assert output.count("pretrain.py: ") == 1, "the run's final message is printed once, by rank 0"
    if layout:
        assert "converting it to universal form" in output
