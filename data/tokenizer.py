"""Train and load sentencepiece tokenizers.

    python -m data.tokenizer train --corpus shakespeare --vocab-size 8000 --out artifacts/tokenizer/shakespeare
    python -m data.tokenizer train --input DIR_OR_FILES... --out PREFIX --model-type unigram --code
    python -m data.tokenizer info artifacts/tokenizer/shakespeare.model

Special ids are fixed for every tokenizer this module trains:

    unk = 0, bos = 1, eos = 2, pad = 3, then "\\n" (a user-defined piece, so line breaks survive)

``byte_fallback`` is always on: characters outside the vocabulary become UTF-8 byte pieces
instead of ``<unk>``. ``--code`` keeps whitespace verbatim (identity normalisation, no
whitespace collapsing, whitespace-only pieces, no dummy prefix), so ``decode(encode(s)) == s``
for source code. Prose tokenizers normalise (NFKC, collapse repeated spaces) but keep newlines.
Training is deterministic: the same input and options give a byte-identical model file (the
model file records only the basename of ``--out``, so its hash does not depend on the directory).
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import sentencepiece as spm
from sentencepiece import sentencepiece_model_pb2

from data.corpus import InputFile, corpus_inputs, expand_inputs, is_code_corpus, iter_documents
from data.remote import sha256_file

UNK_ID, BOS_ID, EOS_ID, PAD_ID = 0, 1, 2, 3
NEWLINE_PIECE = "\n"
TRAIN_SEED = 1234  # sentencepiece's sampling seed (used only when --max-sentences subsamples)


def _default_make_command(prefix: Path) -> str:
    return f"python -m data.tokenizer train --corpus shakespeare --vocab-size 8000 --out {prefix}"


def model_path_for(out: str | Path) -> Path:
    """``--out`` as a model file: ``X.model`` stays, a directory gets ``DIR/tokenizer.model``, else ``X.model``."""
    out = Path(out)
    if out.suffix == ".model":
        return out
    if out.is_dir() or str(out).endswith(("/", "\\")):
        return out / "tokenizer.model"
    return out.with_name(out.name + ".model")


class Tokenizer:
    """A loaded sentencepiece model with the ids and batch encoding the data pipeline needs."""

    def __init__(self, processor: spm.SentencePieceProcessor, path: Path):
        self._sp = processor
        self.path = path
        self.sha256 = sha256_file(Path(path))

    @classmethod
    def load(cls, path: str | Path) -> Tokenizer:
        path = Path(path)
        if path.suffix != ".model" and not path.is_file() and path.with_name(path.name + ".model").is_file():
            path = path.with_name(path.name + ".model")
        if not path.is_file():
            prefix = path.with_suffix("") if path.suffix == ".model" else path
            raise FileNotFoundError(
                f"tokenizer model {path} not found; create it with: {_default_make_command(prefix)}"
            )
        return cls(spm.SentencePieceProcessor(model_file=str(path)), path)

    @property
    def vocab_size(self) -> int:
        return self._sp.get_piece_size()

    @property
    def bos_id(self) -> int:
        return self._sp.bos_id()

    @property
    def eos_id(self) -> int:
        return self._sp.eos_id()

    @property
    def pad_id(self) -> int:
        return self._sp.pad_id()

    @property
    def unk_id(self) -> int:
        return self._sp.unk_id()

    def encode_batch(self, texts: Sequence[str], num_threads: int = -1) -> list[list[int]]:
        """Encode many texts in one call (sentencepiece parallelises over the list)."""
        return self._sp.encode(list(texts), out_type=int, num_threads=num_threads)

    def encode(self, text: str) -> list[int]:
        return self._sp.encode(text, out_type=int)

    def decode(self, ids: Sequence[int]) -> str:
        return self._sp.decode([int(i) for i in ids])

    def id_to_piece(self, token_id: int) -> str:
        return self._sp.id_to_piece(int(token_id))


def _training_lines(inputs: Iterable[InputFile], jsonl_key: str) -> Iterator[str]:
    # sentencepiece trains on "sentences"; lines are the natural unit for both prose and code.
    for doc in iter_documents(inputs, jsonl_key):
        for line in doc.text.splitlines():
            if line.strip():
                yield line


def train_tokenizer(
    inputs: Sequence[InputFile],
    out: str | Path,
    *,
    vocab_size: int = 8000,
    model_type: str = "bpe",
    code: bool = False,
    max_sentences: int = 0,
    jsonl_key: str = "text",
) -> Path:
    """Train a sentencepiece model on the lines of ``inputs``; returns the ``.model`` path."""
    if model_type not in ("bpe", "unigram"):
        raise ValueError(f"--model-type {model_type!r}: choose bpe or unigram")
    min_vocab = 256 + 5  # byte pieces + unk/bos/eos/pad + newline
    if vocab_size <= min_vocab:
        raise ValueError(f"--vocab-size {vocab_size}: must exceed {min_vocab} (256 byte-fallback pieces + specials)")
    model_path = model_path_for(out)
    model_path.parent.mkdir(parents=True, exist_ok=True)
    prefix = model_path.with_suffix("")
    options: dict = {
        "model_prefix": str(prefix),
        "vocab_size": vocab_size,
        "model_type": model_type,
        "byte_fallback": True,
        "character_coverage": 0.9995,
        "unk_id": UNK_ID,
        "bos_id": BOS_ID,
        "eos_id": EOS_ID,
        "pad_id": PAD_ID,
        "user_defined_symbols": [NEWLINE_PIECE],
        "input_sentence_size": max_sentences,
        "shuffle_input_sentence": True,
        "minloglevel": 2,
    }
    if code:
        options.update(
            normalization_rule_name="identity",
            remove_extra_whitespaces=False,
            allow_whitespace_only_pieces=True,
            split_by_whitespace=False,
            add_dummy_prefix=False,
        )
    spm.set_random_generator_seed(TRAIN_SEED)
    try:
        spm.SentencePieceTrainer.train(sentence_iterator=_training_lines(inputs, jsonl_key), **options)
    except RuntimeError as exc:
        raise RuntimeError(f"sentencepiece training failed: {exc}") from None
    # The trainer records the output prefix in the model; keep only the basename so that the
    # model file (and its sha256, which prepared data records) does not depend on the directory.
    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(model_path.read_bytes())
    proto.trainer_spec.model_prefix = prefix.name
    model_path.write_bytes(proto.SerializeToString(deterministic=True))
    prefix.with_suffix(".vocab").unlink(missing_ok=True)  # human-readable copy; not needed
    return model_path


def _collect_inputs(input_paths: Sequence[str] | None, corpora: Sequence[str] | None) -> list[InputFile]:
    if bool(input_paths) == bool(corpora):
        raise SystemExit("error: give exactly one of --input PATH... or --corpus NAME...")
    if input_paths:
        return expand_inputs(input_paths)
    return [inp for name in corpora for inp in corpus_inputs(name)]


def add_input_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--input", nargs="+", help="text files, directories (recursive) or .jsonl(.gz) files")
    parser.add_argument("--corpus", nargs="+", help="bundled corpus: shakespeare, python-docs, python-stdlib")
    parser.add_argument("--jsonl-key", default="text", help="field of jsonl records holding the text")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m data.tokenizer", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    train = sub.add_parser("train", help="train a sentencepiece model")
    add_input_arguments(train)
    train.add_argument("--out", required=True, help="model prefix (writes PREFIX.model) or an existing directory")
    train.add_argument("--vocab-size", type=int, default=8000)
    train.add_argument("--model-type", choices=("bpe", "unigram"), default="bpe")
    train.add_argument("--code", action="store_true", help="keep whitespace verbatim (default on for code corpora)")
    train.add_argument("--max-sentences", type=int, default=0, help="subsample this many lines (0 = all)")
    info = sub.add_parser("info", help="print a model's vocab size, special ids and sha256")
    info.add_argument("model")
    args = parser.parse_args(argv)

    if args.command == "info":
        tok = Tokenizer.load(args.model)
        print(f"{tok.path}: vocab_size={tok.vocab_size} unk={tok.unk_id} bos={tok.bos_id} eos={tok.eos_id} "
              f"pad={tok.pad_id} sha256={tok.sha256}")
        return 0

    inputs = _collect_inputs(args.input, args.corpus)
    code = args.code or bool(args.corpus and all(is_code_corpus(name) for name in args.corpus))
    start = time.perf_counter()
    model_path = train_tokenizer(
        inputs, args.out, vocab_size=args.vocab_size, model_type=args.model_type, code=code,
        max_sentences=args.max_sentences, jsonl_key=args.jsonl_key,
    )
    tok = Tokenizer.load(model_path)
    print(f"wrote {model_path} ({args.model_type}, vocab {tok.vocab_size}, code={code}, {len(inputs)} files, "
          f"{time.perf_counter() - start:.1f}s) sha256={tok.sha256}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    from data.cli import run_cli

    run_cli(main)
