"""The process groups of a layout, built once, and the views of them that DeepSpeed asks for.

With tp, pp or ep > 1 the groups come from megatron-core (``parallel_state.initialize_model_parallel``, Megatron
rank order tp-ep-dp-pp, which is ``train.parallel.dims.Layout``'s). ``ParallelGroups`` is DeepSpeed's ``mpu``
(it asks for ``get_data_parallel_*`` and ``get_model_parallel_*``), registers the expert groups under DeepSpeed's
MoE group name, and :func:`pipeline_grid` gives DeepSpeed's pipeline engine a grid over the same groups. A pure
data-parallel run uses the world group and never imports megatron-core (its import costs several seconds).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch.distributed as dist

from train.parallel.dims import Layout


def expert_group_name(ep: int) -> str:
    """DeepSpeed's name for the expert-parallel groups of size ``ep`` (its MoE layer uses the same)."""
    return f"ep_size_{ep}"


@dataclass
class ParallelGroups:
    """This rank's process groups; passed to DeepSpeed as ``mpu``."""

    layout: Layout
    tp_group: Any = None
    dp_group: Any = None  # data x context parallel: the ranks holding the same parameters (gradients average here)
    pp_group: Any = None
    cp_group: Any = None  # ranks holding the parts of the same sequences
    model_group: Any = None  # tp x pp: the ranks that hold one copy of the model between them
    ep_group: Any = None  # ranks exchanging tokens (same tp rank, consecutive dp ranks)
    edp_group: Any = None  # ranks holding the same experts; expert gradients reduce here

    # DeepSpeed mpu interface -------------------------------------------------------------------------
    # DeepSpeed's "data parallel" is data x context parallel: both hold the same parameters and average gradients
    # (and ZeRO partitions over both); only the data loader tells them apart (layout.dp, layout.cp).
    def get_data_parallel_world_size(self) -> int:
        return self.layout.dp_cp

    def get_data_parallel_rank(self) -> int:
        return self.layout.dp_cp_rank

    def get_data_parallel_group(self) -> Any:
        return self.dp_group

    def get_data_parallel_group_ranks(self) -> list[int]:
        lay = self.layout
        return [lay.global_rank(lay.pp_rank, d, lay.tp_rank, c) for d in range(lay.dp) for c in range(lay.cp)]

    def get_tensor_model_parallel_world_size(self) -> int:
        return self.layout.tp

    def get_tensor_model_parallel_rank(self) -> int:
        return self.layout.tp_rank

    def get_tensor_model_parallel_group(self) -> Any:
        return self.tp_group

    def get_tensor_model_parallel_src_rank(self) -> int:
        return self.layout.global_rank(self.layout.pp_rank, self.layout.dp_rank, 0, self.layout.cp_rank)

    # DeepSpeed's "model parallel" is every axis that splits the model: its gradient norm sums over it.
    def get_model_parallel_world_size(self) -> int:
        return self.layout.tp * self.layout.pp

    def get_model_parallel_rank(self) -> int:
        return self.layout.pp_rank * self.layout.tp + self.layout.tp_rank

    def get_model_parallel_group(self) -> Any:
        return self.model_group

    def get_pipeline_model_parallel_world_size(self) -> int:
        return self.layout.pp

    def get_pipeline_model_parallel_rank(self) -> int:
        return self.layout.pp_rank

    def get_pipeline_model_parallel_group(self) -> Any:
        return self.pp_group


def init_groups(layout: Layout, timeout: timedelta = timedelta(minutes=30)) -> ParallelGroups:
    """Collective: builds this rank's groups (call once, after the default group exists)."""
    if not dist.is_initialized():
        raise RuntimeError("init_groups needs torch.distributed to be initialised (train.engine.init_distributed)")
    if dist.get_world_size() != layout.world or dist.get_rank() != layout.rank:
        raise RuntimeError(f"layout is for rank {layout.rank} of {layout.world}, this process is rank "
                           f"{dist.get_rank()} of {dist.get_world_size()}")
    if layout.tp == layout.pp == layout.ep == layout.cp == 1:
        world = dist.group.WORLD
        return ParallelGroups(layout, tp_group=None, dp_group=world, pp_group=None, model_group=None)

    from megatron.core import parallel_state as mpu

    if mpu.model_parallel_is_initialized():
        mpu.destroy_model_parallel()
    mpu.initialize_model_parallel(
        tensor_model_parallel_size=layout.tp, pipeline_model_parallel_size=layout.pp,
        context_parallel_size=layout.cp, expert_model_parallel_size=layout.ep, expert_tensor_parallel_size=layout.tp,
        distributed_timeout_minutes=max(1, math.ceil(timeout.total_seconds() / 60)), create_gloo_process_groups=False,
    )
    groups = ParallelGroups(
        layout,
        tp_group=mpu.get_tensor_model_parallel_group(),
        dp_group=mpu.get_data_parallel_group(with_context_parallel=True),
        pp_group=mpu.get_pipeline_model_parallel_group(),
        model_group=mpu.get_model_parallel_group(),
        cp_group=mpu.get_context_parallel_group() if layout.cp > 1 else None,
    )
    _check_against_layout(groups, mpu)
    if layout.ep > 1:
        groups.ep_group = mpu.get_expert_model_parallel_group()
        groups.edp_group = mpu.get_expert_data_parallel_group()
        _register_expert_groups(layout.ep, groups.ep_group, groups.edp_group)
    return groups


def _check_against_layout(groups: ParallelGroups, mpu: Any) -> None:
    """megatron-core's coordinates must be ours (the data loader, checkpoints and DeepSpeed rely on them)."""
    lay = groups.layout
    got = (mpu.get_tensor_model_parallel_rank(), mpu.get_context_parallel_rank(), mpu.get_data_parallel_rank(),
           mpu.get_pipeline_model_parallel_rank())
    if got != (lay.tp_rank, lay.cp_rank, lay.dp_rank, lay.pp_rank):
        raise RuntimeError(f"megatron-core placed rank {lay.rank} at (tp, cp, dp, pp) = {got}, the layout says "
                           f"{(lay.tp_rank, lay.cp_rank, lay.dp_rank, lay.pp_rank)}")
    if lay.ep > 1 and mpu.get_expert_model_parallel_rank() != lay.ep_rank:
        raise RuntimeError(f"megatron-core's expert rank {mpu.get_expert_model_parallel_rank()} != {lay.ep_rank}")


def _register_expert_groups(ep: int, ep_group: Any, edp_group: Any) -> None:
    """DeepSpeed keeps its expert groups in module dicts keyed by name, filled only by its own MoE layer (which
    knows its own rank orders): register megatron-core's under that name so its ZeRO reduces expert gradients
    over them."""
    from deepspeed.utils import groups as ds_groups

    name = expert_group_name(ep)
    ds_groups._EXPERT_PARALLEL_GROUP[name] = ep_group
    ds_groups._EXPERT_PARALLEL_GROUP_RANKS[name] = dist.get_process_group_ranks(ep_group)
    ds_groups._EXPERT_DATA_PARALLEL_GROUP[name] = edp_group
    ds_groups._EXPERT_DATA_PARALLEL_GROUP_RANKS[name] = dist.get_process_group_ranks(edp_group)


def pipeline_grid(groups: ParallelGroups) -> Any:
    """DeepSpeed's ``PipelineParallelGrid`` over our groups (its own constructor creates a second set)."""
    from deepspeed.runtime.pipe.topology import PipelineParallelGrid, PipeModelDataParallelTopology

    lay = groups.layout

    class SharedGroupsGrid(PipelineParallelGrid):
        def __init__(self, topology: Any = None, process_group: Any = None) -> None:
            self.global_rank, self.world_size = lay.rank, lay.world
            self._topo = PipeModelDataParallelTopology(num_pp=lay.pp, num_mp=lay.tp, num_dp=lay.dp_cp)
            self.data_parallel_size, self.pipe_parallel_size = lay.dp_cp, lay.pp
            self.model_parallel_size = self.slice_parallel_size = lay.tp
            self.stage_id, self.data_parallel_id = lay.pp_rank, lay.dp_cp_rank
            # DeepSpeed's "model" group here is tp x pp (its gradient norm and overflow checks sum over it).
            self.ds_model_proc_group = groups.model_group
            self.ds_model_world_size = lay.tp * lay.pp
            self.ds_model_rank = groups.get_model_parallel_rank()
            self.dp_groups = self._topo.get_axis_comm_lists("data")
            self.dp_group = groups.get_data_parallel_group_ranks()
            self.dp_proc_group = groups.dp_group
            self.is_first_stage, self.is_last_stage = lay.pp_rank == 0, lay.pp_rank == lay.pp - 1
            self.p2p_groups = self._build_p2p_groups()
            self.pipe_groups = self._topo.get_axis_comm_lists("pipe")
            self.pp_group = next(g for g in self.pipe_groups if lay.rank in g)
            self.pp_proc_group = groups.pp_group
            self.model_groups = self._topo.get_axis_comm_lists("model")
            self.slice_group = next((g for g in self.model_groups if lay.rank in g), [lay.rank])
            self.slice_proc_group = groups.tp_group

    return SharedGroupsGrid
