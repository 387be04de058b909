"""A new user's path: prepare_data.py with default settings, then training with the default config.

A corpus of a few hundred KB makes one default-sized shard, fewer than the default data.streams:
the loader must still serve it on two data-parallel ranks (splitting the shard by document), and
what cannot work (fewer documents than streams, a data.path that is missing or not a shard
directory) must be refused before the model is built, by `check_dataset`, with a message naming
the path, the setting and the fix. Corpora are written into tmp_path by the tests themselves.
"""

import itertools
import json
import re
import shlex
from pathlib import Path

import pytest
import torch

from data.loader import HELD_OUT, TokenLoader, check_dataset
from train.config import DataConfig, TrainerConfig

REPO = Path(__file__).resolve().parents[2]
DEFAULTS = DataConfig()  # conf/data/default.yaml is this schema, unchanged
TRAINER = TrainerConfig()
KEYS = ("input_ids", "labels", "position_ids")


def write_corpus(path: Path, documents: int) -> Path:
    """JSONL documents of a few hundred to a thousand bytes each, told apart by their numbers."""
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = []
    for number in range(documents):
        words = " ".join(f"w{number}x{i % (7 + number % 13)}" for i in range(60 + number % 90))
        lines.append(json.dumps({"text": f"Document {number}: {words}."}))
    path.write_text("\n".join(lines) + "\n")
    return path


def loader(path: Path, dp_rank: int, dp_size: int, **settings) -> TokenLoader:
    """A rank's loader with the default data and trainer settings, as the trainer builds it."""
    return TokenLoader(
        path,
        seq_len=DEFAULTS.seq_len,
        global_batch_size=TRAINER.global_batch_size,
        micro_batch_size=TRAINER.micro_batch_size,
        dp_rank=dp_rank,
        dp_size=dp_size,
        seed=TRAINER.seed,
        streams=settings.get("streams", DEFAULTS.streams),
        num_workers=DEFAULTS.num_workers,
        shuffle_buffer=DEFAULTS.shuffle_buffer,
        timeout=30.0,
    )


def global_batches(path: Path, dp_size: int, steps: int, **settings) -> list[torch.Tensor]:
    """Each step's global batch (one tensor a key, stacked), rebuilt from the ranks' micro-batches:
    row k of rank r's share of a step is sequence r + k * dp of the step."""
    shares = []
    for rank in range(dp_size):
        with loader(path, rank, dp_size, **settings) as rank_loader:
            per_step = rank_loader.micro_batches_per_step
            micro = list(itertools.islice(iter(rank_loader), steps * per_step))
        shares.append([torch.cat([m[key] for m in micro]) for key in KEYS])
    batches = []
    for key in range(len(KEYS)):
        rows = torch.empty_like(torch.cat([share[key] for share in shares]))
        for rank, share in enumerate(shares):
            rows[rank::dp_size] = share[key]
        batches.append(rows)
    return batches


def test_a_small_corpus_prepared_with_defaults_trains_on_two_ranks_with_the_default_streams(
    tmp_path, prepare_data
):
    corpus = write_corpus(tmp_path / "corpus.jsonl", 400)
    assert 200_000 < corpus.stat().st_size < 600_000
    out = tmp_path / "shards"
    assert prepare_data("--input", corpus, "--output", out, "--no-progress") == 0
    index = json.loads((out / "index.json").read_text())
    assert len(index["shards"]) < DEFAULTS.streams <= index["documents"]  # the case that used to fail

    check_dataset(out, streams=DEFAULTS.streams, dp_size=2)
    steps = 2 * DEFAULTS.streams // TRAINER.global_batch_size + 1  # every stream gives 2 windows and more
    on_two = global_batches(out, 2, steps)
    on_one = global_batches(out, 1, steps)
    for key, two, one in zip(KEYS, on_two, on_one, strict=True):
        assert two.shape == (steps * TRAINER.global_batch_size, DEFAULTS.seq_len)
        assert torch.equal(two, one), key  # the same global batches on 1 and 2 ranks
    inputs = on_two[0]
    assert len({tuple(row.tolist()) for row in inputs}) == len(inputs)  # no stream repeats another
    assert int(inputs.max()) < index["vocab_size"]


def fix_in(message: str) -> int:
    """The data.streams value an error message proposes."""
    return int(re.search(r"[Ss]et data\.streams=(\d+)", message).group(1))


def test_fewer_documents_than_streams_name_the_index_the_setting_and_the_fix(tmp_path, prepare_data):
    (tmp_path / "corpus").mkdir()
    for number in range(5):  # long enough that a window does not go through many epochs
        (tmp_path / "corpus" / f"{number}.txt").write_text(f"text file {number} is one document. " * 120)
    out = tmp_path / "shards"
    assert prepare_data("--input", tmp_path / "corpus", "--output", out, "--no-progress") == 0

    with pytest.raises(ValueError) as before_build:
        check_dataset(out, streams=DEFAULTS.streams, dp_size=2)
    message = str(before_build.value)
    assert str(out / "index.json") in message and "5 documents" in message
    assert f"fewer than data.streams={DEFAULTS.streams}" in message
    assert "multiple of the data-parallel size 2" in message and "add documents" in message
    with pytest.raises(ValueError) as in_loader:  # the loader keeps the check, with the same words
        loader(out, 0, 2)
    assert str(in_loader.value) == message

    streams = fix_in(message)  # the proposed setting works
    assert streams % 2 == 0 and streams <= 5
    check_dataset(out, streams=streams, dp_size=2)
    assert global_batches(out, 2, 2, streams=streams)[0].shape[0] == 2 * TRAINER.global_batch_size

    with pytest.raises(ValueError, match=r"5 documents, fewer than the 8 data-parallel ranks.*add documents"):
        check_dataset(out, streams=DEFAULTS.streams, dp_size=8)

    # the same data held out for evaluation: the messages name the evaluation's settings
    with pytest.raises(ValueError) as held_out:
        check_dataset(out, streams=DEFAULTS.streams, dp_size=2, settings=HELD_OUT)
    assert f"fewer than data.eval_streams={DEFAULTS.streams}" in str(held_out.value)
    assert "data.streams" not in str(held_out.value)
    with pytest.raises(ValueError, match=f"data.eval_path {tmp_path / 'nope'}: no such") as missing:
        check_dataset(tmp_path / "nope", streams=2, dp_size=2, settings=HELD_OUT)
    assert "--demo-mixed" in str(missing.value), "the held-out demo set is --demo-mixed's"
    with pytest.raises(ValueError, match=r"holds no index\.json") as no_index:
        check_dataset(tmp_path / "corpus", streams=2, dp_size=2, settings=HELD_OUT)
    assert "data.index" not in str(no_index.value), "data.index locates the training data's index.json only"
    # and so do the evaluation's own loaders, built when it runs (their checks are the loader's own,
    # not the start-up check's)
    with pytest.raises(ValueError, match=r"^data\.eval_path: index\.json's location .*give a local"):
        TokenLoader("pipe:cat shard-000000.tar", seq_len=8, global_batch_size=2, micro_batch_size=1,
                    settings=HELD_OUT)  # fmt: skip
    with pytest.raises(ValueError, match=r"^data\.eval_streams \(3\) must be a multiple"):
        TokenLoader(out, seq_len=8, global_batch_size=2, micro_batch_size=1, dp_size=2, streams=3,
                    settings=HELD_OUT)  # fmt: skip
    # the raw corpus given instead of its shards
    with pytest.raises(ValueError, match=f"data.path {tmp_path / 'corpus' / '0.txt'}: a file, not a shard"):
        check_dataset(tmp_path / "corpus" / "0.txt", streams=2, dp_size=2)


def test_a_missing_data_path_says_how_to_create_shards_and_the_command_works(
    tmp_path, prepare_data, monkeypatch
):
    monkeypatch.chdir(tmp_path)
    path = "data/my_corpus"
    with pytest.raises(ValueError) as missing:
        check_dataset(path, streams=1, dp_size=1)
    message = str(missing.value)
    assert f"data.path {path} (under {tmp_path}): no such directory" in message
    assert "--demo" in message
    with pytest.raises(ValueError) as in_loader:
        loader(Path(path), 0, 1, streams=1)
    assert str(in_loader.value) == message

    command = re.search(r"`python launch/prepare_data\.py ([^`]*)`", message).group(1)
    corpus = write_corpus(tmp_path / "corpus.jsonl", 20)
    arguments = [str(corpus) if word == "FILES" else word for word in shlex.split(command)]
    assert prepare_data(*arguments, "--no-progress") == 0
    check_dataset(path, streams=DEFAULTS.streams, dp_size=2)


def test_a_directory_without_index_json_is_named_with_the_fix(tmp_path):
    raw = write_corpus(tmp_path / "raw" / "corpus.jsonl", 3).parent  # the corpus, not its shards
    with pytest.raises(ValueError) as caught:
        check_dataset(raw, streams=DEFAULTS.streams, dp_size=1)
    message = str(caught.value)
    assert f"data.path {raw}: the directory holds no index.json" in message
    assert f"python launch/prepare_data.py --input FILES --output {raw}" in message
    assert "data.index" in message
    with pytest.raises(ValueError, match=rf"{re.escape(str(tmp_path / 'elsewhere.json'))}: no such index"):
        check_dataset(raw, index=tmp_path / "elsewhere.json", streams=1, dp_size=1)
