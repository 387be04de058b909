"""Loader throughput: tokens per second of packed micro-batches from local shards.

    python launch/bench.py loader --path DIR [--seq-len 4096 --batch 8 --workers 1 --seconds 10]

Without --path a synthetic shard set is written to a temporary directory first: random token ids,
document lengths log-normal around a few hundred tokens (mean ~660, like web text), in the
shard contract's format. The clock starts at the first batch; the time to it is reported apart.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import webdataset as wds

from data.loader import TokenLoader

EOS_ID = 151643
TOKENIZER_VOCAB = 151851


def synthetic_documents(rng: np.random.Generator, count: int, median_length: int) -> list[np.ndarray]:
    lengths = np.clip(rng.lognormal(np.log(median_length), 1.0, count).astype(int), 1, 50_000)
    documents = []
    for length in lengths:
        document = rng.integers(0, EOS_ID, length, dtype=np.uint32)
        document[-1] = EOS_ID
        documents.append(document)
    return documents


def write_synthetic_shards(
    directory: Path, *, shards: int = 8, documents: int = 4000, median_length: int = 400, seed: int = 0
) -> Path:
    """A shard directory (tars + index.json) of random documents; returns the directory."""
    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    entries = []
    for number in range(shards):
        path = directory / f"shard-{number:06d}.tar"
        shard_documents = synthetic_documents(rng, documents, median_length)
        with wds.TarWriter(str(path), mtime=0) as writer:  # USTAR headers, as data/shards.py writes
            for index, tokens in enumerate(shard_documents):
                payload = io.BytesIO()
                np.save(payload, tokens)
                writer.write({"__key__": f"{number:06d}-{index:06d}", "tokens.npy": payload.getvalue()})
        entries.append(
            {
                "file": path.name,
                "documents": len(shard_documents),
                "tokens": int(sum(len(tokens) for tokens in shard_documents)),
                "sha256": hashlib.sha256(path.read_bytes()).hexdigest(),
            }
        )
    index = {"tokenizer": "synthetic", "vocab_size": TOKENIZER_VOCAB, "eos_id": EOS_ID, "shards": entries}
    (directory / "index.json").write_text(json.dumps(index, indent=1))
    return directory


def bench_loader(
    path: str | Path,
    seq_len: int = 4096,
    batch: int = 8,
    workers: int = 1,
    seconds: float = 10.0,
    *,
    streams: int | None = None,
    verify_sha256: bool = True,
) -> dict:
    """Read micro-batches of `batch` x `seq_len` for `seconds` (after the first) with one rank."""
    if streams is None:
        streams = min(64, len(json.loads((Path(path) / "index.json").read_text())["shards"]))
    started = time.perf_counter()
    with TokenLoader(
        path,
        seq_len=seq_len,
        global_batch_size=batch,
        micro_batch_size=batch,
        streams=streams,
        num_workers=workers,
        verify_sha256=verify_sha256,
    ) as loader:
        batches = iter(loader)
        next(batches)
        first_batch = time.perf_counter()
        count = 0
        while time.perf_counter() - first_batch < seconds:
            next(batches)
            count += 1
        elapsed = time.perf_counter() - first_batch
    tokens = count * batch * seq_len
    return {
        "tokens_per_s": tokens / elapsed,
        "batches_per_s": count / elapsed,
        "tokens": tokens,
        "seconds": elapsed,
        "startup_s": first_batch - started,
        "seq_len": seq_len,
        "batch": batch,
        "workers": workers,
        "streams": streams,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="launch/bench.py loader", description=__doc__.split("\n")[0])
    parser.add_argument("--path", help="shard directory (default: write a synthetic one)")
    parser.add_argument("--seq-len", type=int, default=4096)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--streams", type=int, default=None, help="default: min(64, shards)")
    parser.add_argument("--median-length", type=int, default=400, help="synthetic documents' median tokens")
    parser.add_argument("--no-verify", action="store_true", help="skip the sha256 check of each shard")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="bench_loader_") as scratch:
        path = args.path or write_synthetic_shards(Path(scratch), median_length=args.median_length)
        result = bench_loader(
            path,
            args.seq_len,
            args.batch,
            args.workers,
            args.seconds,
            streams=args.streams,
            verify_sha256=not args.no_verify,
        )
    print(json.dumps(result, indent=1))
    print(f"{result['tokens_per_s'] / 1e6:.2f}M tokens/s with {args.workers} worker(s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
