"""DeepSpeed ZeRO 0-3 on 2 ranks against a single-process plain-PyTorch loop, and exact resume."""

from __future__ import annotations

import pytest

from tests.reference import assert_losses_close
from tests.utils import TINY, run_train, start_from_checkpoint, train_losses

STEPS = 10


@pytest.mark.slow
@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_zero_two_ranks_match_single_process_and_resume_exactly(stage, tiny_reference, tmp_path):
    full = tmp_path / "full"
    run_train([*TINY, f"parallel=zero{stage}", f"run_dir={full}"], nproc=2)
    full_losses = train_losses(full)
    assert_losses_close(full_losses, tiny_reference)
    assert tiny_reference[-1] < tiny_reference[0]

    # A new launch resumes from the step-5 checkpoint: the following losses are bit-identical.
    part = start_from_checkpoint(full, tmp_path / "part", 5)
    proc = run_train([*TINY, f"parallel=zero{stage}", f"run_dir={part}"], nproc=2)
    assert "resumed from" in proc.stdout
    resumed = train_losses(part)
    assert sorted(resumed) == list(range(6, STEPS + 1))
    for step in range(6, STEPS + 1):
        assert resumed[step] == full_losses[step], (stage, step, resumed[step], full_losses[step])


@pytest.mark.slow
def test_cli_zero2_two_ranks_equals_zero0_one_rank_accumulating(tiny_reference, tmp_path):
    """`python -m train parallel=zero0` (1 rank, 4 micro-batches accumulated) gives the same losses."""
    one = tmp_path / "one"
    run_train([*TINY, "parallel=zero0", f"run_dir={one}", "train.ckpt_every=100"], nproc=1)
    assert_losses_close(train_losses(one), tiny_reference)
