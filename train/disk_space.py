"""Running out of disk space, said so: which filesystem, what was being written, how much it needs.

A full filesystem surfaces in many forms: `OSError(ENOSPC)` (or EDQUOT, over a quota) from Python's
own writes, but from `torch.save` a RuntimeError whose text only says that its zip writer failed
("enforce fail at inline_container.cc ... unexpected pos", "basic_ios::clear: iostream error"), the
errno lost. `out_of_space_kind` sorts an error into these; `OutOfSpaceError` carries the message a user
can act on: "no space left on DEVICE while DOING (needs about X; Y free)".
"""

from __future__ import annotations

import errno
import os
import shutil
from pathlib import Path

# errnos of a full filesystem or an exhausted quota
OUT_OF_SPACE_ERRNOS = {errno.ENOSPC, errno.EDQUOT}
# what torch's zip writer (PyTorchStreamWriter) says when a write came up short
TORCH_WRITER_FAILURES = ("inline_container", "unexpected pos", "iostream error", "PytorchStreamWriter failed")


class OutOfSpaceError(RuntimeError):
    """A write failed for lack of disk space; the message names the filesystem and what it needs."""


def out_of_space_kind(error: BaseException) -> str | None:
    """ "enospc" when `error` (or an error it was raised from) is a full filesystem or quota,
    "writer" when it is torch's zip writer failing (a full disk, as far as anyone can tell, when
    there is little space left), None otherwise."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, OSError) and error.errno in OUT_OF_SPACE_ERRNOS:
            return "enospc"
        if isinstance(error, RuntimeError) and any(marker in str(error) for marker in TORCH_WRITER_FAILURES):
            return "writer"
        error = error.__cause__ or error.__context__
    return None


def free_bytes(path: Path) -> int:
    """Free space (for an unprivileged user) on the filesystem holding `path`, or its nearest
    existing parent."""
    return shutil.disk_usage(_existing(path)).free


def filesystem_of(path: Path) -> str:
    """The filesystem holding `path`, as a user recognises it: "/dev/nvme0n1p2 (mounted at /scratch)",
    or the mount point alone where the device cannot be read."""
    mount = _existing(path).resolve()
    while not os.path.ismount(mount) and mount != mount.parent:
        mount = mount.parent
    try:
        with open("/proc/self/mounts") as mounts:
            devices = {
                fields[1]: fields[0] for fields in (line.split() for line in mounts) if len(fields) > 1
            }
    except OSError:
        return str(mount)
    device = devices.get(str(mount))
    return f"{device} (mounted at {mount})" if device else str(mount)


def format_bytes(size: float) -> str:
    """Decimal units, as disk sizes are sold and `df -H` shows them: '350 MB', '1.2 GB', '1.05 TB'."""
    for scale, unit in ((1e12, "TB"), (1e9, "GB"), (1e6, "MB"), (1e3, "kB")):
        if size >= scale:
            value = size / scale
            return f"{value:.3g} {unit}" if value < 100 else f"{value:.0f} {unit}"
    return f"{size:.0f} B"


def out_of_space_message(path: Path, doing: str, needed: int | None) -> str:
    """'no space left on DEVICE while DOING (needs about X; Y free now)'."""
    free = format_bytes(free_bytes(path))
    need = f"needs about {format_bytes(needed)}; " if needed else ""
    return f"no space left on {filesystem_of(path)} while {doing} ({need}{free} free now)"


def _existing(path: Path) -> Path:
    path = Path(path).absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path
