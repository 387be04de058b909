"""The GPU tests' autotuning pin (tests/gpu/pinned_autotune.py) on Triton autotuners built here:
which configuration each keeps, and that it finds them behind `triton.heuristics`. Needs no GPU."""

import types

import pytest

triton = pytest.importorskip("triton")

from tests.gpu.pinned_autotune import autotuners_in, least_demanding, pin_autotuned_kernels  # noqa: E402


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
    monkeypatch.setitem(__import__("sys").modules, "fakefla.ops.kernels", module)
    assert pin_autotuned_kernels("fakefla") == 2
    for tuner in (module.plain, module.wrapped.fn):
        (kept,) = tuner.configs
        assert (kept.kwargs, kept.num_warps, kept.num_stages) == ({"BV": 32}, 4, 3)
