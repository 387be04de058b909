"""Shared fixtures: a tiny model config small enough for exact CPU comparisons; and the `slow` mark
on every test of tests/distributed (each starts processes), so `pytest -m "not slow"` is a quick
inner loop (unit tests that start processes or train carry the mark themselves)."""

import importlib.util
from pathlib import Path

import pytest
import torch

from model.config import ModelConfig

DISTRIBUTED = Path(__file__).resolve().parent / "distributed"
REPO = Path(__file__).resolve().parents[1]


def pytest_collection_modifyitems(config, items) -> None:
    for item in items:
        if DISTRIBUTED in Path(item.fspath).parents:
            item.add_marker(pytest.mark.slow)


def tiny_config(**overrides) -> ModelConfig:
    """Every architectural feature at toy size: 2 value heads per key head, GQA, partial RoPE,
    hybrid 3:1 pattern, 8 experts top-3 with renormalisation, one MTP depth."""
    values = dict(
        vocab_size=97,
        hidden_size=32,
        num_hidden_layers=4,
        full_attention_interval=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        partial_rotary_factor=0.25,
        rope_theta=10000.0,
        linear_num_key_heads=2,
        linear_num_value_heads=4,
        linear_key_head_dim=8,
        linear_value_head_dim=8,
        linear_conv_kernel_dim=4,
        num_experts=8,
        num_experts_per_tok=3,
        moe_intermediate_size=16,
        shared_expert_intermediate_size=24,
        intermediate_size=48,
        mtp_num_layers=1,
    )
    values.update(overrides)
    return ModelConfig(**values)


@pytest.fixture(autouse=True)
def _deterministic_cpu():
    torch.manual_seed(0)
    yield


@pytest.fixture(scope="module")
def prepare_data():
    """launch/prepare_data.py's `main`, run in this process (it returns the exit status)."""
    spec = importlib.util.spec_from_file_location("prepare_data_cli", REPO / "launch" / "prepare_data.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return lambda *args: module.main([str(a) for a in args])


def running(pid: int) -> bool:
    """Exists and is not a zombie (an orphan's exit is reaped by whoever adopted it, maybe never)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"
