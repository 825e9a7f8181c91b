"""Consolidate a training checkpoint into a plain model directory.

`python -m train.export --checkpoint RUN_DIR|STEP_DIR --out DIR` writes `model_config.json` +
`model.safetensors` (the format `python -m model.convert to-hf` reads), gathering ZeRO-partitioned
weights with DeepSpeed's own zero_to_fp32 reader.
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
from train.checkpoint import TAG, CheckpointError, latest_checkpoint


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


def _engine_state_dict(step_dir: Path) -> dict[str, torch.Tensor]:
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    try:
        return get_fp32_state_dict_from_zero_checkpoint(str(step_dir), tag=TAG)
    except ValueError:
        # ZeRO stage 0 keeps the full module state in the model-states file.
        states = torch.load(step_dir / TAG / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)
        return states["module"]


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
    from train.parallel.ep import merge_expert_shards

    # Expert-parallel checkpoints keep each EP rank's experts in their own files.
    state = {k: v.float() for k, v in merge_expert_shards(_engine_state_dict(ckpt), ckpt).items()}
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.endswith("expert_bias")]
    if missing or unexpected:
        raise CheckpointError(f"{ckpt}: weights do not match model {cfg.name}: missing {missing[:3]}, unexpected {unexpected[:3]}")
    return model.eval(), cfg


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", required=True, type=Path, help="run dir, checkpoints/step_N dir")
    p.add_argument("--out", required=True, type=Path, help="output model directory")
    args = p.parse_args(argv)
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
