"""Helpers shared by the tests: launching the real trainer and reading what it wrote."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import warnings
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
PYTHON = sys.executable
SAMPLE_DATA = REPO / "artifacts" / "data" / "shakespeare"

# A tiny, fast configuration of the real pipeline (bundled corpus, dense_tiny, DeepSpeed).
TINY = [
    "model=dense_tiny",
    "data=sample",
    "logging=none",
    "logging.log_every=1",
    "train.seq_len=32",
    "train.micro_batch_size=1",
    "train.global_batch_size=4",
    "train.steps=10",
    "train.ckpt_every=5",
    "train.eval_batches=2",
    "sched.warmup_steps=2",
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def child_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "LOCAL_WORLD_SIZE"):
        env.pop(key, None)
    env.update({"OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), "WANDB_MODE": "offline", "WANDB_SILENT": "true"})
    env.update(extra)
    return env


def train_cmd(overrides: list[str], nproc: int = 1) -> list[str]:
    if nproc == 1:
        return [PYTHON, "-m", "train", *overrides]
    return [
        PYTHON, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
        "--master_addr", "127.0.0.1", "--master_port", str(free_port()), "-m", "train", *overrides,
    ]


def run_train(
    overrides: list[str], nproc: int = 1, *, check: bool = True, timeout: float = 600, fork: bool = True,
    **popen: Any,
) -> subprocess.CompletedProcess:
    """Runs the real trainer: its ranks forked from this process (tests/forklaunch.py), or with ``fork=False``
    (or any Popen argument) as `python -m train` / `torchrun -m train` in a subprocess."""
    use_fork = fork and not popen
    # fork() copies only the calling thread: with other threads alive (none in this suite so far) a lock one of
    # them holds could stay locked in the child forever, so launch fresh interpreters instead, and say so.
    if use_fork and threading.active_count() > 1:
        warnings.warn(f"threads alive, launching the trainer without fork: {threading.enumerate()}", RuntimeWarning,
                      stacklevel=2)
        use_fork = False
    if use_fork:
        from tests.forklaunch import fork_train

        proc = fork_train(overrides, nproc, child_env(), timeout)
    else:
        proc = subprocess.run(
            train_cmd(overrides, nproc), check=False, cwd=REPO, env=popen.pop("env", child_env()),
            capture_output=True, text=True, timeout=timeout, **popen,
        )
    if check and proc.returncode != 0:
        raise AssertionError(f"training failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-6000:]}")
    return proc


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines() if line.strip()]


def train_losses(run_dir: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_metrics(run_dir) if "loss" in r}


def start_from_checkpoint(src_run: Path, dst_run: Path, step: int) -> Path:
    """A new run directory holding only ``src_run``'s step-``step`` checkpoint as ``latest``: a launch there
    resumes from it, as a run stopped at that step would (the same files a stopped run leaves)."""
    ckpts = Path(dst_run) / "checkpoints"
    ckpts.mkdir(parents=True)
    shutil.copytree(Path(src_run) / "checkpoints" / f"step_{step}", ckpts / f"step_{step}")
    os.symlink(f"step_{step}", ckpts / "latest")
    return Path(dst_run)


def rank_process(rank: int, rank_var: str, must_contain: str) -> int | None:
    """The pid of the trainer rank whose environment has ``rank_var=rank`` and whose command line contains
    ``must_contain`` (its data-loader workers share both: the one whose parent is not a match)."""
    matches: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            environ = (entry / "environ").read_bytes().split(b"\0")
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        if must_contain in cmdline and f"{rank_var}={rank}".encode() in environ and "python" in cmdline:
            matches[int(entry.name)] = ppid
    roots = [pid for pid, ppid in matches.items() if ppid not in matches]
    return roots[0] if len(roots) == 1 else None


def wait_for_step(run_dir: Path, step: int, timeout: float, alive: Any = None) -> None:
    """Until metrics.jsonl has a train record at ``step`` or later (``alive()`` False: the run ended early)."""
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        path = Path(run_dir) / "metrics.jsonl"
        if path.exists() and any(r.get("step", 0) >= step for r in read_metrics(run_dir) if "loss" in r):
            return
        if alive is not None and not alive():
            raise AssertionError(f"the run in {run_dir} ended before step {step}")
        time.sleep(0.2)
    raise AssertionError(f"no step {step} in {run_dir} after {timeout} s")
