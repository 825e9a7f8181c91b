"""Scaling out :mod:`data.prepare`: encoding in worker processes, array-job tasks, merging their parts.

Workers (``--workers N``): the main process reads the documents and cuts them into batches, N processes
encode the batches (sentencepiece, one thread each) and the main process takes the results back in batch
order. Split assignment, the token streams and the shard cuts are therefore exactly those of
``--workers 1``: the output is byte-identical. At most ``2 N`` batches are in flight, so memory stays bounded.

Tasks (``--num-tasks T --task-id I``, by default ``SLURM_ARRAY_TASK_COUNT`` and the array index): the
documents are numbered ``0 .. D-1`` in the order of :func:`data.inputs.iter_document_ids` (the order a
single job reads them; empty documents count too). Task ``I`` takes the contiguous ordinals
``[I * D // T, (I + 1) * D // T)`` and writes a normal prepared directory ``DIR/part-I``. Every task makes
the cheap id pre-pass over all inputs, so the train/val assignment (fallback val document included) is the
single job's. :func:`merge_parts` writes ``DIR/index.json`` listing the parts' shards per split in task
order (paths relative to ``DIR``): each split's token stream is the single job's, token for token; only
member and shard boundaries differ (a part's last member may be short), and the loader reads those from
the index. The merged index is format version 2 whatever its parts: a version 2 part's digests are copied
(its files' sizes are checked, their bytes not re-read), a version 1 part's are computed from its files.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import multiprocessing
import os
import re
from collections import deque
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Self

import fsspec
import numpy as np

from data.corpus import Document, InputFile, iter_document_ids, iter_documents
from data.output import join
from data.remote import is_url
from data.shard_hash import FORMAT_VERSION, READABLE_FORMAT_VERSIONS, add_digests
from data.source import INDEX_NAME
from data.tokenizer import Tokenizer

ENCODE_BATCH_CHARS = 4 << 20  # encode ~4 MB of text per sentencepiece call in-process (it uses all cores)
WORKER_BATCH_CHARS = 1 << 20  # smaller batches than in-process, so a small corpus still spreads over the workers
_PART_DIR = re.compile(r"part-(\d+)")


def index_bytes(index: dict) -> bytes:
    return (json.dumps(index, indent=1, sort_keys=True) + "\n").encode()


def write_index(out_dir: Path, index: dict) -> Path:
    """Write index.json atomically (it marks the prepared directory as complete)."""
    path = out_dir / INDEX_NAME
    tmp = path.with_name(f".{INDEX_NAME}.tmp{os.getpid()}")
    tmp.write_bytes(index_bytes(index))
    os.replace(tmp, path)
    return path


def part_dir_name(task_id: int) -> str:
    return f"part-{task_id}"


# ----------------------------------------------------------------------------- encoding
def batched(docs: Iterable[Document], max_chars: int) -> Iterator[list[Document]]:
    """Consecutive documents, grouped until a group holds ``max_chars`` characters."""
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


def _document_arrays(ids: list[list[int]], dtype: np.dtype, eos_id: int) -> list[np.ndarray]:
    """Each document's ids followed by EOS; an empty document stays empty (it is skipped, EOS included)."""
    return [np.array([*doc, eos_id], dtype=dtype) if doc else np.zeros(0, dtype) for doc in ids]


_worker_state: tuple[Tokenizer, np.dtype, int] | None = None


def _init_worker(tokenizer_path: str, dtype: str, eos_id: int) -> None:
    global _worker_state
    _worker_state = (Tokenizer.load(tokenizer_path), np.dtype(dtype), eos_id)


def _encode_in_worker(texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """One flat array and the documents' lengths: two buffers to pickle instead of one object per document."""
    tok, dtype, eos_id = _worker_state
    docs = _document_arrays(tok.encode_batch(texts, num_threads=1), dtype, eos_id)
    lengths = np.array([len(d) for d in docs], dtype=np.int64)
    return (np.concatenate(docs) if docs else np.zeros(0, dtype)), lengths


class BatchEncoder:
    """Encodes batches of documents in order, in this process (``workers=1``) or in a pool of processes.

    Enter it before starting threads (progress bars): the pool's processes may be forked."""

    def __init__(self, tok: Tokenizer, dtype: np.dtype, workers: int = 1):
        if workers < 1:
            raise ValueError(f"--workers {workers}: must be >= 1")
        self.tok, self.dtype, self.workers = tok, np.dtype(dtype), workers
        self._pool = None

    @property
    def batch_chars(self) -> int:
        return ENCODE_BATCH_CHARS if self.workers == 1 else WORKER_BATCH_CHARS

    def __enter__(self) -> Self:
        if self.workers > 1:
            self._pool = multiprocessing.get_context().Pool(
                self.workers, initializer=_init_worker, initargs=(str(self.tok.path), self.dtype.str, self.tok.eos_id)
            )
        return self

    def __exit__(self, *exc) -> None:
        if self._pool is not None:
            self._pool.terminate()  # results are all taken (or an error is on its way): nothing to wait for
            self._pool.join()
            self._pool = None

    def encode(self, docs: Iterable[Document]) -> Iterator[tuple[list[str], list[np.ndarray]]]:
        """(document ids, token arrays with EOS) per batch, in document order."""
        if self._pool is None:
            for batch in batched(docs, self.batch_chars):
                ids = self.tok.encode_batch([doc.text for doc in batch])
                yield [doc.doc_id for doc in batch], _document_arrays(ids, self.dtype, self.tok.eos_id)
            return
        pending: deque = deque()
        for batch in batched(docs, self.batch_chars):
            pending.append(([d.doc_id for d in batch], self._pool.apply_async(_encode_in_worker, ([d.text for d in batch],))))
            if len(pending) >= 2 * self.workers:
                yield self._take(pending)
        while pending:
            yield self._take(pending)

    @staticmethod
    def _take(pending: deque) -> tuple[list[str], list[np.ndarray]]:
        doc_ids, result = pending.popleft()
        flat, lengths = result.get()
        return doc_ids, np.split(flat, np.cumsum(lengths)[:-1])


# ----------------------------------------------------------------------------- tasks
def task_from_env(
    num_tasks: int | None, task_id: int | None, env: Mapping[str, str] = os.environ
) -> tuple[int, int] | None:
    """(task id, number of tasks) from the arguments, else from a SLURM job array; None for a single job.

    The array index counts from ``SLURM_ARRAY_TASK_MIN`` in steps of ``SLURM_ARRAY_TASK_STEP`` (``--array=1-8``
    or ``--array=0-14:2`` give tasks 0..7)."""
    from_env = []
    if num_tasks is None and "SLURM_ARRAY_TASK_COUNT" in env:
        num_tasks = int(env["SLURM_ARRAY_TASK_COUNT"])
        from_env.append("SLURM_ARRAY_TASK_COUNT")
    if task_id is None and "SLURM_ARRAY_TASK_ID" in env:
        first, step = int(env.get("SLURM_ARRAY_TASK_MIN", 0)), int(env.get("SLURM_ARRAY_TASK_STEP", 1))
        task_id = (int(env["SLURM_ARRAY_TASK_ID"]) - first) // max(1, step)
        from_env.append("SLURM_ARRAY_TASK_ID")
    if num_tasks is None and task_id is None:
        return None
    source = f" (from {', '.join(from_env)})" if from_env else ""
    if num_tasks is None or task_id is None:
        missing = "--num-tasks T" if num_tasks is None else "--task-id I"
        raise ValueError(f"a task of an array job needs both --num-tasks and --task-id{source}; pass {missing}")
    if num_tasks < 1 or not 0 <= task_id < num_tasks:
        raise ValueError(f"--task-id {task_id} / --num-tasks {num_tasks}{source}: need 0 <= task id < number of tasks")
    return task_id, num_tasks


def task_bounds(task_id: int, num_tasks: int, num_docs: int) -> tuple[int, int]:
    """The document ordinals ``[start, end)`` of task ``task_id`` of ``num_tasks``."""
    return task_id * num_docs // num_tasks, (task_id + 1) * num_docs // num_tasks


def counting_document_ids(inputs: Sequence[InputFile], counts: list[int]) -> Iterator[str]:
    """:func:`iter_document_ids`, appending each input's document count to ``counts`` once it is read."""
    for inp in inputs:
        n = 0
        for doc_id in iter_document_ids([inp]):
            n += 1
            yield doc_id
        counts.append(n)


def iter_document_range(
    inputs: Sequence[InputFile], counts: Sequence[int], start: int, end: int, jsonl_key: str = "text",
    parquet_column: str | None = None,
) -> Iterator[Document]:
    """The documents with ordinals ``[start, end)``; inputs wholly outside the range are not opened."""
    pos = 0
    for inp, n in zip(inputs, counts, strict=True):
        lo, hi = max(start, pos), min(end, pos + n)
        if lo < hi:
            yield from itertools.islice(iter_documents([inp], jsonl_key, parquet_column), lo - pos, hi - pos)
        pos += n
        if pos >= end:
            return


# ----------------------------------------------------------------------------- merge
def _part_ids(fs: fsspec.AbstractFileSystem, root: str) -> list[int]:
    try:
        entries = fs.ls(root, detail=True)
    except (FileNotFoundError, NotADirectoryError):
        return []
    names = (e["name"].rstrip("/").rsplit("/", 1)[-1] for e in entries if e["type"] == "directory")
    return sorted(int(m.group(1)) for n in names if (m := _PART_DIR.fullmatch(n)))


def _size(fs: fsspec.AbstractFileSystem, path: str) -> int | None:
    try:
        return fs.size(path) if fs.isfile(path) else None
    except FileNotFoundError:
        return None


def _check_part(
    fs: fsspec.AbstractFileSystem, root: str, out_dir: str | Path, task_id: int, index: dict, ref: dict, num_tasks: int
) -> None:
    name = part_dir_name(task_id)
    task = index.get("task")
    if not task:
        raise RuntimeError(f"merge: {join(out_dir, name)} was not written by a task (no 'task' in its index.json); "
                           f"prepare it with --num-tasks {num_tasks} --task-id {task_id} --out {out_dir}")
    rerun = f"re-run task {task_id} (--num-tasks {num_tasks} --task-id {task_id} --out {out_dir}) with part-0's options"
    if task["num_tasks"] != num_tasks or task["id"] != task_id:
        raise RuntimeError(f"merge: {name} is task {task['id']} of {task['num_tasks']}, expected task {task_id} of "
                           f"{num_tasks}; {rerun}")
    sha, ref_sha = ((i.get("tokenizer") or {}).get("sha256") for i in (index, ref))
    if sha != ref_sha:
        raise RuntimeError(f"merge: {name} was tokenized with a different tokenizer than part-0 (sha256 "
                           f"{str(sha)[:12]}... vs {str(ref_sha)[:12]}...); re-run task {task_id} with "
                           f"--tokenizer {ref['tokenizer']['path']}")
    if task["total_documents"] != ref["task"]["total_documents"]:
        raise RuntimeError(f"merge: {name} read {task['total_documents']} documents, part-0 read "
                           f"{ref['task']['total_documents']}: the tasks read different inputs; re-run every task "
                           "on the same --input/--corpus")
    if index.get("format_version") not in READABLE_FORMAT_VERSIONS:
        raise RuntimeError(f"merge: {name} has format_version {index.get('format_version')!r}, this merge reads "
                           f"{' or '.join(map(str, READABLE_FORMAT_VERSIONS))}; {rerun}")
    for key in ("dtype", "member_tokens", "vocab_size", "eos_id", "bos_id", "val_fraction"):
        if index.get(key) != ref.get(key):
            raise RuntimeError(f"merge: {name} has {key} {index.get(key)!r}, part-0 has {ref.get(key)!r}; {rerun}")
    for split in ref["splits"]:
        for shard in index["splits"][split]["shards"]:
            path = join(out_dir, name, shard["path"])
            size = _size(fs, f"{root}/{name}/{shard['path']}")
            if size != shard["bytes"]:
                found = "missing" if size is None else f"{size} bytes"
                raise RuntimeError(f"merge: {path} is {found}, its index.json expects {shard['bytes']} bytes; "
                                   f"re-run task {task_id} (--num-tasks {num_tasks} --task-id {task_id} --out {out_dir})")


def merge_parts(out_dir: str | Path) -> dict:
    """Write ``out_dir/index.json`` over the complete parts ``out_dir/part-0 .. part-{T-1}``; returns it.
    ``out_dir`` may be a URL (the parts' tasks wrote there)."""
    # One code path for a directory and a URL: fsspec's local filesystem reads the directory.
    fs, root = fsspec.core.url_to_fs(str(out_dir), skip_instance_cache=True)
    root = root.rstrip("/")
    part_ids = _part_ids(fs, root)
    done = {i: f"{root}/{part_dir_name(i)}/{INDEX_NAME}" for i in part_ids}
    done = {i: p for i, p in done.items() if fs.isfile(p)}
    if not done:
        raise FileNotFoundError(f"merge: no complete part under {out_dir} (part-I/{INDEX_NAME}); run the tasks "
                                f"first: python -m data.prepare ... --num-tasks T --task-id I --out {out_dir}")
    raw = {i: fs.cat_file(p) for i, p in done.items()}
    indexes = {i: json.loads(b) for i, b in raw.items()}
    first = indexes[min(indexes)]
    num_tasks = int((first.get("task") or {}).get("num_tasks", 0)) or len(part_ids)
    missing = [i for i in range(num_tasks) if i not in indexes]
    if missing:
        names = ", ".join(part_dir_name(i) for i in missing)
        ids = " ".join(str(i) for i in missing)
        raise RuntimeError(f"merge: {names} of {num_tasks} under {out_dir} missing or incomplete (no {INDEX_NAME}); "
                           f"run --num-tasks {num_tasks} --task-id I --out {out_dir} for I in {ids}, then merge again")
    extra = [i for i in part_ids if i >= num_tasks]
    if extra:
        raise RuntimeError(f"merge: {join(out_dir, part_dir_name(extra[0]))} is not one of the {num_tasks} tasks of this "
                           "run (left from an earlier run?); delete it and merge again")
    ref = indexes[0]
    for i in range(num_tasks):
        _check_part(fs, root, out_dir, i, indexes[i], ref, num_tasks)

    # A stale merged index (or a single job's shards) must not outlive the merge, even if it fails midway.
    if fs.isfile(f"{root}/{INDEX_NAME}"):
        fs.rm_file(f"{root}/{INDEX_NAME}")
    stale = sorted({p for split in ref["splits"] for p in fs.glob(f"{root}/{split}-*.tar")})
    if stale:
        fs.rm(stale)
    splits = {}
    for split in ref["splits"]:
        parts = [indexes[i]["splits"][split] for i in range(num_tasks)]
        shards = [{**shard, "path": f"{part_dir_name(i)}/{shard['path']}"}
                  for i, p in enumerate(parts) for shard in p["shards"]]
        for shard in shards:
            if "sha256" not in shard:  # a version 1 part: its digests come from the files (sizes checked above)
                add_digests(shard, f"{root}/{shard['path']}", fs)
        splits[split] = {
            "tokens": sum(p["tokens"] for p in parts),
            "documents": sum(p["documents"] for p in parts),
            "shards": shards,
        }
    merged = {key: value for key, value in ref.items() if key not in ("splits", "task")}
    merged["format_version"] = FORMAT_VERSION
    merged["splits"] = splits
    merged["parts"] = [
        {"path": part_dir_name(i), "documents": indexes[i]["task"]["documents"],
         "index_sha256": hashlib.sha256(raw[i]).hexdigest()}
        for i in range(num_tasks)
    ]
    if is_url(out_dir):
        fs.pipe_file(f"{root}/{INDEX_NAME}", index_bytes(merged))  # one PUT: the object appears complete or not
    else:
        write_index(Path(out_dir), merged)
    return merged
