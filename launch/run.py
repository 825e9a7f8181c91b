"""Build, print and exec the command that starts training on one node of a (possibly multi-node) job.

    python -m launch.run --launcher torchrun|deepspeed|srun --nodes N --gpus-per-node G \
        [--node-rank R --master-addr A --master-port P] [--dry-run] -- [hydra overrides]

Run it once per node (under SLURM: ``srun --ntasks-per-node=1 python -m launch.run ...``); for ``srun`` run it
once per job, it starts every rank itself. Defaults come from SLURM's variables when present (node count, node
rank, first host as master, a port derived from the job id). On a machine without GPUs ``--gpus-per-node`` is the
number of CPU processes per node. The command is printed (with the variables it adds) before it is exec'd.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from launch.allocator import ALLOCATORS, allocator_env
from launch.env import available_cpus, expand_hostlist, master_port_for_job, split_command

Launcher = Literal["torchrun", "deepspeed", "srun"]
LAUNCHERS: tuple[Launcher, ...] = ("torchrun", "deepspeed", "srun")
# Signals torchrun forwards to its workers. SIGUSR1 is SLURM's usual "time is nearly up" warning: without it in
# the list torchrun dies on it and its workers are killed before they can checkpoint.
TORCHRUN_SIGNALS = "SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1"
DEFAULT_PORT = 29500


@dataclass(frozen=True)
class LaunchSpec:
    """Everything that decides the command line; validated on construction."""

    launcher: Launcher
    nodes: int
    gpus_per_node: int  # GPUs per node; on CPU the number of processes per node
    node_rank: int
    master_addr: str
    master_port: int
    rdzv_id: str
    hosts: tuple[str, ...]  # node names in rank order (deepspeed hostfile); may be empty for one node
    cpus_per_node: int  # 0: unknown (srun from outside an allocation: SLURM decides)
    use_gpus: bool
    module: str = "train"
    overrides: tuple[str, ...] = ()
    python: str = sys.executable
    shutdown_timeout_s: int = 600  # how long torchrun waits for workers to save before it SIGKILLs them
    hostfile: str = ""  # where the deepspeed hostfile goes (multi-node); a temp path if empty
    master_pinned: bool = False  # srun: export MASTER_ADDR/PORT to the tasks instead of letting them derive them
    allocator_env: tuple[tuple[str, str], ...] = ()  # LD_PRELOAD etc. of the host allocator (launch.allocator)

    def __post_init__(self) -> None:
        if self.launcher not in LAUNCHERS:
            raise ValueError(f"unknown launcher {self.launcher!r}; use one of {', '.join(LAUNCHERS)}")
        if self.nodes < 1:
            raise ValueError(f"--nodes must be >= 1, got {self.nodes}")
        if self.gpus_per_node < 1:
            raise ValueError(f"--gpus-per-node must be >= 1 (processes per node on CPU), got {self.gpus_per_node}")
        if not 0 <= self.node_rank < self.nodes:
            raise ValueError(f"--node-rank {self.node_rank} is outside [0, {self.nodes}); pass --node-rank")
        if not 0 < self.master_port < 65536:
            raise ValueError(f"--master-port {self.master_port} is not a TCP port")
        if self.launcher == "deepspeed" and self.nodes > 1 and len(self.hosts) != self.nodes:
            raise ValueError(
                f"deepspeed on {self.nodes} nodes needs {self.nodes} host names for its hostfile, got "
                f"{list(self.hosts)}; pass --hosts h1,h2,... or run inside a SLURM allocation"
            )

    @property
    def procs_per_node(self) -> int:
        return self.gpus_per_node

    @property
    def omp_threads(self) -> int:
        return max(1, (self.cpus_per_node or available_cpus()) // self.procs_per_node)


@dataclass
class LaunchPlan:
    """The command, the variables it adds to the environment, and files to write before running it."""

    argv: list[str]
    env: dict[str, str] = field(default_factory=dict)
    files: dict[str, str] = field(default_factory=dict)

    def render(self) -> str:
        assignments = [f"{key}={shlex.quote(value)}" for key, value in self.env.items()]
        return " ".join([*assignments, shlex.join(self.argv)])


def _train_args(spec: LaunchSpec) -> list[str]:
    return ["-m", spec.module, *spec.overrides]


def torchrun_plan(spec: LaunchSpec) -> LaunchPlan:
    argv = [spec.python, "-m", "torch.distributed.run", "--nnodes", str(spec.nodes),
            "--nproc_per_node", str(spec.procs_per_node)]
    if spec.nodes == 1:
        argv += ["--master_addr", spec.master_addr, "--master_port", str(spec.master_port)]
    else:
        # c10d rendezvous: the agent on the host named in the endpoint serves the store, the others join it;
        # node ranks are handed out by the rendezvous (torchrun ignores --node_rank with c10d).
        argv += ["--rdzv_backend", "c10d", "--rdzv_endpoint", f"{spec.master_addr}:{spec.master_port}",
                 "--rdzv_id", spec.rdzv_id, "--node_rank", str(spec.node_rank)]
    # No in-place restarts: a failed job is requeued by SLURM and resumes from its last checkpoint instead.
    argv += ["--max_restarts", "0", "--signals_to_handle", TORCHRUN_SIGNALS,
             "--shutdown_timeout", str(spec.shutdown_timeout_s)]
    # torchrun would force OMP_NUM_THREADS=1 when it starts several workers; give each its share of the CPUs.
    env = {"OMP_NUM_THREADS": str(spec.omp_threads), **dict(spec.allocator_env)}
    return LaunchPlan(argv + _train_args(spec), env)


def deepspeed_plan(spec: LaunchSpec) -> LaunchPlan:
    argv = [spec.python, "-m", "deepspeed.launcher.runner", "--num_gpus", str(spec.procs_per_node),
            "--master_port", str(spec.master_port)]
    files = {}
    if spec.nodes > 1:
        # Each node runs its own launcher (--no_ssh): no pdsh/ssh between nodes, which SLURM clusters rarely allow.
        # The hostfile only tells every launcher the world layout; the same file is written on every node.
        hostfile = spec.hostfile or os.path.join(tempfile.gettempdir(), f"deepspeed_hostfile_{spec.rdzv_id}")
        files[hostfile] = "".join(f"{host} slots={spec.procs_per_node}\n" for host in spec.hosts)
        argv += ["--hostfile", hostfile, "--num_nodes", str(spec.nodes), "--no_ssh", "--node_rank",
                 str(spec.node_rank), "--master_addr", spec.master_addr]
    # --no_local_rank: the trainer reads LOCAL_RANK from the environment; a --local_rank=N argument would be
    # taken for a Hydra override and rejected.
    argv += ["--no_local_rank", "--module", spec.module, *spec.overrides]
    # The deepspeed launcher sets no OMP_NUM_THREADS; without it each rank would start one thread per core.
    return LaunchPlan(argv, {"OMP_NUM_THREADS": str(spec.omp_threads), **dict(spec.allocator_env)}, files)


def srun_plan(spec: LaunchSpec) -> LaunchPlan:
    argv = ["srun", "--nodes", str(spec.nodes), "--ntasks-per-node", str(spec.procs_per_node)]
    if spec.cpus_per_node:  # srun does not inherit --cpus-per-task from the job (SLURM >= 22.05): pass it
        argv += ["--cpus-per-task", str(spec.omp_threads)]
    argv += ["--kill-on-bad-exit=1"]
    if spec.use_gpus:
        argv += ["--gpus-per-node", str(spec.gpus_per_node)]
    # Each task finds its rank, the first host and a port from its SLURM variables through
    # launch.env.setup_distributed_env_from_slurm (called by the trainer), unless they are pinned here.
    env = {"MASTER_ADDR": spec.master_addr, "MASTER_PORT": str(spec.master_port)} if spec.master_pinned else {}
    env |= dict(spec.allocator_env)  # srun exports the environment to its tasks
    return LaunchPlan(argv + [spec.python, "-u", *_train_args(spec)], env)


def build_plan(spec: LaunchSpec) -> LaunchPlan:
    return {"torchrun": torchrun_plan, "deepspeed": deepspeed_plan, "srun": srun_plan}[spec.launcher](spec)


def _gpu_count() -> int:
    import torch  # imported late: only needed when the device is not given

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def spec_from_args(args: argparse.Namespace, overrides: Sequence[str], environ: Mapping[str, str]) -> LaunchSpec:
    """Fill what the command line left open from SLURM's variables (or single-machine defaults)."""
    # Count GPUs (imports torch: ~2 s) only when the answer is needed.
    needs_count = args.device == "auto" or (
        args.device == "gpu" and args.gpus_per_node is None and not environ.get("SLURM_GPUS_ON_NODE"))
    gpus_here = _gpu_count() if needs_count else 0
    use_gpus = args.device == "gpu" or (args.device == "auto" and gpus_here > 0)
    nodes = args.nodes if args.nodes is not None else int(
        environ.get("SLURM_JOB_NUM_NODES") or environ.get("SLURM_NNODES") or 1)
    gpus_per_node = args.gpus_per_node if args.gpus_per_node is not None else (
        int(environ.get("SLURM_GPUS_ON_NODE") or 0) or gpus_here or 1)
    node_rank = args.node_rank if args.node_rank is not None else int(environ.get("SLURM_NODEID", 0))
    if args.hosts:
        hosts = tuple(args.hosts.split(","))
    elif environ.get("SLURM_JOB_NODELIST"):
        hosts = tuple(expand_hostlist(environ["SLURM_JOB_NODELIST"]))[:nodes]
    else:
        hosts = ()
    master_addr = args.master_addr or (hosts[0] if hosts else None)
    if master_addr is None:
        if nodes > 1 and args.launcher != "srun":
            raise ValueError("--master-addr is required for several nodes outside SLURM (the first node's address)")
        master_addr = "127.0.0.1"
    job_id = environ.get("SLURM_JOB_ID")
    master_port = args.master_port or (master_port_for_job(job_id) if job_id else DEFAULT_PORT)
    cpus = args.cpus_per_node or int(environ.get("SLURM_CPUS_PER_TASK") or environ.get("SLURM_CPUS_ON_NODE") or 0)
    return LaunchSpec(
        launcher=args.launcher,
        nodes=nodes,
        gpus_per_node=gpus_per_node,
        node_rank=node_rank,
        master_addr=master_addr,
        master_port=master_port,
        rdzv_id=args.rdzv_id or job_id or f"train-{master_port}",
        hosts=hosts,
        cpus_per_node=cpus or (0 if args.launcher == "srun" else available_cpus()),
        use_gpus=use_gpus,
        module=args.module,
        overrides=tuple(overrides),
        shutdown_timeout_s=args.shutdown_timeout,
        hostfile=args.hostfile or "",
        master_pinned=bool(args.master_addr and args.master_port),
        allocator_env=tuple(allocator_env(args.allocator, environ, on_gpu=use_gpus).items()),
    )


def parse_args(argv: Sequence[str]) -> tuple[argparse.Namespace, list[str]]:
    own, overrides = split_command(argv)
    parser = argparse.ArgumentParser(prog="python -m launch.run", description=__doc__.split("\n\n")[0])
    parser.add_argument("--launcher", choices=LAUNCHERS, required=True)
    parser.add_argument("--nodes", type=int, default=None, help="number of nodes (default: SLURM's, else 1)")
    parser.add_argument("--gpus-per-node", type=int, default=None,
                        help="GPUs per node; on CPU the number of processes per node (default: SLURM's or all GPUs)")
    parser.add_argument("--node-rank", type=int, default=None, help="this node's rank (default: SLURM_NODEID or 0)")
    parser.add_argument("--master-addr", default=None, help="first node's address (default: first SLURM host)")
    parser.add_argument("--master-port", type=int, default=None, help="rendezvous port (default: from the job id)")
    parser.add_argument("--rdzv-id", default=None, help="rendezvous id (default: SLURM_JOB_ID)")
    parser.add_argument("--hosts", default=None, help="comma-separated node names for the deepspeed hostfile")
    parser.add_argument("--hostfile", default=None, help="where to write the deepspeed hostfile")
    parser.add_argument("--cpus-per-node", type=int, default=None, help="CPUs to share among this node's ranks")
    parser.add_argument("--device", choices=("auto", "gpu", "cpu"), default="auto")
    parser.add_argument("--module", default="train", help="python module to run (default: train)")
    parser.add_argument("--shutdown-timeout", type=int, default=600,
                        help="seconds torchrun waits for workers to checkpoint after a signal before SIGKILL")
    parser.add_argument("--allocator", choices=ALLOCATORS, default="auto",
                        help="host memory allocator of the ranks (launch/allocator.py); auto: tcmalloc on CPU when "
                             "installed, else glibc's malloc")
    parser.add_argument("--dry-run", action="store_true", help="print the command and exit")
    return parser.parse_args(own), overrides


def main(argv: Sequence[str] | None = None) -> int:
    args, overrides = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        plan = build_plan(spec_from_args(args, overrides, os.environ))
    except ValueError as error:
        print(f"launch.run: {error}", file=sys.stderr)
        return 2
    if "OMP_NUM_THREADS" in os.environ:  # a value the user set wins over our share of the CPUs
        plan.env.pop("OMP_NUM_THREADS", None)
    print(f"launch.run: {plan.render()}", flush=True)
    if args.dry_run:
        return 0
    for path, text in plan.files.items():
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(text)
    env = {**os.environ, **plan.env}
    # exec, not a child: signals sent to this process (SLURM, the batch script) reach the launcher directly.
    os.execvpe(plan.argv[0], plan.argv, env)
    return 1  # not reached


if __name__ == "__main__":
    sys.exit(main())
