"""Raw text -> tokenized webdataset shards + ``index.json``.

    python -m data.prepare --corpus shakespeare --tokenizer artifacts/tokenizer/shakespeare.model \\
        --out artifacts/data/shakespeare
    python -m data.prepare --input my_texts/ dump.jsonl.gz --tokenizer tok.model --out data/mine --val-fraction 0.01

Every text file (or jsonl record) is a document. Documents are encoded in batches, each is
followed by EOS, and the documents of a split are concatenated into one token stream. A
document goes to ``val`` when a hash of its id falls below ``--val-fraction`` (if no document
does, the one with the smallest hash does, so ``val`` is never empty for two or more documents).

The stream is cut into tar members of ``--member-tokens`` tokens (raw little-endian uint16
when the vocabulary fits, else uint32; ~1 KB of tar overhead per member, so members are
large), written with webdataset's ``ShardWriter`` as ``{split}-NNNNNN.tar``: standard
webdataset shards (key ``NNNNNNNN``, field ``tokens.u16`` / ``tokens.u32``). ``index.json``
records, per split and shard, each member's token count and the byte offset/length of its
payload inside the tar, so the loader can memory-map the tars and read any token range
directly. ``index.json`` is written last (atomically): its presence means the data is complete.
The output is byte-identical for the same input, tokenizer and options.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import tarfile
import time
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import numpy as np
import webdataset as wds
from tqdm import tqdm

from data.corpus import Document, InputFile, iter_document_ids, iter_documents
from data.tokenizer import Tokenizer, _collect_inputs, add_input_arguments

FORMAT_VERSION = 1
INDEX_NAME = "index.json"
SPLITS = ("train", "val")
DEFAULT_MEMBER_TOKENS = 1 << 16
DEFAULT_SHARD_TOKENS = 1 << 26  # 64M tokens (128 MB of uint16) per shard
ENCODE_BATCH_CHARS = 4 << 20  # encode ~4 MB of text per sentencepiece call


def token_dtype(vocab_size: int) -> np.dtype:
    """Little-endian uint16 when every id fits, else uint32."""
    return np.dtype("<u2") if vocab_size <= 1 << 16 else np.dtype("<u4")


def member_field(dtype: np.dtype) -> str:
    return "tokens.u16" if np.dtype(dtype).itemsize == 2 else "tokens.u32"


def doc_hash_fraction(doc_id: str) -> float:
    """A stable uniform number in [0, 1) per document id (decides its split)."""
    digest = hashlib.blake2b(doc_id.encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "little") / 2.0**64


def choose_val_ids(doc_ids: Iterable[str], val_fraction: float) -> tuple[str | None, int]:
    """One pass over the ids: (fallback val id if no hash falls below val_fraction, document count)."""
    count, any_below, best = 0, False, (2.0, None)
    for doc_id in doc_ids:
        h = doc_hash_fraction(doc_id)
        count += 1
        any_below |= h < val_fraction
        best = min(best, (h, doc_id))
    fallback = best[1] if val_fraction > 0 and not any_below and count >= 2 else None
    return fallback, count


def index_tar_members(tar_path: Path) -> list[dict]:
    """Name, payload offset and size of every member, read back from the tar headers."""
    with tarfile.open(tar_path, "r:") as tar:
        return [{"name": m.name, "offset": m.offset_data, "nbytes": m.size} for m in tar.getmembers()]


class SplitShardWriter:
    """Buffers one split's token stream and writes it as fixed-size members into tar shards."""

    def __init__(self, out_dir: Path, split: str, dtype: np.dtype, member_tokens: int, members_per_shard: int):
        self.out_dir, self.split, self.dtype = out_dir, split, np.dtype(dtype)
        self.member_tokens, self.members_per_shard = member_tokens, members_per_shard
        self.field = member_field(self.dtype)
        self._buffer: list[np.ndarray] = []
        self._buffered = 0
        self._writer: wds.ShardWriter | None = None
        self._member_tokens: list[int] = []  # token count of each member written, in order
        self._shards: list[dict] = []
        self.documents = 0
        self.total_tokens = 0

    def add_document(self, tokens: np.ndarray) -> None:
        self.documents += 1
        self._buffer.append(tokens.astype(self.dtype, copy=False))
        self._buffered += len(tokens)
        if self._buffered >= self.member_tokens:
            # Concatenate once and cut every full member (a long document spans many members).
            stream = np.concatenate(self._buffer)
            n_full = len(stream) // self.member_tokens
            for i in range(n_full):
                self._write_member(stream[i * self.member_tokens : (i + 1) * self.member_tokens])
            rest = stream[n_full * self.member_tokens :]
            self._buffer, self._buffered = ([rest] if len(rest) else []), len(rest)

    def _write_member(self, member: np.ndarray) -> None:
        if self._writer is None:
            # An integer mtime keeps the tars byte-identical across runs and free of pax headers.
            self._writer = wds.ShardWriter(
                str(self.out_dir / f"{self.split}-%06d.tar"), maxcount=self.members_per_shard, maxsize=float("inf"),
                post=self._on_shard_done, verbose=0, encoder=False, mtime=0, user="data", group="data",
            )
        key = f"{len(self._member_tokens):08d}"
        self._writer.write({"__key__": key, self.field: np.ascontiguousarray(member).tobytes()})
        self._member_tokens.append(len(member))
        self.total_tokens += len(member)

    def _on_shard_done(self, fname: str) -> None:
        path = Path(fname)
        members = index_tar_members(path)
        first = sum(len(s["members"]) for s in self._shards)
        counts = self._member_tokens[first : first + len(members)]
        for member, count in zip(members, counts, strict=True):
            if member["nbytes"] != count * self.dtype.itemsize:
                raise RuntimeError(f"{path}: member {member['name']} has {member['nbytes']} bytes, expected {count}")
            member["tokens"] = count
        self._shards.append({"path": path.name, "bytes": path.stat().st_size, "members": members})

    def close(self) -> dict:
        if self._buffered:
            self._write_member(np.concatenate(self._buffer))
            self._buffer, self._buffered = [], 0
        if self._writer is not None:
            self._writer.close()
        return {"tokens": self.total_tokens, "documents": self.documents, "shards": self._shards}


def _batched(docs: Iterator[Document], max_chars: int) -> Iterator[list[Document]]:
    batch: list[Document] = []
    size = 0
    for doc in docs:
        batch.append(doc)
        size += len(doc.text)
        if size >= max_chars:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch


def _remove_previous_output(out_dir: Path) -> None:
    # Only files this module writes: stale shards from a larger earlier run would otherwise linger.
    (out_dir / INDEX_NAME).unlink(missing_ok=True)
    for split in SPLITS:
        for old in out_dir.glob(f"{split}-*.tar"):
            old.unlink()


def prepare(
    inputs: Sequence[InputFile],
    tokenizer_path: str | Path,
    out_dir: str | Path,
    *,
    val_fraction: float = 0.01,
    member_tokens: int = DEFAULT_MEMBER_TOKENS,
    shard_tokens: int = DEFAULT_SHARD_TOKENS,
    jsonl_key: str = "text",
    progress: bool = True,
) -> dict:
    """Tokenize ``inputs`` into shards under ``out_dir``; returns the index (also written to index.json)."""
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"--val-fraction {val_fraction}: must be in [0, 1)")
    if member_tokens < 1 or shard_tokens < member_tokens:
        raise ValueError(f"--member-tokens {member_tokens} / --shard-tokens {shard_tokens}: need 1 <= member <= shard")
    tok = Tokenizer.load(tokenizer_path)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    _remove_previous_output(out_dir)
    dtype = token_dtype(tok.vocab_size)

    fallback, num_docs = choose_val_ids(iter_document_ids(inputs), val_fraction)
    writers = {
        split: SplitShardWriter(out_dir, split, dtype, member_tokens, max(1, shard_tokens // member_tokens))
        for split in SPLITS
    }
    eos = np.array([tok.eos_id], dtype=dtype)
    bar = tqdm(total=num_docs, unit="doc", desc="encode", disable=not progress)
    written = tqdm(unit="tok", unit_scale=True, desc="write", disable=not progress)
    for batch in _batched(iter_documents(inputs, jsonl_key), ENCODE_BATCH_CHARS):
        encoded = tok.encode_batch([doc.text for doc in batch])
        for doc, ids in zip(batch, encoded, strict=True):
            if not ids:
                continue  # empty document: nothing to learn, not even an EOS
            split = "val" if doc_hash_fraction(doc.doc_id) < val_fraction or doc.doc_id == fallback else "train"
            writers[split].add_document(np.concatenate([np.asarray(ids, dtype=dtype), eos]))
            written.update(len(ids) + 1)
        bar.update(len(batch))
    bar.close()
    written.close()

    index = {
        "format": "token-webdataset",
        "format_version": FORMAT_VERSION,
        "dtype": dtype.name,
        "byteorder": "little",
        "member_field": member_field(dtype),
        "vocab_size": tok.vocab_size,
        "eos_id": tok.eos_id,
        "bos_id": tok.bos_id,
        "tokenizer": {"path": str(tokenizer_path), "sha256": tok.sha256},
        "member_tokens": member_tokens,
        "val_fraction": val_fraction,
        "splits": {split: writer.close() for split, writer in writers.items()},
    }
    write_index(out_dir, index)
    return index


def write_index(out_dir: Path, index: dict) -> Path:
    """Write index.json atomically (it marks the prepared directory as complete)."""
    path = out_dir / INDEX_NAME
    tmp = path.with_name(f".{INDEX_NAME}.tmp{os.getpid()}")
    tmp.write_text(json.dumps(index, indent=1, sort_keys=True) + "\n")
    os.replace(tmp, path)
    return path


def write_token_shards(
    out_dir: str | Path,
    splits: dict[str, Iterable[np.ndarray]],
    *,
    vocab_size: int,
    eos_id: int = -1,
    member_tokens: int = DEFAULT_MEMBER_TOKENS,
    shard_tokens: int = DEFAULT_SHARD_TOKENS,
) -> dict:
    """Write already-tokenized documents (one array per document, EOS included if wanted) as a
    prepared directory; the same format as :func:`prepare`, with no tokenizer recorded."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    _remove_previous_output(out_dir)
    dtype = token_dtype(vocab_size)
    result = {}
    for split in SPLITS:
        writer = SplitShardWriter(out_dir, split, dtype, member_tokens, max(1, shard_tokens // member_tokens))
        for doc in splits.get(split, ()):
            doc = np.asarray(doc)
            if doc.size and (doc.min() < 0 or doc.max() >= vocab_size):
                raise ValueError(f"token ids must be in [0, {vocab_size})")
            writer.add_document(doc)
        result[split] = writer.close()
    index = {
        "format": "token-webdataset", "format_version": FORMAT_VERSION, "dtype": dtype.name, "byteorder": "little",
        "member_field": member_field(dtype), "vocab_size": vocab_size, "eos_id": eos_id, "bos_id": -1,
        "tokenizer": None, "member_tokens": member_tokens, "val_fraction": None, "splits": result,
    }
    write_index(out_dir, index)
    return index


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m data.prepare", description=__doc__.split("\n\n")[0])
    add_input_arguments(parser)
    parser.add_argument("--tokenizer", required=True, help="sentencepiece .model file (python -m data.tokenizer)")
    parser.add_argument("--out", required=True, help="output directory (shards + index.json)")
    parser.add_argument("--val-fraction", type=float, default=0.01)
    parser.add_argument("--member-tokens", type=int, default=DEFAULT_MEMBER_TOKENS, help="tokens per tar member")
    parser.add_argument("--shard-tokens", type=int, default=DEFAULT_SHARD_TOKENS, help="tokens per tar shard")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)

    inputs = _collect_inputs(args.input, args.corpus)
    start = time.perf_counter()
    index = prepare(
        inputs, args.tokenizer, args.out, val_fraction=args.val_fraction, member_tokens=args.member_tokens,
        shard_tokens=args.shard_tokens, jsonl_key=args.jsonl_key, progress=not args.quiet,
    )
    summary = ", ".join(
        f"{split}: {info['tokens']:,} tokens / {info['documents']} docs / {len(info['shards'])} shards"
        for split, info in index["splits"].items()
    )
    print(f"wrote {args.out} ({index['dtype']}; {summary}) in {time.perf_counter() - start:.1f}s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    from data.cli import run_cli

    run_cli(main)
