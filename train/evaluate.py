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

Domains. When the held-out shards are tagged with domains (`prepare_data.py --domains` or
`--demo-mixed`), each evaluation reads `eval_batches` global batches of each domain's shards alone
(so it costs domains x as much), the metrics above are over all of them, and besides:
    eval_lm_loss/<domain>      the domain's next-token cross-entropy
    eval_routing_kl            how specialised the experts are: KL(p_dl || p_l), averaged over the
                               domains d and the MoE layers l (MTP included), where p_dl is the share
                               of domain d's (token, slot) pairs that layer l routes to each expert
                               and p_l the same over all domains' tokens; 0 = every domain is routed
                               alike, log(E / top-k) about its ceiling for disjoint expert sets
    eval_routing_kl/<domain>   the same for one domain, averaged over the layers
The expert counts themselves (`DomainRouting`) go to the run directory's domain_routing.jsonl and
domain_routing.png (train/monitor.py).

A stop request (SIGTERM, run.dir/STOP) abandons an evaluation between two micro-batches: under
Slurm the run has two minutes from the signal to save its checkpoint, which a long evaluation
would spend. The trainer lets the last step's evaluation finish: no later run would redo it.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple

import numpy as np
import torch

from data.loader import HELD_OUT, TokenLoader, index_domains, resolve_shards
from train.build import rank_loader
from train.config import Layout, PretrainConfig
from train.losses import all_reduce_sum
from train.plots import DomainRouting, routing_kl
from train.step import TrainStep


class Evaluation(NamedTuple):
    metrics: dict[str, float]
    routing: DomainRouting | None  # None: untagged held-out shards, or a dense model


class Evaluator:
    def __init__(self, cfg: PretrainConfig, layout: Layout, rank: int, step: TrainStep):
        self.cfg, self.layout, self.rank, self.step = cfg, layout, rank, step
        self.micro_batches = cfg.trainer.eval_batches * layout.grad_accum  # this rank's
        _, index, _ = resolve_shards(cfg.data.eval_path, settings=HELD_OUT)
        self.domains: tuple[str, ...] = tuple(index_domains(index))
        # data.verify_sha256 hashes the held-out shards at the first evaluation; reading them again at
        # every later one would cost a full read per domain for nothing (the counts are still checked)
        self.verified = False

    def _loader(self, domain: str | None) -> TokenLoader:
        cfg = self.cfg
        return rank_loader(
            cfg,
            self.layout,
            self.rank,
            cfg.data.eval_path,
            streams=cfg.data.eval_streams or cfg.data.streams,
            num_workers=0,  # a few batches: workers would cost more to start than they save
            domain=domain,
            verify_sha256=cfg.data.verify_sha256 and not self.verified,
            settings=HELD_OUT,
        )

    @torch.no_grad()
    def run(self, model, step: int, stop: Callable[[], str | None] = lambda: None) -> Evaluation | None:
        """The held-out metrics of the model after `step`; None when `stop` (collective, asked before
        every micro-batch on every rank alike) names a reason to stop first."""
        passes = []
        for domain in self.domains or (None,):
            read = self._read(model, domain, stop)
            if read is None:
                return None
            passes.append(read)
        self.verified = True
        sums = torch.stack([sums for sums, _ in passes])  # [passes, sums]
        counts = [counts for _, counts in passes]
        moe = counts[0] is not None
        flat = [sums.flatten()] + ([torch.stack(counts).flatten()] if moe else [])
        reduced = all_reduce_sum(torch.cat(flat), self.step.dp_group).cpu()
        sums = reduced[: sums.numel()].view_as(sums).numpy()
        metrics = self._metrics(sums.sum(axis=0))
        if not self.domains:
            return Evaluation(metrics, None)
        for domain, domain_sums in zip(self.domains, sums, strict=True):
            metrics[f"eval_lm_loss/{domain}"] = float(domain_sums[0] / max(domain_sums[1], 1))
        if not moe:
            return Evaluation(metrics, None)
        counts_dle = reduced[sums.size :].view(len(self.domains), *counts[0].shape).round().long().numpy()
        kl_dl = routing_kl(counts_dle)
        metrics["eval_routing_kl"] = float(kl_dl.mean())
        for domain, kl_l in zip(self.domains, kl_dl, strict=True):
            metrics[f"eval_routing_kl/{domain}"] = float(kl_l.mean())
        tokens_d = tuple(int(domain_sums[-1]) for domain_sums in sums)
        return Evaluation(metrics, DomainRouting(step, self.domains, tokens_d, counts_dle))

    def _read(self, model, domain: str | None, stop) -> tuple[torch.Tensor, torch.Tensor | None] | None:
        """This rank's sums over eval_batches global batches (of one domain's shards): the loss sums
        and counts `_metrics` reads, then the input tokens; and the expert counts [L, E] (None: dense).
        None if `stop` asks to stop before a micro-batch."""
        depths = self.cfg.model.mtp_num_layers
        # lm sum, lm targets, then per depth (sum, targets), then MTP accept (hits, positions), tokens
        sums = torch.zeros(2 + 2 * depths + 3, dtype=torch.float64, device=self.step.device)
        counts_le = None
        with self._loader(domain) as loader:
            batches = iter(loader)
            for _ in range(self.micro_batches):
                if stop():
                    return None
                batch = self.step.to_device(next(batches))
                out = model(
                    batch["input_ids"], labels=batch["labels"], documents=batch["documents"], mtp_accept=True
                )
                parts = [out.lm_loss_sum, out.lm_tokens]
                for loss_sum, tokens in zip(out.mtp_loss_sums, out.mtp_tokens, strict=True):
                    parts += [loss_sum, tokens]
                parts += list(out.mtp_accept) if out.mtp_accept is not None else [0, 0]
                parts.append(batch["input_ids"].numel())
                sums += torch.stack([torch.as_tensor(p, device=sums.device).double() for p in parts])
                if out.router_stats:
                    batch_counts = torch.stack([layer.counts_e for layer in out.router_stats]).double()
                    counts_le = batch_counts if counts_le is None else counts_le + batch_counts
        return sums, counts_le

    def _metrics(self, sums: np.ndarray) -> dict[str, float]:
        depths = self.cfg.model.mtp_num_layers
        lm_loss = float(sums[0] / max(sums[1], 1))
        metrics = {"eval_lm_loss": lm_loss, "eval_ppl": math.exp(min(lm_loss, 700.0))}
        if depths:
            per_depth = [sums[2 + 2 * d] / max(sums[3 + 2 * d], 1) for d in range(depths)]
            metrics["eval_mtp_loss"] = float(sum(per_depth) / depths)
            metrics["eval_mtp_accept"] = float(sums[-3] / max(sums[-2], 1))
        return metrics
