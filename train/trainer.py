"""The pretraining loop: the model of `model/` under a DeepSpeed engine, fed by `data.loader`.

One optimizer step is `TrainStep.run` (train/step.py) on the next `grad_accum` micro-batches of this
rank (data/loader.py), the same step object `launch/bench.py layout` times; train/build.py sets it up.
DeepSpeed owns ZeRO (the optimizer state, and gradients from stage 2, partitioned over the data-
parallel ranks), bf16 with fp32 master weights on GPU (fp32 on CPU), gradient clipping and the
accumulation boundary. A step whose gradient norm is not finite is skipped: DeepSpeed's ZeRO
optimizer drops it (no update, the gradients cleared), or, under bf16 ZeRO 1 without tensor or
expert parallelism, our step decides it on the device (parallel/engine.py); with ZeRO off,
`SkippingAdamW` does. With `loss.expert_bias_rate` > 0 the balancer (train/balancer.py) updates the
experts' selection biases after each good step, on the device. After `trainer.max_bad_steps` bad
steps in a row the run stops, leaving the last checkpoint alone.

The loop reads step N's results (losses, gradient norm, whether it was bad) after launching step
N+1, so that the GPU's queue never runs dry between steps; before an evaluation or a checkpoint, and
after the last step, it reads them at once. A step's time is taken on the GPU's clock.

SIGTERM (what SLURM sends before a time limit or preemption) or a file run.dir/STOP finishes the
current step, saves a checkpoint and exits 0. Every rank sees the stop at the same step: the flag is
all-reduced.
"""

from __future__ import annotations

import contextlib
import functools
import os
import signal
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from omegaconf import OmegaConf

from data.loader import merge_states
from model.accounting import count_parameters, flops_per_token
from parallel.engine import setup_distributed
from train.build import build_training, rank_loader
from train.checkpoint import (
    CheckpointError,
    CheckpointLoadError,
    check_initial_weights,
    checkpoint_root,
    choose_checkpoint,
    complete_checkpoints,
    convert_to_universal,
    intact_alternatives,
    load_on_every_rank,
    needs_universal,
    newest_intact,
    read_trainer_state,
    refuse_another_model,
    refuse_past_max_steps,
    rng_state,
    save_checkpoint,
    set_rng_state,
    sweep_leftovers,
)
from train.config import Layout, PretrainConfig, recomputed_layers, unused_settings, uses_autoep
from train.evaluate import Evaluation, Evaluator
from train.losses import all_reduce_sum
from train.monitor import RunMonitor
from train.optim import lr_at
from train.run_dir import hold_run_dir, mark_clean_exit
from train.step import PendingStep


@dataclass
class LaunchedStep:
    """A step launched on the device whose results the loop reads later (train/step.py)."""

    step: int
    lr: float
    pending: PendingStep
    data: dict[str, int]  # the loader's counters after its batches were taken


class BadStepsError(RuntimeError):
    """Too many optimizer steps in a row had a non-finite loss or gradient norm."""


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


def evaluation_line(step: int, metrics: dict[str, float]) -> str:
    line = f"eval at step {step}: lm {metrics['eval_lm_loss']:.4f} (ppl {metrics['eval_ppl']:.1f})"
    if "eval_mtp_loss" in metrics:
        line += f", mtp {metrics['eval_mtp_loss']:.4f}, mtp accept {metrics['eval_mtp_accept']:.3f}"
    prefix = "eval_lm_loss/"
    by_domain = [f"{k.removeprefix(prefix)} {v:.4f}" for k, v in metrics.items() if k.startswith(prefix)]
    if by_domain:
        line += "; lm by domain: " + ", ".join(by_domain)
    if "eval_routing_kl" in metrics:
        line += f"; routing KL {metrics['eval_routing_kl']:.4f}"
    return line


class Trainer:
    """Build everything from a validated config, then `fit()`."""

    def __init__(self, cfg: PretrainConfig, layout: Layout):
        self.cfg = cfg
        self.layout = layout
        self.run_dir = Path(cfg.run.dir)
        self.stop_file = self.run_dir / "STOP"
        self.stop_signal = {"signal": None}  # fit() installs the handlers that set it
        self.autoep = uses_autoep(cfg, layout)
        # what DeepSpeed's native checkpoint files depend on (a change needs the universal form)
        self.partitioning = {
            "world": layout.world,
            "tensor": layout.tensor,
            "expert": layout.expert,
            "zero_stage": cfg.parallel.zero_stage,
            "autoep": self.autoep,
        }
        self.device, self.on_gpu = setup_distributed(cfg.parallel.untested_deepspeed)
        self.rank = dist.get_rank()
        self.is_main = self.rank == 0
        # before anything is written into run.dir: one run per directory (train/run_dir.py)
        self.run_dir_lock = hold_run_dir(self.run_dir, self.is_main)
        self.config_yaml = OmegaConf.to_yaml(OmegaConf.structured(cfg))
        if self.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            (self.run_dir / "config.yaml").write_text(self.config_yaml)

        started = time.perf_counter()
        for note in unused_settings(cfg):
            self._message_early(f"note: {note}")
        self._message_early(f"building the model and the DeepSpeed engine on {self.device} ...")
        self.resume_from, self.resume_universal = self._resume_source()
        init_from = cfg.checkpoint.init_from if self.resume_from is None else None
        if init_from:
            check_initial_weights(Path(init_from), cfg.model)
        training = build_training(
            cfg,
            layout,
            self.rank,
            self.device,
            init_from=Path(init_from) if init_from else None,
            load_universal=self.resume_universal,
        )
        if init_from:
            self._message_early(f"initial weights from {init_from}")
        self.model, self.engine = training.model, training.engine
        self.dp_group = training.dp_group  # the ranks holding different tokens
        self.host_group = training.host_group  # gloo over all ranks (None alone)
        self.balancer, self.train_step = training.balancer, training.step
        self.evaluator = (
            Evaluator(cfg, layout, self.rank, self.train_step) if cfg.trainer.eval_every else None
        )
        params = sum(p.numel() for p in self.model.parameters())
        self._message_early(f"{params / 1e6:.1f}M parameters ready in {time.perf_counter() - started:.1f} s")
        self.loader = rank_loader(
            cfg,
            layout,
            self.rank,
            cfg.data.path,
            streams=cfg.data.streams,
            num_workers=cfg.data.num_workers,
            skip_corrupt=cfg.data.skip_corrupt,
            index=cfg.data.index,
        )
        self.step = 0
        self.tokens_seen = 0
        self._clock_marks: list[tuple[float, torch.cuda.Event | None]] = []  # see _step_time
        self._restart_step_clock()  # again as fit starts
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
        with_mtp = cfg.model.mtp_num_layers > 0
        self.flops_per_token = flops_per_token(cfg.model, cfg.data.seq_len, with_mtp=with_mtp)

    # -- set-up --------------------------------------------------------------------------------

    def _resume_source(self) -> tuple[Path | None, bool]:
        """The checkpoint to resume from, and whether it needs the universal form (saved partitioned
        otherwise); decided before the engine is built, which must know the latter. The checkpoint is
        checked against its manifest first (`choose_checkpoint`: auto falls back past damaged ones)."""
        self._sweep_checkpoint_leftovers()
        path = choose_checkpoint(self.cfg.checkpoint.resume, self.run_dir, self._message_early)
        state = read_trainer_state(path) if path else {}
        if path is not None:
            refuse_past_max_steps(path, state["step"], self.cfg.trainer.max_steps)
            refuse_another_model(path, self.cfg.model)
        self._set_aside_later_checkpoints(state.get("step", 0))
        if path is None:
            return None, False
        saved = state.get("partitioning", {})
        if saved.get("tensor", 1) != self.layout.tensor:
            raise CheckpointError(
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
            raise CheckpointError(
                f"{path} holds the MoE in {'AutoEP' if saved_autoep else 'our'} parameter layout, this run "
                f"uses {'AutoEP' if self.autoep else 'ours'}; resume it with {hint}"
            )
        universal = needs_universal(path, state.get("partitioning"), self.partitioning)
        if universal and self.layout.tensor > 1:
            raise CheckpointError(
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
        if path != self.resume_from:  # only once a fallback has loaded: what failed goes aside
            self._set_aside_later_checkpoints(trainer_state["step"])
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
        (a new load replaces all the failed one set; once one has loaded, the later ones are set
        aside); otherwise stop, listing the intact ones."""
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
        refuse_another_model(fallback, self.cfg.model)
        if self.resume_universal:
            convert_to_universal(fallback)
        return fallback

    def _message_early(self, text: str) -> None:
        if self.is_main:
            print(f"pretrain: {text}", flush=True)

    # -- the loop ------------------------------------------------------------------------------

    def fit(self) -> None:
        cfg = self.cfg
        self.stop_signal = stop_signal_flag()
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
            self._restart_step_clock()
            unread: LaunchedStep | None = None  # launched, its results not read yet
            while self.step < cfg.trainer.max_steps:
                stopped_by = self._agreed_stop()
                if stopped_by:
                    break
                with self._profiler_at(self.step + 1):
                    launched = self._launch_step(batches)
                # Step N's results are read after step N+1 is launched: the host goes on queueing work
                # while the GPU finishes step N, and the next forward starts on a full queue. What
                # needs the model after step N (an evaluation, a checkpoint) reads it at once.
                if unread is not None:
                    self._finish_step(unread)
                unread = launched
                if self._evaluation_due() or self._checkpoint_due() or self.step == cfg.trainer.max_steps:
                    unread = None
                    good = self._finish_step(launched, evaluate=self._evaluation_due())
                    if good and self._checkpoint_due():
                        self.save()
                        self._restart_step_clock()
            if unread is not None:  # stopped with a step launched: it counts, and is saved below
                self._finish_step(unread)
            if self.last_saved_step != self.step:
                self.save()
            if self.is_main:  # spent, or too late to stop anything: the next run must not stop at once
                self.stop_file.unlink(missing_ok=True)
            if stopped_by:
                self.monitor.message(
                    f"{stopped_by}: stopped after step {self.step} with a checkpoint; {self._how_to_resume()}"
                )
            else:
                self.monitor.finish_plots()  # what the line names is drawn before it is said
                plots = f", plots {self.run_dir / 'loss.png'} and {self.run_dir / 'expert_load.png'}"
                plots = plots if self.step > 0 else ""  # at step 0 nothing was logged, nor plotted
                self.monitor.message(
                    f"done: {self.step} steps; metrics {self.run_dir / 'metrics.jsonl'}{plots}"
                )
        if self.is_main:  # for launchers whose exit status cannot say it (launch/slurm/pretrain.sbatch)
            mark_clean_exit(self.run_dir, self.step, stopped_by)
        self.run_dir_lock.release()

    def _launch_step(self, batches) -> LaunchedStep:
        """Step self.step + 1 on this rank's next micro-batches, launched on the device and not read;
        the balancer's update follows it there, applied only if the step turns out good."""
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
        pending = self.train_step.run(host_batches, lr)
        if self.balancer is not None:
            self.balancer.update(pending.expert_tokens, apply=pending.good)
        self.step += 1
        return LaunchedStep(self.step, lr, pending, self.loader.metrics())

    def _finish_step(self, launched: LaunchedStep, *, evaluate: bool = False) -> bool:
        """Read a launched step's results, evaluate after it if asked (it must be the last launched),
        log them, and count it if bad: too many bad steps in a row stop the run. Whether it was good."""
        metrics, expert_tokens = self._step_metrics(launched)
        evaluation = self._evaluate() if evaluate else None
        evaluated = evaluation.metrics if evaluation is not None else {}
        self.monitor.log_step({**metrics, **evaluated}, expert_tokens)
        if evaluated:
            self.monitor.message(evaluation_line(launched.step, evaluated))
        elif evaluate:
            self.monitor.message(f"evaluation after step {launched.step} abandoned: stopping")
        if evaluation is not None and evaluation.routing is not None:
            self.monitor.log_domain_routing(evaluation.routing)
        if not metrics["bad_step"]:
            self.bad_in_row = 0
            return True
        self.bad_in_row += 1
        if self.bad_in_row >= self.cfg.trainer.max_bad_steps:
            raise BadStepsError(
                f"{self.bad_in_row} steps in a row had a non-finite loss or gradient norm "
                f"(trainer.max_bad_steps={self.cfg.trainer.max_bad_steps}); stopping at step "
                f"{launched.step}. The last checkpoint ({self._last_checkpoint_text()}) is "
                "untouched: lower optim.lr or check the data, then resume from it."
            )
        return False

    def _step_metrics(self, launched: LaunchedStep) -> tuple[dict, torch.Tensor | None]:
        cfg = self.cfg
        result = launched.pending.result()  # waits for this step's values, not for later steps
        losses, bad = result.losses, result.bad
        elapsed = self._step_time(launched.pending)

        step_tokens = cfg.trainer.global_batch_size * cfg.data.seq_len
        self.tokens_seen += step_tokens
        self.skipped_steps += int(bad)
        tokens_per_s = step_tokens / elapsed
        metrics = {
            "step": launched.step,
            **losses.as_metrics(),
            "lr": launched.lr,
            "grad_norm": result.grad_norm,
            "tokens": self.tokens_seen,
            "tokens_per_s": tokens_per_s,
            "tflops_per_gpu": self.flops_per_token * tokens_per_s / self.layout.world / 1e12,
            "step_time_s": elapsed,
            "bad_step": int(bad),
            "skipped_steps": self.skipped_steps,
            **{f"data_{k}": v for k, v in self._data_metrics(launched.data).items()},
        }
        if self.layout.expert > 1:
            metrics.update(self._all_to_all_volume(losses.local_expert_tokens))
        return metrics, losses.expert_tokens if losses.expert_tokens.numel() else None

    def _restart_step_clock(self) -> None:
        """The next step's time starts now (after a checkpoint, an evaluation or a profile's export,
        which are not a step's)."""
        self._clock_marks.append(self._clock_mark())

    def _clock_mark(self) -> tuple[float, torch.cuda.Event | None]:
        """(host time, on a GPU an event recorded behind the queued work)."""
        event = None
        if self.on_gpu:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
        return time.perf_counter(), event

    def _step_time(self, pending: PendingStep) -> float:
        """Seconds from the end of the step before, or the clock's last restart before this step
        ended, to this step's end.

        The loop reads a step's results after launching the next one, and the last step's at once,
        so the times the host reads them are not the steps' ends (on an H200 the last step looked a
        tenth as long). A step's end is the mark its PendingStep made: an event behind its kernels
        on a GPU, the host's clock on CPU (where the step ran while launched). The clock's marks
        (restarts, step ends) lie on the GPU in the order the host made them (one stream), so the
        start is the last mark made before this step's end; a restart made while the step was in
        flight (a profile's export) starts the next step instead."""
        end = (pending.finished_recorded, pending.finished_event)
        earlier = [mark for mark in self._clock_marks if mark[0] <= end[0]]
        self._clock_marks = [mark for mark in self._clock_marks if mark[0] > end[0]]
        self._clock_marks.insert(0, end)
        if not earlier:
            return float("nan")
        start_time, start_event = earlier[-1]
        if start_event is not None and end[1] is not None:
            return start_event.elapsed_time(end[1]) / 1e3
        return end[0] - start_time

    def _checkpoint_due(self) -> bool:
        every = self.cfg.checkpoint.every
        return bool(every) and self.step % every == 0

    def _evaluation_due(self) -> bool:
        every = self.cfg.trainer.eval_every
        return self.evaluator is not None and (
            self.step % every == 0 or self.step == self.cfg.trainer.max_steps
        )

    def _evaluate(self) -> Evaluation | None:
        """The held-out metrics after this step (train/evaluate.py); its time is not the next step's.
        None when a stop request came during it: the loop then stops before the next step. The last
        step's evaluation always runs to its end: nothing would evaluate that step again (a rerun
        finds the run done), whereas a run killed during it resumes from its last checkpoint."""
        last = self.step >= self.cfg.trainer.max_steps
        evaluation = self.evaluator.run(
            self.model,
            self.step,
            stop=(lambda: None) if last else self._agreed_stop,
        )
        self._restart_step_clock()
        return evaluation

    def _data_metrics(self, metrics: dict[str, int]) -> dict[str, int]:
        """The loader's counters as a step left them, skipped shards summed over the data-parallel ranks
        (each skips the shards of its own streams; without data.skip_corrupt a bad shard stops the
        run instead)."""
        metrics = dict(metrics)
        if self.cfg.data.skip_corrupt and self.layout.data > 1:
            # summed where the step's target counts are (on the host where it can: through the GPU
            # the sum would wait for the step launched since)
            step = self.train_step
            local = torch.tensor([float(metrics["skipped_shards"])], device=step.counts_device)
            metrics["skipped_shards"] = int(all_reduce_sum(local, step.counts_group).item())
        return metrics

    def _all_to_all_volume(self, local_counts_le: torch.Tensor) -> dict[str, float]:
        """Expert-parallel traffic of the step, over all ranks: the (token, slot) pairs routed to an
        expert on another rank of the EP group (AutoEP: rank r holds the experts of slice r % ep),
        and the bytes they move: hidden-size activations out and back (dispatch, combine), forward
        and backward, plus one more forward in each layer recomputed in backward."""
        ep, experts = self.layout.expert, local_counts_le.shape[1]
        local_slice = slice((self.rank % ep) * experts // ep, (self.rank % ep + 1) * experts // ep)
        remote_l = (local_counts_le.sum(dim=1) - local_counts_le[:, local_slice].sum(dim=1)).double()
        passes_l = remote_l.new_tensor([3 if recomputed else 2 for recomputed in self._moe_layers_recomputed])
        total = torch.stack([remote_l.sum(), (remote_l * passes_l).sum()])
        dist.all_reduce(total, group=self.host_group)  # on the host (gloo), as the counts are
        # tensor-parallel peers route the same tokens and (folded) each dispatches a 1/tp share of
        # them; their counts against their own slices, averaged, estimate what moves
        slots, slot_passes = (float(x) / self.layout.tensor for x in total)
        element_bytes = 2 if self.on_gpu else 4
        moved = slot_passes * 2 * self.cfg.model.hidden_size * element_bytes
        return {"a2a_remote_slots": slots, "a2a_gib": moved / 2**30}

    @functools.cached_property
    def _moe_layers_recomputed(self) -> list[bool]:
        """Per MoE layer in the order of the expert counts (main stack, then MTP, never recomputed):
        whether backward recomputes its forward (trainer.activation_checkpointing, recompute_layers)."""
        model, recomputed = self.cfg.model, recomputed_layers(self.cfg)
        main = [layer < recomputed for layer in range(model.num_hidden_layers) if model.is_moe_layer(layer)]
        return main + [False] * model.mtp_num_layers

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
            self._restart_step_clock()

    def _agreed_stop(self) -> str | None:
        """Why to stop now, if any rank got a stop signal or the main rank sees run.dir/STOP (all ranks
        then stop at the same step). The file serves launchers that cannot signal the workers
        themselves: torchrun kills its workers 30 s after forwarding a SIGTERM, which a large
        checkpoint may outlast."""
        # only the main rank looks for the file (the all-reduce tells the others): this runs before
        # every step and every evaluation micro-batch, and a stat on every rank each time would load a
        # shared file system's metadata server at scale
        signal_name = self.stop_signal["signal"]
        if signal_name is None and self.is_main and self.stop_file.exists():
            signal_name = f"{self.stop_file} found"
        if self.host_group is None:  # alone
            return signal_name
        # on the host (gloo): through the GPU the flag would wait for the step launched before
        flag = torch.tensor([1.0 if signal_name else 0.0])
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self.host_group)
        if flag.item() == 0:
            return None
        return signal_name or "stop signal on another rank"

    def _how_to_resume(self) -> str:
        resume = self.cfg.checkpoint.resume
        if resume == "auto":
            return "rerun the same command to resume"
        again = "start over" if resume == "none" else f"rewind to {resume}"
        return (
            f"rerun with checkpoint.resume=auto to resume (this command's checkpoint.resume={resume} "
            f"would {again} again)"
        )

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
