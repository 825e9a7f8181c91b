"""Prepared sets behind a URL (``https://``, ``http://``, ``s3://``, ``file://``, ``pipe:CMD``): fetching with retries,
and the per-node shard cache.

Reads go through fsspec (aiohttp for HTTP, s3fs for S3), never hand-written HTTP. ``pipe:CMD`` follows webdataset's
convention (its ``gopen`` runs the command): CMD, run by the shell with ``{}`` replaced by a file name of the prepared
set (``index.json``, ``train-000000.tar``), writes that file to stdout, e.g. ``pipe:aws s3 cp s3://bucket/set/{} -``
or ``pipe:gsutil cat gs://bucket/set/{}``; a command has no ranged reads, so such a source is read whole shard by
whole shard. Credentials are whatever the
environment gives those libraries: ``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``, ``AWS_SESSION_TOKEN``,
``AWS_PROFILE``, ``AWS_DEFAULT_REGION`` and ``AWS_ENDPOINT_URL`` (an S3-compatible server). A URL that carries
credentials itself (``https://user:pw@host``) is refused, so none can reach a config, a log or W&B.

Each fetch is tried ``1 + data.fetch_retries`` times, ``data.fetch_backoff_s * 2**k`` seconds apart; then
:class:`DataReadError` says, in one line, which URL and why (HTTP status, no such key, connection error,
timeout).

:class:`ShardCache` is a directory shared by every process of a node (ranks and DataLoader workers): an entry
is written to a temporary name and renamed into place under a file lock, so each entry is downloaded once per
node and never seen half-written; the least recently used entries (file mtime, refreshed on use) are deleted
when the directory grows past its budget. Deleting a file another process has memory-mapped is safe on POSIX.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import re
import tempfile
import threading
import time
import zlib
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

URL_SCHEMES = ("https", "http", "s3", "file")
_LOCKS = 256  # lock files shared by hash of the entry key: no lock file per entry left behind
_RESCAN_FRACTION = 10  # rescan the cache directory after 1/10 of its budget was added by this process
_EVICT_FRACTION = 10  # an eviction frees 1/10 of the budget beyond what is needed


class DataReadError(RuntimeError):
    """A shard or index could not be read or was refused: one line naming it, the cause and the fix.

    torch's DataLoader re-raises a worker's exception as ``type(msg)`` with the worker's traceback as the message;
    the constructor keeps only the original line, so the trainer can print it as it is."""

    def __init__(self, message: str):
        if "Traceback" in message:  # its last line is "data.remote.ClassName: the original message"
            message = re.sub(r"^[\w.]+: ", "", message.strip().splitlines()[-1])
        super().__init__(message)


class FetchFailed(DataReadError):
    """A fetch that failed every attempt; ``url`` and ``cause`` for callers that word their own line."""

    def __init__(self, message: str, url: str = "", cause: str = "", attempts: int = 0):
        super().__init__(message)
        self.url, self.cause, self.attempts = url, cause, attempts


def is_url(path: str | os.PathLike) -> bool:
    """A URL fsspec opens (``scheme://...``), not a local path."""
    return isinstance(path, str) and "://" in path


def is_remote_source(path: str | os.PathLike) -> bool:
    """A training source read through `Remote`: a URL, or a ``pipe:`` command."""
    return is_url(path) or (isinstance(path, str) and path.startswith("pipe:"))


def check_url(url: str) -> str | None:
    """Why ``url`` cannot be a source, or None when it can."""
    if url.startswith("pipe:"):
        return None if "{}" in url else (f"{url}: a pipe: source needs {{}} where the file name goes, e.g. "
                                         "pipe:aws s3 cp s3://bucket/set/{} -")
    parts = urlsplit(url)
    if parts.scheme not in URL_SCHEMES:
        return f"{url}: unsupported scheme {parts.scheme!r}; use a directory or one of {', '.join(URL_SCHEMES)}://"
    if parts.username or parts.password:
        return (f"{parts.scheme}://{parts.hostname}...: credentials in the URL are refused (they would be saved with "
                "the config); give them in the environment (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, ...)")
    if not parts.netloc and parts.scheme != "file":
        return f"{url}: no host or bucket"
    return None


def local_path(url: str) -> str:
    """``file:///dir`` -> ``/dir``; other strings unchanged."""
    return urlsplit(url).path if url.startswith("file://") else url


@dataclass(frozen=True)
class FetchSettings:
    """The data.* keys that govern remote sources."""

    cache_dir: str = ""  # empty: <tmp>/pretrain-shard-cache (node-local on most clusters)
    cache_max_gb: float = 50.0
    prefetch_steps: int = 4  # global batches read ahead of the one being consumed
    fetch_retries: int = 4
    fetch_backoff_s: float = 1.0
    fetch_timeout_s: float = 60.0
    fetch_threads: int = 8  # concurrent fetches per loader process

    KEYS = ("cache_dir", "cache_max_gb", "prefetch_steps", "fetch_retries", "fetch_backoff_s", "fetch_timeout_s",
            "fetch_threads")

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> dict[str, Any]:
        return {k: d[k] for k in cls.KEYS if k in d}

    def problems(self, prefix: str = "data") -> Iterator[tuple[str, str]]:
        """(key, message) of each invalid value."""
        def number(value: Any, integer: bool) -> bool:
            kinds = (int,) if integer else (int, float)
            return isinstance(value, kinds) and not isinstance(value, bool)

        if not isinstance(self.cache_dir, str):
            yield f"{prefix}.cache_dir", f"{self.cache_dir!r} must be a directory path (empty: the default)"
        if not number(self.cache_max_gb, False) or not self.cache_max_gb > 0:
            yield f"{prefix}.cache_max_gb", f"{self.cache_max_gb!r} must be a number > 0"
        for key in ("prefetch_steps", "fetch_retries"):
            value = getattr(self, key)
            if not number(value, True) or value < 0:
                yield f"{prefix}.{key}", f"{value!r} must be an integer >= 0"
        if not number(self.fetch_threads, True) or self.fetch_threads < 1:
            yield f"{prefix}.fetch_threads", f"{self.fetch_threads!r} must be an integer >= 1"
        for key in ("fetch_backoff_s", "fetch_timeout_s"):
            value = getattr(self, key)
            if not number(value, False) or value < 0 or (key == "fetch_timeout_s" and value == 0):
                yield f"{prefix}.{key}", f"{value!r} must be a number of seconds >= 0"

    @property
    def cache_root(self) -> Path:
        return Path(self.cache_dir or Path(tempfile.gettempdir()) / "pretrain-shard-cache")

    @property
    def cache_max_bytes(self) -> int:
        return int(self.cache_max_gb * 2**30)


def describe(exc: BaseException, protocol: str) -> str:
    """The cause of a failed fetch in a few words: HTTP status, missing key, connection error, timeout."""
    if protocol == "pipe":  # webdataset's gopen: "(args): exit N (read) ..."
        code = re.search(r"exit (-?\d+)", str(exc))
        return f"the command exited with status {code.group(1)}" if code else f"{type(exc).__name__}: {exc}"
    status = getattr(exc, "status", None)  # aiohttp.ClientResponseError
    if isinstance(status, int):
        return f"HTTP {status} {getattr(exc, 'message', '') or ''}".strip()
    if isinstance(exc, FileNotFoundError):
        return "HTTP 404 not found" if protocol.startswith("http") else "no such key (404)"
    if isinstance(exc, PermissionError):
        return "access denied (403): check the AWS_* credentials in the environment"
    if isinstance(exc, TimeoutError):
        return "timed out"
    name = type(exc).__name__
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    kind = "connection error" if "Connect" in name or isinstance(exc, ConnectionError) else name
    return f"{kind}: {text}" if text else kind


class PipeFileSystem:
    """The few fsspec calls `Remote` makes, for ``pipe:`` URLs: each runs the command through webdataset's ``gopen``
    (which raises when it exits non-zero; its stderr reaches the job's log). A range reads the whole output."""

    @staticmethod
    def _open(url: str) -> Any:
        from webdataset.gopen import gopen

        return gopen(url, "rb")

    def cat_file(self, url: str, start: int | None = None, end: int | None = None) -> bytes:
        with self._open(url) as stream:
            data = stream.read()
        return data[start:end]

    def cat_ranges(self, urls: list[str], starts: list[int], ends: list[int], on_error: str = "return") -> list[Any]:
        out: list[Any] = []
        for url, start, end in zip(urls, starts, ends, strict=True):
            try:
                out.append(self.cat_file(url, start, end))
            except Exception as exc:  # noqa: BLE001  (returned per range, as fsspec does with on_error="return")
                out.append(exc)
        return out

    def get_file(self, url: str, dest: str) -> None:
        with self._open(url) as stream, open(dest, "wb") as f:
            while chunk := stream.read(1 << 22):
                f.write(chunk)


class Remote:
    """One URL prefix, read through fsspec with retries. The filesystem object is made per process (fork-safe)."""

    def __init__(self, url: str, settings: FetchSettings):
        self.url, self.settings = url.rstrip("/"), settings
        self.protocol = "pipe" if url.startswith("pipe:") else urlsplit(url).scheme
        self.bytes_fetched = 0  # payload bytes this process fetched (benchmarks, tests)
        self._fs: Any = None
        self._fs_pid = -1

    def __getstate__(self) -> dict:
        return self.__dict__ | {"_fs": None, "_fs_pid": -1}

    def full(self, rel: str) -> str:
        return self.url.replace("{}", rel) if self.protocol == "pipe" else f"{self.url}/{rel}"

    def fs(self) -> Any:
        if self.protocol == "pipe":
            return PipeFileSystem()
        if self._fs is None or self._fs_pid != os.getpid():
            import fsspec

            timeout = self.settings.fetch_timeout_s
            if self.protocol.startswith("http"):
                import aiohttp

                options: dict[str, Any] = {"client_kwargs": {"timeout": aiohttp.ClientTimeout(total=timeout)}}
            else:
                endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
                # botocore's own retries off: ours (with data.fetch_backoff_s) are the same for every protocol.
                options = {"config_kwargs": {"connect_timeout": timeout, "read_timeout": timeout,
                                             "retries": {"max_attempts": 1}},
                           "client_kwargs": {"endpoint_url": endpoint} if endpoint else {}}
            self._fs = fsspec.filesystem(self.protocol, skip_instance_cache=True, **options)
            self._fs_pid = os.getpid()
        return self._fs

    def _retry(self, rel: str, call: Callable[[Any, str], Any]) -> Any:
        attempts = 1 + self.settings.fetch_retries
        for attempt in range(attempts):
            try:
                return call(self.fs(), self.full(rel))
            except Exception as exc:  # noqa: BLE001  (every failure of a fetch is retried, then named)
                cause = describe(exc, self.protocol)
                if getattr(exc, "status", None) == 416:  # a range past the end: the file is short, asking again won't help
                    attempts = attempt + 1
                    break
            if attempt + 1 < attempts:
                time.sleep(self.settings.fetch_backoff_s * 2**attempt)
        raise FetchFailed(f"cannot fetch {self.full(rel)} ({cause}, {attempts} attempts); check the URL, the server "
                          "and the credentials in the environment", self.full(rel), cause, attempts)

    def cat(self, rel: str, start: int | None = None, end: int | None = None) -> bytes:
        data = self._retry(rel, lambda fs, url: fs.cat_file(url, start=start, end=end))
        self.bytes_fetched += len(data)
        return data

    def cat_ranges(self, ranges: list[tuple[str, int, int]]) -> list[bytes | Exception]:
        """One try of many ranged reads, run concurrently by fsspec; a failed range is its exception."""
        got = self.fs().cat_ranges([self.full(rel) for rel, _, _ in ranges], [a for _, a, _ in ranges],
                                   [b for _, _, b in ranges], on_error="return")
        self.bytes_fetched += sum(len(g) for g in got if isinstance(g, bytes))
        return got

    def get(self, rel: str, dest: Path) -> None:
        self._retry(rel, lambda fs, url: fs.get_file(url, str(dest)))
        self.bytes_fetched += dest.stat().st_size


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            digest.update(chunk)
    return digest.hexdigest()


class ShardCache:
    """A byte-bounded LRU directory of fetched files, shared safely by the processes of a node."""

    def __init__(self, root: Path, max_bytes: int):
        self.root, self.max_bytes = Path(root), int(max_bytes)
        self._added = 0  # bytes this process added since it last scanned the directory
        self._estimate: int | None = None  # bytes in the directory, as this process last counted them
        self._inflight = 0  # bytes this process's threads are fetching (not in the directory yet)
        self._mutex = threading.Lock()

    def __getstate__(self) -> dict:
        return self.__dict__ | {"_mutex": None, "_estimate": None, "_added": 0, "_inflight": 0}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state, _mutex=threading.Lock())

    @contextlib.contextmanager
    def _lock(self, name: str) -> Iterator[None]:
        locks = self.root / ".locks"
        locks.mkdir(parents=True, exist_ok=True)
        with open(locks / f"{name}.lock", "a") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)

    def get(self, key: str, size: int, produce: Callable[[Path], None]) -> Path:
        """The file of entry ``key`` (``size`` bytes), made by ``produce(tmp_path)`` if no process made it yet.
        ``produce`` writes the file and raises if what it fetched is wrong; nothing is cached then."""
        path = self.root / key
        if _touch(path):
            return path
        with self._lock(f"{zlib.crc32(key.encode()) % _LOCKS}"):
            if _touch(path):  # another process fetched it while this one waited
                return path
            self._make_room(size)
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.parent / f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp"
            try:
                produce(tmp)
                os.replace(tmp, path)
            except BaseException:
                with self._mutex:
                    self._estimate = None if self._estimate is None else self._estimate - size
                raise
            finally:
                tmp.unlink(missing_ok=True)
                with self._mutex:
                    self._inflight -= size
        return path

    def _make_room(self, incoming: int) -> None:
        """Reserve ``incoming`` bytes, deleting least recently used entries until they fit in the budget. Scans the
        directory only every 1/10 of the budget this process adds (or when its running total says it is full):
        the bound holds exactly for one process, to within that slack per other process sharing the cache."""
        with self._mutex:
            self._inflight += incoming
            if (self._estimate is not None and self._added < self.max_bytes // _RESCAN_FRACTION
                    and self._estimate + incoming <= self.max_bytes):
                self._estimate += incoming
                self._added += incoming
                return
            self._scan_and_evict(incoming)

    def _scan_and_evict(self, incoming: int) -> None:
        with self._lock("evict"):
            entries = []
            for dirpath, dirnames, files in os.walk(self.root):
                dirnames[:] = [d for d in dirnames if d != ".locks"]
                for name in files:
                    if name.startswith("."):
                        continue
                    with contextlib.suppress(FileNotFoundError):
                        st = os.stat(os.path.join(dirpath, name))
                        entries.append((st.st_mtime_ns, st.st_size, os.path.join(dirpath, name)))
            total = sum(size for _, size, _ in entries) + self._inflight  # in flight: incoming included
            # Evicting, go down to 90% of the budget: a full cache must not rescan the directory on every insert.
            target = self.max_bytes if total <= self.max_bytes else self.max_bytes - self.max_bytes // _EVICT_FRACTION
            for _, size, name in sorted(entries):
                if total <= target:
                    break
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(name)
                total -= size
            self._estimate, self._added = total, incoming


def _touch(path: Path) -> bool:
    """Mark ``path`` used now (its mtime is its LRU age); False when it is not in the cache."""
    try:
        os.utime(path)
        return True
    except FileNotFoundError:
        return False
