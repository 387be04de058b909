"""A training run's working parts from its config: model, engine, objective, balancer and step.

`build_training(cfg, layout, ...)` is what the trainer and `launch/bench.py layout` both call, so that
a benchmark measures the trainer's own step: this rank's model (parallel/build.py: built on the meta
device, only the rank's heads and experts materialised, seeded or loaded from `init_from`), with the
preset's activation checkpointing and compiled layers, under the DeepSpeed engine
(parallel/engine.py) with AdamW over our parameter groups, the objective of `loss.*`, the
aux-loss-free balancer when `loss.expert_bias_rate` > 0, and the `TrainStep` over all of them.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from data.loader import TRAINING, SettingNames, TokenLoader
from model.ops.attention import use_varlen
from model.ops.fusion import compile_fusions
from model.qwen3_next import Qwen3NextForCausalLM
from parallel.build import RankPlacement, build_rank_model
from parallel.engine import Engine, EngineSettings, build_engine
from parallel.tensor import TensorParallelGroups
from train.balancer import ExpertBiasBalancer
from train.config import Layout, PretrainConfig, uses_autoep
from train.losses import TrainingObjective
from train.optim import param_groups, without_names
from train.step import TrainStep


class SkippingAdamW(torch.optim.AdamW):
    """AdamW that leaves the parameters untouched when a gradient holds NaN/inf.

    Only used with ZeRO off (ZeRO's optimizer checks the norm itself). The gradients it sees are
    already all-reduced, so every rank takes the same decision.
    """

    skipped = False

    @torch.no_grad()
    def step(self, closure=None):
        grads = [p.grad for group in self.param_groups for p in group["params"] if p.grad is not None]
        finite = torch.stack([g.isfinite().all() for g in grads]).all() if grads else torch.tensor(True)
        self.skipped = not bool(finite)
        if self.skipped:
            return None
        return super().step(closure)


@dataclass
class Training:
    model: Qwen3NextForCausalLM  # the engine's module
    engine: Engine
    balancer: ExpertBiasBalancer | None
    step: TrainStep  # with the objective of `loss.*`
    dp_group: object  # the ranks holding different tokens (None: the whole world)
    host_group: object  # gloo over the whole world, for flags and counts the host holds (None: alone)


def build_training(
    cfg: PretrainConfig,
    layout: Layout,
    rank: int,
    device: torch.device,
    *,
    init_from: Path | None = None,
    load_universal: bool = False,
) -> Training:
    on_gpu = device.type == "cuda"
    compile_fusions(cfg.trainer.compile_fusions)
    use_varlen(cfg.trainer.varlen_attention)
    tp_groups = TensorParallelGroups(layout.tensor) if layout.tensor > 1 else None
    dp_group = tp_groups.dp_group if tp_groups else None
    model = build_model(cfg, layout, rank, device, tp_groups=tp_groups, init_from=init_from)
    settings = engine_settings(cfg, layout, on_gpu, load_universal=load_universal)
    engine = build_engine(
        model,
        settings,
        make_optimizer=optimizer_factory(cfg, on_gpu),
        param_groups=lambda module: without_names(param_groups(module, cfg.optim.weight_decay)),
        tp_groups=tp_groups,
    )
    balancer = None
    if cfg.loss.expert_bias_rate > 0:
        balancer = ExpertBiasBalancer(engine.moe_layers(), cfg.loss.expert_bias_rate)
    objective = training_objective(cfg, dp_group)
    # Collectives over values the host holds go through gloo on the host: under NCCL they would be
    # queued behind the GPU's work and read back, making the host wait for the previous step
    host_group = dist.new_group(backend="gloo") if layout.world > 1 else None
    counts_on_host = dp_group is None and host_group is not None
    step = TrainStep(
        engine,
        objective,
        mtp_depths=cfg.model.mtp_num_layers,
        vocab_size=cfg.model.vocab_size,
        device=device,
        dp_group=dp_group,
        counts_group=host_group if counts_on_host else dp_group,
        counts_device=torch.device("cpu") if counts_on_host else device,
    )
    return Training(engine.module, engine, balancer, step, dp_group, host_group)


def rank_loader(
    cfg: PretrainConfig,
    layout: Layout,
    rank: int,
    path: str,
    *,
    streams: int,
    num_workers: int,
    skip_corrupt: bool = False,
    index: str | None = None,
    domain: str | None = None,
    verify_sha256: bool | None = None,
    settings: SettingNames = TRAINING,
) -> TokenLoader:
    """This rank's share of the global batches of the shards at `path` (those of one domain, if
    given), in the run's order: the training data (data.path) or the held-out set (data.eval_path,
    `settings` HELD_OUT)."""
    return TokenLoader(
        path,
        seq_len=cfg.data.seq_len,
        global_batch_size=cfg.trainer.global_batch_size,
        micro_batch_size=cfg.trainer.micro_batch_size,
        dp_rank=rank // layout.tensor,
        dp_size=layout.data,
        seed=cfg.trainer.seed,
        streams=streams,
        num_workers=num_workers,
        shuffle_buffer=cfg.data.shuffle_buffer,
        skip_corrupt=skip_corrupt,
        index=index,
        vocab_size=cfg.model.vocab_size,
        verify_sha256=cfg.data.verify_sha256 if verify_sha256 is None else verify_sha256,
        domain=domain,
        settings=settings,
    )


def build_model(
    cfg: PretrainConfig,
    layout: Layout,
    rank: int,
    device: torch.device,
    *,
    tp_groups: TensorParallelGroups | None,
    init_from: Path | None = None,
) -> Qwen3NextForCausalLM:
    """This rank's model as the engine takes it: bf16 on GPUs (what DeepSpeed's bf16 mode would cast
    to), with the preset's activation checkpointing, its layers compiled on GPUs."""
    on_gpu = device.type == "cuda"
    placement = RankPlacement(layout.world, rank, layout.tensor, layout.expert, uses_autoep(cfg, layout))
    model, _ = build_rank_model(
        cfg.model,
        placement,
        device=device,
        dtype=torch.bfloat16 if on_gpu else torch.float32,
        seed=cfg.trainer.seed,
        init_from=init_from,
        tp_groups=tp_groups,
    )
    model.model.activation_checkpointing = cfg.trainer.activation_checkpointing
    model.model.recompute_layers = cfg.trainer.recompute_layers
    if on_gpu and cfg.trainer.compile:
        model.compile_layers(memory_budget=cfg.trainer.recompute_budget)
    return model


def engine_settings(
    cfg: PretrainConfig, layout: Layout, on_gpu: bool, *, load_universal: bool
) -> EngineSettings:
    return EngineSettings(
        world=layout.world,
        tensor=layout.tensor,
        expert=layout.expert,
        grad_accum=layout.grad_accum,
        micro_batch_size=cfg.trainer.micro_batch_size,
        global_batch_size=cfg.trainer.global_batch_size,
        grad_clip=cfg.optim.grad_clip,
        zero_stage=cfg.parallel.zero_stage,
        on_gpu=on_gpu,
        autoep=uses_autoep(cfg, layout),
        expert_chunks=cfg.parallel.expert_chunks,
        load_universal=load_universal,
    )


def optimizer_factory(cfg: PretrainConfig, on_gpu: bool):
    """AdamW from `optim.*` over given parameter groups (with ZeRO off, one that skips non-finite
    steps itself); fused on GPUs: one kernel over the fp32 master partitions."""

    def make(groups: list[dict]) -> torch.optim.Optimizer:
        adamw = SkippingAdamW if cfg.parallel.zero_stage == 0 else torch.optim.AdamW
        betas = (cfg.optim.beta1, cfg.optim.beta2)
        return adamw(groups, lr=cfg.optim.lr, betas=betas, eps=cfg.optim.eps, fused=on_gpu)

    return make


def training_objective(cfg: PretrainConfig, dp_group) -> TrainingObjective:
    """The step's objective from `loss.*`, its global sums over `dp_group`."""
    return TrainingObjective(
        cfg.model.num_experts,
        mtp_weight=cfg.loss.mtp_weight,
        lb_coef=cfg.loss.lb_coef,
        z_coef=cfg.loss.z_coef,
        lb_scope=cfg.loss.lb_scope,
        group=dp_group,
    )
