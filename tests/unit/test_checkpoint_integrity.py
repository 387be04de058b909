"""Damaged checkpoints, full disks and interrupted clean-ups (train/checkpoint.py,
train/checkpoint_integrity.py, train/disk_space.py), in one process with a fake DeepSpeed engine:

- a save writes manifest.json (every file's size and sha256) inside the staging directory, so a
  published checkpoint has one; verification names flipped bytes, truncated, deleted and garbled
  files;
- checkpoint.resume=auto falls back past a damaged checkpoint to the newest intact one, with a
  warning naming the file; an explicitly named damaged one stops the run listing the intact ones;
  none intact stops too (never a silent start from scratch); a checkpoint past max_steps is
  refused; one saved before manifests loads after the checks that need none, with a warning;
- a load error is re-raised naming the file;
- a full disk during a save says so (filesystem, size needed), removes the staging directory and
  keeps the previous checkpoint; metrics.jsonl cut back on a full disk leaves no partial file;
- old checkpoints go through checkpoints/.trash/, and leftovers are swept when a run starts.
"""

from __future__ import annotations

import dataclasses
import errno
import json
from pathlib import Path

import pytest
import torch

from train import checkpoint as ckpt
from train.checkpoint import (
    CheckpointError,
    CheckpointLoadError,
    check_checkpoint,
    choose_checkpoint,
    complete_checkpoints,
    load_on_every_rank,
    refuse_past_max_steps,
    remove_checkpoint,
    save_checkpoint,
    sweep_leftovers,
)
from train.checkpoint_integrity import MANIFEST, file_digest, read_manifest, share_of, verify_manifest
from train.disk_space import OutOfSpaceError, format_bytes, out_of_space_kind

MODEL_FILE = "mp_rank_00_model_states.pt"
OPTIM_FILE = "zero_pp_rank_0_mp_rank_00_optim_states.pt"


class FakeEngine:
    """What save_checkpoint and load_checkpoint use of the engine (parallel/engine.py's Engine): its
    files, in torch's zip format, and a load that reads them through the reader it is given."""

    def __init__(self, fail_with: BaseException | None = None):
        self.fail_with = fail_with

    def save_checkpoint(self, save_dir: str, tag: str) -> None:
        directory = Path(save_dir) / tag
        torch.save({"module": {"w": torch.arange(4096.0)}}, directory / MODEL_FILE)
        if self.fail_with is not None:  # half written, as a full disk leaves it
            raise self.fail_with
        torch.save({"optimizer_state_dict": {"exp_avg": torch.ones(2048)}}, directory / OPTIM_FILE)

    def load_checkpoint(self, load_dir: str, tag: str, read) -> bool:
        directory = Path(load_dir) / tag
        model = directory / MODEL_FILE
        if not model.exists():
            raise AssertionError  # as DeepSpeed's SDLoader says it when it finds no module file
        read(str(model), map_location="cpu")
        read(str(directory / OPTIM_FILE), map_location="cpu")
        return True


def save(run_dir: Path, step: int, engine: FakeEngine | None = None, keep: int = 3, **kwargs) -> Path:
    state = {"step": step, "tokens": 10 * step, "world_size": 1, "saved_at": str(step)}
    rank_state = {"loader": {"position": torch.tensor(step)}, "rng": {"torch": torch.get_rng_state()}}
    return save_checkpoint(
        engine or FakeEngine(), run_dir, step, state, rank_state, "model: {}\n", keep=keep, **kwargs
    )


def flip_a_byte(path: Path, offset: int | None = None) -> None:
    data = bytearray(path.read_bytes())
    offset = len(data) // 2 if offset is None else offset
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


def make_legacy(checkpoint: Path, **state_changes) -> None:
    """As saved before manifests existed: no manifest.json, no "manifest" in trainer_state.json."""
    (checkpoint / MANIFEST).unlink()
    state = json.loads((checkpoint / "trainer_state.json").read_text())
    del state["manifest"]
    state.update(state_changes)
    (checkpoint / "trainer_state.json").write_text(json.dumps(state))


class Said(list):
    def __call__(self, text: str) -> None:
        self.append(text)

    def text(self) -> str:
        return "\n".join(self)


# -- the manifest ------------------------------------------------------------------------------


def test_a_save_writes_a_manifest_of_every_file_inside_the_atomic_rename(tmp_path):
    final = save(tmp_path, 2)
    manifest = read_manifest(final)
    expected = {MODEL_FILE, OPTIM_FILE, "rank_00000.pt", "trainer_state.json", "config.yaml"}
    assert set(manifest) == expected
    for name, entry in manifest.items():
        assert (entry["size"], entry["sha256"]) == file_digest(final / name)
    assert json.loads((final / "trainer_state.json").read_text())["manifest"] == MANIFEST
    assert not (tmp_path / "checkpoints" / ".staging").exists()
    assert verify_manifest(final).intact


@pytest.mark.parametrize(
    "damage, named, says",
    [
        (lambda d: flip_a_byte(d / MODEL_FILE), MODEL_FILE, "sha256 differs"),
        (lambda d: flip_a_byte(d / OPTIM_FILE), OPTIM_FILE, "sha256 differs"),
        (
            lambda d: (d / MODEL_FILE).write_bytes((d / MODEL_FILE).read_bytes()[:1000]),
            MODEL_FILE,
            "truncated",
        ),
        (lambda d: (d / MODEL_FILE).unlink(), MODEL_FILE, "missing"),
        (lambda d: (d / "rank_00000.pt").unlink(), "rank_00000.pt", "missing"),
        (
            lambda d: (d / "trainer_state.json").write_bytes(b"\xff\xfe garbled"),
            "trainer_state.json",
            "truncated",
        ),
        (lambda d: flip_a_byte(d / "trainer_state.json", 12), "trainer_state.json", "sha256 differs"),
        (lambda d: (d / MANIFEST).write_text("{not json"), MANIFEST, "unreadable"),
        (lambda d: (d / MANIFEST).unlink(), MANIFEST, "missing"),
    ],
    ids=[
        "model",
        "optimizer",
        "truncated",
        "deleted",
        "rank-file",
        "garbled-state",
        "state",
        "manifest",
        "no-manifest",
    ],
)
def test_verification_names_the_damaged_file(tmp_path, damage, named, says):
    final = save(tmp_path, 2)
    damage(final)
    verdict = check_checkpoint(final, Said())
    assert not verdict.intact
    assert any(str(final / named) in problem and says in problem for problem in verdict.problems), verdict


def test_share_of_splits_the_files_disjointly_and_by_size():
    sizes = {f"f{i}": size for i, size in enumerate([100, 90, 50, 40, 30, 10, 5, 1])}
    shares = [share_of(sizes, rank, 3) for rank in range(3)]
    assert sorted(name for share in shares for name in share) == sorted(sizes)
    loads = [sum(sizes[name] for name in share) for share in shares]
    assert max(loads) - min(loads) <= 40, loads
    assert share_of(sizes, 0, 1) == sorted(sizes, key=lambda n: -sizes[n])


# -- choosing what to resume from --------------------------------------------------------------


def test_auto_falls_back_to_the_newest_intact_checkpoint_naming_the_damaged_file(tmp_path):
    save(tmp_path, 2)
    newest = save(tmp_path, 4)
    flip_a_byte(newest / MODEL_FILE)
    said = Said()
    assert choose_checkpoint("auto", tmp_path, said) == tmp_path / "checkpoints" / "step_2"
    assert "WARNING" in said.text() and str(newest / MODEL_FILE) in said.text()


@pytest.mark.parametrize("lost", [ckpt.TRAINER_STATE, MANIFEST])
def test_a_checkpoint_that_lost_its_trainer_state_or_manifest_is_damage_not_a_leftover(tmp_path, lost):
    """A published step_N lacking either file is damaged: reported and skipped past, never swept away
    as an unfinished save (with nothing older, the run would have started over, exit 0)."""
    save(tmp_path, 2)
    newest = save(tmp_path, 4)
    (newest / lost).unlink()
    root = tmp_path / "checkpoints"
    assert sweep_leftovers(root) == [] and newest.is_dir()
    said = Said()
    assert choose_checkpoint("auto", tmp_path, said) == root / "step_2"
    assert f"WARNING: checkpoint {newest} is damaged" in said.text() and lost in said.text()
    (root / "step_2" / lost).unlink()
    with pytest.raises(CheckpointError, match="no intact checkpoint"):
        choose_checkpoint("auto", tmp_path, Said())


def test_a_checkpoint_of_another_model_is_refused_naming_the_settings(tmp_path):
    from omegaconf import OmegaConf

    from tests.conftest import tiny_config

    config = tiny_config()
    checkpoint = tmp_path / "step_2"
    checkpoint.mkdir()
    (checkpoint / "config.yaml").write_text(OmegaConf.to_yaml({"model": OmegaConf.structured(config)}))
    wider = dataclasses.replace(config, moe_intermediate_size=config.moe_intermediate_size + 8)
    with pytest.raises(CheckpointError, match=r"another model .*moe_intermediate_size: \d+ there, \d+ here"):
        ckpt.refuse_another_model(checkpoint, wider)
    ckpt.refuse_another_model(checkpoint, dataclasses.replace(config, rope_theta=config.rope_theta * 4))


def test_a_damaged_checkpoint_named_explicitly_stops_the_run_listing_the_intact_ones(tmp_path):
    save(tmp_path, 2)
    save(tmp_path, 4)
    damaged = save(tmp_path, 6)
    (damaged / OPTIM_FILE).unlink()
    with pytest.raises(CheckpointError) as caught:
        choose_checkpoint(str(damaged), tmp_path, Said())
    message = str(caught.value)
    assert str(damaged / OPTIM_FILE) in message and "missing" in message
    intact = message.split("Intact checkpoints")[1]
    assert "step_4" in intact and "step_2" in intact and "step_6" not in intact


def test_no_intact_checkpoint_stops_the_run_instead_of_starting_over(tmp_path):
    for step in (2, 4):
        flip_a_byte(save(tmp_path, step) / MODEL_FILE)
    with pytest.raises(CheckpointError, match=r"no intact checkpoint .*checkpoint.resume=none"):
        choose_checkpoint("auto", tmp_path, Said())
    assert choose_checkpoint("none", tmp_path, Said()) is None


def test_a_checkpoint_from_before_manifests_loads_with_a_warning(tmp_path):
    final = save(tmp_path, 2)
    make_legacy(final)
    said = Said()
    assert choose_checkpoint("auto", tmp_path, said) == final
    assert f"WARNING: {final} has no {MANIFEST}" in said.text()


@pytest.mark.parametrize(
    "changes, named, says",
    [
        ({"step": 600}, "trainer_state.json", "says step 600, but the directory is step_2"),
        ({"world_size": 2}, "rank_00001.pt", "missing (rank 1's data-loader and RNG state)"),
    ],
)
def test_a_checkpoint_from_before_manifests_gets_the_checks_that_need_none(tmp_path, changes, named, says):
    final = save(tmp_path, 2)
    make_legacy(final, **changes)
    verdict = check_checkpoint(final, Said())
    assert verdict.problems == [f"{final / named}: {says}"]


def test_a_garbled_trainer_state_is_named(tmp_path):
    final = save(tmp_path, 2)
    make_legacy(final)
    (final / "trainer_state.json").write_bytes(b'{"step": 2\x80\x81}')
    (problem,) = check_checkpoint(final, Said()).problems
    assert problem.startswith(f"{final / 'trainer_state.json'}: unreadable (UnicodeDecodeError")


def test_a_checkpoint_past_max_steps_is_refused(tmp_path):
    refuse_past_max_steps(tmp_path / "step_7", 7, max_steps=7)  # done: nothing to train, no error
    with pytest.raises(CheckpointError, match=r"step_600 is at step 600, past trainer.max_steps=7"):
        refuse_past_max_steps(tmp_path / "step_600", 600, max_steps=7)


# -- load errors name the file -----------------------------------------------------------------


@pytest.mark.parametrize("name", [MODEL_FILE, OPTIM_FILE, "rank_00000.pt"])
def test_a_load_error_names_the_file(tmp_path, name):
    final = save(tmp_path, 2)
    (final / name).write_bytes((final / name).read_bytes()[:500])  # torch: "failed finding central directory"
    with pytest.raises(CheckpointLoadError) as caught:
        load_on_every_rank(FakeEngine(), final)
    assert str(final / name) in str(caught.value)


@pytest.mark.parametrize("lacking", ["loader", "tokens"])
def test_a_state_lacking_an_entry_names_its_file(tmp_path, lacking):
    """What a checkpoint from before manifests may lack (with one, the hashes catch any change)."""
    final = save(tmp_path, 2)
    if lacking == "loader":
        file = final / "rank_00000.pt"
        torch.save({"rng": {"torch": torch.get_rng_state()}}, file)
    else:
        file = final / ckpt.TRAINER_STATE
        file.write_text(json.dumps({"step": 2, "world_size": 1}))
    with pytest.raises(CheckpointLoadError, match="holds no") as caught:
        load_on_every_rank(FakeEngine(), final)
    assert str(file) in str(caught.value)


def test_a_bare_assertion_from_deepspeed_names_the_checkpoint(tmp_path):
    final = save(tmp_path, 2)
    (final / MODEL_FILE).unlink()
    with pytest.raises(
        CheckpointLoadError, match=f"the checkpoint {final}: rank 0: AssertionError: \\(no message"
    ):
        load_on_every_rank(FakeEngine(), final)


# -- full disks --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "error",
    [
        OSError(errno.ENOSPC, "No space left on device"),
        RuntimeError("[enforce fail at inline_container.cc:664] . unexpected pos 320 vs 256"),
    ],
    ids=["ENOSPC", "torch-writer"],
)
def test_a_full_disk_during_a_save_keeps_the_previous_checkpoint(tmp_path, monkeypatch, error):
    previous = save(tmp_path, 2)
    for module in ("train.checkpoint", "train.disk_space"):
        monkeypatch.setattr(f"{module}.free_bytes", lambda path: 1000)  # torch's writer loses the errno
    with pytest.raises(OutOfSpaceError) as caught:
        save(tmp_path, 4, FakeEngine(fail_with=error))
    message = str(caught.value)
    size = format_bytes(sum(entry["size"] for entry in read_manifest(previous).values()))
    assert message.startswith("no space left on ")
    assert (
        f"while saving step 4 to {tmp_path / 'checkpoints' / 'step_4'} (needs about {size}; 1 kB free"
        in message
    )
    assert f"the previous checkpoint {previous} is kept" in message
    assert not (tmp_path / "checkpoints" / ".staging").exists()
    assert [path for _, path in complete_checkpoints(tmp_path / "checkpoints")] == [previous]
    assert verify_manifest(previous).intact


def test_a_full_disk_at_the_first_save_estimates_from_the_hint(tmp_path):
    with pytest.raises(OutOfSpaceError, match=r"needs about 2.5 GB"):
        save(tmp_path, 2, FakeEngine(fail_with=OSError(errno.ENOSPC, "full")), size_hint=2_500_000_000)


def test_another_save_failure_is_reported_as_it_is(tmp_path):
    with pytest.raises(CheckpointError, match=r"could not save step 2 .*rank 0: ValueError: boom"):
        save(tmp_path, 2, FakeEngine(fail_with=ValueError("boom")))
    assert not (tmp_path / "checkpoints" / ".staging").exists()


def test_a_save_failure_that_cannot_be_looked_into_is_still_reported(tmp_path, monkeypatch):
    """Rank 0 words a failed save for every rank, which wait for it: an error while it reads the disk
    (here: listing the checkpoints) still gives an error naming both, not a rank that never answers."""

    def unreadable(root):
        raise PermissionError(13, "Permission denied", str(root))

    monkeypatch.setattr("train.checkpoint.complete_checkpoints", unreadable)
    with pytest.raises(CheckpointError, match=r"rank 0: ValueError: boom; then PermissionError: .*denied"):
        save(tmp_path, 2, FakeEngine(fail_with=ValueError("boom")))


def test_out_of_space_kinds():
    assert out_of_space_kind(OSError(errno.ENOSPC, "x")) == "enospc"
    assert out_of_space_kind(OSError(errno.EDQUOT, "x")) == "enospc"
    try:
        try:
            raise OSError(errno.ENOSPC, "x")
        except OSError as inner:
            raise RuntimeError("wrapped") from inner
    except RuntimeError as outer:
        assert out_of_space_kind(outer) == "enospc"
    assert out_of_space_kind(RuntimeError("basic_ios::clear: iostream error")) == "writer"
    assert out_of_space_kind(OSError(errno.EACCES, "x")) is None
    assert [format_bytes(n) for n in (350e6, 1.23e9, 1.05e12, 12)] == ["350 MB", "1.23 GB", "1.05 TB", "12 B"]


def test_cutting_metrics_back_on_a_full_disk_leaves_no_partial_file(tmp_path, monkeypatch):
    from tests.unit.test_monitor import make_monitor
    from train.monitor import METRICS_FILE

    lines = "".join(json.dumps({"step": step, "loss": 1.0}) + "\n" for step in range(1, 6))
    (tmp_path / METRICS_FILE).write_text(lines)

    def full(_fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr("data.shards.os.fsync", full)
    with pytest.raises(
        OutOfSpaceError, match=f"no space left on .* while cutting {tmp_path / METRICS_FILE} back"
    ):
        make_monitor(tmp_path, resume_step=3)
    assert (tmp_path / METRICS_FILE).read_text() == lines
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []


# -- removals through the trash, swept at start ------------------------------------------------


def test_an_interrupted_removal_leaves_only_trash_which_the_next_start_sweeps(tmp_path, monkeypatch):
    save(tmp_path, 2)
    save(tmp_path, 4)
    root = tmp_path / "checkpoints"

    def killed(path, **_):
        raise KeyboardInterrupt  # as a kill in the middle of deleting

    monkeypatch.setattr(ckpt.shutil, "rmtree", killed)
    with pytest.raises(KeyboardInterrupt):
        remove_checkpoint(root / "step_2")
    monkeypatch.undo()
    assert not (root / "step_2").exists(), "a half-deleted checkpoint must not stay where resumes look"
    assert [p.name.split(".")[0] for p in (root / ".trash").iterdir()] == ["step_2"]
    assert sweep_leftovers(root) == [f"removed {root / '.trash'}"]
    assert sorted(p.name for p in root.iterdir()) == ["step_4"]


def test_rotation_keeps_the_newest_and_leaves_no_trash(tmp_path):
    for step in (1, 2, 3, 4):
        save(tmp_path, step, keep=2)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step_3", "step_4"]


def test_sweep_clears_staging_trash_and_incomplete_step_directories(tmp_path):
    save(tmp_path, 2)
    root = tmp_path / "checkpoints"
    (root / ".staging" / "step_4").mkdir(parents=True)
    (root / ".trash" / "step_1.123").mkdir(parents=True)
    (root / "step_6").mkdir()  # what the old rmtree left when interrupted at its very end
    (root / "step_8").mkdir()
    (root / "step_8" / OPTIM_FILE).write_bytes(b"half of it")
    done = sweep_leftovers(root)
    assert len(done) == 4, done
    assert sorted(p.name for p in root.iterdir()) == [".abandoned", "step_2"]
    assert [p.name for p in (root / ".abandoned").glob("incomplete-*/*")] == ["step_8"]


def test_to_hf_exports_no_damaged_checkpoint(tmp_path, capsys):
    """convert_hf.py to-hf checks the weights it exports against the manifest: a damaged step_N named
    explicitly is refused naming the file; from a run dir, the newest one with intact weights is
    taken. What it does not read may be missing (an export from a copy of the weights alone)."""
    import shutil

    from launch.convert_hf import resolve_checkpoint

    older = save(tmp_path, 2)
    newest = save(tmp_path, 4)
    assert resolve_checkpoint(newest) == newest and resolve_checkpoint(tmp_path) == newest
    copy = tmp_path / "weights_only" / "step_4"
    copy.mkdir(parents=True)
    for name in (MODEL_FILE, "config.yaml", MANIFEST):
        shutil.copy(newest / name, copy / name)
    assert resolve_checkpoint(copy) == copy
    flip_a_byte(newest / MODEL_FILE)
    with pytest.raises(SystemExit, match=f"{newest} is damaged, not exporting it") as caught:
        resolve_checkpoint(newest)
    assert str(newest / MODEL_FILE) in str(caught.value)
    assert resolve_checkpoint(tmp_path) == older
    assert f"WARNING: checkpoint {newest} is damaged" in capsys.readouterr().err
    assert resolve_checkpoint(newest, verify=False) == newest


def test_initial_weights_that_cannot_serve_are_named_before_anything_is_built(tmp_path):
    from model.hf import save_hf
    from tests.conftest import tiny_config
    from tests.unit.test_model import build

    with pytest.raises(
        CheckpointError, match=f"checkpoint.init_from: {tmp_path / 'nope'}: no such directory"
    ):
        ckpt.check_initial_weights(tmp_path / "nope", tiny_config())
    config = tiny_config()
    save_hf(build(config), tmp_path / "hub")
    ckpt.check_initial_weights(tmp_path / "hub", config)
    other = dataclasses.replace(config, num_experts=config.num_experts // 2)
    with pytest.raises(CheckpointError, match=r"is for another model \(num_experts: \d+ there, \d+ here"):
        ckpt.check_initial_weights(tmp_path / "hub", other)
