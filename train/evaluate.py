"""Evaluation on held-out shards during training (`data.eval_path`, `trainer.eval_every`).

Every evaluation reads the same sequences: `trainer.eval_batches` global batches from the start of
a fresh loader over the held-out shards, in the order the training loader uses for any layout (the
global batches do not depend on the number of ranks), each rank its share. The sums of the losses
and counts are all-reduced over the data-parallel ranks in float64 before dividing, so the values
are the whole eval set's token-weighted means, the same on 1 or N processes:
    eval_lm_loss      next-token cross-entropy, token-weighted over the eval set
    eval_ppl          exp(eval_lm_loss)
    eval_mtp_loss     each MTP depth's token-weighted cross-entropy, averaged over depths
    eval_mtp_accept   MTP depth 1's draft acceptance: the fraction of positions t whose argmax for
                      token t+2, given the true token t+1, is token t+2
No gradients, no optimizer; the model's weights are read as they are after the step. A held-out set
smaller than eval_batches global batches is read again from its start (as the training loader
starts a new epoch), so size eval_batches to the set; `data.eval_streams` reads a small set in
fewer streams than training uses (any count the data-parallel size divides).
"""

from __future__ import annotations

import math

import torch

from data.loader import TokenLoader
from train.build import rank_loader
from train.config import Layout, PretrainConfig
from train.losses import all_reduce_sum
from train.step import TrainStep


class Evaluator:
    def __init__(self, cfg: PretrainConfig, layout: Layout, rank: int, step: TrainStep):
        self.cfg, self.layout, self.rank, self.step = cfg, layout, rank, step
        self.micro_batches = cfg.trainer.eval_batches * layout.grad_accum  # this rank's

    def _loader(self) -> TokenLoader:
        cfg = self.cfg
        return rank_loader(
            cfg,
            self.layout,
            self.rank,
            cfg.data.eval_path,
            streams=cfg.data.eval_streams or cfg.data.streams,
            num_workers=0,  # a few batches: workers would cost more to start than they save
        )

    @torch.no_grad()
    def run(self, model) -> dict[str, float]:
        depths = self.cfg.model.mtp_num_layers
        # lm sum, lm targets, then per depth (sum, targets), then MTP accept (hits, positions)
        sums = torch.zeros(2 + 2 * depths + 2, dtype=torch.float64, device=self.step.device)
        with self._loader() as loader:
            batches = iter(loader)
            for _ in range(self.micro_batches):
                batch = self.step.to_device(next(batches))
                out = model(
                    batch["input_ids"], labels=batch["labels"], documents=batch["documents"], mtp_accept=True
                )
                parts = [out.lm_loss_sum, out.lm_tokens]
                for loss_sum, tokens in zip(out.mtp_loss_sums, out.mtp_tokens, strict=True):
                    parts += [loss_sum, tokens]
                parts += list(out.mtp_accept) if out.mtp_accept is not None else [0, 0]
                sums += torch.stack([torch.as_tensor(p, device=sums.device).double() for p in parts])
        sums = all_reduce_sum(sums, self.step.dp_group).tolist()
        lm_loss = sums[0] / max(sums[1], 1)
        metrics = {"eval_lm_loss": lm_loss, "eval_ppl": math.exp(min(lm_loss, 700.0))}
        if depths:
            per_depth = [sums[2 + 2 * d] / max(sums[3 + 2 * d], 1) for d in range(depths)]
            metrics["eval_mtp_loss"] = sum(per_depth) / depths
            metrics["eval_mtp_accept"] = sums[-2] / max(sums[-1], 1)
        return metrics
