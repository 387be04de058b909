"""The training step of a parallel layout across processes: `launch/bench.py layout` under torchrun.

    torchrun --nproc_per_node 2 launch/bench.py layout --preset small --expert 2   # ep2
    torchrun --nproc_per_node 2 launch/bench.py layout --preset small --expert 1   # ep1 x dp2
    python launch/bench.py layout --preset 80b_a3b-slice     # the 80B-A3B's layer width on one GPU
    python launch/bench.py layout --preset 80b_a3b-slice --micro-batches 16   # the preset's accumulation

`--preset` takes a conf/ preset or a named slice (SLICES): `80b_a3b-slice` is 4 layers of the
80B-A3B (3 Gated DeltaNet + 1 gated attention) and its MTP layer at full width, 128 experts of the
80B's shape, top-10, 2 x 4096 tokens a GPU: 640 (token, slot) pairs an expert, what each GPU's
experts see at 8-way expert parallelism with 1 x 4096 tokens a rank; the preset's selective
recomputation, with no layer recomputed whole (the preset: 12 of 48 at 64 GPUs; one GPU here also
holds all 2.8B parameters' optimizer state, and under ZeRO 1 the LM heads add their weight gradient
into the optimizer's fp32 buffer, which keeps the peak under the 52.67 GiB that every layer
recomputed took before). Everyone measuring "the 80B width on one GPU" measures this.

Everything is built by the trainer's own set-up (train/build.py: model, DeepSpeed engine, ZeRO,
AutoEP, tensor parallel, the preset's activation checkpointing, the objective) and each step is the
trainer's `TrainStep.run`, on fixed random single-document rows that differ between data-parallel
ranks. The aux-loss-free expert biases are left out. No data loader and no checkpoints: this is the
raw step of the layout. Reported on rank 0: tokens/s over the world, ms per step, TFLOP/s per GPU
(Megatron's counting: model FLOPs, recomputation not counted), peak memory, and from a profiled
step the all-to-all time per MoE layer (forward and backward dispatch and combine together), the
part of it that no compute kernel overlaps (`parallel.expert_chunks` hides the rest), and
where the GPU time goes by op family and by kernel, with the op that launched each
(bench/op_families.py). On CPU the processes talk over gloo,
which makes the numbers a functional check only.

A step is one micro-batch a rank unless `--micro-batches N` asks for N (gradient accumulation, as the
80B preset runs 16 a step at 64 GPUs): the optimizer then steps once every N forward and backward
passes, as in training, and tokens/s and TFLOP/s count all N. With one micro-batch a step the
slice's optimizer works through all 2.8B parameters' state after every one; at the preset's scale
ZeRO divides that state over the data-parallel ranks and accumulation spreads its time over 16.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist

if TYPE_CHECKING:
    from train.build import Training

REPO = Path(__file__).resolve().parent.parent

# named slices: (conf preset, rows a GPU, tokens a row, overrides)
SLICES = {
    "80b_a3b-slice": (
        "80b_a3b",
        2,
        4096,
        ["model.num_hidden_layers=4", "model.num_experts=128", "trainer.recompute_layers=0"],
    ),
}


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="launch/bench.py layout", description=__doc__.splitlines()[0])
    parser.add_argument(
        "--preset", default="small", help=f"conf/conf/<preset>.yaml, or one of {', '.join(SLICES)}"
    )
    parser.add_argument("--expert", type=int, default=1, help="parallel.expert")
    parser.add_argument("--tensor", type=int, default=1, help="parallel.tensor")
    parser.add_argument("--zero-stage", type=int, default=1)
    parser.add_argument("--micro-batch", type=int, default=None, help="rows per rank (default: preset's)")
    parser.add_argument("--seq", type=int, default=None, help="tokens a row (default: preset's)")
    parser.add_argument(
        "--micro-batches", type=int, default=1, help="micro-batches a step a rank (gradient accumulation)"
    )
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--no-compile", action="store_true", help="eager layers on GPU")
    parser.add_argument("--out", type=Path, default=None, help="write the results as JSON here (rank 0)")
    parser.add_argument(
        "--trace",
        type=Path,
        default=None,
        help="write the profiled step's Chrome trace here (rank 0, gzipped) and print where the GPU "
        "waited for the host (bench/host_gaps.py)",
    )
    parser.add_argument("overrides", nargs="*", help="further Hydra overrides, e.g. model.num_experts=64")
    args = parser.parse_args(argv)
    if args.micro_batches < 1:
        parser.error(f"--micro-batches must be at least 1, got {args.micro_batches}")
    return args


def compose_config(args: argparse.Namespace, world: int):
    """The preset with this layout, `--micro-batches` a step per data-parallel rank."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from train.config import register_configs

    register_configs()
    conf, slice_rows, slice_seq, slice_overrides = SLICES.get(args.preset, (args.preset, None, None, []))
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base=None):
        preset = OmegaConf.to_object(compose("pretrain", [f"conf={conf}"]))
        micro_batch = args.micro_batch or slice_rows or preset.trainer.micro_batch_size
        seq = args.seq or slice_seq
        dp = world // args.tensor
        overrides = [
            f"conf={conf}",
            *slice_overrides,
            f"parallel.expert={args.expert}",
            f"parallel.tensor={args.tensor}",
            f"parallel.zero_stage={args.zero_stage}",
            f"trainer.micro_batch_size={micro_batch}",
            f"trainer.global_batch_size={micro_batch * dp * args.micro_batches}",
            f"data.streams={dp}",
            f"trainer.compile={not args.no_compile}",
            # eager layers cannot recompute selectively (the budget steers torch.compile's partitioner)
            *(["trainer.recompute_budget=1.0"] if args.no_compile else []),
            "loss.expert_bias_rate=0",  # the biases' update lives in the training loop
            *([f"data.seq_len={seq}"] if seq else []),
            *args.overrides,
        ]
        return OmegaConf.to_object(compose("pretrain", overrides))


def random_batch(cfg, dp_rank: int) -> dict:
    """Rows of random tokens as the data loader yields them, the same on the ranks of a tensor-parallel
    group; one document a row."""
    gen = torch.Generator().manual_seed(1000 + dp_rank)
    rows, seq = cfg.trainer.micro_batch_size, cfg.data.seq_len
    ids = torch.randint(0, cfg.model.vocab_size, (rows, seq + 1), generator=gen)
    positions = torch.arange(seq).expand(rows, seq)
    return {"input_ids": ids[:, :-1], "labels": ids[:, 1:], "position_ids": positions}


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


def merged(intervals: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """The union of [start, end) intervals as disjoint, sorted intervals."""
    union: list[tuple[float, float]] = []
    for start, end in sorted(i for i in intervals if i[1] > i[0]):
        if union and start <= union[-1][1]:
            union[-1] = (union[-1][0], max(union[-1][1], end))
        else:
            union.append((start, end))
    return union


def exposed_time(communication: list[tuple[float, float]], compute: list[tuple[float, float]]) -> float:
    """How long communication runs while no compute does: |union(communication) - union(compute)|."""
    busy = merged(compute)
    exposed, k = 0.0, 0
    for start, end in merged(communication):
        while k < len(busy) and busy[k][1] <= start:
            k += 1
        cursor, j = start, k
        while j < len(busy) and busy[j][0] < end:
            exposed += max(0.0, busy[j][0] - cursor)
            cursor = max(cursor, busy[j][1])
            j += 1
        exposed += max(0.0, end - cursor)
    return exposed


def exposed_all_to_all_ms(profile) -> float:
    """GPU time of the profiled step in which an all-to-all kernel runs and no compute kernel does
    (on any stream): the communication that overlapping has not hidden."""
    communication, compute = [], []
    for event in profile.events():
        if event.device_type != torch.autograd.DeviceType.CUDA:
            continue
        name, span = event.name.lower(), (event.time_range.start, event.time_range.end)
        if "nccl" in name:
            if "sendrecv" in name or "alltoall" in name:
                communication.append(span)
        elif not name.startswith(("memcpy", "memset")):
            compute.append(span)
    return exposed_time(communication, compute) / 1e3


def write_trace_and_gaps(prof, path: Path) -> str:
    """The profile as a gzipped Chrome trace at `path`, and bench/host_gaps.py's report of it."""
    import gzip
    import shutil
    import tempfile

    from bench.host_gaps import load_trace, report

    with tempfile.TemporaryDirectory() as tmp:
        raw = Path(tmp) / "trace.json"
        prof.export_chrome_trace(str(raw))
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(raw, "rb") as src, gzip.open(path, "wb") as dst:
            shutil.copyfileobj(src, dst)
        return f"trace: {path}\n" + report(load_trace(raw))


def main(argv: list[str] | None = None, on_built: Callable[[Training], None] | None = None) -> None:
    """The benchmark; `on_built`, when given, sees the training set-up before the first step (for
    instrumenting tools such as bench/memory_phases.py)."""
    args = parse(argv)
    from bench.op_families import format_kernels, format_table, largest_kernels, op_families
    from model.accounting import flops_per_token
    from parallel.engine import setup_distributed
    from parallel.expert import autoep_layers
    from train.build import build_training
    from train.config import uses_autoep, validate_layout
    from train.dry_run import layout_memory

    world = int(os.environ.get("WORLD_SIZE", "1"))  # torchrun's; the config needs it first
    cfg = compose_config(args, world)
    device, on_gpu = setup_distributed(cfg.parallel.untested_deepspeed)
    rank = dist.get_rank()
    layout = validate_layout(cfg, world)

    started = time.perf_counter()
    training = build_training(cfg, layout, rank, device)
    if on_built is not None:
        on_built(training)
    synchronize_all(on_gpu)
    engine_ready = time.perf_counter()
    moe_layers = len(autoep_layers(training.model)) if uses_autoep(cfg, layout) else 0
    host_batch = random_batch(cfg, rank // layout.tensor)

    unread = []

    def step() -> None:
        """As the trainer runs it: a step's results read after the next step is launched."""
        unread.append(training.step.run([host_batch] * args.micro_batches, lr=cfg.optim.lr))
        if len(unread) > 1:
            unread.pop(0).result()

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
    with profile(activities=activities, record_shapes=True) as prof:  # shapes: the GEMMs' families
        step()
        synchronize()
    total = all_to_all_ms(prof, on_gpu)
    exposed = exposed_all_to_all_ms(prof) if on_gpu else total  # gloo: all of it
    a2a_ms = torch.tensor([total, exposed], device=device)
    head_rows = training.model.lm_head.weight.shape[0]  # the vocabulary, or this rank's shard of it
    families = op_families(prof, head_rows) if on_gpu else []
    kernels = largest_kernels(prof, head_rows, n=250) if on_gpu else []  # the JSON keeps the long tail
    dist.all_reduce(a2a_ms, op=dist.ReduceOp.MAX)  # the slowest rank's
    a2a_ms, exposed_ms = a2a_ms.tolist()

    global_tokens = cfg.trainer.global_batch_size * cfg.data.seq_len
    passes = moe_layers * args.micro_batches  # MoE layers run in a step
    tokens_per_s = global_tokens * args.steps / elapsed
    result = {
        "device": torch.cuda.get_device_name() if on_gpu else "cpu",
        "world": world,
        "tensor": layout.tensor,
        "expert": layout.expert,
        "data": layout.data,
        "zero_stage": cfg.parallel.zero_stage,
        "micro_batch": cfg.trainer.micro_batch_size,
        "micro_batches": args.micro_batches,
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
        "parameters_per_rank": sum(p.numel() for p in training.model.parameters()),
        "startup_s": engine_ready - process_started(),
        "build_s": engine_ready - started,
        "first_step_s": first_step_s,
        "moe_layers": moe_layers,
        "a2a_ms_per_step": float(a2a_ms),
        # per MoE layer's pass (forward and backward of one micro-batch)
        "a2a_ms_per_moe_layer": float(a2a_ms) / passes if passes else 0.0,
        # the part of it no compute kernel overlaps (GPU; on CPU all of it)
        "a2a_exposed_ms_per_moe_layer": exposed_ms / passes if passes else 0.0,
        "op_families": families,
        "largest_kernels": kernels,
    }
    if rank == 0:
        print(
            f"layout tp{layout.tensor} x dp{layout.data}, ep{layout.expert} on {world} x {result['device']}"
            f"{f', {args.micro_batches} micro-batches a step' if args.micro_batches > 1 else ''}: "
            f"{tokens_per_s:,.0f} tok/s  {result['ms_per_step']:.1f} ms/step  "
            f"{result['tflops_per_gpu']:.1f} TFLOP/s/gpu  all-to-all {result['a2a_ms_per_moe_layer']:.2f} "
            f"ms per MoE layer a micro-batch ({result['a2a_exposed_ms_per_moe_layer']:.2f} not overlapped)"
        )
        print(
            f"start-up {result['startup_s']:.1f} s from process start (model and engine "
            f"{result['build_s']:.1f} s), first step {first_step_s:.1f} s; "
            + (
                f"peak GPU memory {result['peak_mem_all_gib']:.1f} GiB against the dry run's estimate "
                f"{result['estimate_gib']:.1f} GiB"
                if on_gpu
                else ""
            )
        )
        if families:
            print(f"GPU time of a profiled step by op family (rank 0):\n{format_table(families)}")
            print(f"its largest kernels and the ops that launched them:\n{format_kernels(kernels[:30])}")
        if args.out:
            args.out.write_text(json.dumps(result, indent=2))
        if args.trace:
            print(write_trace_and_gaps(prof, args.trace))
    dist.barrier()
    dist.destroy_process_group()
