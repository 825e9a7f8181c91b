"""The sha256 digests that ``index.json`` format version 2 records, so a reader can check what it read.

Each shard entry gets ``sha256``, the digest of the whole tar file, and each member entry ``sha256``, the
digest of its payload (the ``nbytes`` bytes at ``offset``): a ranged read of one member can be checked
without fetching the rest of the shard. Version 1 sets (no digests) stay readable.
"""

from __future__ import annotations

import hashlib
import mmap
from pathlib import Path
from typing import BinaryIO

import fsspec
from fsspec.implementations.local import LocalFileSystem

FORMAT_VERSION = 2
READABLE_FORMAT_VERSIONS = (1, 2)  # what data.prepare merge accepts as parts


def shard_digests(path: str | Path, members: list[dict]) -> tuple[str, list[str]]:
    """(sha256 of the file, sha256 of each member's payload) from one memory map of the file."""
    with open(path, "rb") as fh, mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as mapped:
        view = memoryview(mapped)
        try:
            whole = hashlib.sha256(view).hexdigest()
            parts = [hashlib.sha256(view[m["offset"] : m["offset"] + m["nbytes"]]).hexdigest() for m in members]
        finally:
            view.release()  # the map cannot close while a view of it is alive
    return whole, parts


def stream_digests(fh: BinaryIO, members: list[dict], chunk: int = 8 << 20) -> tuple[str, list[str]]:
    """:func:`shard_digests` from one sequential read of a file object (a remote shard is read once)."""
    whole, parts = hashlib.sha256(), [hashlib.sha256() for _ in members]
    spans = sorted(((m["offset"], m["offset"] + m["nbytes"], h) for m, h in zip(members, parts, strict=True)),
                   key=lambda span: span[0])
    pos = 0
    while block := fh.read(chunk):
        whole.update(block)
        end = pos + len(block)
        for lo, hi, h in spans:
            if lo < end and hi > pos:
                h.update(block[max(lo, pos) - pos : min(hi, end) - pos])
        pos = end
    return whole.hexdigest(), [h.hexdigest() for h in parts]


def add_digests(shard: dict, path: str | Path, fs: fsspec.AbstractFileSystem | None = None) -> dict:
    """Set ``sha256`` on the shard entry and each of its members from the file at ``path`` (in ``fs`` when
    given and not local); returns it."""
    if fs is None or isinstance(fs, LocalFileSystem):
        shard["sha256"], parts = shard_digests(path, shard["members"])
    else:
        with fs.open(str(path), "rb") as fh:
            shard["sha256"], parts = stream_digests(fh, shard["members"])
    for member, digest in zip(shard["members"], parts, strict=True):
        member["sha256"] = digest
    return shard
