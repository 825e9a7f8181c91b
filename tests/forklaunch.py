"""Start the real trainer's ranks by forking the test process instead of launching fresh interpreters.

Why: on the 2-core CI machine a fresh rank spends ~5 s of CPU importing torch, torch._dynamo (which
torch.optim pulls in), inductor (which DeepSpeed's Muon module pulls in through torch.compile) and DeepSpeed,
while its 10 tiny training steps take ~1 s. Forking a process that has imported them once makes the numerical
tests several times cheaper. Each child still runs everything a torchrun worker runs: `python -m train`'s Hydra
entry point with the same overrides and the torch.distributed environment torchrun would set (env://
rendezvous, gloo), DeepSpeed, checkpoints, data workers. The launchers themselves (torchrun, the deepspeed
launcher, srun, submitit) are tested in test_launch.py, test_slurm.py and test_train_cli.py.
"""

from __future__ import annotations

import functools
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

_WARM = False


def _warm_up() -> None:
    """Import once, in the parent, what every rank imports."""
    global _WARM
    if _WARM:
        return
    import deepspeed
    import deepspeed.runtime.zero.muon.muon_optimizer  # noqa: F401  (its torch.compile imports inductor)
    import torch._dynamo  # noqa: F401

    import train.__main__
    import train.parallel.pp
    import train.trainer

    try:  # what layouts with tp, pp or ep > 1 import: megatron-core's groups and layers
        import megatron.core.parallel_state
        import megatron.core.tensor_parallel  # noqa: F401

        import train.parallel.tp  # noqa: F401
    except ImportError:
        pass

    _WARM = True


def _child(rank: int, nproc: int, port: int, target: Callable[[], int], env: dict[str, str], out: str, err: str) -> int:
    os.setpgid(0, 0)  # the parent can kill this rank and its data workers at once
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1, signal.SIGALRM):
        signal.signal(sig, signal.SIG_DFL)
    out_fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    err_fd = os.open(err, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(out_fd, 1)
    os.dup2(err_fd, 2)
    sys.stdout = open(1, "w", buffering=1, closefd=False)  # noqa: SIM115
    sys.stderr = open(2, "w", buffering=1, closefd=False)  # noqa: SIM115
    os.environ.clear()
    os.environ.update(env)
    os.environ.update({
        "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(nproc), "LOCAL_WORLD_SIZE": str(nproc),
        "GROUP_RANK": "0", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
    })
    import torch
    from hydra.core.global_hydra import GlobalHydra

    torch.set_num_threads(int(env.get("OMP_NUM_THREADS", "1")))
    GlobalHydra.instance().clear()
    return target()


def _hydra_main(overrides: list[str]) -> int:
    from train.__main__ import cli

    sys.argv = ["train", *overrides]
    try:
        cli()
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    return 0


def fork_train(overrides: list[str], nproc: int, env: dict[str, str], timeout: float) -> subprocess.CompletedProcess:
    """Runs `python -m train OVERRIDES` as `nproc` ranks forked from this process; like `run_train`'s result."""
    return fork_ranks(functools.partial(_hydra_main, overrides), nproc, env, timeout, ["train", *overrides])


def fork_call(fn: Callable[..., Any], args: tuple, nproc: int, env: dict[str, str], timeout: float = 600) -> None:
    """Runs ``fn(*args)`` on ``nproc`` ranks forked from this process, with torchrun's environment; raises
    AssertionError with the ranks' output if any rank fails."""

    def target() -> int:
        fn(*args)
        return 0

    proc = fork_ranks(target, nproc, env, timeout, [fn.__name__])
    if proc.returncode != 0:
        raise AssertionError(f"{fn.__name__} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")


def fork_ranks(target: Callable[[], int], nproc: int, env: dict[str, str], timeout: float,
               name: list[str]) -> subprocess.CompletedProcess:
    """``target()`` in ``nproc`` forked ranks; its return value is the rank's exit code."""
    from tests.utils import free_port

    _warm_up()
    port = free_port()
    sys.stdout.flush()
    sys.stderr.flush()
    with tempfile.TemporaryDirectory(prefix="forklaunch") as tmp:
        logs = [(os.path.join(tmp, f"{r}.out"), os.path.join(tmp, f"{r}.err")) for r in range(nproc)]
        pids = []
        for rank in range(nproc):
            pid = os.fork()
            if pid == 0:  # the rank: never returns into pytest
                code = 1
                try:
                    code = _child(rank, nproc, port, target, env, *logs[rank])
                except BaseException:  # noqa: BLE001  (print it like an interpreter would, then exit)
                    import traceback

                    traceback.print_exc()
                finally:
                    sys.stdout.flush()
                    sys.stderr.flush()
                    os._exit(code)
            pids.append(pid)
        codes = _wait(pids, timeout)
        stdout = "".join(Path(o).read_text() for o, _ in logs)
        stderr = "".join(Path(e).read_text() for _, e in logs)
    if codes is None:
        raise subprocess.TimeoutExpired(["fork", *name], timeout, stdout, stderr)
    code = next((c for c in codes if c != 0), 0)
    return subprocess.CompletedProcess(["fork", *name], code, stdout, stderr)


def _wait(pids: list[int], timeout: float) -> list[int] | None:
    """Exit codes of all ranks; like torchrun, one failed rank stops the others (after a grace period for its
    peers to print their own errors). None on timeout (everything killed)."""
    codes: dict[int, int] = {}
    deadline, failed_at = time.monotonic() + timeout, None
    while len(codes) < len(pids):
        for pid in pids:
            if pid in codes:
                continue
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                codes[pid] = os.waitstatus_to_exitcode(status)
                if codes[pid] != 0 and failed_at is None:
                    failed_at = time.monotonic()
        now = time.monotonic()
        if now > deadline or (failed_at is not None and now - failed_at > 30):
            for pid in pids:
                if pid not in codes:
                    _kill(pid)
                    codes[pid] = os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
            if now > deadline:
                return None
        time.sleep(0.05)
    for pid in pids:  # data workers of finished ranks, if any outlived them
        _kill(pid)
    return [codes[p] for p in pids]


def _kill(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
