"""A rank's model built straight on the GPU in bf16 (parallel/build.py, as the trainer builds it on
GPUs) holds the CPU fp32 build's values rounded to bf16, bit for bit: the seeded init does not depend
on the device, and a GPU rank never holds an fp32 copy of its shard. Skipped without CUDA."""

import pytest
import torch

from parallel.build import RankPlacement, build_rank_model
from tests.conftest import tiny_config

if not torch.cuda.is_available():
    pytest.skip("needs CUDA", allow_module_level=True)


@pytest.mark.parametrize("tensor", [1, 2], ids=["whole", "tp2-rank1"])
def test_gpu_build_is_the_cpu_build_in_bf16(tensor):
    config = tiny_config()
    placement = RankPlacement(world=tensor, rank=tensor - 1, tensor=tensor)
    cpu, _ = build_rank_model(config, placement, device="cpu", dtype=torch.float32, seed=0)
    gpu, report = build_rank_model(config, placement, device="cuda", dtype=torch.bfloat16, seed=0)
    expected = {name: p.detach().bfloat16() for name, p in cpu.named_parameters()}
    for name, param in gpu.named_parameters():
        assert param.device.type == "cuda" and param.dtype == torch.bfloat16, name
        assert torch.equal(param.detach().cpu(), expected[name]), name
    assert report.bytes == 2 * report.parameters
