"""A rank that stops answering (SIGSTOP: a frozen process or node) under torchrun: its peer names it and exits
within train.collective_timeout_s + 30 s, and the relaunch resumes from the last complete checkpoint and replays
the steps after it, so the run's history holds each scheduled batch once and matches an uninterrupted run."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

from tests.utils import REPO, TINY, child_env, rank_process, read_metrics, run_train, train_cmd, wait_for_step

TIMEOUT_S = 10
OVERRIDES = [*[o for o in TINY if not o.startswith(("train.steps=", "train.ckpt_every="))],
             "parallel=zero2", "train.steps=16", "train.ckpt_every=4"]


def _history(run_dir: Path) -> dict[int, tuple[float, int]]:
    return {r["step"]: (r["loss"], r["batch"]) for r in read_metrics(run_dir) if "loss" in r}


def test_stopped_rank_is_named_and_the_relaunch_replays_from_the_checkpoint(tmp_path: Path) -> None:
    reference = tmp_path / "reference"
    run_train([*OVERRIDES, f"run_dir={reference}"], nproc=2)

    run_dir = tmp_path / "run"
    cmd = train_cmd([*OVERRIDES, "train.steps=16", f"train.collective_timeout_s={TIMEOUT_S}",
                     f"run_dir={run_dir}"], nproc=2)
    with open(tmp_path / "job.log", "w") as log:
        job = subprocess.Popen(cmd, cwd=REPO, env=child_env(), stdout=log, stderr=subprocess.STDOUT,
                               start_new_session=True)
        try:
            wait_for_step(run_dir, 6, timeout=180, alive=lambda: job.poll() is None)
            stalled, survivor = (rank_process(r, "RANK", f"run_dir={run_dir}") for r in (1, 0))
            assert stalled and survivor, "rank processes not found"
            os.kill(stalled, signal.SIGSTOP)
            stopped_at = time.monotonic()
            while os.path.exists(f"/proc/{survivor}") and time.monotonic() - stopped_at < TIMEOUT_S + 60:
                time.sleep(0.2)
            waited = time.monotonic() - stopped_at
            os.kill(stalled, signal.SIGKILL)  # what torchrun does to it, without waiting for its grace period
            job.wait(timeout=120)
        finally:
            if job.poll() is None:
                os.killpg(job.pid, signal.SIGKILL)
    text = (tmp_path / "job.log").read_text()
    assert waited <= TIMEOUT_S + 30, f"the survivor took {waited:.0f} s\n{text[-3000:]}"
    errors = [ln for ln in text.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1, text[-3000:]
    assert errors[0].startswith("error: rank 0: no progress for") and "stopped answering" in errors[0]
    assert f"rank 1 (host {os.uname().nodename}, pid {stalled}," in errors[0] and "checkpoints/step_" in errors[0]
    assert job.returncode != 0

    proc = run_train([*OVERRIDES, f"run_dir={run_dir}"], nproc=2)
    resumed = int(proc.stdout.split("resumed from ")[1].split(" at step ")[1].split()[0])
    assert resumed >= 4 and resumed % 4 == 0
    history = _history(run_dir)
    assert history == _history(reference)  # every step once, on its own batch, with the uninterrupted losses
    assert [b for _, (_, b) in sorted(history.items())] == list(range(16))
