"""Checkpoints across layouts: one run per source layout saves at step 4 and step 8; a new launch of another
layout resumes from step 4 through the single-device-named pieces and follows the uninterrupted run within 1e-4;
the same layout resumes from DeepSpeed's own files bit-identically; export and score read any layout."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.reference import micro_batch_reference, run_config
from tests.utils import PYTHON, REPO, TINY, child_env, run_train, start_from_checkpoint, train_losses

STEPS = 8
TOL = 1e-4
BASE = [*TINY, f"train.steps={STEPS}", "train.ckpt_every=4", "train.keep_last=3", "train.global_batch_size=8",
        "train.micro_batch_size=2"]
DENSE = [*BASE, "model=dense_tiny"]
MOE = [*BASE, "model=moe_tiny"]


@pytest.fixture(scope="module")
def tp2_pp2_run(sample_data, tmp_path_factory) -> Path:
    """dense_tiny at TP2 x PP2 (4 ranks, ZeRO-1), 8 steps, checkpoints at 4 and 8."""
    run_dir = tmp_path_factory.mktemp("tp2pp2") / "run"
    run_train([*DENSE, "parallel=tp2_pp2", f"run_dir={run_dir}"], nproc=4)
    return run_dir


@pytest.fixture(scope="module")
def ep2_pp2_run(sample_data, tmp_path_factory) -> Path:
    """moe_tiny at EP2 x PP2 (4 ranks, ZeRO-1)."""
    run_dir = tmp_path_factory.mktemp("ep2pp2") / "run"
    run_train([*MOE, "parallel=pp2", "parallel.ep=2", f"run_dir={run_dir}"], nproc=4)
    return run_dir


def _resume_elsewhere(full: Path, tmp_path: Path, overrides: list[str], nproc: int) -> dict[int, float]:
    run_dir = start_from_checkpoint(full, tmp_path / "resumed", 4)
    proc = run_train([*overrides, f"run_dir={run_dir}"], nproc=nproc)
    assert "resumed from" in proc.stdout and "at step 4" in proc.stdout, proc.stdout[-2000:]
    losses, want = train_losses(run_dir), train_losses(full)
    assert sorted(losses) == list(range(5, STEPS + 1))
    for step in range(5, STEPS + 1):
        assert abs(losses[step] - want[step]) <= TOL * abs(want[step]), (step, losses[step], want[step])
    return losses


@pytest.mark.slow
def test_tp2_pp2_resumes_at_dp2_zero2(tp2_pp2_run, tmp_path):
    _resume_elsewhere(tp2_pp2_run, tmp_path, [*DENSE, "parallel=zero2"], 2)


@pytest.mark.slow
def test_tp2_pp2_resumes_on_one_rank_zero0(tp2_pp2_run, tmp_path):
    _resume_elsewhere(tp2_pp2_run, tmp_path, [*DENSE, "parallel=zero0"], 1)


@pytest.mark.slow
def test_tp2_pp2_resumes_at_the_same_layout_bit_identically(tp2_pp2_run, tmp_path):
    run_dir = start_from_checkpoint(tp2_pp2_run, tmp_path / "same", 4)
    run_train([*DENSE, "parallel=tp2_pp2", f"run_dir={run_dir}"], nproc=4)
    resumed, full = train_losses(run_dir), train_losses(tp2_pp2_run)
    assert {s: resumed[s] for s in range(5, STEPS + 1)} == {s: full[s] for s in range(5, STEPS + 1)}


@pytest.mark.slow
def test_ep2_pp2_resumes_without_expert_parallelism(ep2_pp2_run, tmp_path):
    """EP2 x PP2 -> EP1 on 2 ranks (ZeRO-1, the whole model, all experts on each rank)."""
    _resume_elsewhere(ep2_pp2_run, tmp_path, [*MOE, "parallel=zero1"], 2)


@pytest.mark.slow
def test_export_and_score_of_a_tp2_pp2_checkpoint_give_the_single_process_logits(tp2_pp2_run, tmp_path):
    """The step-8 weights read back from the TP2 x PP2 pieces give the logits of one process trained the same 8
    steps (plain PyTorch, tests.reference), through `train.export` and through `train.score`."""
    run = run_config(DENSE)
    reference_model = _reference_model_after(DENSE, STEPS)
    tokens = np.random.default_rng(0).integers(0, run.model.vocab_size, size=(2, 16), dtype=np.int64)
    with torch.no_grad():
        want = reference_model(torch.from_numpy(tokens)).logits.numpy()

    np.save(tmp_path / "in.npy", tokens)
    score = subprocess.run([PYTHON, "-m", "train.score", "--checkpoint", str(tp2_pp2_run), "--tokens",
                            str(tmp_path / "in.npy"), "--out", str(tmp_path / "out.npy")],
                           cwd=REPO, env=child_env(), capture_output=True, text=True, timeout=300, check=False)
    assert score.returncode == 0, score.stderr[-3000:]
    got = np.load(tmp_path / "out.npy")
    assert got.shape == want.shape
    assert np.abs(got - want).max() <= TOL * np.abs(want).max(), np.abs(got - want).max()

    export = subprocess.run([PYTHON, "-m", "train.export", "--checkpoint", str(tp2_pp2_run), "--out",
                             str(tmp_path / "model")], cwd=REPO, env=child_env(), capture_output=True, text=True,
                            timeout=300, check=False)
    assert export.returncode == 0, export.stderr[-3000:]
    from train.export import load_trained_model

    exported, _ = load_trained_model(tmp_path / "model")
    with torch.no_grad():
        again = exported(torch.from_numpy(tokens)).logits.numpy()
    np.testing.assert_array_equal(again, got)


def _reference_model_after(overrides: list[str], steps: int) -> torch.nn.Module:
    """The plain-PyTorch reference of tests.reference, kept after ``steps`` steps."""
    holder: dict[str, torch.nn.Module] = {}
    micro_batch_reference(overrides, steps, keep_model=holder)
    return holder["model"].eval()


def test_checkpoint_without_pieces_names_the_layout_to_resume_with(sample_data, tmp_path):
    ckpt = tmp_path / "checkpoints" / "step_4"
    ckpt.mkdir(parents=True)
    layout = {"world": 2, "dp": 2, "tp": 1, "pp": 1, "ep": 1, "zero_stage": 2, "sequence_parallel": False}
    (ckpt / "meta.json").write_text(json.dumps({"step": 4, "data": {}, "world_size": 2, "layout": layout}))
    (ckpt / "config.yaml").write_text("{}")
    (tmp_path / "checkpoints" / "latest").symlink_to("step_4")
    proc = run_train([*DENSE, "parallel=zero0", f"run_dir={tmp_path}"], nproc=1, check=False)
    assert proc.returncode == 1
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and "relaunch with that layout" in lines[0] and "'world': 2" in lines[0], proc.stderr[-2000:]


@pytest.mark.slow
def test_hybrid_tp2_resumes_on_one_rank(sample_data, tmp_path):
    """Mamba's in_proj is held under TP as a strided slice ([2, d_inner/tp, D] of the weight viewed as
    [2, d_inner, D]); the one-rank run reads it back at its single-device shape."""
    hybrid = [*BASE, "model=hybrid_tiny"]
    full = tmp_path / "tp2"
    run_train([*hybrid, "parallel=tp2", "parallel.zero_stage=1", f"run_dir={full}"], nproc=2)
    _resume_elsewhere(full, tmp_path, [*hybrid, "parallel=zero0"], 1)
