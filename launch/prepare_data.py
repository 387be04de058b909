"""Tokenize raw text into webdataset token shards (the format is data/shards.py's docstring).

    python launch/prepare_data.py --input corpus/ more.jsonl.zst --output data/my_corpus
    python launch/prepare_data.py --input wiki.parquet --text-key content --shard-size 64MiB --workers 8
    python launch/prepare_data.py --demo                      # stdlib sources -> data/demo

Inputs: `.txt` (a document per file), `.jsonl` / `.parquet` (a document per line / row, the
string under `--text-key`), each optionally `.gz` or `.zst`, and directories (recursive,
sorted). `--errors` says what invalid UTF-8 does (strict: fatal; replace: U+FFFD, counted;
skip: the document is dropped, counted); malformed JSONL is always fatal (data/sources.py).
Rerunning into the same `--output` reuses the complete shards and rebuilds the rest,
byte-identical; an `--output` built from other inputs or settings needs `--overwrite`.
The default shard size suits any corpus: one smaller than a shard makes a single shard, which the
loader splits by document among its `data.streams` streams (data/streams.py); only a corpus with
fewer documents than `data.streams` needs that setting lowered (the training run says to what).
Exit status: 0 done, 1 bad input (the message names the file and line), 2 bad arguments,
130 interrupted.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from data.shards import DEFAULT_SHARD_SIZE, PrepareResult, default_workers, parse_size, prepare
from data.sources import ERROR_MODES, InputError, ReadStats, demo_sources, discover_sources

REPO_ROOT = Path(__file__).resolve().parent.parent
DEMO_OUTPUT = REPO_ROOT / "data" / "demo"
# The demo corpus is ~12 MB of stdlib sources, ~3M tokens (Python 3.11): 400 kB (100k-token)
# shards make ~30 of them, so the demo exercises multi-shard reading and loader workers.
DEMO_SHARD_SIZE = 400_000


def shard_size(text: str) -> int:
    try:
        return parse_size(text)
    except ValueError as exc:  # argparse would print only "invalid value"
        raise argparse.ArgumentTypeError(str(exc)) from None


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--input", nargs="+", action="extend", default=[], metavar="PATH", help="files, dirs")
    parser.add_argument("--output", type=Path, help=f"output directory (--demo: {DEMO_OUTPUT})")
    parser.add_argument("--demo", action="store_true", help="the Python standard library's sources as corpus")
    parser.add_argument("--text-key", default="text", help="JSONL key / parquet column of the text")
    parser.add_argument(
        "--shard-size",
        type=shard_size,
        default=None,
        help=f"bytes of tokens per shard, 4 a token: 256MB, 64MiB, 1000000 (default {DEFAULT_SHARD_SIZE:,}; "
        f"--demo {DEMO_SHARD_SIZE:,})",
    )
    parser.add_argument(
        "--workers",
        type=int,
        default=default_workers(),
        help="tokenizer processes (default: the cores, here %(default)s; 0: none, tokenize in this one)",
    )
    parser.add_argument("--errors", choices=ERROR_MODES, default="replace", help="what invalid UTF-8 does")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument(
        "--overwrite", action="store_true", help="replace shards in --output built from other inputs/settings"
    )
    args = parser.parse_args(argv)
    if args.demo == bool(args.input):
        parser.error("give --input PATH... or --demo (not both)")
    if not args.demo and args.output is None:
        parser.error("--output is required with --input")
    if args.workers < 0:
        parser.error("--workers must be >= 0 (0: tokenize in this process)")
    return args


def report(result: PrepareResult) -> None:
    """One summary line on stdout; repaired and dropped documents on stderr."""
    rate = result.bytes_tokenized / max(result.seconds, 1e-9) / 1e6
    done = (
        f"tokenized {result.documents_tokenized:,} documents in {result.seconds:.1f} s ({rate:.1f} MB/s)"
        if result.shards_written
        else "nothing to redo"
    )
    print(
        f"{result.output}: {len(result.shards)} shards ({result.shards_written} written, "
        f"{result.shards_reused} reused), {result.documents:,} documents, {result.tokens:,} tokens; {done}"
    )
    report_stats(result.stats)


def report_stats(stats: ReadStats) -> None:
    messages = {
        "replaced_invalid": "documents had invalid UTF-8, replaced by U+FFFD",
        "skipped_invalid": "documents with invalid UTF-8 skipped",
        "skipped_empty": "empty documents skipped",
    }
    for what, message in messages.items():
        if count := getattr(stats, what):
            examples = "; ".join(stats.examples[what])
            print(f"prepare_data: {count:,} {message} (e.g. {examples})", file=sys.stderr)


def is_demo_output(args: argparse.Namespace, output: Path) -> bool:
    """`--demo` into data/demo: a generated artifact, rebuilt when the Python (its corpus) changes."""
    return args.demo and Path(output).resolve() == DEMO_OUTPUT.resolve()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        if args.demo:
            sources = demo_sources()
            output = args.output or DEMO_OUTPUT
            shard_size = args.shard_size or DEMO_SHARD_SIZE
        else:
            sources = discover_sources(args.input)
            output = args.output
            shard_size = args.shard_size or DEFAULT_SHARD_SIZE
        result = prepare(
            sources,
            output,
            shard_size_bytes=shard_size,
            text_key=args.text_key,
            errors=args.errors,
            workers=args.workers,
            progress=not args.no_progress,
            overwrite=args.overwrite or is_demo_output(args, output),
        )
    except InputError as exc:
        print(f"prepare_data: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("prepare_data: interrupted; complete shards are kept, rerun to resume", file=sys.stderr)
        return 130
    report(result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
