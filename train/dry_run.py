"""`trainer.dry_run=true`: build the model on the meta device and report what a run would need.

Prints total and active parameters (counted on the built model and by model/accounting.py), the
training FLOPs per token, and the per-rank memory estimate of train/memory.py for the layout, with
whether it fits `trainer.gpu_memory_gb`. Needs no GPU and allocates no weights.
"""

from __future__ import annotations

import torch

from model.accounting import count_parameters, flops_per_token
from model.qwen3_next import Qwen3NextForCausalLM
from train.config import Layout, PretrainConfig
from train.memory import GIB, estimate_memory


def dry_run_report(cfg: PretrainConfig, layout: Layout) -> tuple[str, bool]:
    """(the report, whether the estimate fits trainer.gpu_memory_gb; True when that is 0 = no limit)."""
    m = cfg.model
    with torch.device("meta"):
        model = Qwen3NextForCausalLM(m)
    built = sum(p.numel() for p in model.parameters())
    mtp = sum(p.numel() for p in model.mtp.parameters()) if model.mtp is not None else 0
    counted = count_parameters(m)
    if built - mtp != counted.total:  # the accounting must describe the model that is built
        raise RuntimeError(
            f"parameter accounting ({counted.total}) disagrees with the built model ({built - mtp})"
        )
    memory = estimate_memory(
        m,
        world=layout.world,
        tensor=layout.tensor,
        expert=layout.expert,
        zero_stage=cfg.parallel.zero_stage,
        micro_batch_size=cfg.trainer.micro_batch_size,
        seq_len=cfg.data.seq_len,
        activation_checkpointing=cfg.trainer.activation_checkpointing,
    )
    budget = cfg.trainer.gpu_memory_gb
    fits = budget <= 0 or memory.total <= budget * GIB
    gflops = flops_per_token(m, cfg.data.seq_len) / 1e9
    lines = [
        f"parameters: {counted.total / 1e9:.2f}B total without MTP "
        f"({counted.experts / 1e9:.2f}B in routed experts), {counted.active / 1e9:.2f}B active per token "
        f"({counted.active_without_embedding / 1e9:.2f}B without embeddings); "
        f"MTP adds {counted.mtp / 1e9:.2f}B",
        f"training FLOPs per token at seq_len {cfg.data.seq_len}: {gflops:.2f} GFLOP "
        f"(with {m.mtp_num_layers} MTP depth(s))",
        f"layout: world {layout.world} = tensor {layout.tensor} x data {layout.data}; "
        f"experts over {layout.expert} ranks x expert-data {layout.expert_data}; "
        f"ZeRO stage {cfg.parallel.zero_stage}; {layout.grad_accum} micro-batch(es) of "
        f"{cfg.trainer.micro_batch_size} x {cfg.data.seq_len} per step",
        "memory per rank (estimate): "
        f"parameters {memory.parameters / GIB:.1f} GiB, gradients {memory.gradients / GIB:.1f} GiB, "
        f"optimizer {memory.optimizer / GIB:.1f} GiB, activations {memory.activations / GIB:.1f} GiB; "
        f"total {memory.total / GIB:.1f} GiB",
        (
            "fits trainer.gpu_memory_gb"
            if budget <= 0
            else f"{'fits' if fits else 'does NOT fit'} trainer.gpu_memory_gb = {budget:g} GiB"
        ),
    ]
    return "\n".join(lines), fits
