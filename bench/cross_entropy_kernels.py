"""LM head + cross-entropy at the 80B-A3B's shape: ours against Liger-Kernel's fused linear CE.

    python bench/cross_entropy_kernels.py            # every backend that imports, one process
    python bench/cross_entropy_kernels.py --backends ours ours-1024 liger   # ours-N: N-row chunks

Liger-Kernel is not a dependency: install it to compare (`pip install liger-kernel`, pure Python
over Triton). The inputs are what the trainer's head sees for one micro-batch of the slice
benchmark: 8192 tokens (2 x 4096), hidden 2048, vocabulary 151936, bf16 activations and weight, 10%
of the labels ignored.
Each backend returns the loss summed over kept tokens; its backward runs from loss / kept tokens,
as the trainer's. Backends:
- ours: `model.ops.cross_entropy.linear_cross_entropy` (chunked, 2048 rows a chunk as trained;
  `ours-N` for N-row chunks; the weight's gradient made in forward and accumulated in fp32);
- liger: Liger-Kernel's `liger_fused_linear_cross_entropy` as installed (its default accumulates the
  weight's gradient in the weight's dtype, bf16);
- liger-fp32: the same with `accum_dtype=torch.float32`, our accumulation.
Printed per backend: forward + backward milliseconds (CUDA events, median of --iters after
--warmup), the peak memory it allocated beyond its inputs, and the relative RMS error of the loss
and both gradients against the reference (full fp32 logits, F.cross_entropy) on the same values.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.deltanet_kernels import median_ms, rel_rms
from model.ops.cross_entropy import linear_cross_entropy, linear_cross_entropy_reference

IGNORE = -100


def make_inputs(tokens: int, hidden: int, vocab: int, seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator(device="cuda").manual_seed(seed)
    labels = torch.randint(vocab, (tokens,), device="cuda", generator=gen)
    labels[torch.rand(tokens, device="cuda", generator=gen) < 0.1] = IGNORE
    return dict(
        h=torch.randn(tokens, hidden, device="cuda", generator=gen).bfloat16(),
        w=(torch.randn(vocab, hidden, device="cuda", generator=gen) * 2 / hidden**0.5).bfloat16(),
        labels=labels,
    )


def backend_fn(name: str):
    """fn(h, w, labels) -> loss summed over kept tokens."""
    if name.startswith("ours"):  # ours-N: N-row chunks (default 2048)
        chunk = int(name.partition("-")[2] or 2048)

        def ours(h, w, labels):
            return linear_cross_entropy(h, w, labels, ignore_index=IGNORE, chunk_size=chunk)[0]

        return ours
    from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy

    accum = {"liger": None, "liger-fp32": torch.float32}[name]
    return lambda h, w, labels: liger_fused_linear_cross_entropy(
        h, w, labels, ignore_index=IGNORE, reduction="sum", accum_dtype=accum
    )


def loss_and_grads(fn, inputs: dict, kept: torch.Tensor) -> tuple[torch.Tensor, ...]:
    h = inputs["h"].detach().requires_grad_()
    w = inputs["w"].detach().requires_grad_()
    loss = fn(h, w, inputs["labels"])
    (loss / kept).backward()
    return loss.detach().float(), h.grad, w.grad


def reference(inputs: dict, kept: torch.Tensor) -> tuple[torch.Tensor, ...]:
    fp32 = dict(inputs, h=inputs["h"].float(), w=inputs["w"].float())
    fn = lambda h, w, labels: linear_cross_entropy_reference(h, w, labels, ignore_index=IGNORE)[0]
    return loss_and_grads(fn, fp32, kept)


def measure(name: str, inputs: dict, expected: tuple, kept: torch.Tensor, warmup: int, iters: int) -> dict:
    fn = backend_fn(name)
    loss, grad_h, grad_w = loss_and_grads(fn, inputs, kept)
    errors = {
        "loss": abs(loss.item() - expected[0].item()) / abs(expected[0].item()),
        "grad_h": rel_rms(grad_h, expected[1]),
        "grad_w": rel_rms(grad_w, expected[2]),
    }
    del loss, grad_h, grad_w
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    loss_and_grads(fn, inputs, kept)  # returned gradients included, as a step holds them
    peak_gib = (torch.cuda.max_memory_allocated() - base) / 2**30
    ms = median_ms(lambda: loss_and_grads(fn, inputs, kept), warmup, iters)
    return {"backend": name, "fwd_bwd_ms": ms, "peak_gib": peak_gib, "rel_err": errors}


def available(names: list[str]) -> list[str]:
    found = []
    for name in names:
        try:
            backend_fn(name)
            found.append(name)
        except ImportError as error:
            print(f"{name}: not importable ({error}), skipped")
    return found


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=8192)
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--vocab", type=int, default=151936)
    parser.add_argument("--backends", nargs="+", default=["ours", "liger", "liger-fp32"])
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--out", type=Path, default=None, help="write the rows as JSON here")
    args = parser.parse_args()
    inputs = make_inputs(args.tokens, args.hidden, args.vocab)
    kept = (inputs["labels"] != IGNORE).sum()
    expected = reference(inputs, kept)
    torch.cuda.empty_cache()
    rows = []
    for name in available(args.backends):
        row = measure(name, inputs, expected, kept, args.warmup, args.iters)
        errors = ", ".join(f"{k} {v:.1e}" for k, v in row["rel_err"].items())
        timing = f"fwd+bwd {row['fwd_bwd_ms']:7.2f} ms  peak +{row['peak_gib']:.2f} GiB"
        print(f"{name:<12} {timing}  rel. error {errors}")
        rows.append(row)
    if args.out:
        args.out.write_text(json.dumps({"device": torch.cuda.get_device_name(), "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
