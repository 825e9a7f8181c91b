"""Tensor parallelism (megatron-core layers, sequence parallelism on) composed with every ZeRO stage, with data
parallelism and with expert parallelism: the real trainer's losses over 10 steps against one process. Gradients of
every family under TP are checked in tests/test_parallel_3d.py and tests/test_parallel_tp_layers.py."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.reference import assert_losses_close
from tests.utils import TINY, read_metrics, run_train, train_losses

STEPS = 10
REL_TOL = 1e-5


def _tp2_run(stage: int, tiny_reference: list[float], tmp_path: Path, nproc: int = 2) -> None:
    run_dir = tmp_path / f"tp2_zero{stage}"
    proc = run_train([*TINY, "parallel=tp2", f"parallel.zero_stage={stage}", f"run_dir={run_dir}"], nproc=nproc)
    assert f"world {nproc} (dp {nproc // 2}, tp 2)" in proc.stdout, proc.stdout[-2000:]
    assert_losses_close(train_losses(run_dir), tiny_reference)
    # Clipping at 1.0 is active in these steps (norm > 1), so the global norm over the shards must be right.
    norms = [r["grad_norm"] for r in read_metrics(run_dir) if "grad_norm" in r]
    assert max(norms) > 1.0, norms


def test_tp2_zero1_matches_single_process(tiny_reference, tmp_path):
    _tp2_run(1, tiny_reference, tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize("stage", [0, 2, 3])
def test_tp2_other_zero_stages_match_single_process(stage, tiny_reference, tmp_path):
    _tp2_run(stage, tiny_reference, tmp_path)


@pytest.mark.slow
def test_tp2_x_dp2_zero1_on_four_ranks_matches_single_process(tiny_reference, tmp_path):
    _tp2_run(1, tiny_reference, tmp_path, nproc=4)


@pytest.mark.slow
def test_tp2_ep2_on_four_ranks_matches_ep2_on_two(sample_data, tmp_path):
    """TP (attention, MLP, head, experts) composed with expert parallelism: the same micro-batches per
    data-parallel rank, so the losses and clipped grad norms equal those of EP alone."""
    common = [*TINY, "model=moe_tiny", "train.ckpt_every=100"]
    run_train([*common, "parallel=tp2_ep2", f"run_dir={tmp_path / 'tp_ep'}"], nproc=4)
    run_train([*common, "parallel=ep2", "parallel.zero_stage=1", f"run_dir={tmp_path / 'ep'}"], nproc=2)
    got, want = read_metrics(tmp_path / "tp_ep"), read_metrics(tmp_path / "ep")
    pairs = [(g, w) for g, w in zip(got, want, strict=True) if "grad_norm" in w]
    assert len(pairs) == STEPS
    for g, w in pairs:
        assert abs(g["loss"] - w["loss"]) <= REL_TOL * abs(w["loss"]), (g, w)
        assert abs(g["grad_norm"] - w["grad_norm"]) <= 1e-4 * w["grad_norm"], (g, w)
