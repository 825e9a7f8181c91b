"""Documents from user inputs: text files, jsonl (plain, gzip, zstandard) and parquet, local or remote.

An input is a local path or an fsspec URL (``s3://bucket/prefix``, ``https://host/file.jsonl.zst``, ...);
files are read as streams through fsspec, never downloaded whole first. A directory or URL prefix
contributes its non-hidden files, sorted by relative path (http(s) URLs name single files: a web server
has no standard listing). Formats, by file name:

- ``*.jsonl``, ``*.jsonl.gz``, ``*.jsonl.zst``: each non-blank line is a record, ``record[jsonl_key]`` its text;
- ``*.parquet``: each row is a record, the ``parquet_column`` column its text, read one row group at a time;
- anything else: the whole file is one document (binary files and other ``.gz``/``.zst`` files are skipped
  inside directories).

Parquet needs random access (its footer first): over http(s) the server must answer range requests, as nginx
and object stores do.

Document ids decide the train/val split, so they do not depend on where the data lives nor on how it is
encoded: a text file's id is its path relative to the input root (its name, for a file named directly); a
record's is that path without the record-format suffix plus ``:N``, the record's number from 1. The same
records as ``a.jsonl``, ``a.jsonl.zst`` or ``a.parquet``, local or remote, are the same documents.
Credentials for remote inputs come from the environment (standard AWS variables for ``s3://``).
"""

from __future__ import annotations

import gzip
import io
import json
import posixpath
from collections.abc import Iterable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path

import fsspec

from data.remote import is_url

JSONL_SUFFIXES = (".jsonl", ".jsonl.gz", ".jsonl.zst")
PARQUET_SUFFIXES = (".parquet",)
RECORD_SUFFIXES = JSONL_SUFFIXES + PARQUET_SUFFIXES
_COMPRESSED = (".gz", ".zst")
_PARQUET_BATCH_ROWS = 1024  # rows decoded at a time within a row group
# A fresh fsspec filesystem per use: a cached one keeps the endpoint and credentials of when it was made.
_FRESH = {"skip_instance_cache": True}


@dataclass(frozen=True)
class InputFile:
    """A file to read documents from: a local path or a URL. ``name`` is its id prefix (relative path)."""

    path: Path | str
    name: str

    @property
    def filename(self) -> str:
        return posixpath.basename(self.path) if is_url(self.path) else Path(self.path).name

    @property
    def is_jsonl(self) -> bool:
        return self.filename.endswith(JSONL_SUFFIXES)

    @property
    def is_parquet(self) -> bool:
        return self.filename.endswith(PARQUET_SUFFIXES)

    @property
    def record_prefix(self) -> str:
        """The id prefix of this file's records: ``name`` without its record-format suffix."""
        suffix = next(s for s in RECORD_SUFFIXES if self.name.endswith(s))
        return self.name[: -len(suffix)]


@dataclass(frozen=True)
class Document:
    doc_id: str
    text: str


# ----------------------------------------------------------------------------- listing
def _wanted(filename: str, head: bytes) -> bool:
    """Whether a file found in a directory is read: record files always, text files only."""
    if filename.endswith(RECORD_SUFFIXES):
        return True
    if filename.endswith(_COMPRESSED):
        return False
    return b"\0" not in head  # the heuristic git uses: a NUL byte early in the file means binary


def _head(fs: fsspec.AbstractFileSystem, path: str) -> bytes:
    with fs.open(path, "rb") as fh:
        return fh.read(8192)


def _local_head(path: Path) -> bytes:
    with open(path, "rb") as fh:
        return fh.read(8192)


def _expand_url(url: str) -> list[InputFile]:
    fs, root = fsspec.core.url_to_fs(url, **_FRESH)
    if url.startswith(("http://", "https://")):
        return [InputFile(url, posixpath.basename(url.rstrip("/")))]
    if fs.isfile(root):
        return [InputFile(url, posixpath.basename(root))]
    if not fs.isdir(root):
        raise FileNotFoundError(f"--input {url}: no such object or prefix (check the URL and the credentials "
                                "in the environment)")
    scheme = url.split("://", 1)[0]
    root = root.rstrip("/")
    inputs = []
    for path in sorted(fs.find(root)):
        rel = path[len(root) + 1 :]
        if any(part.startswith(".") for part in rel.split("/")) or not _wanted(rel, b""):
            continue
        if not rel.endswith(RECORD_SUFFIXES) and not _wanted(rel, _head(fs, path)):
            continue
        inputs.append(InputFile(f"{scheme}://{path}", rel))
    return inputs


def expand_inputs(paths: Sequence[str | Path]) -> list[InputFile]:
    """Files or URLs named directly, plus every non-hidden text or record file under named directories or
    URL prefixes (sorted by relative path)."""
    inputs: list[InputFile] = []
    for raw in paths:
        if is_url(raw):
            found = _expand_url(str(raw))
            if not found:
                raise FileNotFoundError(f"--input {raw}: no text files found")
            inputs += found
            continue
        path = Path(raw)
        if path.is_file():
            inputs.append(InputFile(path, path.name))
        elif path.is_dir():
            for p in sorted(path.rglob("*")):
                rel = p.relative_to(path)
                if not p.is_file() or any(part.startswith(".") for part in rel.parts):
                    continue
                if _wanted(p.name, b"" if p.name.endswith(RECORD_SUFFIXES) else _local_head(p)):
                    inputs.append(InputFile(p, rel.as_posix()))
        else:
            raise FileNotFoundError(f"--input {path}: no such file or directory")
    if not inputs:
        raise FileNotFoundError(f"--input {' '.join(map(str, paths))}: no text files found")
    return inputs


# ----------------------------------------------------------------------------- reading
def _open_binary(inp: InputFile):
    if not is_url(inp.path):
        return open(inp.path, "rb")
    # A plain http(s) stream (block_size=0): sequential reads need no range requests, which not every
    # server supports; object stores read in ranged blocks (fsspec's default) as the file is consumed.
    kwargs = {"block_size": 0} if inp.path.startswith(("http://", "https://")) else {}
    return fsspec.open(str(inp.path), "rb", **kwargs, **_FRESH).open()


@contextmanager
def open_text(inp: InputFile) -> Iterator[io.TextIOWrapper]:
    """The input as a text stream (utf-8, undecodable bytes replaced, universal newlines), decompressed
    by suffix; closes every layer on exit."""
    with ExitStack() as stack:
        raw = stack.enter_context(_open_binary(inp))
        if inp.filename.endswith(".gz"):
            raw = stack.enter_context(gzip.GzipFile(fileobj=raw, mode="rb"))
        elif inp.filename.endswith(".zst"):
            import zstandard

            # read_across_frames: a file written by several compressor runs (e.g. appended) is one stream.
            raw = stack.enter_context(zstandard.ZstdDecompressor().stream_reader(raw, read_across_frames=True))
        if not hasattr(raw, "peek"):
            raw = io.BufferedReader(raw)
        yield stack.enter_context(io.TextIOWrapper(raw, encoding="utf-8", errors="replace"))


def _parquet_file(inp: InputFile, fh):
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        return pq.ParquetFile(fh)
    except (pa.ArrowException, OSError) as exc:  # ArrowInvalid for a file that is not parquet
        raise ValueError(f"{inp.path}: not a readable parquet file ({exc})") from None


def _parquet_texts(inp: InputFile, column: str) -> Iterator[str]:
    with _reading(inp), fsspec.open(str(inp.path), "rb", **_FRESH) as fh:
        pf = _parquet_file(inp, fh)
        if column not in pf.schema_arrow.names:
            raise ValueError(f"{inp.path}: no column {column!r} (columns: {', '.join(pf.schema_arrow.names)}); "
                             "pass --parquet-column NAME")
        row = 0
        for batch in pf.iter_batches(batch_size=_PARQUET_BATCH_ROWS, columns=[column]):
            for text in batch.column(0).to_pylist():
                row += 1
                if not isinstance(text, str):
                    raise ValueError(  # noqa: TRY004 (bad data, not a programming error)
                        f"{inp.path}: row {row} has no string in column {column!r} ({type(text).__name__}); "
                        "pass --parquet-column NAME")
                yield text


def _parquet_rows(inp: InputFile) -> int:
    with _reading(inp), fsspec.open(str(inp.path), "rb", **_FRESH) as fh:
        return _parquet_file(inp, fh).metadata.num_rows  # the footer only


@contextmanager
def _reading(inp: InputFile) -> Iterator[None]:
    """Turns a failed open or read of a remote input into one line naming the URL, the cause and the fix."""
    if not is_url(inp.path):
        yield
        return
    try:
        yield
    except OSError as exc:  # fsspec: FileNotFoundError for HTTP 404 / a missing key; others for the network
        url = str(inp.path).split("?", 1)[0]
        cause = "not found" if isinstance(exc, FileNotFoundError) else f"{type(exc).__name__}: {exc}"
        raise FileNotFoundError(f"--input {url}: {cause}; check the URL, that the server is reachable and the "
                                "credentials in the environment") from None


def _jsonl_lines(inp: InputFile) -> Iterator[tuple[int, str]]:
    """(line number, line) of each non-blank line."""
    with _reading(inp), open_text(inp) as fh:
        for lineno, line in enumerate(fh, 1):
            if line.strip():
                yield lineno, line


def iter_document_ids(inputs: Iterable[InputFile]) -> Iterator[str]:
    """The ids of the documents :func:`iter_documents` yields, without decoding records (a cheap pre-pass:
    a parquet file's footer, a jsonl file's lines)."""
    for inp in inputs:
        if inp.is_parquet:
            yield from (f"{inp.record_prefix}:{n}" for n in range(1, _parquet_rows(inp) + 1))
        elif inp.is_jsonl:
            yield from (f"{inp.record_prefix}:{n}" for n, _ in enumerate(_jsonl_lines(inp), 1))
        else:
            yield inp.name


def iter_documents(
    inputs: Iterable[InputFile], jsonl_key: str = "text", parquet_column: str | None = None
) -> Iterator[Document]:
    """Each text file is one document; each jsonl record or parquet row is one. ``parquet_column``
    defaults to ``jsonl_key``."""
    for inp in inputs:
        if inp.is_parquet:
            texts = _parquet_texts(inp, parquet_column or jsonl_key)
            yield from (Document(f"{inp.record_prefix}:{n}", text) for n, text in enumerate(texts, 1))
        elif inp.is_jsonl:
            for n, (lineno, line) in enumerate(_jsonl_lines(inp), 1):
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise ValueError(f"{inp.path}:{lineno}: invalid JSON ({exc.msg})") from None
                text = record.get(jsonl_key) if isinstance(record, dict) else None
                if not isinstance(text, str):
                    raise ValueError(  # noqa: TRY004 (bad data, not a programming error)
                        f"{inp.path}:{lineno}: record has no string field {jsonl_key!r}; pass --jsonl-key FIELD"
                    )
                yield Document(f"{inp.record_prefix}:{n}", text)
        else:
            with _reading(inp), open_text(inp) as fh:
                text = fh.read()
            yield Document(inp.name, text)
