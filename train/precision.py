"""DeepSpeed's mixed-precision settings for training, and two changes to its bf16 optimizer made from
our side.

On the GPU the parameters are bf16 and the master weights fp32, and the gradients stay fp32 from the
first micro-batch's backward to the optimizer: each micro-batch's bf16 gradient is added into an fp32
buffer (ZeRO 1-2), and the data-parallel reduction runs in fp32. On CPU everything is fp32.

DeepSpeed 0.19's BF16_Optimizer (ZeRO 1 with fp32 accumulation) gets two changes after
`deepspeed.initialize` (`finish_bf16_setup`), each worth asking upstream for:
- the bf16 gradient is added into its fp32 buffer by one mixed-dtype `add_`, where DeepSpeed first
  casts it to an fp32 copy: one pass over the gradients less per micro-batch (about 2% of a `small`
  step on an H100); the sum is the same, bit for bit;
- on a single rank the reduction is skipped: DeepSpeed would copy every fp32 gradient into a flat
  buffer, "all-reduce" it and copy it back at every step.
tests/distributed/test_bf16_gradients.py checks that the optimizer sees the exact fp32 sum of the
micro-batches' bf16 gradients, on 1 and 2 ranks, with ZeRO 1 and 2.
"""

from __future__ import annotations

import types

import torch

OVERRIDE_CHECKED_ON = ("0.19.8",)  # DeepSpeed versions whose BF16_Optimizer._update_hp_grad we repeat


def bf16_settings(on_gpu: bool, zero_stage: int, *, folded: bool = False) -> dict:
    """The precision part of the DeepSpeed config (with ZeRO off DeepSpeed accumulates in bf16).
    `folded`: AutoEP folded onto tensor parallelism (parallel/expert.py)."""
    if not on_gpu:
        return {"bf16": {"enabled": False}}
    if zero_stage == 0:
        return {"bf16": {"enabled": True}}
    return {
        # immediate: each bf16 gradient is added into its fp32 buffer as soon as backward makes it
        # and then freed. Deferred, DeepSpeed keeps every bf16 gradient to the end of backward, zeroes
        # them before the next micro-batch and lets autograd add into them: two more passes over
        # them per micro-batch. Not when folded: there each addition also all-reduces over the
        # tensor group, and we keep those collectives in DeepSpeed's one loop after backward.
        "bf16": {"enabled": True, "immediate_grad_update": not folded},
        "data_types": {"grad_accum_dtype": "fp32"},
        # DeepSpeed's default under bf16 is to cast the fp32-accumulated gradients to bf16 for the
        # data-parallel reduction and back, even on one rank: the optimizer then sees gradients
        # rounded to bf16 (a relative error up to 2^-9). Megatron also reduces bf16 runs in fp32.
        "communication_data_type": "fp32",
    }


def finish_bf16_setup(engine, world: int) -> None:
    """The two changes of the module docstring, on an engine whose optimizer is BF16_Optimizer."""
    import deepspeed
    from deepspeed.runtime.bf16_optimizer import BF16_Optimizer

    optimizer = engine.optimizer
    if not isinstance(optimizer, BF16_Optimizer):
        return
    if world == 1:
        engine.enable_backward_allreduce = False
    # the override repeats DeepSpeed's method, so only on the version it was read from; and folding
    # corrects gradients in DeepSpeed's own path
    if deepspeed.__version__ in OVERRIDE_CHECKED_ON and optimizer.autoep_folding_tp_group is None:
        optimizer._update_hp_grad = types.MethodType(_add_into_fp32_buffer, optimizer)


@torch.no_grad()
def _add_into_fp32_buffer(optimizer, lp, group_idx: int, param_idx: int, clear_lp_grads: bool) -> None:
    """BF16_Optimizer._update_hp_grad (DeepSpeed 0.19) without its cast: fp32 += bf16 in one kernel."""
    if lp.grad is None:
        return
    hp_grad = optimizer.fp32_groups_gradients[group_idx][param_idx]
    hp_grad.add_(lp.grad.view(hp_grad.shape))
    lp._hp_grad = hp_grad
    optimizer.fp32_groups_has_gradients[group_idx][param_idx] = True
    if clear_lp_grads:
        lp.grad.zero_()
