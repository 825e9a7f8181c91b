"""Process group set-up and the DeepSpeed engine: ZeRO config, optimizer, lr schedule."""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Iterator
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from train.config import OptimConfig, RunConfig, SchedConfig


def ensure_distributed_env() -> None:
    """Makes a plain `python -m train` a 1-process world and maps SLURM/submitit variables.

    Without RANK/WORLD_SIZE/MASTER_* DeepSpeed falls into MPI discovery and fails.
    """
    if "RANK" not in os.environ:
        if "SUBMITIT_EXECUTOR" in os.environ or "SUBMITIT_FOLDER" in os.environ:
            from launch.env import setup_distributed_env_from_submitit

            setup_distributed_env_from_submitit()
        elif "SLURM_PROCID" in os.environ and "SLURM_NTASKS" in os.environ:
            from launch.env import setup_distributed_env_from_slurm

            setup_distributed_env_from_slurm()
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("LOCAL_RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    os.environ.setdefault("LOCAL_WORLD_SIZE", os.environ["WORLD_SIZE"])
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    if "MASTER_PORT" not in os.environ:
        os.environ["MASTER_PORT"] = str(_free_port())


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def resolve_device(requested: str) -> torch.device:
    if requested == "cuda" or (requested == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise RuntimeError("train.device=cuda but no CUDA device is visible; use train.device=cpu")
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


def resolve_precision(requested: str, device: torch.device) -> str:
    if requested == "auto":
        return "bf16" if device.type == "cuda" else "fp32"
    return requested


def init_distributed(device: torch.device, timeout: timedelta = timedelta(minutes=30)) -> None:
    """Creates the default process group (gloo on CPU, nccl on GPU) through DeepSpeed; ``timeout`` bounds every
    collective on it."""
    import deepspeed

    # DeepSpeed JIT-compiles its shared-memory comm op on first init on CPU (~3 min) although
    # training never uses it; marking it incompatible skips the build.
    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        deepspeed.init_distributed(
            dist_backend="nccl" if device.type == "cuda" else "gloo",
            auto_mpi_discovery=False,
            timeout=timeout,
        )


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Weight decay on matrices only (not on norms, biases or 1-d Mamba parameters)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        ndim = len(getattr(p, "ds_shape", p.shape))  # a ZeRO-3 parameter holds a flat partition
        (decay if ndim >= 2 and not name.endswith("A_log") else no_decay).append(p)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def build_optimizer(model: nn.Module, cfg: OptimConfig) -> torch.optim.Optimizer:
    from train.parallel.ep import expert_param_groups  # no-op without expert parallelism

    # torch's fused AdamW (one kernel over all tensors, CPU and CUDA; ~4x faster than the per-tensor loop on CPU),
    # not DeepSpeed's FusedAdam/CPUAdam, which JIT-compile for minutes on CPU. Expert-parallel parameters go into
    # DeepSpeed's MoE param groups (unchanged without expert parallelism).
    groups = expert_param_groups(param_groups(model, cfg.weight_decay))
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, fused=True)


def lr_multiplier(step: int, total_steps: int, sched: SchedConfig) -> float:
    """Learning-rate factor (times optim.lr) for optimizer step `step` (0-based)."""
    if sched.warmup_steps > 0 and step < sched.warmup_steps:
        return (step + 1) / sched.warmup_steps
    floor = sched.min_lr_ratio
    if sched.name == "constant":
        return 1.0
    if sched.name == "cosine":
        span = max(1, total_steps - sched.warmup_steps)
        progress = min(1.0, (step - sched.warmup_steps) / span)
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))
    # wsd: constant until the decay phase, then linear to the floor.
    decay_steps = round(sched.decay_fraction * total_steps)
    decay_start = total_steps - decay_steps
    if step < decay_start or decay_steps == 0:
        return 1.0
    progress = min(1.0, (step - decay_start + 1) / decay_steps)
    return 1.0 - (1.0 - floor) * progress


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: RunConfig) -> torch.optim.lr_scheduler.LambdaLR:
    steps, sched = cfg.train.steps, cfg.sched
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_multiplier(s, steps, sched))


def deepspeed_config(cfg: RunConfig, precision: str) -> dict[str, Any]:
    """Communication buckets sized from the model (`train.memory.zero_buckets`), not DeepSpeed's defaults."""
    from train.memory import zero_buckets

    stage = cfg.parallel.zero_stage
    zero: dict[str, Any] = {"stage": stage, **zero_buckets(cfg.model).deepspeed(stage)}
    return {
        # DeepSpeed counts a sample once per data x context parallel rank (CP ranks hold parts of the same ones).
        "train_batch_size": cfg.train.global_batch_size * cfg.parallel.cp,
        "train_micro_batch_size_per_gpu": cfg.train.micro_batch_size,
        "gradient_accumulation_steps": cfg.grad_accum_steps,
        # DeepSpeed 0.19 clips at 1.0 unless told otherwise: always set it.
        "gradient_clipping": cfg.train.grad_clip,
        "zero_optimization": zero,
        "bf16": {"enabled": precision == "bf16"},
        "fp16": {"enabled": False},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
        "dump_state": False,
    }


@contextlib.contextmanager
def zero3_master_weights_shared() -> Iterator[None]:
    """ZeRO-3 with float32 weights keeps no second float32 copy of each partition as its master weights.

    DeepSpeed means to share the partition when the weights already are float32 on the optimizer's device (as under
    autocast), but it compares ``tensor.device`` with the device name as a string, which is never equal, so every
    rank would hold 4 more bytes per parameter of its partition. For the duration of the optimizer's construction
    its device is given as a ``torch.device``; nothing else changes (bf16 weights still get their float32 copy)."""
    from deepspeed.runtime.zero.stage3 import DeepSpeedZeroOptimizer_Stage3

    original = DeepSpeedZeroOptimizer_Stage3._create_fp32_partitions

    def create(self: Any) -> Any:
        name = self.device
        self.device = torch.device(name)
        try:
            return original(self)
        finally:
            self.device = name

    DeepSpeedZeroOptimizer_Stage3._create_fp32_partitions = create
    try:
        yield
    finally:
        DeepSpeedZeroOptimizer_Stage3._create_fp32_partitions = original
