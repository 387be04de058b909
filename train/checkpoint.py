"""Checkpoints of a run: atomic directories `run.dir/checkpoints/step_N/`, safe to load, resumable.

A checkpoint holds DeepSpeed's files (module weights, the ZeRO-partitioned optimizer state, the
engine's counters) and ours: `trainer_state.json` (step, tokens seen, bad-step counters),
`config.yaml` (the resolved config) and one `rank_XXXXX.pt` per rank (its data-loader state and RNG
states). The LR schedule is a function of the step, so the step is its whole state.

Atomicity: every rank writes into `checkpoints/.staging/step_N/`, rank 0 adds `trainer_state.json`
and `config.yaml`, all ranks hash the files into `manifest.json` (train/checkpoint_integrity.py), and
rank 0 renames the directory to `checkpoints/step_N` in one `os.replace`: a `step_N` directory is
complete by construction and a crash leaves at most a staging directory. `keep` bounds the complete
checkpoints kept (oldest removed first, only after the new one is in place); a checkpoint is removed
by renaming it into `checkpoints/.trash/` first, then deleting it, so an interrupted removal never
leaves a half-deleted `step_N` that still looks complete, or an empty one. `sweep_leftovers` clears
staging and trash when a run starts.

Failures: a save that fails on any rank (a full disk, typically) fails on every rank alike, removes
the staging directory, keeps the previous checkpoints and says what happened (`OutOfSpaceError`:
which filesystem, how much a checkpoint needs). Resuming checks the chosen checkpoint against its
manifest first (`choose_checkpoint`): with `checkpoint.resume=auto` a damaged checkpoint is skipped
for the newest intact one, with a warning naming its damaged files; a checkpoint named explicitly
must be intact, else the run stops naming the damage and listing the intact ones. A load that
fails anyway is re-raised naming the file (`load_on_every_rank`). Checkpoints written before
manifests existed load with a warning, after the checks that need no checksums.

Another layout (world size, expert-parallel size, ZeRO stage) resumes through DeepSpeed's universal
checkpoint: `convert_to_universal` runs `ds_to_universal` once into `step_N_universal/`, which any
layout loads. Loading never unpickles arbitrary objects: every file is read with
`torch.load(weights_only=True)` (train/safe_load.py), DeepSpeed's own reads and the conversion
included, with the few DeepSpeed classes its state holds allow-listed by name; our own files hold
only tensors and plain containers.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed as dist

from data.shards import write_atomically
from train.checkpoint_integrity import (
    MANIFEST,
    CheckpointError,
    CollectiveFailure,
    Verdict,
    describe,
    from_main,
    manifest_bytes,
    on_every_rank,
    rank,
    verify_manifest,
    write_manifest,
)
from train.disk_space import OutOfSpaceError, format_bytes, free_bytes, out_of_space_message
from train.safe_load import (
    REFUSED,
    CheckpointUnpicklingError,
    load_file,
    restricted_torch_load,
)

CHECKPOINTS = "checkpoints"
STAGING = ".staging"
TRASH = ".trash"  # checkpoints being deleted: renamed here first, so a step_N is whole or absent
ABANDONED = ".abandoned"  # checkpoints set aside, never deleted (a rewind's future, incomplete ones)
STEP_DIR = re.compile(r"^step_(\d+)$")
TRAINER_STATE = "trainer_state.json"


def checkpoint_root(run_dir: str | os.PathLike) -> Path:
    return Path(run_dir) / CHECKPOINTS


def step_tag(step: int) -> str:
    return f"step_{step}"


def complete_checkpoints(root: Path) -> list[tuple[int, Path]]:
    """(step, path) of every complete checkpoint under `root`, oldest first: every published one,
    damaged or not (`check_checkpoint` tells)."""
    if not root.is_dir():
        return []
    found = []
    for entry in root.iterdir():
        match = STEP_DIR.match(entry.name)
        if match and published(entry):
            found.append((int(match.group(1)), entry))
    return sorted(found)


def published(path: Path) -> bool:
    """Whether `path` is a checkpoint a save published (renamed into place whole). It then has its
    trainer_state.json, and since manifests exist its manifest.json: one of the two missing is damage,
    for the checks to report, not an unfinished save to sweep away."""
    return (path / TRAINER_STATE).is_file() or (path / MANIFEST).is_file()


class CheckpointLoadError(CheckpointError):
    """Loading a checkpoint failed; the message names the file being read."""


def choose_checkpoint(resume: str, run_dir: str | os.PathLike, say: Callable[[str], None]) -> Path | None:
    """Collective. The checkpoint directory `checkpoint.resume` asks for, checked against its
    manifest: auto, the newest intact one under run.dir (damaged newer ones skipped, each with a
    warning naming its files; None when there is none at all); none; or the path of a `step_N`
    directory, which must be intact. `say` prints on the main rank."""
    if resume == "none":
        return None
    if resume == "auto":
        return newest_intact(checkpoint_root(run_dir), say)
    path = Path(resume)
    if not (path / TRAINER_STATE).is_file():
        raise CheckpointError(
            f"checkpoint.resume={resume!r} is not a complete checkpoint directory "
            f"(expected {path / TRAINER_STATE}); use auto, none or a run.dir/checkpoints/step_N path"
        )
    verdict = check_checkpoint(path, say)
    if not verdict.intact:
        raise CheckpointError(
            f"checkpoint.resume={resume} is damaged, not resuming from it:\n  "
            + "\n  ".join(verdict.problems)
            + "\n"
            + intact_alternatives(path.parent, say, besides=path)
        )
    return path


def newest_intact(root: Path, say: Callable[[str], None], below: int | None = None) -> Path | None:
    """Collective. The newest complete checkpoint under `root` (before step `below`) that passes
    `check_checkpoint`; each damaged one on the way is reported in a warning. None when there is no
    complete checkpoint; CheckpointError when there are some but none is intact (never a silent
    start from scratch)."""
    newest_first = [
        path for step, path in reversed(complete_checkpoints(root)) if below is None or step < below
    ]
    found, damaged = first_undamaged(newest_first, lambda path: check_checkpoint(path, say).problems, say)
    if found is None and damaged:
        names = ", ".join(path.name for path in damaged)
        raise CheckpointError(
            f"no intact checkpoint in {root} (damaged: {names}): repair or remove them, or start over with "
            "checkpoint.resume=none (which sets them aside in checkpoints/.abandoned/)"
        )
    return found


def first_undamaged(
    newest_first: list[Path], problems_of: Callable[[Path], list[str]], say: Callable[[str], None]
) -> tuple[Path | None, list[Path]]:
    """The first checkpoint of `newest_first` in which `problems_of` finds nothing (None if none is),
    and the damaged ones before it, each reported in a warning naming its problems. Resuming checks
    every file (`check_checkpoint`), an export only the files it reads (launch/convert_hf.py)."""
    damaged = []
    for path in newest_first:
        problems = problems_of(path)
        if not problems:
            return path, damaged
        say(f"WARNING: checkpoint {path} is damaged, trying an older one:\n  " + "\n  ".join(problems))
        damaged.append(path)
    return None, damaged


def intact_alternatives(root: Path, say: Callable[[str], None], besides: Path) -> str:
    """Collective. A sentence listing the intact checkpoints under `root` other than `besides`,
    newest first, and how to pick one."""
    intact = [
        path
        for _, path in reversed(complete_checkpoints(root))
        if path.resolve() != besides.resolve() and check_checkpoint(path, say).intact
    ]
    if not intact:
        return f"No intact checkpoint in {root}: checkpoint.resume=none starts over."
    listed = "\n  ".join(str(path) for path in intact)
    return f"Intact checkpoints (checkpoint.resume=PATH to resume from one):\n  {listed}"


def check_checkpoint(path: Path, say: Callable[[str], None]) -> Verdict:
    """Collective. The checkpoint's files against its manifest (every rank hashing a share); one
    written before manifests gets the checks that need none (`_problems_without_manifest`) and a
    warning that it loads unverified."""
    verdict = verify_manifest(path)
    if verdict.has_manifest:
        if verdict.intact:
            size = format_bytes(verdict.total_bytes)
            say(f"checked {path} against its {MANIFEST} ({size} in {verdict.seconds:.1f} s)")
        return verdict
    problems = from_main(_problems_without_manifest(path) if rank() == 0 else None)
    if not problems:
        say(f"WARNING: {path} has no {MANIFEST} (saved by an older version): loading it unverified")
    return Verdict(problems, has_manifest=False)


def _problems_without_manifest(path: Path) -> list[str]:
    """What can be checked without checksums: a readable trainer_state.json whose step matches the
    directory's name, every rank's rank_XXXXX.pt, and no sign that a manifest was written."""
    try:
        state = read_trainer_state(path)
    except CheckpointError as error:
        return [str(error)]
    state_file = path / TRAINER_STATE
    if not isinstance(state, dict) or not isinstance(state.get("step"), int):
        return [f"{state_file}: holds no step"]
    problems = []
    if state.get("manifest"):
        problems.append(f"{path / MANIFEST}: missing ({TRAINER_STATE} says it was written)")
    match = STEP_DIR.match(path.name)
    if match and int(match.group(1)) != state["step"]:
        problems.append(f"{state_file}: says step {state['step']}, but the directory is {path.name}")
    ranks = state.get("world_size")
    for number in range(ranks if isinstance(ranks, int) else 0):
        if not (path / rank_file_name(number)).is_file():
            problems.append(
                f"{path / rank_file_name(number)}: missing (rank {number}'s data-loader and RNG state)"
            )
    return problems


def refuse_past_max_steps(path: Path, step: int, max_steps: int) -> None:
    """A checkpoint past trainer.max_steps is refused: training on would mean negative steps, and
    calling it done would hide a config that does not fit the run (at max_steps exactly, the run is
    done and trains nothing)."""
    if step > max_steps:
        raise CheckpointError(
            f"{path} is at step {step}, past trainer.max_steps={max_steps}: nothing to train. To continue "
            f"it set trainer.max_steps above {step}; to rewind, checkpoint.resume=PATH of an earlier step_N; "
            "to start over, checkpoint.resume=none"
        )


def rank_file_name(rank: int) -> str:
    return f"rank_{rank:05d}.pt"


def model_config_of(checkpoint: Path):
    """The model settings of the run that wrote `checkpoint` (its config.yaml; a universal checkpoint
    reads the one of the step_N directory it was converted from)."""
    from omegaconf import OmegaConf

    from model.config import ModelConfig

    source = checkpoint.parent / checkpoint.name.removesuffix("_universal")
    for candidate in (checkpoint / "config.yaml", source / "config.yaml"):
        if candidate.exists():
            saved = OmegaConf.load(candidate).model
            return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(ModelConfig), saved))
    raise FileNotFoundError(f"no config.yaml in {checkpoint} (or its step_N directory)")


def refuse_another_model(path: Path, model) -> None:
    """A checkpoint whose model has other tensors than this run's (another width, expert count,
    layer count...) is refused before anything is loaded: such a load fails on every checkpoint of
    the run, and auto-resume would take the failure for damage and fall back past intact ones.
    Settings that change no tensor (rope_theta, say) may differ."""
    from model.config import differing_settings
    from model.tensor_files import model_shapes

    try:
        saved = model_config_of(path)
    except FileNotFoundError:
        return  # nothing to compare with: the load itself names what does not fit
    if model_shapes(saved) == model_shapes(model):
        return
    raise CheckpointError(
        f"{path} holds another model than this run's ({'; '.join(differing_settings(saved, model))}): "
        "resume it with the model settings it was saved with; a new model trains in another run.dir"
    )


def check_initial_weights(directory: Path, model) -> None:
    """checkpoint.init_from, before anything is built: a directory of weights (from-hf's output or a
    hub download) for this run's model; CheckpointError naming the setting otherwise."""
    from model.hf import WeightFiles
    from parallel.build import check_same_model

    try:
        check_same_model(WeightFiles(directory).model_config(), model, directory)
    except (OSError, ValueError) as error:
        text = str(error)
        raise CheckpointError(
            text if "checkpoint.init_from" in text else f"checkpoint.init_from: {text}"
        ) from None


def read_trainer_state(path: Path) -> dict:
    file = path / TRAINER_STATE
    try:
        return json.loads(file.read_bytes())
    except (OSError, ValueError) as error:  # ValueError: also the UnicodeDecodeError of garbled bytes
        raise CheckpointError(f"{file}: unreadable ({describe(error)})") from None


def _barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def rng_state() -> dict[str, torch.Tensor | list[torch.Tensor]]:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(
    engine,
    run_dir: str | os.PathLike,
    step: int,
    trainer_state: dict,
    rank_state: dict,
    config_yaml: str,
    keep: int,
    size_hint: int | None = None,
) -> Path:
    """Write checkpoint `step_N` collectively (every rank calls this); returns its final path.

    A failure on any rank leaves the complete checkpoints as they were, removes the staging
    directory and raises on every rank: OutOfSpaceError for a full disk (naming the filesystem and
    about how much a checkpoint needs: the newest one's size, else `size_hint` bytes), else
    CheckpointError."""
    root = checkpoint_root(run_dir)
    final = root / step_tag(step)
    staging = root / STAGING / final.name
    main = rank() == 0
    trainer_state = {**trainer_state, "manifest": MANIFEST}  # its absence later means damage
    try:
        on_every_rank(lambda: _empty_staging(root, staging) if main else None)
        on_every_rank(lambda: _save_engine_state(engine, staging))
        on_every_rank(
            lambda: _write_our_files(staging, rank_state, trainer_state if main else None, config_yaml)
        )
        write_manifest(staging)
        on_every_rank(lambda: _publish(staging, final) if main else None)
    except CollectiveFailure as failure:
        if main:
            shutil.rmtree(root / STAGING, ignore_errors=True)
        # rank 0 words it, once the staging directory is gone: every rank reads the same free space
        raise from_main(_save_failed(failure, step, final, size_hint) if main else None) from None
    if main:
        _remove_old_checkpoints(root, step, keep)
    _barrier()
    return final


def _empty_staging(root: Path, staging: Path) -> None:
    shutil.rmtree(root / STAGING, ignore_errors=True)  # what a crashed save left
    staging.mkdir(parents=True, exist_ok=True)


def _save_engine_state(engine, staging: Path) -> None:
    try:
        engine.save_checkpoint(str(staging.parent), tag=staging.name)
    except Exception:
        # DeepSpeed's save ends in a barrier (0.19.8), where the ranks whose writes succeeded now
        # wait: meet them there, so that all reach the all-gather that reports this failure
        _barrier()
        raise


def _write_our_files(staging: Path, rank_state: dict, trainer_state: dict | None, config_yaml: str) -> None:
    """This rank's rank_XXXXX.pt; on the main rank (given `trainer_state`) also config.yaml and
    trainer_state.json."""
    torch.save(rank_state, staging / rank_file_name(rank()))
    if trainer_state is not None:
        (staging / "config.yaml").write_text(config_yaml)
        write_atomically(staging / TRAINER_STATE, json.dumps(trainer_state, indent=2).encode())


def _publish(staging: Path, final: Path) -> None:
    """Main rank: the staged checkpoint becomes `final` in one rename."""
    _fsync_tree(staging)
    remove_checkpoint(final)  # the same step saved before
    remove_checkpoint(universal_path(final))  # converted from what was there before
    os.replace(staging, final)
    _fsync_dir(final.parent)
    shutil.rmtree(staging.parent, ignore_errors=True)  # also DeepSpeed's zero_to_fp32.py copies


def _remove_old_checkpoints(root: Path, step: int, keep: int) -> None:
    """Main rank: all but the newest `keep` complete checkpoints up to `step` (never the new one's
    successors, which a rewind already set aside). A failure here only warns: the new checkpoint is in
    place, and the next save tries again."""
    earlier = [path for s, path in complete_checkpoints(root) if s <= step]
    for old in earlier[:-keep] if keep > 0 else []:
        try:
            remove_checkpoint(old)
            remove_checkpoint(universal_path(old))
        except OSError as error:
            print(
                f"pretrain: WARNING: could not remove the old checkpoint {old}: {describe(error)}", flush=True
            )


def _save_failed(failure: CollectiveFailure, step: int, final: Path, size_hint: int | None) -> Exception:
    """The error every rank raises for a failed save (after the staging directory went), as rank 0
    words it: the free space it names, and whether the disk is deemed full, are read on one rank."""
    try:
        return _describe_save_failure(failure, step, final, size_hint)
    except Exception as error:  # rank 0 must still answer: the other ranks wait for its word
        return CheckpointError(f"could not save step {step} to {final} ({failure}; then {describe(error)})")


def _describe_save_failure(
    failure: CollectiveFailure, step: int, final: Path, size_hint: int | None
) -> Exception:
    root = final.parent
    kept = complete_checkpoints(root)
    kept_text = f"the previous checkpoint {kept[-1][1]} is kept" if kept else "no earlier checkpoint exists"
    needed = manifest_bytes(kept[-1][1]) if kept else None
    needed = needed or size_hint
    kinds = {f.out_of_space for f in failure.failures}
    # torch's zip writer loses the errno: a full disk when there is not room for a checkpoint now
    if "enospc" in kinds or ("writer" in kinds and needed and free_bytes(root) < needed):
        doing = f"saving step {step} to {final}"
        return OutOfSpaceError(
            f"{out_of_space_message(root, doing, needed)}. The staging directory was removed and "
            f"{kept_text}: free some space, then rerun the same command to resume"
        )
    return CheckpointError(f"could not save step {step} to {final} ({failure}); {kept_text}")


def remove_checkpoint(path: Path) -> None:
    """Delete a checkpoint directory (if there), renaming it into checkpoints/.trash/ first: a kill
    during the deletion leaves only trash, which `sweep_leftovers` clears, never a half-deleted
    step_N that still has its trainer_state.json (complete-looking) or an empty one."""
    if not path.exists():
        return
    trash = path.parent / TRASH
    trash.mkdir(exist_ok=True)
    doomed = trash / f"{path.name}.{time.time_ns()}"
    os.replace(path, doomed)
    shutil.rmtree(doomed, ignore_errors=True)
    with contextlib.suppress(OSError):  # left when not empty: something else is being removed
        trash.rmdir()


def sweep_leftovers(root: Path) -> list[str]:
    """Main rank, as a run starts (no save or conversion under way): clear what interrupted saves and
    removals left under `root`, the staging directory and the trash. A `step_N` with neither
    trainer_state.json nor manifest.json (left by an interrupted removal of an older version) is
    removed when empty and otherwise set aside in checkpoints/.abandoned/, never deleted: it might
    hold data. Returns a line for each thing done."""
    done = []
    for leftover in (root / STAGING, root / TRASH):
        if leftover.exists():
            shutil.rmtree(leftover, ignore_errors=True)
            done.append(f"removed {leftover}")
    incomplete = [path for path in _step_dirs(root) if not published(path)]
    for path in incomplete:
        if not any(path.iterdir()):
            path.rmdir()
            done.append(f"removed the empty {path}")
        else:
            aside = root / ABANDONED / f"incomplete-{time.strftime('%Y%m%d-%H%M%S')}"
            aside.mkdir(parents=True, exist_ok=True)
            os.replace(path, aside / path.name)
            done.append(f"moved the incomplete {path} (no {TRAINER_STATE}, no {MANIFEST}) to {aside}")
    return done


def _step_dirs(root: Path) -> list[Path]:
    if not root.is_dir():
        return []
    return sorted(entry for entry in root.iterdir() if STEP_DIR.match(entry.name) and entry.is_dir())


def needs_universal(path: Path, saved: dict | None, partitioning: dict) -> bool:
    """Whether the checkpoint at `path`, saved partitioned as `saved` (its trainer state's
    "partitioning"), must be read in universal form for a run partitioned as `partitioning` (world
    size, tensor and expert parallel sizes, ZeRO stage). Without ZeRO on both sides the native files
    fit any world size; between ZeRO 0 and ZeRO 1-2 no form fits (ZeRO 0 writes no optimizer
    partitions), which raises."""
    if saved == partitioning:
        return False
    if saved is not None and (saved.get("zero_stage") == 0) != (partitioning["zero_stage"] == 0):
        raise ValueError(
            f"{path} was saved with parallel.zero_stage={saved.get('zero_stage')}; switching between ZeRO 0 "
            f"and ZeRO 1-2 across a resume is not supported: resume with parallel.zero_stage="
            f"{saved.get('zero_stage')}"
        )
    if saved is not None and saved.get("zero_stage") == 0:
        ignore_world = {key: value for key, value in saved.items() if key != "world"}
        return ignore_world != {key: value for key, value in partitioning.items() if key != "world"}
    return True


def universal_path(path: Path) -> Path:
    return path.parent / f"{path.name}_universal"


def convert_to_universal(path: Path, poll_seconds: float = 5.0) -> Path:
    """DeepSpeed's universal checkpoint of `path` (ds_to_universal), next to it as step_N_universal,
    made once per saved step_N (its `source` file names that save), atomically, by rank 0. The other
    ranks poll for the result instead of waiting in a collective, whose timeout a large model's
    conversion would outlast."""
    target = universal_path(path)
    identity = read_trainer_state(path).get("saved_at", "")
    failed = path.parent / f".{target.name}.failed"
    # rank 0 alone looks: another rank reading `source` while rank 0 deletes a stale one would fail
    # alone, before the barrier
    converted = rank() == 0 and (target / "source").is_file() and (target / "source").read_text() == identity
    if rank() == 0 and not converted:
        shutil.rmtree(target, ignore_errors=True)
        failed.unlink(missing_ok=True)
    _barrier()  # below, no rank sees a stale conversion or an earlier attempt's failure
    if rank() == 0:
        if not converted:
            try:
                _run_ds_to_universal(path, target, identity)
            except Exception as error:
                failed.write_text(str(error))
                raise
    else:
        while not target.exists():
            if failed.exists():
                raise CheckpointError(f"rank 0 failed to convert {path}: {failed.read_text()[-2000:]}")
            time.sleep(poll_seconds)
    _barrier()
    return target


def _run_ds_to_universal(path: Path, target: Path, identity: str) -> None:
    """DeepSpeed's ds_to_universal, in a subprocess, through train.safe_load: it unpickles every file
    with weights_only=True (DeepSpeed's own entry point would not)."""
    staging = path.parent / STAGING / target.name
    shutil.rmtree(staging, ignore_errors=True)
    staging.parent.mkdir(parents=True, exist_ok=True)
    workers = str(max(1, min(8, (os.cpu_count() or 1) // 2)))
    command = [sys.executable, "-m", "train.safe_load", "ds_to_universal", "--input_folder", str(path)]
    command += [
        "--output_folder",
        str(staging),
        "--num_extract_workers",
        workers,
        "--num_merge_workers",
        workers,
    ]
    result = subprocess.run(command, capture_output=True, text=True, env=_with_this_repo_importable())
    if result.returncode == REFUSED:  # its last line names the file
        refusal = result.stderr.strip().splitlines()[-1]
        raise CheckpointUnpicklingError(f"converting {path} to a universal checkpoint: {refusal}")
    if result.returncode != 0:
        raise RuntimeError(
            f"converting {path} to a universal checkpoint failed ({' '.join(command)}):\n"
            f"{result.stdout[-2000:]}{result.stderr[-3000:]}"
        )
    (staging / "source").write_text(identity)
    os.replace(staging, target)
    _fsync_dir(path.parent)


def _with_this_repo_importable() -> dict[str, str]:
    """The environment, with this repository first on PYTHONPATH (for `-m train.safe_load`)."""
    repo = str(Path(__file__).resolve().parents[1])
    return dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [repo, os.environ.get("PYTHONPATH")])))


def load_checkpoint(engine, path: Path, universal: bool = False) -> tuple[dict, list[dict]]:
    """Load weights and optimizer state into `engine`; returns the trainer state and every rank's
    rank state (all of them: a data-loader state is merged across ranks to allow new layouts).

    universal: read `convert_to_universal(path)` instead of the native files (the engine must have
    been built with DeepSpeed's `checkpoint.load_universal`); any world size, expert-parallel size
    or ZeRO stage. DeepSpeed reads the universal files with torch.load itself: restricted here too.
    """
    source = universal_path(path) if universal else path
    with restricted_torch_load():
        loaded = engine.load_checkpoint(str(source.parent), tag=source.name, read=load_file)
    if not loaded:
        raise RuntimeError(f"DeepSpeed could not load the checkpoint {path}")
    rank_files = sorted(path.glob("rank_*.pt"))
    rank_states = [load_file(f, map_location="cpu") for f in rank_files]
    for file, state in zip(rank_files, rank_states, strict=True):
        if not isinstance(state, dict) or not {"loader", "rng"} <= state.keys():
            raise ValueError(f"{file}: holds no data-loader and RNG state")
    trainer_state = read_trainer_state(path)
    if not isinstance(trainer_state.get("tokens"), int):
        raise ValueError(f"{path / TRAINER_STATE}: holds no token count")
    return trainer_state, rank_states


def load_on_every_rank(engine, path: Path, universal: bool = False) -> tuple[dict, list[dict]]:
    """`load_checkpoint` on every rank (collectively); a failure on any rank is raised on all of them
    as CheckpointLoadError naming the file it was reading."""
    try:
        return on_every_rank(lambda: _load_naming_the_file(engine, path, universal))
    except CollectiveFailure as failure:
        raise CheckpointLoadError(f"could not load the checkpoint {path}: {failure}") from None


def _load_naming_the_file(engine, path: Path, universal: bool) -> tuple[dict, list[dict]]:
    try:
        return load_checkpoint(engine, path, universal=universal)
    except Exception as error:
        file = _file_being_read(error)
        named = (
            error if file is None or file in str(error) else CheckpointLoadError(f"{file}: {describe(error)}")
        )
        # said at once, by this rank: a file only this rank reads (its ZeRO partition) fails here
        # while the others may wait inside DeepSpeed's load, which the agreement cannot end
        print(
            f"pretrain: rank {rank()}: could not load {path}: {describe(named)}", file=sys.stderr, flush=True
        )
        if named is error:
            raise
        raise named from error


def _file_being_read(error: BaseException) -> str | None:
    """The checkpoint file a failed load was reading. torch's and DeepSpeed's errors often do not say
    ("failed finding central directory", a bare AssertionError), but a frame of the traceback holds
    it: torch.load's `f`, DeepSpeed's `load_path` or `ckpt_name`. The innermost one wins."""
    found = None
    frame = error.__traceback__
    while frame is not None:
        for name in ("f", "load_path", "ckpt_name", "ckpt_file", "path"):
            value = frame.tb_frame.f_locals.get(name)
            if isinstance(value, (str, os.PathLike)) and str(value).endswith(".pt"):
                found = os.fspath(value)
        frame = frame.tb_next
    return found


def _fsync_tree(path: Path) -> None:
    for file in path.rglob("*"):
        if file.is_file():
            with open(file, "rb") as handle:
                os.fsync(handle.fileno())
    _fsync_dir(path)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
