"""Domain tags, from the input files to the evaluation's routing statistics.

- prepare: tagged inputs give shards of one domain each, the domain in index.json; untagged ones
  give index.json entries without the field (the format as before);
- input naming: each --domains input is a domain named after it; clashes and bad names refused;
- loader: `domain=` reads exactly that domain's documents, an unknown domain or a bad tag is refused;
- the routing KL against a direct sum over experts, and its bounds;
- the --demo-mixed split: held-out files first, then training files, by text size, same on rerun;
- the domain-routing plot draws a panel per domain.
"""

from __future__ import annotations

import gzip
import json
import math
from pathlib import Path

import numpy as np
import pytest

from data.loader import TokenLoader, index_domains
from data.mixed_demo import GZIP_EXPANSION, split_domain
from data.shards import prepare
from data.sources import InputError, SourceFile, discover_tagged_sources
from tests.unit.test_loader import EOS, make_documents, write_shard
from train.plots import DomainRouting, domain_load_ratios, domain_routing_figure, routing_kl


def write_texts(directory: Path, texts: list[str]) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    for number, text in enumerate(texts):
        (directory / f"doc{number:02d}.txt").write_text(text)
    return directory


def test_tagged_inputs_give_one_domain_a_shard(tmp_path):
    code = write_texts(tmp_path / "code", [f"def f{n}(x):\n    return x * {n}\n" for n in range(5)])
    prose = write_texts(tmp_path / "prose", [f"The {n}th sentence of plain prose." for n in range(3)])
    sources = discover_tagged_sources([code, prose])
    assert [s.domain for s in sources] == ["code"] * 5 + ["prose"] * 3
    # a shard size far above the corpus: only the change of domain closes the first shard
    result = prepare(sources, tmp_path / "tagged", shard_size_bytes=1 << 30, workers=0, progress=False)
    index = json.loads((tmp_path / "tagged" / "index.json").read_text())
    assert [(s["domain"], s["documents"]) for s in index["shards"]] == [("code", 5), ("prose", 3)]
    assert index_domains(index) == ["code", "prose"]
    assert result.documents == 8

    plain = [SourceFile(s.path, s.format) for s in sources]
    untagged = prepare(plain, tmp_path / "plain", shard_size_bytes=1 << 30, workers=0, progress=False)
    index = json.loads((tmp_path / "plain" / "index.json").read_text())
    assert len(untagged.shards) == 1 and "domain" not in index["shards"][0] and index_domains(index) == []
    # the tags are part of what the shards were built from: retagging the same files needs --overwrite
    with pytest.raises(InputError, match="source_fingerprint"):
        prepare(sources, tmp_path / "plain", shard_size_bytes=1 << 30, workers=0, progress=False)


def test_domain_names_come_from_the_inputs(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "x.txt").write_text("text")
    (tmp_path / "wiki.jsonl.gz").write_bytes(gzip.compress(b'{"text": "t"}\n'))
    sources = discover_tagged_sources([tmp_path / "a", tmp_path / "wiki.jsonl.gz"])
    assert [s.domain for s in sources] == ["a", "wiki"]
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "a.txt").write_text("text")
    with pytest.raises(InputError, match="'a' is already that of"):
        discover_tagged_sources([tmp_path / "a", tmp_path / "b" / "a.txt"])
    (tmp_path / "bad name").mkdir()
    (tmp_path / "bad name" / "y.txt").write_text("text")
    with pytest.raises(InputError, match="not a usable domain name"):
        discover_tagged_sources([tmp_path / "bad name"])


def tagged_shards(directory: Path, domains: list[str], documents: int = 6) -> dict[str, list[list[int]]]:
    """A shard per entry of `domains`, tagged; returns each domain's documents in shard order."""
    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    entries, by_domain = [], {}
    offsets = {domain: 2000 * k for k, domain in enumerate(dict.fromkeys(domains))}  # ids of its own
    for number, domain in enumerate(domains):
        docs = [np.append(doc[:-1] + offsets[domain], doc[-1]) for doc in make_documents(rng, documents)]
        entry = write_shard(directory / f"shard-{number:06d}.tar", f"s{number}", docs)
        entries.append({**entry, "domain": domain})
        by_domain.setdefault(domain, []).extend(doc.tolist() for doc in docs)
    index = {"tokenizer": "qwen2.5-72b-instruct", "vocab_size": 151665, "eos_id": EOS, "shards": entries}
    (directory / "index.json").write_text(json.dumps(index))
    return by_domain


def loader_of(path: Path, domain: str | None = None) -> TokenLoader:
    return TokenLoader(path, seq_len=8, global_batch_size=4, micro_batch_size=2, streams=2, domain=domain)


def tokens_read(loader: TokenLoader, micro_batches: int) -> set[int]:
    batches = iter(loader)
    return {token for _ in range(micro_batches) for token in next(batches)["input_ids"].flatten().tolist()}


def test_the_loader_reads_one_domain_only(tmp_path):
    by_domain = tagged_shards(tmp_path / "data", ["up", "down", "up", "down", "up"])
    for domain, documents in by_domain.items():
        own = {token for doc in documents for token in doc}
        with loader_of(tmp_path / "data", domain) as loader:
            read = tokens_read(loader, 80)  # more than the domain holds: all of it, again
        assert read == own, f"{domain}: read another domain's tokens, or not all of its own"
    with pytest.raises(ValueError, match=r"no shard of domain 'sideways' \(its domains: \['down', 'up'\]\)"):
        loader_of(tmp_path / "data", "sideways")
    index = json.loads((tmp_path / "data" / "index.json").read_text())
    index["shards"][1]["domain"] = "not ok"
    (tmp_path / "data" / "index.json").write_text(json.dumps(index))
    with pytest.raises(ValueError, match=r"shards\[1\]\.domain"):
        loader_of(tmp_path / "data")


def test_routing_kl_is_the_kl_of_each_domain_to_the_pool():
    rng = np.random.default_rng(0)
    counts = rng.integers(0, 50, size=(3, 2, 8)).astype(np.int64)
    counts[1, 0, :3] = 0  # experts a domain never uses
    got = routing_kl(counts)
    for d in range(3):
        for layer in range(2):
            pool = counts[:, layer].sum(axis=0)
            p, q = counts[d, layer] / counts[d, layer].sum(), pool / pool.sum()
            expected = sum(p_e * math.log(p_e / q_e) for p_e, q_e in zip(p, q, strict=True) if p_e > 0)
            assert got[d, layer] == pytest.approx(expected, rel=1e-12)
    same = np.tile(counts[:1], (4, 1, 1))
    np.testing.assert_allclose(routing_kl(same), 0.0, atol=1e-15)
    # two domains on disjoint halves of the experts, equal token counts: each is log 2 from the pool
    disjoint = np.zeros((2, 1, 8), np.int64)
    disjoint[0, 0, :4], disjoint[1, 0, 4:] = 10, 10
    np.testing.assert_allclose(routing_kl(disjoint), math.log(2))


def test_mixed_demo_split_takes_held_out_files_first_by_text_size(tmp_path):
    root = tmp_path / "root"
    files = []
    for number in range(20):
        path = root / f"d{number % 3}" / f"f{number:02d}.txt"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("x" * 100)
        files.append(path)
    packed = root / "page.1.gz"
    packed.write_bytes(gzip.compress(b"y" * 1000, mtime=0))
    files.append(packed)
    train, held_out = split_domain("d", root, files, train_bytes=1000, eval_bytes=300)
    sizes = [100 if s.path.suffix == ".txt" else packed.stat().st_size * GZIP_EXPANSION for s in held_out]
    assert sum(sizes[:-1]) < 300 <= sum(sizes), "held-out files until 300 bytes of text"
    assert not {s.path for s in train} & {s.path for s in held_out}
    assert all(s.domain == "d" and s.format == "txt" for s in train + held_out)
    assert [s.compression for s in train + held_out if s.path == packed] in ([], ["gz"])
    again = split_domain("d", root, list(reversed(files)), train_bytes=1000, eval_bytes=300)
    assert again == (train, held_out), "the order of the listing does not matter"


def test_the_domain_routing_plot_has_a_panel_per_domain():
    counts = np.ones((3, 4, 16))
    counts[0, :, :4] = 9.0  # domain 0 prefers experts 0-3
    ratios = domain_load_ratios(counts)
    assert ratios[0, 0, 0] > 1 > ratios[0, 0, 8] and ratios[1, 0, 0] < 1
    routing = DomainRouting(7, ("a", "b", "c"), (16, 16, 16), counts, ("0", "1", "2", "MTP 1"))
    fig = domain_routing_figure(routing)
    titles = [ax.get_title() for ax in fig.axes if ax.get_title()]
    assert [t.split(":")[0] for t in titles] == ["a", "b", "c"]
    assert float(titles[1].split()[5]) == pytest.approx(routing_kl(counts)[1].mean(), abs=5e-4)


def test_a_held_out_domain_too_small_for_the_ranks_is_refused_at_start_naming_it(tmp_path):
    """Evaluation reads each domain apart: one that cannot feed every rank is found by the start-up
    check (it stopped the run at its first evaluation, with a traceback)."""
    from data.loader import HELD_OUT, check_dataset

    tagged_shards(tmp_path / "eval", ["up", "up", "down"], documents=1)
    check_dataset(tmp_path / "eval", streams=2, dp_size=2)  # as training data: 3 documents will do
    with pytest.raises(ValueError, match=r"held-out domain 'down': .*1 document.* 2 data-parallel ranks"):
        check_dataset(tmp_path / "eval", streams=2, dp_size=2, settings=HELD_OUT)
    check_dataset(tmp_path / "eval", streams=1, dp_size=1, settings=HELD_OUT)
