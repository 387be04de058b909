"""One optimizer step of the training loop, the same object for the trainer and the benchmarks.

    step = TrainStep(engine, objective, ...)
    pending = step.run(host_micro_batches, lr)   # this rank's grad_accum micro-batches, on the host
    result = pending.result()                    # the step's losses, gradient norm, and whether bad

`run` counts the step's targets over the data-parallel ranks (the objective's denominators, one small
all-reduce), then for each micro-batch moves it to the device, runs forward and backward of its share
of the loss; the last backward steps the optimizer (parallel/engine.py). It returns without reading
anything back from the device: on a GPU the step's losses and gradient norm are copied to the host
behind the step's kernels, and `result()` waits for that copy alone. A loop that reads step N's result
after launching step N+1 keeps the GPU's queue full between steps (train/trainer.py does). The result
holds the step's exact global losses (train/losses.py), the gradient norm and whether the step was bad:
skipped by the optimizer for a non-finite gradient norm, or with a non-finite loss; `pending.good` says
the same on the device, for what must follow a good step only without waiting for it (the balancer).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch

from model.documents import DocumentLayout, copy_to_device
from model.ops.cross_entropy import check_labels_in_range
from model.qwen3_next import IGNORE_INDEX
from parallel.engine import Engine
from train.losses import ReducedStep, StepLosses, TrainingObjective, global_target_counts


@dataclass
class StepResult:
    losses: StepLosses
    grad_norm: float
    bad: bool  # skipped by the optimizer, or a loss or gradient norm that is not finite


class PendingStep:
    """A launched step's values: `good` and `expert_tokens` on the device now, `result()` on the host.

    Everything the host reads goes to it in one float64 vector (the reduced sums, this rank's expert
    counts, the gradient norm, the skip flag), copied into page-locked memory behind the step's kernels
    with an event after it; `result()` waits for that event, not for work launched since."""

    def __init__(self, objective: TrainingObjective, reduced: ReducedStep, grad_norm, skipped):
        self._objective, self._reduced = objective, reduced
        flat = reduced.flat()
        device = flat.device
        norm = as_device_scalar(grad_norm, device)
        skip = as_device_scalar(skipped, device)
        self.good = reduced.all_finite() & torch.isfinite(norm) & (skip == 0)
        self.expert_tokens = reduced.sums.counts  # float64 [L, E], global
        values = torch.cat([flat, norm.reshape(1), skip.reshape(1)])
        self.finished_event = None  # on a GPU: recorded behind the step's kernels and the copy
        if device.type == "cuda":
            self._host = torch.empty(values.shape, dtype=values.dtype, pin_memory=True)
            self._host.copy_(values, non_blocking=True)
            self.finished_event = torch.cuda.Event(enable_timing=True)
            self.finished_event.record()
        else:
            self._host = values
        self._result: StepResult | None = None
        # when the step was launched to its end (on CPU, where it has run by now, its end)
        self.finished_recorded = time.perf_counter()

    def result(self) -> StepResult:
        if self._result is None:
            if self.finished_event is not None:
                self.finished_event.synchronize()
            flat, norm, skip = self._host.split([self._host.numel() - 2, 1, 1])
            reduced = self._reduced.from_flat(flat)
            losses = self._objective.losses_of(reduced)
            grad_norm = float(norm)
            bad = bool(skip) or not math.isfinite(grad_norm) or not bool(reduced.all_finite())
            self._result = StepResult(losses, grad_norm, bad or not math.isfinite(losses.loss))
            self._reduced = None  # the device tensors: not needed any more
        return self._result


def as_device_scalar(value: float | bool | torch.Tensor, device: torch.device) -> torch.Tensor:
    """A float64 0-dim tensor on `device`: a tensor converted there, a Python number written by a
    fill kernel (torch.tensor(x, device=cuda) would copy from pageable memory: a host sync)."""
    if torch.is_tensor(value):
        return value.to(device, torch.float64).reshape(())
    return torch.full((), float(value), dtype=torch.float64, device=device)


class TrainStep:
    """`run(micro_batches, lr)`: one optimizer step of `engine` on this rank's host micro-batches
    (dicts of `input_ids`, `labels`, `position_ids`, as data/loader.py yields them)."""

    def __init__(
        self,
        engine: Engine,
        objective: TrainingObjective,
        *,
        mtp_depths: int,
        vocab_size: int,
        device: torch.device,
        dp_group=None,
        counts_group=None,
        counts_device: torch.device | None = None,
    ):
        """counts_group / counts_device: where the step's target counts are summed over the
        data-parallel ranks (default: dp_group on `device`; a gloo group on the host avoids waiting
        for the GPU)."""
        self.engine = engine
        self.objective = objective
        self.mtp_depths = mtp_depths
        self.vocab_size = vocab_size
        self.device = device
        self.on_gpu = device.type == "cuda"
        self.dp_group = dp_group
        self.counts_group = dp_group if counts_group is None else counts_group
        self.counts_device = device if counts_device is None else counts_device

    def run(self, host_batches: list[dict[str, torch.Tensor]], lr: float) -> PendingStep:
        if len(host_batches) != self.engine.settings.grad_accum:
            # the engine steps the optimizer after its grad_accum-th backward, no sooner
            raise ValueError(
                f"a step takes {self.engine.settings.grad_accum} micro-batches a rank, "
                f"got {len(host_batches)}"
            )
        self.engine.set_lr(lr)
        tokens = global_target_counts(
            host_batches, self.mtp_depths, group=self.counts_group, device=self.counts_device
        )
        self.objective.begin_step(tokens)
        # the gradients backward will send the LM heads' loss sums, which the heads need in forward
        head_loss_weights = tuple(w * self.engine.loss_scale for w in self.objective.head_loss_weights())
        for host_batch in host_batches:
            # moved one at a time: from the second on, this host work overlaps the GPU's work on the
            # micro-batch before, instead of leaving the GPU idle at the step's start
            batch = self.to_device(host_batch)
            out = self.engine(
                batch["input_ids"],
                labels=batch["labels"],
                documents=batch["documents"],
                head_loss_weights=head_loss_weights,
            )
            self.engine.backward(self.objective.micro_batch_loss(out))
        return PendingStep(
            self.objective, self.objective.reduce_step(), self.engine.grad_norm, self.engine.step_skipped
        )

    def to_device(self, batch: dict[str, torch.Tensor]) -> dict:
        """The model's inputs on the training device: for a GPU, ids and labels checked and the document
        layout derived on the host first. On the GPU each of those would be a host sync that drains the
        GPU's queue, several per micro-batch, so the model leaves the range checks to us there (on CPU
        it makes them itself, in forward)."""
        ids_bt, labels_bt = batch["input_ids"], batch["labels"]
        if self.on_gpu:
            self.engine.module.check_input_ids(ids_bt)
            check_labels_in_range(labels_bt.flatten(), self.vocab_size, IGNORE_INDEX)
        # on the GPU always the packed form: one form for the compiled layers and fla's tuned kernels
        documents = DocumentLayout.from_position_ids(
            batch["position_ids"], *ids_bt.shape, ids_bt.device, always_packed=self.on_gpu
        )
        return {
            "input_ids": copy_to_device(ids_bt, self.device),
            "labels": copy_to_device(labels_bt, self.device),
            "documents": documents.to(self.device),
        }
