"""Where a rank's local parameter sits inside the single-device model's full tensor.

Every ``apply_*`` that slices a parameter (tensor parallelism along one dim, expert parallelism along the expert
dim, both for experts under TP) records it with :func:`mark_shard`. Checkpoints use it to write each piece once
under the single-device model's name and to read any other layout's slice; the gradient norm uses it to count
each piece once. A parameter that was never marked is the whole tensor.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

SHARD_ATTR = "shard"


@dataclass(frozen=True)
class Shard:
    """The local tensor is ``full[offsets[0]:offsets[0]+shape[0], offsets[1]:...]`` of a ``global_shape`` tensor."""

    global_shape: tuple[int, ...]
    offsets: tuple[int, ...]

    def slices(self, local_shape: tuple[int, ...]) -> tuple[slice, ...]:
        return tuple(slice(o, o + n) for o, n in zip(self.offsets, local_shape, strict=True))

    def is_full(self, local_shape: tuple[int, ...]) -> bool:
        return tuple(local_shape) == self.global_shape


def shard_of(p: torch.Tensor) -> Shard:
    """The recorded shard of ``p``, or the whole tensor."""
    shard = getattr(p, SHARD_ATTR, None)
    if shard is None:
        return Shard(tuple(p.shape), (0,) * p.dim())
    return shard


def mark_shard(local: torch.Tensor, source: torch.Tensor, dim: int, index: int, count: int) -> torch.Tensor:
    """Records that ``local`` is part ``index`` of ``count`` equal parts of ``source`` along ``dim``; ``source`` may
    itself be a marked shard (an expert shard later split by TP). Returns ``local``."""
    before = shard_of(source)
    if source.shape[dim] % count != 0:
        raise ValueError(f"dim {dim} of size {source.shape[dim]} does not split into {count} parts")
    part = source.shape[dim] // count
    if local.shape[dim] != part:
        raise ValueError(f"local dim {dim} has size {local.shape[dim]}, expected {part}")
    offsets = list(before.offsets)
    offsets[dim] += index * part
    setattr(local, SHARD_ATTR, Shard(before.global_shape, tuple(offsets)))
    return local
