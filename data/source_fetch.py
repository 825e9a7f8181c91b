"""How a :class:`data.source.TokenSource` of a URL gets its bytes: whole shards or ranged member reads into the
node's :class:`data.remote.ShardCache`, each checked against ``index.json``, prefetched by a thread pool."""

from __future__ import annotations

import contextlib
import hashlib
import os
import tarfile
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from data.remote import FetchFailed, sha256_file

_MEMBERS_PER_FETCH = 16  # ranged reads per concurrent batch (member mode)


class Refused(Exception):
    """What a fetch brought (or a file holds) does not match index.json."""

    def __init__(self, kind: str, why: str):
        super().__init__(why)
        self.kind, self.why = kind, why


class FetchingSource:
    """The fetching half of :class:`data.source.TokenSource` (which sets every attribute used here)."""

    remote: Any
    cache: Any

    def _member_nbytes(self, m: int) -> int:
        return int(self._member_tokens[m]) * self.dtype.itemsize

    def _fetch_shard(self, shard_id: int) -> Path:
        """The shard's file in the node cache, downloaded and checked (size, sha256) if no process has it."""
        size, sha = self._shard_bytes[shard_id], self._shard_sha[shard_id]

        def produce(tmp: Path) -> None:
            self.remote.get(self._shard_rel[shard_id], tmp)
            if (got := tmp.stat().st_size) != size:
                raise Refused("corrupt or truncated", f"{got} bytes fetched, index expects {size}")
            if sha and (digest := sha256_file(tmp)) != sha:
                raise Refused("corrupt", f"sha256 {digest[:12]}... fetched, index expects {sha[:12]}...")

        key = f"shards/{sha}" if sha else f"v1/{self.index_sha256[:16]}/{self._shard_rel[shard_id]}"
        return self.cache.get(key, size, produce)

    def _member_range(self, m: int) -> tuple[str, int, int]:
        """(shard path, first byte, end byte) of member ``m``'s ranged read: its payload, and for version 1 sets
        (no digests) its tar header too."""
        offset = int(self._member_offset[m]) - (0 if self._member_sha[m] else 512)
        return self._shard_rel[int(self._member_shard[m])], offset, int(self._member_offset[m]) + self._member_nbytes(m)

    def _member_key(self, m: int) -> str:
        sha = self._member_sha[m]
        return f"members/{sha}" if sha else (f"v1/{self.index_sha256[:16]}/{self._shard_rel[int(self._member_shard[m])]}"
                                             f"@{int(self._member_offset[m])}")

    def _store_member(self, m: int, data: bytes | None) -> Path:
        """The member's payload in the node cache: ``data`` (fetched with others) or a ranged read of its own,
        checked (size, sha256 of version 2 or the tar header of version 1) unless a process cached it already."""
        nbytes, sha, header = self._member_nbytes(m), self._member_sha[m], 0 if self._member_sha[m] else 512

        def produce(tmp: Path) -> None:
            got = self.remote.cat(*self._member_range(m)) if data is None else data
            if len(got) != header + nbytes:
                raise Refused("corrupt or truncated", f"{len(got) - header} bytes fetched for member "
                                                       f"{self._member_names[m]}, index expects {nbytes}")
            if sha and (digest := hashlib.sha256(got).hexdigest()) != sha:
                raise Refused("corrupt", f"member {self._member_names[m]} has sha256 {digest[:12]}..., index expects "
                                          f"{sha[:12]}...")
            if header:
                self._check_header(m, got[:512])
            tmp.write_bytes(got[header:])

        return self.cache.get(self._member_key(m), nbytes, produce)

    def _fetch_member(self, m: int) -> Path:
        return self._store_member(m, None)

    def _fetch_members(self, members: list[int], futures: list[Future]) -> None:
        """Fetch ``members`` with one concurrent batch of ranged reads (fsspec's cat_ranges: a request per member
        costs a thread hand-off otherwise), then check and cache each; a failed one is fetched again on its own
        (with the retries). Two processes needing the same member at the same moment may both fetch it."""
        todo = [i for i, m in enumerate(members) if not (self.cache.root / self._member_key(m)).is_file()]
        data: list[Any] = [None] * len(members)
        if todo:
            with contextlib.suppress(Exception):  # each member is fetched again on its own below
                got = self.remote.cat_ranges([self._member_range(members[i]) for i in todo])
                for i, chunk in zip(todo, got, strict=True):
                    data[i] = chunk if isinstance(chunk, bytes) else None
        for m, chunk, future in zip(members, data, futures, strict=True):
            try:
                future.set_result(self._store_member(m, chunk))
            except BaseException as exc:  # noqa: BLE001  (handed to whoever waits for this member)
                future.set_exception(exc)

    def _fetched(self, item: int, fetch: Any) -> Path:
        """``fetch(item)``'s result: the prefetch's if one was started in this process, else fetched now."""
        future = self._pending.pop(item, None) if self._pool_pid == os.getpid() else None
        return future.result() if future is not None else fetch(item)

    def _fetch_or_bad(self, shard_id: int, item: int, fetch: Any) -> Path | None:
        try:
            return self._fetched(item, fetch)
        except Refused as exc:
            self._bad(shard_id, exc.kind, exc.why)
        except FetchFailed as exc:
            if exc.cause.startswith("HTTP 416"):  # the server has fewer bytes than index.json records
                self._bad(shard_id, "corrupt or truncated", f"{exc.cause}: shorter than index.json records")
            else:
                self._bad(shard_id, "unreachable", f"{exc.cause}, {exc.attempts} attempts")
        return None

    def prefetch(self, starts: np.ndarray, length: int) -> None:
        """Start fetching, in background threads, what reading the windows ``[start, start + length)`` needs."""
        if self.remote is None:
            return
        if self._pool is None or self._pool_pid != os.getpid():
            self._pool = ThreadPoolExecutor(self.remote.settings.fetch_threads, thread_name_prefix="shard-fetch")
            self._pool_pid, self._pending = os.getpid(), {}
        members = self._window_members(starts, length)
        if self.mode == "shard":
            todo = {int(self._member_shard[m]) for m in members} - set(self._maps) - set(self.bad_shards)
            for shard_id in sorted(todo - set(self._pending)):
                self._pending[shard_id] = self._pool.submit(self._fetch_shard, shard_id)
            return
        todo = sorted({m for m in members if m not in self._members and int(self._member_shard[m]) not in
                       self.bad_shards} - set(self._pending))
        for chunk in range(0, len(todo), _MEMBERS_PER_FETCH):
            batch = todo[chunk : chunk + _MEMBERS_PER_FETCH]
            futures = [Future() for _ in batch]
            self._pending.update(zip(batch, futures, strict=True))
            self._pool.submit(self._fetch_members, batch, futures)

    def _window_members(self, starts: np.ndarray, length: int) -> list[int]:
        starts = np.asarray(starts, dtype=np.int64)
        first = np.searchsorted(self._member_start, starts, side="right") - 1
        last = np.searchsorted(self._member_start, starts + length - 1, side="right") - 1
        return sorted({m for f, lst in zip(first.tolist(), last.tolist(), strict=True) for m in range(f, lst + 1)})

    def _check_header(self, m: int, header: bytes) -> None:
        """Raises Refused unless ``header`` is member ``m``'s tar header as index.json describes it."""
        name, nbytes = self._member_names[m], self._member_nbytes(m)
        try:
            info = tarfile.TarInfo.frombuf(header, "utf-8", "surrogateescape")
        except (tarfile.HeaderError, ValueError) as exc:
            raise Refused("corrupt or truncated", f"bad tar header for {name}: {exc}") from None
        if info.name != name or info.size != nbytes:
            raise Refused("corrupt or truncated", f"member at byte {int(self._member_offset[m])} is {info.name} "
                                                   f"({info.size} bytes), index expects {name} ({nbytes} bytes)")
