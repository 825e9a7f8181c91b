"""Which sample sits at each global position: the mixture of sources and per-epoch permutations.

Positions come in blocks of ``MIX_BLOCK``; every block holds each source's quota (largest-remainder
rounding of ``weight * MIX_BLOCK``) in an order permuted by a seeded rng, so how many samples a source
has used before any position is computable from the block number alone. A source's n-th sample is
entry ``n % N`` of a seeded permutation of its ``N`` sample ids for epoch ``n // N``. Everything here
is a pure function of (weights, sample counts, seed, position).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

MIX_BLOCK = 1024  # mixture positions per block: proportions are exact per block of this size
# Sample ids pack (source, epoch, index): 8 + 23 + 32 bits.
_SOURCE_SHIFT, _EPOCH_SHIFT = 55, 32
MAX_SOURCES, MAX_EPOCHS, MAX_INDEX = 1 << 8, 1 << 23, 1 << 32
_PERM_TAG, _MIX_TAG = 0x5045524D, 0x4D4958  # keep the two seeded rng streams apart


def _rng(*words: int) -> np.random.Generator:
    return np.random.default_rng([w & 0xFFFFFFFFFFFFFFFF for w in words])


def largest_remainder(weights: Sequence[float], total: int) -> np.ndarray:
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
    return ids >> _SOURCE_SHIFT, (ids >> _EPOCH_SHIFT) & (MAX_EPOCHS - 1), ids & (MAX_INDEX - 1)


class MixtureSampler:
    """Maps global positions to (source, sample index): the mixture plus per-epoch permutations."""

    def __init__(self, weights: Sequence[float], samples_per_source: Sequence[int], seed: int, shuffle: bool):
        self.seed, self.shuffle = seed, shuffle
        self.samples = np.asarray(samples_per_source, dtype=np.int64)
        self.quotas = largest_remainder(weights, MIX_BLOCK)
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
        if len(epochs) and int(epochs.max()) >= MAX_EPOCHS:
            raise RuntimeError(f"more than {MAX_EPOCHS} epochs over one source; use more data or fewer steps")
        index = within.copy()
        if self.shuffle:
            for s, e in set(zip(sources.tolist(), epochs.tolist(), strict=True)):
                sel = (sources == s) & (epochs == e)
                index[sel] = self._perm(s, e)[within[sel]]
        return encode_sample_id(sources, epochs, index)
