"""How checkpoint files are unpickled: always `torch.load(weights_only=True)`, with the few DeepSpeed
classes its checkpoint state holds allow-listed by name, in our code and inside DeepSpeed's.

Why: a checkpoint file is a pickle, and unpickling it with `weights_only=False` calls whatever its
objects' `__reduce__` names (`os.system("...")`, say): loading someone's checkpoint would run their
code. DeepSpeed (checked on 0.19.8) reads files that way wherever it calls `torch.load` itself instead
of its checkpoint engine: all of `ds_to_universal` (run when a resume changes the layout) and, when a
universal checkpoint is loaded in-process, `universal_checkpoint.load_hp_checkpoint_state` and
`base_optimizer.load_hp_checkpoint_state_from_checkpoint_dir`.

- `load_file(path)`: `torch.load(weights_only=True)` with the allow-list; a refused file raises
  `CheckpointUnpicklingError`, which names it.
- `restricted_torch_load()`: while active, every call of `torch.load` goes through `load_file`,
  whatever `weights_only` it asks for. DeepSpeed 0.19.8 looks `torch.load` up on the torch module at
  each call (never `from torch import load`), so replacing that attribute reaches every one.
- DeepSpeed's own checkpoint engine reads through `load_file` (parallel/engine.py's `Engine.load_checkpoint`).
- `python -m train.safe_load ds_to_universal ARGS`: DeepSpeed's ds_to_universal with every
  `torch.load` restricted, in its worker processes too (whichever start method they use); exit
  status `REFUSED` with a one-line message naming the file when a file is refused.
"""

from __future__ import annotations

import os
import pickle
import re
import sys
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager

import torch

REFUSED = 3  # the exit status of the ds_to_universal entry point when it refuses a file
_TORCH_LOAD = torch.load  # the original, whatever restricted_torch_load puts in its place


class CheckpointUnpicklingError(pickle.UnpicklingError):
    """A checkpoint file that torch.load(weights_only=True) refuses: it pickles an object that is
    neither a tensor, a plain container nor an allow-listed DeepSpeed class."""


def deepspeed_safe_globals() -> list:
    """The DeepSpeed classes its checkpoint state pickles (data holders, rebuilt by class: never
    arbitrary code). Imported on first use so that importing this module does not import deepspeed."""
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, ZeroStageEnum, fragment_address]


def _allow_deepspeed_classes() -> None:
    # process-wide (a set union, idempotent) rather than torch's `safe_globals` context: that
    # context's exit removes the classes from one global, not per-thread, set, under the feet of any
    # nested or concurrent load still using them
    torch.serialization.add_safe_globals(deepspeed_safe_globals())


def load_file(f, map_location=None, *, mmap: bool | None = None, **pickle_load_args):
    """`torch.load(f, weights_only=True)` with DeepSpeed's classes allowed; a refusal names the file."""
    _allow_deepspeed_classes()
    try:
        return _TORCH_LOAD(f, map_location=map_location, weights_only=True, mmap=mmap, **pickle_load_args)
    except pickle.UnpicklingError as error:
        raise CheckpointUnpicklingError(_refusal(f, error)) from None  # torch's advice: weights_only=False


def _refusal(f, error: pickle.UnpicklingError) -> str:
    name = os.path.abspath(f) if isinstance(f, (str, os.PathLike)) else getattr(f, "name", repr(f))
    unsafe = re.search(r"GLOBAL (\S+)", str(error))
    if unsafe:
        reason = (
            f"it pickles {unsafe.group(1)}, which is neither a tensor, a plain container nor an "
            "allow-listed DeepSpeed class (train/safe_load.py): unpickling it could run arbitrary code"
        )
    else:
        reason = _unpickler_words(error)
    return f"{name}: refused to load this checkpoint file with torch.load(weights_only=True): {reason}"


def _unpickler_words(error: pickle.UnpicklingError) -> str:
    """What the weights-only unpickler said, from torch's message, which wraps it between advice to
    load with weights_only=False (not taken here) and a link to the docs."""
    paragraphs = [" ".join(p.split()) for p in str(error).split("\n\n") if p.strip()]  # one line each
    if len(paragraphs) > 2:
        return paragraphs[-2]
    return paragraphs[-1] if paragraphs else repr(error)


def _restricted_load(f, map_location=None, pickle_module=None, *, weights_only=None, mmap=None, **kwargs):
    """`torch.load`'s signature; `weights_only` and `pickle_module` are ignored: always weights_only."""
    return load_file(f, map_location=map_location, mmap=mmap, **kwargs)


@contextmanager
def restricted_torch_load():
    """Every `torch.load` call in this process, DeepSpeed's included, loads with weights_only=True
    (`load_file`) while the context is active."""
    if torch.load is _restricted_load:  # nested, or a process restricted for good
        yield
        return
    torch.load = _restricted_load
    try:
        yield
    finally:
        torch.load = _TORCH_LOAD


def restrict_this_process() -> None:
    """`restricted_torch_load` for the rest of this process's life (a conversion, or its workers)."""
    torch.load = _restricted_load
    _allow_deepspeed_classes()
    # a backstop for a load that does not go through the attribute (a later DeepSpeed's `from torch
    # import load`, say): torch then forces weights_only=True itself; inherited by child processes
    os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = "1"


def restricted_process_pool(*args, **kwargs) -> ProcessPoolExecutor:
    """A ProcessPoolExecutor whose workers are restricted from their start. Forked workers inherit
    the parent's restriction, but spawned or forkserver ones (the default on macOS, and on Linux from
    Python 3.14) start from a fresh interpreter: the initializer restricts them before any work."""
    return ProcessPoolExecutor(*args, **kwargs, initializer=restrict_this_process)


def run_ds_to_universal(arguments: list[str]) -> None:
    """DeepSpeed's `python -m deepspeed.checkpoint.ds_to_universal ARGUMENTS`, restricted, its worker
    processes too."""
    from parallel.engine import run_ds_to_universal as run_converter

    restrict_this_process()
    run_converter(arguments, process_pool=restricted_process_pool)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] != ["ds_to_universal"]:
        print("usage: python -m train.safe_load ds_to_universal ARGS (as ds_to_universal's)", file=sys.stderr)
        return 2
    try:
        run_ds_to_universal(argv[1:])
    except CheckpointUnpicklingError as error:  # also one raised in a worker, passed back by the pool
        print(error, file=sys.stderr, flush=True)  # one line, naming the file
        return REFUSED
    return 0


if __name__ == "__main__":
    sys.exit(main())
