"""A rank that stops answering (SIGSTOP: a frozen process or node) under torchrun: its peer names it and exits
once train.collective_timeout_s has passed without progress (within the watchdog's check period), and the relaunch
resumes from the last complete checkpoint and replays the steps after it, so the run's history holds each
scheduled batch once and matches an uninterrupted run."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

from tests.utils import REPO, TINY, child_env, rank_process, read_metrics, run_train, train_cmd, wait_for_step
from train.watchdog import heartbeat_period, store_timeout_s

TIMEOUT_S = 10
POLL_S = 0.2
OVERRIDES = [*[o for o in TINY if not o.startswith(("train.steps=", "train.ckpt_every="))],
             "parallel=zero2", "train.steps=16", "train.ckpt_every=4"]


def _history(run_dir: Path) -> dict[int, tuple[float, int]]:
    return {r["step"]: (r["loss"], r["batch"]) for r in read_metrics(run_dir) if "loss" in r}


def _running(pid: int) -> bool:
    """Not exited (an exited rank stays a zombie until torchrun reaps it)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def _longest_iteration_s(run_dir: Path) -> float:
    """The longest training-loop iteration rank 0 logged (log_every=1: the interval between two train records,
    checkpoint saves included), step 1's start-up aside."""
    rows = [r for r in read_metrics(run_dir) if "tokens_per_s" in r and r["step"] >= 2]
    assert rows, "no train records after step 1"
    return max(r["tokens"] / r["step"] / r["tokens_per_s"] for r in rows)


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
            while _running(survivor) and time.monotonic() - stopped_at < TIMEOUT_S + 60:
                time.sleep(POLL_S)
            waited = time.monotonic() - stopped_at
            os.kill(stalled, signal.SIGKILL)  # what torchrun does to it, without waiting for its grace period
            job.wait(timeout=120)
        finally:
            if job.poll() is None:
                os.killpg(job.pid, signal.SIGKILL)
    text = (tmp_path / "job.log").read_text()
    errors = [ln for ln in text.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1, text[-3000:]
    assert errors[0].startswith("error: rank 0: no progress for") and "stopped answering" in errors[0]
    # The survivor checks every period, each check delayed by at most one heartbeat's store timeout: it fires
    # more than TIMEOUT_S and at most TIMEOUT_S + period + store timeout (10 + 1 + 2 s) after its last progress
    # (printed to the second). That progress is within one loop iteration of the SIGSTOP either way: before it,
    # or on entering the next iteration, which then blocks in a collective with the stopped rank. Its diagnosis
    # reads the live store in torchrun's agent and it exits at once; the test sees that within one poll.
    period = heartbeat_period(TIMEOUT_S)
    detect_s = TIMEOUT_S + period + store_timeout_s(period)
    no_progress_s = int(errors[0].split("no progress for ")[1].split(" s ")[0])
    assert TIMEOUT_S <= no_progress_s <= round(detect_s), errors[0]
    iteration_s = _longest_iteration_s(run_dir)
    assert TIMEOUT_S - iteration_s < waited <= iteration_s + detect_s + POLL_S, (
        f"the survivor exited {waited:.1f} s after the stop (loop iterations up to {iteration_s:.2f} s)\n"
        f"{text[-3000:]}")
    assert f"rank 1 (host {os.uname().nodename}, pid {stalled}," in errors[0] and "checkpoints/step_" in errors[0]
    assert job.returncode != 0

    proc = run_train([*OVERRIDES, f"run_dir={run_dir}"], nproc=2)
    resumed = int(proc.stdout.split("resumed from ")[1].split(" at step ")[1].split()[0])
    assert resumed >= 4 and resumed % 4 == 0
    history = _history(run_dir)
    assert history == _history(reference)  # every step once, on its own batch, with the uninterrupted losses
    assert [b for _, (_, b) in sorted(history.items())] == list(range(16))
