"""Expert parallelism through DeepSpeed AutoEP: configured from `parallel.expert`, not re-implemented.

With `parallel.expert` = ep > 1, every `SparseMoeBlock` (main stack and MTP) is replaced by AutoEP's
layer: the same routing (fp32 softmax over all experts, exact top-k, renormalised, no capacity
limit, no dropped tokens), tokens moved to the experts' ranks by all-to-all, the local E/ep experts
as one grouped GEMM, the sigmoid-gated shared expert. Expert ranks are consecutive (ep group
{0..ep-1}, ...), and expert gradients are reduced over the expert-data-parallel group (ranks r, r+ep,
...). There is no Qwen3-Next preset, and the built-in presets miss the MTP block, so the section
below describes our block layout directly: router `gate`, fused `experts.gate_up_proj` [E, 2I, H]
with the gate rows first, `experts.down_proj` [E, H, I], `shared_expert(_gate)`.

Where the replacement happens. Inside `deepspeed.initialize`, AutoEP copies each rank's experts out
of the block's whole [E, ...] tensors, so every rank would first have to hold every expert (the 80B's
77B expert parameters). Instead `replace_moe_blocks` runs AutoEP's own detection and replacement
(`AutoEP.ep_parser`, `replace_moe_layers`) on the model while it is still on the meta device, for this
rank's expert-parallel rank (`expert_parallel_rank`, DeepSpeed's group layout): the replaced layers
hold meta tensors of the local experts only, which parallel/build.py then materialises and fills.
The engine then adopts those layers (parallel/engine.py, which holds every change we make to
DeepSpeed's behaviour: adoption, the MoE optimizer groups, folding, the selection-bias slot and the
routing statistics). So parameter names, ZeRO groups and checkpoints (universal included) are
AutoEP's, unchanged. ZeRO 0 is refused with expert parallelism (train/config.py): DeepSpeed's
clipping there averages the ranks' local norms instead of the global norm.

With tensor parallelism too (tp x dp ranks, ep > 1), AutoEP "folds" the expert-parallel group onto
the tensor-parallel ranks: TP peers hold the same tokens, each dispatches a share of their (token,
slot) pairs, and the results are all-gathered back over the TP group. DeepSpeed enables folding
through its own AutoTP setting (`tensor_parallel.autotp_size`) and refuses a tensor-parallel `mpu`
with AutoEP; `expert_parallel_rank` follows its folding tables.

Names after replacement (checkpoints): `mlp.router.gate.weight`, `mlp.experts.w1` / `w3` [E/ep, I, H]
(gate / up halves of our `gate_up_proj`), `mlp.experts.w2` [E/ep, H, I] (`down_proj`),
`mlp.shared_experts.*`, `mlp.shared_experts_gate.weight`; rank r holds experts r*E/ep ... .
"""

from __future__ import annotations

import re

import torch
from torch import nn

EXPERT_PARAM = re.compile(r"(.+\.mlp)\.experts\.(w[123])")  # a replaced layer's local experts


def autoep_config(expert_parallel_size: int) -> dict:
    """DeepSpeed's `expert_parallel` config section for our MoE blocks."""
    return {
        "enabled": True,
        "autoep_size": expert_parallel_size,
        "moe_layer_pattern": r"(model|mtp)\.layers\.\d+\.mlp",  # full match; the MTP block's MoE too
        "router_pattern": "gate",
        "expert_pattern": "experts",
        "expert_w1": "gate_up_proj",  # fused [E, 2I, H], gate rows first
        "expert_w2": "down_proj",
        "expert_w3": None,  # None: gate and up fused in w1
        "num_experts_attr": "num_experts",
        "top_k_attr": "num_experts_per_tok",
        "score_func": "softmax",
        "score_apply": "post",  # weights applied to the expert outputs, as our combine does
        "route_norm": True,
        "has_shared_experts": True,
        "shared_experts_pattern": "shared_expert",
        "shared_experts_gate_pattern": "shared_expert_gate",
        "expert_activation": "swiglu",
        "use_grouped_mm": True,
    }


def expert_parallel_rank(rank: int, world: int, tensor: int, expert: int) -> int:
    """This rank's place in its expert-parallel group, as DeepSpeed lays the groups out: consecutive
    blocks of `expert` ranks; folded onto tensor parallelism (tensor > 1), AutoEP's folding tables."""
    if tensor == 1:
        return rank % expert
    from deepspeed.module_inject.auto_ep_folding import build_folding_spec, local_folding_ranks

    spec = build_folding_spec(world_size=world, pp_size=1, tp_size=tensor, ep_size=expert)
    return local_folding_ranks(rank, spec)["ep"].index(rank)


def replace_moe_blocks(model: nn.Module, expert_parallel_size: int, ep_rank: int) -> int:
    """Replace every MoE block of a meta-device model by AutoEP's layer holding only the experts of
    `ep_rank`, as `deepspeed.initialize` would (same code, same names); returns how many."""
    from deepspeed.module_inject.auto_ep import AutoEP
    from deepspeed.module_inject.auto_ep_config import parse_autoep_config, validate_autoep_post_detection

    if any(p.device.type != "meta" for p in model.parameters()):
        raise RuntimeError("replace_moe_blocks expects a model on the meta device (parallel/build.py)")
    config = parse_autoep_config(autoep_config(expert_parallel_size))
    with torch.device("meta"):  # AutoEP builds its router and grouped experts before copying into them
        autoep = AutoEP(model, config)
        specs = autoep.ep_parser()
        validate_autoep_post_detection(config, specs)
        autoep.replace_moe_layers(specs, ep_size=expert_parallel_size, ep_rank=ep_rank)
    return len(specs)


def autoep_layers(model: nn.Module) -> list[nn.Module]:
    from deepspeed.module_inject.auto_ep_layer import AutoEPMoELayer

    return [module for module in model.modules() if isinstance(module, AutoEPMoELayer)]


def local_expert_source(name: str, param: torch.Tensor) -> tuple[str, range, slice | None] | None:
    """For a replaced layer's expert weight (`...mlp.experts.w1` / `w3` [E/ep, I, H], `w2` [E/ep, H, I]):
    the fused tensor of our block it comes from, the experts this rank holds (DeepSpeed's record on the
    parameter) and the rows of each expert's matrix (w1 the gate half of `gate_up_proj`, w3 the up
    half). None for any other parameter."""
    from deepspeed.checkpoint.constants import AUTOEP_PARAM_LOCAL_EXPERTS, DS_AUTOEP_UC_META

    match = EXPERT_PARAM.fullmatch(name)
    if match is None:
        return None
    experts = list(getattr(param, DS_AUTOEP_UC_META)[AUTOEP_PARAM_LOCAL_EXPERTS])
    local = range(experts[0], experts[-1] + 1)
    if list(local) != experts:
        raise RuntimeError(f"{name}: AutoEP placed non-contiguous experts {experts} on this rank")
    block, which = match.groups()
    intermediate = param.shape[1] if which != "w2" else param.shape[2]
    if which == "w2":
        return f"{block}.experts.down_proj", local, None
    rows = slice(0, intermediate) if which == "w1" else slice(intermediate, 2 * intermediate)
    return f"{block}.experts.gate_up_proj", local, rows


def block_layout_name(name: str) -> str:
    """A replaced layer's non-expert parameter or buffer name -> the name in our MoE block."""
    return (
        name.replace(".mlp.router.gate.", ".mlp.gate.")
        .replace(".mlp.shared_experts_gate.", ".mlp.shared_expert_gate.")
        .replace(".mlp.shared_experts.", ".mlp.shared_expert.")
    )
