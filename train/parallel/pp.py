"""Pipeline parallelism: our single-device ``Transformer`` as a DeepSpeed ``PipelineModule`` (1F1B schedule).

The model code is untouched. Its modules are wrapped as pipeline layers, in order::

    layer 0          EmbeddingStage(embed)                tokens        -> (x, aux)
    layer 1..L       BlockStage(layers[i])                (x, aux)      -> (x, aux + block aux)
    layer L+1        HeadStage(norm, lm_head)             (x, aux)      -> (norm(x), aux)
                     or, with tied embeddings, NormStage(norm) and the embedding again (a TiedLayerSpec that
                     places the shared weight on the last stage)
    loss             Transformer.head_loss(h, labels)     the LM head and cross entropy (fused or not)

``aux`` is a float32 tensor of shape [1] that carries the running sum of the MoE aux losses from stage
to stage (DeepSpeed pipes tuples of tensors, and sends gradients back for every floating tensor), so the
last stage adds exactly the total the single-device model adds: ``loss = ce + aux``.

The full model is built first (same seed as a single-device run), and each stage keeps the modules of its
layers, so initial weights equal the single-device model's and losses can be compared with one rank.
Pipeline layer ``i``'s state dict keys map to the model's names with :func:`layer_prefix`.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

import torch
from torch import nn

from model.config import ConfigError, ModelConfig
from model.layers import rope_cos_sin
from model.transformer import Block, Transformer
from train.parallel.dims import PP_PARTITIONS
from train.parallel.ep import MARKER_NAME
from train.parallel.groups import ParallelGroups, pipeline_grid


# ---------------------------------------------------------------------------------------------- layers
def _rope(cfg: ModelConfig, seq_len: int, device: torch.device, start: int) -> tuple[torch.Tensor, torch.Tensor] | None:
    # Same tables as Transformer.rope_tables; recomputed per stage (a few thousand sin/cos).
    return rope_cos_sin(cfg.resolved_head_dim, seq_len, cfg.rope_theta, device, start=start) if cfg.use_rope else None


class EmbeddingStage(nn.Module):
    """tokens [B, T] -> (hidden [B, T, D], aux [1]); holds the model's ``embed`` under the same name.

    ``head``: with tied embeddings, the model's LM head, whose weight is ``embed.weight`` (kept unregistered: its
    one parameter is the embedding's); the tied last stage calls it, so a tensor-parallel head keeps its
    communication."""

    def __init__(self, embed: nn.Embedding, head: nn.Module | None = None):
        super().__init__()
        self.embed = embed
        object.__setattr__(self, "head", head)

    def forward(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.embed(tokens)
        # A leaf that requires grad: DeepSpeed calls backward on every floating output of a stage, and a
        # stage without MoE layers would otherwise emit an aux tensor outside the autograd graph.
        aux = torch.zeros(1, device=x.device, dtype=torch.float32, requires_grad=torch.is_grad_enabled())
        return x, aux


class BlockStage(nn.Module):
    """(x, aux) -> (x', aux + this block's aux loss); activation checkpointing stays inside ``Block``.

    ``seq_shards``: how many parts of this rank's positions ``x`` is (sequence parallelism hands each rank T/tp rows;
    the RoPE tables cover all of them); ``cp_rank``: which part of the sequence they are under context parallelism
    (the tables start at its first position)."""

    def __init__(self, block: Block, cfg: ModelConfig, seq_shards: int = 1, cp_rank: int = 0):
        super().__init__()
        self.block = block
        self.cfg = cfg
        self.seq_shards = seq_shards
        self.cp_rank = cp_rank

    def forward(self, inputs: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        x, aux = inputs
        positions = x.shape[1] * self.seq_shards
        x, block_aux = self.block(x, _rope(self.cfg, positions, x.device, self.cp_rank * positions))
        return x, aux + block_aux


class HeadStage(nn.Module):
    """(x, aux) -> (norm(x), aux): the final norm, and the untied LM head under the model's names, which the loss
    applies (`Transformer.head_loss`, fused with the cross entropy when ``model.loss_chunk_tokens`` is set)."""

    def __init__(self, norm: nn.Module, lm_head: nn.Module):
        super().__init__()
        self.norm = norm
        self.lm_head = lm_head

    def forward(self, inputs: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        x, aux = inputs
        return self.norm(x), aux


class NormStage(nn.Module):
    """(x, aux) -> (norm(x), aux): the final norm when the LM head is the (tied) embedding."""

    def __init__(self, norm: nn.Module):
        super().__init__()
        self.norm = norm

    def forward(self, inputs: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        x, aux = inputs
        return self.norm(x), aux


def _tied_head_forward(embedding: EmbeddingStage, inputs: tuple[torch.Tensor, torch.Tensor]):
    # The tied copy on the last stage only places the shared weight there; the loss applies the head.
    return inputs


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
            # LM head + cross entropy, as the model runs them (vocabulary-parallel under tensor parallelism).
            self.head_loss = model.head_loss
            self._last_losses: tuple[torch.Tensor, torch.Tensor] | None = None
            self._moe_ordinals = moe_ordinals

        def _causal_lm_loss(self, outputs: tuple[torch.Tensor, torch.Tensor], labels: torch.Tensor) -> torch.Tensor:
            h, aux = outputs
            _, ce = self.head_loss(h, labels)
            aux = aux.sum()  # [1] -> 0-dim
            self._last_losses = (ce.detach().float(), aux.detach().float())
            # Evaluation reports next-token loss only, as the single-device evaluate() does.
            return ce + aux if self.training else ce

        def get_additional_losses(self) -> OrderedDict:
            ce, aux = self._last_losses if self._last_losses is not None else (torch.zeros(()), torch.zeros(()))
            return OrderedDict(ce_loss=ce, aux_loss=aux)

        def model_named_parameters(self) -> list[tuple[str, nn.Parameter]]:
            """(single-device model name, parameter) for this stage's parameters; a tied weight's second copy
            (``ds_pipe_replicated``) is listed too, under the same name."""
            named = []
            for name, p in self.named_parameters(remove_duplicate=False):
                if name.startswith("tied_modules."):
                    named.append((name.split(".", 2)[2], p))  # tied_modules.<key>.embed.weight -> embed.weight
                else:
                    layer, key = name.split(".", 1)
                    named.append((pipeline_key_to_model_key(int(layer), key, self.model_cfg), p))
            return named

        def model_named_buffers(self) -> list[tuple[str, torch.Tensor]]:
            return [(pipeline_key_to_model_key(int(name.split(".", 1)[0]), name.split(".", 1)[1], self.model_cfg), buf)
                    for name, buf in self.named_buffers() if name.split(".", 1)[0].isdigit()]

        def local_moe_layers(self) -> list[tuple[int, nn.Module]]:
            """(MoE ordinal in the whole model, MoE module) for this stage's MoE blocks, in layer order."""
            found = []
            for module in self.forward_funcs:
                if isinstance(module, BlockStage) and module.block.is_moe:
                    found.append((self._moe_ordinals[module.block.layer_idx], module.block.ffn))
            return found

    return TransformerPipe


def layer_specs(model: Transformer, seq_shards: int = 1, cp_rank: int = 0) -> list:
    """The pipeline layers over ``model``'s own modules (no copies: the stages keep the model's weights)."""
    from deepspeed.pipe import LayerSpec, TiedLayerSpec

    cfg = model.cfg
    if cfg.tie_embeddings:
        specs: list = [
            TiedLayerSpec("embed", EmbeddingStage, model.embed, model.lm_head, tied_weight_attr=["embed.weight"])
        ]
    else:
        specs = [LayerSpec(EmbeddingStage, model.embed)]
    specs += [LayerSpec(BlockStage, block, cfg, seq_shards, cp_rank) for block in model.layers]
    if cfg.tie_embeddings:
        specs += [
            LayerSpec(NormStage, model.norm),
            TiedLayerSpec(
                "embed", EmbeddingStage, model.embed, model.lm_head, forward_fn=_tied_head_forward,
                tied_weight_attr=["embed.weight"],
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


def build_pipeline_module(model: Transformer, groups: ParallelGroups, partition: str = "parameters",
                          seq_shards: int = 1):
    """Wraps ``model`` (already initialised and parallelised, same weights on every rank) as a ``TransformerPipe``
    with ``groups.layout.pp`` stages whose grid is ``groups`` (collective). ``seq_shards``: the tp size under
    sequence parallelism (each rank's activations hold 1/seq_shards of the sequence), else 1."""
    import deepspeed.runtime.pipe.module as ds_pipe_module
    from deepspeed.runtime.pipe.topology import PipeModelDataParallelTopology

    cfg, lay = model.cfg, groups.layout
    if not 1 <= lay.pp <= cfg.n_layers:
        raise ConfigError("parallel.pp", f"pp={lay.pp} must be in [1, model.n_layers={cfg.n_layers}]")
    moe_ordinals = {}
    for i in range(cfg.n_layers):
        if cfg.is_moe_layer(i):
            moe_ordinals[i] = len(moe_ordinals)
    topology = PipeModelDataParallelTopology(num_pp=lay.pp, num_mp=lay.tp, num_dp=lay.dp_cp)
    # PipelineModule builds its grid (and a second set of process groups) in its constructor and takes no grid
    # argument: swap in the grid class over our groups for the duration of that call.
    default_grid = ds_pipe_module.PipelineParallelGrid
    ds_pipe_module.PipelineParallelGrid = pipeline_grid(groups)
    try:
        pipe = _pipeline_module_class()(
            model, layer_specs(model, seq_shards, lay.cp_rank), moe_ordinals, topology=topology,
            partition_method=_partition_method(partition), activation_checkpoint_interval=0,
        )
    finally:
        ds_pipe_module.PipelineParallelGrid = default_grid
    if hasattr(model, MARKER_NAME):  # DeepSpeed takes its MoE code paths only if the module it wraps has one
        pipe.add_module(MARKER_NAME, getattr(model, MARKER_NAME))
    for lo, hi in zip(pipe.parts[:-1], pipe.parts[1:]):
        if hi <= lo:
            raise ConfigError(
                "parallel.pp", f"pp={lay.pp} leaves a stage without layers (partition {pipe.parts}); lower parallel.pp"
            )
    return pipe
