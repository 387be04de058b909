"""Causal attention kernels at the 80B-A3B's gated-attention shape: speed, and agreement with the
reference.

    python bench/attention_kernels.py                                # every backend, both layouts
    python bench/attention_kernels.py --backends varlen sdpa-cudnn   # some of them

The inputs are what a gated-attention layer of the 80B-A3B passes in training: 16 query heads,
2 KV heads, head dim 256, bf16, 8192 tokens a GPU. Two layouts: two rows of one 4096-token document
each (the slice benchmark's rows), and one row of uneven packed documents (real data), which only
the backends that keep documents apart run. Backends:
- varlen: model/ops/attention.py's path for packed rows, torch's variable-length flash attention
  (what the model trains with on CUDA);
- sdpa-flash, sdpa-cudnn, sdpa-efficient: F.scaled_dot_product_attention with `is_causal`, one
  backend forced (single-document rows only); the efficient backend takes no grouped KV heads, so
  its timing includes repeating K and V to the query heads;
- cudnn-varlen, cudnn-varlen-repeat: cuDNN's attention over the same packed documents, through
  aten's `_cudnn_attention_forward` with cumulative document bounds (the op torch's nested tensors
  use), the KV heads as they are or repeated to the query heads (timed with the repeat);
- flex: torch's flex_attention, compiled, with a document-causal block mask (built once, outside
  the timing; training would build one a batch).
Printed per (backend, layout): forward and forward + backward milliseconds (CUDA events, median of
--iters after --warmup; backward from a fixed bf16 output gradient, through torch.autograd.grad),
TFLOP/s of forward + backward (the causal blocks' 2 x 2 x d multiply-adds a score, backward 2.5 x
forward), and the relative RMS error ||x - ref|| / ||ref|| of the output and of dq, dk, dv against
`causal_attention_reference` run in fp32 on the same bf16 values. A backend that fails prints its
error and the others still run.
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.deltanet_kernels import median_ms, rel_rms
from model.ops.attention import causal_attention_reference, varlen_causal_attention

HEADS, KV_HEADS, HEAD_DIM = 16, 2, 256  # the 80B-A3B's num_attention_heads, num_key_value_heads, head_dim
LAYOUTS = {  # (rows, document lengths of each row)
    "two_rows": (2, [4096]),
    "uneven_docs": (1, [301, 1873, 96, 2500, 777, 1024, 1621]),
}
BACKENDS = (
    "varlen",
    "cudnn-varlen",
    "cudnn-varlen-repeat",
    "sdpa-flash",
    "sdpa-cudnn",
    "sdpa-efficient",
    "flex",
)
DOCUMENT_AWARE = {"varlen", "cudnn-varlen", "cudnn-varlen-repeat", "flex"}
GRADIENTS = ("q", "k", "v")


def make_inputs(rows: int, seq: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """[b, h, t, d] views of [b, t, h, d] tensors, as the layer's projections produce them."""
    gen = torch.Generator(device="cuda").manual_seed(seed)
    randn = lambda heads: torch.randn(rows, seq, heads, HEAD_DIM, generator=gen, device="cuda").bfloat16()
    return dict(
        q=randn(HEADS).transpose(1, 2), k=randn(KV_HEADS).transpose(1, 2), v=randn(KV_HEADS).transpose(1, 2)
    )


def segment_ids(rows: int, lengths: list[int]) -> torch.Tensor:
    ids = torch.cat([torch.full((n,), i) for i, n in enumerate(lengths)])
    return ids.expand(rows, -1).cuda()


def causal_flops(rows: int, lengths: list[int]) -> float:
    """Forward + backward multiply-adds x 2 of the causal blocks: q k^T and p v, 2.5 x more backward."""
    scores = rows * HEADS * sum(n * (n + 1) / 2 for n in lengths)
    return 3.5 * 2 * 2 * HEAD_DIM * scores


def backend_fn(name: str, rows: int, lengths: list[int]):
    """fn(q, k, v) -> o [b, h, t, d] for the named backend, on this layout."""
    scale = HEAD_DIM**-0.5
    seq = sum(lengths)
    bounds = torch.tensor([0, *torch.tensor(lengths * rows).cumsum(0).tolist()], device="cuda")
    if name == "varlen":

        def as_one_row(x_bhtd):  # the rows as one stream of documents, as the model packs them: a view
            return x_bhtd.transpose(1, 2).reshape(1, rows * seq, x_bhtd.shape[1], HEAD_DIM).transpose(1, 2)

        def varlen(q, k, v):
            packed = (as_one_row(x) for x in (q, k, v))
            o = varlen_causal_attention(*packed, scale=scale, cu_seqlens_n1=bounds, max_seqlen=max(lengths))
            return o.transpose(1, 2).reshape(rows, seq, HEADS, HEAD_DIM).transpose(1, 2)

        return varlen
    if name.startswith("cudnn-varlen"):
        bounds32, longest = bounds.to(torch.int32), max(lengths)
        repeat_kv = name == "cudnn-varlen-repeat"

        def tokens_heads_dim(x_bhtd):  # [b * t, h, d]: a view of the projections' [b, t, h, d]
            return x_bhtd.transpose(1, 2).reshape(rows * seq, x_bhtd.shape[1], HEAD_DIM)

        def cudnn_varlen(q, k, v):
            q, k, v = (tokens_heads_dim(x) for x in (q, k, v))
            if repeat_kv:
                k, v = (x.repeat_interleave(HEADS // KV_HEADS, dim=1) for x in (k, v))
            o = torch.ops.aten._cudnn_attention_forward(
                q, k, v, None, bounds32, bounds32, longest, longest, True, 0.0, True, False, scale=scale
            )[0]
            return o.view(rows, seq, HEADS, HEAD_DIM).transpose(1, 2)

        return cudnn_varlen
    if name.startswith("sdpa-"):
        from torch.nn.attention import SDPBackend, sdpa_kernel

        backend = {
            "sdpa-flash": SDPBackend.FLASH_ATTENTION,
            "sdpa-cudnn": SDPBackend.CUDNN_ATTENTION,
            "sdpa-efficient": SDPBackend.EFFICIENT_ATTENTION,
        }[name]

        repeat_kv = name == "sdpa-efficient"  # its kernel refuses grouped KV heads

        def sdpa(q, k, v):
            if repeat_kv:
                k, v = (x.repeat_interleave(HEADS // KV_HEADS, dim=1) for x in (k, v))
            with sdpa_kernel(backend):
                return F.scaled_dot_product_attention(
                    q, k, v, is_causal=True, scale=scale, enable_gqa=not repeat_kv
                )

        return sdpa
    if name == "flex":
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention

        ids = segment_ids(rows, lengths)

        def document_causal(b, h, q_idx, kv_idx):
            return (q_idx >= kv_idx) & (ids[b, q_idx] == ids[b, kv_idx])

        mask = create_block_mask(document_causal, rows, None, seq, seq, device="cuda")
        return torch.compile(functools.partial(flex_attention, block_mask=mask, scale=scale, enable_gqa=True))
    raise ValueError(f"unknown backend {name!r}")


def forward_backward(fn, inputs: dict, upstream_o: torch.Tensor, dtype=None) -> dict[str, torch.Tensor]:
    leaves = [(x if dtype is None else x.to(dtype)).detach().requires_grad_() for x in inputs.values()]
    o = fn(*leaves)
    grads = torch.autograd.grad(o, leaves, upstream_o.to(o.dtype))
    return {"o": o.detach(), **dict(zip(GRADIENTS, grads, strict=True))}


def run_case(name: str, layout: str, warmup: int, iters: int) -> dict:
    rows, lengths = LAYOUTS[layout]
    seq = sum(lengths)
    inputs = make_inputs(rows, seq)
    upstream_gen = torch.Generator("cuda").manual_seed(1)
    # bf16 values, so that the fp32 reference sees the very gradient the backend gets
    upstream_o = torch.randn(rows, HEADS, seq, HEAD_DIM, device="cuda", generator=upstream_gen).bfloat16()
    fn = backend_fn(name, rows, lengths)
    ours = forward_backward(fn, inputs, upstream_o)
    ids = segment_ids(rows, lengths)
    reference = functools.partial(causal_attention_reference, scale=HEAD_DIM**-0.5, segment_ids_bt=ids)
    expected = forward_backward(reference, inputs, upstream_o, dtype=torch.float32)
    errors = {n: rel_rms(ours[n], expected[n]) for n in expected}
    del ours, expected
    leaves = [x.detach().requires_grad_() for x in inputs.values()]

    def forward():
        with torch.no_grad():
            fn(*inputs.values())

    def step():
        torch.autograd.grad(fn(*leaves), leaves, upstream_o)

    result = dict(backend=name, layout=layout, forward_ms=median_ms(forward, warmup, iters))
    result["forward_backward_ms"] = median_ms(step, warmup, iters)
    result["tflops"] = causal_flops(rows, lengths) / result["forward_backward_ms"] / 1e9
    result["rel_rms_error"] = errors
    return result


def main() -> int:
    formatter = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=formatter)
    parser.add_argument("--backends", nargs="+", default=list(BACKENDS), choices=BACKENDS)
    parser.add_argument("--layouts", nargs="+", default=list(LAYOUTS), choices=list(LAYOUTS))
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--out", type=Path, default=None, help="append one JSON line per case")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench/attention_kernels.py needs a CUDA GPU")
    gpu = torch.cuda.get_device_name()
    print(f"attention kernels on {gpu}, torch {torch.__version__}, cuDNN {torch.backends.cudnn.version()}")
    for layout in args.layouts:
        for name in args.backends:
            if layout != "two_rows" and name not in DOCUMENT_AWARE:
                continue
            try:
                result = run_case(name, layout, args.warmup, args.iters)
            except Exception as error:  # a backend this GPU or torch lacks: say so, go on
                print(f"  {name:15s} {layout:12s} failed: {type(error).__name__}: {str(error)[:300]}")
                continue
            finally:
                torch.cuda.empty_cache()
            worst = max(result["rel_rms_error"], key=result["rel_rms_error"].get)
            print(
                f"  {name:15s} {layout:12s} forward {result['forward_ms']:7.3f} ms   forward+backward "
                f"{result['forward_backward_ms']:7.3f} ms ({result['tflops']:5.1f} TFLOP/s)   worst rel. RMS "
                f"error {worst} {result['rel_rms_error'][worst]:.2e}",
                flush=True,
            )
            if args.out:
                with args.out.open("a") as out:
                    out.write(json.dumps({**result, "gpu": gpu, "torch": torch.__version__}) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
