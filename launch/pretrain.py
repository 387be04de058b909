"""Pretraining entry point: `torchrun --nproc_per_node N launch/pretrain.py conf=PRESET [overrides]`.

Composes conf/pretrain.yaml with the preset over the typed schema of train/config.py (an unknown
key or a wrong type fails here, naming it), checks the layout against the world size, then trains.
`trainer.dry_run=true` only builds the model on the meta device and reports parameters, FLOPs and
the per-rank memory estimate (`trainer.dry_run_world_size` picks the world size to plan for);
`trainer.dry_run_rank=R` then builds and initialises rank R's shard on the CPU and reports it.
"""

import math
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import hydra
import torch
from omegaconf import DictConfig, OmegaConf

from train.config import register_configs, validate_layout

register_configs()


def planned_world_size(cfg) -> int:
    """trainer.dry_run_world_size, else torchrun's WORLD_SIZE, else the smallest the layout allows."""
    if cfg.trainer.dry_run_world_size:
        return cfg.trainer.dry_run_world_size
    if "WORLD_SIZE" in os.environ:
        return int(os.environ["WORLD_SIZE"])
    return math.lcm(cfg.parallel.tensor, cfg.parallel.expert)


@hydra.main(config_path="../conf", config_name="pretrain", version_base=None)
def main(raw: DictConfig) -> None:
    try:
        cfg = OmegaConf.to_object(raw)  # also runs the model config's own validation
        world = planned_world_size(cfg) if cfg.trainer.dry_run else int(os.environ.get("WORLD_SIZE", "1"))
        if not cfg.trainer.dry_run:
            from train.dry_run import gpu_shortfall

            shortfall = gpu_shortfall(cfg, world, torch.cuda.is_available())
            if shortfall:
                raise ValueError(f"this config cannot run here: {shortfall}")
        layout = validate_layout(cfg, world)
    except ValueError as error:
        sys.exit(f"pretrain.py: {error}")
    if cfg.trainer.dry_run:
        from train.dry_run import dry_run_report, materialise_rank

        print(dry_run_report(cfg, layout)[0], flush=True)
        if cfg.trainer.dry_run_rank is not None:
            print(f"building rank {cfg.trainer.dry_run_rank}'s shard on the CPU ...", flush=True)
            print(materialise_rank(cfg, layout, cfg.trainer.dry_run_rank))
        return
    from train.trainer import BadStepsError, Trainer

    try:
        Trainer(cfg, layout).fit()
    except BadStepsError as error:
        sys.exit(f"pretrain.py: {error}")


if __name__ == "__main__":
    main()
