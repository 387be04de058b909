"""Raw-text inputs of `prepare_data.py`: find the files, read them, parse them into documents.

Formats (chosen by file name, case-insensitive):
  `.txt`      one document per file (a leading UTF-8 byte-order mark is dropped);
  `.jsonl`    one document per line, the string under `text_key` (default `text`);
  `.parquet`  one document per row, the string column `text_key`;
each optionally compressed: `.txt.gz`, `.jsonl.zst`, `.parquet.gz`, ... (a compressed parquet
file is decompressed in memory: parquet needs random access).

Inputs are read in the order given; a directory is walked recursively in sorted order, taking
the files of supported formats and skipping hidden files and directories (`.git`, ...). The
order is part of the output, so it never depends on the file system's listing order.

Bad input, and what happens (`errors` is `prepare_data.py --errors`):
  - a file that cannot be read (missing, no permission, corrupt gzip/zstd/parquet): fatal;
  - invalid UTF-8 (or, in JSON, an escaped lone surrogate): `strict` fatal; `replace` (the
    default) decodes it with U+FFFD and counts the document; `skip` drops the document and
    counts it;
  - a JSONL line that is not JSON, not an object, lacks `text_key`, or holds a non-string
    there: always fatal, whatever `errors` says: it means the file is not what the command
    line claims (a wrong `--text-key`, a truncated file), and silently training on what is
    left would hide that. A parquet file without a string column `text_key` is fatal too;
  - empty documents (the empty string, whitespace only, JSON `null`, parquet null) are
    skipped and counted: alone they would train nothing but an EOS. Blank JSONL lines are not
    documents and are ignored.
Fatal problems raise `InputError`, whose message names the file and, where there is one, the
line (JSONL, 1-based) or row (parquet, 1-based).

The work is split in two so that it scales with cores: the main process only reads raw bytes
(`read_blocks`: I/O, decompression, cutting JSONL at line ends, parquet row batches, all in C;
a .txt file is left for its worker to read), and the workers turn blocks into documents
(`parse_block`: UTF-8, JSON, the checks above) right before tokenizing them. A single process
that parsed JSON for everyone would cap a many-core machine at ~100 MB/s. Every document is
identified by (file number in the run's source list, line or row number; 0 for a .txt file):
its `Location`, in input order.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import re
import sysconfig
import zlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import BinaryIO, NamedTuple

FORMATS = ("txt", "jsonl", "parquet")
COMPRESSIONS = ("gz", "zst")
ERROR_MODES = ("strict", "replace", "skip")
DEMO_EXCLUDED_DIRS = frozenset(
    {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"}
)
DOMAIN_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.+-]{0,63}")
LONE_SURROGATE = re.compile("[\ud800-\udfff]")
EXAMPLES_KEPT = 5
NEWLINE = b"\n"
JSONL_BLOCK_BYTES = 1 << 18  # what the main process reads at a time and a worker parses
PARQUET_BLOCK_ROWS = 256
JSON = json.JSONDecoder()


class InputError(Exception):
    """A fatal problem with the input; the message names the file (and line or row)."""


@dataclass(frozen=True)
class SourceFile:
    """One input file and how to read it."""

    path: Path
    format: str
    compression: str | None = None
    domain: str | None = None  # the tag its documents carry into the shards (data/shards.py)


class Location(NamedTuple):
    """Where a document comes from; tuples compare in input order."""

    file: int  # position of the file in the run's source list
    number: int  # line (JSONL) or row (parquet), 1-based; 0 for a .txt file


class Document(NamedTuple):
    """One document's text, where it comes from, and the input bytes it was read from."""

    location: Location
    text: str
    nbytes: int


@dataclass
class ReadStats:
    """What the parsers dropped or repaired, with a few `file: line N` examples of each."""

    replaced_invalid: int = 0
    skipped_invalid: int = 0
    skipped_empty: int = 0
    examples: dict[str, list[str]] = field(default_factory=dict)

    def note(self, what: str, where: str) -> None:
        setattr(self, what, getattr(self, what) + 1)
        kept = self.examples.setdefault(what, [])
        if len(kept) < EXAMPLES_KEPT:
            kept.append(where)

    def add(self, other: ReadStats) -> None:
        """Fold in a worker's stats (in input order, so the examples are the first ones)."""
        for what in ("replaced_invalid", "skipped_invalid", "skipped_empty"):
            setattr(self, what, getattr(self, what) + getattr(other, what))
        for what, examples in other.examples.items():
            kept = self.examples.setdefault(what, [])
            kept.extend(examples[: EXAMPLES_KEPT - len(kept)])


# ---------------------------------------------------------------------------------------------
# Finding the files


def source_file_for(path: Path) -> SourceFile | None:
    """The `SourceFile` for a supported name (`x.jsonl`, `x.txt.zst`, ...), else None."""
    parts = path.name.lower().split(".")
    compression = parts.pop() if len(parts) > 2 and parts[-1] in COMPRESSIONS else None
    if len(parts) < 2 or parts[-1] not in FORMATS:
        return None
    return SourceFile(path, parts[-1], compression)


def walk_sorted(directory: Path) -> Iterator[Path]:
    """Files under `directory`, recursively, in sorted order, skipping hidden names."""
    for root, dirs, files in os.walk(directory):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(files):
            if not name.startswith("."):
                yield Path(root, name)


def discover_sources(paths: Iterable[str | Path]) -> list[SourceFile]:
    """The input files named by `paths` (files or directories), in a deterministic order."""
    sources = []
    for given in paths:
        path = Path(given)
        if path.is_dir():
            sources.extend(s for s in map(source_file_for, walk_sorted(path)) if s is not None)
        elif path.exists():
            source = source_file_for(path)
            if source is None:
                raise InputError(f"{path}: unsupported input (expected {supported_names()})")
            sources.append(source)
        else:
            raise InputError(f"{path}: no such file or directory")
    if not sources:
        raise InputError(f"no input files of a supported format ({supported_names()}) in {list(paths)}")
    return each_once(sources)


def each_once(sources: list[SourceFile]) -> list[SourceFile]:
    """The sources, refused if one file comes twice (named twice, or also inside a named directory):
    its documents would be trained on twice, unnoticed. Paths are compared as written, made absolute
    without a system call (links are not followed: distinct files of identical bytes, as a hub
    snapshot's links to one blob, are distinct inputs)."""
    first: dict[str, Path] = {}
    for source in sources:
        resolved = os.path.abspath(source.path)
        if resolved in first:
            raise InputError(f"{source.path}: given twice (also as {first[resolved]}); list each input once")
        first[resolved] = source.path
    return sources


def discover_tagged_sources(paths: Iterable[str | Path]) -> list[SourceFile]:
    """`discover_sources`, each input's documents tagged with a domain named after it: a directory's
    name, a file's name without its extensions (`wiki.jsonl.zst` -> `wiki`)."""
    tagged, named_by = [], {}
    for given in paths:
        domain = domain_of_input(Path(given))
        if domain in named_by:
            raise InputError(f"{given}: its domain name {domain!r} is already that of {named_by[domain]}")
        named_by[domain] = given
        tagged += [replace(source, domain=domain) for source in discover_sources([given])]
    return each_once(tagged)


def domain_of_input(path: Path) -> str:
    name = path.resolve().name if path.is_dir() else path.name.split(".")[0]
    return check_domain(name, str(path))


def check_domain(name: str, where: str) -> str:
    """A domain tag: letters, digits and `_.-+`, as metric names and file names can carry it."""
    if not DOMAIN_PATTERN.fullmatch(name):
        raise InputError(
            f"{where}: {name!r} is not a usable domain name (letters, digits and _.-+, starting with a "
            "letter or digit, at most 64 characters); rename the input"
        )
    return name


def supported_names() -> str:
    return ", ".join(f".{f}" for f in FORMATS) + ", optionally + " + ", ".join(f".{c}" for c in COMPRESSIONS)


def demo_sources() -> list[SourceFile]:
    """The demo corpus: the running Python's standard-library `*.py` files, one document each.

    Tests and third-party packages (`site-packages`) are left out; the order is sorted, so the
    corpus is the same on every run of the same Python.
    """
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    files = []
    for root, dirs, names in os.walk(stdlib):
        dirs[:] = sorted(d for d in dirs if d not in DEMO_EXCLUDED_DIRS and not d.startswith("."))
        files.extend(Path(root, n) for n in sorted(names) if n.endswith(".py") and not n.startswith("."))
    if not files:
        raise InputError(f"{stdlib}: no standard-library sources found for the demo corpus")
    return [SourceFile(path, "txt") for path in files]


def source_fingerprint(sources: list[SourceFile]) -> str:
    """sha256 of what identifies the inputs (path, format, size, mtime): a rerun reuses shards
    only if it matches. Contents are not hashed: that would mean reading the corpus twice."""
    digest = hashlib.sha256()
    for source in sources:
        try:
            stat = source.path.stat()
        except OSError as exc:  # gone, or no longer accessible, since it was found
            raise InputError(f"{source.path}: cannot read: {exc.strerror}") from exc
        path = os.path.abspath(source.path)  # not resolve(): a syscall per path component
        fields = (path, source.format, source.compression, stat.st_size, stat.st_mtime_ns)
        if source.domain is not None:  # untagged inputs keep the fingerprints they always had
            fields += (source.domain,)
        digest.update(("\t".join(map(str, fields)) + "\n").encode("utf-8", "surrogateescape"))
    return digest.hexdigest()


# ---------------------------------------------------------------------------------------------
# Reading raw blocks (main process)


class Block(NamedTuple):
    """Raw records of one file, read by the main process for a worker to parse.

    `data` is whole lines (jsonl), a list of row values, bytes or None (parquet), or None for a
    .txt file: its one document is read by the worker, so that a corpus of many small files
    costs the main process nothing but an os.stat each. `first` is the line or row number of
    the first record (0 for txt); `nbytes` the input bytes (on disk, for txt)."""

    file: int
    path: str
    format: str
    compression: str | None
    first: int
    data: bytes | list[bytes | None] | None
    nbytes: int

    def last(self) -> int:
        """The line or row number of the last record."""
        if self.format == "jsonl":
            return self.first + self.data.count(NEWLINE) - self.data.endswith(NEWLINE)
        return self.first + len(self.data) - 1 if self.format == "parquet" else self.first


def open_binary(source: SourceFile) -> BinaryIO:
    """The decompressed bytes of `source` as a buffered binary stream."""
    if source.compression == "gz":
        return gzip.open(source.path, "rb")
    if source.compression == "zst":
        return io.BufferedReader(ZstdReader(source.path))
    return open(source.path, "rb")


class ZstdReader(io.RawIOBase):
    """The decompressed bytes of a .zst file of one or more frames. Not zstandard's
    `stream_reader`: given a truncated file it returns the partial data without a word; this
    raises EOFError, as `gzip` does."""

    def __init__(self, path: Path):
        self.file = open(path, "rb")  # noqa: SIM115 (closed in close())
        self.chunks = self.decompressed_chunks()
        self.chunk, self.offset = b"", 0

    def decompressed_chunks(self) -> Iterator[bytes]:
        import zstandard

        decompressor = zstandard.ZstdDecompressor()
        frame = None
        while compressed := self.file.read(1 << 20):
            while compressed:
                frame = frame or decompressor.decompressobj()
                if out := frame.decompress(compressed):
                    yield out
                compressed, frame = (frame.unused_data, None) if frame.eof else (b"", frame)
        if frame is not None:
            raise EOFError("zstd file ended in the middle of a frame (truncated?)")

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        while self.offset == len(self.chunk):
            self.chunk, self.offset = next(self.chunks, b""), 0
            if not self.chunk:
                return 0
        n = min(len(buffer), len(self.chunk) - self.offset)
        buffer[:n] = self.chunk[self.offset : self.offset + n]
        self.offset += n
        return n

    def close(self) -> None:
        self.file.close()
        super().close()


def read_errors() -> tuple[type[BaseException], ...]:
    """Exceptions that mean "this file cannot be read" (I/O, corrupt compression or parquet)."""
    import pyarrow
    import zstandard

    return (OSError, EOFError, zlib.error, zstandard.ZstdError, pyarrow.ArrowException)


def txt_blocks(file: int, source: SourceFile, text_key: str) -> Iterator[Block]:
    path = str(source.path)
    yield Block(file, path, "txt", source.compression, 0, None, os.stat(path).st_size)


def whole_file(block: Block) -> bytes:
    """The decompressed contents of a .txt block's file (in the worker)."""
    try:
        if block.compression is None:
            with open(block.path, "rb") as file:
                return file.read()
        with open_binary(SourceFile(Path(block.path), block.format, block.compression)) as stream:
            return stream.read()
    except read_errors() as exc:
        raise InputError(f"{block.path}: cannot read: {exc}") from exc


def jsonl_blocks(file: int, source: SourceFile, text_key: str) -> Iterator[Block]:
    """Whole lines, about `JSONL_BLOCK_BYTES` at a time (a longer line makes a longer block)."""
    line, carry = 1, b""
    with open_binary(source) as stream:
        while chunk := stream.read(JSONL_BLOCK_BYTES):
            data = carry + chunk
            cut = data.rfind(NEWLINE) + 1
            if cut == 0:
                carry = data
                continue
            block = Block(file, str(source.path), "jsonl", source.compression, line, data[:cut], cut)
            carry = data[cut:]
            line = block.last() + 1
            yield block
    if carry:  # a last line without its newline
        yield Block(file, str(source.path), "jsonl", source.compression, line, carry, len(carry))


def parquet_blocks(file: int, source: SourceFile, text_key: str) -> Iterator[Block]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    if source.compression:  # parquet needs random access
        with open_binary(source) as stream:
            parquet = pq.ParquetFile(io.BytesIO(stream.read()))
    else:
        parquet = pq.ParquetFile(source.path)
    schema = parquet.schema_arrow
    if text_key not in schema.names:
        columns = schema.names[:10]
        raise InputError(f"{source.path}: no column {text_key!r} (columns: {columns}); see --text-key")
    column_type = schema.field(text_key).type
    if not (pa.types.is_string(column_type) or pa.types.is_large_string(column_type)):
        raise InputError(f"{source.path}: column {text_key!r} is {column_type}, not a string")
    row = 1
    for batch in parquet.iter_batches(columns=[text_key], batch_size=PARQUET_BLOCK_ROWS):
        # As bytes: parquet writers do not all validate UTF-8, and the errors policy applies.
        column = batch.column(0).cast(pa.large_binary())
        values = column.to_pylist()
        yield Block(file, str(source.path), "parquet", source.compression, row, values, column.nbytes)
        row += len(values)


BLOCK_READERS = {"txt": txt_blocks, "jsonl": jsonl_blocks, "parquet": parquet_blocks}


def read_blocks(file: int, source: SourceFile, text_key: str) -> Iterator[Block]:
    """The raw blocks of one file, in order; I/O and decompression failures become
    `InputError`s naming the file."""
    try:
        yield from BLOCK_READERS[source.format](file, source, text_key)
    except InputError:
        raise
    except read_errors() as exc:
        raise InputError(f"{source.path}: cannot read: {exc}") from exc


# ---------------------------------------------------------------------------------------------
# Parsing blocks into documents (workers)


def where(block: Block, number: int) -> str:
    """`path: line N` / `path: row N` / `path`, for messages (built only when needed)."""
    unit = {"jsonl": "line", "parquet": "row"}.get(block.format)
    return f"{block.path}: {unit} {number}" if unit else block.path


def decode_utf8(data: bytes, errors: str, block: Block, number: int, stats: ReadStats) -> str | None:
    """`data` as text under the `errors` policy; None when the document is to be skipped."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        if errors == "strict":
            # In a whole file, also say which line: offsets into megabytes help nobody.
            line = f"line {data.count(NEWLINE, 0, exc.start) + 1}: " if block.format == "txt" else ""
            bad = data[exc.start : exc.start + 1].hex()
            raise InputError(
                f"{where(block, number)}: {line}invalid UTF-8 (byte 0x{bad} at offset {exc.start})"
            ) from None
        if errors == "skip":
            stats.note("skipped_invalid", where(block, number))
            return None
        stats.note("replaced_invalid", where(block, number))
        return data.decode("utf-8", "replace")


def repair_surrogates(
    text: str, line: str, errors: str, block: Block, number: int, stats: ReadStats
) -> str | None:
    """JSON can escape lone surrogates (`"\\ud800"`), which no UTF-8 text holds: treat them
    like invalid UTF-8 so that the same `errors` policy covers both."""
    # Cheap tests first: isascii() is O(1) in CPython, and only a `\u` escape makes a surrogate.
    if text.isascii() or "\\u" not in line or not LONE_SURROGATE.search(text):
        return text
    if errors == "strict":
        raise InputError(f"{where(block, number)}: lone surrogate escape (not valid Unicode text)")
    if errors == "skip":
        stats.note("skipped_invalid", where(block, number))
        return None
    stats.note("replaced_invalid", where(block, number))
    return LONE_SURROGATE.sub("\ufffd", text)


def json_text(line: str, text_key: str, block: Block, number: int) -> str | None:
    """The string under `text_key` in one JSONL line (None for JSON null); fatal otherwise."""
    try:
        # raw_decode, not json.loads: two regex matches less per line (whitespace around the
        # value is checked here instead).
        line = line.lstrip() if line[:1].isspace() else line  # raw_decode takes none before
        record, end = JSON.raw_decode(line)
        if end != len(line) and not line[end:].isspace():
            raise json.JSONDecodeError("Extra data", line, end)
    except json.JSONDecodeError as exc:
        # some of json's messages end in " at" ("Unterminated string starting at"): said once
        message = f"not valid JSON ({exc.msg.removesuffix(' at')} at column {exc.colno})"
        raise InputError(f"{where(block, number)}: {message}") from None
    except RecursionError:
        raise InputError(f"{where(block, number)}: JSON nested too deeply to parse") from None
    if not isinstance(record, dict):
        raise InputError(f"{where(block, number)}: expected a JSON object, got {type(record).__name__}")
    if text_key not in record:
        keys = sorted(record)[:10]
        raise InputError(f"{where(block, number)}: no key {text_key!r} (keys: {keys}); see --text-key")
    text = record[text_key]
    if text is not None and not isinstance(text, str):
        kind = type(text).__name__
        raise InputError(f"{where(block, number)}: {text_key!r} is a {kind}, not a string")
    return text


def records_of(block: Block) -> Iterator[tuple[int, bytes | None]]:
    """(line or row number, raw record) of each record in the block; blank lines left out."""
    if block.format == "txt":
        yield block.first, whole_file(block) if block.data is None else block.data
    elif block.format == "parquet":
        yield from enumerate(block.data, start=block.first)
    else:
        for number, raw in enumerate(block.data.split(NEWLINE), start=block.first):
            if raw and not raw.isspace():
                yield number, raw


def parse_block(block: Block, text_key: str, errors: str, stats: ReadStats) -> Iterator[Document]:
    """The documents of a block, in order, after the checks and `errors` policy of this module."""
    for number, raw in records_of(block):
        if raw is None:  # parquet null
            stats.note("skipped_empty", where(block, number))
            continue
        text = decode_utf8(raw, errors, block, number, stats)
        if text is None:
            continue
        if block.format == "jsonl":
            line = text.removeprefix("\ufeff") if number == 1 else text
            text = json_text(line, text_key, block, number)
            if text is not None:
                text = repair_surrogates(text, line, errors, block, number, stats)
                if text is None:
                    continue
        elif block.format == "txt":
            text = text.removeprefix("\ufeff")
        if not text or text.isspace():  # None (JSON null) included
            stats.note("skipped_empty", where(block, number))
            continue
        yield Document(Location(block.file, number), text, len(raw))


def iter_documents(
    sources: Iterable[SourceFile], text_key: str, errors: str, stats: ReadStats
) -> Iterator[Document]:
    """Every document of `sources`, read and parsed in this process (for tools and tests;
    `data.shards.prepare` spreads the parsing over its workers)."""
    if errors not in ERROR_MODES:
        raise ValueError(f"errors must be one of {ERROR_MODES}, not {errors!r}")
    for file, source in enumerate(sources):
        for block in read_blocks(file, source, text_key):
            yield from parse_block(block, text_key, errors, stats)
