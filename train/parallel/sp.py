"""Sequence-parallel mappings for tensor parallelism over [batch, T, ...] activations, as autograd functions.

megatron-core's SP mappings work along dim 0 of [T, B, D] and allocate with ``torch.cuda.current_device()``; ours
are [B, T, D] and must run on CPU (gloo) too, so these go along dim 1 with plain torch.distributed.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor


def seq_part(x: Tensor, size: int) -> int:
    if x.shape[1] % size != 0:
        raise ValueError(f"sequence parallelism needs seq_len divisible by tp={size}, got seq_len={x.shape[1]}")
    return x.shape[1] // size


def gather_seq(x: Tensor, group: Any) -> Tensor:
    size = dist.get_world_size(group)
    x = x.contiguous()
    out = x.new_empty((size * x.shape[0], *x.shape[1:]))
    dist.all_gather_into_tensor(out, x, group=group)
    # rank-major [tp * B, t, ...] -> [B, tp * t, ...] (a view when B == 1)
    return out.view(size, *x.shape).transpose(0, 1).reshape(x.shape[0], size * x.shape[1], *x.shape[2:])


def reduce_scatter_seq(x: Tensor, group: Any) -> Tensor:
    size = dist.get_world_size(group)
    part = seq_part(x, size)
    rank_major = x.reshape(x.shape[0], size, part, *x.shape[2:]).transpose(0, 1).contiguous()
    out = x.new_empty((x.shape[0], part, *x.shape[2:]))
    dist.reduce_scatter_tensor(out, rank_major.view(-1, part, *x.shape[2:]), group=group)
    return out


def split_seq(x: Tensor, group: Any) -> Tensor:
    part = seq_part(x, dist.get_world_size(group))
    return x.narrow(1, dist.get_rank(group) * part, part).contiguous()


def all_reduce_copy(x: Tensor, group: Any) -> Tensor:
    # A copy: autograd may hand the same gradient tensor to another branch (both summands of an add). Also why
    # megatron-core's copy_to_tensor_model_parallel_region is not used: it all-reduces ``grad.contiguous()`` in
    # place but returns ``grad``, so a non-contiguous gradient (Mamba's B and C for batch > 1) came back unreduced.
    x = x.clone(memory_format=torch.contiguous_format)
    dist.all_reduce(x, group=group)
    return x


def identity(x: Tensor, group: Any) -> Tensor:
    return x.view_as(x)


class Collective(torch.autograd.Function):
    """``forward_op(x, group)`` whose backward is ``backward_op(grad, group)``."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, group: Any, forward_op: Any, backward_op: Any) -> Tensor:
        ctx.group, ctx.backward_op = group, backward_op
        return forward_op(x, group)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        return ctx.backward_op(grad, ctx.group), None, None, None


def copy_to_tp(x: Tensor, group: Any) -> Tensor:
    return Collective.apply(x, group, identity, all_reduce_copy)


class SharedGather:
    """The all-gathered input of one mixer/ffn call, for its column-parallel projections' weight gradients: not
    kept after forward (the projections save this rank's T/tp rows), gathered again by the first of them to run
    backward and dropped after the last."""

    def __init__(self, group: Any):
        self.group, self.pending, self.full = group, 0, None

    def take(self, local: Tensor) -> Tensor:
        if self.full is None:
            self.full = gather_seq(local, self.group)
        full = self.full
        self.pending -= 1
        if self.pending <= 0:
            self.full = None
        return full


class SeqParallelLinear(torch.autograd.Function):
    """``F.linear(full, weight)`` for ``full`` gathered along T from ``local``, saving only ``local``. Megatron's
    SP linear does the same but gathers per projection into a CUDA buffer, and for [T, B, D]."""

    @staticmethod
    def forward(ctx: Any, full: Tensor, local: Tensor, weight: Tensor, shared: SharedGather) -> Tensor:
        ctx.save_for_backward(local, weight)
        ctx.shared = shared
        if weight.requires_grad:
            shared.pending += 1
        return F.linear(full, weight)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        local, weight = ctx.saved_tensors
        grad_weight = None
        if ctx.needs_input_grad[2]:
            full = ctx.shared.take(local)
            grad_weight = grad.reshape(-1, grad.shape[-1]).t().matmul(full.reshape(-1, full.shape[-1]))
        return grad.matmul(weight), None, grad_weight, None
