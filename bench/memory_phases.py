"""Where in a training step the GPU memory peaks: the allocator's peak between marks set at the
step's phases, for `launch/bench.py layout`'s step.

    python -m bench.memory_phases --preset 80b_a3b-slice --steps 1 --warmup 2 trainer.recompute_layers=1

It takes `launch/bench.py layout`'s arguments and runs that benchmark with marks at:
- each decoder and MTP layer's forward, entry and exit (a recomputed layer's forward marks again,
  inside backward),
- each layer's backward, where the gradient of its output arrives and where its input's is made,
- each LM head's cross-entropy (forward entry and exit; backward where its input's gradient is made),
- each parameter's gradient handed over (its post-accumulate hook, where ZeRO moves it to its fp32
  buffer): a compiled graph hands its parameters' gradients over together, at its backward's end,
- the step's start and end.
At each mark it reads `torch.cuda.max_memory_allocated()` (the peak since the last mark) and
`memory_allocated()`, then resets the peak. It prints, for the last step before the profiled one
(which runs under the profiler), every interval with its peak and what was allocated at its end,
and the highest intervals: the step's peak is the highest interval's.

Why not `bench/memory_peak.py` (allocation history with Python stacks), which names source lines:
on the slice, recording history made backward fail inside a recomputed layer's compiled graph
("returned NULL without setting an exception"). These marks allocate nothing and run in eager code
around the compiled graphs, never inside them.

The marks reset the allocator's peak, so the layout line's "peak GPU memory" (and `--out`'s peaks)
cover only the last interval here; the step's peak is the highest interval's. fla's kernels run on
one autotuning configuration each (bench/pinned_autotune.py; `--full-autotune` for all): what a
step allocates does not depend on it, and a fresh machine's first step takes about a minute instead
of three (its timings are then not the benchmark's). Needs CUDA.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

GiB = 2**30


@dataclass(frozen=True)
class Interval:
    after: str  # the mark that opened it
    before: str  # the mark that closed it
    peak: int  # most bytes allocated at once inside it
    allocated: int  # bytes allocated at its end


def cuda_memory() -> tuple[int, int]:
    """(peak since the last reset, allocated now), then a reset of the peak."""
    peak, now = torch.cuda.max_memory_allocated(), torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    return peak, now


class PhaseMarks:
    """The intervals between marks. `read` returns (peak since its last call, allocated now)."""

    STEP_BEGIN = "step begins"

    def __init__(self, read: Callable[[], tuple[int, int]] = cuda_memory):
        self.read = read
        self.intervals: list[Interval] = []
        self.last = "start"

    def mark(self, label: str) -> None:
        peak, allocated = self.read()
        self.intervals.append(Interval(self.last, label, peak, allocated))
        self.last = label

    def steps(self) -> list[list[Interval]]:
        """The intervals of each step, from its start mark to the next step's (the last one: to the
        end)."""
        starts = [i for i, interval in enumerate(self.intervals) if interval.before == self.STEP_BEGIN]
        ends = starts[1:] + [len(self.intervals)]
        return [self.intervals[start + 1 : end + 1] for start, end in zip(starts, ends, strict=True)]


class _MarkInBackward(torch.autograd.Function):
    """Identity; marks `label` when the gradient passes through."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, marks: PhaseMarks, label: str) -> torch.Tensor:
        ctx.marks, ctx.label = marks, label
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        ctx.marks.mark(ctx.label)
        return grad, None, None


class MarkedLayer(nn.Module):
    """A decoder or MTP layer (`(x, rope, layout) -> (x, stats)`) with marks around its forward and its
    backward. Wraps the layer as it is (a compiled layer stays compiled)."""

    def __init__(self, layer: nn.Module, name: str, marks: PhaseMarks):
        super().__init__()
        self.layer, self.name, self.marks = layer, name, marks

    def forward(self, x_btd: torch.Tensor, *rest):
        self.marks.mark(f"{self.name} forward begins")
        x_btd = _MarkInBackward.apply(x_btd, self.marks, f"{self.name} backward ends (its input's gradient)")
        x_btd, stats = self.layer(x_btd, *rest)
        self.marks.mark(f"{self.name} forward ends")
        label = f"{self.name} backward begins (its output's gradient)"
        return _MarkInBackward.apply(x_btd, self.marks, label), stats


def instrument(model: nn.Module, marks: PhaseMarks) -> None:
    """Marks on a Qwen3NextForCausalLM's layers (main stack and MTP), heads and parameters, in place.
    Its layers are swapped for `MarkedLayer`s (parameter names gain `.layer`): for measuring only."""
    layers = model.model.layers
    for index in range(len(layers)):
        layers[index] = MarkedLayer(layers[index], f"layer {index}", marks)
    if model.mtp is not None:
        for index in range(len(model.mtp.layers)):
            model.mtp.layers[index] = MarkedLayer(model.mtp.layers[index], f"MTP layer {index}", marks)
    heads = _HeadMarks(model.cross_entropy, marks, model.num_lm_heads)
    model.cross_entropy = heads
    for name, param in model.named_parameters():
        if param.requires_grad:
            label = f"gradient of {name.replace('.layer.', '.')} handed over"
            param.register_post_accumulate_grad_hook(lambda _param, label=label: marks.mark(label))


class _HeadMarks:
    """The model's `cross_entropy(h, targets)` with marks; heads are named by their call's place in
    a forward (the main head first, then each MTP depth's)."""

    def __init__(self, cross_entropy: Callable, marks: PhaseMarks, heads: int):
        self.cross_entropy, self.marks, self.heads, self.calls = cross_entropy, marks, heads, 0

    def __call__(self, h_btd: torch.Tensor, targets_bt: torch.Tensor, **sharing):
        head = "main head" if self.calls % self.heads == 0 else f"MTP head {self.calls % self.heads}"
        self.calls += 1
        self.marks.mark(f"{head} cross-entropy begins")
        h_btd = _MarkInBackward.apply(h_btd, self.marks, f"{head} backward ends (its input's gradient)")
        result = self.cross_entropy(h_btd, targets_bt, **sharing)
        self.marks.mark(f"{head} cross-entropy ends")
        return result


def mark_steps(step, marks: PhaseMarks, synchronize: Callable[[], None]) -> None:
    """Marks at the start and end of each `step.run` (a TrainStep), in place; `synchronize` before the
    end mark, so that it comes after the step's work (the allocator's counts are the host's, but a
    step's frees may wait on the streams)."""
    run = step.run

    def marked_run(*args, **kwargs):
        marks.mark(PhaseMarks.STEP_BEGIN)
        pending = run(*args, **kwargs)
        synchronize()
        marks.mark("step ends")
        return pending

    step.run = marked_run


def marking(marks: PhaseMarks, synchronize: Callable[[], None]) -> Callable:
    """`bench.layout.main`'s `on_built`: marks on the model and on each step."""

    def on_built(training) -> None:
        instrument(training.model, marks)
        mark_steps(training.step, marks, synchronize)

    return on_built


def format_step(intervals: list[Interval], top: int = 5) -> str:
    lines = [f"{'from':64s} {'to':64s} {'peak GiB':>9s} {'at end':>8s}"]
    for i in intervals:
        lines.append(f"{i.after[:64]:64s} {i.before[:64]:64s} {i.peak / GiB:9.3f} {i.allocated / GiB:8.3f}")
    highest = sorted(intervals, key=lambda i: -i.peak)[:top]
    lines += ["", f"the highest {len(highest)} (the step's peak is the first):"]
    lines += [f"  {i.peak / GiB:9.3f} GiB  from {i.after}  to {i.before}" for i in highest]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m bench.memory_phases", description=__doc__.splitlines()[0], allow_abbrev=False
    )
    parser.add_argument("--top", type=int, default=5, help="highest intervals listed (default 5)")
    parser.add_argument(
        "--full-autotune", action="store_true", help="let fla autotune its kernels in full (slower start)"
    )
    args, layout_argv = parser.parse_known_args(argv)
    if not torch.cuda.is_available():
        sys.exit("bench.memory_phases: needs CUDA (it reads the GPU allocator's peaks)")
    from bench import layout
    from bench.pinned_autotune import pin_autotuned_kernels, pinning_wanted

    if not args.full_autotune and pinning_wanted():  # pinning_wanted imports fla's modules first
        print(f"fla: {pin_autotuned_kernels('fla')} autotuned kernels held to one configuration each")

    marks = PhaseMarks()
    layout.main(layout_argv, on_built=marking(marks, torch.cuda.synchronize))
    steps = marks.steps()
    if len(steps) < 3:
        sys.exit("bench.memory_phases: needs 3 steps or more (--warmup 2 --steps 1 at least)")
    # the profiled step is the last; the one before it ran like every timed step
    print(f"step {len(steps) - 1} of {len(steps)}, by interval between marks:")
    print(format_step(steps[-2], args.top))


if __name__ == "__main__":
    main()
