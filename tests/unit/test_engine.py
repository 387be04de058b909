"""parallel/engine.py's start-up guard, and the kernel switches that the config now sets.

The DeepSpeed internals that engine.py changes were read against DEEPSPEED_CHECKED_ON; an installed
version outside it is refused before any process group starts, or with the config's
`parallel.untested_deepspeed=true` accepted with a warning, the speed-only changes left out.
"""

import types

import deepspeed
import pytest

from model.ops import attention, fusion
from parallel.engine import (
    DEEPSPEED_CHECKED_ON,
    UntestedDeepSpeedError,
    check_deepspeed_version,
    deepspeed_is_checked,
    setup_distributed,
)


def test_the_installed_deepspeed_is_a_checked_one():
    assert deepspeed.__version__ in DEEPSPEED_CHECKED_ON
    check_deepspeed_version()  # no error, no warning


def test_an_untested_deepspeed_is_refused_before_any_process_group(monkeypatch):
    monkeypatch.setattr(deepspeed, "__version__", "0.20.1")
    assert not deepspeed_is_checked()
    with pytest.raises(UntestedDeepSpeedError, match=r"DeepSpeed 0\.20\.1 is installed.*deepspeed==0\.19\.8"):
        setup_distributed()
    with pytest.raises(UntestedDeepSpeedError, match=r"parallel\.untested_deepspeed=true"):
        check_deepspeed_version()


def test_an_untested_deepspeed_runs_when_allowed_with_a_warning(monkeypatch):
    monkeypatch.setattr(deepspeed, "__version__", "0.20.1")
    with pytest.warns(UserWarning, match="bf16 speed-ups are off"):
        check_deepspeed_version(allow_untested=True)


def test_the_config_switches_turn_the_compiled_fusions_and_varlen_attention_off(monkeypatch):
    monkeypatch.delenv("QWEN3NEXT_COMPILE", raising=False)
    monkeypatch.delenv("QWEN3NEXT_VARLEN", raising=False)
    on_cuda = types.SimpleNamespace(is_cuda=True)
    try:
        fusion.compile_fusions(False)
        attention.use_varlen(False)
        assert not fusion.compile_on(on_cuda)
        assert attention._varlen_kernel() is None
        fusion.compile_fusions(True)
        attention.use_varlen(True)
        assert fusion.compile_on(on_cuda)
        monkeypatch.setenv("QWEN3NEXT_COMPILE", "0")  # the environment overrides, for tests
        assert not fusion.compile_on(on_cuda)
    finally:
        fusion.compile_fusions(True)
        attention.use_varlen(True)


def test_a_copied_or_pickled_parameter_lends_no_optimizer_buffer():
    """The fp32 gradient buffer an engine lends a parameter is its optimizer's: a deep copy of the
    model (or a pickle of it) must not write into it, so its parameters get none."""
    import copy
    import io

    import torch

    from parallel.engine import _OptimizerGradientBuffer

    class Optimizer:  # a BF16_Optimizer's two lists, one parameter's flat fp32 gradient
        def __init__(self):
            self.fp32_groups_gradients = [[torch.zeros(6)]]
            self.fp32_groups_has_gradients = [[False]]

    optimizer = Optimizer()
    weight = torch.nn.Parameter(torch.ones(2, 3))
    weight.fp32_grad_buffer = _OptimizerGradientBuffer(optimizer, weight, 0, 0)
    assert weight.fp32_grad_buffer.tensor().shape == (2, 3)
    weight.fp32_grad_buffer.mark_written()
    assert weight.fp32_grad_buffer.holds_gradient()
    assert weight._hp_grad is optimizer.fp32_groups_gradients[0][0]

    module = torch.nn.Module()
    module.weight = weight
    assert getattr(copy.deepcopy(module).weight, "fp32_grad_buffer", None) is None
    saved = io.BytesIO()
    torch.save(module, saved)
    saved.seek(0)
    assert getattr(torch.load(saved, weights_only=False).weight, "fp32_grad_buffer", None) is None
    assert weight.fp32_grad_buffer is not None  # the original keeps it
