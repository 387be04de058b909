"""Pretraining entry point: `torchrun --nproc_per_node N launch/pretrain.py conf=PRESET [overrides]`.

Composes conf/pretrain.yaml with the preset over the typed schema of train/config.py (an unknown
key, also one added with Hydra's `+`, or a wrong type fails here, naming it), checks the layout
against the world size, then trains. `--help` says what a user needs; errors are printed once.
`trainer.dry_run=true` only builds the model on the meta device and reports parameters, FLOPs and
the per-rank memory estimate (`trainer.dry_run_world_size` picks the world size to plan for);
`trainer.dry_run_rank=R` then builds and initialises rank R's shard on the CPU and reports it.
"""

import json
import math
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
REPO = Path(__file__).resolve().parent.parent
# torchrun's agent, for watch_launcher: read before the slow imports below. Read later, a launcher that
# died meanwhile would show as init's pid, and the orphaned worker would watch that forever.
LAUNCHER_PID = os.getppid()

HELP = """usage: torchrun --nproc_per_node N launch/pretrain.py conf=PRESET [KEY=VALUE ...]
       python launch/pretrain.py conf=PRESET [KEY=VALUE ...]          (one process)

Pretrains a Qwen3-Next-style model. Settings are Hydra overrides KEY=VALUE; an unknown key, a wrong
type or a layout that cannot run stops the run at once, naming the key.

presets (conf=..., conf/conf/*.yaml):
{presets}

common settings:
  run.dir=runs/x                  where metrics.jsonl, plots, checkpoints and config.yaml go
  trainer.max_steps=N             optimizer steps; optim.schedule_steps=N the LR schedule's horizon
  trainer.global_batch_size=N     sequences per step; trainer.micro_batch_size=N per rank and pass
  data.path=DIR data.seq_len=N    token shards (launch/prepare_data.py) and the packed row length
  optim.lr=3e-4                   peak learning rate (optim.schedule=cosine|wsd, optim.warmup_steps)
  parallel.expert=N parallel.tensor=N parallel.zero_stage=1|2
  loss.mtp_weight loss.lb_coef loss.z_coef loss.lb_scope=global|micro_batch
  data.eval_path=DIR trainer.eval_every=N
                                  held-out eval_lm_loss, eval_ppl, eval_mtp_accept every N steps
  trainer.activation_checkpointing=true [trainer.recompute_layers=N]
                                  recompute every layer (or the first N) in backward to save memory
  checkpoint.every=N checkpoint.resume=auto|none|PATH checkpoint.init_from=HF_OR_FROM_HF_DIR
  logging.wandb.mode=auto|offline|online|disabled
  trainer.dry_run=true [trainer.dry_run_world_size=N] [trainer.dry_run_rank=R]
                                  plan only: parameters, FLOPs, per-rank memory; R builds one rank

examples:
  torchrun --nproc_per_node 2 launch/pretrain.py conf=tiny                      # CPU laptop
  python launch/pretrain.py conf=small run.dir=runs/s1 trainer.max_steps=5000   # one GPU
  sbatch -N 8 --gpus-per-node 8 launch/slurm/pretrain.sbatch conf=80b_a3b run.dir=runs/80b
  python launch/pretrain.py conf=80b_a3b trainer.dry_run=true trainer.dry_run_world_size=64

every key with its type and default: train/config.py (the model's: model/config.py); the composed
config of a command: add --cfg job. README.md has the rest."""


def presets() -> str:
    """One line per preset: its name and the first comment line of its file."""
    paths = sorted((REPO / "conf" / "conf").glob("*.yaml"))
    width = max((len(path.stem) for path in paths), default=0)
    lines = []
    for path in paths:
        comments = [line[1:].strip() for line in path.read_text().splitlines()[1:] if line.startswith("#")]
        comment = comments[0] if comments else ""
        lines.append(f"  {path.stem:<{width}} {comment}")
    return "\n".join(lines)


# before the imports below (torch takes seconds): help at once; Hydra's own is --hydra-help
if "-h" in sys.argv[1:] or "--help" in sys.argv[1:]:
    print(HELP.format(presets=presets()))
    sys.exit(0)

import hydra  # noqa: E402
from omegaconf import DictConfig, OmegaConf  # noqa: E402

from train.config import check_override_keys, register_configs, validate_layout  # noqa: E402

register_configs()


def fail(message: str, rank_local: bool = False) -> None:
    """Stop with the message, shown once, exit status 2.

    Under torchrun the launcher follows any failed worker with its own traceback and failure table,
    which would bury a message printed before them; so each node's first worker hands the message to
    torchrun through the error file it reads, and the table ends with it, as the root cause. The
    other workers wait a moment first: torchrun stops them once the first has failed, and they show
    as stopped rather than repeating the message. Elsewhere (one process, srun) rank 0 prints it.
    `rank_local`: a failure of this rank alone (its data), which only it can report: at once.
    """
    text = f"pretrain.py: {message}"
    error_file = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if error_file:
        if os.environ.get("LOCAL_RANK", "0") != "0" and not rank_local:
            time.sleep(10)
        Path(error_file).write_text(json.dumps({"message": text, "timestamp": int(time.time())}))
    elif rank_local:
        print(f"pretrain.py: rank {os.environ.get('RANK', '0')}: {message}", file=sys.stderr, flush=True)
    elif os.environ.get("RANK", "0") == "0":
        print(text, file=sys.stderr, flush=True)
    sys.exit(2)


def planned_world_size(cfg) -> int:
    """trainer.dry_run_world_size, else torchrun's WORLD_SIZE, else the smallest the layout allows."""
    if cfg.trainer.dry_run_world_size:
        return cfg.trainer.dry_run_world_size
    if "WORLD_SIZE" in os.environ:
        return int(os.environ["WORLD_SIZE"])
    return math.lcm(cfg.parallel.tensor, cfg.parallel.expert)


@hydra.main(config_path="../conf", config_name="pretrain", version_base=None)
def main(raw: DictConfig) -> None:
    import torch

    from train.run_dir import RunDirInUse, watch_launcher

    watch_launcher(LAUNCHER_PID)  # under torchrun: a worker stops when its launcher dies (own sessions)
    try:
        cfg = OmegaConf.to_object(raw)  # also runs the model config's own validation
        world = planned_world_size(cfg) if cfg.trainer.dry_run else int(os.environ.get("WORLD_SIZE", "1"))
        if not cfg.trainer.dry_run:
            from train.dry_run import gpu_shortfall

            shortfall = gpu_shortfall(cfg, world, torch.cuda.is_available())
            if shortfall:
                raise ValueError(f"this config cannot run here: {shortfall}")
        layout = validate_layout(cfg, world)
        if not cfg.trainer.dry_run:  # the data's shape, from index.json alone, before any model is built
            from data.loader import HELD_OUT, check_dataset

            check_dataset(
                cfg.data.path,
                streams=cfg.data.streams,
                dp_size=layout.data,
                index=cfg.data.index,
                vocab_size=cfg.model.vocab_size,
            )
            if cfg.data.eval_path and cfg.trainer.eval_every:
                check_dataset(
                    cfg.data.eval_path,
                    streams=cfg.data.eval_streams or cfg.data.streams,
                    dp_size=layout.data,
                    vocab_size=cfg.model.vocab_size,
                    settings=HELD_OUT,
                )
    except ValueError as error:
        fail(str(error))
    if cfg.trainer.dry_run:
        from train.dry_run import dry_run_report, materialise_rank

        print(dry_run_report(cfg, layout)[0], flush=True)
        if cfg.trainer.dry_run_rank is not None:
            print(f"building rank {cfg.trainer.dry_run_rank}'s shard on the CPU ...", flush=True)
            print(materialise_rank(cfg, layout, cfg.trainer.dry_run_rank))
        return
    from data.streams import LoaderWorkerError, ShardError
    from parallel.engine import UntestedDeepSpeedError, leave_distributed
    from train.checkpoint import CheckpointError
    from train.disk_space import OutOfSpaceError
    from train.safe_load import CheckpointUnpicklingError
    from train.trainer import BadStepsError, Trainer

    stops = (BadStepsError, RunDirInUse, CheckpointError, CheckpointUnpicklingError, OutOfSpaceError)
    try:
        Trainer(cfg, layout).fit()
    except (*stops, UntestedDeepSpeedError) as error:  # a clear message, no traceback
        fail(str(error))
    except (ShardError, LoaderWorkerError) as error:  # this rank's data: the others wait in a collective
        fail(str(error), rank_local=True)
    leave_distributed()


def check_command_line(arguments: list[str]) -> None:
    """Before Hydra: unknown keys refused however they are written, with the closest known one."""
    try:
        check_override_keys(arguments)
    except ValueError as error:
        fail(str(error))


if __name__ == "__main__":
    check_command_line(sys.argv[1:])
    main()
