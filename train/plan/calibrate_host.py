"""Host-side micro-benchmarks for `python -m train.plan calibrate`, run on every rank at once (as in training):
the cost of one operator under autograd, of one collective call beyond its latency, and DeepSpeed's per-parameter
work at each ZeRO stage. None of them runs the models the planner is checked against."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode


def timed(fn: Callable[[], object], repeats: int = 5, sync: bool = False) -> float:
    """Median of ``repeats`` calls after a warm-up; with ``sync`` every call starts after a barrier, so the ranks'
    collectives start together and the figure is the call, not the wait for a late rank."""
    fn()
    times = []
    for _ in range(repeats):
        if sync:
            dist.barrier()
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return sorted(times)[len(times) // 2]


class _Count(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.ops = 0

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        self.ops += 1
        return func(*args, **(kwargs or {}))


class _TinyBlock(nn.Module):
    """A pre-norm residual block on tiny tensors: norm, projections, gate, residual, the operator kinds a decoder
    block dispatches, with no arithmetic worth timing."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.norm = nn.RMSNorm(d)
        self.up = nn.Linear(d, 2 * d, bias=False)
        self.down = nn.Linear(d, d, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b = self.up(self.norm(x)).chunk(2, dim=-1)
        return x + self.down(F.silu(a) * b)


def op_overhead() -> float:
    """Seconds per operator of forward + backward through a stack of tiny blocks (operators counted by a dispatch
    mode, which sees backward's too: CPU autograd runs on the calling thread)."""
    stack = nn.Sequential(*[_TinyBlock(16) for _ in range(16)])
    x = torch.randn(2, 8, 16, requires_grad=True)

    def step() -> None:
        stack(x).sum().backward()

    with _Count() as counter:
        step()
    return timed(step, repeats=11) / counter.ops


def collective_costs(latency: float, bandwidth: float) -> dict[str, float]:
    """All-gathers and reduce-scatters as tensor parallelism issues them: between compute, in ranks that arrive a
    little apart and wake gloo's threads from cold. Large ones alone give their time for the bytes relative to a
    ring at the all-reduce's bandwidth ((n-1)/n of the bytes); then a loop of a GEMM and a 256 KiB all-gather or
    reduce-scatter (an activation of a small model), less the same loop without the collectives, gives the cost of
    one call beyond its ring time ((n-1) latency and the bytes)."""
    world = dist.get_world_size()

    def pair(numel: int, repeats: int) -> float:
        x, full = torch.ones(numel), torch.ones(numel * world)
        gather = timed(lambda: dist.all_gather_into_tensor(full, x), repeats=repeats, sync=True)
        scatter = timed(lambda: dist.reduce_scatter_tensor(x, full), repeats=repeats, sync=True)
        return (gather + scatter) / 2

    numel = 2**20  # 4 MiB a rank
    ring = (world - 1) / world * numel * world * 4 / bandwidth
    slowdown = max(1.0, (pair(numel, 5) - pair(16, 11)) / ring)
    act = 2**16 // world  # 256 KiB gathered
    x, full = torch.ones(act), torch.ones(act * world)
    a, b = torch.randn(256, 256), torch.randn(256, 256)
    calls = 32

    def loop(communicate: bool) -> float:
        dist.barrier()
        start = time.perf_counter()
        for i in range(calls):
            a @ b
            if communicate and i % 2:
                dist.reduce_scatter_tensor(x, full)
            elif communicate:
                dist.all_gather_into_tensor(full, x)
        return time.perf_counter() - start

    loop(True)
    # Paired runs, the median difference: the figure is noisy on a shared machine, the pairing cancels slow phases.
    diffs = sorted(loop(True) - loop(False) for _ in range(11))
    per_call = diffs[len(diffs) // 2] / calls
    ring_time = (world - 1) / world * act * world * 4 * slowdown / bandwidth + (world - 1) * latency
    return {"collective_overhead_s": max(0.0, per_call - ring_time), "gather_scatter_slowdown": slowdown}


def _engine_step_time(stage: int, layers: int, accumulation: int) -> float:
    """One optimizer step of a DeepSpeed engine (ZeRO ``stage``) over ``layers`` tiny linear layers, one parameter
    each, ``accumulation`` micro-batches; every parameter above ZeRO-3's persistence threshold."""
    import deepspeed

    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Linear(16, 16, bias=False) for _ in range(layers)])
    zero: dict[str, Any] = {"stage": stage}
    if stage == 3:
        zero |= {"stage3_param_persistence_threshold": 0, "stage3_prefetch_bucket_size": 0}
    config = {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": accumulation,
              "train_batch_size": 2 * accumulation * dist.get_world_size(), "zero_optimization": zero,
              "zero_allow_untested_optimizer": True, "steps_per_print": 10**9, "gradient_clipping": 1.0}
    engine, *_ = deepspeed.initialize(model=model, optimizer=torch.optim.AdamW(model.parameters()), config=config,
                                      dist_init_required=False)
    x = torch.randn(2, 16)

    def step() -> None:
        for _ in range(accumulation):
            engine.backward(engine(x).square().mean())
            engine.step()

    t = timed(step, repeats=5, sync=True)
    engine.destroy()
    return t


def zero_param_costs() -> dict[str, float]:
    """Seconds per parameter and micro-batch that DeepSpeed adds at ZeRO 1 (its gradient hooks) and ZeRO-3 (fetch,
    release and hook), over ZeRO-0 on the same model: the slope over 16 -> 64 one-parameter layers of the time of
    two accumulated micro-batches."""
    import deepspeed

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False  # as train.engine: skip a build never used
    few, many, accumulation = 16, 64, 2
    slope = {s: (_engine_step_time(s, many, accumulation) - _engine_step_time(s, few, accumulation))
             / ((many - few) * accumulation) for s in (0, 1, 3)}
    return {"zero_param_s": max(0.0, slope[1] - slope[0]), "zero3_param_s": max(0.0, slope[3] - slope[0])}
