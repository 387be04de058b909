"""Checksums of checkpoints, computed and checked by all ranks together, and failures all ranks agree on.

`manifest.json` in a checkpoint directory maps every file's path (relative to the directory) to its
size and sha256. `write_manifest` writes it into the staging directory before the rename that
publishes the checkpoint, so a published checkpoint always has one; `verify_manifest` checks the
files against it before anything is loaded: flipped bytes, a truncated or deleted file, a rewritten
trainer_state.json are found and named, instead of loading silently or failing somewhere inside
torch or DeepSpeed without a file name.

Scale: the real model's checkpoint is about 1 TB over 64 ranks. The files sit on a shared
filesystem, so the work is split: rank 0 lists the files, every rank hashes a disjoint share of
them (balanced by size, `share_of`), and the results are gathered to every rank, so that all reach
the same verdict; about 16 GB a rank instead of 1 TB on one.

Collectives and failures: a rank that fails between two collectives (a full disk, an unreadable
file) must not leave the others waiting in the next one. `on_every_rank(action)` runs the action,
then all-gathers whether it failed anywhere, and every rank raises the same `CollectiveFailure`.
Without torch.distributed initialised everything runs as a world of one.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import torch.distributed as dist

from data.shards import sha256_of, write_atomically
from train.disk_space import OutOfSpaceError, out_of_space_kind

MANIFEST = "manifest.json"
MANIFEST_VERSION = 1
READ_CHUNK = 16 << 20  # bytes read at a time while hashing (sha256 releases the GIL on large chunks)

T = TypeVar("T")


class CheckpointError(RuntimeError):
    """A checkpoint cannot be saved, chosen or loaded; the message names the files and what to do."""


# -- collectives -------------------------------------------------------------------------------


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def all_gather(value: Any) -> list[Any]:
    """Every rank's `value` (picklable), by rank, on every rank."""
    if world_size() == 1:
        return [value]
    gathered = [None] * world_size()
    dist.all_gather_object(gathered, value)
    return gathered


def from_main(value: T) -> T:
    """Rank 0's `value`, on every rank."""
    return all_gather(value)[0]


@dataclass(frozen=True)
class RankFailure:
    rank: int
    error: str  # as `describe` says it
    out_of_space: str | None  # disk_space.out_of_space_kind of the error


class CollectiveFailure(Exception):
    """An action failed on one rank or more; raised on every rank alike."""

    def __init__(self, failures: list[RankFailure]):
        self.failures = failures
        ranks_by_error: dict[str, list[int]] = {}
        for failure in failures:  # usually every rank failed alike: said once
            ranks_by_error.setdefault(failure.error, []).append(failure.rank)
        super().__init__(
            "; ".join(
                f"{'rank' if len(ranks) == 1 else 'ranks'} {', '.join(map(str, ranks))}: {error}"
                for error, ranks in ranks_by_error.items()
            )
        )


def on_every_rank(action: Callable[[], T]) -> T:
    """`action()` on this rank; then every rank learns whether it failed on any (one all-gather) and,
    if so, all raise the same CollectiveFailure: no rank is left waiting in a later collective."""
    failure = None
    try:
        result = action()
    except Exception as error:
        result = None
        failure = RankFailure(rank(), describe(error), out_of_space_kind(error))
    failures = [f for f in all_gather(failure) if f is not None]
    if failures:
        raise CollectiveFailure(failures)
    return result


def describe(error: BaseException) -> str:
    """An error in one line or a few: our own errors' messages say everything, others get their type
    (a bare AssertionError has no message at all)."""
    text = str(error).strip()
    if isinstance(error, CheckpointError | OutOfSpaceError) and text:
        return text
    return f"{type(error).__name__}: {text or '(no message)'}"


# -- hashing -----------------------------------------------------------------------------------


def file_digest(path: Path) -> tuple[int, str]:
    """(size in bytes, sha256 hex digest) of a file."""
    return path.stat().st_size, sha256_of(path, READ_CHUNK)


def share_of(sizes: dict[str, int], of_rank: int, world: int) -> list[str]:
    """The files rank `of_rank` of `world` hashes: largest first, each to the rank with the fewest
    bytes so far (ties to the lower rank), so the shares are disjoint, cover every file and take
    about the same time. Every rank computes the same split from the same listing."""
    loads = [0] * world
    shares: list[list[str]] = [[] for _ in range(world)]
    for name in sorted(sizes, key=lambda n: (-sizes[n], n)):
        lightest = min(range(world), key=lambda r: (loads[r], r))
        shares[lightest].append(name)
        loads[lightest] += sizes[name]
    return shares[of_rank]


def _file_sizes(directory: Path) -> dict[str, int]:
    """Every file under `directory` but the manifest, by path relative to it."""
    return {
        file.relative_to(directory).as_posix(): file.stat().st_size
        for file in sorted(directory.rglob("*"))
        if file.is_file() and file.name != MANIFEST
    }


# -- writing -----------------------------------------------------------------------------------


def write_manifest(directory: Path) -> dict[str, dict]:
    """Collective: hash every file of `directory` (each rank its share) and write `manifest.json`
    there (rank 0). Call it after every rank's files are written; returns the entries."""
    sizes = from_main(on_every_rank(lambda: _file_sizes(directory) if rank() == 0 else None))
    mine = on_every_rank(lambda: _hash_files(directory, share_of(sizes, rank(), world_size())))
    entries = {name: entry for share in all_gather(mine) for name, entry in share.items()}
    document = {"version": MANIFEST_VERSION, "files": dict(sorted(entries.items()))}
    text = json.dumps(document, indent=1) + "\n"
    on_every_rank(lambda: write_atomically(directory / MANIFEST, text.encode()) if rank() == 0 else None)
    return entries


def _hash_files(directory: Path, names: list[str]) -> dict[str, dict]:
    entries = {}
    for name in names:
        size, sha256 = file_digest(directory / name)
        entries[name] = {"size": size, "sha256": sha256}
    return entries


# -- checking ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Verdict:
    """What `verify_manifest` found: `problems` names each damaged file (empty: intact);
    `has_manifest` False for a checkpoint written before manifests (nothing could be checked)."""

    problems: list[str]
    has_manifest: bool
    total_bytes: int = 0
    seconds: float = 0.0

    @property
    def intact(self) -> bool:
        return not self.problems


def read_manifest(directory: Path) -> dict[str, dict] | None:
    """The manifest's entries; None where there is none; ValueError naming it where unreadable."""
    path = directory / MANIFEST
    if not path.exists():
        return None
    try:
        files = json.loads(path.read_bytes())["files"]
        return {str(name): {"size": int(e["size"]), "sha256": str(e["sha256"])} for name, e in files.items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as error:
        raise ValueError(f"{path}: unreadable ({describe(error)})") from None


def verify_manifest(directory: Path, only: Callable[[str], bool] | None = None) -> Verdict:
    """Collective: check every file listed in `directory`'s manifest (each rank its share), or those
    whose names `only` accepts; every rank returns the same verdict."""
    started = time.perf_counter()
    try:
        manifest = read_manifest(directory) if rank() == 0 else None
        unreadable = None
    except ValueError as error:
        manifest, unreadable = None, str(error)
    manifest, unreadable = from_main((manifest, unreadable))
    if unreadable:
        return Verdict([unreadable], has_manifest=True)
    if manifest is None:
        return Verdict([], has_manifest=False)
    sizes = {name: entry["size"] for name, entry in manifest.items() if only is None or only(name)}
    share = share_of(sizes, rank(), world_size())
    mine = [problem for name in share if (problem := _check_file(directory, name, manifest[name]))]
    problems = sorted(problem for found in all_gather(mine) for problem in found)
    return Verdict(problems, True, sum(sizes.values()), time.perf_counter() - started)


def _check_file(directory: Path, name: str, expected: dict) -> str | None:
    """What is wrong with one file, or None; never raises (every rank must reach the all-gather)."""
    path = directory / name
    try:
        size = path.stat().st_size
        if size != expected["size"]:
            return f"{path}: {size} bytes, {MANIFEST} says {expected['size']} (truncated or rewritten)"
        if file_digest(path)[1] != expected["sha256"]:
            return f"{path}: its sha256 differs from {MANIFEST}'s (changed bytes)"
    except FileNotFoundError:
        return f"{path}: missing (listed in {MANIFEST})"
    except OSError as error:
        return f"{path}: unreadable ({describe(error)})"
    return None


def manifest_bytes(directory: Path) -> int | None:
    """The total size of the files a checkpoint's manifest lists (None without a readable one)."""
    try:
        manifest = read_manifest(directory)
    except ValueError:
        return None
    return None if manifest is None else sum(entry["size"] for entry in manifest.values())
