"""Expert parallelism (EP) for `model.moe.MoE`, applied from outside the model, composed with DeepSpeed ZeRO.

Layout: EP runs inside the data-parallel dimension, as in DeepSpeed MoE. Each data-parallel (DP) group is cut
into EP groups of ``ep`` consecutive DP ranks; an EP rank keeps experts ``[ep_rank * E/ep, (ep_rank + 1) * E/ep)``
of every MoE layer (w1/w3/w2 sliced along dim 0). Ranks at the same position of different EP groups hold the
same experts and form an "expert data parallel" (EDP) group: expert gradients are averaged over it only (and
divided by the full DP size, since each expert saw the tokens of the whole DP group), while the router and the
dense parameters are averaged over all DP ranks.

Forward of one MoE layer (router replicated, unchanged): each rank routes its own tokens exactly as on one
device, groups token slots by expert, then ``_run_experts`` is replaced by a dropless exchange:
  1. all_to_all of the per-expert slot counts (so every rank knows how many rows it receives, per expert);
  2. variable-size all_to_all_single of the rows (rows for EP rank r are contiguous since experts are sorted);
  3. the local experts run on the received rows, regrouped by local expert;
  4. the reverse all_to_all_single brings the results home, where `MoE.forward` weighs and combines them.

Auxiliary losses: every rank computes the load-balancing loss and z-loss on the tokens of its own micro-batch,
before dispatch (the Mixtral / Megatron convention), which is what `MoE.forward` does on one device. So a run with
EP matches a one-rank run with the same micro-batch size and gradient accumulation exactly: the same micro-batches
give the same per-micro-batch statistics, and the capacity factor (when set) is also per micro-batch.

Groups: megatron-core's expert-parallel and expert-data-parallel groups (``train.parallel.groups``), per pipeline
stage and per tensor-parallel rank; under tensor parallelism every expert is further split over the TP group
(``train.parallel.tp``, Megatron's expert tensor parallelism), applied after this.

DeepSpeed integration (0.19): expert parameters carry ``allreduce = False`` and ``group_name = "ep_size_{ep}"``
and the optimizer's param groups are split with `split_params_into_different_moe_groups_for_optimizer`; the groups
are registered in `deepspeed.utils.groups` under that name. DeepSpeed only switches its MoE code paths on
(expert-group gradient reduction, ZeRO-1/2 partitioning of expert groups over the EDP group) when the model contains
an instance of `deepspeed.moe.layer.MoE`; a parameter-free marker of that class is attached to the model for this
(its ``num_local_experts`` is 0: DeepSpeed writes no expert files of its own). DeepSpeed refuses that class under
ZeRO-3 (docs/ep_zero3.md), so EP with ZeRO-3 is refused when the config is built.
"""

from __future__ import annotations

import functools
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from model.config import ConfigError
from model.moe import MoE
from train.parallel.groups import ParallelGroups, expert_group_name
from train.parallel.shard import mark_shard


# --------------------------------------------------------------------------------------- all-to-all
class _AllToAll(torch.autograd.Function):
    """Variable-size all_to_all_single whose backward is the reverse exchange.

    Hand-written (12 lines) rather than `torch.distributed.nn.functional.all_to_all_single`: that one is
    deprecated in torch 2.13 (a warning per call), and its replacement lives in a private module.
    """

    @staticmethod
    def forward(ctx: Any, x: Tensor, out_splits: list[int], in_splits: list[int], group: Any) -> Tensor:
        ctx.splits, ctx.group = (out_splits, in_splits), group
        out = x.new_empty((sum(out_splits), *x.shape[1:]))
        dist.all_to_all_single(out, x.contiguous(), out_splits, in_splits, group=group)
        return out

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None, None, None]:
        out_splits, in_splits = ctx.splits
        return _AllToAll.apply(grad.contiguous(), in_splits, out_splits, ctx.group), None, None, None


def all_to_all(x: Tensor, out_splits: list[int], in_splits: list[int], group: Any) -> Tensor:
    """Sends ``x[sum(in_splits[:r]) : +in_splits[r]]`` to rank r of ``group``; returns the received rows."""
    return _AllToAll.apply(x, out_splits, in_splits, group)


# ------------------------------------------------------------------------------------------ the layer
class ExpertParallelMoE(MoE):
    """`MoE` whose experts are sharded over an EP group; only ``_run_experts`` differs (see the module doc).

    Made from an existing `MoE` by `shard_moe` (the class of the instance is switched, so routing, losses,
    statistics, ``update_bias`` and parameter names stay exactly those of the single-device layer).
    """

    ep_size: int
    ep_rank: int
    ep_group: Any
    num_local_experts: int

    def _run_experts(self, grouped: Tensor, counts: Tensor) -> Tensor:
        ep, local = self.ep_size, self.num_local_experts
        send_counts = counts.to(torch.int64).reshape(ep, local)  # row r: slots for EP rank r's experts
        recv_counts = torch.empty_like(send_counts)  # row s: slots EP rank s sends to each local expert
        dist.all_to_all_single(recv_counts, send_counts, group=self.ep_group)
        in_splits = send_counts.sum(1).tolist()
        out_splits = recv_counts.sum(1).tolist()
        num_sent = sum(in_splits)  # rows past it are slots over capacity: not sent, outputs unspecified
        received = all_to_all(grouped[:num_sent], out_splits, in_splits, self.ep_group)

        # Received rows are ordered (source, local expert): regroup by local expert, sources in rank order.
        expert_of_row = torch.arange(local, device=grouped.device).repeat(ep).repeat_interleave(recv_counts.reshape(-1))
        order = torch.argsort(expert_of_row, stable=True)
        out = self._expert_mlp(received[order], recv_counts.sum(0))
        inverse = torch.empty_like(order)
        inverse[order] = torch.arange(order.numel(), device=order.device)
        returned = all_to_all(out[inverse], in_splits, out_splits, self.ep_group)
        return torch.cat([returned, returned.new_zeros(grouped.shape[0] - num_sent, returned.shape[1])])


def shard_moe(moe: MoE, groups: ParallelGroups) -> ExpertParallelMoE:
    """Keeps this EP rank's experts of ``moe`` (in place) and marks them as DeepSpeed expert parameters."""
    ep, rank = groups.layout.ep, groups.layout.ep_rank
    if moe.num_experts % ep != 0:
        raise ConfigError("parallel.ep", f"ep={ep} must divide model.num_experts={moe.num_experts}")
    local = moe.num_experts // ep
    for name in ("w1", "w3", "w2"):
        full = getattr(moe, name)
        if full.shape[0] != moe.num_experts:
            raise RuntimeError(f"{name} has {full.shape[0]} experts, expected {moe.num_experts}: sharded twice?")
        shard = nn.Parameter(full.detach()[rank * local:(rank + 1) * local].clone(), requires_grad=full.requires_grad)
        mark_shard(shard, full, 0, rank, ep)
        shard.allreduce = False  # DeepSpeed: reduce over the expert-data-parallel group, not all DP ranks
        shard.group_name = expert_group_name(ep)
        setattr(moe, name, shard)
    moe.__class__ = ExpertParallelMoE
    moe.ep_size, moe.ep_rank, moe.ep_group, moe.num_local_experts = ep, rank, groups.ep_group, local
    return moe


@functools.cache
def _deepspeed_marker_class() -> type[nn.Module]:
    from deepspeed.moe.layer import MoE as DeepSpeedMoE

    class DeepSpeedMoEMarker(DeepSpeedMoE):
        """Parameter-free; its presence makes DeepSpeed's engine take its MoE code paths (see module doc)."""

        def __init__(self, num_experts: int, ep: int):
            nn.Module.__init__(self)  # not DeepSpeedMoE.__init__: it would build its own gate and experts
            self.num_experts, self.ep_size = num_experts, ep
            self.expert_group_name = expert_group_name(ep)
            self.num_local_experts = 0  # DeepSpeed writes/reads no expert files: we save the shards ourselves
            self.use_residual = False
            self.enable_expert_tensor_parallelism = False

        def set_deepspeed_parallelism(self, use_data_before_expert_parallel_: bool = False) -> None:
            from deepspeed.utils import groups as ds_groups

            if self.expert_group_name not in ds_groups._get_expert_parallel_group_dict():
                raise RuntimeError("expert groups missing: call train.parallel.ep.apply_expert_parallel first")

        def forward(self, *args: Any, **kwargs: Any) -> None:
            raise RuntimeError("DeepSpeedMoEMarker is a marker for DeepSpeed's engine and is never called")

    return DeepSpeedMoEMarker


MARKER_NAME = "deepspeed_moe_marker"


def apply_expert_parallel(model: nn.Module, groups: ParallelGroups) -> None:
    """Shards the experts of every `MoE` of ``model`` over the expert-parallel group; no-op for ep=1.

    Call after building the model (same weights on every rank) and before the DeepSpeed engine is built.
    """
    ep = groups.layout.ep
    if ep == 1:
        return
    moes = [m for m in model.modules() if isinstance(m, MoE)]
    if not moes:
        raise ConfigError("parallel.ep", f"ep={ep} needs a model with MoE layers; use parallel.ep=1")
    for moe in moes:
        shard_moe(moe, groups)
    model.add_module(MARKER_NAME, _deepspeed_marker_class()(moes[0].num_experts, ep))


def is_expert_param(p: Tensor) -> bool:
    return getattr(p, "allreduce", True) is False


def expert_param_groups(param_groups: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Optimizer param groups with the expert parameters moved into DeepSpeed's MoE groups (unchanged when
    there are none). ZeRO-1/2 partition each such group over its expert-data-parallel group."""
    if not any(is_expert_param(p) for g in param_groups for p in g["params"]):
        return param_groups
    from deepspeed.moe.utils import split_params_into_different_moe_groups_for_optimizer

    named = [{"name": g.get("name", f"group{i}"), **g} for i, g in enumerate(param_groups)]
    return split_params_into_different_moe_groups_for_optimizer(named)
