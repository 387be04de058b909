"""Token loader: packing, the global-batch order for any world size and worker count, exact resume,
and bad shards.

The shards are written here with webdataset.TarWriter in the contract's format (independent of
the project's shard writer). Expected batches come from a plain reference that reads the tars
with tarfile, lays each stream's documents end to end and cuts windows by the documented rule:
sequence i is window i // streams of stream i % streams, window k spans tokens [k*L, k*L + L].
With fewer shards than streams the reference cuts the shards into parts by the rule of
data/streams.py's docstring, written out again here.
"""

import hashlib
import io
import itertools
import json
import logging
import os
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds

from data.loader import TokenLoader, check_index, merge_states
from data.packing import Packer, windows_to_batch
from data.streams import LoaderWorkerError, ShardError, chunk_windows, shards_of_stream

EOS = 151643
MODEL_VOCAB = 151936
SEQ_LEN = 16
NUM_SHARDS = 12
STREAMS = 8  # streams 0-3 read two shards an epoch, streams 4-7 one
KEYS = ("input_ids", "labels", "position_ids")


# ----------------------------------------------------------------------------- shards written here


def npy_bytes(tokens: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, tokens)
    return buffer.getvalue()


def make_documents(rng: np.random.Generator, count: int) -> list[np.ndarray]:
    """Short documents (a lone EOS among them) and one longer than 2 * SEQ_LEN per shard."""
    lengths = [int(n) for n in rng.integers(0, 30, count - 1)] + [int(rng.integers(40, 80))]
    documents = []
    for length in rng.permutation(lengths):
        documents.append(np.append(rng.integers(0, 1000, length), EOS).astype(np.uint32))
    return documents


def write_shard(path: Path, prefix: str, documents: list[np.ndarray]) -> dict:
    with wds.TarWriter(str(path)) as writer:
        for number, tokens in enumerate(documents):
            writer.write({"__key__": f"{prefix}-doc{number:03d}", "tokens.npy": npy_bytes(tokens)})
    return {
        "file": path.name,
        "documents": len(documents),
        "tokens": sum(len(tokens) for tokens in documents),
        "sha256": hashlib.sha256(path.read_bytes()).hexdigest(),
    }


def write_shard_set(directory: Path, shards: int = NUM_SHARDS, documents: int = 5, seed: int = 0) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    entries = [
        write_shard(directory / f"shard-{number:06d}.tar", f"s{number}", make_documents(rng, documents))
        for number in range(shards)
    ]
    index = {"tokenizer": "qwen2.5-72b-instruct", "vocab_size": 151665, "eos_id": EOS, "shards": entries}
    (directory / "index.json").write_text(json.dumps(index, indent=1))
    return directory


def update_index(directory: Path, file: str, **fields) -> None:
    index = json.loads((directory / "index.json").read_text())
    for entry in index["shards"]:
        if entry["file"] == file:
            entry.update(fields)
    (directory / "index.json").write_text(json.dumps(index))


def rehash(directory: Path, file: str) -> None:
    update_index(directory, file, sha256=hashlib.sha256((directory / file).read_bytes()).hexdigest())


@pytest.fixture
def shard_dir(tmp_path: Path) -> Path:
    return write_shard_set(tmp_path / "shards")


# ----------------------------------------------------------------------------- the reference


def read_tar_documents(path: Path) -> list[np.ndarray]:
    with tarfile.open(path) as tar:
        return [np.load(io.BytesIO(tar.extractfile(member).read())) for member in tar.getmembers()]


def reference_parts(counts: list[int], streams: int) -> list[tuple[int, int, int]]:
    """(shard, first document, end) of each part: whole shards when there are `streams` of them,
    else a shard of d documents cut into n = min(d, P) runs [k*d // n, (k+1)*d // n), P the
    smallest number of parts a shard that makes at least `streams` parts in all."""
    if len(counts) >= streams:
        return [(shard, 0, count) for shard, count in enumerate(counts)]
    most = min(p for p in range(1, streams + 1) if sum(min(count, p) for count in counts) >= streams)
    return [
        (shard, k * count // min(count, most), (k + 1) * count // min(count, most))
        for shard, count in enumerate(counts)
        for k in range(min(count, most))
    ]


def stream_documents(directory: Path, streams: int, seed: int, stream: int, skip=()):
    """(document, bad parts passed before it) for a stream's documents, epoch after epoch."""
    entries = json.loads((directory / "index.json").read_text())["shards"]
    files = [entry["file"] for entry in entries]
    parts = reference_parts([entry["documents"] for entry in entries], streams)
    documents = {file: read_tar_documents(directory / file) for file in files if file not in skip}
    bad_passed = 0
    for epoch in itertools.count():
        for part in shards_of_stream(len(parts), streams, seed, epoch, stream):
            shard, start, stop = parts[part]
            bad_passed += files[shard] in skip
            for document in documents.get(files[shard], [])[start:stop]:
                yield document, bad_passed


def reference_stream(directory: Path, streams: int, seed: int, stream: int, windows: int, skip=()):
    """(tokens, positions) of the documents that `windows` windows of a stream span, laid end to
    end, and how many bad shards the stream passed on the way."""
    tokens, positions, bad_passed = [], [], 0
    for document, bad_passed in stream_documents(directory, streams, seed, stream, skip):  # noqa: B007
        if sum(map(len, tokens)) >= windows * SEQ_LEN + 1:
            break
        tokens.append(document.astype(np.int64))
        positions.append(np.arange(len(document)))
    return np.concatenate(tokens), np.concatenate(positions), bad_passed


def reference_windows(directory: Path, count: int, streams=STREAMS, seed=0, skip=()):
    """[count, SEQ_LEN + 1] tokens and positions of the run's first `count` sequences, and the number
    of bad shards passed, by the rule in the docstring."""
    per_stream = -(-count // streams)
    data = [reference_stream(directory, streams, seed, s, per_stream, skip) for s in range(streams)]
    spans = [slice((i // streams) * SEQ_LEN, (i // streams) * SEQ_LEN + SEQ_LEN + 1) for i in range(count)]
    tokens = np.stack([data[i % streams][0][span] for i, span in enumerate(spans)])
    positions = np.stack([data[i % streams][1][span] for i, span in enumerate(spans)])
    return tokens, positions, sum(bad for _, _, bad in data)


def reference_batches(directory: Path, count: int, batch: int, **options) -> list[dict]:
    tokens, positions, _ = reference_windows(directory, count, **options)
    labels = np.where(positions[:, 1:] == 0, -100, tokens[:, 1:])
    everything = {"input_ids": tokens[:, :-1], "labels": labels, "position_ids": positions[:, :-1]}
    return [
        {key: torch.from_numpy(value[start : start + batch]) for key, value in everything.items()}
        for start in range(0, count, batch)
    ]


def assert_same_batches(actual: list[dict], expected: list[dict]) -> None:
    assert len(actual) == len(expected)
    for number, (got, want) in enumerate(zip(actual, expected, strict=True)):
        for key in KEYS:
            assert got[key].dtype == torch.int64
            assert torch.equal(got[key], want[key]), f"batch {number}, {key}"


# ----------------------------------------------------------------------------- running the loader


def make_loader(
    directory, *, global_batch=4, micro=1, dp_rank=0, dp=1, streams=STREAMS, seq_len=SEQ_LEN, **options
):
    options.setdefault("timeout", 30.0)  # a stuck worker fails the test instead of hanging it
    return TokenLoader(
        directory,
        seq_len=seq_len,
        global_batch_size=global_batch,
        micro_batch_size=micro,
        dp_rank=dp_rank,
        dp_size=dp,
        streams=streams,
        **options,
    )


def take(loader: TokenLoader, count: int) -> list[dict]:
    return list(itertools.islice(iter(loader), count))


def assemble_global(rank_micro_batches: list[list[dict]], global_batch: int, micro: int) -> list[dict]:
    """Rebuild global batches: row k of rank r's share of a step is sequence r + k * dp of the step."""
    dp = len(rank_micro_batches)
    per_step = global_batch // (dp * micro)
    steps = len(rank_micro_batches[0]) // per_step
    batches = []
    for step in range(steps):
        batch = {}
        for key in KEYS:
            rows = torch.empty(global_batch, SEQ_LEN, dtype=torch.int64)
            for rank, micro_batches in enumerate(rank_micro_batches):
                rows[rank::dp] = torch.cat(
                    [mb[key] for mb in micro_batches[step * per_step : (step + 1) * per_step]]
                )
            batch[key] = rows
        batches.append(batch)
    return batches


def run_global(directory, dp: int, steps: int, *, global_batch=4, micro=1, state=None, **options):
    """`steps` global batches read by `dp` ranks (after loading `state`), and each rank's state after."""
    loaders = [
        make_loader(directory, global_batch=global_batch, micro=micro, dp_rank=rank, dp=dp, **options)
        for rank in range(dp)
    ]
    try:
        if state is not None:
            for loader in loaders:
                loader.load_state_dict(state)
        per_rank = steps * loaders[0].micro_batches_per_step
        micro_batches = [take(loader, per_rank) for loader in loaders]
        states = [loader.state_dict() for loader in loaders]
    finally:
        for loader in loaders:
            loader.close()
    return assemble_global(micro_batches, global_batch, micro), states


def through_checkpoint(state: dict) -> dict:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


# ----------------------------------------------------------------------------- packing and order


def test_packer_cuts_overlapping_windows_with_the_boundary_label_rule():
    """Worked example, seq_len 4: windows are tokens [0:5], [4:9], [8:13] of the documents laid end
    to end; E = EOS. A label is -100 where the next token starts a document."""
    E = EOS
    documents = iter([[11, 12, E], [21, E], [31, 32, 33, 34, 35, 36, E], [41, E]])
    packer = Packer(4)
    windows = [packer.next_window(lambda: np.array(next(documents), np.int32)) for _ in range(3)]
    batch = windows_to_batch(np.stack([w[0] for w in windows]), np.stack([w[1] for w in windows]))
    assert batch["input_ids"].tolist() == [[11, 12, E, 21], [E, 31, 32, 33], [34, 35, 36, E]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0], [1, 0, 1, 2], [3, 4, 5, 6]]
    assert batch["labels"].tolist() == [[12, E, -100, E], [-100, 32, 33, 34], [35, 36, E, -100]]


def test_packing_keeps_every_document_in_order_with_positions_and_labels(shard_dir):
    """One stream over all shards: the windows' inputs, laid end to end, are the documents of the
    epoch in order (each exactly once); positions are 0 exactly at document starts and count on
    across window boundaries; labels are the next token inside a document and -100 at its end."""
    documents = [
        document
        for shard in shards_of_stream(NUM_SHARDS, 1, 0, 0, 0)
        for document in read_tar_documents(shard_dir / f"shard-{shard:06d}.tar")
    ]
    assert max(map(len, documents)) > 2 * SEQ_LEN  # some document spans three windows
    epoch_tokens = sum(map(len, documents))
    with make_loader(shard_dir, global_batch=2, micro=2, streams=1) as loader:
        batches = take(loader, epoch_tokens // (2 * SEQ_LEN) + 2)  # a little into epoch 1
    inputs = torch.cat([b["input_ids"] for b in batches]).flatten().numpy()
    positions = torch.cat([b["position_ids"] for b in batches]).flatten().numpy()
    labels = torch.cat([b["labels"] for b in batches]).flatten().numpy()

    starts = np.flatnonzero(positions == 0)
    pieces = np.split(inputs, starts[1:])
    assert len(pieces) > len(documents)
    for document, piece, start in zip(documents, pieces, starts, strict=False):
        assert np.array_equal(piece, document)
        assert np.array_equal(positions[start : start + len(document)], np.arange(len(document)))
    # Window boundaries carry nothing: the next token of the last input of a window is the first
    # input of the next window, and the label rule holds across them.
    next_tokens, next_positions = inputs[1:], positions[1:]
    assert np.array_equal(labels[:-1], np.where(next_positions == 0, -100, next_tokens))
    assert np.all(inputs[labels == -100][:-1] == EOS)


def test_epoch_shard_order_is_a_seeded_partition(shard_dir):
    orders = {}
    for seed, epoch in itertools.product((0, 1), range(3)):
        per_stream = [shards_of_stream(NUM_SHARDS, STREAMS, seed, epoch, s) for s in range(STREAMS)]
        assert sorted(itertools.chain(*per_stream)) == list(range(NUM_SHARDS))
        assert [len(shards) for shards in per_stream] == [2, 2, 2, 2, 1, 1, 1, 1]
        orders[seed, epoch] = per_stream
    assert len({str(order) for order in orders.values()}) == len(orders)  # differs by epoch and by seed


@pytest.mark.parametrize("dp", [1, 2, 4])
def test_global_batches_are_the_reference_for_any_world_size(shard_dir, dp):
    steps, global_batch = 12, 8  # 12 windows a stream: across shard and epoch boundaries
    batches, _ = run_global(shard_dir, dp, steps, global_batch=global_batch, micro=2)
    assert_same_batches(batches, reference_batches(shard_dir, steps * global_batch, global_batch))


@pytest.mark.parametrize("workers", [1, 2, 3])
def test_workers_do_not_change_the_batches(shard_dir, workers):
    """Rank 1 of 2 (four streams) with a shuffle buffer: 1, 2 or 3 workers (3 does not divide 4)."""
    options = dict(global_batch=8, micro=2, dp_rank=1, dp=2, shuffle_buffer=3)
    with make_loader(shard_dir, **options) as loader:
        expected = take(loader, 30)
    with make_loader(shard_dir, num_workers=workers, prefetch=2, **options) as loader:
        assert_same_batches(take(loader, 30), expected)


def test_shuffle_buffer_reorders_documents_deterministically(shard_dir):
    def first_batches(seed):
        with make_loader(shard_dir, shuffle_buffer=4, seed=seed) as loader:
            return take(loader, 10)

    plain = reference_batches(shard_dir, 10, 1)
    shuffled = first_batches(0)
    assert_same_batches(first_batches(0), shuffled)
    assert any(not torch.equal(a["input_ids"], b["input_ids"]) for a, b in zip(shuffled, plain, strict=True))
    assert any(
        not torch.equal(a["input_ids"], b["input_ids"])
        for a, b in zip(shuffled, first_batches(1), strict=True)
    )


# ----------------------------------------------------------------------------- exact resume


def stream_positions(states: list[dict]) -> dict[int, tuple[int, int, int]]:
    return {
        s["stream"]: (s["epoch"], s["shard"], s["document"])
        for state in states
        for s in state["stream_states"]
    }


RESUME_CASES = {
    # name: (dp before, dp after, workers before, workers after, shuffle buffer, steps before, steps after)
    "shard_boundary": (1, 1, 0, 0, 0, 5, 14),
    "epoch_boundary": (1, 1, 0, 0, 0, 14, 8),
    "shuffle_buffer": (1, 1, 0, 0, 3, 9, 10),
    "workers": (1, 1, 1, 2, 2, 9, 10),
    "dp2_to_dp1": (2, 1, 0, 0, 2, 9, 10),
    "dp1_to_dp4": (1, 4, 0, 1, 2, 9, 10),
}


@pytest.mark.parametrize("case", RESUME_CASES)
def test_resume_gives_the_uninterrupted_batches(shard_dir, case):
    dp_before, dp_after, workers_before, workers_after, shuffle, before, after = RESUME_CASES[case]
    uninterrupted, _ = run_global(shard_dir, dp_before, before + after, shuffle_buffer=shuffle)
    first, states = run_global(
        shard_dir, dp_before, before, num_workers=workers_before, shuffle_buffer=shuffle
    )
    state = through_checkpoint(merge_states(states) if dp_after != dp_before else states[0])
    resumed, end_states = run_global(
        shard_dir, dp_after, after, num_workers=workers_after, shuffle_buffer=shuffle, state=state
    )
    assert_same_batches(first + resumed, uninterrupted)

    start, end = stream_positions([state]), stream_positions(end_states)
    assert any(document > 0 for _, _, document in start.values())  # resumed inside a shard
    if case == "shard_boundary":
        assert any(end[s][:2] != start[s][:2] for s in start)
    if case == "epoch_boundary":
        assert any(end[s][0] > start[s][0] for s in start)


def test_state_from_workers_running_far_ahead(shard_dir):
    """Workers fill their queues far beyond what was consumed; the state is still the consumed point."""
    options = dict(global_batch=8, micro=2, shuffle_buffer=2)
    with make_loader(shard_dir, **options) as loader:
        expected = take(loader, 40)
    with make_loader(shard_dir, num_workers=2, prefetch=2, **options) as loader:
        first = take(loader, 3)
        time.sleep(0.5)  # let the workers run ahead until their queues are full
        state = through_checkpoint(loader.state_dict())
        assert_same_batches(first + take(loader, 7), expected[:10])
    with make_loader(shard_dir, **options) as loader:
        loader.load_state_dict(state)
        assert_same_batches(take(loader, 37), expected[3:])


@pytest.fixture
def long_document_dir(tmp_path: Path) -> Path:
    """Documents long enough for a real seq_len's windows."""
    directory, rng = tmp_path / "long", np.random.default_rng(1)
    directory.mkdir()
    entries = []
    for number in range(STREAMS):
        documents = [np.append(rng.integers(0, 1000, 20_000), EOS).astype(np.uint32) for _ in range(2)]
        entries.append(write_shard(directory / f"shard-{number:06d}.tar", f"s{number}", documents))
    index = {"tokenizer": "qwen2.5-72b-instruct", "vocab_size": 151665, "eos_id": EOS, "shards": entries}
    (directory / "index.json").write_text(json.dumps(index))
    return directory


@pytest.mark.timeout(120)  # the failure this guards against is a read that never returns
@pytest.mark.parametrize("start_method", ["fork", "spawn"])
def test_a_killed_worker_is_an_error_not_a_hang(long_document_dir, start_method):
    """Killed while its queue is full: a chunk at this seq_len is far larger than a pipe's 64 KiB, so
    the worker dies partway through writing one, and the trainer's read must not wait for the rest.
    With two workers, the other one must not keep the dead one's pipe open either."""
    seq_len = 4096
    assert chunk_windows(seq_len) * (seq_len + 1) * 2 * 4 > 1 << 16  # a chunk's tokens and positions
    # the loader's own deadline (for a worker that sends nothing) is far longer than the 5 s allowed:
    # it is no part of what ends the wait
    options = dict(seq_len=seq_len, num_workers=2, timeout=30.0, mp_context=start_method)
    with make_loader(long_document_dir, **options) as loader:
        batches = iter(loader)
        next(batches)
        time.sleep(1.0)  # both queues fill; each feeder thread waits inside a message
        loader._runner._workers[0].process.kill()
        started = time.monotonic()
        with pytest.raises(LoaderWorkerError, match="worker 0 was killed by SIGKILL"):
            for _ in range(10_000):  # past whatever the worker had queued
                next(batches)
    assert time.monotonic() - started < 5


def test_state_of_one_rank_loads_on_the_same_layout_only(shard_dir):
    _, states = run_global(shard_dir, 2, 3)
    with make_loader(shard_dir, dp_rank=1, dp=2) as loader:
        loader.load_state_dict(through_checkpoint(states[1]))
    with make_loader(shard_dir) as loader, pytest.raises(ValueError, match="merge_states"):
        loader.load_state_dict(states[0])
    with make_loader(shard_dir, seed=1) as loader, pytest.raises(ValueError, match=r"trainer\.seed"):
        loader.load_state_dict(merge_states(states))
    with pytest.raises(ValueError, match="different positions"):
        merge_states([states[0], run_global(shard_dir, 2, 4)[1][1]])


# ----------------------------------------------------------------------------- fewer shards than streams


@pytest.fixture
def split_dir(tmp_path: Path) -> Path:
    """3 shards of 5 documents for STREAMS = 8 streams: cut into 9 parts of 1, 2 and 2 documents."""
    return write_shard_set(tmp_path / "split", shards=3, documents=5)


def test_parts_cover_every_document_once():
    parts = reference_parts([5, 5, 5], STREAMS)
    assert [(start, stop) for shard, start, stop in parts if shard == 0] == [(0, 1), (1, 3), (3, 5)]
    assert len(parts) == 9
    assert len(reference_parts([1, 100], 16)) == 16  # the small shard's one part, 15 of the large one
    assert reference_parts([5] * 8, 8) == [(shard, 0, 5) for shard in range(8)]  # enough shards: whole


@pytest.mark.parametrize("dp, workers", [(1, 0), (2, 1), (4, 0)])
def test_split_shards_give_the_reference_batches_for_any_world_size(split_dir, dp, workers):
    steps, global_batch = 10, 8  # 10 windows a stream: several epochs of its parts
    batches, _ = run_global(split_dir, dp, steps, global_batch=global_batch, micro=2, num_workers=workers)
    assert_same_batches(batches, reference_batches(split_dir, steps * global_batch, global_batch))


def test_resume_inside_a_split_shard_on_another_world_size(split_dir):
    uninterrupted, _ = run_global(split_dir, 2, 12, shuffle_buffer=2)
    first, states = run_global(split_dir, 2, 5, shuffle_buffer=2)
    assert any(s["document"] > 0 for state in states for s in state["stream_states"])
    state = through_checkpoint(merge_states(states))
    resumed, _ = run_global(split_dir, 1, 7, shuffle_buffer=2, num_workers=1, state=state)
    assert_same_batches(first + resumed, uninterrupted)


def test_a_split_shard_with_fewer_documents_than_indexed_is_caught(split_dir):
    path = split_dir / "shard-000001.tar"
    write_shard(path, "s1", read_tar_documents(path)[:2])  # its parts 2 and 3 lose their documents
    rehash(split_dir, path.name)
    error = first_error(split_dir)
    assert "shard-000001.tar" in str(error) and "index.json says 5 documents" in str(error)
    for shard in split_dir.glob("*.tar"):
        shard.unlink()
    error = first_error(split_dir, skip_corrupt=True)
    assert "gave no documents" in str(error) and "9 shard parts" in str(error)


# ----------------------------------------------------------------------------- bad data


def first_error(directory, **options) -> BaseException:
    with make_loader(directory, **options) as loader, pytest.raises((ValueError, RuntimeError)) as caught:
        take(loader, 200)
    return caught.value


def truncate(path: Path, keep: int) -> None:
    path.write_bytes(path.read_bytes()[:keep])


@pytest.mark.parametrize("workers", [0, 1])
def test_truncated_tar_names_the_shard(shard_dir, workers):
    truncate(shard_dir / "shard-000003.tar", 2000)  # inside the second document
    rehash(shard_dir, "shard-000003.tar")  # as if index.json had been written from the broken file
    error = first_error(shard_dir, num_workers=workers)
    assert isinstance(error, ShardError)
    assert "shard-000003.tar" in str(error) and "truncated" in str(error)


def test_a_well_formed_tar_with_fewer_documents_than_indexed_is_caught(shard_dir):
    path = shard_dir / "shard-000005.tar"
    write_shard(path, "s5", read_tar_documents(path)[:2])  # cut at a document boundary, end blocks intact
    rehash(shard_dir, path.name)
    error = first_error(shard_dir)
    assert "shard-000005.tar" in str(error) and "index.json says 5 documents" in str(error)


def test_sha256_mismatch_names_the_shard(shard_dir):
    path = shard_dir / "shard-000007.tar"
    raw = bytearray(path.read_bytes())
    raw[700] ^= 1  # a token's bits in the first document: the tar itself still reads
    path.write_bytes(bytes(raw))
    error = first_error(shard_dir)
    assert isinstance(error, ShardError)
    assert "shard-000007.tar" in str(error) and "sha256" in str(error)


@pytest.mark.parametrize("workers", [0, 2])
def test_missing_shard_names_it_and_fails_promptly(shard_dir, workers):
    (shard_dir / "shard-000002.tar").unlink()
    started = time.monotonic()
    error = first_error(shard_dir, num_workers=workers)
    assert time.monotonic() - started < 10
    assert isinstance(error, ShardError) and "shard-000002.tar" in str(error)


def test_token_id_beyond_the_vocab_names_shard_and_document(shard_dir):
    documents = read_tar_documents(shard_dir / "shard-000004.tar")
    documents[2][1] = MODEL_VOCAB + 5
    write_shard(shard_dir / "shard-000004.tar", "s4", documents)
    rehash(shard_dir, "shard-000004.tar")
    error = first_error(shard_dir, vocab_size=MODEL_VOCAB, eos_id=EOS)
    assert isinstance(error, ShardError)
    assert (
        "shard-000004.tar" in str(error)
        and "'s4-doc002'" in str(error)
        and str(MODEL_VOCAB + 5) in str(error)
    )


def test_index_vocab_and_eos_are_checked_against_the_model(shard_dir):
    index_path = shard_dir / "index.json"
    check_index(index_path, MODEL_VOCAB, EOS)
    index = json.loads(index_path.read_text())
    with pytest.raises(ValueError, match=r"index\.json.*vocab_size 152000"):
        check_index({**index, "vocab_size": 152000}, MODEL_VOCAB, EOS)
    index_path.write_text(json.dumps({**index, "eos_id": 151645}))
    with pytest.raises(ValueError, match=rf"{index_path}.*eos_id 151645"):
        make_loader(shard_dir, vocab_size=MODEL_VOCAB, eos_id=EOS)
    index_path.write_text(json.dumps({**index, "shards": [{**index["shards"][0], "sha256": "xyz"}]}))
    with pytest.raises(ValueError, match=r"shards\[0\]\.sha256"):
        make_loader(shard_dir, streams=1)


@pytest.mark.parametrize("workers", [0, 1])
def test_skip_corrupt_skips_bad_shards_and_counts_them(shard_dir, workers, caplog):
    bad = {"shard-000001.tar", "shard-000009.tar"}
    (shard_dir / "shard-000001.tar").unlink()
    truncate(shard_dir / "shard-000009.tar", 1500)
    caplog.set_level(logging.WARNING, logger="data.loader")
    with make_loader(shard_dir, global_batch=4, micro=4, skip_corrupt=True, num_workers=workers) as loader:
        batches = take(loader, 40)  # 20 windows a stream: every stream is past epoch 1
        metrics = loader.metrics()
    assert_same_batches(batches, reference_batches(shard_dir, 160, 4, skip=bad))
    assert metrics["epoch"] >= 1
    assert metrics["skipped_shards"] == reference_windows(shard_dir, 160, skip=bad)[2] >= len(bad)
    logged = caplog.text
    assert all(f"skipping shard {name}" in logged for name in bad)


def test_a_stream_whose_shards_all_fail_raises_instead_of_spinning(shard_dir):
    for path in shard_dir.glob("*.tar"):
        path.unlink()
    error = first_error(shard_dir, skip_corrupt=True, streams=2)
    assert "gave no documents" in str(error) and "12 shards" in str(error)


def test_layouts_the_loader_cannot_serve_name_the_setting(shard_dir):
    cases = {
        "data.streams": dict(streams=6, dp=4, global_batch=8),
        "trainer.global_batch_size": dict(dp=2, global_batch=5),
        "trainer.micro_batch_size": dict(dp=2, global_batch=8, micro=3),
    }
    for setting, options in cases.items():
        with pytest.raises(ValueError, match=setting.replace(".", r"\.")):
            make_loader(shard_dir, **options)
    few = write_shard_set(shard_dir.parent / "few", shards=2, documents=3)
    with pytest.raises(ValueError, match=r"2 shards holding 6 documents, fewer than data\.streams=16.*=6"):
        make_loader(few, streams=16)


# ----------------------------------------------------------------------------- paths and URLs


def test_brace_patterns_and_pipe_urls_read_the_same_shards(shard_dir):
    expected = reference_batches(shard_dir, 12, 4)
    pattern = f"{shard_dir}/shard-{{000000..{NUM_SHARDS - 1:06d}}}.tar"
    with make_loader(pattern, global_batch=4, micro=4) as loader:
        assert_same_batches(take(loader, 3), expected)
    pipes = [f"pipe:cat {shard_dir}/shard-{number:06d}.tar" for number in range(NUM_SHARDS)]
    with make_loader(pipes, index=shard_dir / "index.json", global_batch=4, micro=4, num_workers=1) as loader:
        assert_same_batches(take(loader, 3), expected)
    os.rename(shard_dir / "shard-000000.tar", shard_dir / "moved.tar")
    error = first_error(pipes, index=shard_dir / "index.json", verify_sha256=False)
    assert isinstance(error, ShardError) and "shard-000000.tar" in str(error)


def test_an_incomplete_data_set_is_refused(tmp_path):
    """prepare_data.py writes 'complete': false when a run was interrupted; training on it would
    silently use part of the corpus."""
    from data.loader import check_index_fields

    index = {
        "tokenizer": "t",
        "vocab_size": 10,
        "eos_id": 9,
        "complete": False,
        "shards": [{"file": "shard-000000.tar", "documents": 1, "tokens": 2, "sha256": "0" * 64}],
    }
    with pytest.raises(ValueError, match="incomplete"):
        check_index_fields(index, str(tmp_path / "index.json"))
    with pytest.raises(ValueError, match="incomplete"):  # a rerun whose first shard is not done yet
        check_index_fields({**index, "shards": []}, str(tmp_path / "index.json"))
    index["complete"] = True
    check_index_fields(index, str(tmp_path / "index.json"))


def write_compressed_bomb(path: Path, member: str, payload_bytes: int) -> None:
    """A gzip tar (kilobytes on disk) whose one tokens.npy member expands to `payload_bytes`."""
    header = npy_bytes(np.zeros(0, np.uint32))
    info = tarfile.TarInfo(member)
    info.size = len(header) + payload_bytes

    class Zeros:  # what tarfile copies the member from, a MiB at a time
        left = info.size

        def read(self, size: int) -> bytes:
            count = min(size, self.left)
            self.left -= count
            return bytes(count)

    with tarfile.open(path, "w:gz", compresslevel=1) as archive:
        archive.addfile(info, Zeros())


def test_a_member_larger_than_the_index_allows_is_refused_unread(shard_dir):
    import tracemalloc

    path = shard_dir / "shard-000004.tar"
    write_compressed_bomb(path, "s4-doc000.tokens.npy", 64 << 20)
    rehash(shard_dir, path.name)  # the index names the file; only its token count bounds the member
    assert path.stat().st_size < 1 << 20
    tracemalloc.start()
    try:
        error = first_error(shard_dir)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert isinstance(error, ShardError)
    assert "shard-000004.tar" in str(error) and "s4-doc000.tokens.npy" in str(error)
    assert peak < 16 << 20  # the 64 MiB member was never read into memory
