"""The training data loader: global batches that are a pure function of (data, seed, step).

A *sample* is a window of ``seq_len + 1`` tokens of one source's concatenated token stream:
sample ``i`` covers tokens ``[i * seq_len, i * seq_len + seq_len + 1)``, so consecutive
windows overlap by one token and every token is a target exactly once per epoch.

Global batch ``step`` is the global positions ``[step * G, (step + 1) * G)``; :mod:`data.sampler`
gives each position a source (the mixture) and a sample of it (a seeded per-epoch permutation).
Nothing here depends on the data parallel size, the micro batch size or the number of DataLoader
workers: DP rank ``r`` just takes positions ``[r * G / dp, (r + 1) * G / dp)`` of each global batch,
reshaped to ``[grad_accum_steps, micro_batch_size]``. Resuming therefore needs only the next step.

Reading is indexed: the loader memory-maps the tar shards (which stay standard webdataset
shards) and copies each sample's token range out of the member payloads, using the byte
offsets ``data.prepare`` recorded in ``index.json``. Unlike streaming, where every rank would
read (or skip through) whole shards in order, this reads only the bytes of the samples a rank
needs, in any order, which is what a random permutation over the whole corpus and an exact
mid-epoch resume need. :func:`iter_webdataset_tokens` offers plain webdataset streaming too.

A source may be a URL prefix (``s3://bucket/set``, ``https://host/set``): :mod:`data.source` reads it through
the node's shard cache (:mod:`data.remote`), and :meth:`GlobalBatchLoader.prefetch` starts fetching what the next
``data.prefetch_steps`` global batches need (their samples are known: a function of data, seed and step) while
the current one is read.

``data.on_error`` says what a bad shard does (see :mod:`data.source`): ``raise`` stops with one line
naming it; ``skip`` replaces each sample that overlaps it by a sample of the same source chosen from
(seed, sample id) alone, so every other position of every global batch keeps its sample.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import webdataset as wds
from torch.utils.data import DataLoader, Dataset, Sampler

from data.remote import DataReadError, FetchSettings, check_url, is_remote_source, local_path
from data.sampler import MAX_INDEX, MAX_SOURCES, MIX_BLOCK, MixtureSampler, decode_sample_id, largest_remainder
from data.source import INDEX_NAME, ON_ERROR_CHOICES, DataConfigError, TokenSource, prepare_hint

__all__ = ["DataConfig", "DataConfigError", "DataReadError", "FetchSettings", "GlobalBatchLoader", "SourceConfig",
           "decode_sample_id", "iter_webdataset_tokens", "webdataset_token_dataset", "webdataset_urls"]


def _ignore_stop_signals(_worker_id: int) -> None:
    """Schedulers (SLURM, torchrun) signal every process of a job. A worker killed by SIGTERM would take
    its rank down before the trainer's graceful stop and checkpoint; the trainer shuts workers down itself."""
    import signal

    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)


@dataclass
class SourceConfig:
    path: str  # a directory written by data.prepare (holds index.json), or a URL prefix holding the same
    weight: float = 1.0


@dataclass
class DataConfig:
    name: str = "sample"
    sources: list[SourceConfig] = field(default_factory=lambda: [SourceConfig("artifacts/data/shakespeare")])
    num_workers: int = 1  # DataLoader worker processes per rank (prefetch)
    shuffle: bool = True
    on_error: str = "raise"  # a bad shard: raise stops the run; skip replaces the samples that overlap it
    fetch: FetchSettings = field(default_factory=FetchSettings)  # URL sources: cache, prefetch, retries (flat keys)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], prefix: str = "data") -> DataConfig:
        """Build and validate from a mapping (e.g. the Hydra ``data`` group)."""
        known = {"name", "sources", "num_workers", "shuffle", "on_error", *FetchSettings.KEYS}
        unknown = sorted(set(d) - known)
        if unknown:
            raise DataConfigError(f"{prefix}.{unknown[0]}", f"unknown key; valid keys are {sorted(known)}")
        raw_sources = d.get("sources")
        if isinstance(raw_sources, str | Mapping) or not isinstance(raw_sources, Sequence) or not raw_sources:
            raise DataConfigError(f"{prefix}.sources", "must be a non-empty list of {path, weight}")
        sources = []
        for i, src in enumerate(raw_sources):
            if isinstance(src, str):
                src = {"path": src}
            if not isinstance(src, Mapping) or "path" not in src or set(src) - {"path", "weight"}:
                raise DataConfigError(f"{prefix}.sources[{i}]", "must be a mapping with keys path and optional weight")
            try:
                weight = float(src.get("weight", 1.0))
            except (TypeError, ValueError):
                raise DataConfigError(f"{prefix}.sources[{i}].weight", f"{src['weight']!r} is not a number") from None
            sources.append(SourceConfig(path=str(src["path"]), weight=weight))
        cfg = cls(
            name=str(d.get("name", cls.name)), sources=sources,
            num_workers=d.get("num_workers", 1), shuffle=d.get("shuffle", True), on_error=d.get("on_error", "raise"),
            fetch=FetchSettings(**FetchSettings.from_dict(d)),
        )
        cfg.validate(prefix)
        return cfg

    def validate(self, prefix: str = "data") -> None:
        if not isinstance(self.num_workers, int) or isinstance(self.num_workers, bool) or self.num_workers < 0:
            raise DataConfigError(f"{prefix}.num_workers", f"{self.num_workers!r} must be an integer >= 0")
        if not isinstance(self.shuffle, bool):
            raise DataConfigError(f"{prefix}.shuffle", f"{self.shuffle!r} must be true or false")
        if self.on_error not in ON_ERROR_CHOICES:
            raise DataConfigError(f"{prefix}.on_error", f"{self.on_error!r} must be {' or '.join(ON_ERROR_CHOICES)}")
        for key, message in self.fetch.problems(prefix):
            raise DataConfigError(key, message)
        if not self.sources:
            raise DataConfigError(f"{prefix}.sources", "must list at least one source")
        if len(self.sources) > MAX_SOURCES:
            raise DataConfigError(f"{prefix}.sources", f"at most {MAX_SOURCES} sources are supported")
        for i, src in enumerate(self.sources):
            key = f"{prefix}.sources[{i}]"
            if not np.isfinite(src.weight) or src.weight <= 0:
                raise DataConfigError(f"{key}.weight", f"{src.weight} must be a positive number")
            if is_remote_source(src.path) and not src.path.startswith("file://"):
                if (problem := check_url(src.path)) is not None:
                    raise DataConfigError(f"{key}.path", problem)
                continue  # index.json is fetched when the source opens
            path = Path(local_path(src.path))
            if not path.is_dir():
                raise DataConfigError(f"{key}.path", f"{path} does not exist; create it with {prepare_hint(path)}")
            if not (path / INDEX_NAME).is_file():
                raise DataConfigError(
                    f"{key}.path", f"{path} has no {INDEX_NAME} (incomplete?); re-run {prepare_hint(path)}"
                )

    @property
    def weights(self) -> list[float]:
        total = sum(src.weight for src in self.sources)
        return [src.weight / total for src in self.sources]


# ----------------------------------------------------------------------------- the loader
class GlobalBatchLoader:
    """This DP rank's slice of deterministic global batches; resumable and independent of dp_size."""

    def __init__(
        self, cfg: DataConfig, *, seq_len: int, global_batch_size: int, micro_batch_size: int,
        dp_rank: int, dp_size: int, seed: int, split: str = "train", start_step: int = 0,
    ):
        cfg.validate()
        for key, value in (("train.seq_len", seq_len), ("train.global_batch_size", global_batch_size),
                           ("train.micro_batch_size", micro_batch_size), ("dp_size", dp_size)):
            if value < 1:
                raise DataConfigError(key, f"{value} must be >= 1")
        if global_batch_size % (micro_batch_size * dp_size):
            raise DataConfigError(
                "train.global_batch_size", f"{global_batch_size} is not divisible by micro_batch_size "
                f"({micro_batch_size}) x data-parallel size ({dp_size}); use a multiple of {micro_batch_size * dp_size}"
            )
        if not 0 <= dp_rank < dp_size:
            raise DataConfigError("dp_rank", f"{dp_rank} must be in [0, {dp_size})")
        self.cfg, self.split, self.seed = cfg, split, int(seed)
        self.seq_len, self.global_batch_size = seq_len, global_batch_size
        self.micro_batch_size, self.dp_rank, self.dp_size = micro_batch_size, dp_rank, dp_size
        self.grad_accum_steps = global_batch_size // (micro_batch_size * dp_size)
        remote = sum(is_remote_source(s.path) for s in cfg.sources)  # they share the node's cache
        self.sources = [TokenSource(s.path, split, f"data.sources[{i}].path", cfg.on_error, cfg.fetch, 1 / max(1, remote))
                        for i, s in enumerate(cfg.sources)]
        for i, src in enumerate(self.sources):
            if src.tokenizer_sha256 != self.sources[0].tokenizer_sha256:
                raise DataConfigError(f"data.sources[{i}].path", f"{src.path} was tokenized with a different tokenizer "
                                      f"than {self.sources[0].path}; prepare all sources with the same --tokenizer")
            if src.num_samples(seq_len) < 1:
                raise DataConfigError(f"data.sources[{i}].path", f"{src.path} ({split}) has {src.num_tokens} tokens, "
                                      f"fewer than one sample of seq_len + 1 = {seq_len + 1}")
        quotas = largest_remainder(cfg.weights, MIX_BLOCK)
        if (quotas == 0).any():
            i = int(np.flatnonzero(quotas == 0)[0])
            raise DataConfigError(f"data.sources[{i}].weight", f"too small: below 1/{MIX_BLOCK} of the total")
        self.samples_per_source = [src.num_samples(seq_len) for src in self.sources]
        if max(self.samples_per_source) >= MAX_INDEX:
            raise DataConfigError("data.sources", f"a source has more than {MAX_INDEX} samples; shard it")
        self._sampler = MixtureSampler(cfg.weights, self.samples_per_source, self.seed, cfg.shuffle)
        self.vocab_size = max(src.vocab_size for src in self.sources)
        self.eos_id = self.sources[0].eos_id
        self._next_step = int(start_step)
        self.replaced_samples = 0  # this rank's samples replaced in the batch `iter` yielded last (on_error=skip)
        self.replaced_samples_total = 0  # ... in all batches `iter` yielded since construction or load_state_dict

    # -- sizes
    @property
    def tokens_per_step(self) -> int:
        """Target tokens per global batch (all ranks)."""
        return self.global_batch_size * self.seq_len

    @property
    def next_step(self) -> int:
        return self._next_step

    def num_samples(self) -> int:
        """Samples in one epoch of all sources together."""
        return sum(self.samples_per_source)

    # -- addressing
    def global_sample_ids(self, step: int) -> torch.Tensor:
        """Sample ids of the whole global batch ``step`` (all ranks), shape [global_batch_size]."""
        positions = np.arange(step * self.global_batch_size, (step + 1) * self.global_batch_size, dtype=np.int64)
        return torch.from_numpy(self._sampler.sample_ids(positions))

    def sample_ids(self, step: int) -> torch.Tensor:
        """This rank's sample ids of global batch ``step``, shape [grad_accum_steps, micro_batch_size]."""
        if step < 0:
            raise ValueError(f"step {step} must be >= 0")
        per_rank = self.global_batch_size // self.dp_size
        first = step * self.global_batch_size + self.dp_rank * per_rank
        ids = self._sampler.sample_ids(np.arange(first, first + per_rank, dtype=np.int64))
        return torch.from_numpy(ids).view(self.grad_accum_steps, self.micro_batch_size)

    def _rows(self, step: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(source, sample index to read, replaced?) of each of this rank's rows of global batch ``step``."""
        ids = self.sample_ids(step).reshape(-1).numpy()
        sources, _, index = decode_sample_id(ids)
        read = index.copy()
        for s in np.unique(sources).tolist():
            sel = sources == s
            read[sel] = self.sources[s].resolve_many(index[sel], self.seq_len, self.seed, ids[sel])
        return sources, read, read != index

    def replaced_rows(self, step: int) -> list[int]:
        """Rows of ``batch(step).reshape(-1, seq_len + 1)`` whose sample overlapped a bad shard and was replaced."""
        return np.flatnonzero(self._rows(step)[2]).tolist()

    def prefetch(self, step: int) -> None:
        """Start fetching (background threads) what this rank's batches ``step .. step + data.prefetch_steps`` read
        from remote sources; the shards or members are fetched once per node, into its cache."""
        if not any(src.remote for src in self.sources):
            return
        for ahead in range(step, step + 1 + self.cfg.fetch.prefetch_steps):
            sources, _, index = decode_sample_id(self.sample_ids(ahead).reshape(-1).numpy())
            for s in np.unique(sources).tolist():
                self.sources[s].prefetch(index[sources == s] * self.seq_len, self.seq_len + 1)

    def _batch_and_replaced(self, step: int) -> tuple[torch.Tensor, int]:
        sources, read, replaced = self._rows(step)
        out = np.empty((len(read), self.seq_len + 1), dtype=np.int64)
        for row, (s, i) in enumerate(zip(sources.tolist(), read.tolist(), strict=True)):
            out[row] = self.sources[s].read(i * self.seq_len, self.seq_len + 1)
        batch = torch.from_numpy(out).view(self.grad_accum_steps, self.micro_batch_size, self.seq_len + 1)
        return batch, int(replaced.sum())

    def batch(self, step: int) -> torch.Tensor:
        """This rank's tokens of global batch ``step``: int64 [grad_accum_steps, micro_batch_size, seq_len + 1]."""
        return self._batch_and_replaced(step)[0]

    # -- iteration
    def __iter__(self) -> Iterator[torch.Tensor]:
        """Batches for steps next_step, next_step + 1, ... (prefetched by ``num_workers`` processes)."""
        workers = self.cfg.num_workers
        loader = DataLoader(
            _StepDataset(self), batch_size=None, sampler=_StepsFrom(self._next_step), num_workers=workers,
            prefetch_factor=2 if workers else None, persistent_workers=False, worker_init_fn=_ignore_stop_signals,
        )
        for batch, replaced in loader:  # the DataLoader returns items in sampler order, whatever the worker count
            self._next_step += 1
            self.replaced_samples = replaced
            self.replaced_samples_total += replaced
            yield batch

    # -- resume
    def fingerprint(self) -> dict:
        return {
            "split": self.split, "seq_len": self.seq_len, "global_batch_size": self.global_batch_size,
            "seed": self.seed, "shuffle": self.cfg.shuffle, "mix_block": MIX_BLOCK,
            "sources": [
                {"index_sha256": src.index_sha256, "tokenizer_sha256": src.tokenizer_sha256, "weight": round(w, 12)}
                for src, w in zip(self.sources, self.cfg.weights, strict=True)
            ],
        }

    def state_dict(self) -> dict:
        return {"next_step": self._next_step, "seed": self.seed, "fingerprint": self.fingerprint()}

    def load_state_dict(self, sd: Mapping[str, Any]) -> None:
        saved, now = sd["fingerprint"], self.fingerprint()
        for i, (old, new) in enumerate(zip(saved.get("sources", []), now["sources"], strict=False)):
            if "tokenizer_sha256" not in old:  # saved before the tokenizer was recorded
                del new["tokenizer_sha256"]
            elif old["tokenizer_sha256"] != new["tokenizer_sha256"]:
                was, now_sha = (str(sha)[:12] for sha in (old["tokenizer_sha256"], new["tokenizer_sha256"]))
                raise ValueError(
                    f"cannot resume the data stream: the tokenizer of data.sources[{i}] ({self.sources[i].path}) "
                    f"changed since the checkpoint (sha256 {was}... saved, {now_sha}... now); prepare the data with "
                    "the checkpoint's tokenizer (python -m data.prepare --tokenizer ...) or start a fresh run"
                )
        changed = [f"{k}: {saved.get(k)!r} -> {now[k]!r}" for k in now if saved.get(k) != now[k]]
        if changed:
            raise ValueError(
                "cannot resume the data stream, it changed since the checkpoint (" + "; ".join(changed)
                + "); restore the original data, seed, seq_len and global batch size, or start a fresh run"
            )
        self._next_step = int(sd["next_step"])
        self.replaced_samples = self.replaced_samples_total = 0


class _StepDataset(Dataset):
    def __init__(self, loader: GlobalBatchLoader):
        self.loader = loader

    def __getitem__(self, step: int) -> tuple[torch.Tensor, int]:
        # The replaced count travels with the batch: workers' loaders are copies the caller never sees.
        self.loader.prefetch(step)
        return self.loader._batch_and_replaced(step)


class _StepsFrom(Sampler[int]):
    """start, start + 1, ... without end (training decides when to stop)."""

    def __init__(self, start: int):
        self.start = start

    def __iter__(self) -> Iterator[int]:
        return itertools.count(self.start)


# ----------------------------------------------------------------------------- streaming
_FIELD_DTYPES = {"tokens.u16": np.dtype("<u2"), "tokens.u32": np.dtype("<u4")}


def webdataset_urls(sources: DataConfig | str | Path | Sequence[str | Path], split: str = "train") -> list[str]:
    """Tar shard paths of prepared directories (or tar files given directly), in index order."""
    if isinstance(sources, DataConfig):
        sources = [s.path for s in sources.sources]
    elif isinstance(sources, str | Path):
        sources = [sources]
    urls: list[str] = []
    for src in map(Path, sources):
        if src.suffix == ".tar":
            urls.append(str(src))
            continue
        index = json.loads((src / INDEX_NAME).read_text())
        urls += [str(src / shard["path"]) for shard in index["splits"][split]["shards"]]
    return urls


def _decode_token_member(sample: dict) -> dict:
    fields = [k for k in sample if k in _FIELD_DTYPES]
    if len(fields) != 1:
        raise ValueError(f"{sample.get('__url__')}: member {sample.get('__key__')} has no tokens.u16/u32 field")
    tokens = np.frombuffer(sample[fields[0]], dtype=_FIELD_DTYPES[fields[0]]).astype(np.int64)
    return {"key": sample["__key__"], "url": sample["__url__"], "tokens": tokens}


def webdataset_token_dataset(sources: DataConfig | str | Path | Sequence[str | Path], split: str = "train"):
    """A ``webdataset.WebDataset`` yielding {key, url, tokens} per tar member, in shard order; shards are
    split over ranks (RANK/WORLD_SIZE or torch.distributed) and DataLoader workers, each read once."""
    return wds.WebDataset(
        webdataset_urls(sources, split), nodesplitter=wds.split_by_node, workersplitter=wds.split_by_worker,
        shardshuffle=False, empty_check=False,
    ).map(_decode_token_member)


def iter_webdataset_tokens(
    sources: DataConfig | str | Path | Sequence[str | Path], split: str = "train", num_workers: int = 0
) -> Iterator[dict]:
    """Stream this rank's members through a DataLoader with ``num_workers`` workers (no mixing, no resume)."""
    loader = DataLoader(webdataset_token_dataset(sources, split), batch_size=None, num_workers=num_workers)
    yield from loader
