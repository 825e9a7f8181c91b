"""The training data loader: global batches that are a pure function of (data, seed, step).

A *sample* is a window of ``seq_len + 1`` tokens of one source's concatenated token stream:
sample ``i`` covers tokens ``[i * seq_len, i * seq_len + seq_len + 1)``, so consecutive
windows overlap by one token and every token is a target exactly once per epoch.

Global batch ``step`` is the global positions ``[step * G, (step + 1) * G)``. Each position
is given to a source by the mixture: positions come in blocks of ``MIX_BLOCK``; every block
holds each source's quota (largest-remainder rounding of ``weight * MIX_BLOCK``) in an order
permuted by a seeded rng, so how many samples a source has used before any position is
computable from the block number alone. A source's n-th sample is entry ``n % N`` of a seeded
permutation of its ``N`` sample ids for epoch ``n // N``. Nothing here depends on the data
parallel size, the micro batch size or the number of DataLoader workers: DP rank ``r`` just
takes positions ``[r * G / dp, (r + 1) * G / dp)`` of each global batch, reshaped to
``[grad_accum_steps, micro_batch_size]``. Resuming therefore needs only the next step.

Reading is indexed: the loader memory-maps the tar shards (which stay standard webdataset
shards) and copies each sample's token range out of the member payloads, using the byte
offsets ``data.prepare`` recorded in ``index.json``. Unlike streaming, where every rank would
read (or skip through) whole shards in order, this reads only the bytes of the samples a rank
needs, in any order, which is what a random permutation over the whole corpus and an exact
mid-epoch resume need. :func:`iter_webdataset_tokens` offers plain webdataset streaming too.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import tarfile
from collections import OrderedDict
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import webdataset as wds
from torch.utils.data import DataLoader, Dataset, Sampler

INDEX_NAME = "index.json"
SUPPORTED_FORMAT_VERSIONS = (1,)
MIX_BLOCK = 1024  # mixture positions per block: proportions are exact per block of this size
# Sample ids pack (source, epoch, index): 8 + 23 + 32 bits.
_SOURCE_SHIFT, _EPOCH_SHIFT = 55, 32
_MAX_SOURCES, _MAX_EPOCHS, _MAX_INDEX = 1 << 8, 1 << 23, 1 << 32
_PERM_TAG, _MIX_TAG = 0x5045524D, 0x4D4958  # keep the two seeded rng streams apart


def _prepare_hint(out: Path) -> str:
    return f"python -m data.prepare --input TEXT_FILES_OR_DIRS --tokenizer MODEL --out {out}"


def _ignore_stop_signals(_worker_id: int) -> None:
    """Schedulers (SLURM, torchrun) signal every process of a job. A worker killed by SIGTERM would take
    its rank down before the trainer's graceful stop and checkpoint; the trainer shuts workers down itself."""
    import signal

    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)


class DataConfigError(ValueError):
    """A data configuration value is invalid. ``key`` is the dotted config key to fix."""

    def __init__(self, key: str, message: str):
        self.key = key
        super().__init__(f"{key}: {message}")
        self.message = message

    def __reduce__(self):  # picklable across Hydra/submitit job boundaries
        return (type(self), (self.key, self.message))


@dataclass
class SourceConfig:
    path: str  # a directory written by data.prepare (holds index.json)
    weight: float = 1.0


@dataclass
class DataConfig:
    name: str = "sample"
    sources: list[SourceConfig] = field(default_factory=lambda: [SourceConfig("artifacts/data/shakespeare")])
    num_workers: int = 1  # DataLoader worker processes per rank (prefetch)
    shuffle: bool = True

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], prefix: str = "data") -> DataConfig:
        """Build and validate from a mapping (e.g. the Hydra ``data`` group)."""
        known = {"name", "sources", "num_workers", "shuffle"}
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
            num_workers=d.get("num_workers", 1), shuffle=d.get("shuffle", True),
        )
        cfg.validate(prefix)
        return cfg

    def validate(self, prefix: str = "data") -> None:
        if not isinstance(self.num_workers, int) or isinstance(self.num_workers, bool) or self.num_workers < 0:
            raise DataConfigError(f"{prefix}.num_workers", f"{self.num_workers!r} must be an integer >= 0")
        if not isinstance(self.shuffle, bool):
            raise DataConfigError(f"{prefix}.shuffle", f"{self.shuffle!r} must be true or false")
        if not self.sources:
            raise DataConfigError(f"{prefix}.sources", "must list at least one source")
        if len(self.sources) > _MAX_SOURCES:
            raise DataConfigError(f"{prefix}.sources", f"at most {_MAX_SOURCES} sources are supported")
        for i, src in enumerate(self.sources):
            key = f"{prefix}.sources[{i}]"
            if not np.isfinite(src.weight) or src.weight <= 0:
                raise DataConfigError(f"{key}.weight", f"{src.weight} must be a positive number")
            path = Path(src.path)
            if not path.is_dir():
                raise DataConfigError(f"{key}.path", f"{path} does not exist; create it with {_prepare_hint(path)}")
            if not (path / INDEX_NAME).is_file():
                raise DataConfigError(
                    f"{key}.path", f"{path} has no {INDEX_NAME} (incomplete?); re-run {_prepare_hint(path)}"
                )

    @property
    def weights(self) -> list[float]:
        total = sum(src.weight for src in self.sources)
        return [src.weight / total for src in self.sources]


# ----------------------------------------------------------------------------- one source
class TokenSource:
    """Random access to one split of a prepared directory through memory-mapped tar shards."""

    def __init__(self, path: str | Path, split: str, key: str = "data.sources[0].path"):
        self.path = Path(path)
        index_bytes = (self.path / INDEX_NAME).read_bytes()
        self.index_sha256 = hashlib.sha256(index_bytes).hexdigest()
        index = json.loads(index_bytes)
        if index.get("format_version") not in SUPPORTED_FORMAT_VERSIONS:
            raise DataConfigError(key, f"{self.path}: unsupported format version {index.get('format_version')}; "
                                       f"re-run {_prepare_hint(self.path)}")
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
        self.num_tokens = int(self._member_start[-1])
        for shard_id, (shard_path, shard) in enumerate(zip(self.shard_paths, shards, strict=True)):
            end = max((m["offset"] + m["nbytes"] for m in shard["members"]), default=0)
            size = shard_path.stat().st_size if shard_path.is_file() else -1
            if size < end or size != shard.get("bytes", size):
                self._corrupt(shard_id, f"{size} bytes on disk, index expects {shard.get('bytes', end)}")
        self._maps: dict[int, np.ndarray] = {}

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_maps"] = {}  # memory maps are per process: each DataLoader worker opens its own
        return state

    def _corrupt(self, shard_id: int, why: str) -> None:
        raise RuntimeError(
            f"corrupt or truncated shard {self.shard_paths[shard_id]} ({why}); re-run {_prepare_hint(self.path)}"
        )

    def num_samples(self, seq_len: int) -> int:
        return max(0, (self.num_tokens - 1) // seq_len)

    def _shard(self, shard_id: int) -> np.ndarray:
        mapped = self._maps.get(shard_id)
        if mapped is None:
            mapped = np.memmap(self.shard_paths[shard_id], dtype=np.uint8, mode="r")
            # Check each member's tar header once per process: a shard rewritten or damaged since
            # index.json was written must fail loudly, not feed the model the wrong bytes.
            for m in np.flatnonzero(self._member_shard == shard_id):
                offset, name = int(self._member_offset[m]), self._member_names[m]
                nbytes = int(self._member_tokens[m]) * self.dtype.itemsize
                try:
                    info = tarfile.TarInfo.frombuf(bytes(mapped[offset - 512 : offset]), "utf-8", "surrogateescape")
                except (tarfile.HeaderError, ValueError) as exc:
                    self._corrupt(shard_id, f"bad tar header for {name}: {exc}")
                if info.name != name or info.size != nbytes:
                    self._corrupt(shard_id, f"member at byte {offset} is {info.name} ({info.size} bytes), index "
                                            f"expects {name} ({nbytes} bytes)")
            self._maps[shard_id] = mapped
        return mapped

    def read(self, start: int, length: int) -> np.ndarray:
        """Tokens ``[start, start + length)`` of the split's stream, across member boundaries."""
        out = np.empty(length, dtype=np.int64)
        member = int(np.searchsorted(self._member_start, start, side="right")) - 1
        pos, filled = start, 0
        while filled < length:
            within = pos - int(self._member_start[member])
            take = min(length - filled, int(self._member_tokens[member]) - within)
            first = int(self._member_offset[member]) + within * self.dtype.itemsize
            raw = self._shard(int(self._member_shard[member]))[first : first + take * self.dtype.itemsize]
            out[filled : filled + take] = raw.view(self.dtype)
            filled, pos, member = filled + take, pos + take, member + 1
        return out


# ----------------------------------------------------------------------------- sampling
def _rng(*words: int) -> np.random.Generator:
    return np.random.default_rng([w & 0xFFFFFFFFFFFFFFFF for w in words])


def _largest_remainder(weights: Sequence[float], total: int) -> np.ndarray:
    raw = np.asarray(weights, dtype=np.float64) * total
    quotas = np.floor(raw).astype(np.int64)
    order = sorted(range(len(raw)), key=lambda i: (-(raw[i] - quotas[i]), i))
    for i in order[: total - int(quotas.sum())]:
        quotas[i] += 1
    return quotas


def encode_sample_id(source: int | np.ndarray, epoch: int | np.ndarray, index: int | np.ndarray) -> Any:
    return (np.int64(source) << _SOURCE_SHIFT) | (np.int64(epoch) << _EPOCH_SHIFT) | np.int64(index)


def decode_sample_id(sample_id: int | np.ndarray | torch.Tensor) -> tuple[Any, Any, Any]:
    """(source, epoch, sample index within the source's split) of packed sample ids."""
    ids = sample_id.numpy() if isinstance(sample_id, torch.Tensor) else np.asarray(sample_id, dtype=np.int64)
    return ids >> _SOURCE_SHIFT, (ids >> _EPOCH_SHIFT) & (_MAX_EPOCHS - 1), ids & (_MAX_INDEX - 1)


class _Sampler:
    """Maps global positions to (source, sample index): the mixture plus per-epoch permutations."""

    def __init__(self, weights: Sequence[float], samples_per_source: Sequence[int], seed: int, shuffle: bool):
        self.seed, self.shuffle = seed, shuffle
        self.samples = np.asarray(samples_per_source, dtype=np.int64)
        self.quotas = _largest_remainder(weights, MIX_BLOCK)
        self._block_sources = np.repeat(np.arange(len(self.quotas)), self.quotas)
        self._blocks: OrderedDict[int, tuple[np.ndarray, np.ndarray]] = OrderedDict()
        self._perms: OrderedDict[tuple[int, int], np.ndarray] = OrderedDict()

    def _block(self, block: int) -> tuple[np.ndarray, np.ndarray]:
        if block not in self._blocks:
            src = _rng(self.seed, _MIX_TAG, block).permutation(self._block_sources)
            order = np.argsort(src, kind="stable")
            rank = np.empty(MIX_BLOCK, dtype=np.int64)  # earlier positions of the same source in the block
            rank[order] = np.arange(MIX_BLOCK) - np.repeat(np.cumsum(self.quotas) - self.quotas, self.quotas)
            self._blocks[block] = (src, rank)
            if len(self._blocks) > 4:
                self._blocks.popitem(last=False)
        return self._blocks[block]

    def _perm(self, source: int, epoch: int) -> np.ndarray:
        key = (source, epoch)
        if key not in self._perms:
            self._perms[key] = _rng(self.seed, _PERM_TAG, source, epoch).permutation(int(self.samples[source]))
            if len(self._perms) > 2 * len(self.samples):
                self._perms.popitem(last=False)
        return self._perms[key]

    def sample_ids(self, positions: np.ndarray) -> np.ndarray:
        if len(self.quotas) == 1:
            sources, consumed = np.zeros_like(positions), positions
        else:
            sources, consumed = np.empty_like(positions), np.empty_like(positions)
            for block in np.unique(positions // MIX_BLOCK):
                sel = positions // MIX_BLOCK == block
                src, rank = self._block(int(block))
                offsets = positions[sel] % MIX_BLOCK
                sources[sel] = src[offsets]
                consumed[sel] = block * self.quotas[src[offsets]] + rank[offsets]
        epochs, within = consumed // self.samples[sources], consumed % self.samples[sources]
        if len(epochs) and int(epochs.max()) >= _MAX_EPOCHS:
            raise RuntimeError(f"more than {_MAX_EPOCHS} epochs over one source; use more data or fewer steps")
        index = within.copy()
        if self.shuffle:
            for s, e in set(zip(sources.tolist(), epochs.tolist(), strict=True)):
                sel = (sources == s) & (epochs == e)
                index[sel] = self._perm(s, e)[within[sel]]
        return encode_sample_id(sources, epochs, index)


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
        self.sources = [TokenSource(s.path, split, key=f"data.sources[{i}].path") for i, s in enumerate(cfg.sources)]
        for i, src in enumerate(self.sources):
            if src.tokenizer_sha256 != self.sources[0].tokenizer_sha256:
                raise DataConfigError(f"data.sources[{i}].path", f"{src.path} was tokenized with a different tokenizer "
                                      f"than {self.sources[0].path}; prepare all sources with the same --tokenizer")
            if src.num_samples(seq_len) < 1:
                raise DataConfigError(f"data.sources[{i}].path", f"{src.path} ({split}) has {src.num_tokens} tokens, "
                                      f"fewer than one sample of seq_len + 1 = {seq_len + 1}")
        quotas = _largest_remainder(cfg.weights, MIX_BLOCK)
        if (quotas == 0).any():
            i = int(np.flatnonzero(quotas == 0)[0])
            raise DataConfigError(f"data.sources[{i}].weight", f"too small: below 1/{MIX_BLOCK} of the total")
        self.samples_per_source = [src.num_samples(seq_len) for src in self.sources]
        if max(self.samples_per_source) >= _MAX_INDEX:
            raise DataConfigError("data.sources", f"a source has more than {_MAX_INDEX} samples; shard it")
        self._sampler = _Sampler(cfg.weights, self.samples_per_source, self.seed, cfg.shuffle)
        self.vocab_size = max(src.vocab_size for src in self.sources)
        self.eos_id = self.sources[0].eos_id
        self._next_step = int(start_step)

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

    def batch(self, step: int) -> torch.Tensor:
        """This rank's tokens of global batch ``step``: int64 [grad_accum_steps, micro_batch_size, seq_len + 1]."""
        ids = self.sample_ids(step).reshape(-1).numpy()
        sources, _, index = decode_sample_id(ids)
        out = np.empty((len(ids), self.seq_len + 1), dtype=np.int64)
        for row, (s, i) in enumerate(zip(sources.tolist(), index.tolist(), strict=True)):
            out[row] = self.sources[s].read(i * self.seq_len, self.seq_len + 1)
        return torch.from_numpy(out).view(self.grad_accum_steps, self.micro_batch_size, self.seq_len + 1)

    # -- iteration
    def __iter__(self) -> Iterator[torch.Tensor]:
        """Batches for steps next_step, next_step + 1, ... (prefetched by ``num_workers`` processes)."""
        workers = self.cfg.num_workers
        loader = DataLoader(
            _StepDataset(self), batch_size=None, sampler=_StepsFrom(self._next_step), num_workers=workers,
            prefetch_factor=2 if workers else None, persistent_workers=False, worker_init_fn=_ignore_stop_signals,
        )
        for batch in loader:  # the DataLoader returns items in sampler order, whatever the worker count
            self._next_step += 1
            yield batch

    # -- resume
    def fingerprint(self) -> dict:
        return {
            "split": self.split, "seq_len": self.seq_len, "global_batch_size": self.global_batch_size,
            "seed": self.seed, "shuffle": self.cfg.shuffle, "mix_block": MIX_BLOCK,
            "sources": [{"index_sha256": src.index_sha256, "weight": round(w, 12)}
                        for src, w in zip(self.sources, self.cfg.weights, strict=True)],
        }

    def state_dict(self) -> dict:
        return {"next_step": self._next_step, "seed": self.seed, "fingerprint": self.fingerprint()}

    def load_state_dict(self, sd: Mapping[str, Any]) -> None:
        saved, now = sd["fingerprint"], self.fingerprint()
        changed = [f"{k}: {saved.get(k)!r} -> {now[k]!r}" for k in now if saved.get(k) != now[k]]
        if changed:
            raise ValueError(
                "cannot resume the data stream, it changed since the checkpoint (" + "; ".join(changed)
                + "); restore the original data, seed, seq_len and global batch size, or start a fresh run"
            )
        self._next_step = int(sd["next_step"])


class _StepDataset(Dataset):
    def __init__(self, loader: GlobalBatchLoader):
        self.loader = loader

    def __getitem__(self, step: int) -> torch.Tensor:
        return self.loader.batch(step)


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
