"""A rank SIGKILLed in the middle of writing a checkpoint: the last complete checkpoint stays `latest` and loads,
the partial directory is ignored with one warning and removed by retention, and the relaunch replays the steps after
that checkpoint bit-identically to the first attempt."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest

import train.checkpoint
from tests.utils import TINY, run_train, train_losses

STEPS, EVERY, KILLED_AT = 12, 4, 8


@pytest.mark.slow
def test_rank_killed_mid_save_keeps_the_last_checkpoint_and_the_relaunch_replays_exactly(tmp_path, sample_data,
                                                                                         monkeypatch):
    real_save_shards = train.checkpoint.save_shards

    def save_shards_then_die(engine, named, path, *args, **kwargs):
        real_save_shards(engine, named, path, *args, **kwargs)  # DeepSpeed's files and the pieces are on disk
        if Path(path).parent.name == f"step_{KILLED_AT}.tmp" and os.environ.get("RANK") == "0":
            os.kill(os.getpid(), signal.SIGKILL)  # before meta.json and the rename: the save never completes

    monkeypatch.setattr(train.checkpoint, "save_shards", save_shards_then_die)  # the forked ranks inherit it
    overrides = [*TINY, "parallel=zero1", f"train.steps={STEPS}", f"train.ckpt_every={EVERY}", "train.keep_last=1",
                 "train.global_batch_size=4", "train.micro_batch_size=2", f"run_dir={tmp_path}"]
    killed = run_train(overrides, nproc=2, check=False, timeout=300)
    assert killed.returncode != 0
    ckpts = tmp_path / "checkpoints"
    assert (ckpts / f"step_{KILLED_AT}.tmp").is_dir(), sorted(p.name for p in ckpts.iterdir())
    assert (ckpts / "latest").resolve().name == f"step_{KILLED_AT - EVERY}"
    first_attempt = train_losses(tmp_path)
    assert sorted(first_attempt) == list(range(1, KILLED_AT + 1))

    monkeypatch.setattr(train.checkpoint, "save_shards", real_save_shards)
    resumed = run_train(overrides, nproc=2)
    assert f"resumed from {ckpts / f'step_{KILLED_AT - EVERY}'}" in resumed.stdout
    warnings = [line for line in resumed.stderr.splitlines() if f"step_{KILLED_AT}.tmp" in line]
    assert len(warnings) == 1 and warnings[0].startswith("warning: ignoring"), resumed.stderr[-2000:]
    assert sorted(p.name for p in ckpts.iterdir()) == ["latest", f"step_{STEPS}"]  # keep_last=1, partial removed
    second = train_losses(tmp_path)  # the relaunch's losses for the steps it ran
    assert sorted(second) == list(range(1, STEPS + 1))
    for step in range(KILLED_AT - EVERY + 1, KILLED_AT + 1):
        assert second[step] == first_attempt[step], (step, second[step], first_attempt[step])
