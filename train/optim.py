"""AdamW parameter groups and the learning-rate schedules of a run.

Weight decay goes on the matrices (projections, experts, embedding, the conv filters) and on the
zero-centred RMSNorm weights: those hold the *offset* from a unit scale, so decaying them pulls the
norm towards identity instead of towards zero (as Qwen3-Next trains them). No decay on biases, on
the DeltaNet decay parameters `A_log` / `dt_bias` (shrinking them changes the memory time scale, not
a weight's size), or on the gated norm's plain (unit-initialised) weight.

The learning rate is a pure function of the step (`lr_at`), so a resumed run needs only the step
to continue on the same schedule, and stopping early does not change it (`optim.schedule_steps`).
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch import nn

from model.norms import RMSNorm

NO_DECAY_NAMES = ("A_log", "dt_bias")


def decays(module: nn.Module, param_name: str, param: torch.Tensor) -> bool:
    """Whether `param` (called `param_name` inside `module`) takes weight decay."""
    if param_name in NO_DECAY_NAMES or param_name.endswith("bias"):
        return False
    if isinstance(module, RMSNorm):
        return True  # zero-centred: decays towards scale 1
    return param.ndim >= 2


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Two AdamW groups, `decay` and `no_decay`, each with the parameter names for the logs."""
    groups = {
        "decay": {"params": [], "names": [], "weight_decay": weight_decay},
        "no_decay": {"params": [], "names": [], "weight_decay": 0.0},
    }
    seen: set[int] = set()
    for module_name, module in model.named_modules():
        for name, param in module.named_parameters(recurse=False):
            if not param.requires_grad or id(param) in seen:
                continue
            seen.add(id(param))
            group = groups["decay" if decays(module, name, param) else "no_decay"]
            group["params"].append(param)
            group["names"].append(f"{module_name}.{name}" if module_name else name)
    return [dict(group, name=key) for key, group in groups.items() if group["params"]]


def without_names(groups: Iterable[dict]) -> list[dict]:
    """The groups as torch optimizers take them (they reject unknown list-valued keys in state)."""
    return [{k: v for k, v in group.items() if k != "names"} for group in groups]


def lr_at(
    step: int,
    *,
    lr: float,
    warmup_steps: int,
    total_steps: int,
    schedule: str,
    min_lr_ratio: float,
    decay_fraction: float = 0.2,
) -> float:
    """The learning rate of optimizer step `step` (1-based: step 1 is the first update).

    Both schedules warm up linearly from lr/warmup_steps to lr over the first warmup_steps steps.
    cosine: then half a cosine from lr to min_lr_ratio*lr at total_steps.
    wsd (warmup-stable-decay): lr until the last decay_fraction of total_steps, then linear decay to
    min_lr_ratio*lr at total_steps. Past total_steps both stay at min_lr_ratio*lr.
    """
    if step <= warmup_steps:
        return lr * step / max(warmup_steps, 1)
    floor = lr * min_lr_ratio
    if step >= total_steps:
        return floor
    if schedule == "cosine":
        progress = (step - warmup_steps) / max(total_steps - warmup_steps, 1)
        return floor + (lr - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))
    if schedule == "wsd":
        decay_start = max(total_steps - round(decay_fraction * total_steps), warmup_steps)
        if step <= decay_start:
            return lr
        progress = (step - decay_start) / max(total_steps - decay_start, 1)
        return lr + (floor - lr) * progress
    raise ValueError(f"optim.schedule must be cosine or wsd, got {schedule!r}")
