"""A rank that stops answering (stuck I/O, a frozen node, a stopped process) leaves its peers waiting inside a
collective until the process group's timeout. The watchdog bounds that wait by ``train.collective_timeout_s`` and
says which rank it was.

Each rank's daemon thread publishes a heartbeat through the rendezvous store every few seconds: the step the main
thread reached, what it is doing and when it last made progress. A thread keeps beating while its main thread is
blocked in a collective, and stops when the whole process is frozen, so a stale heartbeat names a frozen rank and a
live one stuck at an earlier step names a rank blocked in its own work. When this rank's main thread has made no
progress for the timeout, the thread reads every heartbeat, prints one line naming the cause, and ends the process
(the main thread cannot be interrupted inside a collective): the launcher tears the job down and a relaunch
resumes from the last complete checkpoint. The process group's own timeout stays as a backstop.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import threading
import time
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import torch.distributed as dist

EXIT_STALLED = 4  # a peer stopped answering: relaunching resumes from the last complete checkpoint
_KEY = "watchdog/rank{}"


def heartbeat_period(timeout_s: float) -> float:
    """Seconds between heartbeats and checks: a stall is noticed within one period after the timeout."""
    return min(10.0, max(0.5, timeout_s / 10))


def store_timeout_s(period: float) -> float:
    """How long one heartbeat may wait on the store: a beat delays the next check by at most this."""
    return max(2.0, 2 * period)


def _connect() -> Any:
    """A client of the rendezvous store of its own (MASTER_ADDR/MASTER_PORT, as torchrun, srun and the tests set
    them): the main thread's store traffic and this thread's never wait on each other."""
    addr, port = os.environ.get("MASTER_ADDR"), os.environ.get("MASTER_PORT")
    if not addr or not port:
        return None
    return dist.TCPStore(addr, int(port), is_master=False, timeout=timedelta(seconds=10), wait_for_workers=False)


class Watchdog:
    def __init__(self, timeout_s: float, rank: int, world: int, last_checkpoint: Callable[[], str],
                 clock: Callable[[], float] = time.time) -> None:
        self.timeout_s, self.rank, self.world = timeout_s, rank, world
        self.period = heartbeat_period(timeout_s)
        self.last_checkpoint = last_checkpoint
        self.clock = clock  # wall-clock seconds: heartbeats of other hosts are compared with it
        self.step, self.phase = 0, "start-up"
        self.last_progress = clock()
        self.armed = False
        self.missed_beats = 0
        self._host, self._pid = socket.gethostname(), os.getpid()
        self._stop = threading.Event()
        self._store = None
        if world > 1:
            try:
                self._store = _connect()
            except (RuntimeError, ValueError, OSError) as e:  # the run goes on, bounded by the process groups' timeout
                print(f"warning: rank {rank}: no watchdog (cannot reach the rendezvous store: {e})", file=sys.stderr,
                      flush=True)
        if self._store is not None:
            self._store.set_timeout(timedelta(seconds=store_timeout_s(self.period)))
            # The first beat is sent before training starts: a rank frozen within its first period is then named
            # by its stale heartbeat, not mistaken for one without a watchdog.
            self.beat(self.clock())
            self._thread = threading.Thread(target=self._run, name="watchdog", daemon=True)
            self._thread.start()

    def progress(self, step: int, phase: str) -> None:
        """The main thread moved on (cheap: no I/O)."""
        self.step, self.phase, self.last_progress = step, phase, self.clock()

    def arm(self) -> None:
        """From here on, no progress for the timeout ends the process (start-up, with its compilation and
        checkpoint loading, is bounded by the process group's timeout only)."""
        self.last_progress = self.clock()
        self.armed = True

    def close(self) -> None:
        """Stops the heartbeat thread and waits for it (at most one store timeout, if it is mid-beat)."""
        self._stop.set()
        if self._store is not None:
            self._thread.join(timeout=10)

    def _record(self, now: float) -> str:
        return json.dumps({"step": self.step, "phase": self.phase, "progress": self.last_progress, "beat": now,
                           "host": self._host, "pid": self._pid})

    def beat(self, now: float) -> None:
        """Publishes this rank's heartbeat (the thread does every period)."""
        try:
            self._store.set(_KEY.format(self.rank), self._record(now))
        except Exception:  # noqa: BLE001  (the store's host may be the frozen one: judged when diagnosing)
            self.missed_beats += 1

    def _run(self) -> None:
        while not self._stop.wait(self.period):
            now = self.clock()
            self.beat(now)
            stalled = self.stalled(now)
            if stalled is not None:
                print(stalled, file=sys.stderr, flush=True)
                os._exit(EXIT_STALLED)

    def stalled(self, now: float) -> str | None:
        """The line this rank ends with when, armed, it has made no progress for more than the timeout, naming
        the cause from the other ranks' heartbeats; None otherwise."""
        if not self.armed or now - self.last_progress <= self.timeout_s:
            return None
        cause = self.diagnose(now)
        return (f"error: rank {self.rank}: no progress for {now - self.last_progress:.0f} s at step {self.step} "
                f"({self.phase}), over train.collective_timeout_s={self.timeout_s:g}: {cause}; ending this rank so "
                f"the job can be relaunched from {self.last_checkpoint()}")

    def diagnose(self, now: float) -> str:
        """Why nothing moves, from the other ranks' heartbeats."""
        frozen, behind, silent = [], [], []
        for r in range(self.world):
            if r == self.rank:
                continue
            try:
                if not self._store.check([_KEY.format(r)]):
                    silent.append(r)
                    continue
                rec = json.loads(self._store.get(_KEY.format(r)))
            except Exception:  # noqa: BLE001
                return (f"the rendezvous store at {os.environ.get('MASTER_ADDR')}:{os.environ.get('MASTER_PORT')} "
                        "does not answer: its host (the launcher or rank 0) stopped answering")
            age = now - rec["beat"]
            where = f"rank {r} (host {rec['host']}, pid {rec['pid']}, step {rec['step']}, {rec['phase']})"
            if age > 3 * self.period:
                frozen.append(f"{where}: no heartbeat for {age:.0f} s")
            elif rec["step"] < self.step or now - rec["progress"] > self.timeout_s:
                behind.append(f"{where}: alive but no progress for {now - rec['progress']:.0f} s")
        if frozen:
            return "stopped answering (process frozen or stopped, or its node is down): " + "; ".join(frozen)
        if behind:
            return "stuck in its own work (I/O, a kernel, a deadlock): " + "; ".join(behind)
        if silent:
            return f"rank(s) {silent} never sent a heartbeat"
        return "every rank is alive and waiting: a collective itself hangs (network?)"
