"""One autotuning configuration per fla kernel, for GPU runs that check something other than speed:
the GPU tests (so that they fit a short device call) and bench/memory_phases.py.

fla's Triton kernels are `triton.autotune`d over 6 to 48 configurations each (warps x pipeline
stages x block sizes); on a fresh machine the GPU tests compiled and timed every one of them for
each head count and dtype they use, which took more than 8 minutes on an H200. The tests check
what a kernel computes, not how fast, and every listed configuration computes the same thing (only
the tiling and the order of some fp32 sums change), so for tests each autotuner keeps one:

- the fewest pipeline stages (the least shared memory: a first-listed configuration with 4 stages
  needed more than the H200's 227 KiB in one kernel),
- then the smallest tiles (the `B*` block-size arguments),
- then the number of warps nearest to 4 (what autotuning picked on an H200 for every kernel whose
  choice we recorded),
- other arguments (e.g. fla's dot precision) as in the first configuration that has those sizes.

Training and the speed benchmarks keep fla's full autotuning: `pin_autotuned_kernels` is called by
tests/gpu/conftest.py (where QWEN3NEXT_FULL_AUTOTUNE=1 turns it off, to test the configurations a
training run will pick) and by bench/memory_phases.py (what a step allocates is the same under any
configuration: fla's wrappers allocate their buffers before the launch at which autotuning picks one).
"""

from __future__ import annotations

import importlib
import os
import sys
from collections.abc import Iterable

FULL_AUTOTUNE_ENV = "QWEN3NEXT_FULL_AUTOTUNE"
# the fla modules whose kernels the model runs; model/ops/gated_delta_rule.py imports them at its first
# call, so a process that has not run the model yet must import them before it can pin their autotuners
FLA_MODULES = ("fla.ops.gated_delta_rule", "fla.modules.l2norm")


def pinning_wanted() -> bool:
    """Whether the GPU tests pin fla's autotuners: on CUDA with fla installed, unless
    QWEN3NEXT_FULL_AUTOTUNE=1. Imports fla's modules when it can, so that a `pin_autotuned_kernels`
    after it finds their autotuners."""
    import torch

    if not torch.cuda.is_available() or os.environ.get(FULL_AUTOTUNE_ENV) == "1":
        return False
    return imported(FLA_MODULES)


def imported(modules: Iterable[str]) -> bool:
    """Import `modules` (dotted names); whether all of them could be."""
    try:
        for name in modules:
            importlib.import_module(name)
    except ImportError:
        return False
    return True


def least_demanding(configs: list) -> object:
    """The configuration these tests keep, among a `triton.autotune`'s `configs`."""

    def cost(config) -> tuple:
        blocks = sum(
            value for name, value in config.kwargs.items() if name.startswith("B") and isinstance(value, int)
        )
        return (config.num_stages, blocks, abs(config.num_warps - 4), config.num_warps)

    return min(configs, key=cost)  # min is stable: ties go to the first listed


def autotuners_in(modules: Iterable[object]) -> list:
    """The `triton.runtime.autotuner.Autotuner`s defined at the top level of `modules`, also where a
    `triton.heuristics` wraps them, each once."""
    from triton.runtime.autotuner import Autotuner

    found: dict[int, Autotuner] = {}
    for module in modules:
        for value in list(vars(module).values()):
            layer, depth = value, 0
            while layer is not None and depth < 4:  # heuristics(autotune(jit(fn))) nest a few levels
                if isinstance(layer, Autotuner):
                    found[id(layer)] = layer
                    break
                layer, depth = getattr(layer, "fn", None), depth + 1
    return list(found.values())


def pin_autotuned_kernels(package: str = "fla") -> int:
    """Reduce every autotuner in the already-imported modules of `package` to its least demanding
    configuration; returns how many were pinned."""
    prefix = package + "."
    modules = [
        m
        for name, m in list(sys.modules.items())
        if m is not None and (name == package or name.startswith(prefix))
    ]
    tuners = autotuners_in(modules)
    for tuner in tuners:
        tuner.configs = [least_demanding(tuner.configs)]
    return len(tuners)
