"""The watchdog's firing decision on a fake clock, and its diagnosis from real heartbeats in a real rendezvous
store (TCPStore on loopback); the end-to-end case, a SIGSTOPped rank under torchrun, is tests/test_rank_stall.py."""

from __future__ import annotations

import os
import socket
import time
from datetime import timedelta

import pytest
import torch.distributed as dist

from tests.utils import free_port
from train.watchdog import Watchdog


@pytest.fixture()
def store(monkeypatch: pytest.MonkeyPatch) -> dist.TCPStore:
    port = free_port()
    master = dist.TCPStore("127.0.0.1", port, is_master=True, timeout=timedelta(seconds=10), wait_for_workers=False)
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(port))
    return master


def test_a_rank_frozen_before_its_first_period_is_named_as_stopped(store: dist.TCPStore) -> None:
    # Rank 1 freezes right after start-up, before its thread's first periodic beat.
    frozen = Watchdog(timeout_s=5, rank=1, world=2, last_checkpoint=lambda: "none")
    frozen.close()
    survivor = Watchdog(timeout_s=5, rank=0, world=2, last_checkpoint=lambda: "none")
    try:
        time.sleep(3 * survivor.period + 0.5)
        cause = survivor.diagnose(time.time())
    finally:
        survivor.close()
    assert cause.startswith("stopped answering") and "rank 1 (host" in cause, cause


def test_a_live_rank_at_an_earlier_step_is_stuck_in_its_own_work(store: dist.TCPStore) -> None:
    stuck = Watchdog(timeout_s=5, rank=1, world=2, last_checkpoint=lambda: "none")
    survivor = Watchdog(timeout_s=5, rank=0, world=2, last_checkpoint=lambda: "none")
    try:
        stuck.progress(3, "checkpoint save")
        survivor.progress(4, "train step")
        time.sleep(2 * survivor.period)
        cause = survivor.diagnose(time.time())
    finally:
        stuck.close()
        survivor.close()
    assert cause.startswith("stuck in its own work") and "step 3, checkpoint save" in cause, cause


TIMEOUT_S = 20.0  # heartbeat period 2 s: a heartbeat older than 6 s is stale
T0 = 1_000_000.0
EPS = 0.25  # exact in binary, as are all the fake times below: no rounding at the thresholds
CKPT = "checkpoints/step_4"


class FakeClock:
    def __init__(self, t: float) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def _by_hand(rank: int, world: int, clock: FakeClock) -> Watchdog:
    """A watchdog on the fake clock whose thread is stopped at once (before it is armed, so it cannot have ended
    the test process): the test beats and asks for the decision itself."""
    wd = Watchdog(TIMEOUT_S, rank, world, lambda: CKPT, clock=clock)
    wd.close()
    return wd


def _line(no_progress: int, step: int, phase: str, cause: str) -> str:
    return (f"error: rank 0: no progress for {no_progress} s at step {step} ({phase}), over "
            f"train.collective_timeout_s={TIMEOUT_S:g}: {cause}; ending this rank so the job can be relaunched from "
            f"{CKPT}")


def test_fires_only_once_armed_and_past_the_timeout() -> None:
    clock = FakeClock(T0)
    wd = Watchdog(TIMEOUT_S, rank=0, world=1, last_checkpoint=lambda: CKPT, clock=clock)  # one rank: no thread
    clock.t += 10 * TIMEOUT_S
    assert wd.stalled(clock()) is None  # start-up (compilation, checkpoint loading) is not bounded by it
    wd.progress(1, "train step")
    clock.t += 10 * TIMEOUT_S
    wd.arm()  # the timer starts at arm(), not at the last progress before it
    assert wd.stalled(clock.t + TIMEOUT_S - EPS) is None
    cause = "every rank is alive and waiting: a collective itself hangs (network?)"
    assert wd.stalled(clock.t + TIMEOUT_S + EPS) == _line(20, 1, "train step", cause)


def test_progress_restarts_the_timer() -> None:
    clock = FakeClock(T0)
    wd = Watchdog(TIMEOUT_S, rank=0, world=1, last_checkpoint=lambda: CKPT, clock=clock)
    wd.progress(1, "train step")
    wd.arm()
    clock.t = T0 + TIMEOUT_S - EPS
    wd.progress(2, "eval")
    assert wd.stalled(T0 + TIMEOUT_S + EPS) is None  # over the timeout since arm(), not since the progress
    assert wd.stalled(clock.t + TIMEOUT_S - EPS) is None
    fired = wd.stalled(clock.t + TIMEOUT_S + EPS)
    assert fired is not None and fired.startswith("error: rank 0: no progress for 20 s at step 2 (eval),"), fired


def _where(rank: int, step: int, phase: str) -> str:
    return f"rank {rank} (host {socket.gethostname()}, pid {os.getpid()}, step {step}, {phase})"


def test_names_the_rank_whose_heartbeat_is_stale(store: dist.TCPStore) -> None:
    clock = FakeClock(T0)
    survivor, waiting, frozen = (_by_hand(r, 3, clock) for r in range(3))
    for wd in (survivor, waiting, frozen):
        wd.progress(4, "train step")
    survivor.arm()
    fire = T0 + TIMEOUT_S + EPS
    # Rank 1 waits in the same collective, its thread beating; rank 2 froze just over 3 periods before.
    frozen.beat(fire - 3 * survivor.period - EPS)
    waiting.beat(fire - 3 * survivor.period + EPS)
    cause = (f"stopped answering (process frozen or stopped, or its node is down): {_where(2, 4, 'train step')}: "
             "no heartbeat for 6 s")
    assert survivor.stalled(fire) == _line(20, 4, "train step", cause)


def test_names_the_live_rank_at_an_earlier_step(store: dist.TCPStore) -> None:
    clock = FakeClock(T0)
    survivor, waiting, blocked = (_by_hand(r, 3, clock) for r in range(3))
    survivor.progress(4, "train step")
    survivor.arm()
    clock.t = T0 + 1
    waiting.progress(4, "train step")  # waits in the collective with rank 0
    # Rank 2 is still in step 3's checkpoint save, which it entered within the timeout: named for its step.
    blocked.progress(3, "checkpoint save")
    fire = T0 + TIMEOUT_S + EPS
    for wd in (waiting, blocked):  # both threads beat
        wd.beat(fire - survivor.period)
    cause = (f"stuck in its own work (I/O, a kernel, a deadlock): {_where(2, 3, 'checkpoint save')}: alive but no "
             "progress for 19 s")
    assert survivor.stalled(fire) == _line(20, 4, "train step", cause)
