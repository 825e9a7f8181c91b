"""The planner's prediction for the run being trained, so every run checks the model against what it measures."""

from __future__ import annotations

import os
import resource

import torch

from model.config import ConfigError
from train.config import RunConfig
from train.plan.cluster import ClusterConfig, load_cluster
from train.plan.predict import GB, Prediction, predict

_BY_DEVICE = {"H200": "h200_8x", "H100": "h100_8x", "A100": "a100_80g_8x"}


def cluster_for(device: torch.device, world: int) -> ClusterConfig | None:
    """This job's machines as a cluster config: the conf/cluster entry of the accelerator (cpu_local on CPU) with
    the job's ranks per node and node count."""
    if device.type == "cuda":
        name = next((v for k, v in _BY_DEVICE.items() if k in torch.cuda.get_device_name(device)), None)
    else:
        name = "cpu_local"
    if name is None:
        return None
    per_node = int(os.environ.get("LOCAL_WORLD_SIZE", world))
    return load_cluster([f"cluster={name}", f"cluster.gpus_per_node={per_node}",
                         f"cluster.nodes={max(1, world // per_node)}"])


def predict_run(cfg: RunConfig, device: torch.device, world: int) -> Prediction | None:
    cluster = cluster_for(device, world)
    if cluster is None or cluster.world_size != world:
        return None
    try:
        return predict(cfg.model, cfg.parallel, cluster, seq_len=cfg.train.seq_len,
                       micro_batch=cfg.train.micro_batch_size, global_batch=cfg.train.global_batch_size)
    except ConfigError:
        return None


def measured_memory_gb(device: torch.device) -> float:
    """This rank's peak: allocated accelerator memory, or the process's peak resident set on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / GB
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GB
