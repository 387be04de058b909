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
The engine is then told to adopt those layers (`engine_adopts_replaced_layers`): it still creates the
expert-parallel groups, binds them to the layers and partitions ZeRO as usual, but finds nothing left
to replace. After `initialize`, `check_expert_ranks` confirms each layer's experts are those of its
rank in the engine's groups. So parameter names, ZeRO groups and checkpoints (universal included) are
AutoEP's, unchanged.

What we add from our side (and would ask DeepSpeed for upstream):
- Router logits for the global-batch LBL: the replacement's router is `mlp.router.gate`, so the
  model's recorder is re-attached there after `initialize` (`attach_after_initialize`).
- The aux-loss-free selection bias: AutoEP's router already adds `expert_bias` for selection only,
  but accepts it only with its own `load_balance_coeff` update rule; we register our fp32 buffer on
  each layer instead, updated by the trainer like the unreplaced blocks' (and so checkpointed).
- The optimizer: under ZeRO the expert parameters need their own groups (DeepSpeed's MoE groups, by
  expert-parallel group name); `moe_optimizer_factory` builds them, called by the engine once its
  set-up is done.
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

import contextlib
import re
from collections.abc import Callable

import torch
from torch import nn

from model.moe import RouterLogitsRecorder, moe_blocks

AUTOEP_ROUTER_SUFFIX = "mlp.router.gate"
EXPERT_PARAM = re.compile(r"(.+\.mlp)\.experts\.(w[123])")  # a replaced layer's local experts
# DeepSpeed versions whose AutoEP internals `engine_adopts_replaced_layers` was written against
ADOPTION_CHECKED_ON = ("0.19.8",)


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
    check_deepspeed_version()
    config = parse_autoep_config(autoep_config(expert_parallel_size))
    with torch.device("meta"):  # AutoEP builds its router and grouped experts before copying into them
        autoep = AutoEP(model, config)
        specs = autoep.ep_parser()
        validate_autoep_post_detection(config, specs)
        autoep.replace_moe_layers(specs, ep_size=expert_parallel_size, ep_rank=ep_rank)
    return len(specs)


def check_deepspeed_version() -> None:
    """Building AutoEP's layers before the engine, and having the engine adopt them, leans on
    DeepSpeed internals (see `engine_adopts_replaced_layers`): refuse versions it was not checked on,
    before any work."""
    import deepspeed

    if deepspeed.__version__ not in ADOPTION_CHECKED_ON:
        raise RuntimeError(
            "expert parallelism builds AutoEP's layers before the engine and has the engine adopt them, "
            f"which was checked on DeepSpeed {', '.join(ADOPTION_CHECKED_ON)}; "
            f"this is {deepspeed.__version__}. "
            "Install deepspeed==0.19.8, or check parallel/expert.py's engine_adopts_replaced_layers "
            "against this version and add it to ADOPTION_CHECKED_ON"
        )


@contextlib.contextmanager
def engine_adopts_replaced_layers(model: nn.Module):
    """During `deepspeed.initialize(model=model, ...)`: the engine keeps the AutoEP layers that
    `replace_moe_blocks` built instead of detecting MoE blocks to replace (there are none left, which
    it would refuse). It still creates the expert groups and binds them to the layers.

    DeepSpeed has no switch for this, so the engine's `AutoEP.ep_parser` answers "nothing to replace"
    for this model only, for the duration of the call (written against DeepSpeed 0.19.8, whose engine
    calls the parser once, in `_configure_expert_parallel`, and replaces only what it returns)."""
    from deepspeed.module_inject.auto_ep import AutoEP

    check_deepspeed_version()
    if not autoep_layers(model):
        raise RuntimeError("expert parallelism is on but the model has no AutoEP layer (replace_moe_blocks)")
    detect = AutoEP.ep_parser

    def ep_parser(self):
        return [] if self.model is model else detect(self)

    AutoEP.ep_parser = ep_parser
    try:
        yield
    finally:
        AutoEP.ep_parser = detect


def check_expert_ranks(model: nn.Module) -> None:
    """After `deepspeed.initialize`: every AutoEP layer holds the experts of its rank in the engine's
    expert-parallel group. The experts were placed when the layer was built (`expert_parallel_rank`,
    recorded by AutoEP on each expert parameter); the engine may since have rebound the layer's own
    `ep_rank` (under folding it does), so the parameters' record is what is compared."""
    import torch.distributed as dist
    from deepspeed.checkpoint.constants import AUTOEP_PARAM_EP_RANK, DS_AUTOEP_UC_META

    for layer in autoep_layers(model):
        actual = dist.get_rank(group=layer.ep_group)
        for param in layer.experts.parameters():
            built_for = getattr(param, DS_AUTOEP_UC_META)[AUTOEP_PARAM_EP_RANK]
            if built_for != actual:
                raise RuntimeError(
                    f"an AutoEP layer was built with the experts of expert-parallel rank {built_for}, but "
                    f"this process is rank {actual} of the engine's expert group: parallel/expert.py's "
                    "expert_parallel_rank no longer matches DeepSpeed's group layout"
                )


def autoep_layers(model: nn.Module) -> list[nn.Module]:
    from deepspeed.module_inject.auto_ep_layer import AutoEPMoELayer

    return [module for module in model.modules() if isinstance(module, AutoEPMoELayer)]


def moe_optimizer_factory(
    model: nn.Module,
    groups_of: Callable[[nn.Module], list[dict]],
    make: Callable[[list[dict]], torch.optim.Optimizer],
) -> Callable:
    """What `deepspeed.initialize(optimizer=...)` calls after its set-up: our parameter groups of the
    model, the expert parameters split into DeepSpeed's MoE groups."""
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
        raise RuntimeError("tensor and expert parallelism are on but the model has no AutoEP layer")
    for param in experts:
        param.tensor_model_parallel = True  # folding then skips it: no TP reduction, no 1/tp
        param.register_hook(lambda grad: grad / tp)


def attach_after_initialize(model: nn.Module, *, selection_bias: bool) -> list[torch.Tensor] | None:
    """Re-attach the router-logits recorder to the replaced routers; with `selection_bias`, give every
    replaced layer a zero fp32 `expert_bias` buffer. Returns the biases in router call order."""
    layers = autoep_layers(model)
    if not layers:
        raise RuntimeError("expert parallelism is on but the model has no AutoEP layer (replace_moe_blocks)")
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
