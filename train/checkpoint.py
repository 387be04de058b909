"""Checkpoints of a run: atomic directories `run.dir/checkpoints/step_N/`, safe to load, resumable.

A checkpoint holds DeepSpeed's files (module weights, the ZeRO-partitioned optimizer state, the
engine's counters) and ours: `trainer_state.json` (step, tokens seen, bad-step counters),
`config.yaml` (the resolved config) and one `rank_XXXXX.pt` per rank (its data-loader state and RNG
states). The LR schedule is a function of the step, so the step is its whole state.

Atomicity: every rank writes into `checkpoints/.staging/step_N/`; after a barrier rank 0 adds
`trainer_state.json` and renames the directory to `checkpoints/step_N` in one `os.replace`, so a
`step_N` directory is complete by construction and a crash leaves at most a staging directory,
which the next save clears. `keep` bounds the complete checkpoints kept (oldest removed first, only
after the new one is in place).

Another layout (world size, expert-parallel size, ZeRO stage) resumes through DeepSpeed's universal
checkpoint: `convert_to_universal` runs `ds_to_universal` once into `step_N_universal/`, which any
layout loads. Loading never unpickles arbitrary objects: DeepSpeed's files are read with
`torch.load(weights_only=True)` (`safe_checkpoint_engine`), with the few DeepSpeed classes
its state holds allow-listed by name; our own files hold only tensors and plain containers.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

from data.shards import write_atomically

CHECKPOINTS = "checkpoints"
STAGING = ".staging"
STEP_DIR = re.compile(r"^step_(\d+)$")
TRAINER_STATE = "trainer_state.json"


def checkpoint_root(run_dir: str | os.PathLike) -> Path:
    return Path(run_dir) / CHECKPOINTS


def step_tag(step: int) -> str:
    return f"step_{step}"


def complete_checkpoints(root: Path) -> list[tuple[int, Path]]:
    """(step, path) of every complete checkpoint under `root`, oldest first."""
    if not root.is_dir():
        return []
    found = []
    for entry in root.iterdir():
        match = STEP_DIR.match(entry.name)
        if match and (entry / TRAINER_STATE).is_file():
            found.append((int(match.group(1)), entry))
    return sorted(found)


def resolve_resume(resume: str, run_dir: str | os.PathLike) -> Path | None:
    """The checkpoint directory `checkpoint.resume` asks for: auto (latest complete one under
    run.dir, or none), none, or a path to a `step_N` directory."""
    if resume == "none":
        return None
    if resume == "auto":
        found = complete_checkpoints(checkpoint_root(run_dir))
        return found[-1][1] if found else None
    path = Path(resume)
    if not (path / TRAINER_STATE).is_file():
        raise ValueError(
            f"checkpoint.resume={resume!r} is not a complete checkpoint directory "
            f"(expected {path / TRAINER_STATE}); use auto, none or a run.dir/checkpoints/step_N path"
        )
    return path


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


def read_trainer_state(path: Path) -> dict:
    return json.loads((path / TRAINER_STATE).read_text())


def _barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def _rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


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
) -> Path:
    """Write checkpoint `step_N` collectively (every rank calls this); returns its final path."""
    root = checkpoint_root(run_dir)
    tag = step_tag(step)
    final = root / tag
    staging = root / STAGING
    if _rank() == 0:
        shutil.rmtree(staging, ignore_errors=True)  # what a crashed save left
        (staging / tag).mkdir(parents=True, exist_ok=True)
    _barrier()
    engine.save_checkpoint(str(staging), tag=tag, save_latest=False)
    torch.save(rank_state, staging / tag / f"rank_{_rank():05d}.pt")
    _barrier()
    if _rank() == 0:
        (staging / tag / "config.yaml").write_text(config_yaml)
        write_atomically(staging / tag / TRAINER_STATE, json.dumps(trainer_state, indent=2).encode())
        _fsync_tree(staging / tag)
        if final.exists():  # the same step saved again (e.g. a stop right after a periodic save)
            shutil.rmtree(final)
        shutil.rmtree(universal_path(final), ignore_errors=True)  # converted from what was there before
        os.replace(staging / tag, final)
        _fsync_dir(root)
        shutil.rmtree(staging, ignore_errors=True)  # also DeepSpeed's zero_to_fp32.py copies
        earlier = [(s, path) for s, path in complete_checkpoints(root) if s <= step]  # never the new one
        for _, old in earlier[:-keep] if keep > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
            shutil.rmtree(universal_path(old), ignore_errors=True)
    _barrier()
    return final


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
    if _rank() == 0:
        if not (target / "source").is_file() or (target / "source").read_text() != identity:
            shutil.rmtree(target, ignore_errors=True)
            failed.unlink(missing_ok=True)
            try:
                _run_ds_to_universal(path, target, identity)
            except Exception as error:
                failed.write_text(str(error))
                raise
    else:
        while not target.exists():
            if failed.exists():
                raise RuntimeError(f"rank 0 failed to convert {path}: {failed.read_text()[-2000:]}")
            time.sleep(poll_seconds)
    _barrier()
    return target


def _run_ds_to_universal(path: Path, target: Path, identity: str) -> None:
    staging = path.parent / STAGING / target.name
    shutil.rmtree(staging, ignore_errors=True)
    staging.parent.mkdir(parents=True, exist_ok=True)
    workers = str(max(1, min(8, (os.cpu_count() or 1) // 2)))
    command = [sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder", str(path)]
    command += [
        "--output_folder",
        str(staging),
        "--num_extract_workers",
        workers,
        "--num_merge_workers",
        workers,
    ]
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(
            f"converting {path} to a universal checkpoint failed ({' '.join(command)}):\n"
            f"{result.stdout[-2000:]}{result.stderr[-3000:]}"
        )
    (staging / "source").write_text(identity)
    os.replace(staging, target)
    _fsync_dir(path.parent)


def load_checkpoint(engine, path: Path, universal: bool = False) -> tuple[dict, list[dict]]:
    """Load weights and optimizer state into `engine`; returns the trainer state and every rank's
    rank state (all of them: a data-loader state is merged across ranks to allow new layouts).

    universal: read `convert_to_universal(path)` instead of the native files (the engine must have
    been built with DeepSpeed's `checkpoint.load_universal`); any world size, expert-parallel size
    or ZeRO stage. DeepSpeed reads the universal files itself, with its own torch.load settings.
    """
    engine.checkpoint_engine = safe_checkpoint_engine()
    source = universal_path(path) if universal else path
    load_path, _ = engine.load_checkpoint(
        str(source.parent), tag=source.name, load_optimizer_states=True, load_lr_scheduler_states=False
    )
    if load_path is None:
        raise RuntimeError(f"DeepSpeed could not load the checkpoint {path}")
    rank_files = sorted(path.glob("rank_*.pt"))
    rank_states = [torch.load(f, map_location="cpu", weights_only=True) for f in rank_files]
    return read_trainer_state(path), rank_states


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


def _deepspeed_safe_globals() -> list:
    """The DeepSpeed classes its checkpoint state pickles (by class, never arbitrary code)."""
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, ZeroStageEnum, fragment_address]


def safe_checkpoint_engine():
    """DeepSpeed's torch checkpoint engine, loading with weights_only=True (built on first use so
    that importing this module does not import deepspeed)."""
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

    class SafeTorchCheckpointEngine(TorchCheckpointEngine):
        def load(self, path: str, map_location=None):
            with torch.serialization.safe_globals(_deepspeed_safe_globals()):
                return torch.load(path, map_location=map_location, weights_only=True)

    engine = SafeTorchCheckpointEngine()
    # without a DeepSpeed config the engine would save the legacy (non-zip) format, which cannot be
    # memory-mapped: checkpoints saved after a resume must stay readable lazily (convert_hf.py to-hf)
    engine.zipfile_serialization = True
    return engine
