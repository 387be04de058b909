"""The compiled paths against the eager model, on CPU (inductor's C++ backend).

On CUDA the elementwise chains run through torch.compile and `compile_layers()` compiles whole
decoder layers; here QWEN3NEXT_COMPILE=always forces the same compilation on CPU so that CI holds
both to the eager model (this is how a mis-compiled DeltaNet backward was caught).
"""

import pytest
import torch

from tests.conftest import tiny_config
from tests.unit.test_model import build, losses, pack, random_documents


def loss_and_grads(model, ids, labels, pos):
    model.zero_grad()
    out = model(ids, position_ids=pos, labels=labels)
    loss = losses(out)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return loss.detach(), grads, [s.counts_e.tolist() for s in out.router_stats]


@pytest.fixture(scope="module")
def packed_batch():
    return pack(random_documents(), row_len=80)


@pytest.mark.slow
@pytest.mark.parametrize("whole_layers", [False, True], ids=["fused-functions", "compiled-layers"])
def test_compiled_model_computes_the_eager_model(monkeypatch, packed_batch, whole_layers):
    ids, labels, pos = packed_batch
    config = tiny_config()
    monkeypatch.setenv("QWEN3NEXT_COMPILE", "0")
    eager_loss, eager_grads, eager_routers = loss_and_grads(build(config), ids, labels, pos)

    monkeypatch.setenv("QWEN3NEXT_COMPILE", "always")
    model = build(config)
    if whole_layers:
        model.compile_layers()
    loss, grads, routers = loss_and_grads(model, ids, labels, pos)

    assert routers == eager_routers  # the MoE blocks still record their routing inside compiled layers
    torch.testing.assert_close(loss, eager_loss, rtol=1e-5, atol=1e-5)
    assert grads.keys() == eager_grads.keys()
    for name, grad in eager_grads.items():
        torch.testing.assert_close(grads[name], grad, rtol=1e-4, atol=1e-5, msg=name)


def test_compiled_layers_share_their_graphs_across_a_deep_stack(monkeypatch):
    """One graph per layer kind, not per layer: with 12 MoE layers and more (the 80B has 48), a graph
    that depended on a layer's position would pass dynamo's recompile limit (8), and the layers past
    it would run eagerly. Traced only (backend "eager"), which is where the guards are decided."""
    monkeypatch.setattr(torch._dynamo.config, "fail_on_recompile_limit_hit", True)
    torch._dynamo.reset()
    config = tiny_config(num_hidden_layers=12)
    model = build(config)
    for layer in list(model.model.layers) + list(model.mtp.layers):
        layer.compile(backend="eager")
    ids = torch.randint(0, config.vocab_size, (2, 10))
    out = model(ids, labels=ids)
    out.lm_loss_sum.backward()
    assert len(out.router_stats) == 13
    torch._dynamo.reset()
