"""torch.distributed environment variables from SLURM or submitit, for processes started without torchrun.

torchrun and the deepspeed launcher export RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT themselves.
A process started directly by ``srun`` (one task per GPU) or by a submitit job has only SLURM's (or submitit's)
variables; the trainer calls one of the ``setup_*`` functions here before ``init_process_group`` so that the
``env://`` rendezvous works the same way in every case.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping, MutableMapping, Sequence
from dataclasses import dataclass

# Ports derived from a job id fall in this range: above the well-known/registered ports most services use and
# below Linux's default ephemeral range (32768+), so an outgoing connection cannot already hold the port.
_JOB_PORT_BASE = 20000
_JOB_PORT_SPAN = 12000


@dataclass(frozen=True)
class DistributedEnv:
    """Where this process sits in the job, as torch.distributed's env:// initialisation needs it."""

    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    node_rank: int
    num_nodes: int
    master_addr: str
    master_port: int

    def __post_init__(self) -> None:
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank {self.rank} is outside world size {self.world_size}; check SLURM_PROCID/NTASKS")
        if not 0 <= self.local_rank < self.local_world_size:
            raise ValueError(
                f"local rank {self.local_rank} is outside local world size {self.local_world_size}; "
                "check SLURM_LOCALID and SLURM_STEP_TASKS_PER_NODE"
            )
        if not 0 < self.master_port < 65536:
            raise ValueError(f"master port {self.master_port} is not a TCP port")

    def as_environ(self) -> dict[str, str]:
        """The variables torchrun would have exported for this process."""
        return {
            "RANK": str(self.rank),
            "WORLD_SIZE": str(self.world_size),
            "LOCAL_RANK": str(self.local_rank),
            "LOCAL_WORLD_SIZE": str(self.local_world_size),
            "GROUP_RANK": str(self.node_rank),
            "NODE_RANK": str(self.node_rank),
            "MASTER_ADDR": self.master_addr,
            "MASTER_PORT": str(self.master_port),
        }


def expand_hostlist(hostlist: str) -> list[str]:
    """Expand a SLURM host list such as ``gpu[001-003,7],login-a[1-2]b`` into host names, in order.

    Hand-written rather than calling ``scontrol show hostnames`` so that it works inside containers without the
    SLURM client tools and costs no subprocess per rank; submitit has a parser too, but only as private API.
    Several bracket groups in one name expand as a product (``r[1-2]n[1-2]`` -> r1n1 r1n2 r2n1 r2n2).
    """
    hosts: list[str] = []
    for item in _split_top_level(hostlist.strip()):
        hosts.extend(_expand_one(item))
    if not hosts:
        raise ValueError(f"empty SLURM host list {hostlist!r}")
    return hosts


def _split_top_level(hostlist: str) -> list[str]:
    """Split on the commas that are not inside brackets."""
    items, depth, start = [], 0, 0
    for i, char in enumerate(hostlist):
        if char == "[":
            depth += 1
        elif char == "]":
            depth -= 1
            if depth < 0:
                raise ValueError(f"unbalanced ']' in SLURM host list {hostlist!r}")
        elif char == "," and depth == 0:
            items.append(hostlist[start:i])
            start = i + 1
    if depth != 0:
        raise ValueError(f"unbalanced '[' in SLURM host list {hostlist!r}")
    items.append(hostlist[start:])
    return [item for item in items if item]


def _expand_one(item: str) -> list[str]:
    match = re.match(r"^([^\[]*)\[([^\]]*)\](.*)$", item)
    if match is None:
        return [item]
    prefix, ranges, rest = match.groups()
    tails = _expand_one(rest) if rest else [""]
    names = []
    for part in ranges.split(","):
        bounds = part.split("-")
        if len(bounds) == 1 and bounds[0].isdigit():
            numbers = [bounds[0]]
        elif len(bounds) == 2 and bounds[0].isdigit() and bounds[1].isdigit():
            low, high = int(bounds[0]), int(bounds[1])
            if high < low:
                raise ValueError(f"descending range {part!r} in SLURM host list entry {item!r}")
            width = len(bounds[0])  # "001-010" keeps its zero padding
            numbers = [str(n).zfill(width) for n in range(low, high + 1)]
        else:
            raise ValueError(f"cannot parse range {part!r} in SLURM host list entry {item!r}")
        names.extend(prefix + number for number in numbers)
    return [name + tail for name in names for tail in tails]


def expand_tasks_per_node(spec: str) -> list[int]:
    """Expand SLURM's tasks-per-node notation, e.g. ``2(x3),1`` -> [2, 2, 2, 1]."""
    counts: list[int] = []
    for part in spec.split(","):
        match = re.fullmatch(r"(\d+)(?:\(x(\d+)\))?", part.strip())
        if match is None:
            raise ValueError(f"cannot parse SLURM tasks-per-node value {spec!r}")
        counts.extend([int(match.group(1))] * int(match.group(2) or 1))
    return counts


def master_port_for_job(job_id: str | int) -> int:
    """A port every task of one job computes alike without talking to the others."""
    digits = re.sub(r"\D", "", str(job_id))  # array jobs may appear as "123_4"
    if not digits:
        raise ValueError(f"SLURM job id {job_id!r} has no digits to derive a port from")
    return _JOB_PORT_BASE + int(digits) % _JOB_PORT_SPAN


def _int_var(environ: Mapping[str, str], key: str) -> int:
    value = environ.get(key)
    if value is None:
        raise KeyError(key)
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"{key}={value!r} is not an integer") from None


def slurm_distributed_env(environ: Mapping[str, str]) -> DistributedEnv:
    """Rank layout of an ``srun`` task from its SLURM variables (pure: reads only ``environ``).

    Inside ``srun`` the step variables (SLURM_STEP_*) describe the tasks actually started; the job-level ones
    describe the allocation. Outside a step (a plain process in the batch script) only one process exists.
    MASTER_ADDR/MASTER_PORT already in ``environ`` win over the derived ones, so a user can pin them.
    """
    missing = [key for key in ("SLURM_PROCID", "SLURM_LOCALID") if key not in environ]
    if missing:
        raise ValueError(f"not inside a SLURM task: {', '.join(missing)} unset; start the job with srun or torchrun")
    if "SLURM_STEP_NUM_TASKS" in environ:
        world_size = _int_var(environ, "SLURM_STEP_NUM_TASKS")
    elif "SLURM_NTASKS" in environ:
        world_size = _int_var(environ, "SLURM_NTASKS")
        if world_size > 1:
            raise ValueError(
                f"SLURM_NTASKS={world_size} but this process was not started by srun (no SLURM_STEP_NUM_TASKS), so "
                "the other ranks do not exist; launch with `srun python -m train ...` or with torchrun"
            )
    else:
        world_size = 1
    rank = _int_var(environ, "SLURM_PROCID")
    local_rank = _int_var(environ, "SLURM_LOCALID")
    node_rank = int(environ.get("SLURM_NODEID", "0"))
    nodelist = environ.get("SLURM_STEP_NODELIST") or environ.get("SLURM_JOB_NODELIST") or environ.get("SLURM_NODELIST")
    hosts = expand_hostlist(nodelist) if nodelist else ["127.0.0.1"]
    tasks_spec = environ.get("SLURM_STEP_TASKS_PER_NODE") or environ.get("SLURM_TASKS_PER_NODE")
    if tasks_spec and world_size > 1:
        per_node = expand_tasks_per_node(tasks_spec)
        if node_rank >= len(per_node):
            raise ValueError(f"SLURM_NODEID={node_rank} but tasks-per-node {tasks_spec!r} lists {len(per_node)} nodes")
        local_world_size = per_node[node_rank]
    else:
        local_world_size = world_size
    job_id = environ.get("SLURM_JOB_ID") or environ.get("SLURM_JOBID")
    if "MASTER_PORT" in environ:
        master_port = _int_var(environ, "MASTER_PORT")
    elif job_id:
        master_port = master_port_for_job(job_id)
    else:
        master_port = 29500
    return DistributedEnv(
        rank=rank,
        world_size=world_size,
        local_rank=local_rank,
        local_world_size=local_world_size,
        node_rank=node_rank,
        num_nodes=len(hosts),
        master_addr=environ.get("MASTER_ADDR", hosts[0]),
        master_port=master_port,
    )


def available_cpus() -> int:
    """CPUs this process may run on (respects affinity masks set by SLURM or taskset)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def omp_threads_per_rank(environ: Mapping[str, str], local_world_size: int, cpu_count: int | None = None) -> int:
    """Intra-op threads per rank: SLURM_CPUS_PER_TASK when SLURM gave each rank its CPUs, else a fair share."""
    if local_world_size < 1:
        raise ValueError(f"local world size must be >= 1, got {local_world_size}")
    cpus_per_task = environ.get("SLURM_CPUS_PER_TASK")
    if cpus_per_task:
        return max(1, int(cpus_per_task))
    return max(1, (cpu_count if cpu_count is not None else available_cpus()) // local_world_size)


def setup_distributed_env_from_slurm(environ: MutableMapping[str, str] | None = None) -> None:
    """Export RANK/WORLD_SIZE/LOCAL_RANK/MASTER_ADDR/MASTER_PORT (and OMP_NUM_THREADS) for an srun task.

    MASTER_ADDR is the first host of the step's node list, MASTER_PORT is derived from the job id; variables
    that are already set (torchrun, or pinned by the user) are left alone.
    """
    environ = os.environ if environ is None else environ
    dist_env = slurm_distributed_env(environ)
    for key, value in dist_env.as_environ().items():
        environ.setdefault(key, value)
    environ.setdefault("OMP_NUM_THREADS", str(omp_threads_per_rank(environ, dist_env.local_world_size)))


def setup_distributed_env_from_submitit() -> None:
    """Export the torch.distributed variables inside a submitit job (SLURM or local executor).

    CUDA_VISIBLE_DEVICES is left as SLURM set it: the trainer selects ``cuda:LOCAL_RANK`` itself.
    """
    from submitit.helpers import TorchDistributedEnvironment

    dist_env = TorchDistributedEnvironment().export(set_cuda_visible_devices=False, overwrite=True)
    os.environ.setdefault("OMP_NUM_THREADS", str(omp_threads_per_rank(os.environ, dist_env.local_world_size)))


def split_command(argv: Sequence[str]) -> tuple[list[str], list[str]]:
    """A launcher's own arguments and, after ``--``, what it passes on (nothing when there is no ``--``)."""
    argv = list(argv)
    split = argv.index("--") if "--" in argv else len(argv)
    return argv[:split], argv[split + 1:]
