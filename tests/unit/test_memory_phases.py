"""bench/memory_phases.py on CPU, where a reader stands in for the GPU allocator: the marks come in the
order the step runs its phases, the instrumented model computes what the model does, and the
benchmark's real step (DeepSpeed engine included) is marked once a step."""

from __future__ import annotations

import itertools
import json
import subprocess
import sys
import textwrap

import torch

from bench.memory_phases import Interval, PhaseMarks, format_step, instrument
from model.init import init_weights
from model.qwen3_next import Qwen3NextForCausalLM
from tests.conftest import REPO, tiny_config


def labels_only() -> PhaseMarks:
    return PhaseMarks(read=lambda: (0, 0))


def build(recompute_layers: int | None = None):
    config = tiny_config()
    model = Qwen3NextForCausalLM(config)
    init_weights(model, config, seed=0)
    if recompute_layers is not None:
        model.model.activation_checkpointing, model.model.recompute_layers = True, recompute_layers
    return model


def forward_backward(model, ids):
    out = model(ids, labels=ids)
    (out.lm_loss_sum + sum(out.mtp_loss_sums)).backward()


def test_marks_follow_the_step_forward_then_backward_with_recomputation():
    model = build(recompute_layers=1)
    marks = labels_only()
    instrument(model, marks)
    forward_backward(model, torch.randint(0, 97, (2, 10)))
    order = [interval.before for interval in marks.intervals]

    forward = [f"layer {i} forward {when}" for i in range(4) for when in ("begins", "ends")]
    forward += ["main head cross-entropy begins", "main head cross-entropy ends"]
    forward += ["MTP layer 0 forward begins", "MTP layer 0 forward ends"]
    forward += ["MTP head 1 cross-entropy begins", "MTP head 1 cross-entropy ends"]
    assert order[: len(forward)] == forward

    def at(label: str) -> int:
        assert order.count(label) == 1, (label, order)
        return order.index(label)

    # each layer's backward from its output's gradient to its input's, the last layer first
    spans = [
        (
            at(f"{name} backward begins (its output's gradient)"),
            at(f"{name} backward ends (its input's gradient)"),
        )
        for name in ["MTP layer 0", "layer 3", "layer 2", "layer 1", "layer 0"]
    ]
    assert all(begins < ends for begins, ends in spans)
    assert all(earlier[1] < later[0] for earlier, later in itertools.pairwise(spans))
    # the recomputed layer runs its forward again inside its backward; no other layer does
    backward = order[len(forward) :]
    assert backward.count("layer 0 forward begins") == 1
    recomputed = len(forward) + backward.index("layer 0 forward begins")
    assert spans[-1][0] < recomputed < spans[-1][1]
    assert not any(f"layer {i} forward" in label for label in backward for i in (1, 2, 3))
    # every parameter's gradient handed over once, named as in the plain model, after its layer's
    # backward began
    handed = [label for label in backward if label.startswith("gradient of ")]
    names = [name for name, _ in build().named_parameters()]
    assert sorted(handed) == sorted(f"gradient of {name} handed over" for name in names)
    for index, (began, _) in zip([3, 2, 1, 0], spans[1:], strict=True):
        assert all(at(label) > began for label in handed if f"model.layers.{index}." in label)


def test_the_instrumented_model_computes_the_same_losses_and_gradients():
    ids = torch.randint(0, 97, (2, 10))
    plain, marked = build(recompute_layers=1), build(recompute_layers=1)
    instrument(marked, labels_only())
    out_plain, out_marked = plain(ids, labels=ids), marked(ids, labels=ids)
    torch.testing.assert_close(out_marked.lm_loss_sum, out_plain.lm_loss_sum, rtol=0, atol=0)
    torch.testing.assert_close(out_marked.mtp_loss_sums, out_plain.mtp_loss_sums, rtol=0, atol=0)
    (out_plain.lm_loss_sum + sum(out_plain.mtp_loss_sums)).backward()
    (out_marked.lm_loss_sum + sum(out_marked.mtp_loss_sums)).backward()
    marked_params = {name.replace(".layer.", "."): p for name, p in marked.named_parameters()}
    for name, param in plain.named_parameters():
        # to fp32 rounding: where a tensor feeds a layer twice and something else once (the embeddings:
        # the first layer's residual and norm, and the MTP layer), the wrapper's identity sums the
        # layer's two gradients first
        torch.testing.assert_close(
            marked_params[name].grad, param.grad, msg=lambda m, name=name: f"{name}: {m}"
        )


def test_intervals_carry_the_reader_values_and_split_into_steps():
    readings = iter([(5, 1), (9, 2), (7, 3), (4, 1), (8, 2), (6, 0)])
    marks = PhaseMarks(read=lambda: next(readings))
    for label in ["warm-up", PhaseMarks.STEP_BEGIN, "a", PhaseMarks.STEP_BEGIN, "b", "step ends"]:
        marks.mark(label)
    assert marks.intervals[1] == Interval("warm-up", PhaseMarks.STEP_BEGIN, 9, 2)
    first, second = marks.steps()
    assert [i.before for i in first] == ["a", PhaseMarks.STEP_BEGIN]  # up to the next step's start
    assert [(i.after, i.before, i.peak) for i in second] == [
        (PhaseMarks.STEP_BEGIN, "b", 8),
        ("b", "step ends", 6),
    ]
    text = format_step(second, top=1)
    assert text.splitlines()[-1].split() == ["0.000", "GiB", "from", "step", "begins", "to", "b"]


def test_the_benchmark_step_is_marked_once_a_step_with_every_gradient_handed_over(tmp_path):
    """`bench.layout.main(on_built=marking(...))` on CPU (one gloo process, the tiny preset): the
    trainer's step through the DeepSpeed engine, whose own gradient hooks run beside ours."""
    script = textwrap.dedent(
        """
        import json, sys
        from bench import layout
        from bench.memory_phases import PhaseMarks, marking
        marks = PhaseMarks(read=lambda: (0, 0))
        layout.main(sys.argv[2:], on_built=marking(marks, lambda: None))
        with open(sys.argv[1], "w") as f:
            json.dump([[i.before for i in step] for step in marks.steps()], f)
        """
    )
    out = tmp_path / "steps.json"
    argv = ["--preset", "tiny", "--micro-batch", "1", "--seq", "16", "--steps", "1", "--warmup", "1"]
    result = subprocess.run(
        [sys.executable, "-c", script, str(out), *argv, "trainer.activation_checkpointing=false"],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    steps = json.loads(out.read_text())
    assert len(steps) == 3  # warm-up, timed, profiled
    for labels in steps[:-1]:
        assert labels[-1] == PhaseMarks.STEP_BEGIN and labels[-2] == "step ends"
        handed = [label for label in labels if label.startswith("gradient of ")]
        assert len(handed) == len(set(handed)) > 0
        assert handed == [label for label in steps[0] if label.startswith("gradient of ")]
