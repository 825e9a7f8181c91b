"""Consolidate a training checkpoint into a plain model directory.

`python -m train.export --checkpoint RUN_DIR|STEP_DIR --out DIR` writes `model_config.json` +
`model.safetensors` (the format `python -m model.convert to-hf` reads) from the checkpoint's pieces, whatever
tensor / pipeline / expert / ZeRO layout wrote them (DeepSpeed's zero_to_fp32 reads no TP or PP layout).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import yaml

from model.config import ModelConfig
from model.transformer import Transformer
from train.checkpoint import SHARDS, CheckpointError, latest_checkpoint
from train.checkpoint_shards import ShardReader
from train.parallel.shard import Shard
from train.safe_load import forbid_unsafe_unpickling


def resolve_checkpoint(path: Path) -> Path:
    """A run dir resolves to its `latest` checkpoint; a step dir or a model dir is taken as is."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path} does not exist; pass a run directory, a checkpoints/step_N directory or a model directory")
    if (path / "model.safetensors").exists() or (path / "meta.json").exists():
        return path
    latest = latest_checkpoint(path)
    if latest is None:
        raise CheckpointError(f"{path} has no checkpoints/latest; train first or pass a checkpoints/step_N directory")
    return latest


def load_trained_model(path: Path) -> tuple[Transformer, ModelConfig]:
    """Loads our model (fp32, eval mode) from a run dir, a step dir or a consolidated model dir."""
    ckpt = resolve_checkpoint(path)
    if (ckpt / "model.safetensors").exists():
        from model.convert import load_model_dir

        model, cfg = load_model_dir(ckpt)
        return model.eval(), cfg
    raw = yaml.safe_load((ckpt / "config.yaml").read_text())
    cfg = ModelConfig.from_dict(raw["model"])
    model = Transformer(cfg)
    if not (ckpt / SHARDS / "state.json").exists():
        raise CheckpointError(f"{ckpt} has no complete {SHARDS}/ directory; it was not written by this version")
    try:
        with torch.no_grad(), ShardReader(ckpt / SHARDS) as reader:
            for name, p in model.named_parameters():
                p.copy_(reader.read(name, "param", Shard(tuple(p.shape), (0,) * p.dim()), tuple(p.shape)))
            for name, b in model.named_buffers():
                b.copy_(reader.read(name, "buffer", Shard(tuple(b.shape), (0,) * b.dim()), tuple(b.shape)))
    except (KeyError, ValueError) as e:
        raise CheckpointError(f"{ckpt}: weights do not match model {cfg.name}: {e}") from e
    return model.eval(), cfg


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", required=True, type=Path, help="run dir, checkpoints/step_N dir")
    p.add_argument("--out", required=True, type=Path, help="output model directory")
    args = p.parse_args(argv)
    forbid_unsafe_unpickling()  # reads safetensors and JSON only; nothing it calls may unpickle
    try:
        model, cfg = load_trained_model(args.checkpoint)
    except CheckpointError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    from model.convert import save_model_dir

    save_model_dir(model, cfg, args.out)
    print(json.dumps({"model": cfg.name, "out": str(args.out)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
