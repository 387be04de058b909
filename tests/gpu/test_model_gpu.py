"""The whole model on the GPU fast path (fla, grouped_mm, chunked CE, SDPA) against the CPU
fp32 reference path, at head sizes the kernels are tuned for; skipped without CUDA and fla."""

import pytest
import torch

from model.init import init_weights
from model.qwen3_next import Qwen3NextForCausalLM
from tests.conftest import tiny_config
from tests.unit.test_model import pack

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


def test_bf16_gpu_model_matches_fp32_cpu_reference():
    config = gpu_sized_config()
    cpu = Qwen3NextForCausalLM(config)
    init_weights(cpu, config, seed=0)
    gpu = Qwen3NextForCausalLM(config)
    gpu.load_state_dict(cpu.state_dict())
    gpu.to(device="cuda", dtype=torch.bfloat16)

    gen = torch.Generator().manual_seed(0)
    docs = [
        torch.randint(0, config.vocab_size, (n,), generator=gen).tolist() for n in (300, 77, 500, 129, 1000)
    ]
    ids, labels, pos = pack(docs, row_len=1024)

    ref_loss, ref_grads = loss_and_grads(cpu, ids, pos, labels)
    loss, grads = loss_and_grads(gpu, ids.cuda(), pos.cuda(), labels.cuda())
    assert torch.isfinite(loss)
    assert abs(loss.float().cpu() - ref_loss) / ref_loss < 1e-2
    errors = {n: rel_rms(grads[n], g) for n, g in ref_grads.items() if g.norm() > 0}
    worst = max(errors, key=errors.get)
    assert errors[worst] < 5e-2, f"{worst}: relative RMS error {errors[worst]:.3g}"
