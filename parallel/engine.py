"""The one module that talks to DeepSpeed's engine, and the only place that changes DeepSpeed's behaviour.

The trainer and the benchmarks see `Engine`: forward, backward (with the optimizer step at the
accumulation boundary), the last step's gradient norm and whether it was skipped, the learning rate,
checkpoint save and load. `setup_distributed` starts torch.distributed through DeepSpeed;
`build_engine` wraps a model built by parallel/build.py.

DeepSpeed has no public switch for a few things this framework needs, so this module changes them
from outside. Each change says why; all were read against the DeepSpeed versions in
`DEEPSPEED_CHECKED_ON`, and `check_deepspeed_version` (run at start-up) refuses any other version
unless `parallel.untested_deepspeed=true`, in which case the changes that only speed things up fall
back to DeepSpeed's own behaviour and the ones expert parallelism needs are still made:
1. CPU runs: DeepSpeed's shared-memory all-reduce op is marked unbuildable (`skip_cpu_shm_build`).
2. bf16 (ZeRO 1-2 on GPUs): the bf16 gradient is added into its fp32 buffer in one mixed-dtype
   `add_`, and a single rank skips the gradient all-reduce (`finish_bf16_setup`); under ZeRO 1 each
   parameter is lent its fp32 buffer, into which the LM heads add their weight gradient in forward
   (`_lend_fp32_gradient_buffers`); without tensor or expert parallelism the optimizer step decides
   clipping and skipping on the device, without reading the gradient norm on the host
   (`_step_without_host_sync`). Speed and memory only.
3. Expert parallelism: the engine adopts the AutoEP layers parallel/expert.py built before it
   (`_engine_adopts_replaced_layers`), and checks they hold the experts of its groups.
4. Expert parallelism folded onto tensor parallelism: AutoTP told our heads are sharded already, the
   expert weights counted by the gradient norm on every rank (`_fold_onto_tensor_parallel`).
5. AutoEP's layers get a buffer slot for our aux-loss-free bias (`_open_autoep_bias_slots`) and
   return their routing statistics as our MoE block does (`_return_autoep_router_stats`).
6. Checkpoints load through weights-only unpickling (`_read_checkpoints_with`), and
   `run_ds_to_universal` runs DeepSpeed's converter with its worker pool swapped (train/safe_load.py).
parallel/expert.py configures AutoEP and calls its own replacement code, without changing it.
"""

from __future__ import annotations

import contextlib
import logging
import os
import types
import warnings
import weakref
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from model.moe import moe_blocks, router_stats
from model.ops.adamw import adamw_flat_
from model.ops.casting import add_into_fp32, blocks_of
from parallel.expert import autoep_config, autoep_layers
from parallel.expert_overlap import overlap_expert_exchanges

DEEPSPEED_CHECKED_ON = ("0.19.8",)
OPTIMIZER_STEP = "optimizer step"  # the profiler range around the engine's step (bench/op_families.py)


class UntestedDeepSpeedError(RuntimeError):
    """The installed DeepSpeed is not one this module's changes were checked on."""


def deepspeed_is_checked() -> bool:
    import deepspeed

    return deepspeed.__version__ in DEEPSPEED_CHECKED_ON


def check_deepspeed_version(allow_untested: bool = False) -> None:
    """Refuse a DeepSpeed version this module was not checked on (module docstring), or with
    `allow_untested` warn once and carry on."""
    import deepspeed

    if deepspeed_is_checked():
        return
    message = (
        f"DeepSpeed {deepspeed.__version__} is installed, but parallel/engine.py changes DeepSpeed "
        f"internals that were checked on DeepSpeed {', '.join(DEEPSPEED_CHECKED_ON)} only; on another "
        "version they could silently change gradients or checkpoints."
    )
    if not allow_untested:
        raise UntestedDeepSpeedError(
            f"{message} Install the checked one (pip install deepspeed=={DEEPSPEED_CHECKED_ON[-1]}), or run "
            "with parallel.untested_deepspeed=true and compare a short run's losses against it."
        )
    warnings.warn(
        f"{message} Running anyway (parallel.untested_deepspeed=true): the bf16 speed-ups are off.",
        stacklevel=2,
    )


# ---------------------------------------------------------------------------------------------
# Start-up


def quiet_deepspeed() -> None:
    """DeepSpeed logs every set-up detail at INFO; the trainer prints what a user needs."""
    from deepspeed.utils import logger

    logger.setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", message=".*all_gather_into_tensor.*", category=FutureWarning)
    warnings.filterwarnings("ignore", message=".*reduce_scatter_tensor.*", category=FutureWarning)


def skip_cpu_shm_build() -> None:
    """Change 1. On the CPU accelerator DeepSpeed JIT-compiles a C++ extension at the first
    `init_distributed` (1-2 minutes on a laptop, and a compiler required) only to speed up CPU
    all-reduces; gloo does them correctly, and CPU runs here are tests and demos. The op is marked
    unavailable the way DeepSpeed marks ops it cannot build."""
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False


def setup_distributed(allow_untested_deepspeed: bool = False) -> tuple[torch.device, bool]:
    """torch.distributed through DeepSpeed (NCCL on GPUs, gloo on CPU; a world of one without
    torchrun), this rank's device, and whether it is a GPU."""
    on_gpu = torch.cuda.is_available()
    if not on_gpu:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")  # said up front, DeepSpeed does not warn
    import deepspeed

    check_deepspeed_version(allow_untested_deepspeed)
    quiet_deepspeed()
    if on_gpu:
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
        skip_cpu_shm_build()
    if not dist.is_initialized():  # `python launch/pretrain.py` without torchrun: a world of one
        for key, value in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1")):
            os.environ.setdefault(key, value)
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        # port 0: the rendezvous store binds one the system picks; a free port found first could be
        # taken by another process before the store binds it
        os.environ.setdefault("MASTER_PORT", "0")
    deepspeed.init_distributed(dist_backend="nccl" if on_gpu else "gloo", verbose=False)
    return device, on_gpu


def leave_distributed() -> None:
    """Every rank leaves the process group together once the run is over: one that still holds it
    at interpreter exit, after rank 0 (the rendezvous store's host) has gone, was seen to abort in a
    C++ background thread ("terminate called without an active exception") under a loaded machine."""
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


# ---------------------------------------------------------------------------------------------
# The engine's configuration


@dataclass(frozen=True)
class EngineSettings:
    """What DeepSpeed is told: the layout, the batch, ZeRO, precision, clipping."""

    world: int
    tensor: int
    expert: int
    grad_accum: int  # micro-batches a step on each rank
    micro_batch_size: int
    global_batch_size: int
    grad_clip: float
    zero_stage: int
    on_gpu: bool
    autoep: bool  # the MoE layers are AutoEP's (parallel/expert.py), any expert size
    expert_chunks: int = 1  # > 1: the all-to-alls overlapped with the experts (parallel/expert_overlap.py)
    load_universal: bool = False  # the engine will load a universal checkpoint

    @property
    def folded(self) -> bool:
        """AutoEP folded onto tensor parallelism (parallel/expert.py)."""
        return self.autoep and self.tensor > 1


def bf16_settings(on_gpu: bool, zero_stage: int, *, folded: bool = False) -> dict:
    """The precision part of the DeepSpeed config. On GPUs the parameters are bf16 and the master
    weights fp32, and from ZeRO 1 on the gradients stay fp32 from the first micro-batch's backward
    to the optimizer (with ZeRO off DeepSpeed accumulates in bf16); on CPU everything is fp32."""
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


def deepspeed_config(settings: EngineSettings) -> dict:
    folded = settings.folded
    return {
        **({"checkpoint": {"load_universal": True}} if settings.load_universal else {}),
        # folded, DeepSpeed gets no mpu and counts every rank as a data-parallel one in this check
        "train_batch_size": settings.global_batch_size * (settings.tensor if folded else 1),
        **({"tensor_parallel": {"autotp_size": settings.tensor}} if folded else {}),
        "train_micro_batch_size_per_gpu": settings.micro_batch_size,
        "gradient_accumulation_steps": settings.grad_accum,
        "gradient_clipping": settings.grad_clip,
        "zero_optimization": {"stage": settings.zero_stage},
        **bf16_settings(settings.on_gpu, settings.zero_stage, folded=folded),
        **({"expert_parallel": autoep_config(settings.expert)} if settings.autoep else {}),
        "zero_allow_untested_optimizer": True,  # torch's AdamW under ZeRO
        "steps_per_print": 2**31 - 1,  # the trainer prints its own line
        "wall_clock_breakdown": False,
        # DeepSpeed's throughput timer synchronizes the device at every micro-batch's forward and
        # step; each sync drained the GPU's queue (8 a step; on an H100 the loop lost ~5% to them)
        "timers": {"throughput": {"enabled": False}},
    }


# ---------------------------------------------------------------------------------------------
# The engine


class Engine:
    """A DeepSpeed engine as the training step uses it.

    Per micro-batch: `out = engine(input_ids, labels=..., documents=..., head_loss_weights=...)` (the
    model's arguments), then `engine.backward(loss)`;
    the last micro-batch's backward also runs the optimizer step, after which `grad_norm` and
    `step_skipped` describe it: a float and a bool, or, where the step decides on the device
    (`steps_without_host_sync`), a 0-dim fp32 tensor (inf when not finite) and a 0-dim bool tensor on
    the device, not read by the engine, so that the host can go on launching the next step.
    """

    def __init__(self, ds_engine, settings: EngineSettings):
        self._ds = ds_engine
        self.settings = settings
        self.module: nn.Module = ds_engine.module
        self.grad_norm: float | torch.Tensor = float("nan")
        self.step_skipped: bool | torch.Tensor = False

    @property
    def steps_without_host_sync(self) -> bool:
        return getattr(self._ds.optimizer, "step_without_host_sync", False)

    @property
    def loss_scale(self) -> float:
        """The factor `backward` multiplies a loss by before it backpropagates (DeepSpeed's average
        over the micro-batches of a step; bf16 and fp32 have no loss scaler): what a head's loss
        weight is multiplied by to become the gradient its loss sum gets."""
        return 1.0 / self._ds.gradient_accumulation_steps()

    def __call__(self, input_ids, *, labels=None, documents=None, head_loss_weights=None):
        return self._ds(input_ids, labels=labels, documents=documents, head_loss_weights=head_loss_weights)

    def set_lr(self, lr: float) -> None:
        for group in self._ds.optimizer.param_groups:
            group["lr"] = lr

    def backward(self, loss: torch.Tensor) -> None:
        """Backward of one micro-batch; at the step's last (DeepSpeed's accumulation boundary) the
        clipped optimizer step, or its skip when the gradient norm is not finite."""
        self._ds.backward(loss)
        boundary = self._ds.is_gradient_accumulation_boundary()
        on_device = boundary and self.steps_without_host_sync
        if boundary and not on_device:
            skipped_before = self._ds.skipped_steps
            # ZeRO off: DeepSpeed reports no norm; every rank holds the whole reduced gradients
            replicated_norm = replicated_grad_norm(self.module) if self.settings.zero_stage == 0 else None
        with torch.profiler.record_function(OPTIMIZER_STEP):  # names the optimizer's kernels in profiles
            self._ds.step()
        if on_device:
            self.grad_norm = self._ds.get_global_grad_norm()  # the device tensor our step left
            self.step_skipped = ~torch.isfinite(self.grad_norm)
        elif boundary:
            self.grad_norm = self._reported_grad_norm() if replicated_norm is None else replicated_norm
            # ZeRO's optimizer skips a non-finite step itself; with ZeRO off SkippingAdamW does
            self.step_skipped = self._ds.skipped_steps > skipped_before or getattr(
                self._ds.optimizer, "skipped", False
            )

    def _reported_grad_norm(self) -> float:
        norm = self._ds.get_global_grad_norm()
        if norm is None:
            return float("nan")
        return float(norm.item() if torch.is_tensor(norm) else norm)

    def moe_layers(self) -> list[nn.Module]:
        """The MoE layers, ours or AutoEP's, in the order of the model's RouterStats."""
        return autoep_layers(self.module) if self.settings.autoep else moe_blocks(self.module)

    def save_checkpoint(self, directory: str, tag: str) -> None:
        self._ds.save_checkpoint(directory, tag=tag, save_latest=False)

    def load_checkpoint(self, directory: str, tag: str, read: Callable) -> bool:
        """Weights and optimizer state from `directory/tag`, every file read through `read(path,
        map_location)` (weights-only unpickling); False when DeepSpeed finds nothing to load."""
        _read_checkpoints_with(self._ds, read)
        load_path, _ = self._ds.load_checkpoint(
            directory, tag=tag, load_optimizer_states=True, load_lr_scheduler_states=False
        )
        return load_path is not None


def replicated_grad_norm(model: nn.Module) -> float:
    """The L2 norm of gradients every rank holds whole (ZeRO off, after DeepSpeed's all-reduce)."""
    norms = [p.grad.detach().float().norm() for p in model.parameters() if p.grad is not None]
    return float(torch.stack(norms).norm()) if norms else 0.0


def build_engine(
    model: nn.Module,
    settings: EngineSettings,
    *,
    make_optimizer: Callable[[list[dict]], torch.optim.Optimizer],
    param_groups: Callable[[nn.Module], list[dict]],
    tp_groups=None,
) -> Engine:
    """The DeepSpeed engine over `model` (built by parallel/build.py: on its device, head-sharded under
    tensor parallelism, its MoE blocks already AutoEP's under `settings.autoep`), with the optimizer
    `make_optimizer(param_groups(model))` (under AutoEP the expert parameters split into DeepSpeed's
    MoE groups), AutoEP folded onto the tensor-parallel ranks when both are on."""
    import deepspeed

    if settings.autoep:
        optimizer = _moe_optimizer_factory(model, param_groups, make_optimizer)
    else:
        optimizer = make_optimizer(param_groups(model))
        if tp_groups is None:
            _declare_plain_parameters(model)
    if settings.folded:
        _fold_onto_tensor_parallel(model)
    adopting = _engine_adopts_replaced_layers(model) if settings.autoep else contextlib.nullcontext()
    with adopting:
        ds_engine, *_ = deepspeed.initialize(
            model=model,
            optimizer=optimizer,
            mpu=None if settings.folded else tp_groups,  # folded: DeepSpeed builds the same groups itself
            config=deepspeed_config(settings),
            dist_init_required=False,
        )
    if settings.autoep:
        _check_expert_ranks(ds_engine.module)
        _open_autoep_bias_slots(ds_engine.module)
        _return_autoep_router_stats(ds_engine.module)
        overlap_expert_exchanges(autoep_layers(ds_engine.module), settings.expert_chunks)
    if settings.folded:
        _after_folded_initialize(ds_engine.module, settings.tensor)
    finish_bf16_setup(ds_engine, settings.world)
    return Engine(ds_engine, settings)


def _declare_plain_parameters(model: nn.Module) -> None:
    """Lets ds_to_universal convert the checkpoints of a model without tensor parallelism or AutoEP
    (AutoEP writes its own entry): plain parameters, no slicing rules to record."""
    from deepspeed.checkpoint.constants import (
        UNIVERSAL_CHECKPOINT_INFO,
        UNIVERSAL_CHECKPOINT_VERSION_KEY,
        UNIVERSAL_CHECKPOINT_VERSION_VALUE,
    )

    info = {UNIVERSAL_CHECKPOINT_VERSION_KEY: UNIVERSAL_CHECKPOINT_VERSION_VALUE}
    setattr(model, UNIVERSAL_CHECKPOINT_INFO, info)


# ---------------------------------------------------------------------------------------------
# Change 2: bf16


def finish_bf16_setup(ds_engine, world: int) -> None:
    """On an engine whose optimizer is DeepSpeed's BF16_Optimizer (ZeRO 1 with fp32 accumulation):
    - on a single rank the gradient reduction is skipped: DeepSpeed would copy every fp32 gradient into
      a flat buffer, "all-reduce" it and copy it back at every step;
    - the bf16 gradient is added into its fp32 buffer by one mixed-dtype `add_`, where DeepSpeed first
      casts it to an fp32 copy: one pass over the gradients less per micro-batch (about 2% of a
      `small` step on an H100), the same sum bit for bit; a step's first gradient of a parameter is
      cast into its buffer, reading nothing there (model/ops/casting.py runs both at the memory
      bandwidth: on an H200 at the 80B width, one micro-batch a step, PyTorch's mixed-dtype add took
      10.7 ms of a 200 ms step and its casting copy 8.9);
    - the buffers are not zeroed after the step (DeepSpeed's clear_hp_grads): since the first
      gradient overwrites, only those of parameters that got no gradient need zeros, and get them
      at the end of backward, before the reduction reads them;
    - each parameter is lent its fp32 buffer (`fp32_grad_buffer`, model/ops/cross_entropy.py's
      `Fp32GradientBuffer`): the LM heads' weight-gradient GEMMs add into it during forward, with
      no fp32 sum of their own (1.16 GiB at the 80B vocabulary), no rounding of it to bf16 and no
      cast back (`_lend_fp32_gradient_buffers`);
    - where the gradient norm needs no collective, the optimizer step skips and clips on the device
      (`_step_without_host_sync`), and the engine reports the norm as a device tensor;
    - on a single rank, where nothing changes a gradient between its cast and the step, that norm is
      summed as the gradients are cast (`GradientSquares`): no pass of its own over them.
    Not under folding, whose gradient corrections live in DeepSpeed's own method.
    tests/distributed/test_bf16_gradients.py checks that the optimizer sees the exact fp32 sum of the
    micro-batches' bf16 gradients, on 1 and 2 ranks, with ZeRO 1 and 2, and zeros for a parameter
    that got a gradient in one step and none in the next."""
    from deepspeed.runtime.bf16_optimizer import BF16_Optimizer

    optimizer = ds_engine.optimizer
    if not isinstance(optimizer, BF16_Optimizer) or not deepspeed_is_checked():
        return
    if world == 1:
        ds_engine.enable_backward_allreduce = False
    if optimizer.autoep_folding_tp_group is None:
        optimizer._update_hp_grad = types.MethodType(_add_into_fp32_buffer, optimizer)
        optimizer.clear_hp_grads = types.MethodType(_forget_fp32_gradients, optimizer)
        optimizer.backward_epilogue = types.MethodType(
            _zero_fp32_gradients_not_written(optimizer.backward_epilogue), optimizer
        )
        _lend_fp32_gradient_buffers(optimizer)
    if _can_step_without_host_sync(optimizer):
        optimizer.step = types.MethodType(_step_without_host_sync, optimizer)
        optimizer.step_without_host_sync = True
        if world == 1 and optimizer.autoep_folding_tp_group is None:
            device = optimizer.fp32_groups_flat_partition[0].device
            optimizer.gradient_squares = GradientSquares(optimizer.fp32_groups_gradients, device)


def _can_step_without_host_sync(optimizer) -> bool:
    """Whether `_step_without_host_sync` computes what BF16_Optimizer.step would: fp32 gradients, the
    norm over gradients every rank holds whole (no tensor-parallel or expert-parallel parts to sum over
    groups), and torch's fused AdamW underneath (whose arithmetic and state model/ops/adamw.py keeps),
    one flat fp32 partition a parameter group."""
    inner = optimizer.optimizer
    return (
        optimizer.grad_acc_dtype is torch.float32
        and optimizer.mpu is None
        and not optimizer.has_moe_layers
        and not optimizer._uses_muon
        and type(inner) is torch.optim.AdamW
        and all(
            group["fused"] and not group["amsgrad"] and not group["maximize"] and len(group["params"]) == 1
            for group in inner.param_groups
        )
    )


@torch.no_grad()
def _step_without_host_sync(optimizer, closure=None) -> None:
    """BF16_Optimizer.step (DeepSpeed 0.19.8) with every decision left on the device, and AdamW and the
    bf16 weights' refresh in one pass.

    DeepSpeed reads the gradient norm on the host twice, to skip a step whose norm is not finite and
    to clip; each read waits for backward to finish, and the host then launches the optimizer, and
    after it the next step's forward, into an empty queue (at the 80B width on an H200 the forward is
    launch-bound, so the GPU then waits for the host through it). Here the norm stays a device tensor,
    and so do the decisions: `found_inf` (skip: weights, moments and step count left as they were)
    and `grad_scale` (each gradient divided by it: norm / clip when the norm exceeds the clip, else 1,
    DeepSpeed's clip coefficient inverted), which model/ops/adamw.py takes as torch's fused AdamW
    does. Its kernel also writes this rank's bf16 partition, which DeepSpeed copies from the fp32
    weights in a second pass; the partitions are then gathered over the data-parallel ranks as
    DeepSpeed does. The optimizer's state is torch AdamW's own (checkpoints see no difference).
    tests/distributed/test_bf16_gradients.py checks it against DeepSpeed's own step: clipped, not
    clipped, and skipped."""
    if closure is not None:
        raise NotImplementedError("the bf16 optimizer step takes no closure")
    from deepspeed.runtime.utils import all_gather_dp_groups

    norm = _gradient_norm(optimizer)
    finite = torch.isfinite(norm)
    # DeepSpeed's engine hands this on (get_global_grad_norm), as it does the norm of its own step
    optimizer._global_grad_norm = torch.where(finite, norm, torch.full_like(norm, float("inf")))
    optimizer.overflow = False  # what DeepSpeed's engine reads on the host: the skip is the kernel's
    found_inf = (~finite).float()
    grad_scale = torch.ones_like(norm)
    if optimizer.clip_grad > 0.0:  # DeepSpeed's eps: clipped when clip / (norm + 1e-6) < 1
        grad_scale = torch.where(finite, ((norm + 1e-6) / optimizer.clip_grad).clamp(min=1.0), 1.0)
    inner = optimizer.optimizer
    for index, group in enumerate(inner.param_groups):
        (param,) = group["params"]  # this rank's flat fp32 partition of the group
        state = inner.state[param]
        if not state:  # as torch's fused AdamW creates it
            state["step"] = torch.zeros((), dtype=torch.float32, device=param.device)
            state["exp_avg"] = torch.zeros_like(param, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(param, memory_format=torch.preserve_format)
        elif state["step"].device != param.device:  # a universal checkpoint's load leaves it on the host
            state["step"] = state["step"].to(param.device, torch.float32)
        rank_in_group = dist.get_rank(group=optimizer.real_dp_process_group[index])
        adamw_flat_(
            param,
            optimizer.fp32_groups_gradient_flat_partition[index],
            state["exp_avg"],
            state["exp_avg_sq"],
            state["step"],
            optimizer.bf16_partitioned_groups[index][rank_in_group],
            lr=group["lr"],
            betas=group["betas"],
            eps=group["eps"],
            weight_decay=group["weight_decay"],
            grad_scale=grad_scale,
            found_inf=found_inf,
        )
    optimizer._lazy_init_hp_params_optimizer_state()
    all_gather_dp_groups(  # BF16_Optimizer.update_lp_params without its copy
        groups_flat=optimizer.bf16_groups_flat,
        partitioned_param_groups=optimizer.bf16_partitioned_groups,
        dp_process_group=optimizer.real_dp_process_group,
        start_alignment_factor=optimizer.nccl_start_alignment_factor,
        allgather_bucket_size=optimizer.allgather_bucket_size,
    )
    optimizer.clear_hp_grads()


def _gradient_norm(optimizer) -> torch.Tensor:
    """The L2 norm of all fp32 gradient buffers, a 0-dim fp32 tensor on the device.

    Every buffer counts: one that got no gradient this step holds zeros, or after the data-parallel
    reduction the other ranks' sum (DeepSpeed's norm skips it on this rank only, so ranks could
    disagree). Where the casts summed their squares (`GradientSquares`), only the other buffers are
    read here: on one rank, usually just the LM head's, which its GEMMs write."""
    device = optimizer.fp32_groups_flat_partition[0].device
    squares = getattr(optimizer, "gradient_squares", None)
    if squares is None:
        summed = torch.zeros((), device=device)
        unread = [gradient for group in optimizer.fp32_groups_gradients for gradient in group]
    else:
        summed, unread = squares.total(), squares.buffers_not_summed(optimizer.fp32_groups_gradients)
    if unread:
        summed = summed + torch.stack(torch._foreach_norm(unread)).square().sum()
    return summed.sqrt()


class GradientSquares:
    """The squares of each fp32 gradient buffer, summed block by block by the cast that last wrote it.

    The gradient norm reads every fp32 gradient, 4 bytes a parameter (4.1 ms a step at the 80B width
    on an H100, one micro-batch, 2.8B parameters). The cast that writes a gradient into its buffer
    (`_add_into_fp32_buffer`) has the new values in registers and sums their squares on the way
    (model/ops/casting.py, one fp32 sum per 4096 elements, into this object's slot of the parameter).
    Each cast rewrites its whole slot, so after any number of micro-batches the slot describes the
    buffer as the last cast left it: the step's gradient, if nothing wrote there since. Buffers
    written another way (the LM heads' GEMMs add into theirs, `_OptimizerGradientBuffer`), or not
    at all this step (zeroed at backward's end), are marked not summed, their slots zeroed, and the
    norm reads them (`_gradient_norm`). Only where no reduction follows backward: on a single rank.
    """

    def __init__(self, gradients: list[list[torch.Tensor]], device: torch.device):
        sizes = [[blocks_of(gradient.numel()) for gradient in group] for group in gradients]
        self._sums = torch.zeros(sum(map(sum, sizes)), dtype=torch.float32, device=device)
        self._slots, start = [], 0
        for group in sizes:
            self._slots.append([])
            for size in group:
                self._slots[-1].append(self._sums.narrow(0, start, size))
                start += size
        self._summed = [[False] * len(group) for group in gradients]

    def slot(self, group_idx: int, param_idx: int) -> torch.Tensor:
        return self._slots[group_idx][param_idx]

    def mark(self, group_idx: int, param_idx: int, *, summed: bool) -> None:
        """After a write into a buffer: by the cast that summed into its slot, or some other way."""
        if not summed and self._summed[group_idx][param_idx]:
            self._slots[group_idx][param_idx].zero_()
        self._summed[group_idx][param_idx] = summed

    def forget(self) -> None:
        """After the optimizer step: no buffer holds a summed gradient of the next step yet."""
        self._sums.zero_()
        self._summed = [[False] * len(group) for group in self._summed]

    def total(self) -> torch.Tensor:
        """The summed buffers' squared norm (the others' slots hold zeros)."""
        return self._sums.sum()

    def buffers_not_summed(self, gradients: list[list[torch.Tensor]]) -> list[torch.Tensor]:
        return [
            gradient
            for group, flags in zip(gradients, self._summed, strict=True)
            for gradient, summed in zip(group, flags, strict=True)
            if not summed
        ]


@torch.no_grad()
def _add_into_fp32_buffer(optimizer, lp, group_idx: int, param_idx: int, clear_lp_grads: bool) -> None:
    """BF16_Optimizer._update_hp_grad (DeepSpeed 0.19.8) without its cast: fp32 += bf16 in one kernel,
    or fp32 = bf16 for the step's first gradient, over whatever the buffer held before
    (model/ops/casting.py: both at the memory bandwidth, where PyTorch's mixed-dtype kernels reach
    half of it), summing the squares of the result where the optimizer keeps `GradientSquares`."""
    if lp.grad is None:
        return
    hp_grad = optimizer.fp32_groups_gradients[group_idx][param_idx]
    squares = getattr(optimizer, "gradient_squares", None)
    add_into_fp32(
        hp_grad,
        lp.grad,
        overwrite=not optimizer.fp32_groups_has_gradients[group_idx][param_idx],
        squares_out=None if squares is None else squares.slot(group_idx, param_idx),
    )
    _mark_fp32_gradient_written(optimizer, lp, group_idx, param_idx, squares_summed=squares is not None)
    if clear_lp_grads:
        lp.grad.zero_()


def _mark_fp32_gradient_written(
    optimizer, lp, group_idx: int, param_idx: int, *, squares_summed: bool
) -> None:
    """BF16_Optimizer's bookkeeping after a write into a parameter's fp32 gradient: the buffer now
    holds this step's gradient (later writes add, and backward's end does not zero it), and the
    parameter's `_hp_grad` points at it; and whether the write summed the buffer's squares."""
    lp._hp_grad = optimizer.fp32_groups_gradients[group_idx][param_idx]
    optimizer.fp32_groups_has_gradients[group_idx][param_idx] = True
    squares = getattr(optimizer, "gradient_squares", None)
    if squares is not None:
        squares.mark(group_idx, param_idx, summed=squares_summed)


class _OptimizerGradientBuffer:
    """One parameter's fp32 gradient buffer in a BF16_Optimizer, as model/ops/cross_entropy.py's
    `Fp32GradientBuffer`: what is written there is what `_add_into_fp32_buffer` would have added, and
    the flag it sets is the one that decides between overwriting and adding, and whether the buffer
    is zeroed at the end of backward. The optimizer and the parameter are held weakly, and a copy or
    a pickle of the parameter (a deep-copied model, say) lends nothing: it is not the optimizer's."""

    def __init__(self, optimizer, lp, group_idx: int, param_idx: int):
        self._optimizer = weakref.ref(optimizer)
        self._lp = weakref.ref(lp)
        self._group, self._index = group_idx, param_idx
        self.writer = None  # the LM heads' bookkeeping (Fp32GradientBuffer.writer)

    def __deepcopy__(self, memo):
        return None

    def __reduce__(self):
        return _nothing_lent, ()

    def tensor(self) -> torch.Tensor:
        # DeepSpeed's buffers are 1-D narrows of the group's flat fp32 gradient
        return self._optimizer().fp32_groups_gradients[self._group][self._index].view(self._lp().shape)

    def holds_gradient(self) -> bool:
        return self._optimizer().fp32_groups_has_gradients[self._group][self._index]

    def mark_written(self) -> None:
        optimizer, lp = self._optimizer(), self._lp()
        _mark_fp32_gradient_written(optimizer, lp, self._group, self._index, squares_summed=False)


def _nothing_lent() -> None:
    return None


def _lend_fp32_gradient_buffers(optimizer) -> None:
    """`fp32_grad_buffer` on every parameter the optimizer trains (only the LM heads use it)."""
    for group_idx, group in enumerate(optimizer.bf16_groups):
        for param_idx, lp in enumerate(group):
            lp.fp32_grad_buffer = _OptimizerGradientBuffer(optimizer, lp, group_idx, param_idx)


def _forget_fp32_gradients(optimizer) -> None:
    """BF16_Optimizer.clear_hp_grads without zeroing the fp32 buffers (a pass over 4 bytes a
    parameter, 4.8 ms a step at the 80B width on an H200): the next gradient of each parameter
    overwrites its buffer (`_add_into_fp32_buffer`), and the buffers of parameters that got none by
    the end of a backward are zeroed then (`_zero_fp32_gradients_not_written`)."""
    for group, gradients in enumerate(optimizer.fp32_groups_gradients):
        optimizer.fp32_groups_has_gradients[group] = [False] * len(gradients)
    squares = getattr(optimizer, "gradient_squares", None)
    if squares is not None:
        squares.forget()


def _zero_fp32_gradients_not_written(backward_epilogue):
    """BF16_Optimizer.backward_epilogue, which DeepSpeed runs after each backward and before the
    data-parallel reduction, then the zeroing of every fp32 gradient buffer no gradient has been
    written into since the last step: the reduction, the norm and the optimizer read zeros there, as
    with DeepSpeed's own clearing. Usually no parameter is left out and this is a loop over flags."""

    @torch.no_grad()
    def epilogue(optimizer, *args, **kwargs):
        backward_epilogue(*args, **kwargs)
        for group, written in enumerate(optimizer.fp32_groups_has_gradients):
            for index, has_gradient in enumerate(written):
                if not has_gradient:
                    optimizer.fp32_groups_gradients[group][index].zero_()

    return epilogue


# ---------------------------------------------------------------------------------------------
# Changes 3-5: expert parallelism through AutoEP


@contextlib.contextmanager
def _engine_adopts_replaced_layers(model: nn.Module):
    """Change 3. Inside `deepspeed.initialize`, AutoEP would copy each rank's experts out of the MoE
    blocks' whole [E, ...] tensors, so every rank would first hold every expert. parallel/build.py
    builds AutoEP's layers with only the rank's experts before the engine instead; for the duration
    of `initialize`, the engine's `AutoEP.ep_parser` then answers "nothing to replace" for this model
    (DeepSpeed 0.19.8's engine calls the parser once, in `_configure_expert_parallel`, and replaces
    only what it returns). The engine still creates the expert-parallel groups, binds them to the
    layers and partitions ZeRO as usual."""
    from deepspeed.module_inject.auto_ep import AutoEP

    if not autoep_layers(model):
        raise RuntimeError("expert parallelism is on but the model has no AutoEP layer (replace_moe_blocks)")
    detect = AutoEP.ep_parser

    def ep_parser(self):
        return [] if self.model is model else detect(self)

    AutoEP.ep_parser = ep_parser
    try:
        yield
    finally:
        AutoEP.ep_parser = detect


def _check_expert_ranks(model: nn.Module) -> None:
    """After `deepspeed.initialize`: every AutoEP layer holds the experts of its rank in the engine's
    expert-parallel group. The experts were placed when the layer was built (recorded by AutoEP on each
    expert parameter); the engine may since have rebound the layer's own `ep_rank` (under folding it
    does), so the parameters' record is what is compared."""
    from deepspeed.checkpoint.constants import AUTOEP_PARAM_EP_RANK, DS_AUTOEP_UC_META

    for layer in autoep_layers(model):
        actual = dist.get_rank(group=layer.ep_group)
        for param in layer.experts.parameters():
            built_for = getattr(param, DS_AUTOEP_UC_META)[AUTOEP_PARAM_EP_RANK]
            if built_for != actual:
                raise RuntimeError(
                    f"an AutoEP layer was built with the experts of expert-parallel rank {built_for}, but "
                    f"this process is rank {actual} of the engine's expert group: parallel/expert.py's "
                    "expert_parallel_rank no longer matches DeepSpeed's group layout"
                )


def _moe_optimizer_factory(
    model: nn.Module,
    param_groups: Callable[[nn.Module], list[dict]],
    make: Callable[[list[dict]], torch.optim.Optimizer],
) -> Callable:
    """What `deepspeed.initialize(optimizer=...)` calls after its set-up: under ZeRO the expert
    parameters need their own groups (DeepSpeed's MoE groups, by expert-parallel group name)."""
    from deepspeed.moe.utils import split_params_into_different_moe_groups_for_optimizer

    def factory(_model_parameters) -> torch.optim.Optimizer:
        return make(split_params_into_different_moe_groups_for_optimizer(param_groups(model)))

    return factory


def _fold_onto_tensor_parallel(model: nn.Module) -> None:
    """Change 4, before `initialize`: the model's heads are already sharded (parallel/tensor.py), so
    DeepSpeed's AutoTP, which folding switches on, must leave them as they are."""
    model.ds_autotp_parsed = True  # the engine's own flag for a model AutoTP has partitioned


def _after_folded_initialize(model: nn.Module, tp: int) -> None:
    """Change 4, after `initialize`: ZeRO 1-2's gradient norm counts unmarked parameters on TP rank 0
    only, which under folding leaves out the experts the other TP ranks hold. The expert weights are
    marked model-parallel (counted on every rank; folding then skips their TP reduction and its 1/tp),
    and their gradient's factor tp from the all-gather's backward is taken out here."""
    experts = [p for name, p in model.named_parameters() if ".mlp.experts.w" in name]
    if not experts:
        raise RuntimeError("tensor and expert parallelism are on but the model has no AutoEP layer")
    for param in experts:
        param.tensor_model_parallel = True
        param.register_hook(lambda grad: grad / tp)


def _open_autoep_bias_slots(model: nn.Module) -> None:
    """Change 5. AutoEP's router adds the layer's `expert_bias` to the scores for selection only, as our
    block does, but accepts one only with its own `load_balance_coeff` update rule; unconfigured it is
    a plain None attribute. It becomes an empty buffer slot, as on our block, for the balancer
    (train/balancer.py) to fill, so that checkpoints keep it."""
    for layer in autoep_layers(model):
        del layer.expert_bias
        layer.register_buffer("expert_bias", None)


def _return_autoep_router_stats(model: nn.Module) -> None:
    """Change 5. An MoE layer returns its output and its RouterStats (model/moe.py); AutoEP's returns
    the output only, so each layer's `forward` is wrapped to add them. The expert counts are its
    router's own (`num_tokens_per_expert` of DeepSpeed 0.19.8's TokenChoiceTopKRouter, from the experts
    it picked), the probability and z sums come from its gate's logits (the router's softmax is
    internal to it); forward hooks on the router and its gate catch both."""
    for layer in autoep_layers(model):
        caught = {}

        def keep_logits(_gate, _inputs, logits_te, caught=caught):
            caught["logits_te"] = logits_te

        def keep_stats(_router, _inputs, output, caught=caught):
            _weights_tk, _experts_tk, counts_e = output
            logits_te = caught.pop("logits_te")
            caught["stats"] = router_stats(logits_te, logits_te.float().softmax(dim=-1), counts_e)

        def forward_with_stats(hidden_states, forward=layer.forward, caught=caught):
            return forward(hidden_states), caught.pop("stats")

        layer.router.gate.register_forward_hook(keep_logits)
        layer.router.register_forward_hook(keep_stats)
        layer.forward = forward_with_stats


# ---------------------------------------------------------------------------------------------
# Change 6: checkpoints


def _read_checkpoints_with(ds_engine, read: Callable) -> None:
    """DeepSpeed's torch checkpoint engine, loading through `read` (its own loads with
    torch.load(weights_only=False), which runs whatever a file's pickle names)."""
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

    class ReadingCheckpointEngine(TorchCheckpointEngine):
        def load(self, path: str, map_location=None):
            return read(path, map_location=map_location)

    reader = ReadingCheckpointEngine()
    # without a DeepSpeed config the engine would save the legacy (non-zip) format, which cannot be
    # memory-mapped: checkpoints saved after a resume must stay readable lazily (convert_hf.py to-hf)
    reader.zipfile_serialization = True
    ds_engine.checkpoint_engine = reader


def run_ds_to_universal(arguments: list[str], process_pool: Callable) -> None:
    """DeepSpeed's `python -m deepspeed.checkpoint.ds_to_universal ARGUMENTS` with its worker pools
    made by `process_pool` (a ProcessPoolExecutor whose workers restrict their unpickling)."""
    import sys
    from concurrent.futures import ProcessPoolExecutor

    from deepspeed.checkpoint import ds_to_universal

    # its worker pools (_do_parallel_work in 0.19.8) use the name imported into the module
    if getattr(ds_to_universal, "ProcessPoolExecutor", None) is not ProcessPoolExecutor:
        raise RuntimeError(
            "deepspeed.checkpoint.ds_to_universal no longer starts its workers through "
            "ProcessPoolExecutor: check parallel/engine.py's run_ds_to_universal against this DeepSpeed"
        )
    ds_to_universal.ProcessPoolExecutor = process_pool
    sys.argv = ["ds_to_universal", *arguments]  # parse_arguments reads sys.argv
    ds_to_universal.main(ds_to_universal.parse_arguments())
