"""One rank's shard of the model, built without ever holding the whole model.

    plan        the single-device model on the meta device (no storage), then the rank's layout
                applied from outside: tensor-parallel heads and vocabulary rows (parallel/tensor.py,
                parallel/vocab.py), the MoE blocks replaced by AutoEP's layers holding this rank's
                experts only (parallel/expert.py); everything still meta
    materialise real storage for exactly what is left, on the rank's device, in the run's dtype
    initialise  each tensor gets its values from its origin in the 1-process model: the seeded init
                of model/init.py (drawn per parameter, and per expert for the experts, so a rank draws
                only its own), or the tensors of `checkpoint.init_from`, read file by file and only
                the rank's slices (model/hf.py's WeightFiles)

The DeepSpeed engine then takes the model as it is (train/trainer.py). The only transient buffers
are one tensor's value at a time, and for a tensor-parallel slice the whole tensor it is cut from
(one matrix, e.g. the LM head). `trainer.dry_run_rank` runs the same pipeline on the CPU for any rank
of any layout, without the other processes (train/dry_run.py).

An origin says where a rank's tensor sits in the 1-process model's state dict: its name there, the
experts it holds (fused expert tensors), the rows of each expert's matrix (AutoEP's gate and up halves
of our `gate_up_proj`) and the tensor-parallel slice (dim, index). tests/distributed/
test_rank_build.py checks, bit for bit, that every rank's initial weights are those slices.
"""

from __future__ import annotations

import functools
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from model.config import ModelConfig, differing_settings
from model.init import initial_value, is_fused_experts
from model.qwen3_next import Qwen3NextForCausalLM
from model.tensor_files import model_shapes
from parallel.expert import block_layout_name, expert_parallel_rank, local_expert_source, replace_moe_blocks
from parallel.tensor import TensorParallelGroups, TensorParallelPosition, apply_tensor_parallel

# the buffers a planned model may hold, all zero at the start: the aux-loss-free selection bias and
# AutoEP's per-step token counts
ZERO_BUFFERS = ("expert_bias", "tokens_per_expert")


@dataclass(frozen=True)
class RankPlacement:
    """Where a rank sits in a layout: `tensor` consecutive ranks share the heads, experts are spread
    over `expert` ranks (through AutoEP when `autoep`; at expert 1 too, for its parameter names)."""

    world: int
    rank: int
    tensor: int = 1
    expert: int = 1
    autoep: bool = False

    @property
    def tp_rank(self) -> int:
        return self.rank % self.tensor

    @property
    def ep_rank(self) -> int:
        return expert_parallel_rank(self.rank, self.world, self.tensor, self.expert)


@dataclass(frozen=True)
class Origin:
    """Where a rank's tensor comes from in the 1-process model (see the module docstring)."""

    name: str
    experts: range | None = None
    rows: slice | None = None
    tp_dim: int | None = None
    tp_index: torch.Tensor | None = None

    def cut(self, value: torch.Tensor) -> torch.Tensor:
        """The rank's part of `value`, the origin tensor (already restricted to `experts`)."""
        if self.rows is not None:
            value = value[:, self.rows]
        if self.tp_dim is not None:
            value = value.index_select(self.tp_dim, self.tp_index)
        return value


@dataclass(frozen=True)
class BuildReport:
    parameters: int  # elements this rank holds
    bytes: int
    seconds: float


def plan_rank_model(
    config: ModelConfig,
    placement: RankPlacement,
    tp_groups: TensorParallelGroups | TensorParallelPosition | None = None,
) -> Qwen3NextForCausalLM:
    """The model with `placement`'s layout applied, on the meta device: what the rank will hold.
    `tp_groups` carries the process groups of a real run; without it the shards are planned only."""
    with torch.device("meta"):
        model = Qwen3NextForCausalLM(config)
    if placement.tensor > 1:
        apply_tensor_parallel(model, tp_groups or TensorParallelPosition(placement.tensor, placement.tp_rank))
    if placement.autoep:
        replace_moe_blocks(model, placement.expert, placement.ep_rank)
    return model


def materialize(model: nn.Module, device: torch.device | str, dtype: torch.dtype) -> None:
    """Real (uninitialised) storage on `device` for every meta parameter, in `dtype`, and zeros for
    the meta buffers (`ZERO_BUFFERS`: routing biases and token counters start at zero).

    `Module.to_empty` would make new parameter objects and drop what the layout attached to the old
    ones (shard records, DeepSpeed's expert marks, gradient hooks), so each parameter is remade here
    with its Python attributes and its gradient (`register_hook`) hooks carried over; a tied parameter
    stays one parameter."""
    remade: dict[int, nn.Parameter] = {}
    for module in model.modules():
        for key, param in module._parameters.items():
            if param is None or not param.is_meta:
                continue
            if id(param) not in remade:
                remade[id(param)] = _real_parameter(param, device, dtype)
            module._parameters[key] = remade[id(param)]
        for key, buffer in module._buffers.items():
            if buffer is not None and buffer.is_meta:
                if key not in ZERO_BUFFERS:
                    raise RuntimeError(f"materialize: no initial value known for the buffer {key!r}")
                module._buffers[key] = torch.zeros(buffer.shape, dtype=buffer.dtype, device=device)


def _real_parameter(meta: nn.Parameter, device, dtype: torch.dtype) -> nn.Parameter:
    storage_dtype = dtype if meta.dtype.is_floating_point else meta.dtype
    param = nn.Parameter(torch.empty(meta.shape, dtype=storage_dtype, device=device), meta.requires_grad)
    param.__dict__.update(meta.__dict__)
    for hook in (meta._backward_hooks or {}).values():
        param.register_hook(hook)
    if meta._post_accumulate_grad_hooks:
        raise RuntimeError("materialize does not carry post-accumulate-grad hooks over; register them later")
    return param


def origin_of(name: str, param: torch.Tensor) -> Origin:
    """Where the rank's parameter `name` comes from in the 1-process model (the module docstring)."""
    expert_source = local_expert_source(name, param)
    if expert_source is not None:
        source, experts, rows = expert_source
        return Origin(source, experts=experts, rows=rows)
    if is_fused_experts(name):  # our block's experts, all of them: drawn and read expert by expert too
        return Origin(name, experts=range(param.shape[0]))
    tp_dim, tp_index = getattr(param, "tp_shard", (None, None))
    return Origin(block_layout_name(name), tp_dim=tp_dim, tp_index=tp_index)


def origins(model: nn.Module) -> dict[str, Origin]:
    return {name: origin_of(name, param) for name, param in model.named_parameters()}


@torch.no_grad()
def initialise_seeded(model: nn.Module, config: ModelConfig, seed: int, only: set[str] | None = None) -> None:
    """Every parameter (or those named in `only`) gets its slice of the 1-process model's seeded init.

    Each parameter, and each expert of an expert tensor, draws from its own generator, so they are
    drawn in parallel threads, one task per dense tensor or expert (the result does not depend on the
    order). Drawn straight into the parameter where it is fp32 on the CPU and taken whole; otherwise
    drawn aside and copied, so each thread holds at most one transient value: one expert's matrix, or
    the whole tensor a tensor-parallel slice is cut from (at most the LM head)."""
    shapes = model_shapes(config)
    tasks = []
    for name, param in model.named_parameters():
        if only is not None and name not in only:
            continue
        origin = origin_of(name, param)
        shape = shapes[origin.name]
        if origin.experts is None:
            tasks.append(functools.partial(_fill, param, origin, shape, config, seed))
        else:
            for row, expert in enumerate(origin.experts):
                target = param[row : row + 1]
                tasks.append(functools.partial(_fill, target, origin, shape, config, seed, [expert]))
    with ThreadPoolExecutor(max_workers=init_threads()) as pool:
        for done in [pool.submit(task) for task in tasks]:
            done.result()


@torch.no_grad()
def _fill(target, origin: Origin, shape, config: ModelConfig, seed: int, experts=None) -> None:
    in_place = target.dtype == torch.float32 and target.device.type == "cpu" and target.is_contiguous()
    if in_place and origin.rows is None and origin.tp_dim is None:
        initial_value(origin.name, shape, config, seed, experts=experts, out=target)
        return
    aside = None if experts is None else _scratch((len(experts), *shape[1:]))  # one expert, reused
    value = initial_value(origin.name, shape, config, seed, experts=experts, out=aside)
    target.copy_(origin.cut(value))


_thread_scratch = threading.local()


def _scratch(shape: tuple[int, ...]) -> torch.Tensor:
    """This thread's fp32 buffer of `shape`, kept for its next expert: drawing aside expert after
    expert then allocates once per thread, not once per expert (each freed allocation would stay in
    the thread's malloc arena and add to the process's peak)."""
    buffers = _thread_scratch.__dict__.setdefault("buffers", {})
    if shape not in buffers:
        buffers[shape] = torch.empty(shape)
    return buffers[shape]


def init_threads() -> int:
    """Threads for drawing initial values: this process's share of the cores it may run on (torchrun
    starts LOCAL_WORLD_SIZE processes a node), at least 1, at most 32."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(32, cores // int(os.environ.get("LOCAL_WORLD_SIZE", "1"))))


@torch.no_grad()
def load_weights(model: nn.Module, config: ModelConfig, directory: Path, seed: int) -> list[str]:
    """Fill the model from the safetensors in `directory` (HF hub layout, or `convert_hf.py from-hf`'s):
    only the rank's tensors and expert slices are read, one file at a time. MTP weights the files lack
    (plain transformers exports have none) get the seeded init; returns their names."""
    from model.hf import WeightFiles, check_weights
    from model.tensor_files import TensorRequest

    files = WeightFiles(directory)
    check_same_model(files.model_config(), config, directory)
    lacking = set(check_weights(files, model_shapes(config)))  # raises unless only MTP weights lack
    found = origins(model)
    requests = {
        name: TensorRequest(origin.name, experts=origin.experts, rows=origin.rows)
        for name, origin in found.items()
        if origin.name not in lacking
    }
    params = dict(model.named_parameters())
    filled = dict.fromkeys(requests, 0)
    for name, index, piece in files.read(requests):
        origin = found[name]
        if origin.tp_dim is not None:  # a dense tensor arrives whole: cut the rank's slice
            if index != ():
                raise RuntimeError(f"{name}: a tensor-parallel slice needs its tensor whole, got a part")
            piece = piece.index_select(origin.tp_dim, origin.tp_index)
        params[name][index].copy_(piece)
        filled[name] += piece.numel()
    short = [name for name, count in filled.items() if count != params[name].numel()]
    if short:
        raise RuntimeError(f"checkpoint.init_from={directory}: {short[:3]} not wholly read")
    seeded = [name for name, origin in found.items() if origin.name in lacking]
    initialise_seeded(model, config, seed, only=set(seeded))
    return seeded


def check_same_model(saved: ModelConfig, config: ModelConfig, directory: Path) -> None:
    """The weights in `directory` are for the configured architecture (MTP depth may differ)."""
    differing = differing_settings(saved, config, ignore=("mtp_num_layers", "initializer_range"))
    if differing:
        raise ValueError(
            f"checkpoint.init_from={directory} is for another model ({', '.join(differing[:5])})"
        )


def build_rank_model(
    config: ModelConfig,
    placement: RankPlacement,
    *,
    device: torch.device | str,
    dtype: torch.dtype,
    seed: int,
    init_from: Path | None = None,
    tp_groups: TensorParallelGroups | None = None,
) -> tuple[Qwen3NextForCausalLM, BuildReport]:
    """This rank's model, materialised on `device` in `dtype` and initialised (seeded, or from
    `init_from`'s weights): plan, materialise, initialise (the module docstring)."""
    started = time.perf_counter()
    model = plan_rank_model(config, placement, tp_groups)
    materialize(model, device, dtype)
    if init_from is None:
        initialise_seeded(model, config, seed)
    else:
        load_weights(model, config, Path(init_from), seed)
    held = list({id(p): p for p in model.parameters()}.values())
    report = BuildReport(
        parameters=sum(p.numel() for p in held),
        bytes=sum(p.numel() * p.element_size() for p in held),
        seconds=time.perf_counter() - started,
    )
    return model, report


def peak_host_memory_bytes() -> int:
    """This process's peak resident memory so far (Linux: VmHWM; elsewhere ru_maxrss)."""
    status = Path(f"/proc/{os.getpid()}/status")
    if status.exists():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
