"""One optimizer step of the training loop, the same object for the trainer and the benchmarks.

    step = TrainStep(engine, objective, ...)
    result = step.run(host_micro_batches, lr)   # this rank's grad_accum micro-batches, on the host

`run` counts the step's targets over the data-parallel ranks (the objective's denominators, one small
all-reduce), then for each micro-batch moves it to the device, runs forward and backward of its share
of the loss; the last backward steps the optimizer (parallel/engine.py). The result holds the step's
exact global losses (train/losses.py), the gradient norm and whether the step was bad: skipped by the
optimizer for a non-finite gradient norm, or with a non-finite loss.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from model.documents import DocumentLayout, copy_to_device
from model.ops.cross_entropy import check_labels_in_range
from model.qwen3_next import IGNORE_INDEX
from parallel.engine import Engine
from train.losses import StepLosses, TrainingObjective, global_target_counts


@dataclass
class StepResult:
    losses: StepLosses
    grad_norm: float
    bad: bool  # skipped by the optimizer, or a loss or gradient norm that is not finite


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
    ):
        self.engine = engine
        self.objective = objective
        self.mtp_depths = mtp_depths
        self.vocab_size = vocab_size
        self.device = device
        self.on_gpu = device.type == "cuda"
        self.dp_group = dp_group

    def run(self, host_batches: list[dict[str, torch.Tensor]], lr: float) -> StepResult:
        if len(host_batches) != self.engine.settings.grad_accum:
            # the engine steps the optimizer after its grad_accum-th backward, no sooner
            raise ValueError(
                f"a step takes {self.engine.settings.grad_accum} micro-batches a rank, "
                f"got {len(host_batches)}"
            )
        self.engine.set_lr(lr)
        tokens = global_target_counts(host_batches, self.mtp_depths, group=self.dp_group, device=self.device)
        self.objective.begin_step(tokens)
        for host_batch in host_batches:
            # moved one at a time: from the second on, this host work overlaps the GPU's work on the
            # micro-batch before, instead of leaving the GPU idle at the step's start
            batch = self.to_device(host_batch)
            out = self.engine(batch["input_ids"], labels=batch["labels"], documents=batch["documents"])
            self.engine.backward(self.objective.micro_batch_loss(out))
        losses = self.objective.end_step()
        grad_norm = self.engine.grad_norm
        bad = self.engine.step_skipped or not math.isfinite(grad_norm) or not math.isfinite(losses.loss)
        return StepResult(losses, grad_norm, bad)

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
