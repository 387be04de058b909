"""The training step of a parallel layout across processes: `launch/bench.py layout` under torchrun.

    torchrun --nproc_per_node 2 launch/bench.py layout --preset small --expert 2   # ep2
    torchrun --nproc_per_node 2 launch/bench.py layout --preset small --expert 1   # ep1 x dp2

The engine is built as the trainer builds it (`build_engine`: DeepSpeed, ZeRO, AutoEP, tensor
parallel, the preset's activation checkpointing), with the same objective, on fixed random
single-document rows that differ between data-parallel ranks (packed on GPUs, as the trainer
passes them). The aux-loss-free expert biases are left out. No data loader and no checkpoints:
this is the raw step of the layout. Reported on rank 0: tokens/s over the world, ms per step,
TFLOP/s per GPU, peak memory, and from a profiled step the all-to-all time per MoE layer (forward
and backward dispatch and combine together). On CPU the processes talk over gloo, which makes the
numbers a functional check only.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import torch.distributed as dist

REPO = Path(__file__).resolve().parent.parent


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="launch/bench.py layout", description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="small", help="conf/<preset>.yaml")
    parser.add_argument("--expert", type=int, default=1, help="parallel.expert")
    parser.add_argument("--tensor", type=int, default=1, help="parallel.tensor")
    parser.add_argument("--zero-stage", type=int, default=1)
    parser.add_argument("--micro-batch", type=int, default=None, help="rows per rank (default: preset's)")
    parser.add_argument("--seq", type=int, default=None, help="tokens a row (default: preset's)")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--no-compile", action="store_true", help="eager layers on GPU")
    parser.add_argument("--out", type=Path, default=None, help="write the results as JSON here (rank 0)")
    parser.add_argument("overrides", nargs="*", help="further Hydra overrides, e.g. model.num_experts=64")
    return parser.parse_args(argv)


def compose_config(args: argparse.Namespace, world: int):
    """The preset with this layout, one micro-batch a step per data-parallel rank."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from train.config import register_configs

    register_configs()
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base=None):
        preset = OmegaConf.to_object(compose("pretrain", [f"conf={args.preset}"]))
        micro_batch = args.micro_batch or preset.trainer.micro_batch_size
        dp = world // args.tensor
        overrides = [
            f"conf={args.preset}",
            f"parallel.expert={args.expert}",
            f"parallel.tensor={args.tensor}",
            f"parallel.zero_stage={args.zero_stage}",
            f"trainer.micro_batch_size={micro_batch}",
            f"trainer.global_batch_size={micro_batch * dp}",
            f"data.streams={dp}",
            f"trainer.compile={not args.no_compile}",
            "loss.expert_bias_rate=0",  # the biases' update lives in the training loop
            *([f"data.seq_len={args.seq}"] if args.seq else []),
            *args.overrides,
        ]
        return OmegaConf.to_object(compose("pretrain", overrides))


def random_batch(cfg, dp_rank: int, packed: bool) -> dict:
    """Rows of random tokens, the same on the ranks of a tensor-parallel group; one document a row,
    in the packed form when the trainer would use it (on GPUs)."""
    from model.documents import DocumentLayout

    gen = torch.Generator().manual_seed(1000 + dp_rank)
    rows, seq = cfg.trainer.micro_batch_size, cfg.data.seq_len
    ids = torch.randint(0, cfg.model.vocab_size, (rows, seq + 1), generator=gen)
    positions = torch.arange(seq).expand(rows, seq)
    layout = DocumentLayout.from_position_ids(positions, rows, seq, torch.device("cpu"), always_packed=packed)
    return {"input_ids": ids[:, :-1], "labels": ids[:, 1:], "documents": layout}


def synchronize_all(on_gpu: bool) -> None:
    if on_gpu:
        torch.cuda.synchronize()
    dist.barrier()


def process_started() -> float:
    """This process's start, on the clock of time.perf_counter (imports included in a start-up)."""
    import psutil

    return time.perf_counter() - (time.time() - psutil.Process().create_time())


def all_to_all_ms(profile, on_gpu: bool) -> float:
    """Time in all-to-all collectives: on GPU the device kernels (NCCL runs all-to-all as send/recv
    kernels), on CPU the c10d op (gloo works while the caller waits)."""
    total_us = 0.0
    for event in profile.key_averages():
        name = event.key.lower()
        if on_gpu:
            kernel = event.device_type == torch.autograd.DeviceType.CUDA
            if kernel and ("sendrecv" in name or "alltoall" in name):
                total_us += event.self_device_time_total
        elif name.startswith("c10d::alltoall"):
            total_us += event.cpu_time_total
    return total_us / 1e3


def main(argv: list[str] | None = None) -> None:
    args = parse(argv)
    from model.accounting import flops_per_token
    from parallel.expert import attach_after_initialize, autoep_layers
    from parallel.tensor import TensorParallelGroups
    from train.config import uses_autoep, validate_layout
    from train.dry_run import layout_memory
    from train.losses import global_target_counts
    from train.trainer import build_engine, build_model, setup_distributed, training_objective

    device, on_gpu = setup_distributed()
    world, rank = dist.get_world_size(), dist.get_rank()
    cfg = compose_config(args, world)
    layout = validate_layout(cfg, world)
    autoep = uses_autoep(cfg, layout)
    tp_groups = TensorParallelGroups(layout.tensor) if layout.tensor > 1 else None

    started = time.perf_counter()
    model = build_model(cfg, layout, rank, device, on_gpu=on_gpu, autoep=autoep, tp_groups=tp_groups)
    built = time.perf_counter()
    engine = build_engine(cfg, layout, model, on_gpu=on_gpu, autoep=autoep, tp_groups=tp_groups)
    synchronize_all(on_gpu)
    engine_ready = time.perf_counter()
    moe_layers = len(autoep_layers(engine.module)) if autoep else 0
    if autoep:
        attach_after_initialize(engine.module, selection_bias=False)
    dp_group = tp_groups.dp_group if tp_groups else None
    objective = training_objective(cfg, dp_group)
    host_batch = random_batch(cfg, rank // layout.tensor, packed=on_gpu)
    batch = {
        "input_ids": host_batch["input_ids"].to(device),
        "labels": host_batch["labels"].to(device),
        "documents": host_batch["documents"].to(device),
    }
    tokens = global_target_counts([host_batch], cfg.model.mtp_num_layers, group=dp_group, device=device)

    def step() -> None:
        objective.begin_step(tokens)
        out = engine(batch["input_ids"], labels=batch["labels"], documents=batch["documents"])
        engine.backward(objective.micro_batch_loss(out))
        engine.step()
        objective.end_step()

    def synchronize() -> None:
        synchronize_all(on_gpu)

    step()
    synchronize()
    first_step_s = time.perf_counter() - engine_ready
    for _ in range(args.warmup - 1):
        step()
    synchronize()
    peak_all_gib = torch.cuda.max_memory_allocated() / 2**30 if on_gpu else None
    if on_gpu:
        torch.cuda.reset_peak_memory_stats()
    timed_from = time.perf_counter()
    for _ in range(args.steps):
        step()
    synchronize()
    elapsed = time.perf_counter() - timed_from

    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if on_gpu else [])
    with profile(activities=activities) as prof:
        step()
        synchronize()
    a2a_ms = torch.tensor([all_to_all_ms(prof, on_gpu)], device=device)
    dist.all_reduce(a2a_ms, op=dist.ReduceOp.MAX)  # the slowest rank's

    global_tokens = cfg.trainer.global_batch_size * cfg.data.seq_len
    tokens_per_s = global_tokens * args.steps / elapsed
    result = {
        "device": torch.cuda.get_device_name() if on_gpu else "cpu",
        "world": world,
        "tensor": layout.tensor,
        "expert": layout.expert,
        "data": layout.data,
        "zero_stage": cfg.parallel.zero_stage,
        "micro_batch": cfg.trainer.micro_batch_size,
        "seq_len": cfg.data.seq_len,
        "tokens_per_s": tokens_per_s,
        "ms_per_step": 1e3 * elapsed / args.steps,
        "tflops_per_gpu": flops_per_token(cfg.model, cfg.data.seq_len, with_mtp=cfg.model.mtp_num_layers > 0)
        * tokens_per_s
        / world
        / 1e12,
        "peak_mem_gib": torch.cuda.max_memory_allocated() / 2**30 if on_gpu else None,
        # over the whole run, construction and warm-up included, against the dry run's estimate
        "peak_mem_all_gib": max(peak_all_gib, torch.cuda.max_memory_allocated() / 2**30) if on_gpu else None,
        "peak_reserved_gib": torch.cuda.max_memory_reserved() / 2**30 if on_gpu else None,
        "estimate_gib": layout_memory(cfg, layout).total / 2**30,
        "parameters_per_rank": sum(p.numel() for p in model.parameters()),
        "startup_s": engine_ready - process_started(),
        "build_s": built - started,
        "engine_s": engine_ready - built,
        "first_step_s": first_step_s,
        "moe_layers": moe_layers,
        "a2a_ms_per_step": float(a2a_ms),
        "a2a_ms_per_moe_layer": float(a2a_ms) / moe_layers if moe_layers else 0.0,
    }
    if rank == 0:
        print(
            f"layout tp{layout.tensor} x dp{layout.data}, ep{layout.expert} on {world} x {result['device']}: "
            f"{tokens_per_s:,.0f} tok/s  {result['ms_per_step']:.1f} ms/step  "
            f"{result['tflops_per_gpu']:.1f} TFLOP/s/gpu  all-to-all {result['a2a_ms_per_moe_layer']:.2f} "
            f"ms per MoE layer a step"
        )
        print(
            f"start-up {result['startup_s']:.1f} s from process start (model {result['build_s']:.1f} s, "
            f"engine {result['engine_s']:.1f} s), first step {first_step_s:.1f} s; "
            + (
                f"peak GPU memory {result['peak_mem_all_gib']:.1f} GiB against the dry run's estimate "
                f"{result['estimate_gib']:.1f} GiB"
                if on_gpu
                else ""
            )
        )
        if args.out:
            args.out.write_text(json.dumps(result, indent=2))
    dist.barrier()
    dist.destroy_process_group()
