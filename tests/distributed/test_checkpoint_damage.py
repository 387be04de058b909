"""Damaged checkpoints and full disks on 2 gloo processes.

- In-process with a fake engine that saves the way DeepSpeed does (a barrier, the rank's files, a
  closing barrier): the disk filling up on one rank only fails the save on both, with the same
  message, no rank left waiting in a collective; the manifest is checked in shares, and damage in
  rank 1's share is reported on both ranks.
- End to end (`torchrun launch/pretrain.py`, conf=tiny as in test_training.py): a run of another
  model in the same run.dir is refused before anything is loaded or set aside. A flipped byte in
  the newest checkpoint's model-states file. Named explicitly (checkpoint.resume=PATH) it stops the
  run, naming the file and listing the intact checkpoints; with checkpoint.resume=auto the run warns,
  naming the file, and resumes from the checkpoint before it, with the losses of the run that
  wrote them.
"""

from __future__ import annotations

import errno
import subprocess
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from tests.distributed.gloo import run_on_ranks
from tests.distributed.test_training import (
    REPO,
    command,
    environment,
    losses,
    overrides,
    pretrain,
    write_corpus,
)
from tests.unit.test_checkpoint_integrity import MODEL_FILE, Said, flip_a_byte, save
from train.checkpoint import check_checkpoint, complete_checkpoints
from train.checkpoint_integrity import read_manifest, share_of
from train.disk_space import OutOfSpaceError


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    return write_corpus(tmp_path_factory.mktemp("corpus"))


class DeepSpeedLikeEngine:
    """Saves collectively as DeepSpeed 0.19.8 does: a barrier, each rank's optimizer partition (and
    rank 0 the module), a closing barrier. On `full_on_rank` the disk fills after the partition."""

    def __init__(self, full_on_rank: int | None = None):
        self.full_on_rank = full_on_rank

    def save_checkpoint(self, save_dir: str, tag: str) -> None:
        dist.barrier()
        directory, rank = Path(save_dir) / tag, dist.get_rank()
        torch.save({"partition": torch.full((1024,), float(rank))}, directory / f"optim_{rank}.pt")
        if rank == self.full_on_rank:
            raise OSError(errno.ENOSPC, "No space left on device")
        if rank == 0:
            torch.save({"module": {"w": torch.arange(2048.0)}}, directory / MODEL_FILE)
        dist.barrier()


def fill_the_disk_then_damage_rank_1s_share(
    rank: int, world: int, run_dir: str
) -> tuple[str | None, list, str]:
    """Save step 2; fail to save step 4 (rank 1's disk fills up); flip a byte of step 2 in the share
    of the files that rank 1 hashes, and check step 2. Returns (the save's error, the problems found,
    the damaged file)."""
    checkpoint = save(Path(run_dir), 2, DeepSpeedLikeEngine())
    try:
        save(Path(run_dir), 4, DeepSpeedLikeEngine(full_on_rank=1))
        message = None
    except OutOfSpaceError as error:
        message = str(error)
    sizes = {name: entry["size"] for name, entry in read_manifest(checkpoint).items()}
    damaged = checkpoint / share_of(sizes, 1, world)[0]  # hashed by rank 1 only
    if rank == 0:
        flip_a_byte(damaged)
    dist.barrier()
    return message, check_checkpoint(checkpoint, Said()).problems, str(damaged)


def test_a_full_disk_or_damage_seen_by_one_rank_is_known_to_every_rank(tmp_path):
    run_dir = tmp_path / "run"
    results = run_on_ranks(fill_the_disk_then_damage_rank_1s_share, 2, tmp_path, str(run_dir), timeout=90)
    (message, problems, damaged), (message_1, problems_1, _) = results
    # the save failed on both ranks alike: the previous checkpoint kept, no staging left
    assert message is not None and message == message_1
    assert f"while saving step 4 to {run_dir / 'checkpoints' / 'step_4'}" in message
    assert not (run_dir / "checkpoints" / ".staging").exists()
    assert [path.name for _, path in complete_checkpoints(run_dir / "checkpoints")] == ["step_2"]
    # the damage that rank 1 found is reported on both
    assert problems == problems_1 and len(problems) == 1 and problems[0].startswith(f"{damaged}: ")


def test_a_damaged_checkpoint_is_refused_by_name_and_skipped_by_auto(corpus, tmp_path):
    run_dir = tmp_path / "run"
    settings = {"trainer.max_steps": 2, "optim.schedule_steps": 2, "checkpoint.every": 1}
    pretrain(2, overrides(corpus, run_dir, **settings))
    expected = losses(run_dir)
    step_1, step_2 = run_dir / "checkpoints" / "step_1", run_dir / "checkpoints" / "step_2"

    # another model by mistake: refused before any load, nothing set aside (a load failure would
    # have been taken for damage, and auto would have fallen back past both checkpoints)
    wider = overrides(
        corpus, run_dir, **{**settings, "trainer.max_steps": 3, "model.moe_intermediate_size": 24}
    )
    result = subprocess.run(command(2, wider), cwd=REPO, env=environment(), capture_output=True, text=True)
    output = result.stdout + result.stderr
    assert result.returncode != 0, output[-3000:]
    assert f"{step_2} holds another model than this run's (moe_intermediate_size: " in output
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["step_1", "step_2"]

    flip_a_byte(step_2 / MODEL_FILE)

    named = overrides(corpus, run_dir, **settings, **{"checkpoint.resume": step_2})
    result = subprocess.run(command(2, named), cwd=REPO, env=environment(), capture_output=True, text=True)
    output = result.stdout + result.stderr
    assert result.returncode != 0, output[-3000:]
    assert f"checkpoint.resume={step_2} is damaged" in output and str(step_2 / MODEL_FILE) in output
    assert f"Intact checkpoints (checkpoint.resume=PATH to resume from one):\n  {step_1}\n" in output
    assert "CheckpointError" not in output, "said in a message, not in a traceback"

    output = pretrain(2, overrides(corpus, run_dir, **settings))
    assert f"WARNING: checkpoint {step_2} is damaged" in output and str(step_2 / MODEL_FILE) in output
    assert f"resuming from {step_1}" in output
    assert losses(run_dir) == expected, "step 2 again from step_1 must repeat its loss"
    assert len(list((run_dir / "checkpoints" / ".abandoned").glob("*/step_2"))) == 1, (
        "the damaged one set aside"
    )
    assert check_checkpoint(step_2, Said()).intact, "step 2 saved anew"
