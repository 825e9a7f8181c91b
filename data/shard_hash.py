"""The sha256 digests that ``index.json`` format version 2 records, so a reader can check what it read.

Each shard entry gets ``sha256``, the digest of the whole tar file, and each member entry ``sha256``, the
digest of its payload (the ``nbytes`` bytes at ``offset``): a ranged read of one member can be checked
without fetching the rest of the shard. Version 1 sets (no digests) stay readable.
"""

from __future__ import annotations

import hashlib
import mmap
from pathlib import Path

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


def add_digests(shard: dict, path: str | Path) -> dict:
    """Set ``sha256`` on the shard entry and each of its members from the file at ``path``; returns it."""
    shard["sha256"], parts = shard_digests(path, shard["members"])
    for member, digest in zip(shard["members"], parts, strict=True):
        member["sha256"] = digest
    return shard
