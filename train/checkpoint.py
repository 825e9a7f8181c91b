"""Checkpoints: one contract for every parallel layout.

Layout under ``run_dir/checkpoints``::

    step_100/            a complete checkpoint:
      ds/                DeepSpeed's own files for this layout (a same-layout resume is bit-identical)
      shards/            weights, AdamW moments and buffers under the single-device model's names, in pieces
                         (train.checkpoint_shards): a run of any other layout reads exactly its own slices
      rng_rank*.json     each rank's generator states
      meta.json          step, data-loader state, the layout it was saved with
      config.yaml
    step_200/
    latest -> step_200   symlink, replaced atomically only after a checkpoint is complete

A checkpoint is written to ``step_N.tmp`` first and renamed when every rank has finished, so an interrupted or
failed save (full disk, second signal, a rank killed mid-save) never touches the last good one; a resume ignores the
partial directory (with a warning) and retention removes it. Nothing here is unpickled: the pieces are
safetensors, the rest JSON; DeepSpeed's pickles are loaded weights-only (train.safe_load), and checked before
DeepSpeed reads them, so a crafted file is refused on every rank at once.
"""

from __future__ import annotations

import json
import os
import pickle
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from train.checkpoint_shards import ShardReader, load_shards, param_shard, save_shards
from train.safe_load import refusal, refused_message

TAG = "ds"
SHARDS = "shards"


class CheckpointError(RuntimeError):
    """Saving or loading a checkpoint failed; the message names the cause and the fix."""


class UntrustedCheckpointError(CheckpointError):
    """A checkpoint file holds a pickle that would run code or build objects beyond plain tensors and data."""


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
    """Every generator's state as JSON values (checkpoint files are never unpickled)."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state().tolist(),
        "numpy": [kind, keys.tolist(), int(pos), int(has_gauss), float(gauss)],
        "python": [version, list(internal), gauss_next],
    }
    if torch.cuda.is_available():
        state["cuda"] = [s.tolist() for s in torch.cuda.get_rng_state_all()]
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, gauss))
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([torch.tensor(s, dtype=torch.uint8) for s in state["cuda"]])


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
    module: Any, run_dir: Path, step: int, data_state: dict[str, Any], config_yaml: str, keep_last: int
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
        module.save_engine_state(tmp, TAG, step)
        save_shards(module.engine, module.named_parameters(), tmp / SHARDS, module.named_buffers())
        (tmp / f"rng_rank{rank}.json").write_text(json.dumps(_rng_state()))
        if rank == 0:
            (tmp / "config.yaml").write_text(config_yaml)
            meta = {"step": step, "data": data_state, "world_size": dist.get_world_size() if dist.is_initialized() else 1,
                    "layout": layout_record(module)}
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


def partial_checkpoints(run_dir: Path) -> list[Path]:
    """Directories of saves that never finished (``step_N.tmp``: a rank killed or a node lost mid-save). They are
    never loaded; retention removes them at the next save."""
    root = checkpoint_root(run_dir)
    return sorted(p for p in root.glob("step_*.tmp") if p.is_dir()) if root.is_dir() else []


def _prune(root: Path, keep_last: int) -> None:
    """Keeps the newest ``keep_last`` complete checkpoints, and always the one ``latest`` names; removes partial
    saves (called after this save's directory was published, so no save is in progress)."""
    latest = (root / "latest").resolve() if (root / "latest").exists() else None
    steps = sorted(
        (int(p.name.split("_")[1]), p) for p in root.glob("step_*") if p.is_dir() and not p.name.endswith(".tmp")
    )
    for _, path in steps[:-keep_last]:
        if path.resolve() != latest:
            shutil.rmtree(path, ignore_errors=True)
    for partial in root.glob("step_*.tmp"):
        shutil.rmtree(partial, ignore_errors=True)


def layout_record(module: Any) -> dict[str, Any]:
    """What decides whether DeepSpeed's own files fit a run: every axis size, ZeRO stage, sequence parallelism."""
    lay = module.layout
    record = {axis: getattr(lay, axis) for axis in ("world", "dp", "tp", "pp", "ep")}
    if lay.cp > 1:  # absent at cp = 1, so checkpoints saved before context parallelism existed keep their layout
        record["cp"] = lay.cp
    return record | {"zero_stage": module.engine.zero_optimization_stage(), "sequence_parallel": module.sequence_parallel}


def load_checkpoint(module: Any, ckpt: Path) -> dict[str, Any]:
    """Collective. Restores the model, optimizer and lr schedule (and, for the same layout, each rank's RNG);
    returns meta. The same layout loads DeepSpeed's files; any other goes through the pieces in ``shards/``."""
    meta = json.loads((ckpt / "meta.json").read_text())
    if meta.get("layout") == layout_record(module):
        _check_engine_files(ckpt / TAG)
        try:
            loaded = module.load_engine_state(ckpt, TAG)
        except pickle.UnpicklingError as e:  # a file replaced after the check
            raise UntrustedCheckpointError(refused_message(ckpt / TAG, e)) from None
        if not loaded:
            raise CheckpointError(f"DeepSpeed found no engine state under {ckpt}/{TAG}; the checkpoint is incomplete")
        _restore_expert_weights(module, ckpt / SHARDS)
        rank = dist.get_rank() if dist.is_initialized() else 0
        rng_file = ckpt / f"rng_rank{rank}.json"
        if rng_file.exists():
            _set_rng_state(json.loads(rng_file.read_text()))
        return meta
    if not (ckpt / SHARDS / "state.json").exists():
        raise CheckpointError(f"{ckpt} has no {SHARDS}/ pieces, so it resumes only with the layout it was saved with "
                              f"({meta.get('layout')}); relaunch with that layout")
    try:
        load_shards(module.engine, module.named_parameters(), ckpt / SHARDS, module.named_buffers())
    except (KeyError, ValueError, FileNotFoundError) as e:
        raise CheckpointError(f"{ckpt}: {e}") from e
    return meta


def _check_engine_files(engine_dir: Path) -> None:
    """Collective. Every rank checks its share of DeepSpeed's files; all raise if any file is refused, before
    DeepSpeed reads one (a rank failing alone inside its load would leave the others in a collective)."""
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    files = sorted(engine_dir.rglob("*.pt"))
    first_bad = next((i for i in range(rank, len(files), world) if refusal(files[i])), len(files))
    if dist.is_initialized():
        t = torch.tensor([first_bad], dtype=torch.int64)
        if dist.get_backend() == "nccl":
            t = t.cuda()
        dist.all_reduce(t, op=dist.ReduceOp.MIN)
        first_bad = int(t.item())
    if first_bad < len(files):
        raise UntrustedCheckpointError(refusal(files[first_bad]) or f"{files[first_bad]} changed while it was checked")


@torch.no_grad()
def _restore_expert_weights(module: Any, shards: Path) -> None:
    """DeepSpeed's model file holds one rank's copy of the module, so each expert-parallel rank's experts come
    from the pieces (exact fp32 values of the same step)."""
    experts = [(name, p) for name, p in module.named_parameters() if getattr(p, "allreduce", True) is False]
    if not experts:
        return
    with ShardReader(shards) as reader:
        for name, p in experts:
            p.data.copy_(reader.read(name, "param", param_shard(p), tuple(p.shape)).to(p.dtype))
