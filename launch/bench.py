"""Benchmarks, as scripts (never timed tests). Results go to bench/RESULTS.md by hand, with the GPU.

    python launch/bench.py model --preset small                 # ours vs transformers, one GPU
    python launch/bench.py model --preset tiny --device cpu --batch 2 --seq 128 --steps 2   # smoke run
    python launch/bench.py prepare [FILES]   # prepare_data vs the raw tokenizer, MB/s and tokens/s
    python launch/bench.py loader [--path DIR]   # packed batches per second from local shards
    torchrun --nproc_per_node 2 launch/bench.py layout --preset small --expert 2   # a parallel layout

Each command is `bench/<name>.py`, called as `main(argv)` with the arguments after the name;
`launch/bench.py <name> --help` lists its options.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

COMMANDS = {
    "model": "training-step throughput of ours vs transformers (bench/model.py)",
    "prepare": "prepare_data vs the raw tokenizer (bench/prepare.py)",
    "loader": "packed batches per second from local shards (bench/loader.py)",
    "layout": "the training step of a parallel layout, under torchrun (bench/layout.py)",
}


def main(argv: list[str] | None = None):
    parser = argparse.ArgumentParser(
        prog="launch/bench.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="what", required=True)
    for name, summary in COMMANDS.items():
        sub.add_parser(name, help=f"{summary}; its own options follow", add_help=False)
    args, rest = parser.parse_known_args(argv)
    return importlib.import_module(f"bench.{args.what}").main(rest)


if __name__ == "__main__":
    sys.exit(main())
