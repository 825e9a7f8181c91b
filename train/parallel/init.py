"""This rank's part of the model, built without ever holding the whole model when tp, pp or ep > 1 or under ZeRO-3.

The model is built on the meta device (shapes, no storage), sharded there by expert and tensor parallelism (the
``apply_*`` functions accept meta tensors), then `materialize` generates each parameter in turn at full size from
its own generator (`model.init`: seeded from the run seed and the single-device name), keeps this rank's slice
(`train.parallel.shard.shard_of`) and drops the full tensor. Beyond the rank's own shards at most one full
parameter is alive at a time, as with Megatron's CPU initialisation. Under ZeRO-3 each parameter is handed to
DeepSpeed's partitioning (``deepspeed.zero.Init``, the same conversion ``deepspeed.initialize`` would apply to the
whole model) as soon as it is generated, so a rank keeps its 1/dp partition and at most one full parameter. A
parameter's value depends only on (seed, name), so every layout starts from exactly the weights of
``torch.manual_seed(seed); Transformer(cfg)``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from model.config import ModelConfig
from model.init import init_buffer, init_parameter, parameter_generator
from model.transformer import Transformer
from train.config import RunConfig
from train.parallel.ep import apply_expert_parallel
from train.parallel.groups import ParallelGroups
from train.parallel.shard import shard_of


def single_device_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Name -> shape of every parameter of the single-device model (built on the meta device: no storage)."""
    with torch.device("meta"):
        model = Transformer(cfg)
    return {name: tuple(p.shape) for name, p in model.named_parameters()}


def _fill(p: nn.Parameter, data: Tensor) -> None:
    """Gives the meta parameter ``p`` the values ``data`` while keeping the Parameter object itself, so the modules
    sharing it (a tied LM head), its attributes (shard record, megatron and DeepSpeed flags) and the gradient hooks
    the parallel code registered on it stay. ``p.data = data`` is refused between meta and CPU tensors."""
    new = nn.Parameter(data, requires_grad=p.requires_grad)
    new.__dict__.update(p.__dict__)
    hooks, post_hooks = p._backward_hooks, p._post_accumulate_grad_hooks
    torch.utils.swap_tensors(p, new)
    # A hook is registered with autograd on the tensor implementation, which was swapped out: register it again.
    if hooks:
        p._backward_hooks = hooks
    if post_hooks:
        p._post_accumulate_grad_hooks = post_hooks


@torch.no_grad()
def materialize(model: nn.Module, cfg: ModelConfig, seed: int,
                after_each: Callable[[nn.Parameter], None] | None = None) -> None:
    """Fills every meta parameter of ``model`` (a `Transformer` under any layout; names are the single-device ones)
    with its slice of the single-device initial value for ``seed``, and every meta buffer with its initial value.
    ``after_each(p)`` runs on each parameter as soon as it is filled (ZeRO-3 partitions it there). Peak: this rank's
    tensors plus one full parameter."""
    full_shapes = single_device_shapes(cfg)
    for name, p in model.named_parameters():
        if not p.is_meta:
            continue
        if name not in full_shapes:
            raise KeyError(f"{name} is not a parameter of the single-device {cfg.name} model")
        shard = shard_of(p)
        full = init_parameter(cfg, name, full_shapes[name], parameter_generator(seed, name), p.dtype)
        if full.shape != shard.global_shape:
            # A shard recorded against a view of the weight (Mamba's in_proj under TP: [2, d_inner, D]).
            if full.numel() != torch.Size(shard.global_shape).numel():
                raise ValueError(f"{name}: shard of a {shard.global_shape} tensor, the parameter is {tuple(full.shape)}")
            full = full.reshape(shard.global_shape)
        if shard.is_full(tuple(p.shape)):
            local = full
        else:
            local = full[shard.slices(tuple(p.shape))].clone(memory_format=torch.contiguous_format)
        del full  # before the next parameter is generated
        _fill(p, local)
        if after_each is not None:
            after_each(p)
    for name, b in list(model.named_buffers()):
        if b.is_meta:
            module_name, _, attr = name.rpartition(".")
            model.get_submodule(module_name)._buffers[attr] = init_buffer(cfg, name, b.shape, b.dtype)
    left = [n for n, t in (*model.named_parameters(), *model.named_buffers()) if t.is_meta]
    if left:
        raise RuntimeError(f"still on the meta device after materialize: {left}")


def zero3_partitioner(ds_config: dict[str, Any], groups: ParallelGroups) -> Callable[[nn.Parameter], None]:
    """A function that turns one filled parameter into a ZeRO-3 parameter holding only this rank's partition (over
    the data-parallel group), with the arguments ``deepspeed.initialize`` uses when it converts a whole model, so the
    engine finds every parameter already partitioned and converts nothing."""
    from deepspeed.runtime.zero.partition_parameters import Init

    mpu = groups if groups.layout.tp > 1 else None  # what DeepSpeedTrainModule hands deepspeed.initialize
    first: list[nn.Parameter] = []

    def partition(p: nn.Parameter) -> None:
        if first:
            first[0].convert_to_zero_parameters(param_list=[p])
            return
        holder = nn.Module()
        holder.register_parameter("p", p)
        Init(module=holder, data_parallel_group=mpu.get_data_parallel_group() if mpu else None,
             config_dict_or_path=ds_config, mpu=mpu)
        first.append(p)

    return partition


def build_parallel_model(cfg: RunConfig, groups: ParallelGroups,
                         ds_config: dict[str, Any] | None = None) -> Transformer:
    """This rank's model under ``groups.layout``: experts split over the EP group, then everything over the TP group
    (names and values those of the single-device model built with ``cfg.train.seed``); with a ZeRO-3 ``ds_config``
    each parameter partitioned over the data-parallel group as it is generated."""
    layout = groups.layout
    zero3 = ds_config is not None and ds_config["zero_optimization"]["stage"] == 3
    torch.manual_seed(cfg.train.seed)
    if layout.tp == layout.pp == layout.ep == 1 and not zero3:
        model = Transformer(cfg.model)
    else:
        with torch.device("meta"):
            model = Transformer(cfg.model)
        apply_expert_parallel(model, groups)
        if layout.tp > 1:
            from train.parallel.tp import apply_tensor_parallel  # imports megatron-core (seconds)

            apply_tensor_parallel(model, groups.tp_group, layout.tp_rank, layout.tp, cfg.parallel.sp)
        # With pp > 1 every stage materialises every layer (at most one full parameter at a time still): DeepSpeed's
        # PipelineModule decides the stage partition only afterwards, from the whole model.
        materialize(model, cfg.model, cfg.train.seed, zero3_partitioner(ds_config, groups) if zero3 else None)
    if layout.cp > 1:  # the mixers' classes change, not their parameters
        from train.parallel.cp import apply_context_parallel

        apply_context_parallel(model, groups.cp_group, layout.cp_rank, layout.cp)
    # The single-device constructor draws from the global generator (layers' default inits, overwritten), the meta
    # one does not: reseed so that every layout leaves it in the same state.
    torch.manual_seed(cfg.train.seed)
    return model
