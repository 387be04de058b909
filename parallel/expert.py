"""Expert parallelism through DeepSpeed AutoEP: configured from `parallel.expert`, not re-implemented.

With `parallel.expert` = ep > 1, `deepspeed.initialize` replaces every `SparseMoeBlock` (main stack and
MTP) by AutoEP's layer: the same routing (fp32 softmax over all experts, exact top-k, renormalised,
no capacity limit, no dropped tokens), tokens moved to the experts' ranks by all-to-all, the local
E/ep experts as one grouped GEMM, the sigmoid-gated shared expert. Expert ranks are consecutive
(ep group {0..ep-1}, ...), and expert gradients are reduced over the expert-data-parallel group
(ranks r, r+ep, ...). There is no Qwen3-Next preset, and the built-in presets miss the MTP block, so
the section below describes our block layout directly: router `gate`, fused `experts.gate_up_proj`
[E, 2I, H] with the gate rows first, `experts.down_proj` [E, H, I], `shared_expert(_gate)`.

What we add from our side (and would ask DeepSpeed for upstream):
- Router logits for the global-batch LBL: the replacement's router is `mlp.router.gate`, so the
  model's recorder is re-attached there after `initialize` (`attach_after_initialize`).
- The aux-loss-free selection bias: AutoEP's router already adds `expert_bias` for selection only,
  but accepts it only with its own `load_balance_coeff` update rule; we register our fp32 buffer on
  each layer instead, updated by the trainer like the unreplaced blocks' (and so checkpointed).
- The optimizer: under ZeRO the expert parameters need their own groups, which exist only after the
  replacement, so the engine gets a factory (`moe_optimizer_factory`) instead of an instance.
- ZeRO 0 is refused with expert parallelism (train/config.py): DeepSpeed's clipping there averages
  the ranks' local norms instead of the global norm, and our replicated-gradient checks would let
  ranks disagree about skipping a step.

With tensor parallelism too (tp x dp ranks, ep > 1), AutoEP "folds" the expert-parallel group onto
the tensor-parallel ranks: TP peers hold the same tokens, each dispatches a share of their (token,
slot) pairs, and the results are all-gathered back over the TP group. DeepSpeed enables folding
through its own AutoTP setting (`tensor_parallel.autotp_size`), refuses a tensor-parallel `mpu`
with AutoEP, and reduces each parameter family's gradient over the TP group itself, skipping those
marked model-parallel (our head shards). `fold_onto_tensor_parallel` / `after_folded_initialize`
adapt our model:
- our heads are sharded already, so AutoTP must not partition again (`ds_autotp_parsed`);
- ZeRO 1-2's gradient norm counts unmarked parameters on TP rank 0 only, which under folding leaves
  out the experts the other TP ranks hold. The expert weights are marked model-parallel (counted on
  every rank), and we divide their gradient by tp ourselves, which folding would otherwise do (the
  all-gather's backward multiplies it by tp).
Upstream asks: a documented switch for "the model is TP-sharded already", and the norm counting
expert parameters under folding.

Names after replacement (checkpoints): `mlp.router.gate.weight`, `mlp.experts.w1` / `w3` [E/ep, I, H]
(gate / up halves of our `gate_up_proj`), `mlp.experts.w2` [E/ep, H, I] (`down_proj`),
`mlp.shared_experts.*`, `mlp.shared_experts_gate.weight`; rank r holds experts r*E/ep ... .
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from model.moe import RouterLogitsRecorder, moe_blocks

AUTOEP_ROUTER_SUFFIX = "mlp.router.gate"
EXPERT_KEY = re.compile(r"(.+\.mlp)\.experts\.(w[123])\.(\d+)")  # one expert's tensor in its own file


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


def autoep_layers(model: nn.Module) -> list[nn.Module]:
    from deepspeed.module_inject.auto_ep_layer import AutoEPMoELayer

    return [module for module in model.modules() if isinstance(module, AutoEPMoELayer)]


def moe_optimizer_factory(
    model: nn.Module,
    groups_of: Callable[[nn.Module], list[dict]],
    make: Callable[[list[dict]], torch.optim.Optimizer],
) -> Callable:
    """What `deepspeed.initialize(optimizer=...)` calls once the experts are replaced: our parameter
    groups of the replaced model, the expert parameters split into DeepSpeed's MoE groups."""
    from deepspeed.moe.utils import split_params_into_different_moe_groups_for_optimizer

    def factory(_model_parameters) -> torch.optim.Optimizer:
        return make(split_params_into_different_moe_groups_for_optimizer(groups_of(model)))

    return factory


def fold_onto_tensor_parallel(model: nn.Module) -> None:
    """Before `deepspeed.initialize` with AutoEP and `tensor_parallel.autotp_size` > 1: the model's
    heads are already sharded (parallel/tensor.py), so DeepSpeed's AutoTP must leave them as they are."""
    model.ds_autotp_parsed = True  # the engine's own flag for a model AutoTP has partitioned


def after_folded_initialize(model: nn.Module, tp: int) -> None:
    """After `deepspeed.initialize` under folding: expert weights counted by the gradient norm on the
    rank that holds them, and their gradient's factor tp from the TP all-gather taken out here."""
    experts = [p for name, p in model.named_parameters() if ".mlp.experts.w" in name]
    if not experts:
        raise RuntimeError("tensor and expert parallelism are on but AutoEP replaced no MoE block")
    for param in experts:
        param.tensor_model_parallel = True  # folding then skips it: no TP reduction, no 1/tp
        param.register_hook(lambda grad: grad / tp)


def attach_after_initialize(model: nn.Module, *, selection_bias: bool) -> list[torch.Tensor] | None:
    """Re-attach the router-logits recorder to the replaced routers; with `selection_bias`, give every
    replaced layer a zero fp32 `expert_bias` buffer. Returns the biases in router call order."""
    layers = autoep_layers(model)
    if not layers:
        raise RuntimeError("expert parallelism is on but DeepSpeed replaced no MoE block (AutoEP)")
    model.router_recorder.remove()
    model.router_recorder = RouterLogitsRecorder(model, AUTOEP_ROUTER_SUFFIX)
    if not selection_bias:
        return None
    biases = []
    for layer in layers:
        device = next(layer.parameters()).device
        del layer.expert_bias  # a plain None attribute unless AutoEP's own balancing is configured
        layer.register_buffer("expert_bias", torch.zeros(layer.num_experts, device=device))
        biases.append(layer.expert_bias)
    return biases


def selection_biases(model: nn.Module) -> list[torch.Tensor]:
    """The unreplaced blocks' biases in fp32 (DeepSpeed casts buffers with the module to bf16, and
    bias steps of 1e-3 vanish in bf16), in router call order."""
    biases = []
    for block in moe_blocks(model):
        block.expert_bias = block.expert_bias.float()
        biases.append(block.expert_bias)
    return biases


def block_layout_name(name: str) -> str:
    """A replaced layer's non-expert parameter or buffer name -> the name in our MoE block."""
    return (
        name.replace(".mlp.router.gate.", ".mlp.gate.")
        .replace(".mlp.shared_experts_gate.", ".mlp.shared_expert_gate.")
        .replace(".mlp.shared_experts.", ".mlp.shared_expert.")
    )


def consolidated_module_state(checkpoint_dir: str | Path) -> dict[str, torch.Tensor]:
    """The model weights of a checkpoint in our model's names and layout (experts fused back into
    `gate_up_proj` [E, 2I, H] and `down_proj` [E, H, I]): what `Qwen3NextForCausalLM.load_state_dict`
    and `model.hf.save_hf` take. Reads DeepSpeed's native checkpoints, saved with AutoEP (one file per
    expert), without, or tensor-parallel (one module file per TP rank, joined by the head-slicing
    rules), and universal ones (`zero/<name>/fp32.pt`, experts whole)."""
    checkpoint_dir = Path(checkpoint_dir)
    tp_files = sorted(checkpoint_dir.glob("mp_rank_*_model_states.pt"))
    modules = [torch.load(f, map_location="cpu", weights_only=True)["module"] for f in tp_files]
    if len(modules) > 1:  # tensor parallel: join the head shards (AutoEP's names pass as replicated)
        from parallel.tensor import gather_tensor_parallel
        from train.checkpoint import model_config_of

        modules = [gather_tensor_parallel(modules, model_config_of(checkpoint_dir))]
    raw = dict(modules[0])  # universal: buffers only; native: every non-expert tensor
    if (checkpoint_dir / "zero").is_dir():
        for fp32 in sorted((checkpoint_dir / "zero").glob("*/fp32.pt")):
            raw[fp32.parent.name] = torch.load(fp32, map_location="cpu", weights_only=True)["param"]
    per_expert: dict[str, dict[int, torch.Tensor]] = {}
    for path in sorted(checkpoint_dir.glob("layer_*_expert_*_model_states.pt")):
        for key, tensor in torch.load(path, map_location="cpu", weights_only=True).items():
            if key == "folding":  # AutoEP's record of the tensor-parallel folding it was saved under
                continue
            match = EXPERT_KEY.fullmatch(key)
            if match is None:
                raise ValueError(f"{path}: unexpected expert parameter {key!r}")
            per_expert.setdefault(f"{match.group(1)}.experts.{match.group(2)}", {})[int(match.group(3))] = (
                tensor
            )
    for name, by_index in per_expert.items():
        raw[name] = torch.stack([by_index[i] for i in sorted(by_index)])
    return to_block_layout(raw)


def to_block_layout(raw: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """AutoEP names with whole expert tensors (`experts.w1` / `w3` [E, I, H], `w2` [E, H, I]) -> ours."""
    state = {}
    for name, tensor in raw.items():
        if name.endswith((".experts.w1", ".experts.w3")):
            continue
        if name.endswith(".experts.w2"):
            block = name.removesuffix(".w2")
            state[f"{block}.gate_up_proj"] = torch.cat([raw[f"{block}.w1"], raw[f"{block}.w3"]], dim=1)
            state[f"{block}.down_proj"] = tensor
        else:
            state[block_layout_name(name)] = tensor
    return state
