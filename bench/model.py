"""Training-step throughput, ours against `transformers.Qwen3NextForCausalLM`: `launch/bench.py model`.

    python launch/bench.py model --preset small                 # ours vs transformers, one GPU
    python launch/bench.py model --preset tiny --device cpu --batch 2 --seq 128 --steps 2   # smoke run

Forward + backward + optimizer step (AdamW, bf16 parameters for both models, same random batch),
side by side with `transformers.Qwen3NextForCausalLM` on the same config (MTP off for that
comparison, HF has none) and ours with MTP on. Reports tokens/s, ms per step, peak memory and MFU.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import gc
import itertools
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from model.accounting import flops_per_token
from model.config import ModelConfig, load_model_config
from model.init import init_weights
from model.qwen3_next import Qwen3NextForCausalLM

VARIANTS = ["ours", "ours+mtp", "ours-compiled", "ours-compiled+mtp", "hf"]
PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0}


@dataclass
class Result:
    variant: str
    tokens_per_s: float
    step_ms: float
    peak_mem_gib: float
    tflops_per_s: float
    mfu: float


def peak_tflops(device: torch.device, override: float | None) -> float:
    if override:
        return override
    if device.type != "cuda":
        return float("nan")
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), float("nan"))


def build_ours(config: ModelConfig, device, dtype, compile_layers: bool = False):
    model = Qwen3NextForCausalLM(config)
    init_weights(model, config, seed=0)
    model.to(device=device, dtype=dtype)
    if compile_layers:
        model.compile_layers()

    def loss_fn(ids, labels, position_ids=None):
        out = model(ids, position_ids=position_ids, labels=labels)
        loss = out.lm_loss_sum / out.lm_tokens
        for loss_sum, tokens in zip(out.mtp_loss_sums, out.mtp_tokens, strict=True):
            loss = loss + 0.1 * loss_sum / tokens / len(out.mtp_loss_sums)
        return loss

    return model, loss_fn


def build_hf(config: ModelConfig, device, dtype):
    import transformers

    fields = {k: v for k, v in config.to_dict().items() if k != "mtp_num_layers"}
    hf_config = transformers.Qwen3NextConfig(**fields)
    with contextlib.suppress(Exception):  # HF's fastest MoE path, where its version has one
        hf_config._experts_implementation = "grouped_mm"
    model = transformers.Qwen3NextForCausalLM(hf_config).to(device=device, dtype=dtype)
    model.train()

    def loss_fn(ids, labels, position_ids=None):  # RoPE positions only: HF's SDPA path ignores packing
        return model(input_ids=ids, position_ids=position_ids, labels=labels).loss

    return model, loss_fn


def time_training(name, build, config, args, device) -> tuple[float, float]:
    """(seconds per step, peak GiB) of forward + backward + AdamW step on a fixed random batch."""
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    model, loss_fn = build(config, device, dtype)
    optim = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, config.vocab_size, (args.batch, args.seq + 1), generator=gen).to(device)
    inputs, labels = ids[:, :-1].contiguous(), ids[:, 1:].contiguous()
    position_ids = packed_position_ids(args.batch, args.seq, args.documents, gen)
    position_ids = position_ids.to(device) if position_ids is not None else None

    def step():
        loss = loss_fn(inputs, labels, position_ids)
        loss.backward()
        optim.step()
        optim.zero_grad(set_to_none=True)
        return loss

    for _ in range(args.warmup):
        step()
    sync(device)
    if args.profile:
        profile_steps(step, args.profile / f"{name}.txt", device)
    start = time.perf_counter()
    for _ in range(args.steps):
        loss = step()
    sync(device)
    seconds = (time.perf_counter() - start) / args.steps
    if not torch.isfinite(loss):
        raise RuntimeError("non-finite loss in benchmark")
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan")
    return seconds, peak


def packed_position_ids(batch: int, seq: int, documents: int, gen: torch.Generator) -> torch.Tensor | None:
    """Positions of `documents` random-length documents packed into each row (None for 0: one a row),
    as the training loader packs real data: attention, conv and the DeltaNet state split at each."""
    if documents <= 0:
        return None
    rows = []
    for _ in range(batch):
        cuts = torch.randperm(seq - 1, generator=gen)[: documents - 1].add(1).sort().values.tolist()
        bounds = [0, *cuts, seq]
        rows.append(torch.cat([torch.arange(b - a) for a, b in itertools.pairwise(bounds)]))
    return torch.stack(rows)


def profile_steps(step, path: Path, device, steps: int = 2) -> None:
    """Kernel time table of a few steps (torch.profiler), the top 40 by device time."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        for _ in range(steps):
            step()
        sync(device)
    sort_by = "cuda_time_total" if device.type == "cuda" else "cpu_time_total"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(prof.key_averages().table(sort_by=sort_by, row_limit=40, max_name_column_width=70))


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bench_model(args) -> list[Result]:
    device = torch.device(args.device)
    base = load_model_config(args.preset)
    no_mtp = ModelConfig(**{**base.to_dict(), "mtp_num_layers": 0})
    variants = {
        "ours": (build_ours, no_mtp),
        "ours+mtp": (build_ours, base),
        "ours-compiled": (functools.partial(build_ours, compile_layers=True), no_mtp),
        "ours-compiled+mtp": (functools.partial(build_ours, compile_layers=True), base),
        "hf": (build_hf, no_mtp),
    }
    peak = peak_tflops(device, args.peak_tflops)
    tokens = args.batch * args.seq
    results = []
    for name in args.variants:
        build, config = variants[name]
        seconds, mem = time_training(name, build, config, args, device)
        gc.collect()  # the previous variant's model and optimizer go before the next one is built
        tflops = flops_per_token(config, args.seq) * tokens / seconds / 1e12
        results.append(Result(name, tokens / seconds, seconds * 1e3, mem, tflops, tflops / peak))
        print(
            f"{name:>9}: {tokens / seconds:10.0f} tok/s  {seconds * 1e3:8.1f} ms/step  "
            f"peak {mem:6.2f} GiB  {tflops:6.1f} TFLOP/s  MFU {tflops / peak:.3f}",
            flush=True,
        )
    return results


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="launch/bench.py model",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--preset", default="small")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=4096)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument(
        "--documents", type=int, default=0, help="pack this many random-length documents a row (0: one)"
    )
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--variants", nargs="+", default=["ours", "ours+mtp", "hf"], choices=VARIANTS)
    parser.add_argument(
        "--peak-tflops", type=float, default=None, help="bf16 dense peak of the GPU (default: by name)"
    )
    parser.add_argument("--profile", type=Path, default=None, help="folder for per-variant kernel tables")
    parser.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    parser.set_defaults(what="model")  # recorded in --out's "args", as when launch/bench.py parsed it
    args = parser.parse_args(argv)

    results = bench_model(args)
    device_name = torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu"
    if "hf" in args.variants:
        hf = results[args.variants.index("hf")]
        for ours in results:
            if ours.variant != "hf":
                print(
                    f"{ours.variant} / hf: {ours.tokens_per_s / hf.tokens_per_s:.2f}x tokens/s, "
                    f"{ours.peak_mem_gib / hf.peak_mem_gib:.2f}x peak memory  ({device_name})"
                )
    if args.out:
        args.out.write_text(
            json.dumps(
                {
                    "device": device_name,
                    "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
                    "results": [asdict(r) for r in results],
                },
                indent=2,
            )
        )


if __name__ == "__main__":
    raise SystemExit(main())
