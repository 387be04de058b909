"""`trainer.dry_run=true`: build the model on the meta device and report what a run would need.

Prints total and active parameters (counted on the built model and by model/accounting.py), the
training FLOPs per token, and the per-rank memory estimate of train/memory.py for the layout, with
whether it fits `trainer.gpu_memory_gb`. Needs no GPU and allocates no weights.

With `trainer.dry_run_rank=R` it then builds rank R's shard of the planned layout for real, on this
machine's CPU in fp32, through the trainer's own pipeline (parallel/build.py: meta model, the rank's
heads and experts, materialised and initialised, from `checkpoint.init_from` when set), without the
other processes, and reports what it
held and cost next to the estimate: a check that a rank of the real run can start.
"""

from __future__ import annotations

import dataclasses
import math
import os
from pathlib import Path

import torch

from model.accounting import count_parameters, flops_per_token
from model.config import LINEAR_ATTENTION, attention_layers
from model.qwen3_next import Qwen3NextForCausalLM
from train.config import Layout, PretrainConfig, recomputed_layers, uses_autoep, validate_layout
from train.memory import GIB, estimate_memory, rank_parameters


def layout_memory(cfg: PretrainConfig, layout: Layout):
    return estimate_memory(
        cfg.model,
        world=layout.world,
        tensor=layout.tensor,
        expert=layout.expert,
        zero_stage=cfg.parallel.zero_stage,
        micro_batch_size=cfg.trainer.micro_batch_size,
        seq_len=cfg.data.seq_len,
        recomputed_layers=recomputed_layers(cfg),
        # the budget steers torch.compile's partitioner: eager layers keep what they keep
        recompute_budget=cfg.trainer.recompute_budget if cfg.trainer.compile else 1.0,
        # parallel/engine.py lends them under ZeRO 1, unless AutoEP is folded onto tensor parallelism
        # or the run allows an untested DeepSpeed (taken to be one: the estimate stays on the safe side)
        lends_gradient_buffers=cfg.parallel.zero_stage == 1
        and not (uses_autoep(cfg, layout) and layout.tensor > 1)
        and not cfg.parallel.untested_deepspeed,
    )


def fewest_recomputed_layers(cfg: PretrainConfig, layout: Layout) -> int | None:
    """The fewest decoder layers to recompute for the layout to fit trainer.gpu_memory_gb."""
    for count in range(cfg.model.num_hidden_layers + 1):
        trainer = dataclasses.replace(cfg.trainer, activation_checkpointing=True, recompute_layers=count)
        trial = dataclasses.replace(cfg, trainer=trainer)
        if fits(trial, layout):
            return count
    return None


def fits(cfg: PretrainConfig, layout: Layout) -> bool:
    budget = cfg.trainer.gpu_memory_gb
    return budget <= 0 or layout_memory(cfg, layout).total <= budget * GIB


def smallest_fitting_world(cfg: PretrainConfig, max_world: int = 1 << 16) -> int | None:
    """The fewest GPUs on which the configured layout is valid and fits trainer.gpu_memory_gb."""
    step = math.lcm(cfg.parallel.tensor, cfg.parallel.expert)
    for world in range(step, max_world + 1, step):
        try:
            layout = validate_layout(cfg, world)
        except ValueError:
            continue
        if fits(cfg, layout):
            return world
    return None


def gpu_shortfall(cfg: PretrainConfig, world: int, cuda_available: bool) -> str | None:
    """Why this launch cannot run the config on GPUs (None when it can, or when the config is for CPU:
    trainer.gpu_memory_gb = 0)."""
    budget = cfg.trainer.gpu_memory_gb
    if budget <= 0:
        return None
    needed = smallest_fitting_world(cfg)
    if needed is None:
        return (
            f"no layout of up to 65536 GPUs with {budget:g} GiB each fits this config (parallel.expert="
            f"{cfg.parallel.expert}, parallel.zero_stage={cfg.parallel.zero_stage}): raise those or turn on "
            "trainer.activation_checkpointing; trainer.dry_run=true shows the estimate"
        )
    need = (
        f"it needs at least {needed} GPU(s) with {budget:g} GiB each (trainer.gpu_memory_gb; per-rank "
        f"estimate {layout_memory(cfg, validate_layout(cfg, needed)).total / GIB:.1f} GiB at that size)"
    )
    plan = f"`trainer.dry_run=true trainer.dry_run_world_size={needed}` shows the plan"
    if not cuda_available:
        return f"no CUDA GPU here, and {need}; {plan}, trainer.gpu_memory_gb=0 runs it on CPU anyway"
    try:
        layout_ok = fits(cfg, validate_layout(cfg, world))
    except ValueError:
        layout_ok = False
    if world < needed or not layout_ok:
        return f"launched on {world} GPU(s), but {need}; {plan}"
    return None


def dry_run_report(cfg: PretrainConfig, layout: Layout) -> tuple[str, bool]:
    """(the report, whether the estimate fits trainer.gpu_memory_gb; True when that is 0 = no limit)."""
    m = cfg.model
    with torch.device("meta"):
        model = Qwen3NextForCausalLM(m)
    built = sum(p.numel() for p in model.parameters())
    mtp = sum(p.numel() for p in model.mtp.parameters()) if model.mtp is not None else 0
    counted = count_parameters(m)
    if built - mtp != counted.total:  # the accounting must describe the model that is built
        raise RuntimeError(
            f"parameter accounting ({counted.total}) disagrees with the built model ({built - mtp})"
        )
    memory = layout_memory(cfg, layout)
    budget = cfg.trainer.gpu_memory_gb
    layout_fits = fits(cfg, layout)
    gflops = flops_per_token(m, cfg.data.seq_len) / 1e9
    lines = [
        f"parameters: {format_parameters(counted.total)} total without MTP "
        f"({format_parameters(counted.experts)} in routed experts), "
        f"{format_parameters(counted.active)} active per token "
        f"({format_parameters(counted.active_without_embedding)} without embeddings); "
        f"MTP adds {format_parameters(counted.mtp)}",
        f"layers: {m.num_hidden_layers}, gated attention at {attention_layers(m.layer_types)}, "
        f"Gated DeltaNet at the other {m.layer_types.count(LINEAR_ATTENTION)} "
        f"(+ {m.mtp_num_layers} MTP, gated attention)",
        f"training FLOPs per token at seq_len {cfg.data.seq_len}: {gflops:.2f} GFLOP "
        f"(with {m.mtp_num_layers} MTP depth(s))",
        f"layout: world {layout.world} = tensor {layout.tensor} x data {layout.data}; "
        f"experts over {layout.expert} rank(s) x expert-data {layout.expert_data}; "
        f"ZeRO stage {cfg.parallel.zero_stage}; {layout.grad_accum} micro-batch(es) of "
        f"{cfg.trainer.micro_batch_size} x {cfg.data.seq_len} per step",
        "memory per rank (estimate): "
        f"parameters {memory.parameters / GIB:.1f} GiB, gradients {memory.gradients / GIB:.1f} GiB, "
        f"optimizer {memory.optimizer / GIB:.1f} GiB, activations {memory.activations / GIB:.1f} GiB; "
        f"total {memory.total / GIB:.1f} GiB",
        *recompute_lines(cfg, layout),
        (
            "no GPU memory limit (trainer.gpu_memory_gb=0)"
            if budget <= 0
            else f"{'fits' if layout_fits else 'does NOT fit'} trainer.gpu_memory_gb = {budget:g} GiB"
        ),
    ]
    return "\n".join(lines), layout_fits


def recompute_lines(cfg: PretrainConfig, layout: Layout) -> list[str]:
    """What the run recomputes, and the least recomputation that would fit the GPU (nothing to say
    without recomputation and without a memory limit)."""
    done = recomputed_layers(cfg)
    line = f"recomputes {done} of {cfg.model.num_hidden_layers} decoder layers in backward"
    if (budget := cfg.trainer.recompute_budget) < 1 and cfg.trainer.compile:
        line += f" (and the cheap ops of the others: trainer.recompute_budget={budget:g})"
    if cfg.trainer.gpu_memory_gb <= 0:
        return [line] if done else []
    fewest = fewest_recomputed_layers(cfg, layout)
    if fewest is None:
        return [f"{line}; no amount of recomputation fits trainer.gpu_memory_gb"]
    hint = "trainer.activation_checkpointing=false" if fewest == 0 else f"trainer.recompute_layers={fewest}"
    return [f"{line}; the fewest that fit trainer.gpu_memory_gb: {fewest} ({hint})"]


def format_parameters(count: float) -> str:
    """'79.67B' from a billion up; below, millions ('4.2M'), where '0.00B' said nothing of a small model."""
    return f"{count / 1e9:.2f}B" if count >= 1e9 else f"{count / 1e6:.1f}M"


def materialise_rank(cfg: PretrainConfig, layout: Layout, rank: int) -> str:
    """Build and initialise `rank`'s shard of `layout` on the CPU (fp32) as the trainer would, and
    report it: `rank R: N parameters materialised (X GiB), peak host memory Y GiB, built in Z s`, and
    the estimate's count for that rank. Raises if the two differ by more than 1%."""
    os.environ.setdefault("DS_ACCELERATOR", "cpu")  # AutoEP's layers come from DeepSpeed; no GPU needed
    from parallel.build import RankPlacement, build_rank_model, peak_host_memory_bytes
    from parallel.engine import check_deepspeed_version, quiet_deepspeed

    quiet_deepspeed()
    if uses_autoep(cfg, layout):  # AutoEP's layers are built through its internals (parallel/expert.py)
        check_deepspeed_version(cfg.parallel.untested_deepspeed)
    placement = RankPlacement(layout.world, rank, layout.tensor, layout.expert, uses_autoep(cfg, layout))
    init_from = cfg.checkpoint.init_from
    model, report = build_rank_model(
        cfg.model,
        placement,
        device="cpu",
        dtype=torch.float32,
        seed=cfg.trainer.seed,
        init_from=Path(init_from) if init_from else None,
    )
    dense, experts = rank_parameters(cfg.model, tensor=layout.tensor, expert=layout.expert)
    estimate = dense + experts
    off = report.parameters / estimate - 1
    lines = [
        f"rank {rank}: {report.parameters:,} parameters materialised ({report.bytes / GIB:.2f} GiB), "
        f"peak host memory {peak_host_memory_bytes() / GIB:.2f} GiB, built in {report.seconds:.1f} s",
        f"estimate for rank {rank}: {estimate:,.0f} parameters ({off:+.2%} off)",
    ]
    if abs(off) > 0.01:
        raise RuntimeError("\n".join(lines) + "\nthe memory estimate (train/memory.py) misses this layout")
    del model
    return "\n".join(lines)
