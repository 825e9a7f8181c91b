"""Megatron-style tensor parallelism (TP), optionally with sequence parallelism (SP), applied in place to a
single-device `model.transformer.Transformer`: `apply_tensor_parallel`.

Rank r of a TP group of size tp keeps part r of tp equal parts of every large tensor:
- embedding: vocabulary-parallel (rows of ``embed.weight``, megatron-core's `VocabParallelEmbedding`); LM head
  column-parallel over the vocabulary (the same rows, the same parameter when tied). Logits stay sharded
  (``ModelOutput.logits`` is this rank's [B, T, V/tp] slice) and ``Transformer.loss_fn`` becomes
  `vocab_parallel_causal_lm_loss` (megatron-core's `vocab_parallel_cross_entropy`); the loss fused with the head
  (``model.loss_chunk_tokens``) reduces its softmax statistics over the TP group instead.
- attention: q/k/v column-parallel by whole heads, o_proj row-parallel. SwiGLU: gate/up column, down row.
- MoE: every expert split over its hidden size (w1/w3 dim 1, w2 dim 2: Megatron's expert TP); router replicated.
- Mamba: split over d_inner. in_proj column-parallel; its local weight is [2, d_inner/tp, D] (this rank's channels
  of the hidden and of the gate half, a strided slice that the shard record can describe only as a slice of the
  full weight viewed as [2, d_inner, D]); conv1d, dt_proj, A_log, D per channel; x_proj and out_proj row-parallel.
- replicated: every norm weight and the router.
Parameter names are the single-device ones; every sliced parameter carries `train.parallel.shard.mark_shard` and
megatron's ``tensor_model_parallel`` / ``partition_dim`` / ``partition_stride`` attributes.

Communication per block in forward (backward runs the transposed operation):
                      without SP                                  with SP (residual stream [B, T/tp, D])
  mixer, dense ffn    in: copy (bwd all-reduce), once per module  in: all-gather along T (bwd reduce-scatter);
                                                                  the projections save only the T/tp local rows
                                                                  and gather them once more in backward
                      out: all-reduce in the row-parallel layer   out: reduce-scatter along T (bwd all-gather)
  MoE                 experts: copy in, all-reduce out            + in: all-gather along T (bwd: keep own part),
                                                                    out: keep own part of T (bwd all-gather)
  Mamba, in addition  all-reduce of x_proj's output (dt/B/C are full on every rank); the dt/B/C norm outputs are
                      copied (3 small all-reduces in backward) so the replicated norm weights get full gradients.
Outside the blocks: embedding all-reduce (with SP then split along T), LM head input copy (SP: all-gather), and
three all-reduces of [B, T] in the loss. With SP the norm weights (and a Mamba out_proj bias) see T/tp rows: a
gradient hook all-reduces their gradients over TP (they are marked ``sequence_parallel = True``).

Communication sits in the modules' own forwards (hooks, subclasses, a class switch for MoE), so pipeline stages
that call ``model.embed``, blocks, ``model.norm``, ``model.lm_head`` and ``model.loss_fn`` separately get it too.
"""

from __future__ import annotations

import contextlib
import functools
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from megatron.core import parallel_state
from megatron.core.model_parallel_config import ModelParallelConfig
from megatron.core.tensor_parallel import (
    ColumnParallelLinear,
    RowParallelLinear,
    VocabParallelEmbedding,
    reduce_from_tensor_model_parallel_region,
    set_tensor_model_parallel_attributes,
    vocab_parallel_cross_entropy,
)
from torch import Tensor, nn

from model.attention import Attention
from model.config import ConfigError
from model.loss import IGNORE_INDEX, linear_cross_entropy
from model.mamba import MambaMixer
from model.moe import MoE
from model.transformer import Transformer
from train.parallel.shard import SHARD_ATTR, mark_shard
from train.parallel.sp import (
    Collective,
    SeqParallelLinear,
    SharedGather,
    all_reduce_copy,
    copy_to_tp,
    gather_seq,
    reduce_scatter_seq,
    split_seq,
)

# Attributes a sliced parameter gets anew (everything else, e.g. EP's ``allreduce``/``group_name`` or Mamba's
# ``_no_weight_decay``, is carried over from the full parameter).
_TP_ATTRS = {SHARD_ATTR, "tensor_model_parallel", "partition_dim", "partition_stride", "expert_tp", "is_qkv"}


@dataclass(frozen=True)
class _TP:
    group: Any
    rank: int
    size: int
    sp: bool


# --------------------------------------------------------------------------------------------- layers
class _NoExtraState:
    """megatron-core's linear layers add an ``_extra_state`` entry to state dicts (for TransformerEngine); the
    single-device model has none and checkpoints are keyed by its names."""

    get_extra_state = nn.Module.get_extra_state
    set_extra_state = nn.Module.set_extra_state


class _ColumnParallelLinear(_NoExtraState, ColumnParallelLinear):
    """Returns the output only (megatron returns ``(output, bias)``). The input arrives already copied/gathered
    once per mixer or ffn (``disable_grad_reduce``), not once per projection. A 3-D weight (Mamba's in_proj,
    [2, d_inner/tp, D]) is used as the 2-D [2 * d_inner/tp, D] it is."""

    def forward(self, x: Tensor) -> Tensor:  # type: ignore[override]
        weight = self.weight.flatten(0, -2)
        source = getattr(x, "sp_source", None)  # (local rows, SharedGather) when gathered by _enter_region
        if source is None:
            out, _ = super().forward(x, weight=weight)
        else:
            out = SeqParallelLinear.apply(x, source[0], weight, source[1])
        return out if self.bias is None else out + self.bias.flatten()


class _ColumnParallelHead(_ColumnParallelLinear):
    """The LM head over this rank's vocabulary rows ``[vocab_start, vocab_start + V/tp)``, with the contract of
    `model.layers.LMHead`: given labels, the cross entropy fused with the head, reduced over the TP group."""

    chunk_tokens = 0
    vocab_start = 0
    tp_group: Any = None

    def forward(self, x: Tensor, labels: Tensor | None = None) -> Tensor:  # type: ignore[override]
        if labels is None:
            return super().forward(x)
        return linear_cross_entropy(x, self.weight, labels, self.chunk_tokens, self.vocab_start, self.tp_group)


class _RowParallelLinear(_NoExtraState, RowParallelLinear):
    """Returns the output only; with ``scatter_sequence`` the partial sums are reduce-scattered along T instead of
    all-reduced (megatron's own SP path needs CUDA and [T, B, D], see the mappings above)."""

    scatter_sequence = False

    def forward(self, x: Tensor) -> Tensor:  # type: ignore[override]
        if not self.scatter_sequence:
            return super().forward(x)[0]
        out = Collective.apply(F.linear(x, self.weight), self.tp_group, reduce_scatter_seq, gather_seq)
        return out if self.bias is None else out + self.bias


class _VocabParallelEmbedding(_NoExtraState, VocabParallelEmbedding):
    """With ``scatter_sequence`` the all-reduced output is split along T: megatron's reduce-scatter variant
    (``reduce_scatter_embeddings``) is [T, B, D] and CUDA-only. Costs one all-reduce instead of a reduce-scatter,
    once per forward."""

    scatter_sequence = False

    def forward(self, tokens: Tensor) -> Tensor:  # type: ignore[override]
        out = super().forward(tokens)
        if self.scatter_sequence:
            return Collective.apply(out, self.tp_group, split_seq, gather_seq)
        return out


class TensorParallelExperts:
    """Mixin for `MoE` and its subclasses (e.g. `train.parallel.ep.ExpertParallelMoE`) whose expert weights hold
    this rank's part of every expert's hidden size: the experts' input is copied into the TP region and their
    output all-reduced, so routing, losses and statistics run on the same full tokens on every TP rank."""

    tp_group: Any

    def _expert_mlp(self, rows: Tensor, counts: Tensor) -> Tensor:
        rows = copy_to_tp(rows, self.tp_group)
        out = super()._expert_mlp(rows, counts)  # type: ignore[misc]
        return reduce_from_tensor_model_parallel_region(out.contiguous(), group=self.tp_group)


@functools.cache
def tensor_parallel_moe_class(cls: type[MoE]) -> type[MoE]:
    """``TensorParallel<cls>``: `TensorParallelExperts` over ``cls``, one class per ``cls``."""
    return type(f"TensorParallel{cls.__name__}", (TensorParallelExperts, cls), {})


def vocab_parallel_causal_lm_loss(logits: Tensor, labels: Tensor) -> Tensor:
    """`model.transformer.causal_lm_loss` on this rank's vocabulary slice [..., V/tp] of the logits (mean over the
    labels that are not -100), through megatron-core's cross entropy over its tensor-parallel group."""
    logits32 = logits.float()
    if logits32 is logits:  # megatron's cross entropy overwrites its input with the softmax: keep the logits
        logits32 = logits.clone()
    per_token = vocab_parallel_cross_entropy(logits32, labels)
    valid = labels != IGNORE_INDEX
    return per_token.masked_fill(~valid, 0.0).sum() / valid.sum().clamp(min=1)


# -------------------------------------------------------------------------------------------- sharding
def _shard(full: Tensor, dim: int, tp: _TP) -> nn.Parameter:
    """This rank's part of ``full`` along ``dim`` as a new parameter, recorded as a shard of ``full``."""
    local = nn.Parameter(full.detach().chunk(tp.size, dim)[tp.rank].clone(), requires_grad=full.requires_grad)
    for key, value in vars(full).items():
        if key not in _TP_ATTRS:
            setattr(local, key, value)
    mark_shard(local, full, dim, tp.rank, tp.size)
    set_tensor_model_parallel_attributes(local, True, dim, 1)
    return local


def _megatron(cls: type[nn.Module], tp: _TP, like: Tensor, *args: Any, **kwargs: Any) -> Any:
    """A megatron-core layer built empty (no initialisation, weights assigned afterwards), in ``like``'s dtype; on
    the meta device when ``like`` is there (a model sharded before it has storage allocates nothing here)."""
    config = ModelParallelConfig(tensor_model_parallel_size=tp.size, sequence_parallel=False,
                                 use_cpu_initialization=True, perform_initialization=False, params_dtype=like.dtype)
    with torch.device("meta") if like.is_meta else contextlib.nullcontext():
        layer = cls(*args, config=config, init_method=None, tp_group=tp.group, **kwargs)
    layer._load_state_dict_pre_hooks.clear()  # megatron's hook inserts ``_extra_state`` into loaded state dicts
    return layer


def _column(linear: nn.Linear, tp: _TP, halves: int = 1, cls: type = _ColumnParallelLinear) -> _ColumnParallelLinear:
    """Column-parallel copy of ``linear``; with ``halves`` > 1 its output is that many concatenated blocks and
    this rank keeps its part of each."""
    out_f, in_f = linear.weight.shape
    layer = _megatron(cls, tp, linear.weight, in_f, out_f, bias=linear.bias is not None,
                      skip_bias_add=True, disable_grad_reduce=True)
    dim = 0 if halves == 1 else 1
    layer.weight = _shard(linear.weight if halves == 1 else linear.weight.view(halves, -1, in_f), dim, tp)
    if linear.bias is not None:
        layer.bias = _shard(linear.bias if halves == 1 else linear.bias.view(halves, -1), dim, tp)
    return layer


def _row(linear: nn.Linear, tp: _TP, scatter_sequence: bool) -> _RowParallelLinear:
    out_f, in_f = linear.weight.shape
    layer = _megatron(_RowParallelLinear, tp, linear.weight, in_f, out_f, bias=linear.bias is not None,
                      input_is_parallel=True, skip_bias_add=False)
    layer.weight = _shard(linear.weight, 1, tp)
    if linear.bias is not None:
        layer.bias = linear.bias  # replicated, added after the reduction
        if scatter_sequence:
            _sequence_parallel_param(linear.bias, tp)
    layer.scatter_sequence = scatter_sequence
    return layer


def _sequence_parallel_param(p: nn.Parameter, tp: _TP) -> None:
    """``p`` sees only this rank's T/tp rows: its gradient is the sum over the TP group."""
    p.sequence_parallel = True
    p.register_hook(functools.partial(all_reduce_copy, group=tp.group))


def _enter_region(tp: _TP, module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
    """Forward pre-hook of a module whose first layers are column-parallel: one copy (or SP gather) of its input.
    Their input gradients are partial sums over the ranks' columns: all-reduced (SP: reduce-scattered)."""
    if not tp.sp:
        return (copy_to_tp(args[0], tp.group), *args[1:])
    full = Collective.apply(args[0], tp.group, gather_seq, reduce_scatter_seq)
    full.sp_source = (args[0], SharedGather(tp.group))
    return (full, *args[1:])


def _gather_whole_grad(tp: _TP, module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
    """SP gather for a module that makes its input gradient whole on every rank itself: backward keeps our part."""
    return (Collective.apply(args[0], tp.group, gather_seq, split_seq), *args[1:])


def _split_first_output(tp: _TP, module: nn.Module, args: tuple[Any, ...], out: tuple[Tensor, Tensor]) -> Any:
    return (Collective.apply(out[0], tp.group, split_seq, gather_seq), *out[1:])


def _copy_output(tp: _TP, module: nn.Module, args: tuple[Any, ...], out: Tensor) -> Tensor:
    return copy_to_tp(out, tp.group)


def _shard_projections(module: nn.Module, tp: _TP, columns: tuple[str, ...], row: str) -> None:
    for name in columns:
        setattr(module, name, _column(getattr(module, name), tp))
    setattr(module, row, _row(getattr(module, row), tp, tp.sp))
    module.register_forward_pre_hook(functools.partial(_enter_region, tp))


def _shard_mamba(mixer: MambaMixer, tp: _TP) -> None:
    mixer.in_proj = _column(mixer.in_proj, tp, halves=2)
    conv = mixer.conv1d
    conv.weight = _shard(conv.weight, 0, tp)
    if conv.bias is not None:
        conv.bias = _shard(conv.bias, 0, tp)
    conv.in_channels = conv.out_channels = conv.groups = conv.weight.shape[0]
    mixer.x_proj = _row(mixer.x_proj, tp, scatter_sequence=False)  # dt/B/C are needed for every position
    mixer.dt_proj.weight, mixer.dt_proj.bias = _shard(mixer.dt_proj.weight, 0, tp), _shard(mixer.dt_proj.bias, 0, tp)
    mixer.dt_proj.out_features = mixer.dt_proj.weight.shape[0]
    mixer.A_log, mixer.D = _shard(mixer.A_log, 0, tp), _shard(mixer.D, 0, tp)
    mixer.d_inner = mixer.D.shape[0]
    mixer.out_proj = _row(mixer.out_proj, tp, tp.sp)
    for norm in (mixer.dt_layernorm, mixer.b_layernorm, mixer.c_layernorm):
        norm.register_forward_hook(functools.partial(_copy_output, tp))
    mixer.register_forward_pre_hook(functools.partial(_enter_region, tp))


def shard_moe_experts(moe: MoE, tp_group: Any, tp_rank: int, tp: int, sequence_parallel: bool = False) -> MoE:
    """Keeps this TP rank's part of every expert of ``moe`` (also an EP-sharded one) and switches its class to
    ``TensorParallel<class>``; with SP its input is gathered along T and its output split again."""
    if isinstance(moe, TensorParallelExperts):
        raise TypeError(f"{type(moe).__name__} is already tensor-parallel")
    ctx = _TP(tp_group, tp_rank, tp, sequence_parallel)
    moe.w1, moe.w3, moe.w2 = _shard(moe.w1, 1, ctx), _shard(moe.w3, 1, ctx), _shard(moe.w2, 2, ctx)
    moe.__class__ = tensor_parallel_moe_class(type(moe))
    moe.tp_group = tp_group
    if sequence_parallel:  # routing needs every token; the output is full on every rank after the experts' reduce
        moe.register_forward_pre_hook(functools.partial(_gather_whole_grad, ctx))
        moe.register_forward_hook(functools.partial(_split_first_output, ctx))
    return moe


def _check(model: Transformer, tp: _TP) -> None:
    cfg = model.cfg
    if isinstance(model.embed, VocabParallelEmbedding):
        raise TypeError("apply_tensor_parallel: the model is already tensor-parallel")
    if (dist.get_world_size(tp.group), dist.get_rank(tp.group)) != (tp.size, tp.rank):
        raise ValueError(f"tp_group has size {dist.get_world_size(tp.group)} and rank {dist.get_rank(tp.group)}, "
                         f"expected tp={tp.size}, tp_rank={tp.rank}")
    if not parallel_state.model_parallel_is_initialized() or (
        parallel_state.get_tensor_model_parallel_world_size(), parallel_state.get_tensor_model_parallel_rank()
    ) != (tp.size, tp.rank):
        raise RuntimeError("megatron.core.parallel_state.initialize_model_parallel(tensor_model_parallel_size=tp) "
                           "must run first with the same TP groups (the vocab-parallel loss uses them)")
    sizes = {"n_heads": cfg.n_heads, "n_kv_heads": cfg.n_kv_heads, "vocab_size": cfg.vocab_size,
             "ffn_hidden": cfg.ffn_hidden}
    if cfg.family == "hybrid":
        sizes["mamba_d_inner (mamba_expand * d_model)"] = cfg.mamba_d_inner
    for key, size in sizes.items():
        if size % tp.size != 0:
            raise ConfigError("parallel.tp", f"model.{key}={size} is not divisible by tp={tp.size}")


def apply_tensor_parallel(model: Transformer, tp_group: Any, tp_rank: int, tp: int, sequence_parallel: bool) -> None:
    """Collective-free. Turns ``model`` (the same initialised weights on every TP rank) into TP rank ``tp_rank``'s
    shard of it, in place; see the module docstring. ``megatron.core.parallel_state.initialize_model_parallel``
    must have built the same TP groups (``tp_group`` is megatron's TP group). No-op for tp=1. A model on the meta
    device gives meta shards (nothing allocated), for `train.parallel.init.materialize` to fill."""
    if tp == 1:
        return
    ctx = _TP(tp_group, tp_rank, tp, sequence_parallel)
    _check(model, ctx)
    cfg = model.cfg
    embed = _megatron(_VocabParallelEmbedding, ctx, model.embed.weight, cfg.vocab_size, cfg.d_model)
    embed.weight = _shard(model.embed.weight, 0, ctx)
    embed.scatter_sequence = sequence_parallel
    head = _column(model.lm_head, ctx, cls=_ColumnParallelHead)
    head.chunk_tokens, head.tp_group = model.lm_head.chunk_tokens, tp_group
    head.vocab_start = tp_rank * (cfg.vocab_size // tp)
    if cfg.tie_embeddings:
        head.weight = embed.weight
    model.embed, model.lm_head = embed, head
    head.register_forward_pre_hook(functools.partial(_enter_region, ctx))
    model.loss_fn = vocab_parallel_causal_lm_loss

    for block in model.layers:
        if isinstance(block.mixer, Attention):
            _shard_projections(block.mixer, ctx, ("q_proj", "k_proj", "v_proj"), "o_proj")
        else:
            _shard_mamba(block.mixer, ctx)
        if isinstance(block.ffn, MoE):
            shard_moe_experts(block.ffn, tp_group, tp_rank, tp, sequence_parallel)
        else:
            _shard_projections(block.ffn, ctx, ("gate_proj", "up_proj"), "down_proj")
        if sequence_parallel:
            _sequence_parallel_param(block.mixer_norm.weight, ctx)
            _sequence_parallel_param(block.ffn_norm.weight, ctx)
    if sequence_parallel:
        _sequence_parallel_param(model.norm.weight, ctx)
