"""The training data loader: token shards -> this rank's packed micro-batches, deterministic and resumable.

Order (fixed by data, seed, seq_len and `streams`; independent of world size and worker count):
the shards are split into `streams` streams (data/streams.py: in each epoch, shuffled by
(seed, epoch), shard j goes to stream j % streams; a data set with fewer shards than streams has
its shards cut by document into parts first, so that every stream gets one, `split_shards`). The
i-th sequence of the run is the (i // streams)-th window of stream i % streams; global batch g is
sequences g*G ... g*G + G - 1.
Data-parallel rank r owns the streams s with s % dp == r, hence exactly the sequences i with
i % dp == r: its share of global batch g is g*G + r, g*G + r + dp, ..., cut in order into
micro-batches of `micro_batch_size`. To rebuild global batch g from the ranks, put row k of rank r's
share (micro-batches of the step concatenated) at position r + k*dp.

Packing and the label rule at document boundaries: data/packing.py.

`data.path` is a directory holding index.json and the shards it lists, or a webdataset URL pattern
(`dir/shard-{000000..000015}.tar`, `pipe:cat dir/shard-000003.tar`, a list of URLs) with `index`
giving index.json's location (default: next to the first shard when that is a local path).

`check_dataset` runs the checks that need only index.json (data.path and index.json exist and are
well-formed, the shards named are listed, the vocabulary fits the model, there are documents enough
for `streams` streams) so that an entry point can fail before building the model; the loader runs
the same checks. Every message names the path or setting at fault and what to do about it.

Workers (num_workers >= 1, data/streams.py) each run a fixed subset of the rank's streams in a
process and send their windows in the order the main process consumes them, so the batches do not
depend on the number of workers; a worker's error is re-raised in the main process at the point
of the data it concerns.

State (`state_dict()`, one per rank; plain ints, strings, lists, dicts and tensors, so that
torch.load(weights_only=True) reads it back):
    format, seq_len, streams, seed, shuffle_buffer, data (a digest of the shard list)
    sequences       sequences before the next one, over all ranks (valid when every rank has consumed
                    the same number of micro-batches, e.g. at optimizer-step boundaries)
    stream_states   one per stream of the rank: stream, windows (given so far), epoch, shard (index
                    in the stream's part list for that epoch), document (taken from that part),
                    barren_shards, skipped_shards, draws (shuffle RNG), pack_tokens/pack_positions
                    (packer leftover, int32), shuffle_tokens/shuffle_lengths (documents held)
`merge_states` joins the ranks' states into one that `load_state_dict` accepts on any
data-parallel size dividing `streams` and `sequences`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from urllib.parse import urlparse

import numpy as np
import torch
from webdataset.shardlists import expand_urls

from data.packing import windows_to_batch
from data.sources import DOMAIN_PATTERN
from data.streams import InProcessRunner, ShardInfo, StreamConfig, WorkerPool, initial_state, split_shards

logger = logging.getLogger(__name__)

STATE_FORMAT = "token-loader/1"
ORDER_KEYS = ("seq_len", "streams", "seed", "shuffle_buffer", "data")  # a state only fits the same order
ORDER_SETTINGS = {
    "seq_len": "data.seq_len",
    "streams": "data.streams",
    "seed": "trainer.seed",
    "shuffle_buffer": "data.shuffle_buffer",
}
PREPARE_COMMAND = "python launch/prepare_data.py --input FILES --output {path}"
DEMO_COMMAND = "python launch/prepare_data.py --demo"  # writes data/demo, the default data.path
INDEX_LOCATION = "index.json's location"


@dataclass(frozen=True)
class SettingNames:
    """The settings a data set comes from, as the loader's messages name them: the training data's
    (`TRAINING`) or the held-out set's (`HELD_OUT`, whose index.json must sit beside its shards)."""

    path: str = "data.path"
    streams: str = "data.streams"
    index: str | None = "data.index"  # None: the data has no setting for index.json's location
    demo: str = f"`{DEMO_COMMAND}` for data/demo"  # the demo data for this setting, and its command
    by_domain: bool = False  # read one domain at a time, so each must suffice (evaluation)

    def or_set_index(self, where: str) -> str:
        """The hint `, or set data.index to WHERE` where there is such a setting, else nothing."""
        return f", or set {self.index} to {where}" if self.index else ""


TRAINING = SettingNames()
HELD_OUT = SettingNames(
    path="data.eval_path",
    streams="data.eval_streams",
    index=None,
    demo="`python launch/prepare_data.py --demo-mixed` for data/mixed/eval",
    by_domain=True,
)

ARRAY_DTYPES = {
    "pack_tokens": np.int32,
    "pack_positions": np.int32,
    "shuffle_tokens": np.int32,
    "shuffle_lengths": np.int64,
}


# ----------------------------------------------------------------------------- index.json and shards


def load_index(path: str | os.PathLike, settings: SettingNames = TRAINING) -> dict:
    """index.json's contents after checking its structure; ValueError naming the file and field."""
    try:
        with open(path) as file:
            index = json.load(file)
    except FileNotFoundError:
        raise ValueError(
            f"{path}: no such index.json ({settings.path} is a shard directory with index.json"
            f"{settings.or_set_index('its location')}; `{PREPARE_COMMAND.format(path='DIR')}` writes both)"
        ) from None
    except json.JSONDecodeError as error:
        raise ValueError(f"{path}: not valid JSON: {error}") from None
    check_index_fields(index, str(path))
    return index


def check_index_fields(index: dict, source: str) -> None:
    def fail(field: str, expected: str, value) -> None:
        raise ValueError(f"{source}: field '{field}' must be {expected}, got {value!r}")

    def is_count(value) -> bool:
        return isinstance(value, int) and not isinstance(value, bool) and value >= 0

    if not isinstance(index, dict):
        fail("(top level)", "an object", type(index).__name__)
    # Before the fields: a run interrupted in its first shard lists no shards, and "rerun it" is the fix.
    if index.get("complete") is False:  # prepare_data.py marks an interrupted run; a rerun completes it
        raise ValueError(
            f"{source}: the data set is incomplete ('complete': false, an interrupted prepare_data.py run); "
            "rerun prepare_data.py with the same arguments to finish it"
        )
    for field, check, expected in (
        ("tokenizer", lambda v: isinstance(v, str), "a string"),
        ("vocab_size", lambda v: is_count(v) and v > 0, "a positive integer"),
        ("eos_id", is_count, "a non-negative integer"),
        ("shards", lambda v: isinstance(v, list) and len(v) > 0, "a non-empty list"),
    ):
        if not check(index.get(field)):
            fail(field, expected, index.get(field))
    for number, shard in enumerate(index["shards"]):
        if not isinstance(shard, dict):
            fail(f"shards[{number}]", "an object", shard)
        for field, check, expected in (
            ("file", lambda v: isinstance(v, str) and v != "", "a file name"),
            ("documents", is_count, "a non-negative integer"),
            ("tokens", is_count, "a non-negative integer"),
            ("sha256", lambda v: isinstance(v, str) and re.fullmatch("[0-9a-fA-F]{64}", v), "64 hex digits"),
        ):
            if not check(shard.get(field)):
                fail(f"shards[{number}].{field}", expected, shard.get(field))
        domain = shard.get("domain")
        if "domain" in shard and not (isinstance(domain, str) and DOMAIN_PATTERN.fullmatch(domain)):
            fail(f"shards[{number}].domain", "a domain name (letters, digits, _.-+)", shard["domain"])


def index_domains(index: dict) -> list[str]:
    """The domains index.json's shards are tagged with, in the order they first appear ([] untagged)."""
    return list(dict.fromkeys(shard["domain"] for shard in index["shards"] if "domain" in shard))


def shards_of_domain(shards: list[ShardInfo], domain: str, index_path: str) -> list[ShardInfo]:
    chosen = [shard for shard in shards if shard.domain == domain]
    if not chosen:
        known = sorted({shard.domain for shard in shards if shard.domain is not None})
        raise ValueError(f"{index_path}: no shard of domain {domain!r} (its domains: {known or 'none'})")
    return chosen


def check_index(
    index: dict | str | os.PathLike,
    model_vocab_size: int | None,
    eos_id: int | None,
    *,
    source: str | None = None,
) -> None:
    """Refuse shards the model cannot train on: the tokenizer's vocab must fit in the model's
    (padded) vocab, and the documents' EOS must be the model's. `index` is index.json's contents or
    its path; ValueError names the file and the field."""
    if not isinstance(index, dict):
        source = source or str(index)
        index = load_index(index)
    source = source or "index.json"
    if model_vocab_size is not None and index["vocab_size"] > model_vocab_size:
        raise ValueError(
            f"{source}: vocab_size {index['vocab_size']} (tokenizer {index['tokenizer']!r}) exceeds the "
            f"model's vocab_size {model_vocab_size}"
        )
    if eos_id is not None and index["eos_id"] != eos_id:
        raise ValueError(f"{source}: eos_id {index['eos_id']} differs from the model's EOS id {eos_id}")


def resolve_shards(
    path: str | os.PathLike | Sequence[str],
    index: str | os.PathLike | None = None,
    settings: SettingNames = TRAINING,
) -> tuple[str, dict, list[ShardInfo]]:
    """(index.json's location, its contents, the shards to read in list order) for `data.path` (or
    the held-out set's path: `settings` names them in errors)."""
    if isinstance(path, str | os.PathLike):
        check_local_path(os.fspath(path), index, settings)
    if isinstance(path, str | os.PathLike) and os.path.isdir(path):
        index_path = str(index or os.path.join(path, "index.json"))
        contents = load_index(index_path, settings)
        urls = [os.path.join(path, shard["file"]) for shard in contents["shards"]]
    else:
        patterns = [os.fspath(path)] if isinstance(path, str | os.PathLike) else [str(p) for p in path]
        urls = [url for pattern in patterns for url in expand_urls(pattern)]
        index_path = str(index or default_index_location(urls, settings))
        contents = load_index(index_path, settings)
    return index_path, contents, match_shards(urls, contents, index_path, settings)


def check_local_path(path: str, index: str | os.PathLike | None, settings: SettingNames = TRAINING) -> None:
    """A data path that names a local directory or file must exist, and a directory must hold
    index.json (unless data.index says where it is): say how to make one, not just what is missing."""
    if urlparse(path).scheme or "{" in path:  # a URL or a brace pattern: checked as its shards are read
        return
    where = path if os.path.isabs(path) else f"{path} (under {os.getcwd()})"
    create = f"create shards with `{PREPARE_COMMAND.format(path=path)}` (or {settings.demo})"
    if not os.path.exists(path):
        kind = "shard file" if path.endswith(".tar") else "directory"
        raise ValueError(f"{settings.path} {where}: no such {kind}; {create}")
    if os.path.isfile(path) and not path.endswith(".tar"):
        raise ValueError(
            f"{settings.path} {where}: a file, not a shard directory or a .tar shard (a raw corpus is "
            f"tokenized first); {create}"
        )
    if os.path.isdir(path) and index is None and not os.path.isfile(os.path.join(path, "index.json")):
        raise ValueError(
            f"{settings.path} {where}: the directory holds no index.json, so it is not a shard directory "
            f"written by launch/prepare_data.py; {create}{settings.or_set_index(INDEX_LOCATION)}"
        )


def default_index_location(urls: list[str], settings: SettingNames = TRAINING) -> str:
    if not urls:
        raise ValueError(f"{settings.path} names no shards")
    first = urls[0]
    scheme = urlparse(first).scheme
    if scheme in ("", "file"):
        return os.path.join(
            os.path.dirname(first.removeprefix("file://").removeprefix("file:")), "index.json"
        )
    if settings.index:
        raise ValueError(
            f"{settings.index}: give index.json's location; it cannot be inferred from the URL {first!r}"
        )
    raise ValueError(
        f"{settings.path}: index.json's location cannot be inferred from the URL {first!r}; give a local "
        "shard directory"
    )


def match_shards(
    urls: list[str], index: dict, index_path: str, settings: SettingNames = TRAINING
) -> list[ShardInfo]:
    """Each URL's index.json entry: the entry whose file name the URL mentions as a path."""
    by_basename: dict[str, list[dict]] = {}
    for entry in index["shards"]:
        by_basename.setdefault(os.path.basename(entry["file"]), []).append(entry)
    shards, seen = [], set()
    for url in urls:
        words = [word for word in re.split(r"[\s'\"|;<>]+", url) if word]
        matches = {
            entry["file"]: entry
            for word in words
            for entry in by_basename.get(os.path.basename(word), [])
            if word == entry["file"] or word.endswith("/" + entry["file"])
        }
        if len(matches) != 1:
            found = "no" if not matches else f"several ({sorted(matches)})"
            raise ValueError(
                f"{settings.path}: shard URL {url!r} names {found} shard files listed in {index_path}"
            )
        entry = next(iter(matches.values()))
        if entry["file"] in seen:
            raise ValueError(f"{settings.path}: shard {entry['file']} is listed twice")
        seen.add(entry["file"])
        shards.append(
            ShardInfo(
                url,
                entry["file"],
                entry["documents"],
                entry["tokens"],
                entry["sha256"].lower(),
                entry.get("domain"),
            )
        )
    return shards


def check_enough_documents(
    shards: list[ShardInfo], streams: int, dp_size: int, index_path: str, settings: SettingNames = TRAINING
) -> None:
    """Every stream needs a document of its own: a data set with fewer shards than streams is split
    by document (data/streams.py), which fails only when the documents are fewer than the streams."""
    documents = sum(shard.documents for shard in shards)
    if len(shards) >= streams or documents >= streams:
        return
    held = f"{index_path} lists {counted(len(shards), 'shard')} holding {counted(documents, 'document')}"
    more = (
        "add documents to the corpus and rerun launch/prepare_data.py (a .txt file is one document, a "
        "JSONL line or a parquet row one)"
    )
    if documents < dp_size:
        raise ValueError(
            f"{held}, fewer than the {dp_size} data-parallel ranks ({settings.streams}={streams}): every "
            f"rank reads streams of its own and every stream needs a document; {more}, or train on fewer "
            "ranks"
        )
    fitting = documents // dp_size * dp_size
    raise ValueError(
        f"{held}, fewer than {settings.streams}={streams}: every stream needs a document of its own. "
        f"Set {settings.streams}={fitting} (it must be a multiple of the data-parallel size {dp_size} and at "
        f"most the {documents} documents), or {more}"
    )


def counted(number: int, noun: str) -> str:
    return f"{number} {noun}" if number == 1 else f"{number} {noun}s"


def check_dataset(
    path: str | os.PathLike | Sequence[str],
    *,
    streams: int,
    dp_size: int,
    index: str | os.PathLike | None = None,
    vocab_size: int | None = None,
    eos_id: int | None = None,
    settings: SettingNames = TRAINING,
) -> None:
    """The loader's checks of a data set that need index.json only (no shard is opened, so it is
    cheap enough to run before the model is built): the path and index.json exist and are well-formed,
    every shard the path names is listed, the tokenizer's vocabulary fits the model's `vocab_size`
    and its EOS is `eos_id` (either None: not checked), and the documents suffice for `streams`
    streams on `dp_size` data-parallel ranks, each domain's on its own where `settings.by_domain`.
    ValueError naming the path or setting and the fix (`settings`: TRAINING or HELD_OUT)."""
    for value, setting in ((streams, settings.streams), (dp_size, "the data-parallel size")):
        if value < 1:
            raise ValueError(f"{setting} must be >= 1, got {value}")
    check_streams_fit_ranks(streams, dp_size, settings)
    index_path, contents, shards = resolve_shards(path, index, settings)
    check_index(contents, vocab_size, eos_id, source=index_path)
    check_enough_documents(shards, streams, dp_size, index_path, settings)
    if settings.by_domain:  # evaluation reads each domain's shards apart (train/evaluate.py)
        for domain in sorted({shard.domain for shard in shards if shard.domain}):
            of_domain = [shard for shard in shards if shard.domain == domain]
            try:
                check_enough_documents(of_domain, streams, dp_size, index_path, settings)
            except ValueError as error:
                raise ValueError(f"held-out domain {domain!r}: {error}") from None


def data_digest(shards: list[ShardInfo]) -> str:
    """Names the data a state belongs to: the shards and their contents, in list order."""
    listing = json.dumps([[shard.file, shard.sha256] for shard in shards])
    return hashlib.sha256(listing.encode()).hexdigest()


# ----------------------------------------------------------------------------- the loader


def check_layout(
    seq_len: int,
    global_batch_size: int,
    micro_batch_size: int,
    dp_rank: int,
    dp_size: int,
    streams: int,
    num_workers: int,
    shuffle_buffer: int,
    settings: SettingNames = TRAINING,
) -> None:
    """ValueError naming the setting for a batch / data-parallel layout the loader cannot serve."""
    for value, setting in (
        (seq_len, "data.seq_len"),
        (global_batch_size, "trainer.global_batch_size"),
        (micro_batch_size, "trainer.micro_batch_size"),
        (dp_size, "the data-parallel size"),
        (streams, settings.streams),
    ):
        if value < 1:
            raise ValueError(f"{setting} must be >= 1, got {value}")
    if num_workers < 0 or shuffle_buffer < 0:
        raise ValueError(
            f"data.num_workers ({num_workers}) and data.shuffle_buffer ({shuffle_buffer}) must be >= 0"
        )
    if not 0 <= dp_rank < dp_size:
        raise ValueError(f"data-parallel rank {dp_rank} is outside 0..{dp_size - 1}")
    check_streams_fit_ranks(streams, dp_size, settings)
    if global_batch_size % dp_size:
        raise ValueError(
            f"trainer.global_batch_size ({global_batch_size}) must be a multiple of the data-parallel size "
            f"({dp_size})"
        )
    if (global_batch_size // dp_size) % micro_batch_size:
        raise ValueError(
            f"trainer.global_batch_size / data-parallel size ({global_batch_size // dp_size}) "
            f"must be a multiple of trainer.micro_batch_size ({micro_batch_size})"
        )


def check_streams_fit_ranks(streams: int, dp_size: int, settings: SettingNames = TRAINING) -> None:
    if streams % dp_size:
        raise ValueError(
            f"{settings.streams} ({streams}) must be a multiple of the data-parallel size ({dp_size}): "
            "each rank reads whole streams"
        )


def windows_before(sequences: int, stream: int, streams: int) -> int:
    """How many windows `stream` has given when the first `sequences` sequences of the run are done."""
    return (sequences - stream + streams - 1) // streams


class TokenLoader:
    """Iterating yields this rank's micro-batches forever: dicts of int64 tensors `input_ids`,
    `labels`, `position_ids`, each [micro_batch_size, seq_len], in the order described above.

    Iteration continues where the loader stands (a second `iter` does not restart it). Workers
    (num_workers >= 1) run the rank's streams in processes; the batches are the same for any number
    of workers. With verify_sha256 a shard is hashed before any of its documents is used (one extra
    read of the shard). vocab_size / eos_id are the model's: index.json is checked against them, and
    token ids must lie below vocab_size (index.json's vocab_size when it is None). `domain` reads only
    the shards index.json tags with that domain (data/shards.py), in the same way.
    """

    def __init__(
        self,
        path: str | os.PathLike | Sequence[str],
        *,
        seq_len: int,
        global_batch_size: int,
        micro_batch_size: int,
        dp_rank: int = 0,
        dp_size: int = 1,
        seed: int = 0,
        streams: int = 64,
        num_workers: int = 0,
        shuffle_buffer: int = 0,
        skip_corrupt: bool = False,
        index: str | os.PathLike | None = None,
        vocab_size: int | None = None,
        eos_id: int | None = None,
        verify_sha256: bool = True,
        domain: str | None = None,
        prefetch: int = 4,
        timeout: float = 600.0,
        mp_context: str | None = None,
        settings: SettingNames = TRAINING,
    ):
        check_layout(
            seq_len,
            global_batch_size,
            micro_batch_size,
            dp_rank,
            dp_size,
            streams,
            num_workers,
            shuffle_buffer,
            settings,
        )
        self.seq_len = seq_len
        self.global_batch_size = global_batch_size
        self.micro_batch_size = micro_batch_size
        self.dp_rank, self.dp_size = dp_rank, dp_size
        self.seed = seed
        self.streams = streams
        self.num_workers = num_workers
        self.shuffle_buffer = shuffle_buffer
        self._pool_options = dict(prefetch=prefetch, timeout=timeout, mp_context=mp_context)

        self.index_path, self.index, shards = resolve_shards(path, index, settings)
        check_index(self.index, vocab_size, eos_id, source=self.index_path)
        if domain is not None:
            shards = shards_of_domain(shards, domain, self.index_path)
        check_enough_documents(shards, streams, dp_size, self.index_path, settings)
        self._config = StreamConfig(
            parts=split_shards(shards, streams),
            streams=streams,
            seed=seed,
            seq_len=seq_len,
            shuffle_buffer=shuffle_buffer,
            vocab_size=vocab_size if vocab_size is not None else self.index["vocab_size"],
            eos_id=self.index["eos_id"],
            verify_sha256=verify_sha256,
            skip_corrupt=skip_corrupt,
        )
        self._digest = data_digest(shards)
        self._local = list(range(dp_rank, streams, dp_size))  # rank-local sequence j reads _local[j % n]
        self._runner: InProcessRunner | WorkerPool | None = None
        self._failure: BaseException | None = None
        self._restart({s: initial_state(s) for s in self._local}, consumed=0)

    @property
    def micro_batches_per_step(self) -> int:
        return self.global_batch_size // (self.dp_size * self.micro_batch_size)

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        while True:
            yield self._next_micro_batch()

    def __enter__(self) -> TokenLoader:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def close(self) -> None:
        """Stop the workers (the position is kept: iterating again resumes from it)."""
        if self._runner is None:
            return
        try:
            if self._failure is None:
                self._states = self._runner.stream_states(dict(self._windows))
        finally:
            self._runner.close()
            self._runner = None

    def metrics(self) -> dict[str, int]:
        return {
            "epoch": min(self._epochs.values()),
            "epoch_max": max(self._epochs.values()),
            "skipped_shards": sum(self._skipped.values()),
            "sequences": self._consumed * self.dp_size,
        }

    def state_dict(self) -> dict:
        if self._failure is not None:
            raise RuntimeError("the loader failed; its position is lost (resume from the last checkpoint)")
        states = self._runner.stream_states(dict(self._windows)) if self._runner else self._states
        return {
            "format": STATE_FORMAT,
            **{key: self._order_key(key) for key in ORDER_KEYS},
            "sequences": self._consumed * self.dp_size,
            "dp_size": self.dp_size,
            "stream_states": [checkpoint_stream_state(states[stream]) for stream in self._local],
        }

    def load_state_dict(self, state: dict) -> None:
        """Continue from `state`: this rank's own state, or `merge_states` of all ranks' states (then
        on any data-parallel size)."""
        check_state_header(state, {key: self._order_key(key) for key in ORDER_KEYS})
        sequences = state["sequences"]
        if sequences % self.dp_size:
            raise ValueError(
                f"loader state is at sequence {sequences}, not a multiple of the data-parallel size "
                f"({self.dp_size}): resume at an optimizer-step boundary"
            )
        by_stream = {stream_state["stream"]: stream_state for stream_state in state["stream_states"]}
        missing = [stream for stream in self._local if stream not in by_stream]
        if missing:
            raise ValueError(
                f"loader state has no state for streams {missing} of rank {self.dp_rank}: load the per-rank "
                "states joined by data.loader.merge_states"
            )
        for stream in self._local:
            expected = windows_before(sequences, stream, self.streams)
            if by_stream[stream]["windows"] != expected:
                raise ValueError(
                    f"loader state: stream {stream} is at window {by_stream[stream]['windows']}, "
                    f"but sequence {sequences} implies {expected} (states taken at different steps?)"
                )
        if self._runner is not None:
            self._runner.close()
            self._runner = None
        states = {stream: runtime_stream_state(by_stream[stream]) for stream in self._local}
        self._restart(states, consumed=sequences // self.dp_size)

    def _order_key(self, key: str):
        return self._digest if key == "data" else getattr(self, key)

    def _restart(self, states: dict[int, dict], consumed: int) -> None:
        self._states = states
        self._consumed = consumed  # rank-local sequences handed out
        self._windows = {stream: states[stream]["windows"] for stream in self._local}
        self._epochs = {stream: states[stream]["epoch"] for stream in self._local}
        self._skipped = {stream: states[stream]["skipped_shards"] for stream in self._local}
        self._failure = None

    def _ensure_runner(self) -> InProcessRunner | WorkerPool:
        if self._failure is not None:
            raise RuntimeError(
                "the loader failed earlier (see the error above); it cannot go on"
            ) from self._failure
        if self._runner is None:
            if self.num_workers == 0:
                self._runner = InProcessRunner(self._config, self._states)
            else:
                self._runner = WorkerPool(
                    self._config,
                    self._states,
                    self._local,
                    self._consumed,
                    self.num_workers,
                    **self._pool_options,
                )
        return self._runner

    def _next_micro_batch(self) -> dict[str, torch.Tensor]:
        runner = self._ensure_runner()
        tokens = np.empty((self.micro_batch_size, self.seq_len + 1), np.int32)
        positions = np.empty((self.micro_batch_size, self.seq_len + 1), np.int32)
        try:
            for row in range(self.micro_batch_size):
                stream = self._local[self._consumed % len(self._local)]
                window = runner.next_window(stream)
                tokens[row], positions[row] = window.tokens, window.positions
                self._consumed += 1
                self._windows[stream] += 1
                self._epochs[stream], self._skipped[stream] = window.epoch, window.skipped_shards
                for warning in window.warnings:
                    logger.warning("data: %s", warning)
        except BaseException as error:
            self._failure = error
            raise
        return windows_to_batch(tokens, positions)


# ----------------------------------------------------------------------------- state


def checkpoint_stream_state(state: dict) -> dict:
    """A stream state with its numpy arrays as tensors (what gets saved)."""
    return {
        key: torch.from_numpy(np.array(value, ARRAY_DTYPES[key])) if key in ARRAY_DTYPES else int(value)
        for key, value in state.items()
    }


def runtime_stream_state(state: dict) -> dict:
    """A saved stream state with its tensors as numpy arrays (what the streams run from)."""
    return {
        key: np.array(torch.as_tensor(value).numpy(), ARRAY_DTYPES[key])
        if key in ARRAY_DTYPES
        else int(value)
        for key, value in state.items()
    }


def check_state_header(state: dict, expected: dict) -> None:
    if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
        raise ValueError(
            f"not a token loader state (format {state.get('format')!r}, expected {STATE_FORMAT!r})"
        )
    for key, value in expected.items():
        if state[key] == value:
            continue
        if key == "data":
            raise ValueError("loader state belongs to other shards (data.path or its index.json changed)")
        raise ValueError(
            f"loader state was saved with {ORDER_SETTINGS[key]} = {state[key]}, this run has {value}: "
            "the data order would differ"
        )


def merge_states(states: Sequence[dict]) -> dict:
    """Join the per-rank `state_dict()`s of one step into a world-size-independent state."""
    if not states:
        raise ValueError("merge_states: no states given")
    first = states[0]
    for state in states:
        check_state_header(state, {key: first[key] for key in ORDER_KEYS})
    positions = sorted({state["sequences"] for state in states})
    if len(positions) > 1:
        raise ValueError(
            f"merge_states: the ranks are at different positions {positions}; take states at one step"
        )
    by_stream: dict[int, dict] = {}
    for state in states:
        for stream_state in state["stream_states"]:
            if stream_state["stream"] in by_stream:
                raise ValueError(f"merge_states: stream {stream_state['stream']} appears in two states")
            by_stream[stream_state["stream"]] = stream_state
    missing = sorted(set(range(first["streams"])) - by_stream.keys())
    if missing:
        raise ValueError(f"merge_states: no state for streams {missing}; pass every rank's state")
    return {
        "format": STATE_FORMAT,
        **{key: first[key] for key in ORDER_KEYS},
        "sequences": positions[0],
        "stream_states": [by_stream[stream] for stream in range(first["streams"])],
    }
