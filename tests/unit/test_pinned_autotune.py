"""The GPU tests' autotuning pin (bench/pinned_autotune.py) on Triton autotuners built here:
which configuration each keeps, and that it finds them behind `triton.heuristics`. Needs no GPU."""

import sys
import textwrap
import types

import pytest

triton = pytest.importorskip("triton")

from bench.pinned_autotune import (  # noqa: E402
    autotuners_in,
    imported,
    least_demanding,
    pin_autotuned_kernels,
)


def configs(*specs):
    return [triton.Config(kwargs, num_warps=w, num_stages=s) for kwargs, w, s in specs]


def test_fewest_stages_then_smallest_tiles_then_warps_nearest_four():
    listed = configs(
        ({"BK": 64, "BV": 64}, 4, 4),  # first listed: the most shared memory
        ({"BK": 64, "BV": 32}, 8, 2),
        ({"BK": 32, "BV": 32}, 8, 2),
        ({"BK": 32, "BV": 32}, 2, 2),
        ({"BK": 32, "BV": 32}, 4, 2),
        ({"BK": 32, "BV": 32}, 4, 3),
    )
    kept = least_demanding(listed)
    assert (kept.kwargs, kept.num_warps, kept.num_stages) == ({"BK": 32, "BV": 32}, 4, 2)


def test_other_arguments_follow_the_first_listed_among_ties():
    listed = configs(({"DOT_PRECISION": "ieee"}, 4, 2), ({"DOT_PRECISION": "tf32"}, 4, 2))
    assert least_demanding(listed).kwargs == {"DOT_PRECISION": "ieee"}


def _kernel_module():
    def body(x_ptr, BV: triton.language.constexpr):
        pass

    listed = configs(({"BV": 64}, 4, 4), ({"BV": 32}, 4, 3), ({"BV": 32}, 2, 3))
    plain = triton.autotune(configs=listed, key=[])(triton.jit(body))
    wrapped = triton.heuristics({"IS_VARLEN": lambda args: False})(
        triton.autotune(configs=list(listed), key=[])(triton.jit(body))
    )
    return types.SimpleNamespace(plain=plain, wrapped=wrapped, other=3, helper=len)


def test_finds_autotuners_also_under_heuristics_and_pins_each_to_one():
    module = _kernel_module()
    tuners = autotuners_in([module, module])
    assert {id(t) for t in tuners} == {id(module.plain), id(module.wrapped.fn)}
    assert len(tuners) == 2


def test_pin_reduces_the_package_modules_autotuners(monkeypatch):
    module = _kernel_module()
    monkeypatch.setitem(sys.modules, "fakefla.ops.kernels", module)
    assert pin_autotuned_kernels("fakefla") == 2
    for tuner in (module.plain, module.wrapped.fn):
        (kept,) = tuner.configs
        assert (kept.kwargs, kept.num_warps, kept.num_stages) == ({"BV": 32}, 4, 3)


KERNEL_FILE = """
import triton


@triton.autotune(
    configs=[
        triton.Config({"BV": 64}, num_warps=4, num_stages=4),
        triton.Config({"BV": 32}, num_warps=4, num_stages=3),
    ],
    key=[],
)
@triton.jit
def kernel(x_ptr, BV: triton.language.constexpr):
    pass
"""


def test_a_package_imported_late_is_pinned_once_imported(tmp_path, monkeypatch):
    # as fla in a fresh process: the model imports it at its first call, after the tests pinned
    (tmp_path / "latefla" / "ops").mkdir(parents=True)
    (tmp_path / "latefla" / "__init__.py").write_text("")
    (tmp_path / "latefla" / "ops" / "__init__.py").write_text("from latefla.ops.kernels import kernel\n")
    (tmp_path / "latefla" / "ops" / "kernels.py").write_text(textwrap.dedent(KERNEL_FILE))
    monkeypatch.syspath_prepend(str(tmp_path))
    for name in ("latefla", "latefla.ops", "latefla.ops.kernels"):
        monkeypatch.delitem(sys.modules, name, raising=False)
    assert pin_autotuned_kernels("latefla") == 0  # not imported yet: nothing to pin
    try:
        assert imported(["latefla.ops"])
        assert pin_autotuned_kernels("latefla") == 1
        (kept,) = sys.modules["latefla.ops.kernels"].kernel.configs
        assert (kept.kwargs, kept.num_stages) == ({"BV": 32}, 3)
        assert not imported(["latefla.ops", "latefla.missing"])  # as a machine without fla
    finally:
        for name in ("latefla", "latefla.ops", "latefla.ops.kernels"):
            sys.modules.pop(name, None)
