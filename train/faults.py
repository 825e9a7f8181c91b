"""What went wrong in a run and what is kept of it: NaN/inf steps, rollbacks, loss spikes, replaced samples,
the batches never to train on again; which exceptions mean a peer was lost; what the error lines say."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch.distributed as dist

from train.checkpoint import CheckpointError, latest_checkpoint
from train.config import RunConfig

SKIPPED_BATCHES = "skipped_batches.json"  # in the run dir: batches rolled back over, for every later launch
EXIT_NONFINITE = 3  # train.on_nan=stop (or rollbacks exhausted): nothing saved after the last checkpoint


class FaultCounters:
    """What went wrong so far in the run (steps with NaN/inf, rollbacks, loss spikes, samples of bad shards
    replaced under data.on_error=skip), carried in every checkpoint's data state."""

    def __init__(self) -> None:
        self.nonfinite_steps = self.rollbacks = self.spikes = self.replaced_samples = 0
        self.skipped_batches: set[int] = set()

    def load(self, data_state: dict[str, Any]) -> None:
        saved = data_state.get("faults", {})
        self.nonfinite_steps = int(saved.get("nonfinite_steps", 0))
        self.rollbacks = int(saved.get("rollbacks", 0))
        self.spikes = int(saved.get("spikes", 0))
        self.replaced_samples = int(saved.get("replaced_samples", 0))
        self.skipped_batches = {int(b) for b in saved.get("skipped_batches", [])}

    def state_dict(self, skipped_batches: set[int]) -> dict[str, Any]:
        return {"faults": {"nonfinite_steps": self.nonfinite_steps, "rollbacks": self.rollbacks,
                           "spikes": self.spikes, "replaced_samples": self.replaced_samples,
                           "skipped_batches": sorted(skipped_batches)}}

    def metrics(self, zscore: float | None) -> dict[str, float]:
        out = {"nonfinite_steps": float(self.nonfinite_steps), "rollbacks": float(self.rollbacks),
               "loss_spikes": float(self.spikes), "data_replaced_samples": float(self.replaced_samples)}
        if zscore is not None:
            out["loss_zscore"] = zscore
        return out


def peer_failure(e: BaseException) -> bool:
    """A collective failed because another rank died or its connection broke (not a bug in this rank)."""
    if isinstance(e, dist.DistError):
        return True
    text = str(e)
    return any(s in text for s in ("Connection closed by peer", "Connection reset by peer", "Broken pipe",
                                   "NCCL communicator was aborted", "Timed out waiting"))


def last_good(run_dir: Path) -> str:
    try:
        return str(latest_checkpoint(run_dir) or "the start (no checkpoint yet)")
    except CheckpointError:
        return "its last complete checkpoint"


def read_skipped_batches(run_dir: Path) -> set[int]:
    path = run_dir / SKIPPED_BATCHES
    return {int(b) for b in json.loads(path.read_text())} if path.is_file() else set()


def record_skipped_batches(run_dir: Path, skip: set[int]) -> None:
    """Beside the checkpoints, at once: a relaunch from a checkpoint older than the rollback skips them too."""
    tmp = run_dir / (SKIPPED_BATCHES + ".tmp")
    tmp.write_text(json.dumps(sorted(skip)))
    os.replace(tmp, run_dir / SKIPPED_BATCHES)


def nonfinite_hint(cfg: RunConfig, run_dir: Path, index: int) -> str:
    latest = latest_checkpoint(run_dir)
    where = f"the last checkpoint is {latest}" if latest else "no checkpoint yet"
    if cfg.train.on_nan == "rollback":
        return f"{where}; train.max_rollbacks={cfg.train.max_rollbacks} reached or nothing to roll back to"
    return (f"{where}; relaunch with train.on_nan=rollback or skip, train.skip_batches=[{index}], "
            "or a lower optim.lr")
