"""GPU tests: fla's kernels run on one autotuning configuration each (tests/gpu/pinned_autotune.py),
unless QWEN3NEXT_FULL_AUTOTUNE=1."""

import importlib
import os

import pytest
import torch

from tests.gpu.pinned_autotune import FLA_MODULES, FULL_AUTOTUNE_ENV, pin_autotuned_kernels


def _fla_importable() -> bool:
    try:
        for name in FLA_MODULES:
            importlib.import_module(name)
    except ImportError:
        return False
    return True


PIN = torch.cuda.is_available() and os.environ.get(FULL_AUTOTUNE_ENV) != "1" and _fla_importable()


@pytest.fixture(autouse=True)
def _fla_pinned_to_one_config():
    """Again before every test: a module fla imports late gets pinned before its kernels run."""
    if PIN:
        pin_autotuned_kernels("fla")
    yield
