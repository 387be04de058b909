"""Tokenize raw text into webdataset token shards (the format is data/shards.py's docstring).

    python launch/prepare_data.py --input corpus/ more.jsonl.zst --output data/my_corpus
    python launch/prepare_data.py --input wiki.parquet --text-key content --shard-size 64MiB --workers 8
    python launch/prepare_data.py --demo                      # stdlib sources -> data/demo
    python launch/prepare_data.py --domains --input code/ web.jsonl --output data/tagged
    python launch/prepare_data.py --demo-mixed                # 4 domains -> data/mixed/{train,eval}

Inputs: `.txt` (a document per file), `.jsonl` / `.parquet` (a document per line / row, the
string under `--text-key`), each optionally `.gz` or `.zst`, and directories (recursive,
sorted). `--errors` says what invalid UTF-8 does (strict: fatal; replace: U+FFFD, counted;
skip: the document is dropped, counted); malformed JSONL is always fatal (data/sources.py).
`--domains` tags each input's documents with a domain named after it (a folder's name, a file's name
without extensions); shards then hold one domain each and index.json names it, so evaluation can
report loss and expert routing per domain. `--demo-mixed` builds a tagged training set and held-out
set from text a Debian machine with Python has (Python, C headers, manual pages, package docs:
data/mixed_demo.py), about 12M training tokens.
Rerunning into the same `--output` reuses the complete shards and rebuilds the rest, byte-identical;
an `--output` built from other inputs or settings needs `--overwrite`.
The default shard size suits any corpus: one smaller than a shard makes a single shard, which the
loader splits by document among its `data.streams` streams (data/streams.py); only a corpus with
fewer documents than `data.streams` needs that setting lowered (the training run says to what).
Exit status: 0 done, 1 bad input (the message names the file and line) or a failure to write or
of a worker, 2 bad arguments, 130 interrupted (Ctrl-C or SIGTERM); after 1 or 130 the complete shards
stay, and a rerun resumes.
"""

from __future__ import annotations

import argparse
import errno
import signal
import sys
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from data.mixed_demo import mixed_demo_sources
from data.shards import DEFAULT_SHARD_SIZE, PrepareResult, default_workers, parse_size, prepare
from data.sources import (
    ERROR_MODES,
    InputError,
    ReadStats,
    SourceFile,
    demo_sources,
    discover_sources,
    discover_tagged_sources,
)

REPO_ROOT = Path(__file__).resolve().parent.parent
DEMO_OUTPUT = REPO_ROOT / "data" / "demo"
# The demo corpus is ~12 MB of stdlib sources, ~3M tokens (Python 3.11): 400 kB (100k-token)
# shards make ~30 of them, so the demo exercises multi-shard reading and loader workers.
DEMO_SHARD_SIZE = 400_000
MIXED_OUTPUT = REPO_ROOT / "data" / "mixed"


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
    parser.add_argument(
        "--output", type=Path, help=f"output directory (--demo: {DEMO_OUTPUT}; --demo-mixed: {MIXED_OUTPUT})"
    )
    parser.add_argument("--demo", action="store_true", help="the Python standard library's sources as corpus")
    parser.add_argument(
        "--demo-mixed",
        action="store_true",
        help="4 tagged domains of local text -> OUTPUT/train and OUTPUT/eval (held out)",
    )
    parser.add_argument("--domains", action="store_true", help="tag each --input's documents with its name")
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
    if args.demo + args.demo_mixed + bool(args.input) != 1:
        parser.error("give one of --input PATH..., --demo or --demo-mixed")
    if args.input and args.output is None:
        parser.error("--output is required with --input")
    if args.domains and not args.input:
        parser.error("--domains tags --input paths (--demo-mixed tags its own)")
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
    """`--demo` into data/demo (`--demo-mixed` into data/mixed): a generated artifact, rebuilt when
    its corpus (the machine's files) changes."""
    output = Path(output).resolve()
    if args.demo:
        return output == DEMO_OUTPUT.resolve()
    return args.demo_mixed and output.parent == MIXED_OUTPUT.resolve()  # its train/ and eval/


def data_sets(args: argparse.Namespace) -> list[tuple[list[SourceFile], Path, int]]:
    """(sources, output directory, shard size) of each data set the command writes."""
    if args.demo:
        return [(demo_sources(), args.output or DEMO_OUTPUT, args.shard_size or DEMO_SHARD_SIZE)]
    if args.demo_mixed:
        mixed = mixed_demo_sources()
        if mixed.missing:
            print(f"prepare_data: --demo-mixed: not on this machine, left out: {', '.join(mixed.missing)}")
        output = args.output or MIXED_OUTPUT
        shard_size = args.shard_size or DEMO_SHARD_SIZE
        return [(mixed.train, output / "train", shard_size), (mixed.eval, output / "eval", shard_size)]
    sources = discover_tagged_sources(args.input) if args.domains else discover_sources(args.input)
    return [(sources, args.output, args.shard_size or DEFAULT_SHARD_SIZE)]


OUT_OF_SPACE = {errno.ENOSPC, errno.EDQUOT}  # where a rerun after freeing space resumes


def interrupt(signum, frame) -> None:
    raise KeyboardInterrupt  # SIGTERM (kill, a batch system's stop) ends the run as Ctrl-C does


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        return run(args)
    finally:
        signal.signal(signal.SIGTERM, previous)


def run(args: argparse.Namespace) -> int:
    kept = "complete shards are kept, rerun to resume"
    try:
        for sources, output, shard_size in data_sets(args):
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
            report(result)
    except InputError as exc:
        print(f"prepare_data: error: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:  # disk full, a file gone, permissions: the message names the file
        resumable = f"; {kept}" if exc.errno in OUT_OF_SPACE else ""
        print(f"prepare_data: error: {exc}{resumable}", file=sys.stderr)
        return 1
    except BrokenProcessPool:
        print(
            f"prepare_data: error: a tokenizer worker died (killed, out of memory?); {kept}", file=sys.stderr
        )
        return 1
    except KeyboardInterrupt:
        print(f"prepare_data: interrupted; {kept}", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
