"""What one sparse MoE block, or one whole decoder layer, keeps for backward, in bytes a token: a
count, not a timing.

    python -m bench.saved_activations                      # the 80B width, 128 experts, compiled
    python -m bench.saved_activations --eager --tokens 512 --experts 512
    python -m bench.saved_activations --layer linear_attention --tokens 8192 --budget 0.75  # on a GPU

The MoE block alone gives the same answer on any machine. A whole layer (`--layer`, Gated DeltaNet
or gated attention with its MoE block) runs on the GPU when there is one: there its mixer's kernels
(fla, flash attention) keep what they keep on the training path, which CPU's reference paths do not.
`--budget` is trainer.recompute_budget (the compiled graphs' activation memory budget).

The block (router, routed experts on the grouped-GEMM path, gated shared expert) is built at the
width of a conf/model preset in bf16 and run forward once under a `saved_tensors_hooks` that records
every tensor autograd keeps (parameters left out, each storage counted once); compiled, what
torch.compile's partitioner chose to keep. The grouped-GEMM path is the one CUDA trains on; here it
runs through torch._grouped_mm's CPU kernel. Prints the total a token, in values of the hidden size,
and the largest kept tensors. train/memory.py's per-layer estimate is checked against measured GPU
peaks (bench/RESULTS.md); this count says which tensors make up the MoE part of it.
"""

from __future__ import annotations

import argparse
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path

import torch
import torch._functorch.config
from omegaconf import OmegaConf

import model.ops.experts as experts_ops
from model.attention import RotaryEmbedding
from model.config import ModelConfig
from model.decoder import DecoderLayer
from model.documents import DocumentLayout
from model.moe import SparseMoeBlock

REPO = Path(__file__).resolve().parents[1]


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="80b_a3b", help="conf/model/<preset>.yaml")
    parser.add_argument("--experts", type=int, default=128, help="routed experts (the slice's 128)")
    parser.add_argument("--tokens", type=int, default=256, help="tokens in the batch")
    parser.add_argument("--eager", action="store_true", help="do not torch.compile the block")
    parser.add_argument(
        "--layer",
        choices=["linear_attention", "full_attention"],
        default=None,
        help="count a whole decoder layer of this kind (its MoE block included), not the MoE block alone",
    )
    parser.add_argument("--budget", type=float, default=1.0, help="trainer.recompute_budget")
    return parser.parse_args(argv)


def model_config(preset: str, experts: int) -> ModelConfig:
    values = OmegaConf.to_container(OmegaConf.load(REPO / "conf" / "model" / f"{preset}.yaml"))
    values["num_experts"] = experts
    return ModelConfig(**{k: v for k, v in values.items() if k in ModelConfig.__dataclass_fields__})


def kept_by(forward: Callable[[], torch.Tensor], params) -> dict[tuple, int]:
    """{(shape, dtype): bytes} of what autograd keeps while `forward()` runs (then its scalar result
    is backpropagated), the storages of `params` left out and each storage counted once."""
    param_storages = {p.untyped_storage().data_ptr() for p in params}
    storages: dict[int, tuple] = {}

    @torch.compiler.disable  # run inside a compiled graph, the hook is not to be traced
    def keep(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in param_storages and storage.data_ptr() not in storages:
            storages[storage.data_ptr()] = (
                (tuple(t.shape), str(t.dtype).removeprefix("torch.")),
                storage.nbytes(),
            )
        return t

    with torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t):
        loss = forward()
    loss.backward()
    by_kind: dict[tuple, int] = defaultdict(int)
    for kind, nbytes in storages.values():
        by_kind[kind] += nbytes
    return dict(by_kind)


def kept_tensors(block: torch.nn.Module, x_btd: torch.Tensor, compiled: bool, *extra) -> dict[tuple, int]:
    """`kept_by` one forward of `block(x_btd, *extra)` (a second run when compiled, so compilation's
    own tensors are not counted)."""
    run = torch.compile(block) if compiled else block
    if compiled:
        run(x_btd, *extra)[0].float().sum().backward()
    return kept_by(lambda: run(x_btd, *extra)[0].float().sum(), block.parameters())


def main(argv: list[str] | None = None) -> None:
    args = parse(argv)
    torch._functorch.config.activation_memory_budget = args.budget
    config = model_config(args.preset, args.experts)
    device = torch.device("cuda" if args.layer and torch.cuda.is_available() else "cpu")
    if device.type == "cpu":
        experts_ops._grouped_mm_fast_path_applies = lambda *_: True  # the CUDA path, on this CPU
    torch.manual_seed(0)
    block = (DecoderLayer(config, args.layer, moe=True) if args.layer else SparseMoeBlock(config)).to(
        device, torch.bfloat16
    )
    for p in block.parameters():
        torch.nn.init.normal_(p, std=0.02)
    x_btd = torch.randn(
        1, args.tokens, config.hidden_size, dtype=torch.bfloat16, device=device, requires_grad=True
    )
    extra = ()
    if args.layer:
        layout = DocumentLayout.from_position_ids(None, 1, args.tokens, device)
        rope = RotaryEmbedding(config.rotary_dim, config.rope_theta).to(device)(
            layout.position_ids_bt, torch.bfloat16
        )
        extra = (rope, layout)
    start = time.perf_counter()
    kept = kept_tensors(block, x_btd, not args.eager, *extra)
    total = sum(kept.values()) / args.tokens
    hidden = config.hidden_size
    mode = "eager" if args.eager else f"compiled, budget {args.budget:g}"
    what = f"{args.layer} layer" if args.layer else "MoE block"
    print(
        f"{what} on {device.type}, conf/model/{args.preset}.yaml with {args.experts} experts "
        f"(top-{config.num_experts_per_tok}, hidden {hidden}, expert width {config.moe_intermediate_size}), "
        f"{args.tokens} tokens, bf16, {mode}: "
        f"keeps {total:,.0f} bytes a token = {total / 2 / hidden:.1f} x hidden bf16 values "
        f"({time.perf_counter() - start:.0f} s)"
    )
    for (shape, dtype), nbytes in sorted(kept.items(), key=lambda item: -item[1])[:8]:
        print(f"  {nbytes / args.tokens:>10,.0f} B/token  {dtype:<9} {shape}")


if __name__ == "__main__":
    main()
