"""bench/op_families.py charges every GPU kernel once: by the op that launched it, or by its name
when no op did (a Triton kernel launched from Python, as the one-pass AdamW's)."""

from collections import namedtuple
from types import SimpleNamespace

from torch.autograd import DeviceType

from bench.op_families import family_of, format_kernels, largest_kernels, op_families
from parallel.engine import OPTIMIZER_STEP

Kernel = namedtuple("Kernel", "name duration")


class DeviceEvent:
    def __init__(self, name: str, us: float, device=DeviceType.CUDA):
        self._name, self._ns, self._device = name, int(us * 1e3), device

    def name(self):
        return self._name

    def duration_ns(self):
        return self._ns

    def device_type(self):
        return self._device


def op(name, kernels, parent=None, shapes=None):
    return SimpleNamespace(
        name=name, kernels=[Kernel(*k) for k in kernels], cpu_parent=parent, input_shapes=shapes
    )


def test_kernels_no_op_launched_are_charged_by_name_and_none_twice():
    step = op(OPTIMIZER_STEP, [])
    ops = [
        op("aten::_grouped_mm", [("cutlass_grouped", 300.0)]),
        op("aten::_foreach_norm", [("multi_tensor_apply_norm", 20.0)], parent=step),
        op("torch::autograd::AccumulateGrad", [("add_into_fp32_kernel", 40.0)]),
    ]
    device = [DeviceEvent("cutlass_grouped", 300.0), DeviceEvent("multi_tensor_apply_norm", 20.0)]
    device += [DeviceEvent("add_into_fp32_kernel", 40.0), DeviceEvent("adamw_kernel", 500.0)]
    device += [DeviceEvent("aten::mm", 9999.0, DeviceType.CPU)]  # a CPU op: not kernel time
    profile = SimpleNamespace(
        events=lambda: ops, profiler=SimpleNamespace(kineto_results=SimpleNamespace(events=lambda: device))
    )
    rows = {row["family"]: row["ms"] for row in op_families(profile, vocab_size=151936)}
    assert rows == {"routed experts": 0.3, "norms / elementwise": 0.04, "optimizer": 0.52}


def test_largest_kernels_name_the_op_and_its_context_that_launched_them():
    """Each (kernel, launching op, nearest non-aten op around it) row sums its launches; a kernel no op
    launched is listed once under "no op"; largest first, cut at n."""
    fla = op("_FlaWithHeadsRepeatedInside", [])
    contiguous = op("aten::contiguous", [], parent=fla)
    ops = [
        op("aten::copy_", [("direct_copy", 30.0)], parent=contiguous),
        op("aten::copy_", [("direct_copy", 30.0)], parent=contiguous),
        op("aten::copy_", [("direct_copy", 5.0)]),  # the same kernel from elsewhere: its own row
        op("aten::_grouped_mm", [("cutlass_grouped", 300.0)]),
    ]
    device = [DeviceEvent(name, us) for name, us in [("direct_copy", 65.0), ("cutlass_grouped", 300.0)]]
    device.append(DeviceEvent("adamw_kernel", 100.0))
    profile = SimpleNamespace(
        events=lambda: ops, profiler=SimpleNamespace(kineto_results=SimpleNamespace(events=lambda: device))
    )
    rows = largest_kernels(profile, vocab_size=151936, steps=2, n=3)
    assert [(r["kernel"], r["launched_by"], r["launches"]) for r in rows] == [
        ("cutlass_grouped", "aten::_grouped_mm in -", 0.5),
        ("adamw_kernel", "no op", 0.0),
        ("direct_copy", "aten::copy_ in _FlaWithHeadsRepeatedInside", 1.0),
    ]
    assert [r["ms"] for r in rows] == [0.15, 0.05, 0.03]
    assert [r["family"] for r in rows] == ["routed experts", "optimizer", "other"]
    table = format_kernels(rows).splitlines()
    assert len(table) == 4 and "_FlaWithHeadsRepeatedInside" in table[3] and " - " in table[2]


def test_the_lm_heads_gemms_are_told_from_dense_ones_by_a_vocabulary_shape():
    vocab, hidden, rows = 151936, 2048, 8192
    half = vocab // 2  # WeightGradient's two parts at this vocabulary: 75968 rows each
    gemms = {
        "logits": [[rows, hidden], [hidden, vocab]],
        "weight gradient, a part": [[half, hidden], [half, rows], [rows, hidden]],
        "projection": [[rows, hidden], [hidden, 8192]],
    }
    families = {
        what: family_of("aten::addmm", shapes, "nvjet", False, vocab) for what, shapes in gemms.items()
    }
    assert families == {
        "logits": "LM head + CE",
        "weight gradient, a part": "LM head + CE",
        "projection": "dense GEMMs",
    }
