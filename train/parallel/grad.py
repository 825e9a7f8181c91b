"""The global gradient norm of a sharded model, and clipping with it.

Each rank holds pieces of the single-device model: tensor-parallel shards (``tensor_model_parallel``), expert
shards (``allreduce = False``), its pipeline stage's layers, and copies of what is replicated. The norm of the
whole gradient adds every piece's squares once: a replicated tensor once per copy-holding group, a TP shard summed
over the TP group, an expert shard over the EP group (and the TP group under expert tensor parallelism), and the
stages summed over the pipeline group. A weight tied across stages (``ds_pipe_replicated``) counts once.
Gradients must already be reduced over data parallelism (identical on the ranks of a DP group).

DeepSpeed computes this itself in its ZeRO-1/2/3 and bf16 optimizers (it reads ``tensor_model_parallel`` and the
expert group names); its fp32 ZeRO-0 path averages per-rank norms, which is wrong once ranks hold different pieces,
so ZeRO-0 fp32 runs clip with :func:`install_clipping` instead.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from train.parallel.groups import ParallelGroups


def _is_expert(p: torch.Tensor) -> bool:
    return getattr(p, "allreduce", True) is False


def _is_tp_shard(p: torch.Tensor) -> bool:
    return bool(getattr(p, "tensor_model_parallel", False))


def _reduce(t: torch.Tensor, group: Any, size: int) -> torch.Tensor:
    if group is not None and size > 1:
        dist.all_reduce(t, group=group)
    return t


def _square_sum(grad: torch.Tensor) -> torch.Tensor:
    """Sum of squares of one tensor as float64. A BLAS dot in float32 reads the tensor once and keeps a relative
    error near 1e-7 (its blocked accumulation); a float64 copy costs several passes, and ``vector_norm``'s float32
    reduction drifts to ~1e-5 on million-element tensors."""
    flat = grad.reshape(-1)
    if flat.dtype not in (torch.float32, torch.float64):
        flat = flat.float()
    return torch.dot(flat, flat).double()


def grad_norm(params: Iterable[torch.Tensor], groups: ParallelGroups) -> torch.Tensor:
    """L2 norm of the single-device model's gradient from this rank's pieces (collective over the model-parallel
    and expert groups)."""
    params = [p for p in params if p.grad is not None and not getattr(p, "ds_pipe_replicated", False)]
    device = params[0].grad.device if params else torch.device("cpu")
    # [replicated, tp shards, expert shards, expert shards that are also tp shards]
    sq = torch.zeros(4, dtype=torch.float64, device=device)
    for p in params:
        kind = 2 * _is_expert(p) + _is_tp_shard(p)
        sq[kind] += _square_sum(p.grad.detach())
    lay = groups.layout
    # An expert shard of one EP rank is replicated over the TP group unless it is TP-sharded too.
    tp_summed = _reduce(sq[[1, 3]].clone(), groups.tp_group, lay.tp)
    expert = _reduce(torch.stack([sq[2], tp_summed[1]]), groups.ep_group, lay.ep)
    stage = sq[0] + tp_summed[0] + expert.sum()
    total = _reduce(stage.reshape(1), groups.pp_group, lay.pp)
    return total.sqrt().float().reshape(())


def clip_(params: list[torch.Tensor], norm: torch.Tensor, max_norm: float) -> None:
    """torch's clipping rule ``g *= min(1, max_norm / (norm + 1e-6))``. The factor is read on the host (the step
    reads the norm for its metrics anyway) so that a gradient inside the bound is not rewritten, as Megatron-LM's
    clipping does."""
    coef = max_norm / (float(norm) + 1e-6)
    if coef >= 1.0:
        return
    torch._foreach_mul_([p.grad.detach() for p in params if p.grad is not None], coef)


def install_clipping(
    optimizer: torch.optim.Optimizer, module: nn.Module, groups: ParallelGroups, max_norm: float,
    record: Callable[[torch.Tensor], None],
) -> None:
    """Computes the norm right before every optimizer step (after DeepSpeed's reductions), hands it to
    ``record`` and clips with it when ``max_norm > 0``. For engines built with DeepSpeed's clipping off."""

    def hook(opt: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        params = list(module.parameters())
        norm = grad_norm(params, groups)
        record(norm)
        if max_norm > 0:
            clip_(params, norm, max_norm)

    optimizer.register_step_pre_hook(hook)
