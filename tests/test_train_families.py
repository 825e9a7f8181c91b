"""MoE and hybrid (Jamba-style) models through the whole spine: 2 ranks, ZeRO-2, resume."""

from __future__ import annotations

import json

import pytest

from tests.utils import TINY, read_metrics, run_train, start_from_checkpoint, train_losses

STEPS = 30


@pytest.mark.slow
@pytest.mark.parametrize("model", ["moe_tiny", "hybrid_tiny"])
def test_family_trains_on_two_ranks_and_resumes_bit_identically(model, tmp_path, sample_data):
    common = [*TINY, f"model={model}", "parallel=zero2", f"train.steps={STEPS}", "train.ckpt_every=10", "train.keep_last=3",
              "sched.warmup_steps=5", "train.global_batch_size=8", "train.micro_batch_size=2"]
    full = tmp_path / "full"
    run_train([*common, f"run_dir={full}"], nproc=2)
    losses = train_losses(full)
    assert sorted(losses) == list(range(1, STEPS + 1))
    first, last = sum(losses[s] for s in range(1, 6)) / 5, sum(losses[s] for s in range(STEPS - 4, STEPS + 1)) / 5
    assert last < first - 0.5, (first, last)

    records = read_metrics(full)
    aux = [r["aux_loss"] for r in records if "aux_loss" in r]
    assert all(a > 0 for a in aux), "MoE layers add a positive load-balancing + z-loss"
    load_keys = {k for r in records for k in r if k.startswith("moe/layer")}
    assert any(k.endswith("max_over_mean_load") for k in load_keys)
    summary = json.loads((full / "summary.json").read_text())
    assert summary["n_active_params"] < summary["n_params"]

    # A new launch from the uninterrupted run's step-20 checkpoint: steps 21-30 are bit-identical.
    part = start_from_checkpoint(full, tmp_path / "part", 20)
    proc = run_train([*common, f"run_dir={part}"], nproc=2)
    assert "resumed from" in proc.stdout
    resumed = train_losses(part)
    assert sorted(resumed) == list(range(21, STEPS + 1))
    for step in range(21, STEPS + 1):
        assert resumed[step] == losses[step], (model, step, resumed[step], losses[step])
