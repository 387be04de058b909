"""bench/op_families.py charges every GPU kernel once: by the op that launched it, or by its name
when no op did (a Triton kernel launched from Python, as the one-pass AdamW's)."""

from collections import namedtuple
from types import SimpleNamespace

from torch.autograd import DeviceType

from bench.op_families import op_families
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
