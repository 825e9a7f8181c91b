"""Checkpoints across layouts: a run saved at DP2 x ZeRO-2 resumes at DP1 and at TP2 (DeepSpeed universal
checkpoint) and continues with the losses of the uninterrupted run; impossible changes are refused clearly."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from tests.utils import TINY, run_train, train_losses
from train.checkpoint import UNIVERSAL_TAG, CheckpointError, universal_resume_needed
from train.parallel.dims import Layout

STEPS = 10
TOL = 1e-4


@pytest.fixture(scope="module")
def dp2_zero2_checkpoint(sample_data, tmp_path_factory) -> Path:
    """A DP2 x ZeRO-2 run stopped (and checkpointed) at step 5."""
    run_dir = tmp_path_factory.mktemp("dp2") / "run"
    run_train([*TINY, "parallel=zero2", f"run_dir={run_dir}", "train.stop_at=5"], nproc=2)
    assert (run_dir / "checkpoints" / "latest").resolve().name == "step_5"
    return run_dir


def _resume(saved: Path, tmp_path: Path, overrides: list[str], nproc: int, tiny_reference: list[float]) -> Path:
    run_dir = tmp_path / "run"
    shutil.copytree(saved, run_dir, symlinks=True)
    proc = run_train([*TINY, *overrides, f"run_dir={run_dir}"], nproc=nproc)
    assert "resumed from" in proc.stdout and "at step 5" in proc.stdout, proc.stdout[-2000:]
    losses = train_losses(run_dir)
    for step in range(6, STEPS + 1):
        assert abs(losses[step] - tiny_reference[step - 1]) <= TOL * abs(tiny_reference[step - 1]), (step, losses[step])
    assert (run_dir / "checkpoints" / "step_5" / UNIVERSAL_TAG).is_dir()  # converted once, next to the original
    return run_dir


@pytest.mark.slow
def test_dp2_zero2_resumes_on_one_rank(dp2_zero2_checkpoint, tiny_reference, tmp_path):
    _resume(dp2_zero2_checkpoint, tmp_path, ["parallel=zero2"], 1, tiny_reference)


@pytest.mark.slow
def test_dp2_zero2_resumes_at_tp2(dp2_zero2_checkpoint, tiny_reference, tmp_path):
    run_dir = _resume(dp2_zero2_checkpoint, tmp_path, ["parallel=tp2", "parallel.zero_stage=2"], 2, tiny_reference)
    meta = json.loads((run_dir / "checkpoints" / "step_10" / "meta.json").read_text())
    assert meta["layout"] == {"dp": 1, "tp": 2, "pp": 1, "ep": 1, "zero_stage": 2}


@pytest.mark.slow
def test_tp2_checkpoint_resumes_at_tp2(tiny_reference, tmp_path):
    """Same layout: DeepSpeed's own files (the TP shards per rank), no conversion."""
    run_dir = tmp_path / "run"
    overrides = [*TINY, "parallel=tp2_zero1", f"run_dir={run_dir}"]
    run_train([*overrides, "train.stop_at=5"], nproc=2)
    proc = run_train(overrides, nproc=2)
    assert "resumed from" in proc.stdout
    assert not (run_dir / "checkpoints" / "step_5" / UNIVERSAL_TAG).exists()
    losses = train_losses(run_dir)
    for step in range(1, STEPS + 1):
        assert abs(losses[step] - tiny_reference[step - 1]) <= 1e-5 * abs(tiny_reference[step - 1]), (step, losses[step])


def _meta(tmp_path: Path, world: int, **layout: int) -> Path:
    ckpt = tmp_path / "step_5"
    ckpt.mkdir()
    full = {"dp": world, "tp": 1, "pp": 1, "ep": 1, "zero_stage": 2} | layout
    (ckpt / "meta.json").write_text(json.dumps({"step": 5, "data": {}, "world_size": world, "layout": full}))
    return ckpt


def test_universal_resume_decision(tmp_path):
    ckpt = _meta(tmp_path, 2)
    assert not universal_resume_needed(ckpt, Layout(world=2, dp=2), 2)  # same layout: DeepSpeed's own files
    assert universal_resume_needed(ckpt, Layout(world=1, dp=1), 2)
    assert universal_resume_needed(ckpt, Layout(world=2, dp=1, tp=2), 1)
    assert universal_resume_needed(ckpt, Layout(world=4, dp=2, tp=2), 3)
    assert not universal_resume_needed(None, Layout(world=2, dp=2), 2)


@pytest.mark.parametrize(
    "saved,now,zero,words",
    [
        ({"zero_stage": 0, "tp": 2, "dp": 1}, Layout(world=1, dp=1), 1, ["ZeRO stage >= 1", "ZeRO-0"]),
        ({}, Layout(world=2, dp=1, tp=2), 0, ["ZeRO stage >= 1", "parallel.zero_stage=1"]),
        ({"ep": 2}, Layout(world=1, dp=1), 2, ["expert-parallel", "parallel.ep=2"]),
    ],
)
def test_impossible_layout_change_is_refused(saved, now, zero, words, tmp_path):
    ckpt = _meta(tmp_path, 2, **saved)
    with pytest.raises(CheckpointError) as info:
        universal_resume_needed(ckpt, now, zero)
    for w in words:
        assert w in str(info.value), str(info.value)
