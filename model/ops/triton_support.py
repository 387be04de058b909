"""How the project's own Triton kernels are built, and which tensors they take.

Each kernel module in model/ops builds its kernels in one function decorated by `triton_kernels`,
which imports Triton, hands it over and keeps what the function returns; where Triton cannot be
imported the decorated function returns None and the module's torch reference runs instead.

The kernels take contiguous CUDA tensors. Under Triton's interpreter (`TRITON_INTERPRET=1` in the
environment from the process's start: Triton reads it as it imports its own library of kernel
functions) they take CPU tensors too: Triton then runs each program as numpy code on the host,
slowly but with the kernel's own arithmetic, so that tests/unit/test_triton_interpreted.py holds
every kernel to its reference on a machine without a GPU.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from typing import Any

import torch

# Compile options every kernel of ours launches with. FMA contraction is pinned on: Triton's default
# until 3.9 (3.10 turns it off), what the GPU tests' tolerances were measured with, and what nvcc
# does for torch's own CUDA kernels, whose fused AdamW arithmetic model/ops/adamw.py keeps.
# (TRITON_FORCE_DISABLE_FP_FUSION=1 in the environment still turns it off.)
LAUNCH_OPTIONS = {"enable_fp_fusion": True}


@functools.cache
def interpreting() -> bool:
    """Whether Triton's interpreter is on in this process (read once, with Triton's spellings)."""
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "yes", "on", "y")


def triton_kernels(build: Callable[[Any, Any], Any]) -> Callable[[], Any]:
    """Decorator: `build(triton, triton.language)` defines a module's kernels and returns them; the
    decorated function takes no argument and returns that, built on first use, or None where Triton
    is not importable."""

    @functools.cache
    def kernels():
        try:
            import triton
            import triton.language as tl
        except ImportError:
            return None
        return build(triton, tl)

    kernels.__doc__ = build.__doc__
    return kernels


def runs_on_triton(*tensors: torch.Tensor) -> bool:
    """Whether these tensors can go to a Triton kernel: all contiguous, and all on CUDA or, under the
    interpreter, all on the CPU."""
    if not all(t.is_contiguous() for t in tensors):
        return False
    return all(t.is_cuda for t in tensors) or (
        interpreting() and all(t.device.type == "cpu" for t in tensors)
    )
