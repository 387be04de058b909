"""The pretraining loop: the model of `model/` under a DeepSpeed engine, fed by `data.loader`.

One optimizer step:
    micro-batches = the next `grad_accum` micro-batches of this rank (data/loader.py)
    tokens        = global_target_counts(micro-batches)      one small all-reduce: the denominators
    for each micro-batch: engine.backward(objective.micro_batch_loss(engine(**batch))); engine.step()
    losses        = objective.end_step()                     the step's exact global values
DeepSpeed owns ZeRO (the optimizer state, and gradients from stage 2, partitioned over the data-
parallel ranks), bf16 with fp32 master weights on GPU (fp32 on CPU), gradient clipping and the
accumulation boundary. A step whose gradient norm is not finite is skipped: DeepSpeed's ZeRO
optimizer drops it (no update, the gradients cleared); with ZeRO off, `SkippingAdamW` does. After
`trainer.max_bad_steps` skipped steps in a row the run stops, leaving the last checkpoint alone.

SIGTERM (what SLURM sends before a time limit or preemption) or a file run.dir/STOP finishes the
current step, saves a checkpoint and exits 0. Every rank sees the stop at the same step: the flag is
all-reduced.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import signal
import socket
import time
import warnings
from dataclasses import asdict
from pathlib import Path

import torch
import torch.distributed as dist
from omegaconf import OmegaConf

from data.loader import TokenLoader, merge_states
from model.accounting import count_parameters, flops_per_token
from model.documents import DocumentLayout, copy_to_device
from model.moe import moe_blocks
from model.ops.cross_entropy import check_labels_in_range
from model.qwen3_next import IGNORE_INDEX, Qwen3NextForCausalLM
from parallel.build import RankPlacement, build_rank_model
from parallel.expert import (
    after_folded_initialize,
    attach_after_initialize,
    autoep_config,
    check_expert_ranks,
    engine_adopts_replaced_layers,
    fold_onto_tensor_parallel,
    moe_optimizer_factory,
    selection_biases,
)
from parallel.tensor import TensorParallelGroups
from train.checkpoint import (
    CheckpointError,
    CheckpointLoadError,
    checkpoint_root,
    choose_checkpoint,
    complete_checkpoints,
    convert_to_universal,
    intact_alternatives,
    load_on_every_rank,
    needs_universal,
    newest_intact,
    read_trainer_state,
    refuse_past_max_steps,
    rng_state,
    save_checkpoint,
    set_rng_state,
    sweep_leftovers,
)
from train.config import Layout, PretrainConfig, uses_autoep
from train.losses import TrainingObjective, all_reduce_sum, global_target_counts, update_expert_biases
from train.monitor import RunMonitor
from train.optim import lr_at, param_groups, without_names
from train.precision import bf16_settings, finish_bf16_setup
from train.run_dir import hold_run_dir, mark_clean_exit


class BadStepsError(RuntimeError):
    """Too many optimizer steps in a row had a non-finite loss or gradient norm."""


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


def replicated_grad_norm(model: torch.nn.Module) -> float:
    """The L2 norm of gradients every rank holds whole (ZeRO off, after DeepSpeed's all-reduce)."""
    norms = [p.grad.detach().float().norm() for p in model.parameters() if p.grad is not None]
    return float(torch.stack(norms).norm()) if norms else 0.0


def deepspeed_config(
    cfg: PretrainConfig, layout: Layout, on_gpu: bool, *, autoep: bool = False, load_universal: bool = False
) -> dict:
    folded = autoep and layout.tensor > 1  # AutoEP folded onto tensor parallelism (parallel/expert.py)
    return {
        **({"checkpoint": {"load_universal": True}} if load_universal else {}),
        # folded, DeepSpeed gets no mpu and counts every rank as a data-parallel one in this check
        "train_batch_size": cfg.trainer.global_batch_size * (layout.tensor if folded else 1),
        **({"tensor_parallel": {"autotp_size": layout.tensor}} if folded else {}),
        "train_micro_batch_size_per_gpu": cfg.trainer.micro_batch_size,
        "gradient_accumulation_steps": layout.grad_accum,
        "gradient_clipping": cfg.optim.grad_clip,
        "zero_optimization": {"stage": cfg.parallel.zero_stage},
        **bf16_settings(on_gpu, cfg.parallel.zero_stage, folded=folded),
        **({"expert_parallel": autoep_config(layout.expert)} if autoep else {}),
        "zero_allow_untested_optimizer": True,  # torch's AdamW under ZeRO
        "steps_per_print": 2**31 - 1,  # the trainer prints its own line
        "wall_clock_breakdown": False,
        # DeepSpeed's throughput timer synchronizes the device at every micro-batch's forward and
        # step; each sync drained the GPU's queue (8 a step; on an H100 the loop lost ~5% to them)
        "timers": {"throughput": {"enabled": False}},
    }


def quiet_deepspeed() -> None:
    """DeepSpeed logs every set-up detail at INFO; the trainer prints what a user needs."""
    from deepspeed.utils import logger

    logger.setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", message=".*all_gather_into_tensor.*", category=FutureWarning)
    warnings.filterwarnings("ignore", message=".*reduce_scatter_tensor.*", category=FutureWarning)


def skip_deepspeed_cpu_shm_build() -> None:
    """Keep DeepSpeed from JIT-compiling its shared-memory all-reduce op on CPU.

    On the CPU accelerator DeepSpeed builds a C++ extension at the first `init_distributed` (1-2
    minutes on a laptop, and a compiler required) only to speed up CPU all-reduces; gloo does them
    correctly, and CPU runs here are tests and demos. DeepSpeed has no setting for it, so the op is
    marked unavailable the way DeepSpeed marks ops it cannot build.
    """
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False


def find_free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def stop_signal_flag() -> dict:
    """A flag set by SIGTERM / SIGINT, checked between steps.

    Repeats are ignored rather than escalated: under torchrun (and srun) a worker receives the signal
    twice, once from the scheduler and once forwarded by its launcher, and must still save.
    """
    flag = {"signal": None}

    def handler(signum, _frame):
        flag["signal"] = flag["signal"] or signal.Signals(signum).name

    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, handler)
    return flag


def build_model(
    cfg: PretrainConfig,
    layout: Layout,
    rank: int,
    device: torch.device,
    *,
    on_gpu: bool,
    autoep: bool,
    tp_groups: TensorParallelGroups | None,
    init_from: Path | None = None,
) -> Qwen3NextForCausalLM:
    """This rank's model as the engine takes it (parallel/build.py: built on the meta device, only the
    rank's heads and experts materialised on `device`, bf16 on GPUs, seeded or loaded from
    `init_from`), with the preset's activation checkpointing and expert biases, its layers compiled
    on GPUs."""
    placement = RankPlacement(layout.world, rank, layout.tensor, layout.expert, autoep)
    dtype = torch.bfloat16 if on_gpu else torch.float32  # what DeepSpeed's bf16 mode would cast to
    model, _ = build_rank_model(
        cfg.model,
        placement,
        device=device,
        dtype=dtype,
        seed=cfg.trainer.seed,
        init_from=init_from,
        tp_groups=tp_groups,
    )
    model.model.activation_checkpointing = cfg.trainer.activation_checkpointing
    if cfg.loss.expert_bias_rate > 0 and not autoep:  # AutoEP's layers get theirs after initialize
        for block in moe_blocks(model):
            block.enable_expert_bias()
    if tp_groups is None and not autoep:
        # lets ds_to_universal convert the checkpoints (AutoEP writes its own entry): plain
        # parameters, no slicing rules to record
        from deepspeed.checkpoint.constants import (
            UNIVERSAL_CHECKPOINT_INFO,
            UNIVERSAL_CHECKPOINT_VERSION_KEY,
            UNIVERSAL_CHECKPOINT_VERSION_VALUE,
        )

        setattr(
            model,
            UNIVERSAL_CHECKPOINT_INFO,
            {UNIVERSAL_CHECKPOINT_VERSION_KEY: UNIVERSAL_CHECKPOINT_VERSION_VALUE},
        )
    if on_gpu and cfg.trainer.compile:
        model.compile_layers()
    return model


def build_engine(
    cfg: PretrainConfig,
    layout: Layout,
    model: Qwen3NextForCausalLM,
    *,
    on_gpu: bool,
    autoep: bool,
    tp_groups: TensorParallelGroups | None,
    load_universal: bool = False,
):
    """The DeepSpeed engine over `model` (built, head-sharded under tensor parallelism, on its device):
    AdamW over our parameter groups (under AutoEP built by a factory that puts the experts into
    DeepSpeed's MoE groups), AutoEP folded onto the tensor-parallel ranks when both are on."""
    import deepspeed

    def groups_of(module: torch.nn.Module) -> list[dict]:
        return without_names(param_groups(module, cfg.optim.weight_decay))

    def make_optimizer(groups: list[dict]) -> torch.optim.Optimizer:
        adamw = SkippingAdamW if cfg.parallel.zero_stage == 0 else torch.optim.AdamW
        betas = (cfg.optim.beta1, cfg.optim.beta2)
        # fused: one kernel over the fp32 master partitions
        return adamw(groups, lr=cfg.optim.lr, betas=betas, eps=cfg.optim.eps, fused=on_gpu)

    if autoep:
        optimizer = moe_optimizer_factory(model, groups_of, make_optimizer)
    else:
        optimizer = make_optimizer(groups_of(model))
    folded = autoep and layout.tensor > 1
    if folded:
        fold_onto_tensor_parallel(model)
    # the MoE blocks were replaced by AutoEP's layers when the model was built (parallel/build.py)
    adopting = engine_adopts_replaced_layers(model) if autoep else contextlib.nullcontext()
    with adopting:
        engine, *_ = deepspeed.initialize(
            model=model,
            optimizer=optimizer,
            mpu=None if folded else tp_groups,  # folded: DeepSpeed builds the same groups itself
            config=deepspeed_config(cfg, layout, on_gpu, autoep=autoep, load_universal=load_universal),
            dist_init_required=False,
        )
    if autoep:
        check_expert_ranks(engine.module)
    if folded:
        after_folded_initialize(engine.module, layout.tensor)
    finish_bf16_setup(engine, layout.world)
    return engine


def training_objective(
    cfg: PretrainConfig, dp_group, selection_biases: list[torch.Tensor] | None = None
) -> TrainingObjective:
    """The step's objective from `loss.*`, its global sums over `dp_group` (the ranks holding
    different tokens)."""
    return TrainingObjective(
        cfg.model.num_experts,
        cfg.model.num_experts_per_tok,
        mtp_weight=cfg.loss.mtp_weight,
        lb_coef=cfg.loss.lb_coef,
        z_coef=cfg.loss.z_coef,
        selection_biases=selection_biases,
        group=dp_group,
    )


def setup_distributed() -> tuple[torch.device, bool]:
    """torch.distributed through DeepSpeed (NCCL on GPUs, gloo on CPU; a world of one without
    torchrun), this rank's device, and whether it is a GPU."""
    on_gpu = torch.cuda.is_available()
    if not on_gpu:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")  # said up front, DeepSpeed does not warn
    import deepspeed

    quiet_deepspeed()
    if on_gpu:
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
        skip_deepspeed_cpu_shm_build()
    if not dist.is_initialized():  # `python launch/pretrain.py` without torchrun: a world of one
        for key, value in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1")):
            os.environ.setdefault(key, value)
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(find_free_port()))
    deepspeed.init_distributed(dist_backend="nccl" if on_gpu else "gloo", verbose=False)
    return device, on_gpu


def leave_distributed() -> None:
    """Every rank leaves the process group together once the run is over: one that still holds it
    at interpreter exit, after rank 0 (the rendezvous store's host) has gone, was seen to abort in a
    C++ background thread ("terminate called without an active exception") under a loaded machine."""
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


class Trainer:
    """Build everything from a validated config, then `fit()`."""

    def __init__(self, cfg: PretrainConfig, layout: Layout):
        self.cfg = cfg
        self.layout = layout
        self.run_dir = Path(cfg.run.dir)
        self.stop_file = self.run_dir / "STOP"
        self.autoep = uses_autoep(cfg, layout)
        # what DeepSpeed's native checkpoint files depend on (a change needs the universal form)
        self.partitioning = {
            "world": layout.world,
            "tensor": layout.tensor,
            "expert": layout.expert,
            "zero_stage": cfg.parallel.zero_stage,
            "autoep": self.autoep,
        }
        self.device, self.on_gpu = setup_distributed()
        self.rank = dist.get_rank()
        self.is_main = self.rank == 0
        # before anything is written into run.dir: one run per directory (train/run_dir.py)
        self.run_dir_lock = hold_run_dir(self.run_dir, self.is_main)
        self.config_yaml = OmegaConf.to_yaml(OmegaConf.structured(cfg))
        if self.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            (self.run_dir / "config.yaml").write_text(self.config_yaml)

        started = time.perf_counter()
        self._message_early(f"building the model and the DeepSpeed engine on {self.device} ...")
        self.resume_from, self.resume_universal = self._resume_source()
        self.tp_groups = TensorParallelGroups(layout.tensor) if layout.tensor > 1 else None
        self.dp_group = self.tp_groups.dp_group if self.tp_groups else None  # ranks with different tokens
        self.model = self._build_model()
        self.engine = self._build_engine()
        params = sum(p.numel() for p in self.model.parameters())
        self._message_early(f"{params / 1e6:.1f}M parameters ready in {time.perf_counter() - started:.1f} s")
        self.loader = TokenLoader(
            cfg.data.path,
            seq_len=cfg.data.seq_len,
            global_batch_size=cfg.trainer.global_batch_size,
            micro_batch_size=cfg.trainer.micro_batch_size,
            dp_rank=self.rank // layout.tensor,
            dp_size=layout.data,
            seed=cfg.trainer.seed,
            streams=cfg.data.streams,
            num_workers=cfg.data.num_workers,
            shuffle_buffer=cfg.data.shuffle_buffer,
            skip_corrupt=cfg.data.skip_corrupt,
            index=cfg.data.index,
            vocab_size=cfg.model.vocab_size,
            verify_sha256=cfg.data.verify_sha256,
        )
        self.expert_biases = self._expert_biases()
        self.objective = training_objective(cfg, self.dp_group, self.expert_biases)
        self.mtp_depths = cfg.model.mtp_num_layers
        self.step = 0
        self.tokens_seen = 0
        self.step_clock = time.perf_counter()  # when the last step ended (reset as fit starts)
        self.skipped_steps = 0
        self.bad_in_row = 0
        self.last_saved_step = None
        self._resume()
        self.monitor = RunMonitor(
            self.run_dir,
            is_main=self.is_main,
            total_steps=cfg.trainer.max_steps,
            wandb_mode=cfg.logging.wandb.mode,
            wandb_project=cfg.logging.wandb.project,
            wandb_entity=cfg.logging.wandb.entity,
            wandb_name=cfg.logging.wandb.name,
            config=OmegaConf.to_container(OmegaConf.structured(cfg)),
            plot_every=cfg.logging.plot_every,
            log_every=cfg.trainer.log_every,
            resume_step=self.step,
        )
        self.flops_per_token = flops_per_token(cfg.model, cfg.data.seq_len, with_mtp=self.mtp_depths > 0)

    # -- set-up --------------------------------------------------------------------------------

    def _build_model(self) -> Qwen3NextForCausalLM:
        init_from = self.cfg.checkpoint.init_from if self.resume_from is None else None
        model = build_model(
            self.cfg,
            self.layout,
            self.rank,
            self.device,
            on_gpu=self.on_gpu,
            autoep=self.autoep,
            tp_groups=self.tp_groups,
            init_from=Path(init_from) if init_from else None,
        )
        if init_from:
            self._message_early(f"initial weights from {init_from}")
        return model

    def _build_engine(self):
        return build_engine(
            self.cfg,
            self.layout,
            self.model,
            on_gpu=self.on_gpu,
            autoep=self.autoep,
            tp_groups=self.tp_groups,
            load_universal=self.resume_universal,
        )

    def _expert_biases(self) -> list[torch.Tensor] | None:
        """After initialize: the router recorder on AutoEP's routers, and the MoE layers' aux-loss-free
        selection biases in fp32 (loss.expert_bias_rate > 0), in router call order."""
        with_bias = self.cfg.loss.expert_bias_rate > 0
        if self.autoep:
            return attach_after_initialize(self.engine.module, selection_bias=with_bias)
        return selection_biases(self.engine.module) if with_bias else None

    def _resume_source(self) -> tuple[Path | None, bool]:
        """The checkpoint to resume from, and whether it needs the universal form (saved partitioned
        otherwise); decided before the engine is built, which must know the latter. The checkpoint is
        checked against its manifest first (`choose_checkpoint`: auto falls back past damaged ones)."""
        self._sweep_checkpoint_leftovers()
        path = choose_checkpoint(self.cfg.checkpoint.resume, self.run_dir, self._message_early)
        state = read_trainer_state(path) if path else {}
        if path is not None:
            refuse_past_max_steps(path, state["step"], self.cfg.trainer.max_steps)
        self._set_aside_later_checkpoints(state.get("step", 0))
        if path is None:
            return None, False
        saved = state.get("partitioning", {})
        if saved.get("tensor", 1) != self.layout.tensor:
            raise ValueError(
                f"{path} was saved with parallel.tensor={saved.get('tensor', 1)}; changing the tensor-"
                "parallel size across a resume is not supported yet (DeepSpeed's universal checkpoint would "
                "need our head-slicing rules): resume with that parallel.tensor"
            )
        saved_autoep = saved.get("autoep", saved.get("expert", 1) > 1)
        if saved_autoep != self.autoep:
            hint = (
                "parallel.autoep=true (any parallel.expert, 1 included)"
                if saved_autoep
                else "parallel.expert=1 parallel.autoep=false, the layout it was saved with"
            )
            raise ValueError(
                f"{path} holds the MoE in {'AutoEP' if saved_autoep else 'our'} parameter layout, this run "
                f"uses {'AutoEP' if self.autoep else 'ours'}; resume it with {hint}"
            )
        universal = needs_universal(path, state.get("partitioning"), self.partitioning)
        if universal and self.layout.tensor > 1:
            raise ValueError(
                f"{path} was saved partitioned as {saved}; resharding it under tensor parallelism is not "
                "supported yet (DeepSpeed's universal checkpoint would need our head-slicing rules): resume "
                "with the layout it was saved with"
            )
        if universal:
            self._message_early(f"{path} was saved partitioned as {saved}: converting it to universal form")
            convert_to_universal(path)
        return path, universal

    def _set_aside_later_checkpoints(self, start_step: int) -> None:
        """Checkpoints past the step this run starts from (checkpoint.resume=none, or an earlier
        step_N to rewind to) belong to an abandoned future: moved to checkpoints/.abandoned/, so that
        neither keep-rotation nor a later resume=auto mixes them with this run's."""
        later = [
            path for step, path in complete_checkpoints(checkpoint_root(self.run_dir)) if step > start_step
        ]
        if later and self.is_main:
            aside = checkpoint_root(self.run_dir) / ".abandoned" / time.strftime("%Y%m%d-%H%M%S")
            aside.mkdir(parents=True, exist_ok=True)
            for path in later:
                os.replace(path, aside / path.name)
            self._message_early(f"moved {len(later)} checkpoint(s) after step {start_step} to {aside}")
        dist.barrier()

    def _sweep_checkpoint_leftovers(self) -> None:
        """What interrupted saves and removals left (staging, trash), before any checkpoint is chosen."""
        if self.is_main:
            for line in sweep_leftovers(checkpoint_root(self.run_dir)):
                self._message_early(line)
        dist.barrier()

    def _resume(self) -> None:
        path = self.resume_from
        if path is None:
            return
        while True:
            self._message_early(f"resuming from {path}")
            try:
                trainer_state, rank_states = load_on_every_rank(
                    self.engine, path, universal=self.resume_universal
                )
                break
            except CheckpointLoadError as error:
                path = self._fallback_after_load_error(path, error)
        self.resume_from = path
        self.step = trainer_state["step"]
        self.tokens_seen = trainer_state["tokens"]
        self.skipped_steps = trainer_state.get("skipped_steps", 0)
        self.bad_in_row = trainer_state.get("bad_in_row", 0)
        self.last_saved_step = self.step
        self.loader.load_state_dict(merge_states([s["loader"] for s in rank_states]))
        if len(rank_states) == self.layout.world:
            set_rng_state(rank_states[self.rank]["rng"])

    def _fallback_after_load_error(self, path: Path, error: CheckpointLoadError) -> Path:
        """After `path` passed its checks but failed to load (every rank knows): with
        checkpoint.resume=auto the newest intact checkpoint before it, loaded into the same engine
        (a new load replaces all the failed one set), with later ones set aside; otherwise stop,
        listing the intact ones."""
        root = checkpoint_root(self.run_dir)
        if self.cfg.checkpoint.resume != "auto":
            raise CheckpointError(
                f"{error}\n{intact_alternatives(path.parent, self._message_early, besides=path)}"
            )
        fallback = newest_intact(root, self._message_early, below=read_trainer_state(path)["step"])
        if fallback is None:
            raise CheckpointError(
                f"{error}\nNo earlier checkpoint in {root}: checkpoint.resume=none starts over."
            )
        self._message_early(f"WARNING: {error}")
        self._message_early(f"falling back to the newest intact checkpoint before it, {fallback}")
        state = read_trainer_state(fallback)
        if needs_universal(fallback, state.get("partitioning"), self.partitioning) != self.resume_universal:
            raise CheckpointError(
                f"{error}\nThe newest intact checkpoint before it, {fallback}, was saved in another layout: "
                f"resume from it with checkpoint.resume={fallback}"
            )
        if self.resume_universal:
            convert_to_universal(fallback)
        self._set_aside_later_checkpoints(state["step"])
        return fallback

    def _message_early(self, text: str) -> None:
        if self.is_main:
            print(f"pretrain: {text}", flush=True)

    # -- the loop ------------------------------------------------------------------------------

    def fit(self) -> None:
        cfg = self.cfg
        stop = stop_signal_flag()
        batches = iter(self.loader)
        stopped_by = None
        where = f"{self.layout.world} {'GPU(s)' if self.on_gpu else 'CPU process(es)'}"
        self.monitor.message(
            f"training {cfg.trainer.max_steps - self.step} steps from step {self.step} on {where}; "
            f"run dir {self.run_dir}"
        )
        if self.on_gpu and "OMP_NUM_THREADS" not in os.environ:
            # The GPU does the math; the host only checks and moves small batches. With a thread per
            # core, torch's OpenMP pool stretched those 0.1 ms ops to stalls of up to 36 ms (16-core H100
            # machine) while the GPU waited: the loop ran at 0.85 of the raw step, at 0.90 with one
            # thread. Set here, after the model's initialisation on the host, which wants every core.
            # torchrun sets the same for several processes a node.
            torch.set_num_threads(1)
        with self.monitor, self.loader:
            # a step's time runs from the end of the one before: it includes the logging and the stop
            # check between steps, but not a checkpoint's save or a profile's export
            self.step_clock = time.perf_counter()
            while self.step < cfg.trainer.max_steps:
                stopped_by = self._agreed_stop(stop["signal"])
                if stopped_by:
                    break
                with self._profiler_at(self.step + 1):
                    metrics, expert_tokens = self._train_step(batches)
                self.monitor.log_step(metrics, expert_tokens)
                if metrics["bad_step"]:
                    self.bad_in_row += 1
                    if self.bad_in_row >= cfg.trainer.max_bad_steps:
                        raise BadStepsError(
                            f"{self.bad_in_row} steps in a row had a non-finite loss or gradient norm "
                            f"(trainer.max_bad_steps={cfg.trainer.max_bad_steps}); stopping at step "
                            f"{self.step}. The last checkpoint ({self._last_checkpoint_text()}) is "
                            "untouched: lower optim.lr or check the data, then resume from it."
                        )
                    continue
                self.bad_in_row = 0
                if self.expert_biases is not None and expert_tokens is not None:
                    update_expert_biases(self.expert_biases, expert_tokens, cfg.loss.expert_bias_rate)
                if cfg.checkpoint.every and self.step % cfg.checkpoint.every == 0:
                    self.save()
                    self.step_clock = time.perf_counter()
            if self.last_saved_step != self.step:
                self.save()
            if stopped_by and self.is_main:
                self.stop_file.unlink(missing_ok=True)  # spent: the resumed run must not stop at once
            if stopped_by:
                self.monitor.message(
                    f"{stopped_by}: stopped after step {self.step} with a checkpoint; rerun the same "
                    "command to resume"
                )
            else:
                self.monitor.message(
                    f"done: {self.step} steps; metrics {self.run_dir / 'metrics.jsonl'}, "
                    f"plots {self.run_dir / 'loss.png'} and {self.run_dir / 'expert_load.png'}"
                )
        if self.is_main:  # for launchers whose exit status cannot say it (launch/slurm/pretrain.sbatch)
            mark_clean_exit(self.run_dir, self.step, stopped_by)
        self.run_dir_lock.release()

    def _train_step(self, batches) -> tuple[dict, torch.Tensor | None]:
        cfg = self.cfg
        host_batches = [next(batches) for _ in range(self.layout.grad_accum)]
        lr = lr_at(
            self.step + 1,
            lr=cfg.optim.lr,
            warmup_steps=cfg.optim.warmup_steps,
            total_steps=cfg.optim.schedule_steps or cfg.trainer.max_steps,
            schedule=cfg.optim.schedule,
            min_lr_ratio=cfg.optim.min_lr_ratio,
            decay_fraction=cfg.optim.decay_fraction,
        )
        for group in self.engine.optimizer.param_groups:
            group["lr"] = lr

        tokens = global_target_counts(host_batches, self.mtp_depths, group=self.dp_group, device=self.device)
        self.objective.begin_step(tokens)
        skipped_before = self.engine.skipped_steps
        grad_norm = None
        for number, host_batch in enumerate(host_batches, start=1):
            # checked and moved one at a time: from the second on, this host work overlaps the GPU's
            # work on the micro-batch before, instead of leaving the GPU idle at the step's start
            batch = self._to_device(host_batch)
            out = self.engine(batch["input_ids"], labels=batch["labels"], documents=batch["documents"])
            self.engine.backward(self.objective.micro_batch_loss(out))
            if number == len(host_batches) and cfg.parallel.zero_stage == 0:
                grad_norm = replicated_grad_norm(self.model)  # DeepSpeed reports none without ZeRO
            self.engine.step()
        losses = self.objective.end_step()
        grad_norm = self._grad_norm() if grad_norm is None else grad_norm
        bad = (
            self.engine.skipped_steps > skipped_before
            or getattr(self.engine.optimizer, "skipped", False)
            or not math.isfinite(grad_norm)
            or not math.isfinite(losses.loss)
        )
        now = time.perf_counter()
        elapsed, self.step_clock = now - self.step_clock, now

        self.step += 1
        step_tokens = cfg.trainer.global_batch_size * cfg.data.seq_len
        self.tokens_seen += step_tokens
        self.skipped_steps += int(bad)
        tokens_per_s = step_tokens / elapsed
        metrics = {
            "step": self.step,
            **losses.as_metrics(),
            "lr": lr,
            "grad_norm": grad_norm,
            "tokens": self.tokens_seen,
            "tokens_per_s": tokens_per_s,
            "tflops_per_gpu": self.flops_per_token * tokens_per_s / self.layout.world / 1e12,
            "step_time_s": elapsed,
            "bad_step": int(bad),
            "skipped_steps": self.skipped_steps,
            **{f"data_{k}": v for k, v in self._data_metrics().items()},
        }
        if self.layout.expert > 1:
            metrics.update(self._all_to_all_volume(losses.local_expert_tokens))
        return metrics, losses.expert_tokens if losses.expert_tokens.numel() else None

    def _data_metrics(self) -> dict[str, int]:
        """The loader's counters, skipped shards summed over the data-parallel ranks (each skips the
        shards of its own streams; without data.skip_corrupt a bad shard stops the run instead)."""
        metrics = self.loader.metrics()
        if self.cfg.data.skip_corrupt and self.layout.data > 1:
            local = torch.tensor([float(metrics["skipped_shards"])], device=self.device)
            metrics["skipped_shards"] = int(all_reduce_sum(local, self.dp_group).item())
        return metrics

    def _all_to_all_volume(self, local_counts_le: torch.Tensor) -> dict[str, float]:
        """Expert-parallel traffic of the step, over all ranks: the (token, slot) pairs routed to an
        expert on another rank of the EP group (AutoEP: rank r holds the experts of slice r % ep),
        and the bytes they move: hidden-size activations out and back (dispatch, combine), forward
        and backward, plus one more forward under activation checkpointing."""
        ep, experts = self.layout.expert, local_counts_le.shape[1]
        local_slice = slice((self.rank % ep) * experts // ep, (self.rank % ep + 1) * experts // ep)
        remote = local_counts_le.sum() - local_counts_le[:, local_slice].sum()
        total = torch.tensor([float(remote)], device=self.device)
        dist.all_reduce(total)
        # tensor-parallel peers route the same tokens and (folded) each dispatches a 1/tp share of
        # them; their counts against their own slices, averaged, estimate what moves
        total /= self.layout.tensor
        passes = 3 if self.cfg.trainer.activation_checkpointing else 2
        element_bytes = 2 if self.on_gpu else 4
        moved = float(total) * 2 * passes * self.cfg.model.hidden_size * element_bytes
        return {"a2a_remote_slots": float(total), "a2a_gib": moved / 2**30}

    @contextlib.contextmanager
    def _profiler_at(self, step: int):
        """torch.profiler over steps trainer.profile_step .. + profile_steps - 1 (main rank): the
        operator table and a Chrome trace under run.dir/profile/."""
        first, count = self.cfg.trainer.profile_step, self.cfg.trainer.profile_steps
        if first and step == first and self.is_main:
            activities = [torch.profiler.ProfilerActivity.CPU]
            if self.on_gpu:
                activities.append(torch.profiler.ProfilerActivity.CUDA)
            self._profiler = torch.profiler.profile(activities=activities)
            self._profiler.__enter__()
        yield
        if getattr(self, "_profiler", None) is not None and step == first + count - 1:
            self._profiler.__exit__(None, None, None)
            out = self.run_dir / "profile"
            out.mkdir(exist_ok=True)
            events = self._profiler.key_averages()
            device_sort = "self_device_time_total" if self.on_gpu else "self_cpu_time_total"
            tables = [
                f"steps {first}..{step}, sorted by {key}\n{events.table(sort_by=key, row_limit=40)}"
                for key in dict.fromkeys((device_sort, "cpu_time_total"))
            ]
            (out / "operators.txt").write_text("\n\n".join(tables))
            self._profiler.export_chrome_trace(str(out / "trace.json"))
            self._profiler = None
            self.monitor.message(f"profile of steps {first}..{step} in {out}")
            self.step_clock = time.perf_counter()

    def _grad_norm(self) -> float:
        norm = self.engine.get_global_grad_norm()
        if norm is None:
            return float("nan")
        return float(norm.item() if torch.is_tensor(norm) else norm)

    def _to_device(self, batch: dict[str, torch.Tensor]) -> dict:
        """The model's inputs on the training device: for a GPU, ids and labels checked and the document
        layout derived on the host first. On the GPU each of those would be a host sync that drains the
        GPU's queue, several per micro-batch, so the model leaves the range checks to us there (on CPU
        it makes them itself, in forward)."""
        ids_bt, labels_bt = batch["input_ids"], batch["labels"]
        if self.on_gpu:
            self.model.check_input_ids(ids_bt)
            check_labels_in_range(labels_bt.flatten(), self.cfg.model.vocab_size, IGNORE_INDEX)
        # on the GPU always the packed form: one form for the compiled layers and fla's tuned kernels
        documents = DocumentLayout.from_position_ids(
            batch["position_ids"], *ids_bt.shape, ids_bt.device, always_packed=self.on_gpu
        )
        return {
            "input_ids": copy_to_device(ids_bt, self.device),
            "labels": copy_to_device(labels_bt, self.device),
            "documents": documents.to(self.device),
        }

    def _agreed_stop(self, signal_name: str | None) -> str | None:
        """Why to stop now, if any rank got a stop signal or sees run.dir/STOP (all ranks then stop at
        the same step). The file serves launchers that cannot signal the workers themselves: torchrun
        kills its workers 30 s after forwarding a SIGTERM, which a large checkpoint may outlast."""
        if signal_name is None and self.stop_file.exists():
            signal_name = f"{self.stop_file} found"
        flag = torch.tensor([1.0 if signal_name else 0.0], device=self.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        if flag.item() == 0:
            return None
        return signal_name or "stop signal on another rank"

    def _last_checkpoint_text(self) -> str:
        if self.last_saved_step is None:
            return "none saved yet"
        return str(self.run_dir / "checkpoints" / f"step_{self.last_saved_step}")

    # -- checkpoints ---------------------------------------------------------------------------

    def _checkpoint_size_estimate(self) -> int:
        """About the bytes of a first checkpoint (later ones are as large as the one before): 16 a
        parameter, the module's copy, fp32 master weights and Adam's two moments."""
        count = count_parameters(self.cfg.model)
        return 16 * (count.total + count.mtp)

    def save(self) -> None:
        trainer_state = {
            "step": self.step,
            "saved_at": f"{time.time_ns()}",  # tells this save from an earlier one of the same step
            "bad_in_row": self.bad_in_row,
            "tokens": self.tokens_seen,
            "skipped_steps": self.skipped_steps,
            "world_size": self.layout.world,
            "layout": asdict(self.layout),
            "partitioning": self.partitioning,
        }
        started = time.perf_counter()
        rank_state = {"loader": self.loader.state_dict(), "rng": rng_state()}
        path = save_checkpoint(
            self.engine,
            self.run_dir,
            self.step,
            trainer_state,
            rank_state,
            self.config_yaml,
            keep=self.cfg.checkpoint.keep,
            size_hint=self._checkpoint_size_estimate(),
        )
        self.last_saved_step = self.step
        self.monitor.message(f"checkpoint {path} ({time.perf_counter() - started:.1f} s)")
