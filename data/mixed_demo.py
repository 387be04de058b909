"""The multi-domain demo corpus (`prepare_data.py --demo-mixed`): text a Debian machine with Python has.

Four domains, each document tagged with its own, for the experiments that need several kinds of text
(routing specialisation, held-out loss per domain):

    python   the running Python's standard-library sources (the `--demo` corpus)
    c        C and C++ headers under /usr/include
    man      English manual pages (troff source, /usr/share/man/man1..man8)
    docs     package documentation under /usr/share/doc: READMEs, changelogs, copyright files, ...

A domain's files are put in a fixed pseudo-random order (sha256 of the path below the domain's root,
so the same on every machine with the same files); the first `eval_bytes` of text go to the held-out
set, the next `train_bytes` to the training set, the rest is left out. Text bytes are estimated from
file sizes (a gzip'd file counts three times its size), so each domain gives a similar number of
tokens. A domain whose root is missing is left out with a note; fewer than two domains is an error.
Copyright files repeat licence texts word for word, so the `docs` held-out loss is optimistic.
"""

from __future__ import annotations

import hashlib
import sysconfig
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from data.sources import InputError, SourceFile, demo_sources, walk_sorted

TRAIN_BYTES = 12_000_000  # of text a domain: ~3M tokens, so ~12M tokens in all
EVAL_BYTES = 600_000  # ~150k tokens a domain
GZIP_EXPANSION = 3  # text bytes per byte of a gzip'd man page or changelog, roughly
MAN_SECTIONS = tuple(f"man{n}" for n in range(1, 9))
DOC_SUFFIXES = frozenset({"", ".txt", ".md", ".rst", ".debian"})


@dataclass
class MixedDemo:
    """The tagged source files of the training and held-out sets, and the domains left out."""

    train: list[SourceFile] = field(default_factory=list)
    eval: list[SourceFile] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)  # "domain (root)" of the domains not found


def walk(root: Path) -> list[Path]:
    """Regular, non-hidden files under `root` (symbolic links are skipped: they repeat other files)."""
    return [path for path in walk_sorted(root) if not path.is_symlink() and path.is_file()]


def python_files() -> tuple[Path, list[Path]]:
    """The `--demo` corpus, under the standard library's root."""
    return Path(sysconfig.get_paths()["stdlib"]), [source.path for source in demo_sources()]


def header_files() -> tuple[Path, list[Path]]:
    root = Path("/usr/include")
    return root, walk(root)


def man_pages() -> tuple[Path, list[Path]]:
    root = Path("/usr/share/man")
    return root, [p for section in MAN_SECTIONS for p in walk(root / section)]


def doc_files() -> tuple[Path, list[Path]]:
    root = Path("/usr/share/doc")
    return root, [p for p in walk(root) if Path(p.name.removesuffix(".gz")).suffix.lower() in DOC_SUFFIXES]


DOMAINS: dict[str, Callable[[], tuple[Path, list[Path]]]] = {
    "python": python_files,
    "c": header_files,
    "man": man_pages,
    "docs": doc_files,
}


def text_bytes(path: Path) -> int:
    size = path.stat().st_size
    return size * GZIP_EXPANSION if path.name.endswith(".gz") else size


def source_of(path: Path, domain: str) -> SourceFile:
    """Every file is one plain-text document, whatever its name says (`ls.1.gz` is gzip'd troff)."""
    return SourceFile(path, "txt", "gz" if path.name.endswith(".gz") else None, domain)


def split_domain(
    domain: str, root: Path, files: list[Path], train_bytes: int, eval_bytes: int
) -> tuple[list[SourceFile], list[SourceFile]]:
    """The domain's (train, eval) files: the first eval_bytes of text in hash order, then train_bytes."""

    def order(path: Path) -> str:
        return hashlib.sha256(str(path.relative_to(root)).encode("utf-8", "surrogateescape")).hexdigest()

    train, held_out, taken = [], [], 0
    for path in sorted(files, key=order):
        size = text_bytes(path)
        if size == 0:
            continue
        if taken < eval_bytes:
            held_out.append(source_of(path, domain))
        elif taken < eval_bytes + train_bytes:
            train.append(source_of(path, domain))
        else:
            break
        taken += size
    return train, held_out


def mixed_demo_sources(train_bytes: int = TRAIN_BYTES, eval_bytes: int = EVAL_BYTES) -> MixedDemo:
    """The training and held-out sets, domain after domain (see the module docstring)."""
    demo = MixedDemo()
    for domain, find in DOMAINS.items():
        root, files = find()
        train, held_out = split_domain(domain, root, files, train_bytes, eval_bytes)
        if not train or not held_out:
            demo.missing.append(f"{domain} ({root})")
            continue
        demo.train += train
        demo.eval += held_out
    if len({source.domain for source in demo.train}) < 2:
        missing = ", ".join(demo.missing)
        raise InputError(f"--demo-mixed: fewer than two domains found on this machine (missing: {missing})")
    return demo
