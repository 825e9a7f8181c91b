"""Checkpoints: DeepSpeed engine state + data-loader state + RNG + step + resolved config.

Layout under ``run_dir/checkpoints``::

    step_100/            a complete checkpoint (engine state under tag "ds", rng_rank*.pt, meta.json, config.yaml)
    step_200/
    latest -> step_200   symlink, replaced atomically only after a checkpoint is complete

A checkpoint is written to ``step_N.tmp`` first and renamed when every rank has finished, so
an interrupted or failed save (full disk, second signal) never touches the last good one.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

TAG = "ds"


class CheckpointError(RuntimeError):
    """Saving or loading a checkpoint failed; the message names the cause and the fix."""


def checkpoint_root(run_dir: Path) -> Path:
    return Path(run_dir) / "checkpoints"


def latest_checkpoint(run_dir: Path) -> Path | None:
    link = checkpoint_root(run_dir) / "latest"
    if not link.exists():
        return None
    target = link.resolve()
    if not (target / "meta.json").exists():
        raise CheckpointError(f"{link} points at {target}, which is not a complete checkpoint (no meta.json)")
    return target


def _rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _any_rank(flag: bool) -> bool:
    if not dist.is_initialized():
        return flag
    t = torch.tensor([1 if flag else 0], dtype=torch.int32)
    if dist.get_backend() == "nccl":
        t = t.cuda()
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def save_checkpoint(
    engine: Any, run_dir: Path, step: int, data_state: dict[str, Any], config_yaml: str, keep_last: int
) -> Path:
    """Collective: every rank calls it. Returns the published checkpoint directory."""
    rank = dist.get_rank() if dist.is_initialized() else 0
    root = checkpoint_root(run_dir)
    final = root / f"step_{step}"
    tmp = root / f"step_{step}.tmp"
    if rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
    _barrier()
    error: Exception | None = None
    try:
        engine.save_checkpoint(str(tmp), tag=TAG, client_state={"step": step}, save_latest=False)
        torch.save(_rng_state(), tmp / f"rng_rank{rank}.pt")
        if rank == 0:
            (tmp / "config.yaml").write_text(config_yaml)
            meta = {"step": step, "data": data_state, "world_size": dist.get_world_size() if dist.is_initialized() else 1}
            (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
    except (OSError, RuntimeError) as e:  # full disk, quota, permissions (torch.save wraps write errors
        error = e  # in RuntimeError): report once, keep the last good checkpoint
    if _any_rank(error is not None):
        if rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        _barrier()
        last = latest_checkpoint(run_dir)
        raise CheckpointError(
            f"saving the checkpoint of step {step} to {tmp} failed ({_describe(error)}); the last good checkpoint "
            f"{last if last else '(none yet)'} is untouched; free disk space ({_free_mb(root)} MB free) or point "
            "run_dir at a larger file system writable by every rank, then rerun with train.resume=auto"
        )
    _barrier()
    if rank == 0:
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        _fsync_dir(root)
        link_tmp = root / "latest.tmp"
        if link_tmp.is_symlink() or link_tmp.exists():
            link_tmp.unlink()
        os.symlink(final.name, link_tmp)
        os.replace(link_tmp, root / "latest")  # atomic: readers see the old or the new checkpoint
        _fsync_dir(root)
        _prune(root, keep_last)
    _barrier()
    return final


def _describe(error: Exception | None) -> str:
    if error is None:
        return "on another rank"
    if isinstance(error, OSError) and error.errno:
        return os.strerror(error.errno)
    return str(error).strip().splitlines()[0][:200]


def _free_mb(path: Path) -> int:
    try:
        return shutil.disk_usage(path).free // 2**20
    except OSError:
        return -1


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _prune(root: Path, keep_last: int) -> None:
    steps = sorted(
        (int(p.name.split("_")[1]), p) for p in root.glob("step_*") if p.is_dir() and not p.name.endswith(".tmp")
    )
    for _, path in steps[:-keep_last]:
        shutil.rmtree(path, ignore_errors=True)


def load_checkpoint(engine: Any, ckpt: Path) -> dict[str, Any]:
    """Collective. Restores engine (model, optimizer, lr schedule) and this rank's RNG; returns meta."""
    rank = dist.get_rank() if dist.is_initialized() else 0
    meta = json.loads((ckpt / "meta.json").read_text())
    world = dist.get_world_size() if dist.is_initialized() else 1
    if meta["world_size"] != world:
        raise CheckpointError(
            f"{ckpt} was saved with {meta['world_size']} ranks and this run has {world}; resuming at another "
            "world size is not supported yet: resume with the same number of ranks"
        )
    load_path, _ = engine.load_checkpoint(str(ckpt), tag=TAG, load_optimizer_states=True, load_lr_scheduler_states=True)
    if load_path is None:
        raise CheckpointError(f"DeepSpeed found no engine state under {ckpt}/{TAG}; the checkpoint is incomplete")
    rng_file = ckpt / f"rng_rank{rank}.pt"
    if rng_file.exists():
        _set_rng_state(torch.load(rng_file, weights_only=False))
    return meta
