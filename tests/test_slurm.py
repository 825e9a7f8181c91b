"""The sbatch templates and the Hydra/submitit launcher on a real one-node SLURM cluster on this machine.

slurm/setup_local_cluster.sh installs and starts it (root needed). Without root or without apt these tests skip
with the reason; in CI (CI=true) a cluster that cannot be set up is a failure, not a skip.
Every job trains the real model (2 ranks, tiny) and is compared, loss by loss, with an uninterrupted run.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from launch.allocator import find_library
from tests.utils import PYTHON, REPO, TINY, child_env, rank_process, read_metrics, train_losses, wait_for_step

pytestmark = pytest.mark.slurm

STEPS = 12
SEED = 1234
OVERRIDES = [o for o in TINY if not o.startswith(("train.steps=", "train.ckpt_every=", "train.seed="))] + [
    f"train.steps={STEPS}", "train.ckpt_every=4",
]
FINAL_STATES = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE"}


@pytest.fixture(scope="module")
def cluster_cpus() -> int:
    """Sets up (or checks) the local cluster; returns the CPUs a job may use on its node (at most 2)."""
    in_ci = os.environ.get("CI", "").lower() in ("1", "true", "yes")
    if os.geteuid() != 0 and shutil.which("sinfo") is None and not in_ci:
        pytest.skip("SLURM is not installed and installing it needs root: sudo bash slurm/setup_local_cluster.sh")
    setup = subprocess.run(["bash", "slurm/setup_local_cluster.sh"], check=False, cwd=REPO, capture_output=True,
                           text=True, stdin=subprocess.DEVNULL, timeout=900)
    if setup.returncode != 0:
        reason = (setup.stderr.strip().splitlines() or ["no output"])[-1]
        message = f"slurm/setup_local_cluster.sh could not set up a local SLURM cluster: {reason}"
        if in_ci:
            pytest.fail(f"{message}\n{setup.stdout[-3000:]}\n{setup.stderr[-3000:]}")
        pytest.skip(message)
    sinfo = subprocess.run(["sinfo", "-h", "-o", "%c"], capture_output=True, text=True, check=True)
    cpus = int(sinfo.stdout.split()[0])
    return min(2, cpus)


# ---- helpers around squeue/scontrol ----------------------------------------------------------------------------

def _job_env(**extra: str) -> dict[str, str]:
    """The submitting environment: sbatch exports it to the job (PYTHON, NPROC_PER_NODE, RUN_DIR, ...)."""
    env = {k: v for k, v in child_env().items() if not k.startswith("SLURM_")}
    env.update({"PYTHON": PYTHON, **extra})
    return env


def sbatch(args: list[str], env: dict[str, str]) -> str:
    out = subprocess.run(["sbatch", "--parsable", *args], check=False, cwd=REPO, env=env, capture_output=True,
                         text=True)
    assert out.returncode == 0, f"sbatch failed: {out.stderr}"
    return out.stdout.strip().split(";")[0]


def job_fields(job_id: str) -> dict[str, str]:
    out = subprocess.run(["scontrol", "show", "job", "-o", job_id], check=False, capture_output=True, text=True)
    assert out.returncode == 0, f"scontrol show job {job_id}: {out.stderr}"
    return dict(re.findall(r"(\w+)=(\S*)", out.stdout))


def wait_for(condition: Callable[[], bool], what: str, timeout: float, job_id: str, log: Path) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            text = log.read_text()[-4000:] if log.exists() else "(no log)"
            raise AssertionError(f"timed out after {timeout}s waiting for {what}; job {job_fields(job_id)}\n{text}")
        time.sleep(0.2)


def wait_finished(job_id: str, log: Path, timeout: float = 240) -> dict[str, str]:
    wait_for(lambda: job_fields(job_id)["JobState"] in FINAL_STATES, f"job {job_id} to finish", timeout, job_id, log)
    return job_fields(job_id)


def _job_processes_gone(job_id: str) -> bool:
    """No slurmstepd of the job's previous run is left on this (only) node."""
    found = subprocess.run(["pgrep", "-f", f"slurmstepd: \\[{job_id}\\."], check=False, capture_output=True)
    return found.returncode == 1


def release_when_requeued(job_id: str, log: Path, timeout: float = 120) -> None:
    """A requeued job waits ~2 minutes (BeginTime) before it may start again: let it start now, but only once
    its previous run has left the node. slurmd refuses a job whose credential was revoked in the same second
    ("Job credential revoked"), which the BeginTime delay normally rules out: wait a little past that too."""
    wait_for(lambda: job_fields(job_id)["JobState"] == "PENDING" and _job_processes_gone(job_id),
             f"job {job_id} to be requeued", timeout, job_id, log)
    time.sleep(2)
    subprocess.run(["scontrol", "update", f"jobid={job_id}", "StartTime=now"], check=True)


def template_job(template: str, run_dir: Path, log: Path, cpus: int) -> tuple[list[str], dict[str, str]]:
    """sbatch arguments for a template on this CPU-only cluster: no GPUs, 2 ranks on `cpus` CPUs."""
    args = ["--gpus-per-node=0", f"--cpus-per-task={cpus}", "--time=15", f"--output={log}", template]
    overrides = " ".join([*OVERRIDES, f"train.seed={SEED}"])
    return args, _job_env(NPROC_PER_NODE="2", RUN_DIR=str(run_dir), EXTRA_OVERRIDES=overrides)


@pytest.fixture
def cancel_jobs() -> Iterator[list[str]]:
    """Jobs a test submits are cancelled when it ends, whatever happened."""
    jobs: list[str] = []
    yield jobs
    for job_id in jobs:
        subprocess.run(["scancel", job_id], check=False, capture_output=True)


# ---- tests ---------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def reference_run(sample_data: Path, cluster_cpus: int, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """slurm/train_1node.sbatch as a 2-rank job, uninterrupted."""
    root = tmp_path_factory.mktemp("slurm_reference")
    run_dir, log = root / "run", root / "job.out"
    args, env = template_job("slurm/train_1node.sbatch", run_dir, log, cluster_cpus)
    job_id = sbatch(args, env)
    try:
        fields = wait_finished(job_id, log)
    finally:
        subprocess.run(["scancel", job_id], check=False, capture_output=True)
    text = log.read_text()
    assert fields["JobState"] == "COMPLETED" and fields["ExitCode"] == "0:0", text[-4000:]
    assert "launch.run: " in text and "--nproc_per_node 2" in text and "training finished" in text
    assert sorted(train_losses(run_dir)) == list(range(1, STEPS + 1))
    return run_dir


def _assert_same_losses(run_dir: Path, reference_dir: Path) -> None:
    reference, losses = train_losses(reference_dir), train_losses(run_dir)
    assert sorted(losses) == sorted(reference)
    for step, loss in reference.items():
        assert losses[step] == pytest.approx(loss, abs=1e-5), f"step {step}"


def test_sbatch_1node_template_trains_two_ranks_to_the_end(reference_run: Path) -> None:
    metrics = train_losses(reference_run)
    assert metrics[STEPS] < metrics[1]  # it learned something
    assert (reference_run / "checkpoints" / "latest").exists()


def test_multinode_template_requeue_and_time_limit_warning_resume_to_the_same_losses(
    reference_run: Path, cluster_cpus: int, tmp_path: Path, cancel_jobs: list[str]
) -> None:
    """Interrupted twice: `scontrol requeue` (SIGTERM to every process; SLURM requeues) after the first checkpoint,
    then USR1 to the batch script only, as `--signal=B:USR1@120` sends it (the script forwards it and requeues
    the job itself). Each time the ranks checkpoint and exit 75; the job resumes and ends with the same losses."""
    run_dir, log = tmp_path / "run", tmp_path / "job.out"
    # The multi-node template on this one-node cluster: the signal handling is the same in both templates.
    args, env = template_job("slurm/train_multinode.sbatch", run_dir, log, cluster_cpus)
    job_id = sbatch(["--nodes=1", *args], env)
    cancel_jobs.append(job_id)
    latest = run_dir / "checkpoints" / "latest"

    wait_for(latest.exists, "the first checkpoint", 180, job_id, log)
    subprocess.run(["scontrol", "requeue", job_id], check=True)
    release_when_requeued(job_id, log)

    def resumed_and_stepping() -> bool:  # the ranks train again (so their signal handlers are in place)
        text = log.read_text() if log.exists() else ""
        return "resumed from" in text and "\nstep " in text[text.rindex("resumed from"):]

    wait_for(resumed_and_stepping, "the requeued job to resume and train", 180, job_id, log)
    subprocess.run(["scancel", "--signal=USR1", "--batch", job_id], check=True)
    release_when_requeued(job_id, log)
    fields = wait_finished(job_id, log)

    text = log.read_text()
    assert fields["JobState"] == "COMPLETED" and fields["Restarts"] == "2", text[-4000:]
    assert "ranks stopped on TERM" in text and "ranks stopped on USR1" in text
    assert text.count("exit 75") == 2, "each interruption must end in a checkpoint and exit 75, not a crash"
    assert text.count("resumed from") == 2
    _assert_same_losses(run_dir, reference_run)


def test_srun_direct_launch_uses_slurm_task_variables(
    reference_run: Path, cluster_cpus: int, tmp_path: Path, cancel_jobs: list[str]
) -> None:
    """`launch.run --launcher srun`: one srun task per rank; the trainer takes its rank from SLURM's variables
    (launch.env.setup_distributed_env_from_slurm) and reproduces the torchrun job."""
    run_dir, log = tmp_path / "run", tmp_path / "job.out"
    command = (f"{PYTHON} -m launch.run --launcher srun --nodes 1 --gpus-per-node 2 --device cpu -- "
               + " ".join([*OVERRIDES, f"train.seed={SEED}", f"run_dir={run_dir}"]))
    job_id = sbatch(["--ntasks=2", "--cpus-per-task=1", "--time=10", f"--output={log}",
                     f"--wrap={command}"], _job_env())
    cancel_jobs.append(job_id)
    fields = wait_finished(job_id, log)
    text = log.read_text()
    assert fields["JobState"] == "COMPLETED", text[-4000:]
    assert "launch.run: srun --nodes 1 --ntasks-per-node 2" in text
    _assert_same_losses(run_dir, reference_run)


def test_hydra_multirun_on_slurm_runs_an_array(reference_run: Path, cluster_cpus: int, tmp_path: Path) -> None:
    """`--multirun hydra/launcher=slurm`: one array job per sweep point, each with 2 ranks set up from submitit's
    environment. The point with the reference seed reproduces the reference run; the other seed differs."""
    sweep_dir = tmp_path / "sweep"
    # Submitted through launch.allocator from a system-malloc environment: the jobs inherit its allocator.
    cmd = [PYTHON, "-m", "launch.allocator", "--", PYTHON, "-m", "train", "--multirun", "hydra/launcher=slurm", "hydra.launcher.gpus_per_node=null",
           "hydra.launcher.tasks_per_node=2", f"hydra.launcher.cpus_per_task={max(1, cluster_cpus // 2)}",
           "hydra.launcher.timeout_min=15", f"hydra.sweep.dir={sweep_dir}", *OVERRIDES, f"train.seed={SEED},7"]
    proc = subprocess.run(cmd, check=False, cwd=REPO, env=_job_env(LD_PRELOAD=""), capture_output=True, text=True,
                          timeout=400)
    assert proc.returncode == 0, f"multirun failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    scripts = list(sweep_dir.glob(".submitit/*/*_submission.sh"))
    assert len(scripts) == 1 and "#SBATCH --array=0-1" in scripts[0].read_text()
    allocator = "system" if find_library("tcmalloc") is None else "tcmalloc"
    for job in ("0", "1"):
        assert sorted(train_losses(sweep_dir / job)) == list(range(1, STEPS + 1))
        assert "world 2 (dp 2)" in "".join(p.read_text() for p in sweep_dir.glob(f".submitit/*_{job}/*_0_log.out"))
        assert json.loads((sweep_dir / job / "summary.json").read_text())["host_allocator"] == allocator
    _assert_same_losses(sweep_dir / "0", reference_run)
    assert train_losses(sweep_dir / "1")[STEPS] != pytest.approx(train_losses(reference_run)[STEPS], abs=1e-5)


# ---- a rank lost for good (SIGKILL: OOM killer, node crash) -----------------------------------------------------

def _kill_rank_one(run_dir: Path, must_contain: str, alive: Callable[[], bool]) -> float:
    """SIGKILLs rank 1 (SLURM task 1) once step 6 is logged (after the checkpoint at 4); returns the time."""
    wait_for_step(run_dir, 6, timeout=240, alive=alive)
    pid = rank_process(1, "SLURM_PROCID", must_contain)
    assert pid, f"no rank-1 process with {must_contain!r}"
    os.kill(pid, signal.SIGKILL)
    return time.monotonic()


def _assert_each_step_once(run_dir: Path, reference_dir: Path) -> None:
    """The relaunch replayed the steps after its checkpoint: every step once, on its own batch, with the
    uninterrupted run's losses."""
    rows = {r["step"]: r for r in read_metrics(run_dir) if "loss" in r}
    assert sorted(rows) == list(range(1, STEPS + 1))
    assert [rows[s]["batch"] for s in sorted(rows)] == list(range(STEPS))
    _assert_same_losses(run_dir, reference_dir)


def test_sigkilled_rank_under_srun_ends_the_job_and_the_relaunch_resumes(
    reference_run: Path, cluster_cpus: int, tmp_path: Path, cancel_jobs: list[str]
) -> None:
    run_dir = tmp_path / "run"
    command = (f"{PYTHON} -m launch.run --launcher srun --nodes 1 --gpus-per-node 2 --device cpu -- "
               + " ".join([*OVERRIDES, f"train.seed={SEED}", f"run_dir={run_dir}"]))

    def submit(log: Path) -> str:
        job_id = sbatch(["--ntasks=2", "--cpus-per-task=1", "--time=10", f"--output={log}", f"--wrap={command}"],
                        _job_env())
        cancel_jobs.append(job_id)
        return job_id

    log = tmp_path / "killed.out"
    job_id = submit(log)
    killed_at = _kill_rank_one(run_dir, f"run_dir={run_dir}",
                               alive=lambda: job_fields(job_id)["JobState"] not in FINAL_STATES)
    fields = wait_finished(job_id, log, timeout=60)
    assert time.monotonic() - killed_at < 30, "the surviving rank did not end promptly"
    assert fields["JobState"] == "FAILED" and fields["ExitCode"] != "0:0", log.read_text()[-3000:]

    log = tmp_path / "relaunch.out"
    fields = wait_finished(submit(log), log)
    assert fields["JobState"] == "COMPLETED", log.read_text()[-3000:]
    assert "resumed from" in log.read_text()
    _assert_each_step_once(run_dir, reference_run)


def test_sigkilled_rank_under_submitit_fails_the_job_and_the_rerun_resumes(
    reference_run: Path, cluster_cpus: int, tmp_path: Path, cancel_jobs: list[str]
) -> None:
    """Hydra's submitit launcher runs each task without srun's kill-on-bad-exit: the surviving rank must end by
    itself (the broken connection, then one error line) for the job to fail. Hydra records the failure in the job's
    result; the submitting process reads it once SLURM reports the job finished, which submitit learns from sacct:
    this one-node cluster keeps no accounting, so that process waits for the killed task forever and the test
    stops it once the job has failed."""
    sweep_dir = tmp_path / "sweep"
    # Submitted through launch.allocator from a system-malloc environment: the jobs inherit its allocator.
    cmd = [PYTHON, "-m", "launch.allocator", "--", PYTHON, "-m", "train", "--multirun", "hydra/launcher=slurm", "hydra.launcher.gpus_per_node=null",
           "hydra.launcher.tasks_per_node=2", f"hydra.launcher.cpus_per_task={max(1, cluster_cpus // 2)}",
           "hydra.launcher.timeout_min=15", f"hydra.sweep.dir={sweep_dir}", *OVERRIDES, f"train.seed={SEED}"]
    with open(tmp_path / "sweep.out", "w") as out:
        sweep = subprocess.Popen(cmd, cwd=REPO, env=_job_env(), stdout=out, stderr=subprocess.STDOUT)
    try:
        killed_at = _kill_rank_one(sweep_dir / "0", "submitit", alive=lambda: sweep.poll() is None)
        job_id = next(sweep_dir.glob(".submitit/*/*_submission.sh")).name.split("_")[0]
        cancel_jobs.append(job_id)
        log = sweep_dir / ".submitit" / job_id / f"{job_id}_0_log.out"
        fields = wait_finished(job_id, log, timeout=60)
        assert time.monotonic() - killed_at < 30, "the surviving rank did not end promptly"
    finally:
        sweep.kill()
        sweep.wait()
    text = log.read_text()
    assert fields["JobState"] == "FAILED", text[-3000:]
    lost = [ln for ln in text.splitlines() if "lost a peer" in ln]
    assert len(lost) == 1 and lost[0].startswith("error: rank 0: lost a peer at step"), text[-3000:]
    assert "ending this rank so the job can be relaunched from" in lost[0] and "checkpoints/step_" in lost[0]

    rerun = subprocess.run(cmd, check=False, cwd=REPO, env=_job_env(), capture_output=True, text=True, timeout=400)
    assert rerun.returncode == 0, rerun.stdout[-3000:] + rerun.stderr[-3000:]
    _assert_each_step_once(sweep_dir / "0", reference_run)
