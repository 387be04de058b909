"""Token streams: a stream's shards, epoch after epoch, read as documents and packed into windows.

The loader splits the data into a fixed number of streams. The unit a stream reads is a shard
part: normally a whole shard. In epoch e the part list is shuffled by (seed, e) and part j of that
order goes to stream j % streams, so each stream reads whole parts, one after another, and
advances its own epoch when its parts of the epoch run out. A stream is a pipeline of three
stages, each with a small resumable state:

    DocumentReader  (epoch, shard, document)   which document of which part comes next
    ShuffleBuffer   (documents held, draws)    optional seeded document shuffle
    Packer          (leftover tokens)          documents -> seq_len + 1 windows (data/packing.py)

Fewer shards than streams (a small corpus prepared with the default 256 MB shards is a single
shard): then the shards are split by document into parts (`split_shards`), P parts a shard at
most, P the smallest number that gives every stream a part; a shard of d documents becomes
min(d, P) parts of consecutive documents, [k*d // n, (k+1)*d // n) for k < n = min(d, P). The
parts follow from index.json's document counts and `streams` alone, so the order still depends
only on (data, seed, seq_len, streams): the same batches on any number of ranks and workers, and
the same resume state (its `shard` then counts parts). This was chosen over making prepare_data.py
size its shards for the corpus: it would have to know the corpus' token count before tokenizing
it, could still not split a corpus of few large documents, and would not help shards that
already exist. The price: a stream reading a part reads its shard from the start (skipping the
documents before the part) and hashes the whole shard, so a shard is read about P/2 times and
hashed P times an epoch; at most a few GB for a corpus under `streams` shards. A data set with
at least `streams` shards is not split (one part a shard), exactly as before; one with fewer
documents than streams cannot feed them all (data/loader.py refuses it, naming the fix).

Shards are checked as they are opened: sha256 against index.json (optional, before a single
document is used), documents and token counts at the end, and every document (uint32 ids ending in
EOS, ids below the vocab size). A failure is a ShardError naming the shard (and the document key
for bad ids); with skip_corrupt the stream drops the part with a warning and counts it instead. A
part that ends before its shard's end stops reading there: a shard cut short within the part is
an unreadable tar, one cut short before it leaves the part short, which reads to the end of the
shard and fails the count check.

A stream's state is a dict of ints and numpy arrays (`stream_state`); data/loader.py turns it into
tensors for checkpoints.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import itertools
import multiprocessing
import multiprocessing.process
import multiprocessing.queues
import os
import queue
import random
import re
import signal
import tarfile
import time
import traceback
import weakref
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
from webdataset.gopen import gopen
from webdataset.tariterators import base_plus_ext

from data.packing import Packer

TOKENS_MEMBER = "tokens.npy"
NPY_HEADER_LIMIT = 10 + 0xFFFF  # .npy magic and header-length fields plus the longest version-1 header
_MASK64 = (1 << 64) - 1
_NPY_UINT32_HEADER = re.compile(rb"\{'descr': '<u4', 'fortran_order': False, 'shape': \((\d+),\), \} *\n")


class ShardError(RuntimeError):
    """A shard that cannot be used: missing, unreadable, truncated, wrong sha256, bad documents."""


@dataclass(frozen=True)
class ShardInfo:
    url: str  # what webdataset opens: a path, file:, pipe:, http:, ...
    file: str  # its name in index.json
    documents: int
    tokens: int  # sum of the documents' lengths, EOS included
    sha256: str
    domain: str | None = None  # index.json's tag of its documents, if any

    def describe(self) -> str:
        plain_path = self.url.endswith(self.file) and ":" not in self.url
        return self.file if plain_path else f"{self.file} ({self.url})"


@dataclass(frozen=True)
class ShardPart:
    """Documents [start, stop) of a shard, in tar order: the unit a stream reads."""

    shard: ShardInfo
    start: int
    stop: int

    def reads_to_the_end(self) -> bool:
        return self.stop >= self.shard.documents


@dataclass(frozen=True)
class StreamConfig:
    parts: tuple[ShardPart, ...]  # split_shards(shards, streams)
    streams: int
    seed: int
    seq_len: int
    shuffle_buffer: int
    vocab_size: int  # token ids must be below it
    eos_id: int
    verify_sha256: bool
    skip_corrupt: bool

    def unit_name(self) -> str:
        """What a stream reads, for messages: shards, or shard parts when they are split."""
        whole = all(part.start == 0 and part.reads_to_the_end() for part in self.parts)
        return "shards" if whole else "shard parts"


def parts_per_shard(documents: Sequence[int], streams: int) -> int:
    """How many parts a shard is split into at most, given each shard's document count: 1 when there
    are as many shards as streams, else the fewest that make a part for every stream. ValueError
    when the documents are fewer than the streams (no split can feed every stream)."""
    if len(documents) >= streams:
        return 1
    if sum(documents) < streams:
        raise ValueError(f"{sum(documents)} documents cannot feed {streams} streams")
    # P = streams always suffices: sum(min(d, streams)) >= streams as soon as sum(d) >= streams.
    return next(p for p in range(2, streams + 1) if sum(min(d, p) for d in documents) >= streams)


def split_shards(shards: Sequence[ShardInfo], streams: int) -> tuple[ShardPart, ...]:
    """The parts the streams read, in shard order: one a shard when there are at least `streams`
    shards, else each shard of d documents cut into min(d, P) runs of consecutive documents of
    near-equal counts (P: `parts_per_shard`)."""
    most = parts_per_shard([shard.documents for shard in shards], streams)
    if most == 1:
        return tuple(ShardPart(shard, 0, shard.documents) for shard in shards)
    parts = []
    for shard in shards:
        count, documents = min(shard.documents, most), shard.documents
        parts += [
            ShardPart(shard, k * documents // count, (k + 1) * documents // count) for k in range(count)
        ]
    return tuple(parts)


def shards_of_stream(num_parts: int, streams: int, seed: int, epoch: int, stream: int) -> list[int]:
    """The part indices (shard indices when shards are not split) `stream` reads in `epoch`, in
    reading order."""
    order = list(range(num_parts))
    # random.Random with a str seed hashes it with sha512: the order is the same on every Python.
    random.Random(f"shards/{seed}/{epoch}").shuffle(order)
    return order[stream::streams]


# ----------------------------------------------------------------------------- reading one shard


def read_documents(shard: ShardInfo, config: StreamConfig) -> Iterator[np.ndarray]:
    """Every document of a shard in tar order, as checked int32 token arrays; raises ShardError."""
    if config.verify_sha256:
        check_sha256(shard)
    documents = tokens = 0
    fileobj = open_shard(shard)
    try:
        for key, payload in tar_members(fileobj, shard):
            document = check_document(decode_npy(payload, shard, key), shard, key, config)
            documents += 1
            tokens += len(document)
            yield document
        finish_reading(fileobj, shard)
    finally:
        close_quietly(fileobj)
    if (documents, tokens) != (shard.documents, shard.tokens):
        raise ShardError(
            f"shard {shard.describe()}: holds {documents} documents and {tokens} tokens, index.json says "
            f"{shard.documents} documents and {shard.tokens} tokens (truncated or replaced shard?)"
        )


def check_sha256(shard: ShardInfo) -> None:
    digest = hashlib.sha256()
    fileobj = open_shard(shard)
    try:
        while chunk := fileobj.read(1 << 20):
            digest.update(chunk)
        fileobj.close()  # a pipe: URL reports its command's exit status here
    except OSError as error:
        raise ShardError(f"shard {shard.describe()}: read failed: {error}") from error
    finally:
        close_quietly(fileobj)
    if digest.hexdigest() != shard.sha256.lower():
        raise ShardError(
            f"shard {shard.describe()}: sha256 mismatch: the file hashes to {digest.hexdigest()}, "
            f"index.json says {shard.sha256}"
        )


def open_shard(shard: ShardInfo):
    try:
        return gopen(shard.url, "rb")
    except OSError as error:
        raise ShardError(f"shard {shard.describe()}: cannot open: {error}") from error


def tar_members(fileobj, shard: ShardInfo) -> Iterator[tuple[str, bytes]]:
    """(key, bytes) of each `KEY.tokens.npy` member, in tar order; other members are skipped unread.

    A member is read only after its size is checked against what index.json says the shard holds:
    a small compressed shard can expand to gigabytes, and nothing legitimate is larger than the
    shard's tokens (4 bytes each) plus an .npy header."""
    limit = shard.tokens * 4 + NPY_HEADER_LIMIT
    try:
        with tarfile.open(fileobj=fileobj, mode="r|*") as archive:  # closes only what it opened
            for member in archive:
                key, extension = base_plus_ext(member.name)
                if not member.isreg() or extension != TOKENS_MEMBER:
                    continue
                if member.size > limit:
                    raise ShardError(
                        f"shard {shard.describe()}: member {member.name} is {member.size:,} bytes, more "
                        f"than the {shard.tokens:,} tokens index.json gives the whole shard can fill "
                        f"({limit:,} bytes with the header): refused unread (replaced or crafted shard?)"
                    )
                yield key, archive.extractfile(member).read()
                archive.members = []  # stream mode keeps every TarInfo otherwise
    except ShardError:
        raise
    except Exception as error:  # tarfile.ReadError, OSError, EOFError, ...: one message for all
        reason = f"unreadable tar (truncated or corrupt): {error}{pipe_status(fileobj)}"
        raise ShardError(f"shard {shard.describe()}: {reason}") from error


def finish_reading(fileobj, shard: ShardInfo) -> None:
    """Read past the tar's end blocks and close, so that a pipe's failing command is an error."""
    try:
        while fileobj.read(1 << 16):
            pass
        fileobj.close()
    except OSError as error:
        raise ShardError(f"shard {shard.describe()}: read failed: {error}") from error


def pipe_status(fileobj) -> str:
    """For a pipe: URL, the command's exit status (a missing file behind `cat` shows up here)."""
    process = getattr(fileobj, "proc", None)
    if process is None:
        return ""
    try:
        return f"; command exit status {process.wait(timeout=5)}"
    except Exception:
        return ""


def close_quietly(fileobj) -> None:
    with contextlib.suppress(Exception):
        fileobj.close()


def decode_npy(payload: bytes, shard: ShardInfo, key: str) -> np.ndarray:
    # Fast path for what np.save writes for a 1-D little-endian uint32 array; np.load otherwise.
    if payload[:8] == b"\x93NUMPY\x01\x00":
        data_start = 10 + int.from_bytes(payload[8:10], "little")
        header = _NPY_UINT32_HEADER.fullmatch(payload, 10, data_start)
        if header is not None and int(header[1]) * 4 == len(payload) - data_start:
            return np.frombuffer(payload, dtype="<u4", offset=data_start)
    try:
        return np.load(io.BytesIO(payload), allow_pickle=False)
    except Exception as error:
        where = f"shard {shard.describe()}: document '{key}'"
        raise ShardError(f"{where}: unreadable {TOKENS_MEMBER}: {error}") from error


def check_document(tokens: np.ndarray, shard: ShardInfo, key: str, config: StreamConfig) -> np.ndarray:
    """The document as int32 ids after checking it against the contract; ShardError otherwise."""
    where = f"shard {shard.describe()}: document '{key}'"
    if tokens.dtype.kind != "u" or tokens.dtype.itemsize != 4 or tokens.ndim != 1:
        raise ShardError(f"{where}: {TOKENS_MEMBER} holds {tokens.dtype} {tokens.shape}, expected 1-D uint32")
    if len(tokens) == 0:
        raise ShardError(f"{where}: empty (every document ends with EOS {config.eos_id})")
    if tokens[-1] != config.eos_id:
        raise ShardError(f"{where}: last id is {tokens[-1]}, not EOS {config.eos_id}")
    if tokens.max() >= config.vocab_size:
        offset = int(np.argmax(tokens >= config.vocab_size))
        raise ShardError(
            f"{where}: token id {tokens[offset]} at offset {offset} >= vocab size {config.vocab_size}"
        )
    # Every id is below the vocab size (< 2**31), so the uint32 bits read as the same int32 values.
    return tokens.view(np.int32) if tokens.dtype.isnative else tokens.astype(np.int32)


# ----------------------------------------------------------------------------- the stream's stages


class DocumentReader:
    """One stream's documents: its parts of each epoch in order, each part's documents in order.

    The cursor (epoch, shard, document) names the next document: `shard` indexes the stream's part
    list of that epoch (a part is a whole shard unless shards are split), `document` counts
    documents already taken from that part (a resumed reader re-reads the shard and drops them).
    """

    def __init__(
        self,
        config: StreamConfig,
        stream: int,
        *,
        epoch: int = 0,
        shard: int = 0,
        document: int = 0,
        barren_shards: int = 0,
        skipped_shards: int = 0,
    ):
        self.config, self.stream = config, stream
        self.epoch, self.shard, self.document = epoch, shard, document
        # Parts in a row that gave no document (skipped or empty): as many as the data set has
        # means nothing readable is left, an error rather than an endless search.
        self.barren_shards = barren_shards
        self.skipped_shards = skipped_shards
        self.warnings: list[str] = []  # drained by whoever runs the stream, logged in the main process
        self._documents: Iterator[np.ndarray] | None = None
        self._order: tuple[int, list[int]] | None = None

    def next_document(self) -> np.ndarray:
        while True:
            if self._documents is None:
                self._documents = self._open_part()
            try:
                document = next(self._documents)
            except StopIteration:
                self._next_part()
                continue
            except ShardError as error:
                if not self.config.skip_corrupt:
                    raise
                self.warnings.append(f"stream {self.stream}: skipping {error}")
                self.skipped_shards += 1
                self._next_part()
                continue
            self.document += 1
            self.barren_shards = 0
            return document

    def take_warnings(self) -> list[str]:
        warnings, self.warnings = self.warnings, []
        return warnings

    def close(self) -> None:
        if self._documents is not None:
            self._documents.close()
            self._documents = None

    def _epoch_parts(self) -> list[int]:
        if self._order is None or self._order[0] != self.epoch:
            config, epoch = self.config, self.epoch
            parts = shards_of_stream(len(config.parts), config.streams, config.seed, epoch, self.stream)
            self._order = (epoch, parts)
        return self._order[1]

    def _open_part(self) -> Iterator[np.ndarray]:
        part = self.config.parts[self._epoch_parts()[self.shard]]
        stop = None if part.reads_to_the_end() else part.stop  # the last part checks the shard's counts
        return documents_between(read_documents(part.shard, self.config), part.start + self.document, stop)

    def _next_part(self) -> None:
        self.close()
        if self.document == 0:
            self.barren_shards += 1
            if self.barren_shards >= len(self.config.parts):
                raise RuntimeError(
                    f"stream {self.stream}: the last {self.barren_shards} {self.config.unit_name()} it "
                    "opened gave no documents (all skipped or empty)"
                )
        self.shard, self.document = self.shard + 1, 0
        if self.shard == len(self._epoch_parts()):
            self.epoch, self.shard = self.epoch + 1, 0


def documents_between(documents: Iterator[np.ndarray], start: int, stop: int | None) -> Iterator[np.ndarray]:
    """`documents[start:stop]` (stop None: to the end). Those before `start` are read and checked all
    the same: a resumed stream, or one reading a later part, re-reads its shard up to there. Reading
    stops right after `stop - 1`, without exhausting `documents` (and its end-of-shard checks)."""
    try:
        for index, document in enumerate(documents):
            if index >= start:
                yield document
            if stop is not None and index + 1 >= stop:
                return
    finally:
        documents.close()  # closes the shard (a pipe's command too) when the reader moves on


def mix64(value: int) -> int:
    """splitmix64's finaliser: a well-spread 64-bit hash of an int."""
    value = (value + 0x9E3779B97F4A7C15) & _MASK64
    value = ((value ^ (value >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    value = ((value ^ (value >> 27)) * 0x94D049BB133111EB) & _MASK64
    return value ^ (value >> 31)


class ShuffleBuffer:
    """Seeded document shuffle: hold `capacity` documents, hand out a random one, refill.

    The draw is a hash of (seed, stream, number of draws so far), so the RNG state is one int.
    """

    def __init__(
        self, capacity: int, seed: int, stream: int, documents: list[np.ndarray] | None = None, draws: int = 0
    ):
        self.capacity = capacity
        self.documents = [] if documents is None else documents
        self.draws = draws
        self._key = mix64(mix64(seed & _MASK64) ^ stream)

    def next(self, read_document: Callable[[], np.ndarray]) -> np.ndarray:
        if self.capacity == 0:
            return read_document()
        while len(self.documents) < self.capacity:
            self.documents.append(read_document())
        pick = mix64(self._key ^ self.draws) % len(self.documents)
        self.draws += 1
        chosen = self.documents[pick]
        self.documents[pick] = self.documents[-1]
        self.documents.pop()
        return chosen


class StreamSnapshot(NamedTuple):
    """A stream's position by reference (cheap to take after every window); see `stream_state`."""

    stream: int
    windows: int
    epoch: int
    shard: int
    document: int
    barren_shards: int
    skipped_shards: int
    draws: int
    pack_tokens: np.ndarray
    pack_positions: np.ndarray
    shuffle_documents: tuple[np.ndarray, ...]


class TokenStream:
    """reader -> shuffle buffer -> packer for one stream; `next_window` gives seq_len + 1 tokens."""

    def __init__(self, config: StreamConfig, state: dict):
        self.stream = state["stream"]
        self.windows = state["windows"]  # windows emitted so far
        self.reader = DocumentReader(
            config,
            self.stream,
            epoch=state["epoch"],
            shard=state["shard"],
            document=state["document"],
            barren_shards=state["barren_shards"],
            skipped_shards=state["skipped_shards"],
        )
        held = split_documents(state["shuffle_tokens"], state["shuffle_lengths"])
        self.shuffle = ShuffleBuffer(config.shuffle_buffer, config.seed, self.stream, held, state["draws"])
        self.packer = Packer(config.seq_len, state["pack_tokens"], state["pack_positions"])

    def next_window(self) -> tuple[np.ndarray, np.ndarray]:
        window = self.packer.next_window(self._next_document)
        self.windows += 1
        return window

    def snapshot(self) -> StreamSnapshot:
        reader = self.reader
        return StreamSnapshot(
            self.stream,
            self.windows,
            reader.epoch,
            reader.shard,
            reader.document,
            reader.barren_shards,
            reader.skipped_shards,
            self.shuffle.draws,
            *self.packer.leftover(),
            tuple(self.shuffle.documents),
        )

    def close(self) -> None:
        self.reader.close()

    def _next_document(self) -> np.ndarray:
        return self.shuffle.next(self.reader.next_document)


def initial_state(stream: int) -> dict:
    """The state of a stream that has read nothing yet."""
    empty = np.empty(0, np.int32)
    counters = ("windows", "epoch", "shard", "document", "barren_shards", "skipped_shards", "draws")
    return dict(
        stream=stream,
        **dict.fromkeys(counters, 0),
        pack_tokens=empty,
        pack_positions=empty,
        shuffle_tokens=empty,
        shuffle_lengths=np.empty(0, np.int64),
    )


def split_documents(tokens: np.ndarray, lengths: np.ndarray) -> list[np.ndarray]:
    """Inverse of concatenating documents: the pieces of `tokens` with the given lengths."""
    return np.split(tokens, np.cumsum(lengths)[:-1]) if len(lengths) else []


def stream_state(snapshot: StreamSnapshot) -> dict:
    """A snapshot as plain ints and numpy arrays (held documents concatenated, with their lengths)."""
    state = snapshot._asdict()
    held = state.pop("shuffle_documents")
    state["pack_tokens"] = np.array(snapshot.pack_tokens, np.int32)
    state["pack_positions"] = np.array(snapshot.pack_positions, np.int32)
    state["shuffle_tokens"] = np.concatenate(held).astype(np.int32) if held else np.empty(0, np.int32)
    state["shuffle_lengths"] = np.array([len(document) for document in held], np.int64)
    return state


# ----------------------------------------------------------------------------- running a rank's streams


class Window(NamedTuple):
    """One packed window, with its stream's progress after it (for metrics and warnings)."""

    stream: int
    tokens: np.ndarray  # [seq_len + 1] int32
    positions: np.ndarray  # [seq_len + 1] int32
    epoch: int
    skipped_shards: int
    warnings: list[str]


def take_window(stream: TokenStream) -> Window:
    tokens, positions = stream.next_window()
    reader = stream.reader
    warnings = reader.take_warnings()
    return Window(stream.stream, tokens, positions, reader.epoch, reader.skipped_shards, warnings)


class InProcessRunner:
    """Runs the rank's streams in the calling process, never further than they are consumed."""

    def __init__(self, config: StreamConfig, states: dict[int, dict]):
        self._streams = {stream: TokenStream(config, state) for stream, state in states.items()}

    def next_window(self, stream: int) -> Window:
        return take_window(self._streams[stream])

    def stream_states(self, windows: dict[int, int]) -> dict[int, dict]:
        """Each stream's state after `windows[stream]` windows (here: where it stands)."""
        snapshots = {stream: self._streams[stream].snapshot() for stream in windows}
        for stream, snapshot in snapshots.items():
            if snapshot.windows != windows[stream]:
                raise RuntimeError(f"stream {stream} is at window {snapshot.windows}, not {windows[stream]}")
        return {stream: stream_state(snapshot) for stream, snapshot in snapshots.items()}

    def close(self) -> None:
        for stream in self._streams.values():
            stream.close()


# Worker processes. Worker w of W runs the rank's local streams k with k % W == w and produces their
# windows in exactly the order the main process will ask for them (the rank's sequence j comes from
# local stream j % n), so whatever W is, the main process receives the same windows. Windows travel
# in chunks through a bounded queue (at most `prefetch` chunks ahead per worker). Because a worker
# runs ahead, it keeps a snapshot of each stream after each recent window: a state request names
# how many windows of each stream were consumed and gets the states at exactly that point.


def chunk_windows(seq_len: int) -> int:
    """Windows per message: about 64K tokens, so that per-message costs stay small."""
    return max(1, min(64, (1 << 16) // (seq_len + 1)))


def worker_stream_order(local_streams: tuple[int, ...], first_sequence: int, worker: int, workers: int):
    """The streams of the worker's windows, in the order the main process consumes them."""
    count = len(local_streams)
    for sequence in itertools.count(first_sequence):
        if sequence % count % workers == worker:
            yield local_streams[sequence % count]


@dataclass(frozen=True)
class WorkerTask:
    config: StreamConfig
    states: dict[int, dict]  # the worker's streams
    local_streams: tuple[int, ...]  # all streams of the rank, in its reading order
    first_sequence: int  # rank-local index of the next sequence the main process wants
    worker: int
    workers: int
    chunk: int
    history: int  # snapshots kept per stream


class _StopWorker(Exception):
    pass


class _WorkerLoop:
    """The body of a worker process: produce chunks, answer state requests, report errors."""

    def __init__(self, task: WorkerTask, windows, commands, replies):
        self.task, self.windows, self.commands, self.replies = task, windows, commands, replies
        self.parent = os.getppid()
        self.streams: dict[int, TokenStream] = {}
        self.history: dict[int, deque[StreamSnapshot]] = {}

    def run(self) -> None:
        try:
            self.produce_forever()
        except _StopWorker:
            return
        except BaseException as error:  # reported in order, after the windows produced before it
            try:
                self.send(("error", type(error).__name__, str(error), traceback.format_exc()))
                while True:  # keep answering state requests until told to stop
                    self.serve_commands(wait=0.1)
            except _StopWorker:
                return
        finally:
            for stream in self.streams.values():
                stream.close()

    def produce_forever(self) -> None:
        task = self.task
        self.streams = {stream: TokenStream(task.config, state) for stream, state in task.states.items()}
        self.history = {
            stream_id: deque([stream.snapshot()], maxlen=task.history)
            for stream_id, stream in self.streams.items()
        }
        order = worker_stream_order(task.local_streams, task.first_sequence, task.worker, task.workers)
        while True:
            chunk, error = self.produce_chunk(order)
            if chunk[0]:
                self.send(("windows", *chunk))
            if error is not None:
                raise error
            self.serve_commands(wait=0.0)

    def produce_chunk(self, order) -> tuple[tuple, BaseException | None]:
        """Up to `chunk` windows; on an error, the windows before it and the error."""
        seq_len, size = self.task.config.seq_len, self.task.chunk
        tokens = np.empty((size, seq_len + 1), np.int32)
        positions = np.empty((size, seq_len + 1), np.int32)
        meta: list[tuple[int, int, int, list[str]]] = []
        error = None
        try:
            for row in range(size):
                window = take_window(self.streams[next(order)])
                tokens[row], positions[row] = window.tokens, window.positions
                meta.append((window.stream, window.epoch, window.skipped_shards, window.warnings))
                self.history[window.stream].append(self.streams[window.stream].snapshot())
        except Exception as caught:
            error = caught
        return (meta, tokens[: len(meta)], positions[: len(meta)]), error

    def send(self, message) -> None:
        while True:
            try:
                self.windows.put(message, timeout=0.1)
                return
            except queue.Full:
                self.serve_commands(wait=0.0)

    def serve_commands(self, wait: float) -> None:
        if os.getppid() != self.parent:  # the main process is gone
            raise _StopWorker
        while True:
            try:
                command = self.commands.get(timeout=wait) if wait else self.commands.get_nowait()
            except queue.Empty:
                return
            if command[0] == "stop":
                raise _StopWorker
            self.replies.put(self.states_at(command[1]))
            wait = 0.0

    def states_at(self, windows: dict[int, int]):
        states = {}
        for stream, count in windows.items():
            found = [s for s in self.history.get(stream, ()) if s.windows == count]
            if not found:
                kept = [s.windows for s in self.history.get(stream, ())]
                message = f"stream {stream}: no snapshot after window {count} (kept: {kept})"
                return ("error", "RuntimeError", message, "")
            states[stream] = stream_state(found[0])
        return ("states", states)


def run_worker(task: WorkerTask, windows, commands, replies, siblings=()) -> None:
    for channel in siblings:  # forked: the other workers' queues came along; only they may write them
        close_writing_end(channel)
    # Exiting on "stop" must not wait for the main process to drain this worker's queue.
    windows.cancel_join_thread()
    replies.cancel_join_thread()
    _WorkerLoop(task, windows, commands, replies).run()


def close_writing_end(channel: multiprocessing.queues.Queue) -> None:
    """Close this process' copy of the pipe end a queue is written through.

    A queue a worker writes must have that worker as the only process holding its writing end:
    then the worker's death is an end-of-file for the reader. Otherwise a worker killed halfway
    through a message leaves the reader waiting for the rest of it, forever, with no deadline that
    can interrupt the read. That is the usual case, not a rare one: a chunk of windows at a real
    seq_len (about 512 KB) is far larger than a pipe's buffer (64 KB), so whenever a chunk waits to
    be consumed the worker's feeder thread is blocked partway through writing it.
    """
    channel._writer.close()  # multiprocessing.Queue offers no public way to drop one end


@dataclass
class _WorkerHandle:
    index: int
    process: multiprocessing.process.BaseProcess
    windows: multiprocessing.queues.Queue
    commands: multiprocessing.queues.Queue
    replies: multiprocessing.queues.Queue


class LoaderWorkerError(RuntimeError):
    """A loader worker died, or sent nothing for the loader's timeout."""


class WorkerTraceback(Exception):
    """The traceback of an error in a loader worker, attached as the cause of the re-raised error."""


def worker_error(message: tuple, worker: int) -> BaseException:
    _, name, text, trace = message
    error_type = {"ShardError": ShardError, "ValueError": ValueError, "RuntimeError": RuntimeError}.get(name)
    error = error_type(text) if error_type else RuntimeError(f"{name}: {text}")
    error.__cause__ = WorkerTraceback(f"in token loader worker {worker}:\n{trace}")
    return error


def stop_workers(workers: list[_WorkerHandle], grace: float = 5.0) -> None:
    for worker in workers:
        with contextlib.suppress(Exception):
            worker.commands.put(("stop",))
    deadline = time.monotonic() + grace
    for worker in workers:
        worker.process.join(timeout=max(0.1, deadline - time.monotonic()))
        for end in (worker.process.terminate, worker.process.kill):
            if worker.process.is_alive():
                end()
                worker.process.join(timeout=2.0)
    for worker in workers:
        for channel in (worker.windows, worker.commands, worker.replies):
            channel.cancel_join_thread()
            channel.close()


class WorkerPool:
    """Runs the rank's streams in `workers` processes; same interface as InProcessRunner."""

    def __init__(
        self,
        config: StreamConfig,
        states: dict[int, dict],
        local_streams: list[int],
        first_sequence: int,
        workers: int,
        *,
        prefetch: int = 4,
        timeout: float = 600.0,
        mp_context: str | None = None,
    ):
        workers = min(workers, len(local_streams))
        chunk = chunk_windows(config.seq_len)
        context = multiprocessing.get_context(mp_context or default_start_method())
        self._timeout = timeout
        self._owner = {stream: k % workers for k, stream in enumerate(local_streams)}
        self._pending: list[deque[Window]] = [deque() for _ in range(workers)]
        # Each worker's (windows, commands, replies): it writes windows and replies, this process commands.
        channels = [
            (context.Queue(maxsize=prefetch), context.Queue(), context.Queue()) for _ in range(workers)
        ]
        forked = context.get_start_method() == "fork"  # a forked worker holds every queue made before it
        self._workers: list[_WorkerHandle] = []
        for index in range(workers):
            owned = local_streams[index::workers]
            owned_states = {stream: states[stream] for stream in owned}
            # A worker runs at most (prefetch queued + one being built or sent + one being consumed)
            # chunks ahead, in strict rotation over its streams: that bounds each stream's lead.
            history = -(-(prefetch + 2) * chunk // len(owned)) + 2
            task = WorkerTask(
                config, owned_states, tuple(local_streams), first_sequence, index, workers, chunk, history
            )
            siblings = [channels[other][end] for other in range(workers) if other != index for end in (0, 2)]
            process = context.Process(
                target=run_worker,
                args=(task, *channels[index], siblings if forked else []),
                daemon=True,
                name=f"token-loader-{index}",
            )
            self._workers.append(_WorkerHandle(index, process, *channels[index]))
        for worker in self._workers:  # all forks before this process starts any queue thread
            worker.process.start()
        for worker in self._workers:  # see close_writing_end: a dead worker must read as end-of-file
            close_writing_end(worker.windows)
            close_writing_end(worker.replies)
        self._stop = weakref.finalize(self, stop_workers, self._workers)

    def next_window(self, stream: int) -> Window:
        worker = self._owner[stream]
        pending = self._pending[worker]
        if not pending:
            pending.extend(self._receive_chunk(self._workers[worker]))
        window = pending.popleft()
        if window.stream != stream:
            raise RuntimeError(f"token loader worker {worker} sent stream {window.stream}, expected {stream}")
        return window

    def stream_states(self, windows: dict[int, int]) -> dict[int, dict]:
        asked = {}
        for stream, count in windows.items():
            asked.setdefault(self._owner[stream], {})[stream] = count
        for index, counts in asked.items():
            self._workers[index].commands.put(("states", counts))
        states = {}
        for index in asked:
            states.update(self._receive(self._workers[index], "replies")[1])
        return states

    def close(self) -> None:
        self._stop()

    def _receive_chunk(self, worker: _WorkerHandle) -> list[Window]:
        _, meta, tokens, positions = self._receive(worker, "windows")
        return [
            Window(stream, tokens[row], positions[row], epoch, skipped, warnings)
            for row, (stream, epoch, skipped, warnings) in enumerate(meta)
        ]

    def _receive(self, worker: _WorkerHandle, channel: str):
        deadline = time.monotonic() + self._timeout
        while True:
            try:
                message = getattr(worker, channel).get(timeout=0.25)
            except (EOFError, OSError):  # every writing end closed: the worker is gone, maybe mid-message
                raise worker_exited(worker) from None
            except queue.Empty:
                if not worker.process.is_alive():
                    raise worker_exited(worker) from None
                if time.monotonic() > deadline:
                    raise LoaderWorkerError(
                        f"token loader worker {worker.index}: nothing received for {self._timeout:.0f} s"
                    ) from None
                continue
            if message[0] == "error":
                raise worker_error(message, worker.index)
            return message


def worker_exited(worker: _WorkerHandle) -> LoaderWorkerError:
    worker.process.join(timeout=5.0)  # its pipe closes as it dies; the exit code comes a moment later
    code, who = worker.process.exitcode, f"token loader worker {worker.index}"
    if code is None or code >= 0:
        return LoaderWorkerError(f"{who} exited (exit code {code})")
    known = -code in {member.value for member in signal.Signals}
    name = signal.Signals(-code).name if known else f"signal {-code}"
    hint = " (out of memory? the kernel log tells: dmesg)" if -code == signal.SIGKILL else ""
    return LoaderWorkerError(f"{who} was killed by {name}{hint}")


def default_start_method() -> str:
    # fork starts a worker in milliseconds and the workers use no threads or torch ops; elsewhere
    # (no fork) spawn works as well, only slower to start.
    return "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
