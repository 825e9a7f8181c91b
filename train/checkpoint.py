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

from train.checkpoint_layout_free import (
    has_layout_free_state,
    layout_free_supported,
    load_layout_free_state,
    save_layout_free_state,
)
from train.parallel.ep import load_expert_shards, save_expert_shards

TAG = "ds"
UNIVERSAL_TAG = "universal"  # DeepSpeed universal checkpoint converted from TAG, for resuming under another layout


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
        engine = module.engine
        save_expert_shards(engine.module, tmp)  # expert-parallel runs: each EP rank's experts (else no-op)
        if layout_free_supported(module):  # model-named state: resume under another PP/DP layout
            save_layout_free_state(module, tmp)
        (tmp / f"rng_rank{rank}.json").write_text(json.dumps(_rng_state()))
        if rank == 0:
            (tmp / "config.yaml").write_text(config_yaml)
            meta = {"step": step, "data": data_state, "world_size": dist.get_world_size() if dist.is_initialized() else 1}
            lay = module.layout
            meta["layout"] = {"dp": lay.dp, "tp": lay.tp, "pp": lay.pp, "ep": lay.ep,
                              "zero_stage": engine.zero_optimization_stage()}
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


def load_checkpoint(module: Any, ckpt: Path) -> dict[str, Any]:
    """Collective. Restores engine (model, optimizer, lr schedule) and this rank's RNG; returns meta."""
    rank = dist.get_rank() if dist.is_initialized() else 0
    meta = json.loads((ckpt / "meta.json").read_text())
    world = dist.get_world_size() if dist.is_initialized() else 1
    engine = module.engine
    saved = meta.get("layout") or {}
    same_stages = saved.get("pp", meta.get("pp", 1)) == module.layout.pp
    if engine.load_universal_checkpoint():  # the trainer saw a TP/DP layout change (universal_resume_needed)
        _load_universal(engine, ckpt)
        return meta
    if meta["world_size"] != world or not same_stages:
        # Another layout: DeepSpeed's files are bound to theirs; the model-named copy (train.parallel.pp) is not.
        if not (has_layout_free_state(ckpt) and layout_free_supported(module)):
            raise CheckpointError(
                f"{ckpt} was saved with {meta['world_size']} ranks ({saved}) and this run has {world} "
                f"({module.layout.describe()}); resuming under another layout needs a ZeRO 0/1 checkpoint without TP/EP: resume with "
                "the same number of ranks and parallel settings"
            )
        load_layout_free_state(module, ckpt)
        return meta
    if not module.load_engine_state(ckpt, TAG):
        raise CheckpointError(f"DeepSpeed found no engine state under {ckpt}/{TAG}; the checkpoint is incomplete")
    try:
        load_expert_shards(engine.module, ckpt)  # DeepSpeed's model file holds rank 0's experts only
    except RuntimeError as e:
        raise CheckpointError(str(e)) from e
    rng_file = ckpt / f"rng_rank{rank}.json"
    if rng_file.exists():
        _set_rng_state(json.loads(rng_file.read_text()))
    return meta


# ------------------------------------------------------------------------------ resuming under another layout
# Another TP/DP layout goes through DeepSpeed's universal checkpoint: `ds_to_universal` turns the ZeRO
# shards into one fp32 tensor + Adam moments per parameter name, and an engine built with
# `"checkpoint": {"load_universal": true}` slices them for its own ZeRO partitioning and AutoTP shards. This is
# DeepSpeed's own resharding, so nothing of ours has to know the flat-buffer layout. It needs ZeRO >= 1 on both
# sides (ZeRO-0 keeps a plain torch optimizer state, which the universal loader does not read) and no pipeline
# or expert parallelism (their files are ours: see train.parallel.pp's layout-free state for ZeRO 0/1 pipelines).
# The conversion marks the checkpoint with DeepSpeed's universal-checkpoint version (`inject_missing_state`):
# passing it as `client_state` at save time is refused by DeepSpeed 0.19 (a reserved key).


def _saved_layout(meta: dict[str, Any], layout: Any) -> dict[str, Any]:
    # Checkpoints written before layouts were recorded carry only world_size (and pp): take the current tp/ep,
    # so they resume as before when the world size matches (DeepSpeed checks the rest).
    saved = meta.get("layout") or {}
    return {
        "world": int(meta["world_size"]), "tp": int(saved.get("tp", layout.tp)),
        "pp": int(saved.get("pp", meta.get("pp", 1))), "ep": int(saved.get("ep", layout.ep)),
        "zero_stage": saved.get("zero_stage", "?"),
    }


def universal_resume_needed(ckpt: Path | None, layout: Any, zero_stage: int) -> bool:
    """Whether resuming ``ckpt`` under ``layout`` must load a universal checkpoint (call before building the
    engine: DeepSpeed takes `load_universal` from its config). False for the same layout, or for a layout change
    that the pipeline's layout-free state handles (ZeRO 0/1, pipelines); raises CheckpointError if impossible."""
    if ckpt is None:
        return False
    saved = _saved_layout(json.loads((Path(ckpt) / "meta.json").read_text()), layout)
    saved_zero = saved["zero_stage"] if isinstance(saved["zero_stage"], int) else 0
    now = {"world": layout.world, "tp": layout.tp, "pp": layout.pp, "ep": layout.ep}
    if all(saved[k] == now[k] for k in now):
        return False
    if saved["pp"] > 1 or layout.pp > 1 or (saved["tp"] == 1 and layout.tp == 1 and max(saved_zero, zero_stage) <= 1):
        return False  # pipelines and ZeRO 0/1 data parallelism: train.parallel.pp's layout-free state
    what = (f"{ckpt} was saved with world {saved['world']} (tp {saved['tp']}, pp {saved['pp']}, ep {saved['ep']}, "
            f"ZeRO-{saved['zero_stage']}) and this run has world {layout.world} (tp {layout.tp}, pp {layout.pp}, "
            f"ep {layout.ep}, ZeRO-{zero_stage})")
    if saved["ep"] > 1 or layout.ep > 1:
        raise CheckpointError(f"{what}; expert-parallel checkpoints resume with the same layout only: relaunch with "
                              f"{saved['world']} ranks and parallel.ep={saved['ep']}")
    if saved_zero < 1 or zero_stage < 1:
        raise CheckpointError(f"{what}; resuming under another tensor-parallel layout goes through DeepSpeed's "
                              "universal checkpoint, which needs ZeRO stage >= 1 on both sides: set "
                              "parallel.zero_stage=1 (or resume with the saved layout)")
    return True


def _convert_to_universal(ckpt: Path) -> Path:
    """Rank 0: `ds_to_universal` of ``ckpt/TAG`` into ``ckpt/UNIVERSAL_TAG`` (once; published by a rename)."""
    import argparse
    import contextlib
    import io

    from deepspeed.checkpoint.ds_to_universal import main as ds_to_universal

    out = ckpt / UNIVERSAL_TAG
    if out.exists():
        return out
    tmp = ckpt / f"{UNIVERSAL_TAG}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    args = argparse.Namespace(input_folder=str(ckpt / TAG), output_folder=str(tmp), num_extract_workers=1,
                              num_merge_workers=1, keep_temp_folder=False, strict=True, inject_missing_state=True)
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):  # progress bars
        ds_to_universal(args)
    os.replace(tmp, out)
    return out


def _load_universal(engine: Any, ckpt: Path) -> None:
    rank = dist.get_rank() if dist.is_initialized() else 0
    error: Exception | None = None
    if rank == 0:
        try:
            _convert_to_universal(ckpt)
        except (OSError, RuntimeError, AssertionError, ValueError) as e:
            error = e
    if _any_rank(error is not None):
        raise CheckpointError(f"converting {ckpt}/{TAG} to a universal checkpoint failed ({_describe(error)}); "
                              "resume with the layout it was saved with")
    _barrier()
    load_path, _ = engine.load_checkpoint(
        str(ckpt), tag=UNIVERSAL_TAG, load_optimizer_states=True, load_lr_scheduler_states=True
    )
    if load_path is None:
        raise CheckpointError(f"DeepSpeed found no universal state under {ckpt}/{UNIVERSAL_TAG}")
