"""Pipeline parallelism: our single-device ``Transformer`` as a DeepSpeed ``PipelineModule`` (1F1B schedule).

The model code is untouched. Its modules are wrapped as pipeline layers, in order::

    layer 0          EmbeddingStage(embed)                tokens        -> (x, aux)
    layer 1..L       BlockStage(layers[i])                (x, aux)      -> (x, aux + block aux)
    layer L+1        HeadStage(norm, lm_head)             (x, aux)      -> (logits, aux)
                     or, with tied embeddings, NormStage(norm) and the embedding again (a TiedLayerSpec)
                     whose forward is ``x @ embed.weight.T``

``aux`` is a float32 tensor of shape [1] that carries the running sum of the MoE aux losses from stage
to stage (DeepSpeed pipes tuples of tensors, and sends gradients back for every floating tensor), so the
last stage adds exactly the total the single-device model adds: ``loss = ce + aux``.

The full model is built first (same seed as a single-device run), and each stage keeps the modules of its
layers, so initial weights equal the single-device model's and losses can be compared with one rank.
Pipeline layer ``i``'s state dict keys map to the model's names with :func:`layer_prefix`.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterator
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from model.config import ConfigError, ModelConfig
from model.layers import rope_cos_sin
from model.transformer import Block, Transformer, causal_lm_loss

PP_PARTITIONS = ("parameters", "uniform", "blocks")
PP_ZERO_STAGES = (0, 1)


# ---------------------------------------------------------------------------------------------- layers
def _rope(cfg: ModelConfig, seq_len: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor] | None:
    # Same tables as Transformer.rope_tables; recomputed per stage (a few thousand sin/cos).
    return rope_cos_sin(cfg.resolved_head_dim, seq_len, cfg.rope_theta, device) if cfg.use_rope else None


class EmbeddingStage(nn.Module):
    """tokens [B, T] -> (hidden [B, T, D], aux [1]); holds the model's ``embed`` under the same name."""

    def __init__(self, embed: nn.Embedding):
        super().__init__()
        self.embed = embed

    def forward(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.embed(tokens)
        # A leaf that requires grad: DeepSpeed calls backward on every floating output of a stage, and a
        # stage without MoE layers would otherwise emit an aux tensor outside the autograd graph.
        aux = torch.zeros(1, device=x.device, dtype=torch.float32, requires_grad=torch.is_grad_enabled())
        return x, aux


class BlockStage(nn.Module):
    """(x, aux) -> (x', aux + this block's aux loss); activation checkpointing stays inside ``Block``."""

    def __init__(self, block: Block, cfg: ModelConfig):
        super().__init__()
        self.block = block
        self.cfg = cfg

    def forward(self, inputs: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        x, aux = inputs
        x, block_aux = self.block(x, _rope(self.cfg, x.shape[1], x.device))
        return x, aux + block_aux


class HeadStage(nn.Module):
    """(x, aux) -> (logits, aux): final norm and untied LM head, under the model's names."""

    def __init__(self, norm: nn.Module, lm_head: nn.Linear):
        super().__init__()
        self.norm = norm
        self.lm_head = lm_head

    def forward(self, inputs: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        x, aux = inputs
        return self.lm_head(self.norm(x)), aux


class NormStage(nn.Module):
    """(x, aux) -> (norm(x), aux): the final norm when the LM head is the (tied) embedding."""

    def __init__(self, norm: nn.Module):
        super().__init__()
        self.norm = norm

    def forward(self, inputs: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        x, aux = inputs
        return self.norm(x), aux


def _tied_head_forward(embedding: EmbeddingStage, inputs: tuple[torch.Tensor, torch.Tensor]):
    h, aux = inputs
    return F.linear(h, embedding.embed.weight), aux


def layer_prefix(layer_idx: int, cfg: ModelConfig) -> str | None:
    """How pipeline layer ``layer_idx``'s state-dict keys map onto ``Transformer`` names: the prefix that
    replaces the stage wrapper's attribute, or None for a layer with no saved state (the tied head).

    Layer 0 keys (``embed.weight``) and the head's (``norm.weight``, ``lm_head.weight``) already carry the
    model's names; block ``i`` keys ``block.<rest>`` become ``layers.<i>.<rest>``.
    """
    if layer_idx == 0:
        return ""
    if layer_idx <= cfg.n_layers:
        return f"layers.{layer_idx - 1}."
    if layer_idx == cfg.n_layers + 1:
        return ""
    return None


def pipeline_key_to_model_key(layer_idx: int, key: str, cfg: ModelConfig) -> str:
    """Pipeline layer file key -> ``Transformer.state_dict()`` key."""
    prefix = layer_prefix(layer_idx, cfg)
    if prefix is None:
        raise KeyError(f"pipeline layer {layer_idx} holds no state of its own (tied LM head)")
    if 1 <= layer_idx <= cfg.n_layers:
        if not key.startswith("block."):
            raise KeyError(f"unexpected key {key!r} in pipeline layer {layer_idx}")
        return prefix + key[len("block."):]
    return key


def model_key_to_pipeline_key(key: str, cfg: ModelConfig) -> tuple[int, str]:
    """``Transformer.state_dict()`` key -> (pipeline layer, key in that layer's state dict)."""
    if key.startswith("layers."):
        _, idx, rest = key.split(".", 2)
        return int(idx) + 1, "block." + rest
    if key.startswith("embed."):
        return 0, key
    if key.startswith(("norm.", "lm_head.")):
        return cfg.n_layers + 1, key
    raise KeyError(f"unknown model key {key!r}")


# ---------------------------------------------------------------------------------------------- module
def _pipeline_module_class() -> type:
    from deepspeed.pipe import PipelineModule

    class TransformerPipe(PipelineModule):
        """PipelineModule over our Transformer's modules, with the causal-LM loss (+ MoE aux) on the last stage.

        ``get_additional_losses`` hands DeepSpeed the last micro-batch's ``ce_loss`` and ``aux_loss``; DeepSpeed
        averages them over micro-batches and data-parallel ranks and broadcasts them along the pipeline
        (``engine.agg_additional_losses``), so every rank can report them.
        """

        def __init__(self, model: Transformer, layers: list, moe_ordinals: dict[int, int], **kwargs: Any):
            super().__init__(layers=layers, loss_fn=None, **kwargs)
            self.model_cfg = model.cfg
            self.loss_fn = self._causal_lm_loss
            self._last_losses: tuple[torch.Tensor, torch.Tensor] | None = None
            self._moe_ordinals = moe_ordinals

        def _causal_lm_loss(self, outputs: tuple[torch.Tensor, torch.Tensor], labels: torch.Tensor) -> torch.Tensor:
            logits, aux = outputs
            ce = causal_lm_loss(logits, labels)
            aux = aux.sum()  # [1] -> 0-dim
            self._last_losses = (ce.detach().float(), aux.detach().float())
            # Evaluation reports next-token loss only, as the single-device evaluate() does.
            return ce + aux if self.training else ce

        def get_additional_losses(self) -> OrderedDict:
            ce, aux = self._last_losses if self._last_losses is not None else (torch.zeros(()), torch.zeros(()))
            return OrderedDict(ce_loss=ce, aux_loss=aux)

        def local_moe_layers(self) -> list[tuple[int, nn.Module]]:
            """(MoE ordinal in the whole model, MoE module) for this stage's MoE blocks, in layer order."""
            found = []
            for module in self.forward_funcs:
                if isinstance(module, BlockStage) and module.block.is_moe:
                    found.append((self._moe_ordinals[module.block.layer_idx], module.block.ffn))
            return found

    return TransformerPipe


def layer_specs(model: Transformer) -> list:
    """The pipeline layers over ``model``'s own modules (no copies: the stages keep the model's weights)."""
    from deepspeed.pipe import LayerSpec, TiedLayerSpec

    cfg = model.cfg
    if cfg.tie_embeddings:
        specs: list = [TiedLayerSpec("embed", EmbeddingStage, model.embed, tied_weight_attr=["embed.weight"])]
    else:
        specs = [LayerSpec(EmbeddingStage, model.embed)]
    specs += [LayerSpec(BlockStage, block, cfg) for block in model.layers]
    if cfg.tie_embeddings:
        specs += [
            LayerSpec(NormStage, model.norm),
            TiedLayerSpec(
                "embed", EmbeddingStage, model.embed, forward_fn=_tied_head_forward, tied_weight_attr=["embed.weight"]
            ),
        ]
    else:
        specs.append(LayerSpec(HeadStage, model.norm, model.lm_head))
    return specs


def _partition_method(partition: str) -> str:
    if partition not in PP_PARTITIONS:
        raise ConfigError("parallel.pp_partition", f"got {partition!r}; use one of {', '.join(PP_PARTITIONS)}")
    # "blocks": balance the decoder blocks, the embedding and head ride on the first and last stage.
    return "type:BlockStage" if partition == "blocks" else partition


def build_pipeline_module(model: Transformer, num_stages: int, partition: str = "parameters", topology: Any = None):
    """Collective over the world: wraps ``model`` (already initialised, same seed on every rank) as a
    ``TransformerPipe`` with ``num_stages`` stages; ranks are laid out pipe-major (DeepSpeed's
    ``PipeDataParallelTopology``: rank = stage * dp + dp_rank) unless ``topology`` is given."""
    cfg = model.cfg
    specs = layer_specs(model)
    if not 1 <= num_stages <= cfg.n_layers:
        raise ConfigError("parallel.pp", f"pp={num_stages} must be in [1, model.n_layers={cfg.n_layers}]")
    moe_ordinals = {}
    for i in range(cfg.n_layers):
        if cfg.is_moe_layer(i):
            moe_ordinals[i] = len(moe_ordinals)
    kwargs: dict[str, Any] = {"partition_method": _partition_method(partition), "activation_checkpoint_interval": 0}
    if topology is not None:
        kwargs["topology"] = topology
    else:
        kwargs["num_stages"] = num_stages
    pipe = _pipeline_module_class()(model, specs, moe_ordinals, **kwargs)
    for lo, hi in zip(pipe.parts[:-1], pipe.parts[1:]):
        if hi <= lo:
            raise ConfigError(
                "parallel.pp", f"pp={num_stages} leaves a stage without layers (partition {pipe.parts}); lower parallel.pp"
            )
    return pipe


# ---------------------------------------------------------------------------------------------- engine
def check_pipeline_config(zero_stage: int, pp: int) -> None:
    if pp > 1 and zero_stage not in PP_ZERO_STAGES:
        raise ConfigError(
            "parallel.zero_stage",
            f"pipeline parallelism (pp={pp}) works with ZeRO stage 0 or 1 only (DeepSpeed's pipeline engine "
            f"refuses stages 2/3); got zero_stage={zero_stage}: set parallel.zero_stage=1 or parallel.pp=1",
        )


def build_pipeline_engine(model: Transformer, cfg: Any, layout: Any, precision: str):
    """A DeepSpeed ``PipelineEngine`` over ``model`` split in ``cfg.parallel.pp`` stages, with our AdamW and
    lr schedule and the run's DeepSpeed config (micro-batches per step = gradient accumulation steps).

    ``layout`` may carry a DeepSpeed ``topology`` (e.g. ``PipeDataParallelTopology``); otherwise the ranks are
    laid out pipe-major over the whole world.
    """
    import deepspeed

    from train.engine import build_optimizer, build_scheduler, deepspeed_config

    pp = cfg.parallel.pp
    check_pipeline_config(cfg.parallel.zero_stage, pp)
    partition = getattr(cfg.parallel, "pp_partition", "parameters")
    topology = getattr(layout, "pipe_topology", None) if layout is not None else None
    pipe = build_pipeline_module(model, pp, partition, topology)
    optimizer = build_optimizer(pipe, cfg.optim)
    scheduler = build_scheduler(optimizer, cfg)
    ds_config = deepspeed_config(cfg, precision)
    engine, _, _, _ = deepspeed.initialize(
        model=pipe, optimizer=optimizer, lr_scheduler=scheduler, config=ds_config, dist_init_required=False
    )
    if not engine.zero_optimization() and not engine.bfloat16_enabled() and not engine.fp16_enabled():
        # DeepSpeed 0.19's fp32 ZeRO-0 clipping (runtime.utils.clip_grad_norm_) counts only the first stage's
        # gradients under pipeline parallelism (it keys on the pipeline rank), so the norm and the clipping
        # differ from single-process. Replace it on this engine with the norm over all stages.
        engine.clip_fp32_gradients = lambda: _clip_pipeline_fp32_grads(engine)
    engine._pp_grad_norm = None
    return engine


def _clip_pipeline_fp32_grads(engine: Any) -> torch.Tensor:
    """Global L2 norm over every stage's gradients (a tied weight's copy counted once), then torch's clipping
    rule ``g *= min(1, max_norm / (norm + 1e-6))``. Gradients are already averaged over data parallelism."""
    params = [p for p in engine.module.parameters() if p.grad is not None]
    own = [p.grad.detach().float() for p in params if not getattr(p, "ds_pipe_replicated", False)]
    device = params[0].grad.device if params else torch.device("cpu")
    sq = torch.stack([g.pow(2).sum() for g in own]).sum() if own else torch.zeros((), device=device)
    dist.all_reduce(sq, group=engine.grid.get_model_parallel_group())  # sums over the stages of this pipeline
    norm = sq.sqrt()
    coef = torch.clamp(engine.gradient_clipping() / (norm + 1e-6), max=1.0)
    for p in params:
        p.grad.detach().mul_(coef.to(p.grad.dtype))
    engine._pp_grad_norm = norm
    return norm


def is_pipeline_engine(engine: Any) -> bool:
    from deepspeed.runtime.pipe.engine import PipelineEngine

    return isinstance(engine, PipelineEngine)


def pipeline_stages(engine: Any) -> int:
    """Number of pipeline stages of ``engine`` (1 for a plain DeepSpeed engine)."""
    return engine.num_stages if is_pipeline_engine(engine) else 1


def pipeline_dp_rank(engine: Any) -> int:
    """This rank's data-parallel index: every stage of one pipeline reads the same micro-batches."""
    return engine.grid.data_parallel_id


def _micro_batches(batch: torch.Tensor) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    # DeepSpeed feeds batch[0] to the first stage and batch[1] (labels) to the last.
    for micro in batch:
        yield micro[:, :-1], micro[:, 1:]


def pipeline_train_step(engine: Any, batch: torch.Tensor) -> dict[str, torch.Tensor | None]:
    """One optimizer step over this pipeline's micro-batches [grad_accum, micro_bs, seq_len + 1] (1F1B).

    Returns the same dict as ``train.trainer.train_step``, on every rank: ``ce_loss`` and ``aux_loss`` are the
    means over the micro-batches and data-parallel ranks (computed on the last stage and broadcast along the
    pipeline), ``grad_norm`` the global norm before clipping.
    """
    if batch.shape[0] != engine.micro_batches:
        raise ValueError(f"batch has {batch.shape[0]} micro-batches, the pipeline engine expects {engine.micro_batches}")
    engine._pp_grad_norm = None
    engine.train_batch(data_iter=_micro_batches(batch))
    losses = engine.agg_additional_losses
    grad_norm = engine._pp_grad_norm
    if grad_norm is None and engine.get_global_grad_norm() is not None:
        grad_norm = torch.tensor(float(engine.get_global_grad_norm()))
    return {"ce_loss": losses["ce_loss"].float(), "aux_loss": losses["aux_loss"].float(), "grad_norm": grad_norm}


@torch.no_grad()
def pipeline_eval_step(engine: Any, batch: torch.Tensor) -> torch.Tensor:
    """Mean next-token loss over the micro-batches of ``batch`` and the data-parallel ranks, on every rank."""
    loss = engine.eval_batch(data_iter=_micro_batches(batch), num_micro_batches=batch.shape[0])
    engine.module.train()
    return loss.float().reshape(())  # [1] on the stages that received it by broadcast


def pipeline_moe_stats_and_bias_update(engine: Any) -> dict[str, float]:
    """The pipeline version of the trainer's per-layer expert load and aux-loss-free bias update.

    Each stage averages its MoE layers' load over its data-parallel group (the same layer on every
    pipeline), updates the bias, and the stats of all stages are gathered on global rank 0 (collective).
    """
    stats: dict[str, float] = {}
    for ordinal, moe in engine.module.local_moe_layers():
        last = getattr(moe, "last_stats", None)
        if not last or "load" not in last:
            continue
        load = last["load"].detach().float().reshape(-1).clone()
        if engine.grid.data_parallel_size > 1:
            dist.all_reduce(load, group=engine.grid.get_data_parallel_group())
            load /= engine.grid.data_parallel_size
        moe.update_bias(load)
        mean = load.mean().clamp_min(1e-12)
        stats[f"moe/layer{ordinal}/max_over_mean_load"] = float(load.max() / mean)
        for e, frac in enumerate(load.tolist()):
            stats[f"moe/layer{ordinal}/load_e{e}"] = frac
    if dist.is_initialized() and dist.get_world_size() > 1:
        gathered: list[dict[str, float] | None] = [None] * dist.get_world_size() if dist.get_rank() == 0 else []
        dist.gather_object(stats, gathered if dist.get_rank() == 0 else None, dst=0)
        if dist.get_rank() == 0:
            for part in gathered:
                stats.update(part or {})
    return stats
