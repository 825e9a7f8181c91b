"""Resharding checkpoints (train/checkpoint_shards.py), the file format in one process: pieces of parameters and
optimizer states written by one split are read back under any other, as plain safetensors."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from train.checkpoint_shards import ShardReader, _StreamWriter, rank_file
from train.parallel.shard import Shard


def _write(path: Path, pieces: list[tuple[str, str, Shard, torch.Tensor]]) -> None:
    index = [(f"{n}/{k}@{s.offsets}", n, k, s, tuple(t.shape)) for n, k, s, t in pieces]
    writer = _StreamWriter(path, index)
    for (key, *_), (*_, t) in zip(index, pieces, strict=True):
        writer.write(key, t)
    writer.close()


def _pieces_for_two_ranks(full: torch.Tensor, expert: torch.Tensor) -> list[list]:
    """``full`` split in 2 along dim 0, one half per rank; ``expert`` (E, R, C) split in 2 along dim 0 (EP halves)
    and each EP half in 2 along dim 2 (TP), rank r holding TP half r of both EP halves."""
    g, eg = tuple(full.shape), tuple(expert.shape)
    h, e, c = g[0] // 2, eg[0] // 2, eg[2] // 2
    return [[("w", "param", Shard(g, (r * h, 0)), full[r * h:(r + 1) * h]),
             ("x", "exp_avg", Shard(eg, (0, 0, r * c)), expert[:e, :, r * c:(r + 1) * c]),
             ("x", "exp_avg", Shard(eg, (e, 0, r * c)), expert[e:, :, r * c:(r + 1) * c])] for r in range(2)]


def test_reader_assembles_other_splits_exactly(tmp_path):
    full = torch.randn(6, 5)
    expert = torch.randn(4, 3, 6)
    for rank, pieces in enumerate(_pieces_for_two_ranks(full, expert)):
        _write(rank_file(tmp_path, rank), pieces)
    reader = ShardReader(tmp_path)
    assert reader.names() == ["w", "x"] and reader.kinds("x") == ["exp_avg"]
    g = tuple(full.shape)
    assert torch.equal(reader.read("w", "param", Shard(g, (0, 0)), g), full)  # whole
    assert torch.equal(reader.read("w", "param", Shard(g, (1, 0)), (3, 5)), full[1:4])  # 3 rows across both files
    assert torch.equal(reader.read("w", "param", Shard(g, (0, 3)), (6, 2)), full[:, 3:])  # the other axis
    eg = tuple(expert.shape)
    assert torch.equal(reader.read("x", "exp_avg", Shard(eg, (0, 0, 0)), eg), expert)
    # Experts 1..2 (one from each EP half), the middle TP columns (one from each TP half).
    assert torch.equal(reader.read("x", "exp_avg", Shard(eg, (1, 1, 2)), (2, 2, 3)), expert[1:3, 1:3, 2:5])


def test_reader_errors_name_the_parameter(tmp_path):
    full = torch.randn(6, 5)
    _write(rank_file(tmp_path, 0), _pieces_for_two_ranks(full, torch.randn(4, 3, 6))[0])  # rank 1's file missing
    reader = ShardReader(tmp_path)
    with pytest.raises(ValueError, match=r"'w' \(param\) cover 10 of 20 elements"):
        reader.read("w", "param", Shard((6, 5), (1, 0)), (4, 5))
    with pytest.raises(ValueError, match=r"'w' \(param\) was saved with global shape \(6, 5\), requested \(8, 5\)"):
        reader.read("w", "param", Shard((8, 5), (0, 0)), (3, 5))
    with pytest.raises(KeyError, match="no saved exp_avg_sq of 'w'"):
        reader.read("w", "exp_avg_sq", Shard((6, 5), (0, 0)), (3, 5))


def test_files_are_plain_safetensors(tmp_path):
    pieces = _pieces_for_two_ranks(torch.randn(6, 5), torch.randn(4, 3, 6))[1]
    _write(rank_file(tmp_path, 1), pieces)
    path = rank_file(tmp_path, 1)
    tensors = load_file(path)  # safetensors' own parser validates the streamed header and offsets
    assert [tuple(t.shape) for t in tensors.values()] == [tuple(t.shape) for *_, t in pieces]
    with safe_open(path, framework="pt") as f:
        assert set(f.metadata()) == {"format", "pieces"}
    raw = path.read_bytes()
    assert b"\x80\x04" not in raw[:64] and b"torch" not in raw  # no pickle protocol header, no torch classes
