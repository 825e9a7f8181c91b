"""One prepared source: random access to a split's tokens through memory-mapped tar shards, and the
checks that keep a damaged shard from feeding the model the wrong bytes.

A shard is *bad* when its size differs from what ``index.json`` records (truncated, grown, missing), when
a member's tar header does not match the index (a damaged or renamed member), or when it cannot be
opened. Sizes are checked when the source opens, headers when a process first maps the shard. The
verdict comes from the file alone, so every rank and every DataLoader worker reaches the same one.

``on_error="raise"`` stops at the first bad shard with one line naming it. ``on_error="skip"`` warns
once per bad shard and process, and :meth:`TokenSource.resolve` replaces a sample whose window overlaps
a bad shard by another sample of the same source that overlaps none: hashed probes that are a pure
function of (seed, sample id, attempt), then a scan onward from the last probe. The choice depends on
nothing else, so a replaced global batch is the same at any data-parallel size and worker count.

A source may also be a URL prefix (``https://``, ``http://``, ``s3://``; ``file://`` is a local directory):
``index.json`` is fetched from there and shards go through the node's :class:`data.remote.ShardCache`. When the
source's shards fit in the cache (``data.cache_max_gb``) each shard is downloaded whole, once per node, checked
against the index (size, the shard's ``sha256`` of format version 2, member headers) and memory-mapped like a
local one. When they do not, whole-shard caching would fetch each shard again for most of its samples (the order
is a permutation of the whole source), so each *member* a sample overlaps is fetched by a ranged read of its
payload, checked (size, the member's ``sha256``; version 1 sets: its tar header) and cached: with members no
longer than ``seq_len / 2`` tokens an epoch fetches under 2x the source's bytes with a cache of a quarter of it
(measured in tests/test_data_remote_cache.py). Fetches of the shards or members the next steps need run in
background threads (:meth:`TokenSource.prefetch`). A shard that cannot be fetched after the retries is bad, like
a damaged local one. Format version 1 sets have no digests: only sizes and tar headers are checked, and bytes
altered inside a local member's payload go unnoticed.
"""

from __future__ import annotations

import hashlib
import json
import struct
import sys
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from data.remote import DataReadError, FetchSettings, Remote, ShardCache, is_remote_source, local_path
from data.source_fetch import FetchingSource, Refused

INDEX_NAME = "index.json"
SUPPORTED_FORMAT_VERSIONS = (1, 2)  # 2 adds sha256 per shard and per member
ON_ERROR_CHOICES = ("raise", "skip")
_PROBES = 16  # hashed replacement attempts before the scan; each hits a bad shard with its share of bad samples
_U64 = (1 << 64) - 1
_MEMBERS_IN_MEMORY = 256  # member payloads a process keeps decoded (member mode)


class DataConfigError(ValueError):
    """A data configuration value is invalid. ``key`` is the dotted config key to fix."""

    def __init__(self, key: str, message: str):
        self.key = key
        super().__init__(f"{key}: {message}")
        self.message = message

    def __reduce__(self):  # picklable across Hydra/submitit job boundaries
        return (type(self), (self.key, self.message))


def prepare_hint(out: Path) -> str:
    """The command that (re)writes the prepared directory ``out``."""
    return f"python -m data.prepare --input TEXT_FILES_OR_DIRS --tokenizer MODEL --out {out}"


def probe(seed: int, sample_id: int, attempt: int, num_samples: int) -> int:
    """Sample index tried by replacement ``attempt`` of ``sample_id``: uniform over [0, num_samples)."""
    key = struct.pack("<3Q", seed & _U64, sample_id & _U64, attempt & _U64)
    return int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "little") % num_samples


class TokenSource(FetchingSource):
    """Random access to one split of a prepared directory (or URL prefix) through tar shards."""

    def __init__(self, path: str | Path, split: str, key: str = "data.sources[0].path", on_error: str = "raise",
                 fetch: FetchSettings | None = None, cache_share: float = 1.0):
        if on_error not in ON_ERROR_CHOICES:
            raise DataConfigError("data.on_error", f"{on_error!r} must be {' or '.join(ON_ERROR_CHOICES)}")
        path = local_path(path) if isinstance(path, str) else path
        self.remote = Remote(path, fetch or FetchSettings()) if is_remote_source(path) else None
        self.path: Any = self.remote.url if self.remote else Path(path)
        self.split, self.on_error = split, on_error
        index_bytes = self.remote.cat(INDEX_NAME) if self.remote else (self.path / INDEX_NAME).read_bytes()
        self.index_sha256 = hashlib.sha256(index_bytes).hexdigest()
        index = json.loads(index_bytes)
        if index.get("format_version") not in SUPPORTED_FORMAT_VERSIONS:
            raise DataConfigError(key, f"{self.path}: unsupported format version {index.get('format_version')}; "
                                       f"re-run {prepare_hint(self.path)}")
        if split not in index["splits"] or index["splits"][split]["tokens"] == 0:
            raise DataConfigError(key, f"{self.path} has no {split!r} tokens (a larger --val-fraction gives val data)")
        self.index = index
        self.dtype = np.dtype(index["dtype"]).newbyteorder("<")
        self.vocab_size = int(index["vocab_size"])
        self.eos_id = int(index["eos_id"])
        self.tokenizer_sha256 = (index.get("tokenizer") or {}).get("sha256")
        shards = index["splits"][split]["shards"]
        self._shard_rel = [s["path"] for s in shards]
        self._shard_sha = [s.get("sha256") for s in shards]
        self.shard_paths = [self.remote.full(r) if self.remote else self.path / r for r in self._shard_rel]
        members = [(i, m) for i, s in enumerate(shards) for m in s["members"]]
        self._member_shard = np.array([i for i, _ in members], dtype=np.int64)
        self._member_offset = np.array([m["offset"] for _, m in members], dtype=np.int64)
        self._member_tokens = np.array([m["tokens"] for _, m in members], dtype=np.int64)
        self._member_names = [m["name"] for _, m in members]
        self._member_sha = [m.get("sha256") for _, m in members]
        self._member_start = np.concatenate([[0], np.cumsum(self._member_tokens)])
        # Stream position just past each shard's last token (members are in stream order, shard by shard).
        self._shard_end = self._member_start[np.searchsorted(self._member_shard, np.arange(len(shards)), "right")]
        self.num_tokens = int(self._member_start[-1])
        self._shard_bytes = [int(s.get("bytes", max((m["offset"] + m["nbytes"] for m in s["members"]), default=0)))
                             for s in shards]
        self.bad_shards: dict[int, str] = {}  # shard id -> cause, as found by this process (or its parent)
        self._maps: dict[int, np.ndarray] = {}
        self._members: OrderedDict[int, np.ndarray] = OrderedDict()  # member mode: recent payloads
        self._pool: ThreadPoolExecutor | None = None
        self._pool_pid = -1
        self._pending: dict[int, Future] = {}  # shard (shard mode) or member (member mode) -> its fetch
        self.mode = "local"
        if self.remote:
            settings = self.remote.settings
            self.cache = ShardCache(settings.cache_root, settings.cache_max_bytes)
            fits = sum(self._shard_bytes) <= settings.cache_max_bytes * cache_share
            # A pipe: command has no ranged reads: whole shards, whatever the cache holds.
            self.mode = "shard" if fits or self.remote.protocol == "pipe" else "member"
            return
        for shard_id, shard_path in enumerate(self.shard_paths):
            end = max((m["offset"] + m["nbytes"] for m in shards[shard_id]["members"]), default=0)
            if not shard_path.is_file():
                self._bad(shard_id, "missing", "listed in index.json, not on disk")
            elif (size := shard_path.stat().st_size) < end or size != self._shard_bytes[shard_id]:
                self._bad(shard_id, "corrupt or truncated", f"{size} bytes on disk, index expects "
                                                            f"{self._shard_bytes[shard_id]}")
        if len(self.bad_shards) == len(shards):
            first = next(iter(self.bad_shards))
            raise RuntimeError(f"every shard of {self.path} ({split}) is bad, e.g. {self.shard_paths[first]} "
                               f"({self.bad_shards[first]}); restore the files or re-run {prepare_hint(self.path)}")

    def __getstate__(self) -> dict:
        # Memory maps, threads and their fetches are per process: each DataLoader worker makes its own.
        return self.__dict__ | {"_maps": {}, "_members": OrderedDict(), "_pool": None, "_pool_pid": -1, "_pending": {}}

    def _bad(self, shard_id: int, kind: str, why: str) -> None:
        """Raise (on_error=raise) or record and warn once (on_error=skip) that a shard is unusable."""
        fix = (f"restore the file or re-run {prepare_hint(self.path)}" if kind != "unreachable" else
               "check the URL, the server and the credentials in the environment, or set data.on_error=skip")
        line = f"{kind} shard {self.shard_paths[shard_id]} ({why}); {fix}"
        if self.on_error == "raise":
            raise DataReadError(line)
        if shard_id not in self.bad_shards:
            self.bad_shards[shard_id] = why
            print(f"warning: data.on_error=skip replaces the samples that overlap {line}", file=sys.stderr, flush=True)

    def num_samples(self, seq_len: int) -> int:
        return max(0, (self.num_tokens - 1) // seq_len)

    # -- checking and mapping (fetching: data.source_fetch)
    def _shard(self, shard_id: int) -> np.ndarray | None:
        """The shard's bytes, checked once per process; None when the shard is bad (on_error=skip)."""
        if shard_id in self.bad_shards:
            return None
        mapped = self._maps.get(shard_id)
        if mapped is not None:
            return mapped
        file = self.shard_paths[shard_id]
        if self.remote is not None:
            file = self._fetch_or_bad(shard_id, shard_id, self._fetch_shard)
            if file is None:
                return None
        try:
            try:
                mapped = np.memmap(file, dtype=np.uint8, mode="r")
            except FileNotFoundError:
                if self.remote is None:
                    raise
                # Evicted by another process (another run sharing the cache) since it was fetched: fetch again.
                mapped = np.memmap(self._fetch_or_bad(shard_id, shard_id, self._fetch_shard), dtype=np.uint8, mode="r")
        except (OSError, ValueError, TypeError) as exc:  # ValueError: numpy refuses to map an empty file
            self._bad(shard_id, "unreadable", f"{type(exc).__name__}: {getattr(exc, 'strerror', None) or exc}")
            return None
        if len(mapped) != self._shard_bytes[shard_id]:
            self._bad(shard_id, "corrupt or truncated", f"{len(mapped)} bytes on disk, index expects "
                                                        f"{self._shard_bytes[shard_id]}")
            return None
        # Each member's tar header: a shard rewritten or damaged since index.json was written must not
        # feed the model the wrong bytes.
        for m in np.flatnonzero(self._member_shard == shard_id):
            offset = int(self._member_offset[m])
            try:
                self._check_header(int(m), bytes(mapped[offset - 512 : offset]))
            except Refused as exc:
                self._bad(shard_id, exc.kind, exc.why)
                return None
        self._maps[shard_id] = mapped
        return mapped

    def _payload(self, m: int) -> np.ndarray | None:
        """Member ``m``'s payload bytes; None when its shard is bad (on_error=skip)."""
        shard_id = int(self._member_shard[m])
        if self.mode != "member":
            mapped = self._shard(shard_id)
            offset = int(self._member_offset[m])
            return None if mapped is None else mapped[offset : offset + self._member_nbytes(m)]
        if shard_id in self.bad_shards:
            return None
        payload = self._members.get(m)
        if payload is None:
            for _ in range(2):  # a cached file can be evicted by another process between fetch and read
                file = self._fetch_or_bad(shard_id, m, self._fetch_member)
                if file is None:
                    return None
                try:
                    payload = np.fromfile(file, dtype=np.uint8)
                    break
                except FileNotFoundError:
                    continue
            if payload is None:
                raise DataReadError(f"member {self._member_names[m]} of {self.shard_paths[shard_id]} left the cache "
                                    f"{self.cache.root} as soon as it was fetched; raise data.cache_max_gb")
            self._members[m] = payload
            if len(self._members) > _MEMBERS_IN_MEMORY:
                self._members.popitem(last=False)
        self._members.move_to_end(m)
        return payload

    def _check_windows(self, starts: np.ndarray, length: int) -> None:
        """Reach the verdict on every shard the windows overlap (under on_error=raise, raise on a bad one). In
        member mode that means fetching the members they overlap: the verdict is what those members showed."""
        members = self._window_members(starts, length)
        if self.mode == "member":
            for m in members:
                self._payload(m)
        else:
            for shard_id in sorted({int(self._member_shard[m]) for m in members}):
                self._shard(shard_id)

    def _last_bad_shard(self, index: int, seq_len: int) -> int | None:
        """The last bad shard that sample ``index``'s window (seq_len + 1 tokens) overlaps, else None."""
        start = index * seq_len
        self._check_windows(np.array([start]), seq_len + 1)
        first, last = np.searchsorted(self._member_start, [start, start + seq_len], side="right") - 1
        bad = [s for s in range(int(self._member_shard[first]), int(self._member_shard[last]) + 1)
               if s in self.bad_shards]
        return bad[-1] if bad else None

    def resolve(self, index: int, seq_len: int, seed: int, sample_id: int) -> int:
        """``index`` when its window overlaps no bad shard; else the replacement, a sample of this source
        that overlaps none, fixed by (seed, sample_id) and the shard files."""
        num_samples = self.num_samples(seq_len)
        candidate = index
        for attempt in range(1, _PROBES + 1):
            if self._last_bad_shard(candidate, seq_len) is None:
                return candidate
            candidate = probe(seed, sample_id, attempt, num_samples)
        # The samples from a candidate up to the end of the bad shard it overlaps all overlap that shard: jump past.
        for _ in range(len(self.shard_paths) + 2):
            bad = self._last_bad_shard(candidate, seq_len)
            if bad is None:
                return candidate
            candidate = -(-int(self._shard_end[bad]) // seq_len)
            candidate = 0 if candidate >= num_samples else candidate
        names = ", ".join(self._shard_rel[s] for s in sorted(self.bad_shards))
        raise RuntimeError(f"no sample of {self.path} ({self.split}) avoids its bad shards ({names}); "
                           f"restore the files or re-run {prepare_hint(self.path)}")

    def resolve_many(self, indices: np.ndarray, seq_len: int, seed: int, sample_ids: np.ndarray) -> np.ndarray:
        """:meth:`resolve` of each sample; checks each shard the windows overlap once."""
        starts = np.asarray(indices, dtype=np.int64) * seq_len
        self._check_windows(starts, seq_len + 1)
        out = np.array(indices, dtype=np.int64)
        if not self.bad_shards:
            return out
        first, last = (self._member_shard[np.searchsorted(self._member_start, starts + d, side="right") - 1]
                       for d in (0, seq_len))
        bad_before = np.concatenate([[0], np.cumsum(np.isin(np.arange(len(self.shard_paths)), list(self.bad_shards)))])
        for row in np.flatnonzero(bad_before[last + 1] > bad_before[first]):  # windows that overlap a bad shard
            out[row] = self.resolve(int(out[row]), seq_len, seed, int(sample_ids[row]))
        return out

    def read(self, start: int, length: int) -> np.ndarray:
        """Tokens ``[start, start + length)`` of the split's stream, across member boundaries."""
        out = np.empty(length, dtype=np.int64)
        member = int(np.searchsorted(self._member_start, start, side="right")) - 1
        pos, filled = start, 0
        while filled < length:
            within = pos - int(self._member_start[member])
            take = min(length - filled, int(self._member_tokens[member]) - within)
            payload = self._payload(member)
            if payload is None:
                raise RuntimeError(f"read of tokens [{start}, {start + length}) of {self.path} reaches the bad "
                                   f"shard {self.shard_paths[int(self._member_shard[member])]}; read samples "
                                   "through resolve()")
            first = within * self.dtype.itemsize
            out[filled : filled + take] = payload[first : first + take * self.dtype.itemsize].view(self.dtype)
            filled, pos, member = filled + take, pos + take, member + 1
        return out
