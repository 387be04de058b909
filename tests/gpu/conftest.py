"""GPU tests: fla's kernels run on one autotuning configuration each (bench/pinned_autotune.py),
unless QWEN3NEXT_FULL_AUTOTUNE=1."""

import pytest

from bench.pinned_autotune import pin_autotuned_kernels, pinning_wanted

PIN = pinning_wanted()


@pytest.fixture(autouse=True)
def _fla_pinned_to_one_config():
    """Again before every test: a module fla imports late gets pinned before its kernels run."""
    if PIN:
        pin_autotuned_kernels("fla")
    yield
