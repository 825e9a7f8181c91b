"""launch.env (SLURM/submitit -> torch.distributed variables) and launch.run (torchrun/deepspeed/srun commands).

The multi-process tests run the real trainer: two torchrun "nodes" rendezvousing on loopback, and the deepspeed
launcher with a generated hostfile, must reproduce the losses of `torchrun --nproc_per_node 2` exactly.
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
from pathlib import Path

import pytest

import launch.allocator
from launch.allocator import AllocatorError, allocator_env, find_library, preloaded
from launch.env import (
    DistributedEnv,
    expand_hostlist,
    expand_tasks_per_node,
    master_port_for_job,
    omp_threads_per_rank,
    setup_distributed_env_from_slurm,
    slurm_distributed_env,
)
from launch.run import main as launch_main
from tests.utils import PYTHON, REPO, TINY, child_env, free_port, train_losses

STEPS = 6
# TINY with a shorter run and no periodic checkpoint: what matters here is the loss of every step.
OVERRIDES = [o for o in TINY if not o.startswith(("train.steps=", "train.ckpt_every="))] + [
    f"train.steps={STEPS}", "train.ckpt_every=1000",
]


# ---- launch.env: pure functions on explicit environments ------------------------------------------------------

def test_expand_hostlist_keeps_order_padding_and_expands_products() -> None:
    assert expand_hostlist("gpu[001-003,7],login-a[1-2]b,solo") == [
        "gpu001", "gpu002", "gpu003", "gpu7", "login-a1b", "login-a2b", "solo"]
    assert expand_hostlist("r[1-2]n[08-09]") == ["r1n08", "r1n09", "r2n08", "r2n09"]
    assert expand_hostlist("vm") == ["vm"]


@pytest.mark.parametrize("bad", ["", "gpu[1-3", "gpu1-3]", "gpu[3-1]", "gpu[a-b]"])
def test_expand_hostlist_rejects_malformed_lists(bad: str) -> None:
    with pytest.raises(ValueError, match="host list"):
        expand_hostlist(bad)


def test_expand_tasks_per_node() -> None:
    assert expand_tasks_per_node("2(x3),1") == [2, 2, 2, 1]
    assert expand_tasks_per_node("8") == [8]
    with pytest.raises(ValueError, match="tasks-per-node"):
        expand_tasks_per_node("2(3)")


def _srun_task(**overrides: str) -> dict[str, str]:
    """The variables srun gives task 5 of a 2-node x 4-task step (as printed by `env` inside srun)."""
    env = {
        "SLURM_JOB_ID": "4242", "SLURM_PROCID": "5", "SLURM_LOCALID": "1", "SLURM_NODEID": "1",
        "SLURM_NTASKS": "8", "SLURM_STEP_NUM_TASKS": "8", "SLURM_STEP_NODELIST": "node[07-08]",
        "SLURM_JOB_NODELIST": "node[07-08]", "SLURM_STEP_TASKS_PER_NODE": "4(x2)", "SLURM_CPUS_PER_TASK": "12",
    }
    env.update(overrides)
    return env


def test_slurm_env_of_an_srun_task() -> None:
    dist_env = slurm_distributed_env(_srun_task())
    assert dist_env == DistributedEnv(rank=5, world_size=8, local_rank=1, local_world_size=4, node_rank=1,
                                      num_nodes=2, master_addr="node07", master_port=master_port_for_job(4242))
    # Uneven layouts: the local world size is this node's task count.
    uneven = slurm_distributed_env(_srun_task(SLURM_STEP_NUM_TASKS="5", SLURM_PROCID="4", SLURM_LOCALID="0",
                                              SLURM_STEP_TASKS_PER_NODE="4,1"))
    assert (uneven.world_size, uneven.local_world_size, uneven.rank) == (5, 1, 4)


def test_setup_from_slurm_exports_torch_variables_and_keeps_pinned_ones() -> None:
    environ = _srun_task(MASTER_PORT="31337")
    setup_distributed_env_from_slurm(environ)
    assert {k: environ[k] for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR",
                                    "MASTER_PORT", "OMP_NUM_THREADS")} == {
        "RANK": "5", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "4", "MASTER_ADDR": "node07",
        "MASTER_PORT": "31337", "OMP_NUM_THREADS": "12"}
    # Already-set values (a user's OMP_NUM_THREADS) are not overwritten.
    environ = _srun_task(OMP_NUM_THREADS="3")
    setup_distributed_env_from_slurm(environ)
    assert environ["OMP_NUM_THREADS"] == "3" and environ["RANK"] == "5"


def test_slurm_env_rejects_a_process_that_srun_did_not_start() -> None:
    batch_shell = {"SLURM_JOB_ID": "7", "SLURM_PROCID": "0", "SLURM_LOCALID": "0", "SLURM_NTASKS": "4",
                   "SLURM_JOB_NODELIST": "vm"}
    with pytest.raises(ValueError, match="not started by srun"):
        slurm_distributed_env(batch_shell)
    alone = slurm_distributed_env({**batch_shell, "SLURM_NTASKS": "1"})
    assert (alone.world_size, alone.rank, alone.master_addr) == (1, 0, "vm")
    with pytest.raises(ValueError, match="not inside a SLURM task"):
        slurm_distributed_env({"SLURM_JOB_ID": "7"})
    with pytest.raises(ValueError, match="outside world size"):
        slurm_distributed_env(_srun_task(SLURM_PROCID="8"))


def test_omp_threads_per_rank() -> None:
    assert omp_threads_per_rank({"SLURM_CPUS_PER_TASK": "6"}, local_world_size=8, cpu_count=96) == 6
    assert omp_threads_per_rank({}, local_world_size=8, cpu_count=96) == 12
    assert omp_threads_per_rank({}, local_world_size=4, cpu_count=2) == 1


def test_master_port_is_a_stable_unprivileged_port_per_job() -> None:
    ports = {master_port_for_job(job) for job in range(100000, 100050)}
    assert len(ports) == 50 and all(20000 <= p < 32768 for p in ports)
    assert master_port_for_job("123_4") == master_port_for_job("1234")
    assert master_port_for_job(99) == master_port_for_job("99")


# ---- launch.run: the exact command lines (--dry-run) -------------------------------------------------------

def _dry_run(capsys: pytest.CaptureFixture, *args: str) -> list[str]:
    assert launch_main(["--dry-run", *args]) == 0  # before any "--": what follows it are overrides
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert line.startswith("launch.run: ")
    return shlex.split(line[len("launch.run: "):])


def _flag(argv: list[str], name: str) -> str:
    return argv[argv.index(name) + 1]


def test_torchrun_single_node(capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    argv = _dry_run(capsys, "--launcher", "torchrun", "--nodes", "1", "--gpus-per-node", "2", "--device", "cpu",
                    "--cpus-per-node", "8", "--master-port", "29501", "--", "model=dense_tiny", "train.steps=3")
    assert argv[0] == "OMP_NUM_THREADS=4"  # 8 CPUs shared by 2 ranks
    assert argv[1:4] == [PYTHON, "-m", "torch.distributed.run"]
    assert (_flag(argv, "--nnodes"), _flag(argv, "--nproc_per_node")) == ("1", "2")
    assert (_flag(argv, "--master_addr"), _flag(argv, "--master_port")) == ("127.0.0.1", "29501")
    assert "SIGUSR1" in _flag(argv, "--signals_to_handle").split(",")
    assert argv[-4:] == ["-m", "train", "model=dense_tiny", "train.steps=3"]


def test_torchrun_multi_node_uses_c10d_rendezvous(capsys: pytest.CaptureFixture) -> None:
    argv = _dry_run(capsys, "--launcher", "torchrun", "--nodes", "4", "--gpus-per-node", "8", "--device", "gpu",
                    "--node-rank", "3", "--master-addr", "gpu001", "--master-port", "29400", "--rdzv-id", "job9",
                    "--shutdown-timeout", "300", "--", "model=dense_1b")
    assert (_flag(argv, "--nnodes"), _flag(argv, "--nproc_per_node")) == ("4", "8")
    assert (_flag(argv, "--rdzv_backend"), _flag(argv, "--rdzv_endpoint"), _flag(argv, "--rdzv_id")) == (
        "c10d", "gpu001:29400", "job9")
    assert (_flag(argv, "--max_restarts"), _flag(argv, "--shutdown_timeout")) == ("0", "300")
    assert "--master_addr" not in argv and argv[-3:] == ["-m", "train", "model=dense_1b"]


def test_torchrun_takes_its_layout_from_slurm(capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    for key, value in {"SLURM_JOB_ID": "777", "SLURM_JOB_NODELIST": "a100-[3-4]", "SLURM_JOB_NUM_NODES": "2",
                       "SLURM_NODEID": "1", "SLURM_CPUS_PER_TASK": "64", "SLURM_GPUS_ON_NODE": "8"}.items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    argv = _dry_run(capsys, "--launcher", "torchrun", "--device", "gpu", "--", "model=dense_tiny")
    assert argv[0] == "OMP_NUM_THREADS=8"
    assert (_flag(argv, "--nnodes"), _flag(argv, "--nproc_per_node"), _flag(argv, "--node_rank")) == ("2", "8", "1")
    assert _flag(argv, "--rdzv_endpoint") == f"a100-3:{master_port_for_job(777)}"
    assert _flag(argv, "--rdzv_id") == "777"


def test_deepspeed_commands_and_hostfile(capsys: pytest.CaptureFixture, tmp_path: Path) -> None:
    single = _dry_run(capsys, "--launcher", "deepspeed", "--gpus-per-node", "2", "--device", "cpu",
                      "--master-port", "29502", "--", "model=dense_tiny")
    assert single[1:4] == [PYTHON, "-m", "deepspeed.launcher.runner"]
    assert (_flag(single, "--num_gpus"), _flag(single, "--master_port")) == ("2", "29502")
    assert "--hostfile" not in single and "--no_ssh" not in single
    assert single[-4:] == ["--no_local_rank", "--module", "train", "model=dense_tiny"]

    hostfile = tmp_path / "hostfile"
    multi = _dry_run(capsys, "--launcher", "deepspeed", "--nodes", "2", "--gpus-per-node", "4", "--device", "gpu",
                     "--hosts", "n1,n2", "--node-rank", "1", "--master-port", "29503", "--hostfile", str(hostfile),
                     "--", "model=dense_tiny")
    assert (_flag(multi, "--hostfile"), _flag(multi, "--num_nodes"), _flag(multi, "--node_rank")) == (
        str(hostfile), "2", "1")
    assert "--no_ssh" in multi and _flag(multi, "--master_addr") == "n1"
    assert not hostfile.exists()  # a dry run writes nothing


def test_srun_direct_one_task_per_gpu(capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SLURM_CPUS_ON_NODE", "96")
    argv = _dry_run(capsys, "--launcher", "srun", "--nodes", "2", "--gpus-per-node", "8", "--device", "gpu",
                    "--", "model=dense_tiny")
    assert argv[:3] == ["srun", "--nodes", "2"]
    assert (_flag(argv, "--ntasks-per-node"), _flag(argv, "--cpus-per-task"), _flag(argv, "--gpus-per-node")) == (
        "8", "12", "8")
    assert argv[-5:] == [PYTHON, "-u", "-m", "train", "model=dense_tiny"]
    cpu = _dry_run(capsys, "--launcher", "srun", "--nodes", "1", "--gpus-per-node", "2", "--device", "cpu")
    assert "--gpus-per-node" not in cpu and _flag(cpu, "--ntasks-per-node") == "2"


@pytest.mark.parametrize(("args", "message"), [
    (["--launcher", "torchrun", "--nodes", "2", "--node-rank", "2", "--master-addr", "h"], "--node-rank 2"),
    (["--launcher", "torchrun", "--nodes", "2"], "--master-addr is required"),
    (["--launcher", "deepspeed", "--nodes", "2", "--master-addr", "h"], "needs 2 host names"),
    (["--launcher", "torchrun", "--gpus-per-node", "0"], "--gpus-per-node must be >= 1"),
])
def test_bad_layouts_fail_with_one_line(capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch,
                                        args: list[str], message: str) -> None:
    for key in ("SLURM_JOB_NODELIST", "SLURM_JOB_NUM_NODES", "SLURM_NNODES", "SLURM_NODEID", "SLURM_JOB_ID"):
        monkeypatch.delenv(key, raising=False)
    assert launch_main(["--dry-run", "--device", "cpu", *args]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1


# ---- submitit: torch.distributed inside a submitit job, without torchrun ----------------------------------------

def submitit_rank_report() -> dict[str, float | str]:
    """Runs inside each task of a submitit job: set the variables up, then all-reduce over gloo with them."""
    import torch
    import torch.distributed as dist

    from launch.env import setup_distributed_env_from_submitit

    setup_distributed_env_from_submitit()
    dist.init_process_group("gloo")
    value = torch.tensor([float(dist.get_rank() + 1)])
    dist.all_reduce(value)
    dist.destroy_process_group()
    report: dict[str, float | str] = {k: os.environ[k] for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    report["sum"] = float(value.item())
    return report


def test_submitit_job_sets_up_torch_distributed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import submitit

    for key, value in child_env().items():  # the job's processes import this module from the repository
        monkeypatch.setenv(key, value)
    executor = submitit.LocalExecutor(folder=tmp_path / "submitit")
    executor.update_parameters(tasks_per_node=2, nodes=1, timeout_min=3, cpus_per_task=1)
    reports = executor.submit(submitit_rank_report).results()
    assert sorted(r["RANK"] for r in reports) == ["0", "1"]
    assert {r["WORLD_SIZE"] for r in reports} == {"2"} and {r["sum"] for r in reports} == {3.0}
    assert len({r["MASTER_PORT"] for r in reports}) == 1


# ---- launch.allocator -----------------------------------------------------------------------------------------

TCMALLOC = find_library("tcmalloc")
needs_tcmalloc = pytest.mark.skipif(TCMALLOC is None, reason="libtcmalloc-minimal4 is not installed (make installs "
                                    "it on a root Debian machine: scripts/install_tcmalloc.sh)")


def test_allocator_choice_rules(monkeypatch: pytest.MonkeyPatch) -> None:
    assert allocator_env("system", {}) == {}
    assert allocator_env("auto", {}, on_gpu=True) == {}  # GPU runs keep the system's unless one is named
    kept = {"LD_PRELOAD": "/opt/lib/libjemalloc.so.2"}
    assert preloaded(kept) == "jemalloc" and allocator_env("tcmalloc", kept) == {}  # the user's choice stands
    with pytest.raises(AllocatorError, match="unknown allocator 'mimalloc'"):
        allocator_env("mimalloc", {})
    monkeypatch.setitem(launch.allocator.LIBRARIES, "jemalloc", ("libjemalloc-absent.so.9",))
    with pytest.raises(AllocatorError) as error:
        allocator_env("jemalloc", {})
    assert "\n" not in str(error.value) and "apt-get install libjemalloc2" in str(error.value)
    assert "--allocator system" in str(error.value)
    assert allocator_env("auto", {}) == ({} if TCMALLOC is None else allocator_env("tcmalloc", {}))


@needs_tcmalloc
def test_allocator_env_preloads_tcmalloc_into_the_command() -> None:
    env = allocator_env("auto", {"LD_PRELOAD": "libfoo.so"})
    assert env["LD_PRELOAD"] == f"{TCMALLOC}:libfoo.so"
    probe = "from launch.allocator import active_allocator; print(active_allocator())"
    base = {k: v for k, v in child_env().items() if k != "LD_PRELOAD"}
    for choice, expected in (("auto", "tcmalloc"), ("system", "system")):
        out = subprocess.run([PYTHON, "-m", "launch.allocator", "--allocator", choice, "--", PYTHON, "-c", probe],
                             cwd=REPO, env=base, capture_output=True, text=True, check=True).stdout
        assert out.strip() == expected


@needs_tcmalloc
def test_launchers_preload_tcmalloc_on_cpu_only(capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("LD_PRELOAD", raising=False)
    common = ("--nodes", "1", "--gpus-per-node", "2", "--master-port", "29501", "--")
    for launcher in ("torchrun", "deepspeed", "srun"):
        argv = _dry_run(capsys, "--launcher", launcher, "--device", "cpu", *common)
        assert f"LD_PRELOAD={TCMALLOC}" in argv, launcher
    assert not any(a.startswith("LD_PRELOAD=") for a in _dry_run(capsys, "--launcher", "torchrun", "--device", "gpu",
                                                                  *common))
    assert not any(a.startswith("LD_PRELOAD=") for a in _dry_run(
        capsys, "--launcher", "torchrun", "--device", "cpu", "--allocator", "system", *common))


# ---- the real trainer under each launcher --------------------------------------------------------------------

def _launch(run_dir: Path, *launch_args: str) -> list[str]:
    return [PYTHON, "-m", "launch.run", "--device", "cpu", *launch_args, "--", *OVERRIDES, f"run_dir={run_dir}"]


@pytest.fixture(scope="module")
def launched_runs(sample_data: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The same job three ways, all started at once (most of each run is start-up, which overlaps well):
    the reference `torchrun --nproc_per_node 2`, two torchrun "nodes" with c10d rendezvous on loopback, and two
    deepspeed launchers (--no_ssh, generated hostfile) standing for two nodes."""
    root = tmp_path_factory.mktemp("launchers")
    torchrun_port, deepspeed_port = str(free_port()), str(free_port())
    commands = [_launch(root / "one_node", "--launcher", "torchrun", "--nodes", "1", "--gpus-per-node", "2",
                        "--master-port", str(free_port()))]
    for rank in (0, 1):
        commands.append(_launch(root / "torchrun_2nodes", "--launcher", "torchrun", "--nodes", "2", "--node-rank",
                                str(rank), "--gpus-per-node", "1", "--master-addr", "127.0.0.1", "--master-port",
                                torchrun_port, "--rdzv-id", "loopback-test"))
        commands.append(_launch(root / "deepspeed_2nodes", "--launcher", "deepspeed", "--nodes", "2", "--node-rank",
                                str(rank), "--gpus-per-node", "1", "--hosts", "node-a,node-b", "--master-addr",
                                "127.0.0.1", "--master-port", deepspeed_port, "--hostfile",
                                str(root / f"hostfile{rank}")))
    env = {k: v for k, v in child_env().items() if not k.startswith("SLURM_")}  # even when pytest runs in a job
    procs = [subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for cmd in commands]
    outputs = [proc.communicate(timeout=300)[0] for proc in procs]
    for proc, out in zip(procs, outputs, strict=True):
        assert proc.returncode == 0, f"{shlex.join(proc.args)} failed ({proc.returncode}):\n{out[-5000:]}"
        assert out.startswith("launch.run: "), "launch.run prints the command it runs first"
    return {"root": root, **{name: root / name for name in ("one_node", "torchrun_2nodes", "deepspeed_2nodes")}}


def _assert_same_losses(run_dir: Path, reference_dir: Path) -> None:
    reference, losses = train_losses(reference_dir), train_losses(run_dir)
    assert sorted(reference) == list(range(1, STEPS + 1)) and sorted(losses) == sorted(reference)
    for step, loss in reference.items():
        assert losses[step] == pytest.approx(loss, abs=1e-5), f"step {step}"


@pytest.mark.slow
def test_two_torchrun_nodes_on_loopback_match_one_node(launched_runs: dict[str, Path]) -> None:
    _assert_same_losses(launched_runs["torchrun_2nodes"], launched_runs["one_node"])


@pytest.mark.slow
def test_deepspeed_launcher_on_two_nodes_matches_torchrun(launched_runs: dict[str, Path]) -> None:
    assert (launched_runs["root"] / "hostfile0").read_text() == "node-a slots=1\nnode-b slots=1\n"
    _assert_same_losses(launched_runs["deepspeed_2nodes"], launched_runs["one_node"])


@pytest.mark.slow
def test_launched_ranks_run_under_the_chosen_allocator(launched_runs: dict[str, Path]) -> None:
    """Every launcher hands the allocator to the ranks (auto: tcmalloc on CPU where installed)."""
    expected = "system" if TCMALLOC is None else "tcmalloc"
    for name in ("one_node", "torchrun_2nodes", "deepspeed_2nodes"):
        summary = json.loads((launched_runs[name] / "summary.json").read_text())
        assert summary["host_allocator"] == expected, name
