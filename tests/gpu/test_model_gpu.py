"""The whole model on the GPU fast path (fla, grouped_mm, chunked CE, SDPA) against the CPU
fp32 reference path, at head sizes the kernels are tuned for; skipped without CUDA and fla."""

import pytest
import torch

from model.documents import DocumentLayout
from model.init import init_weights
from model.qwen3_next import Qwen3NextForCausalLM
from tests.conftest import tiny_config
from tests.unit.test_model import pack, random_documents

if not torch.cuda.is_available():
    pytest.skip("needs CUDA", allow_module_level=True)
pytest.importorskip("fla")


def gpu_sized_config():
    return tiny_config(
        vocab_size=2048,
        hidden_size=256,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=64,
        linear_num_key_heads=2,
        linear_num_value_heads=4,
        linear_key_head_dim=128,
        linear_value_head_dim=128,
        num_experts=16,
        num_experts_per_tok=4,
        moe_intermediate_size=128,
        shared_expert_intermediate_size=128,
    )


def rel_rms(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def loss_and_grads(model, ids, pos, labels):
    model.zero_grad()
    out = model(ids, position_ids=pos, labels=labels)
    loss = out.lm_loss_sum / out.lm_tokens + out.mtp_loss_sums[0] / out.mtp_tokens[0]
    loss.backward()
    return loss.detach(), {
        n: p.grad.detach().float().cpu() for n, p in model.named_parameters() if p.grad is not None
    }


def packed_batch(config):
    docs = random_documents((300, 77, 500, 129, 1000), vocab=config.vocab_size, seed=0)
    return pack(docs, row_len=1024)


def reference_and_gpu_models(config, dtype):
    cpu = Qwen3NextForCausalLM(config)
    init_weights(cpu, config, seed=0)
    gpu = Qwen3NextForCausalLM(config)
    gpu.load_state_dict(cpu.state_dict())
    return cpu, gpu.to(device="cuda", dtype=dtype)


def assert_fp32_gpu_matches_cpu(config):
    cpu, gpu = reference_and_gpu_models(config, torch.float32)
    ids, labels, pos = packed_batch(config)
    ref_loss, ref_grads = loss_and_grads(cpu, ids, pos, labels)
    loss, grads = loss_and_grads(gpu, ids.cuda(), pos.cuda(), labels.cuda())
    assert abs(loss.cpu() - ref_loss) / ref_loss < 1e-3, f"loss {loss.item()} vs reference {ref_loss.item()}"
    errors = {n: rel_rms(grads[n], g) for n, g in ref_grads.items() if g.norm() > 0}
    worst = sorted(errors, key=errors.get, reverse=True)[:5]
    assert errors[worst[0]] < 2e-2, "relative RMS errors: " + ", ".join(f"{n} {errors[n]:.3g}" for n in worst)


def use_reference_delta_rule(monkeypatch) -> None:
    """The Gated DeltaNet layers run the torch reference of the delta rule instead of fla, called
    eagerly as fla is (compiled layers keep it out of their graphs)."""
    import model.deltanet
    from model.ops.gated_delta_rule import chunk_gated_delta_rule_reference

    eager_reference = torch.compiler.disable(chunk_gated_delta_rule_reference)
    monkeypatch.setattr(model.deltanet, "chunk_gated_delta_rule", eager_reference)


def test_fp32_gpu_model_matches_cpu_reference(monkeypatch):
    """Same weights, fp32: the packed path, the compiled fusions, grouped_mm and the chunked CE on
    CUDA compute the CPU reference's loss and gradients. The delta rule runs the pure-torch reference
    on CUDA here: fla's kernels compute in bf16/TF32 whatever the input dtype (on an H200 the whole-
    model fp32 comparison with fla failed this test's 2e-2 bound while this one passed), so fla is
    held to the reference where that precision is meant, in bf16: test_gated_delta_rule_gpu.py and
    the bf16 model test below."""
    use_reference_delta_rule(monkeypatch)
    assert_fp32_gpu_matches_cpu(gpu_sized_config())


def test_bf16_gpu_model_stays_close_to_the_reference():
    """bf16 weights and activations (grouped_mm experts): the loss within bf16 noise, finite grads.
    Gradients are not compared one by one: bf16 rounding flips near-tied router choices."""
    config = gpu_sized_config()
    cpu, gpu = reference_and_gpu_models(config, torch.bfloat16)
    ids, labels, pos = packed_batch(config)
    ref_loss, _ = loss_and_grads(cpu, ids, pos, labels)
    loss, grads = loss_and_grads(gpu, ids.cuda(), pos.cuda(), labels.cuda())
    assert abs(loss.float().cpu() - ref_loss) / ref_loss < 2e-2, f"loss {loss.item()} vs {ref_loss.item()}"
    assert all(torch.isfinite(g).all() for g in grads.values())


def test_training_forward_and_backward_never_wait_on_the_gpu():
    """With the document layout derived on the host (as the training loop does), a packed bf16
    forward and backward launch everything without one host sync: each would drain the GPU's queue."""
    config = gpu_sized_config()
    _, gpu = reference_and_gpu_models(config, torch.bfloat16)
    ids, labels, pos = packed_batch(config)
    documents = DocumentLayout.from_position_ids(pos, *ids.shape, ids.device).to("cuda")
    ids, labels = ids.cuda(), labels.cuda()

    def forward_backward():
        out = gpu(ids, labels=labels, documents=documents)
        (out.lm_loss_sum / out.lm_tokens + out.mtp_loss_sums[0] / out.mtp_tokens[0]).backward()

    forward_backward()  # the first call autotunes fla's kernels, which times them on the host
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        forward_backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")


def test_compiled_layers_compute_the_eager_model(monkeypatch):
    """fp32, every expert routed (top-k = all): with sparse top-k, fusion's reordered fp32 sums flip
    near-tied router choices (an H100 run: one router's weight gradient off by 3.8%). The delta rule
    is the torch reference, called eagerly as fla is: fla computes in bf16/TF32 whatever the input
    dtype, and its rounding of the compiled layers' slightly different inputs put A_log's gradient
    1.1e-3 from the eager model's (H200, two runs), which is fla's precision, not the compiler's."""
    use_reference_delta_rule(monkeypatch)
    config = gpu_sized_config()
    config.num_experts_per_tok = config.num_experts
    _, eager = reference_and_gpu_models(config, torch.float32)
    _, compiled = reference_and_gpu_models(config, torch.float32)
    compiled.compile_layers()
    ids, labels, pos = (t.cuda() for t in packed_batch(config))
    eager_loss, eager_grads = loss_and_grads(eager, ids, pos, labels)
    loss, grads = loss_and_grads(compiled, ids, pos, labels)
    assert abs(loss - eager_loss) / eager_loss < 1e-4
    errors = {n: rel_rms(grads[n], g) for n, g in eager_grads.items() if g.norm() > 0}
    worst = max(errors, key=errors.get)
    assert errors[worst] < 1e-3, f"{worst}: relative RMS error {errors[worst]:.3g}"
