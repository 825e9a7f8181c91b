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

Bytes altered inside a member's payload go unnoticed: ``index.json`` records no payload hashes.
"""

from __future__ import annotations

import hashlib
import json
import struct
import sys
import tarfile
from pathlib import Path

import numpy as np

INDEX_NAME = "index.json"
SUPPORTED_FORMAT_VERSIONS = (1, 2)
ON_ERROR_CHOICES = ("raise", "skip")
_PROBES = 16  # hashed replacement attempts before the scan; each hits a bad shard with its share of bad samples
_U64 = (1 << 64) - 1


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


class TokenSource:
    """Random access to one split of a prepared directory through memory-mapped tar shards."""

    def __init__(self, path: str | Path, split: str, key: str = "data.sources[0].path", on_error: str = "raise"):
        if on_error not in ON_ERROR_CHOICES:
            raise DataConfigError("data.on_error", f"{on_error!r} must be {' or '.join(ON_ERROR_CHOICES)}")
        self.path, self.split, self.on_error = Path(path), split, on_error
        index_bytes = (self.path / INDEX_NAME).read_bytes()
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
        self.shard_paths = [self.path / s["path"] for s in shards]
        members = [(i, m) for i, s in enumerate(shards) for m in s["members"]]
        self._member_shard = np.array([i for i, _ in members], dtype=np.int64)
        self._member_offset = np.array([m["offset"] for _, m in members], dtype=np.int64)
        self._member_tokens = np.array([m["tokens"] for _, m in members], dtype=np.int64)
        self._member_names = [m["name"] for _, m in members]
        self._member_start = np.concatenate([[0], np.cumsum(self._member_tokens)])
        # Stream position just past each shard's last token (members are in stream order, shard by shard).
        self._shard_end = self._member_start[np.searchsorted(self._member_shard, np.arange(len(shards)), "right")]
        self.num_tokens = int(self._member_start[-1])
        self._shard_bytes: list[int] = []
        self.bad_shards: dict[int, str] = {}  # shard id -> cause, as found by this process (or its parent)
        self._maps: dict[int, np.ndarray] = {}
        for shard_id, (shard_path, shard) in enumerate(zip(self.shard_paths, shards, strict=True)):
            end = max((m["offset"] + m["nbytes"] for m in shard["members"]), default=0)
            self._shard_bytes.append(int(shard.get("bytes", end)))
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
        state = self.__dict__.copy()
        state["_maps"] = {}  # memory maps are per process: each DataLoader worker opens its own
        return state

    def _bad(self, shard_id: int, kind: str, why: str) -> None:
        """Raise (on_error=raise) or record and warn once (on_error=skip) that a shard is unusable."""
        fix = f"restore the file or re-run {prepare_hint(self.path)}"
        line = f"{kind} shard {self.shard_paths[shard_id]} ({why}); {fix}"
        if self.on_error == "raise":
            raise RuntimeError(line)
        if shard_id not in self.bad_shards:
            self.bad_shards[shard_id] = why
            print(f"warning: data.on_error=skip replaces the samples that overlap {line}", file=sys.stderr, flush=True)

    def num_samples(self, seq_len: int) -> int:
        return max(0, (self.num_tokens - 1) // seq_len)

    def _shard(self, shard_id: int) -> np.ndarray | None:
        """The shard's bytes, checked once per process; None when the shard is bad (on_error=skip)."""
        if shard_id in self.bad_shards:
            return None
        mapped = self._maps.get(shard_id)
        if mapped is not None:
            return mapped
        try:
            mapped = np.memmap(self.shard_paths[shard_id], dtype=np.uint8, mode="r")
        except (OSError, ValueError) as exc:  # ValueError: numpy refuses to map an empty file
            self._bad(shard_id, "unreadable", f"{type(exc).__name__}: {getattr(exc, 'strerror', None) or exc}")
            return None
        if len(mapped) != self._shard_bytes[shard_id]:
            self._bad(shard_id, "corrupt or truncated", f"{len(mapped)} bytes on disk, index expects "
                                                        f"{self._shard_bytes[shard_id]}")
            return None
        # Each member's tar header: a shard rewritten or damaged since index.json was written must not
        # feed the model the wrong bytes.
        for m in np.flatnonzero(self._member_shard == shard_id):
            offset, name = int(self._member_offset[m]), self._member_names[m]
            nbytes = int(self._member_tokens[m]) * self.dtype.itemsize
            try:
                info = tarfile.TarInfo.frombuf(bytes(mapped[offset - 512 : offset]), "utf-8", "surrogateescape")
            except (tarfile.HeaderError, ValueError) as exc:
                self._bad(shard_id, "corrupt or truncated", f"bad tar header for {name}: {exc}")
                return None
            if info.name != name or info.size != nbytes:
                self._bad(shard_id, "corrupt or truncated", f"member at byte {offset} is {info.name} ({info.size} "
                                                            f"bytes), index expects {name} ({nbytes} bytes)")
                return None
        self._maps[shard_id] = mapped
        return mapped

    def _last_bad_shard(self, index: int, seq_len: int) -> int | None:
        """The last bad shard that sample ``index``'s window (seq_len + 1 tokens) overlaps, else None."""
        start = index * seq_len
        first, last = np.searchsorted(self._member_start, [start, start + seq_len], side="right") - 1
        shards = range(int(self._member_shard[first]), int(self._member_shard[last]) + 1)
        bad = [s for s in shards if self._shard(s) is None]  # checks every shard, so each verdict is reached
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
        names = ", ".join(self.shard_paths[s].name for s in sorted(self.bad_shards))
        raise RuntimeError(f"no sample of {self.path} ({self.split}) avoids its bad shards ({names}); "
                           f"restore the files or re-run {prepare_hint(self.path)}")

    def resolve_many(self, indices: np.ndarray, seq_len: int, seed: int, sample_ids: np.ndarray) -> np.ndarray:
        """:meth:`resolve` of each sample; checks each shard the windows overlap once, vectorised."""
        starts = np.asarray(indices, dtype=np.int64) * seq_len
        first, last = (self._member_shard[np.searchsorted(self._member_start, starts + d, side="right") - 1]
                       for d in (0, seq_len))
        spanned = {int(s) for f, lst in zip(first[last - first > 1], last[last - first > 1], strict=True)
                   for s in range(f + 1, lst)}  # only windows longer than a shard
        for shard_id in set(first.tolist()) | set(last.tolist()) | spanned:
            self._shard(shard_id)  # reaches the verdict (under on_error=raise, raises on a bad shard)
        out = np.array(indices, dtype=np.int64)
        if not self.bad_shards:
            return out
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
            first = int(self._member_offset[member]) + within * self.dtype.itemsize
            shard_id = int(self._member_shard[member])
            mapped = self._shard(shard_id)
            if mapped is None:
                raise RuntimeError(f"read of tokens [{start}, {start + length}) of {self.path} reaches the bad "
                                   f"shard {self.shard_paths[shard_id]}; read samples through resolve()")
            out[filled : filled + take] = mapped[first : first + take * self.dtype.itemsize].view(self.dtype)
            filled, pos, member = filled + take, pos + take, member + 1
        return out
