"""Per-token logits of a trained model on given tokens.

    python -m train.score --checkpoint DIR --tokens IN.npy --out OUT.npy

IN is int64 [B, T]; OUT is float32 logits [B, T, V]. DIR is a run dir (uses `latest`), a
checkpoints/step_N dir or a model dir written by `python -m train.export`.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

from train.checkpoint import CheckpointError
from train.export import load_trained_model
from train.safe_load import forbid_unsafe_unpickling


@torch.no_grad()
def score(model: torch.nn.Module, tokens: np.ndarray, batch_size: int = 8) -> np.ndarray:
    out = []
    for i in range(0, tokens.shape[0], batch_size):
        chunk = torch.from_numpy(tokens[i : i + batch_size]).long()
        out.append(model(chunk).logits.float().numpy())
    return np.concatenate(out, axis=0).astype(np.float32)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Write float32 logits [B, T, V] of a checkpoint on int64 tokens [B, T].")
    p.add_argument("--checkpoint", required=True, type=Path)
    p.add_argument("--tokens", required=True, type=Path, help=".npy, int64 [B, T]")
    p.add_argument("--out", required=True, type=Path, help=".npy, float32 [B, T, V]")
    p.add_argument("--batch-size", type=int, default=8)
    args = p.parse_args(argv)
    forbid_unsafe_unpickling()  # reads safetensors and JSON only; nothing it calls may unpickle
    try:
        model, cfg = load_trained_model(args.checkpoint)
    except CheckpointError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    tokens = np.load(args.tokens)
    if tokens.ndim != 2 or not np.issubdtype(tokens.dtype, np.integer):
        print(f"error: {args.tokens} must hold an integer array [B, T], got {tokens.dtype} {tokens.shape}", file=sys.stderr)
        return 2
    if tokens.size and (tokens.min() < 0 or tokens.max() >= cfg.vocab_size):
        print(f"error: token ids must be in [0, {cfg.vocab_size}) for model {cfg.name}", file=sys.stderr)
        return 2
    if tokens.shape[1] > cfg.max_seq_len:
        print(f"error: sequence length {tokens.shape[1]} exceeds the model's max_seq_len {cfg.max_seq_len}", file=sys.stderr)
        return 2
    logits = score(model, tokens.astype(np.int64), args.batch_size)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    np.save(args.out, logits)
    print(f"wrote {args.out} {tuple(logits.shape)} float32")
    return 0


if __name__ == "__main__":
    sys.exit(main())
