"""A cluster as the planner sees it (`conf/cluster/*.yaml`): nodes of identical accelerators, their peak
throughput, memory and links."""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml

from model.config import ConfigError, config_from_dict

CLUSTERS = Path(__file__).resolve().parents[2] / "conf" / "cluster"


@dataclass
class ClusterConfig:
    name: str = "h100_8x"
    nodes: int = 1
    gpus_per_node: int = 8
    memory_per_gpu_gb: float = 80.0
    memory_reserved_gb: float = 4.0
    peak_flops: float = 989e12  # dense FLOP/s per accelerator at `precision`
    hbm_bandwidth: float = 3.35e12  # bytes/s
    matmul_efficiency: float = 0.72  # fraction of peak that large GEMMs reach
    # Measured (smallest GEMM dimension, fraction of peak) points where thin GEMMs reach less (CPU: calibrated);
    # between points log-linear, beyond the last ``matmul_efficiency``. Empty: ``matmul_efficiency`` for all.
    matmul_efficiency_by_dim: tuple[tuple[int, float], ...] = ()
    attention_efficiency: float = 0.5
    intra_node_bandwidth: float = 450e9  # bytes/s per accelerator, one direction
    intra_node_latency_s: float = 5e-6
    inter_node_bandwidth: float = 50e9
    inter_node_latency_s: float = 10e-6
    kernel_overhead_s: float = 5e-6
    # Host-side costs (`train.plan.host`). On GPUs the host runs ahead of the asynchronous kernels and these hide
    # behind them (0); on a CPU they run on the compute thread and `python -m train.plan calibrate` measures them.
    op_overhead_s: float = 0.0  # per operator dispatched under autograd (Python, dispatcher, autograd node)
    collective_overhead_s: float = 0.0  # per collective call from Python, on top of the ring's latency
    gather_scatter_slowdown: float = 1.0  # all-gather/reduce-scatter/all-to-all bytes vs a ring at the bandwidth
    zero_param_s: float = 0.0  # DeepSpeed ZeRO 1-2: per parameter and micro-batch (its gradient hook)
    zero3_param_s: float = 0.0  # ZeRO-3: per gathered parameter and micro-batch (fetch, release, hook)
    overlap_comm: bool = True  # communication runs beside compute (GPU streams); not when one thread does both
    precision: Literal["bf16", "fp32"] = "bf16"

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ClusterConfig:
        cfg = config_from_dict(cls, d, "cluster")
        cfg.validate()
        return cfg

    def gemm_efficiency(self, smallest_dim: float) -> float:
        """Fraction of peak a GEMM whose smallest dimension is ``smallest_dim`` reaches."""
        points = sorted(self.matmul_efficiency_by_dim)
        if not points or smallest_dim >= points[-1][0]:
            return self.matmul_efficiency
        if smallest_dim <= points[0][0]:
            return points[0][1]
        for (d0, e0), (d1, e1) in itertools.pairwise(points):
            if smallest_dim <= d1:
                w = math.log(smallest_dim / d0) / math.log(d1 / d0)
                return e0 + w * (e1 - e0)
        return self.matmul_efficiency

    @property
    def world_size(self) -> int:
        return self.nodes * self.gpus_per_node

    @property
    def usable_memory(self) -> float:
        """Bytes per accelerator a training process can fill."""
        return (self.memory_per_gpu_gb - self.memory_reserved_gb) * 2**30

    def validate(self) -> None:
        for key in ("nodes", "gpus_per_node"):
            if getattr(self, key) < 1:
                raise ConfigError(f"cluster.{key}", f"must be >= 1, got {getattr(self, key)}")
        for key in ("memory_per_gpu_gb", "peak_flops", "hbm_bandwidth", "intra_node_bandwidth",
                    "inter_node_bandwidth"):
            if getattr(self, key) <= 0:
                raise ConfigError(f"cluster.{key}", f"must be positive, got {getattr(self, key)}")
        for key in ("kernel_overhead_s", "op_overhead_s", "collective_overhead_s", "zero_param_s", "zero3_param_s",
                    "intra_node_latency_s", "inter_node_latency_s"):
            if getattr(self, key) < 0:
                raise ConfigError(f"cluster.{key}", f"must be >= 0, got {getattr(self, key)}")
        for key in ("matmul_efficiency", "attention_efficiency"):
            if not 0 < getattr(self, key) <= 1:
                raise ConfigError(f"cluster.{key}", f"must be in (0, 1], got {getattr(self, key)}")
        for dim, eff in self.matmul_efficiency_by_dim:
            if dim < 1 or not 0 < eff <= 1:
                raise ConfigError("cluster.matmul_efficiency_by_dim", f"needs [dim >= 1, efficiency in (0, 1]] "
                                  f"pairs, got {[dim, eff]}")
        if self.gather_scatter_slowdown < 1:
            raise ConfigError("cluster.gather_scatter_slowdown", f"must be >= 1, got {self.gather_scatter_slowdown}")
        if not 0 <= self.memory_reserved_gb < self.memory_per_gpu_gb:
            raise ConfigError("cluster.memory_reserved_gb", f"must be in [0, memory_per_gpu_gb), got "
                              f"{self.memory_reserved_gb}")


def load_cluster(overrides: list[str]) -> ClusterConfig:
    """``cluster=NAME`` picks conf/cluster/NAME.yaml (default h100_8x); ``cluster.KEY=VALUE`` sets a field."""
    name, values = "h100_8x", {}
    for item in overrides:
        key, _, value = item.partition("=")
        if key == "cluster":
            name = value
        else:
            values[key.removeprefix("cluster.")] = yaml.safe_load(value)
    path = CLUSTERS / f"{name}.yaml"
    if not path.is_file():
        known = ", ".join(sorted(p.stem for p in (CLUSTERS).glob("*.yaml")))
        raise ConfigError("cluster", f"no config named {name!r} in conf/cluster; available: {known}")
    return ClusterConfig.from_dict({**yaml.safe_load(path.read_text()), **values})
