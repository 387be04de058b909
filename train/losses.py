"""The training objective of one optimizer step, exact under data parallelism and gradient accumulation.

    loss = lm_loss + mtp_weight * mtp_loss + lb_coef * lb_loss + z_coef * z_loss

Every term is defined over the step's *global batch* B: every micro-batch m (gradient accumulation)
of every data-parallel rank r. With N_lm the labels != -100 in B, N_k the MTP depth-k targets in B
(D depths), N the token positions in B (each passes every router once), L the router layers (main
stack and MTP, in call order), E experts, x_lt layer l's router logits of token t:

    lm_loss  = sum_{r,m} lm_loss_sum^(r,m) / N_lm                 token-weighted, not a mean of means
    mtp_loss = (1/D) sum_k sum_{r,m} mtp_loss_sum_k^(r,m) / N_k    a depth's token-weighted mean, averaged
    z_loss   = (1/L) sum_l (1/N) sum_{t in B} logsumexp(x_lt)^2    router z-loss (ST-MoE)
    lb_loss  = (1/L) sum_l E sum_i f_li P_li                       global-batch LBL (Qiu et al. 2025)
        f_li = C_li / sum_j C_lj, C_li = (token, slot) pairs of B that layer l sent to expert i (the
               experts its router picked, as its RouterStats report them): a constant, no gradient;
        P_li = S_li / N,          S_li = sum_{t in B} softmax(x_lt)_i (fp32).
    The usual statement takes P_i as the mean probability on the local micro-batch; the LBL is then
    the mean over (r, m) of E sum_i f_i P_i^(r,m). Weighting micro-batches by their tokens, as above,
    gives the same value whenever they all hold the same number of tokens (this trainer's fixed-shape
    batches) and stays the global-batch value when they do not. Either way it does not depend on the layout.

Gradient. The engine (DeepSpeed) backprops each micro-batch's loss, divides by the accumulation steps
M and averages over the R data-parallel ranks: g = 1/(R*M) sum_{r,m} grad loss^(r,m). So each
micro-batch returns loss^(r,m) = grad_scale * term^(r,m), with grad_scale the factor the engine divides
by (R*M by default) and term^(r,m) the micro-batch's share of the sums above, e.g. lm_loss_sum^(r,m) /
N_lm. Then sum_{r,m} term^(r,m) = loss and g = grad loss. The denominators must be global and known
before the first backward: `global_target_counts` counts them from the labels of the step's batches
and all-reduces them (one small collective a step).

The LBL gradient. lb_loss is linear in S with f constant, so micro-batch m's exact share is
(E / (L N)) sum_l sum_i f_li S_li^(r,m) -- with f of the whole step. But f depends on the router inputs
of every micro-batch, i.e. on the full forward of each, and micro-batch 1 backprops before
micro-batch 2 runs forward. Backpropagating m with some f' instead leaves the error
(E / (L N)) sum_i (f - f')_li grad S_li^(m), and once m's graph is freed only recomputing m can give
grad S^(m) again (storing it means E gradient vectors the size of the model). Exactness would need
one more forward a step (a no-grad pass that counts the step's loads first: about +33% compute) or M
times the activations; this trainer does neither and uses the running scheme of Megatron-Core's
`global_aux_loss`, which keeps a running `global_tokens_per_expert` over the micro-batches of a step:
micro-batch m uses f^(<=m), the shares of the counts of micro-batches 1..m of this step, all-reduced
over the ranks (an all-reduce of L*E counts a micro-batch). Exact when M = 1 on any number of ranks,
and for the last micro-batch; earlier ones see the load of a smaller batch. The gradient error is
sum_{m<M} (E / (L N)) sum_{l,i} (f^(<=m) - f)_li grad S_li^(m).
The *reported* lb_loss is the exact value: each rank keeps its counts and detached
S summed over its micro-batches, and `end_step` all-reduces them (2 L E numbers).

`lb_scope="micro_batch"` is the LBL most frameworks compute instead, the baseline the global one is
measured against: each micro-batch of each rank is balanced on its own,
    lb_loss = mean over (r, m) of (1/L) sum_l E sum_i f_li^(r,m) P_li^(r,m),
with f and P the micro-batch's own expert shares and mean probabilities (no collective). Its
gradient is exact by construction; the reported value is that mean.

Expert load (for the logs): `expert_tokens[l, i]` = C_li over the global batch, and
`expert_load_max_over_mean` = max_i C_li / mean_i C_li averaged over layers (1 = perfectly balanced):
with expert parallelism each layer waits for its busiest expert and every layer carries the same mean
load, so the average is the step's expert time relative to a balanced one. The worst layer's ratio is
logged as `expert_load_max_over_mean_worst_layer`.

Per step (`group` = the ranks holding distinct data: data parallel including expert-parallel ranks,
never tensor-parallel replicas, which see the same tokens):

    objective = TrainingObjective(num_experts, mtp_weight=..., lb_coef=..., z_coef=..., group=dp)
    tokens = global_target_counts(micro_batches, mtp_depths, group=dp)
    objective.begin_step(tokens)
    for batch in micro_batches:                 # the engine steps the optimizer after the last
        engine.backward(objective.micro_batch_loss(model(**batch)))
    metrics = objective.end_step().as_metrics()  # loss, lm_loss, mtp_loss, lb_loss, z_loss, expert load
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import torch
import torch.distributed as dist

from model.documents import DocumentLayout
from model.moe import RouterStats
from model.qwen3_next import IGNORE_INDEX, CausalLMOutput, mtp_targets

LB_SCOPES = ("global", "micro_batch")

# ---------------------------------------------------------------------------------------------
# Collectives that fall back to one process when torch.distributed is not initialised


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def group_size(group=None) -> int:
    return dist.get_world_size(group) if _distributed() else 1


def all_reduce_sum(tensor: torch.Tensor, group=None) -> torch.Tensor:
    """Sum `tensor` over `group` in place (a no-op in a single process) and return it."""
    if _distributed():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM, group=group)
    return tensor


# ---------------------------------------------------------------------------------------------
# Token counts: the denominators, known before the step's first backward


def count_targets(
    labels_bt: torch.Tensor, position_ids_bt: torch.Tensor | None, mtp_depths: int
) -> torch.Tensor:
    """int64 [1 + mtp_depths]: next-token targets (labels != -100), then MTP targets of depth 1..D.

    Depth k's targets follow the model's own rule (`mtp_targets`): labels[i + k] while i + k stays in
    i's document segment, the segments read off `position_ids` as the model reads them.
    """
    batch, seq_len = labels_bt.shape
    layout = DocumentLayout.from_position_ids(position_ids_bt, batch, seq_len, labels_bt.device)
    counts = [(labels_bt != IGNORE_INDEX).sum()]
    for depth in range(1, mtp_depths + 1):
        counts.append((mtp_targets(labels_bt, depth, layout) != IGNORE_INDEX).sum())
    return torch.stack(counts)


@dataclass(frozen=True)
class StepTokens:
    """The denominators of one step's token-weighted means, over the global batch."""

    lm: int  # next-token targets
    mtp: tuple[int, ...]  # targets per MTP depth
    routed: int  # token positions; each passes every router once
    micro_batches: int  # on this rank (the same on every rank)
    dp_size: int  # ranks in the data-parallel group

    @property
    def deepspeed_grad_scale(self) -> int:
        """What DeepSpeed divides the summed gradient by: the dp average and the accumulation steps."""
        return self.dp_size * self.micro_batches


def global_target_counts(
    batches: Iterable[Mapping[str, torch.Tensor]],
    mtp_depths: int,
    group=None,
    device: torch.device | str | None = None,
) -> StepTokens:
    """Count the step's targets on this rank's micro-batches (dicts with `labels` and optionally
    `position_ids`) and sum the counts over `group`.

    `device` is where the all-reduce runs (a CUDA device under NCCL); default: the labels' device.
    """
    local, routed, micro_batches = None, 0, 0
    for batch in batches:
        counts = count_targets(batch["labels"], batch.get("position_ids"), mtp_depths)
        local = counts if local is None else local + counts
        routed += batch["labels"].numel()
        micro_batches += 1
    if local is None:
        raise ValueError("global_target_counts: the step has no micro-batches")
    # one collective for all counts; the micro-batch total checks that every rank runs as many
    # micro-batches, which the per-micro-batch collectives of the running LBL rely on
    extra = local.new_tensor([routed, micro_batches])
    dp_size = group_size(group)
    counts = torch.cat([local, extra])
    if dp_size > 1:  # alone, the counts stay on the host: reading them back would wait for the GPU
        counts = all_reduce_sum(counts.to(device or local.device), group)
    totals = counts.tolist()
    if totals[-1] != micro_batches * dp_size:
        raise RuntimeError(
            f"ranks run different numbers of micro-batches this step ({totals[-1]} in all, "
            f"{micro_batches} here, {dp_size} ranks)"
        )
    return StepTokens(
        lm=totals[0],
        mtp=tuple(totals[1 : 1 + mtp_depths]),
        routed=totals[-2],
        micro_batches=micro_batches,
        dp_size=dp_size,
    )


# ---------------------------------------------------------------------------------------------
# The load-balancing terms over [L, E] router statistics


def load_balancing_loss(
    counts_le: torch.Tensor, prob_sums_le: torch.Tensor, tokens: int | torch.Tensor
) -> torch.Tensor:
    """(1/L) sum_l E sum_i f_li S_li / tokens, with f the per-layer shares of `counts` (a constant);
    `tokens` one count, or one per layer [L].

    With the step's global counts and S summed over the global batch this is the global-batch LBL;
    with S of one micro-batch it is that micro-batch's share of it (the LBL is linear in S).
    """
    num_experts = counts_le.shape[-1]
    f_le = counts_le.double() / counts_le.sum(dim=-1, keepdim=True).clamp_min(1)
    per_layer = num_experts * (f_le.to(prob_sums_le.dtype) * prob_sums_le).sum(dim=-1) / tokens
    return per_layer.mean()


def micro_batch_load_balancing_loss(counts_le: torch.Tensor, prob_sums_le: torch.Tensor) -> torch.Tensor:
    """(1/L) sum_l E sum_i f_li P_li of one micro-batch alone: f its own expert shares, P its mean
    probabilities (S over its token count, which is S's total: each token's probabilities sum to 1)."""
    tokens_l = prob_sums_le.detach().sum(dim=-1).clamp_min(1e-12)
    return load_balancing_loss(counts_le, prob_sums_le, tokens_l)


def load_max_over_mean(counts_le: torch.Tensor) -> torch.Tensor:
    """[L]: max over experts / mean over experts of each layer's counts (1 = balanced)."""
    counts_le = counts_le.double()
    return counts_le.max(dim=-1).values / counts_le.mean(dim=-1).clamp_min(1e-12)


# ---------------------------------------------------------------------------------------------
# The objective across one optimizer step


@dataclass
class StepLosses:
    """The step's exact global values (the same on every rank and on any layout)."""

    loss: float
    lm_loss: float
    mtp_loss: float
    mtp_losses: list[float]  # per depth
    lb_loss: float
    z_loss: float
    expert_tokens: torch.Tensor  # int64 [L, E] on CPU: tokens per expert over the global batch
    local_expert_tokens: torch.Tensor  # int64 [L, E] on CPU: the same for this rank's tokens only
    expert_load_max_over_mean: float  # averaged over layers
    expert_load_max_over_mean_worst_layer: float

    def as_metrics(self) -> dict[str, float]:
        metrics = {
            "loss": self.loss,
            "lm_loss": self.lm_loss,
            "mtp_loss": self.mtp_loss,
            "lb_loss": self.lb_loss,
            "z_loss": self.z_loss,
            "expert_load_max_over_mean": self.expert_load_max_over_mean,
            "expert_load_max_over_mean_worst_layer": self.expert_load_max_over_mean_worst_layer,
        }
        if len(self.mtp_losses) > 1:
            metrics.update({f"mtp_loss_depth{k}": v for k, v in enumerate(self.mtp_losses, start=1)})
        return metrics


@dataclass
class _RouterStats:
    """One micro-batch's router statistics, stacked over layers; `prob` and `z` carry graphs."""

    counts: torch.Tensor  # int64 [L, E]
    prob: torch.Tensor  # fp32 [L, E]: sums of softmax probabilities over tokens
    z: torch.Tensor  # fp32 [L]: sums of logsumexp^2 over tokens


@dataclass
class _StepSums:
    """What one rank accumulates over its micro-batches (detached, float64), reduced at the step's end."""

    lm: torch.Tensor  # []
    mtp: torch.Tensor  # [D]
    z: torch.Tensor  # [L]
    prob: torch.Tensor  # [L, E]
    counts: torch.Tensor  # [L, E]
    lb_micro: torch.Tensor  # []: the micro-batch-scope LBL values (0 in the global scope)

    @classmethod
    def of_micro_batch(cls, out: CausalLMOutput, stats: _RouterStats, lb_micro: torch.Tensor) -> _StepSums:
        mtp = [s.detach() for s in out.mtp_loss_sums]
        return cls(
            lm=out.lm_loss_sum.detach().double(),
            mtp=torch.stack(mtp).double() if mtp else out.lm_loss_sum.new_zeros(0, dtype=torch.float64),
            z=stats.z.detach().double(),
            prob=stats.prob.detach().double(),
            counts=stats.counts.double(),
            lb_micro=lb_micro.detach().double().reshape(()),
        )

    def add_(self, other: _StepSums) -> None:
        for mine, theirs in zip(self.parts(), other.parts(), strict=True):
            mine.add_(theirs)

    def parts(self) -> tuple[torch.Tensor, ...]:
        return self.lm, self.mtp, self.z, self.prob, self.counts, self.lb_micro

    def pack(self) -> torch.Tensor:
        return torch.cat([t.flatten() for t in self.parts()])

    def unpack(self, flat: torch.Tensor) -> _StepSums:
        sizes = [t.numel() for t in self.parts()]
        pieces = flat.split(sizes)
        return _StepSums(*(p.view_as(t) for p, t in zip(pieces, self.parts(), strict=True)))


@dataclass
class ReducedStep:
    """A step's sums over the data-parallel ranks and this rank's own expert counts, on the device
    they were summed on, with the step's token counts."""

    sums: _StepSums
    local_counts: torch.Tensor  # float64 [L, E]
    tokens: StepTokens

    def flat(self) -> torch.Tensor:
        """Everything in one float64 vector: one copy to the host."""
        return torch.cat([self.sums.pack(), self.local_counts.flatten()])

    def from_flat(self, flat: torch.Tensor) -> ReducedStep:
        """The same step from `flat` (`flat()`'s layout, on any device)."""
        counts = self.local_counts.numel()
        sums_flat, counts_flat = flat.split([flat.numel() - counts, counts])
        return ReducedStep(self.sums.unpack(sums_flat), counts_flat.view_as(self.local_counts), self.tokens)

    def to_host(self) -> ReducedStep:
        return self if self.local_counts.device.type == "cpu" else self.from_flat(self.flat().cpu())

    def all_finite(self) -> torch.Tensor:
        """0-dim bool, where the sums are: every loss sum finite (the step's loss then is)."""
        return torch.isfinite(self.sums.pack()).all()


class TrainingObjective:
    """The loss of each micro-batch (for backward) and the exact global values of each step (for logs).

    Call `begin_step` once per optimizer step, `micro_batch_loss` once per micro-batch, in the same
    number on every rank of `group`, and `end_step` after the last one (see the module docstring).
    """

    def __init__(
        self,
        num_experts: int,
        *,
        mtp_weight: float,
        lb_coef: float,
        z_coef: float = 0.0,
        lb_scope: str = "global",
        group=None,
    ):
        if lb_scope not in LB_SCOPES:
            raise ValueError(f"loss.lb_scope must be one of {', '.join(LB_SCOPES)}, got {lb_scope!r}")
        self.lb_scope = lb_scope
        self.num_experts = num_experts
        self.mtp_weight = mtp_weight
        self.lb_coef = lb_coef
        self.z_coef = z_coef
        self.group = group
        self._tokens: StepTokens | None = None

    @property
    def in_step(self) -> bool:
        return self._tokens is not None

    def begin_step(self, tokens: StepTokens, *, grad_scale: float | None = None) -> None:
        """Start a step whose global token counts are `tokens` (from `global_target_counts`).

        grad_scale: the factor the engine divides the summed micro-batch gradients by; default
            `tokens.deepspeed_grad_scale` (dp size x micro-batches). Plain DDP with summed
            accumulation: the dp size.
        """
        if self.in_step:
            raise RuntimeError("begin_step called twice without end_step")
        self._tokens = tokens
        self._grad_scale = float(tokens.deepspeed_grad_scale if grad_scale is None else grad_scale)
        self._running_counts: torch.Tensor | None = None
        self._sums: _StepSums | None = None

    def head_loss_weights(self) -> tuple[float, ...]:
        """The gradient `micro_batch_loss` gives each LM head's loss sum, main head first, then each MTP
        depth: grad_scale / N_lm, and grad_scale x mtp_weight / (D N_k) for depth k. Times the
        engine's loss scale they are the gradients backward sends the heads, which the model takes
        (`head_loss_weights`) to add the heads' LM-head weight gradients, so weighted, into one fp32
        buffer during forward (the optimizer's own where the engine lends it)."""
        tokens = self._require_step()
        depths = len(tokens.mtp)
        main = self._grad_scale / max(tokens.lm, 1)
        return (main, *(self._grad_scale * self.mtp_weight / (depths * max(n, 1)) for n in tokens.mtp))

    def micro_batch_loss(self, out: CausalLMOutput) -> torch.Tensor:
        """This micro-batch's scalar to backprop: grad_scale x its share of the step's loss."""
        tokens = self._require_step()
        if out.lm_loss_sum is None:
            raise ValueError("micro_batch_loss needs the model's output of a forward with labels")
        if len(out.mtp_loss_sums) != len(tokens.mtp):
            raise ValueError(
                f"the model ran {len(out.mtp_loss_sums)} MTP depths, the step's counts have {len(tokens.mtp)}"
            )
        stats = self._router_stats(out.router_stats, out.lm_loss_sum.device)
        loss = out.lm_loss_sum / max(tokens.lm, 1)
        if tokens.mtp:
            loss = loss + self.mtp_weight * self._mtp_term(out.mtp_loss_sums, tokens.mtp)
        lb_micro = stats.prob.new_zeros(())
        if out.router_stats and self.lb_scope == "micro_batch":
            lb_micro = micro_batch_load_balancing_loss(stats.counts, stats.prob)
            if self.lb_coef:  # this micro-batch's share of the mean over the step's (rank, micro-batch)s
                loss = loss + self.lb_coef * lb_micro / tokens.deepspeed_grad_scale
        elif self.lb_coef and out.router_stats:
            f_counts = self._counts_for_gradient(stats.counts)
            loss = loss + self.lb_coef * load_balancing_loss(f_counts, stats.prob, tokens.routed)
        if self.z_coef and out.router_stats:
            loss = loss + self.z_coef * stats.z.mean() / tokens.routed
        self._accumulate(_StepSums.of_micro_batch(out, stats, lb_micro))
        return self._grad_scale * loss

    def end_step(self) -> StepLosses:
        """All-reduce the step's sums and return its exact global values; ready for the next step."""
        return self.losses_of(self.reduce_step())

    def reduce_step(self) -> ReducedStep:
        """The step's sums all-reduced where they are (on a GPU: launched, not read), and this rank's
        own; ready for the next step. `losses_of` turns them into the step's values."""
        tokens = self._require_step()
        if self._sums is None:
            raise RuntimeError("end_step before any micro_batch_loss")
        local_counts = self._sums.counts.clone()
        sums = self._sums.unpack(all_reduce_sum(self._sums.pack(), self.group))
        self._tokens = None
        return ReducedStep(sums, local_counts, tokens)

    def losses_of(self, reduced: ReducedStep) -> StepLosses:
        """The step's exact global values from its reduced sums (read on the host here)."""
        reduced = reduced.to_host()
        sums, tokens = reduced.sums, reduced.tokens
        local_counts = reduced.local_counts.round().long()
        lm_loss = float(sums.lm) / max(tokens.lm, 1)
        mtp_losses = [float(s) / max(n, 1) for s, n in zip(sums.mtp, tokens.mtp, strict=True)]
        mtp_loss = sum(mtp_losses) / len(mtp_losses) if mtp_losses else 0.0
        if sums.counts.shape[0]:
            if self.lb_scope == "micro_batch":
                lb_loss = float(sums.lb_micro) / tokens.deepspeed_grad_scale
            else:
                lb_loss = float(load_balancing_loss(sums.counts, sums.prob, tokens.routed))
            z_loss = float(sums.z.mean()) / tokens.routed
            load = load_max_over_mean(sums.counts)
            load_mean, load_worst = float(load.mean()), float(load.max())
        else:  # a dense model
            lb_loss = z_loss = 0.0
            load_mean = load_worst = 1.0
        loss = lm_loss + self.mtp_weight * mtp_loss + self.lb_coef * lb_loss + self.z_coef * z_loss
        return StepLosses(
            loss=loss,
            lm_loss=lm_loss,
            mtp_loss=mtp_loss,
            mtp_losses=mtp_losses,
            lb_loss=lb_loss,
            z_loss=z_loss,
            expert_tokens=sums.counts.round().long().cpu(),
            local_expert_tokens=local_counts,
            expert_load_max_over_mean=load_mean,
            expert_load_max_over_mean_worst_layer=load_worst,
        )

    # -- internals ----------------------------------------------------------------------------

    def _require_step(self) -> StepTokens:
        if self._tokens is None:
            raise RuntimeError("call begin_step(tokens) before micro_batch_loss / end_step")
        return self._tokens

    @staticmethod
    def _mtp_term(loss_sums: list[torch.Tensor], targets: tuple[int, ...]) -> torch.Tensor:
        per_depth = [s / max(n, 1) for s, n in zip(loss_sums, targets, strict=True)]
        return torch.stack(per_depth).mean()

    def _router_stats(self, layers: list[RouterStats], device: torch.device) -> _RouterStats:
        if not layers:  # a dense model
            empty = torch.zeros(0, self.num_experts, device=device)
            return _RouterStats(empty.long(), empty, empty.new_zeros(0))
        counts = torch.stack([layer.counts_e for layer in layers])
        if counts.shape[-1] != self.num_experts:
            experts = counts.shape[-1]
            raise ValueError(f"the routers report {experts} experts, the objective has {self.num_experts}")
        return _RouterStats(
            counts=counts,
            prob=torch.stack([layer.prob_sums_e for layer in layers]),
            z=torch.stack([layer.z_sum for layer in layers]),
        )

    def _counts_for_gradient(self, counts_le: torch.Tensor) -> torch.Tensor:
        """The counts whose shares f weigh this micro-batch's LBL gradient (module docstring): this
        step's micro-batches so far, this one included, summed over the ranks."""
        counts_le = all_reduce_sum(counts_le.clone(), self.group)
        if self._running_counts is None:
            self._running_counts = counts_le
        else:
            self._running_counts += counts_le
        return self._running_counts

    def _accumulate(self, sums: _StepSums) -> None:
        if self._sums is None:
            self._sums = sums
        else:
            self._sums.add_(sums)
