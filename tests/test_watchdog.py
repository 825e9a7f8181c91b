"""The watchdog's diagnosis from real heartbeats in a real rendezvous store (TCPStore on loopback); the end-to-end
case, a SIGSTOPped rank under torchrun, is tests/test_rank_stall.py."""

from __future__ import annotations

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
