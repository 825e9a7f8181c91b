"""Raw text -> tokenized webdataset shards + ``index.json``.

    python -m data.prepare --corpus shakespeare --tokenizer artifacts/tokenizer/shakespeare.model \\
        --out artifacts/data/shakespeare
    python -m data.prepare --input my_texts/ dump.jsonl.gz --tokenizer tok.model --out data/mine --val-fraction 0.01
    python -m data.prepare --input s3://corpora/web/ --tokenizer tok.model --out s3://prepared/web

Every text file, jsonl record or parquet row is a document (inputs local or at URLs: :mod:`data.inputs`; a
URL ``--out`` is staged and uploaded: :mod:`data.output`). Documents are encoded in batches, each is
followed by EOS, and the documents of a split are concatenated into one token stream. A
document goes to ``val`` when a hash of its id falls below ``--val-fraction`` (if no document
does, the one with the smallest hash does, so ``val`` is never empty for two or more documents).

The stream is cut into tar members of ``--member-tokens`` tokens (raw little-endian uint16
when the vocabulary fits, else uint32; ~1 KB of tar overhead per member, so members are
large), written with webdataset's ``ShardWriter`` as ``{split}-NNNNNN.tar``: standard
webdataset shards (key ``NNNNNNNN``, field ``tokens.u16`` / ``tokens.u32``). ``index.json``
records, per split and shard, each member's token count and the byte offset/length of its
payload inside the tar, so the loader can memory-map the tars and read any token range
directly, and (format version 2) the sha256 of each shard file and of each member's payload, so a
reader can check what it fetched (:mod:`data.shard_hash`). ``index.json`` is written last (atomically): its presence means the data is complete.
The output is byte-identical for the same input, tokenizer and options, whatever ``--workers``.

Scaling out (see :mod:`data.prepare_parallel`): ``--workers N`` encodes in N processes. ``--num-tasks T
--task-id I`` (default: the SLURM job array) makes job I of T prepare its contiguous slice of the document
order into ``DIR/part-I``; then ``python -m data.prepare merge --out DIR`` writes one ``DIR/index.json`` over
the parts whose token stream per split is exactly the single job's:

    python -m data.prepare --corpus shakespeare --tokenizer tok.model --out DIR --workers 8
    sbatch --array=0-15 --wrap "python -m data.prepare --input texts/ --tokenizer tok.model --out DIR"
    python -m data.prepare merge --out DIR
"""

from __future__ import annotations

import argparse
import hashlib
import sys
import tarfile
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import numpy as np
import webdataset as wds
from tqdm import tqdm

from data.corpus import InputFile
from data.output import Output, join, public_url
from data.prepare_parallel import (
    INDEX_NAME,
    BatchEncoder,
    counting_document_ids,
    iter_document_range,
    merge_parts,
    part_dir_name,
    task_bounds,
    task_from_env,
    write_index,
)
from data.shard_hash import FORMAT_VERSION, add_digests
from data.tokenizer import Tokenizer, _collect_inputs, add_input_arguments

SPLITS = ("train", "val")
DEFAULT_MEMBER_TOKENS = 1 << 16
DEFAULT_SHARD_TOKENS = 1 << 26  # 64M tokens (128 MB of uint16) per shard


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

    def __init__(self, out_dir: Path, split: str, dtype: np.dtype, member_tokens: int, members_per_shard: int,
                 publish: Callable[[Path], None] | None = None):
        self.out_dir, self.split, self.dtype = out_dir, split, np.dtype(dtype)
        self._publish = publish  # called with each finished shard (uploads it for a URL output)
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
        self._shards.append(add_digests({"path": path.name, "bytes": path.stat().st_size, "members": members}, path))
        if self._publish is not None:
            self._publish(path)

    def close(self) -> dict:
        if self._buffered:
            self._write_member(np.concatenate(self._buffer))
            self._buffer, self._buffered = [], 0
        if self._writer is not None:
            self._writer.close()
        return {"tokens": self.total_tokens, "documents": self.documents, "shards": self._shards}


# Only files this module writes: stale shards from a larger earlier run would otherwise linger.
SHARD_PATTERNS = tuple(f"{split}-*.tar" for split in SPLITS)


def prepare(
    inputs: Sequence[InputFile],
    tokenizer_path: str | Path,
    out_dir: str | Path,
    *,
    val_fraction: float = 0.01,
    member_tokens: int = DEFAULT_MEMBER_TOKENS,
    shard_tokens: int = DEFAULT_SHARD_TOKENS,
    jsonl_key: str = "text",
    parquet_column: str | None = None,
    progress: bool = True,
    workers: int = 1,
    task: tuple[int, int] | None = None,
    staging_dir: str | Path | None = None,
) -> dict:
    """Tokenize ``inputs`` into shards under ``out_dir``; returns the index (also written to index.json).

    ``workers`` processes encode; ``task=(I, T)`` prepares only task I's slice of the documents into
    ``out_dir/part-I`` (see :mod:`data.prepare_parallel`). ``out_dir`` may be an fsspec URL
    (:mod:`data.output`; staged under ``staging_dir``, default the system's temporary directory)."""
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"--val-fraction {val_fraction}: must be in [0, 1)")
    if member_tokens < 1 or shard_tokens < member_tokens:
        raise ValueError(f"--member-tokens {member_tokens} / --shard-tokens {shard_tokens}: need 1 <= member <= shard")
    if workers < 1:
        raise ValueError(f"--workers {workers}: must be >= 1")
    tok = Tokenizer.load(tokenizer_path)
    if task is not None:
        with Output(out_dir, staging_dir) as parent:
            parent.remove_previous(())  # a merged index over the parts goes stale now
        out_dir = join(out_dir, part_dir_name(task[0]))
    with Output(out_dir, staging_dir) as output:
        output.remove_previous(SHARD_PATTERNS)
        return _prepare_into(output, inputs, tok, tokenizer_path, val_fraction, member_tokens, shard_tokens,
                             jsonl_key, parquet_column, progress, workers, task)


def _prepare_into(
    output: Output, inputs: Sequence[InputFile], tok: Tokenizer, tokenizer_path: str | Path, val_fraction: float,
    member_tokens: int, shard_tokens: int, jsonl_key: str, parquet_column: str | None, progress: bool, workers: int,
    task: tuple[int, int] | None,
) -> dict:
    dtype = token_dtype(tok.vocab_size)

    # Every task reads all ids: the fallback val document and the ordinals are the single job's.
    doc_counts: list[int] = []
    fallback, num_docs = choose_val_ids(counting_document_ids(inputs, doc_counts), val_fraction)
    start, end = (0, num_docs) if task is None else task_bounds(*task, num_docs)
    writers = {
        split: SplitShardWriter(output.local_dir, split, dtype, member_tokens, max(1, shard_tokens // member_tokens),
                                output.publish)
        for split in SPLITS
    }
    with BatchEncoder(tok, dtype, workers) as encoder:  # before the progress bars' thread: workers may fork
        bar = tqdm(total=end - start, unit="doc", desc="encode", disable=not progress)
        written = tqdm(unit="tok", unit_scale=True, desc="write", disable=not progress)
        for doc_ids, encoded in encoder.encode(iter_document_range(inputs, doc_counts, start, end, jsonl_key, parquet_column)):
            for doc_id, tokens in zip(doc_ids, encoded, strict=True):
                if not len(tokens):
                    continue  # empty document: nothing to learn, not even an EOS
                split = "val" if doc_hash_fraction(doc_id) < val_fraction or doc_id == fallback else "train"
                writers[split].add_document(tokens)
                written.update(len(tokens))
            bar.update(len(doc_ids))
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
    if task is not None:
        index["task"] = {"id": task[0], "num_tasks": task[1], "documents": [start, end], "total_documents": num_docs}
    output.publish(write_index(output.local_dir, index))  # last: its presence means the set is complete
    return index


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
    Output(out_dir).remove_previous(SHARD_PATTERNS)
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


def _summary(index: dict) -> str:
    return ", ".join(
        f"{split}: {info['tokens']:,} tokens / {info['documents']} docs / {len(info['shards'])} shards"
        for split, info in index["splits"].items()
    )


def merge_main(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m data.prepare merge",
        description="Write DIR/index.json over the parts DIR/part-I that --num-tasks T --task-id I wrote.",
    )
    parser.add_argument("--out", required=True, help="the --out of the tasks, a directory or URL (holds part-0 ... "
                        "part-{T-1})")
    args = parser.parse_args(argv)
    index = merge_parts(args.out)
    into = join(args.out, INDEX_NAME)
    print(f"merged {len(index['parts'])} parts into {public_url(into) if '://' in str(into) else into} "
          f"({_summary(index)})", file=sys.stderr)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["merge"] or "--merge" in argv:
        return merge_main([a for a in argv[argv[:1] == ["merge"]:] if a != "--merge"])
    parser = argparse.ArgumentParser(prog="python -m data.prepare", description=__doc__.split("\n\n")[0],
                                     epilog="python -m data.prepare merge --out DIR: merge the parts of a task array")
    add_input_arguments(parser)
    parser.add_argument("--parquet-column", help="column of parquet inputs holding the text (default: --jsonl-key)")
    parser.add_argument("--tokenizer", required=True, help="sentencepiece .model file (python -m data.tokenizer)")
    parser.add_argument("--out", required=True, help="output directory or URL, e.g. s3://bucket/prefix "
                        "(shards + index.json; credentials from the environment)")
    parser.add_argument("--val-fraction", type=float, default=0.01)
    parser.add_argument("--member-tokens", type=int, default=DEFAULT_MEMBER_TOKENS, help="tokens per tar member")
    parser.add_argument("--shard-tokens", type=int, default=DEFAULT_SHARD_TOKENS, help="tokens per tar shard")
    parser.add_argument("--staging-dir", help="local directory for shards on their way to a URL --out "
                        "(default: the system's temporary directory; holds about one shard per split)")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    parser.add_argument("--workers", type=int, default=1, help="encoding processes (the output does not depend on it)")
    parser.add_argument("--num-tasks", type=int, help="split the work into T array-job tasks "
                        "(default: SLURM_ARRAY_TASK_COUNT); each writes OUT/part-I, then run: merge --out OUT")
    parser.add_argument("--task-id", type=int, help="this task, 0 <= I < T (default: the SLURM array index)")
    args = parser.parse_args(argv)

    task = task_from_env(args.num_tasks, args.task_id)
    inputs = _collect_inputs(args.input, args.corpus)
    start = time.perf_counter()
    index = prepare(
        inputs, args.tokenizer, args.out, val_fraction=args.val_fraction, member_tokens=args.member_tokens,
        shard_tokens=args.shard_tokens, jsonl_key=args.jsonl_key, parquet_column=args.parquet_column, progress=not args.quiet, workers=args.workers,
        task=task, staging_dir=args.staging_dir,
    )
    out = args.out if task is None else join(args.out, part_dir_name(task[0]))
    out = public_url(out) if "://" in str(out) else out
    print(f"wrote {out} ({index['dtype']}; {_summary(index)}) in {time.perf_counter() - start:.1f}s", file=sys.stderr)
    if task is not None:
        print(f"task {task[0]} of {task[1]} done; once all are: python -m data.prepare merge --out {args.out}",
              file=sys.stderr)
    return 0


if __name__ == "__main__":
    from data.cli import run_cli

    run_cli(main)
