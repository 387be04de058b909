"""Throughput of `prepare` (end to end) against the raw tokenizer on the same text and cores.

    python launch/bench.py prepare   # the demo corpus (stdlib sources), all cores
    python launch/bench.py prepare --workers 2 --repeats 3 corpus/ more.jsonl

`bench_prepare(files, workers)` returns MB/s and tokens/s of:
  - prepare: `data.shards.prepare` writing shards to a temporary directory, timed as a whole
    (reading and decoding the files, starting the worker pool, tokenizing, writing, hashing);
  - raw: the tokenizer alone (`encode_ids`: NFC + tiktoken, what prepare calls) on the
    same documents, already in memory, split over `workers` forked processes that inherit
    them, so no reading, no inter-process traffic and no writing is counted;
and `ratio` = prepare MB/s / raw MB/s (the target is >= 0.8). MB are the documents' input
bytes (10^6), the same count for both.
Each figure is the best of `repeats` runs, the two kinds alternated. The tokenizer is loaded
before timing either.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor

from data.shards import DEFAULT_SHARD_SIZE, default_workers, prepare
from data.sources import ReadStats, SourceFile, demo_sources, discover_sources, iter_documents
from data.tokenizer import encode_ids, load_tokenizer

SLICES_PER_WORKER = 4
# Set before the raw benchmark's pool forks, so that its workers inherit the documents.
_TEXTS: list[str] = []


def as_sources(files) -> list[SourceFile]:
    """`SourceFile`s as given, paths (files, dirs) as `prepare_data.py --input` takes them."""
    return [s for f in files for s in ([f] if isinstance(f, SourceFile) else discover_sources([f]))]


def encode_slice(index: int, step: int) -> int:
    """Tokenize every `step`-th inherited document from `index`; return the token count."""
    return sum(len(encode_ids(text)) for text in _TEXTS[index::step])


def time_raw_tokenizer(texts: list[str], workers: int) -> tuple[float, int]:
    """Seconds and tokens to tokenize `texts` on `workers` processes (no I/O, no IPC of text)."""
    global _TEXTS
    _TEXTS = texts
    context = multiprocessing.get_context("fork")  # inheriting the texts is the point
    with ProcessPoolExecutor(workers, mp_context=context) as pool:
        list(pool.map(time.sleep, [0.05] * workers))  # all workers up before the clock starts
        slices = SLICES_PER_WORKER * workers
        start = time.perf_counter()
        tokens = sum(pool.map(encode_slice, range(slices), [slices] * slices))
        seconds = time.perf_counter() - start
    _TEXTS = []
    return seconds, tokens


def time_prepare(sources: list[SourceFile], workers: int, shard_size_bytes: int) -> tuple[float, int]:
    """Seconds and tokens (EOS included) of one `prepare` run into a fresh temporary directory."""
    with tempfile.TemporaryDirectory(prefix="bench_prepare_") as output:
        start = time.perf_counter()
        result = prepare(sources, output, shard_size_bytes=shard_size_bytes, workers=workers, progress=False)
        seconds = time.perf_counter() - start
    return seconds, result.tokens


def bench_prepare(
    files, workers: int | None = None, repeats: int = 5, shard_size_bytes: int = DEFAULT_SHARD_SIZE
) -> dict:
    """MB/s and tokens/s of prepare and of the raw tokenizer on `files` with `workers` cores."""
    sources = as_sources(files)
    workers = workers or default_workers()
    load_tokenizer()
    documents = list(iter_documents(sources, "text", "replace", ReadStats()))
    texts = [d.text for d in documents]
    mbytes = sum(d.nbytes for d in documents) / 1e6
    prepare_runs, raw_runs = [], []
    for _ in range(repeats):  # alternated, so that a busy spell on the machine hits both alike
        prepare_runs.append(time_prepare(sources, workers, shard_size_bytes))
        raw_runs.append(time_raw_tokenizer(texts, workers))
    prepare_s, prepare_tokens = min(prepare_runs)
    raw_s, raw_tokens = min(raw_runs)
    return {
        "workers": workers,
        "files": len(sources),
        "documents": len(documents),
        "mbytes": round(mbytes, 3),
        "prepare_s": round(prepare_s, 3),
        "prepare_mb_per_s": round(mbytes / prepare_s, 2),
        "prepare_tokens_per_s": round(prepare_tokens / prepare_s),  # EOS included
        "raw_s": round(raw_s, 3),
        "raw_mb_per_s": round(mbytes / raw_s, 2),
        "raw_tokens_per_s": round(raw_tokens / raw_s),
        "ratio": round(raw_s / prepare_s, 3),
    }


def format_report(result: dict) -> str:
    return "\n".join(
        [
            f"prepare throughput: {result['files']} files, {result['documents']} documents, "
            f"{result['mbytes']:.1f} MB, {result['workers']} workers",
            f"  prepare (end to end)  {result['prepare_mb_per_s']:8.2f} MB/s  "
            f"{result['prepare_tokens_per_s']:>12,} tokens/s  ({result['prepare_s']:.2f} s)",
            f"  raw tokenizer         {result['raw_mb_per_s']:8.2f} MB/s  "
            f"{result['raw_tokens_per_s']:>12,} tokens/s  ({result['raw_s']:.2f} s)",
            f"  ratio prepare / raw   {result['ratio']:.3f}  (target >= 0.8)",
        ]
    )


def main(argv: list[str] | None = None) -> int:
    formatter = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(
        prog="launch/bench.py prepare", description=__doc__, formatter_class=formatter
    )
    parser.add_argument("inputs", nargs="*", help="files or dirs (default: the demo corpus)")
    parser.add_argument("--workers", type=int, default=None, help="processes (default: all cores)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--shard-size", type=int, default=DEFAULT_SHARD_SIZE, help="bytes of tokens")
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    args = parser.parse_args(argv)
    files = args.inputs or demo_sources()
    result = bench_prepare(files, args.workers, args.repeats, args.shard_size)
    print(json.dumps(result) if args.json else format_report(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
