"""Where :mod:`data.prepare` writes: a local directory, or any fsspec URL (``s3://bucket/prefix``, ...).

A URL output is written through a local staging directory: each shard is uploaded as soon as the shard
writer closes it and its local copy is deleted, so the staging directory holds about one shard per split,
not the corpus. ``index.json`` is uploaded last: as for a local directory, its presence means the set is
complete. A previous set's ``index.json`` is deleted first, so a reader never pairs it with new shards.
Credentials come from the environment only (for ``s3://`` the standard ``AWS_*`` variables, including
``AWS_ENDPOINT_URL`` for an S3-compatible server); URLs in messages are printed without any query string.
"""

from __future__ import annotations

import posixpath
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Self

import fsspec

from data.remote import is_url
from data.source import INDEX_NAME


def join(out: str | Path, *names: str) -> str | Path:
    """``out / names`` for a directory or a URL."""
    return posixpath.join(str(out), *names) if is_url(out) else Path(out).joinpath(*names)


def public_url(url: str) -> str:
    """The URL for messages: no query string (it may carry a signature) and no user:password part."""
    scheme, _, rest = str(url).partition("://")
    host, slash, path = rest.partition("/")
    return f"{scheme}://{host.rpartition('@')[2]}{slash}{path.split('?', 1)[0]}"


class Output:
    """The output of one prepare run: ``local_dir`` to write into, :meth:`publish` each finished file."""

    def __init__(self, out: str | Path, staging_dir: str | Path | None = None):
        self.out = out
        self.remote = is_url(out)
        if not self.remote:
            self.local_dir = Path(out)
            self.local_dir.mkdir(parents=True, exist_ok=True)
            self._fs = None
            return
        # A fresh filesystem object: a cached one may hold another endpoint or stale listings.
        self._fs, self._root = fsspec.core.url_to_fs(str(out), skip_instance_cache=True)
        self._root = self._root.rstrip("/")
        self.local_dir = Path(tempfile.mkdtemp(prefix="prepare-staging-", dir=staging_dir))

    def remove_previous(self, patterns: Sequence[str]) -> None:
        """Delete this module's files of an earlier run: ``index.json`` first, then ``patterns`` (globs)."""
        if not self.remote:
            (self.local_dir / INDEX_NAME).unlink(missing_ok=True)
            for pattern in patterns:
                for old in self.local_dir.glob(pattern):
                    old.unlink()
            return
        index = f"{self._root}/{INDEX_NAME}"
        try:
            if self._fs.exists(index):
                self._fs.rm_file(index)
            stale = sorted({p for pattern in patterns for p in self._fs.glob(f"{self._root}/{pattern}")})
            if stale:
                self._fs.rm(stale)
        except OSError as exc:  # the first request to the destination: a missing bucket, refused credentials
            raise FileNotFoundError(f"--out {public_url(self.out)}: {exc}; check the URL (its bucket must exist), "
                                    "that the server is reachable and the credentials in the environment") from None
        self._fs.invalidate_cache()

    def publish(self, local: Path) -> None:
        """A finished file under ``local_dir``: uploaded (and its staging copy deleted) for a URL output."""
        if not self.remote:
            return
        rel = local.relative_to(self.local_dir).as_posix()
        try:
            self._fs.put_file(str(local), f"{self._root}/{rel}")
        except OSError as exc:
            raise OSError(f"upload of {rel} to {public_url(join(self.out, rel))} failed: "
                          f"{type(exc).__name__}: {exc.strerror or exc}; check the URL and the credentials "
                          "in the environment, then re-run") from None
        local.unlink()

    def close(self) -> None:
        if self.remote:
            shutil.rmtree(self.local_dir, ignore_errors=True)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
