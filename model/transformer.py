"""The decoder: embedding -> blocks -> final norm -> LM head, for the dense, MoE and hybrid families.

Each block is pre-norm: ``x + mixer(mixer_norm(x))`` then ``x + ffn(ffn_norm(x))``. The mixer is causal
attention or a Mamba mixer and the feed-forward a SwiGLU MLP or a mixture of experts, chosen per layer
from the config's layer pattern (``ModelConfig.is_attention_layer`` / ``is_moe_layer``).

The model is kept strictly sequential (``embed`` -> ``layers`` -> ``norm`` -> ``lm_head``) so that pipeline
parallelism can slice ``layers``; everything a slice needs (RoPE tables, loss) is exposed as a method or a
module-level function. Activation checkpointing lives inside ``Block`` so it survives that slicing.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from model.attention import Attention
from model.config import ModelConfig
from model.init import init_buffer, init_parameter, parameter_generator
from model.layers import LMHead, RMSNorm, SwiGLU, rope_cos_sin
from model.loss import causal_lm_loss
from model.recompute import checkpointed


def _moe_class() -> type[nn.Module]:
    # Imported lazily: dense models must not depend on the MoE/Mamba modules being importable.
    from model.moe import MoE

    return MoE


def _mamba_class() -> type[nn.Module]:
    from model.mamba import MambaMixer

    return MambaMixer


@dataclass
class ModelOutput:
    """``loss = ce_loss + aux_loss`` when labels were given, else ``loss`` and ``ce_loss`` are None. ``logits`` is
    None when labels were given and the loss ran fused with the LM head (``model.loss_chunk_tokens``)."""

    logits: torch.Tensor | None  # [B, T, V] in the activation dtype
    loss: torch.Tensor | None
    ce_loss: torch.Tensor | None
    aux_loss: torch.Tensor  # 0-dim; sum of the MoE layers' (already coefficient-weighted) aux losses


class Block(nn.Module):
    """One pre-norm decoder layer. ``forward(x, rope) -> (x, aux_loss)``."""

    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.is_attention = cfg.is_attention_layer(layer_idx)
        self.is_moe = cfg.is_moe_layer(layer_idx)
        self.activation_checkpointing = cfg.activation_checkpointing
        self.mixer_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.mixer = Attention(cfg) if self.is_attention else _mamba_class()(cfg)
        self.ffn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.ffn = _moe_class()(cfg) if self.is_moe else SwiGLU(cfg.d_model, cfg.ffn_hidden)

    def _forward(
        self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.mixer_norm(x)
        x = x + (self.mixer(h, rope) if self.is_attention else self.mixer(h))
        h = self.ffn_norm(x)
        if self.is_moe:
            y, aux = self.ffn(h)
        else:
            y, aux = self.ffn(h), torch.zeros((), device=x.device, dtype=torch.float32)
        return x + y, aux

    def forward(
        self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        mode = self.activation_checkpointing if self.training and torch.is_grad_enabled() else "none"
        return checkpointed(self._forward, mode, x, rope)


class Transformer(nn.Module):
    """Decoder-only language model. ``forward(tokens, labels=None) -> ModelOutput``.

    Initialisation (:meth:`reset_parameters`, run at construction, deterministic under ``torch.manual_seed``):
    embedding and every linear/expert weight ~ N(0, init_std), except the projections that write into the
    residual stream (attention ``o_proj``, MLP ``down_proj``, expert ``w2``, Mamba ``out_proj``), which use
    ``init_std / sqrt(2 * n_layers)`` as in GPT-2 so the residual variance does not grow with depth. Norm
    weights are 1. The Mamba mixer's own parameters (``A_log``, ``D``, ``dt_proj``, ``conv1d``) follow Mamba's
    initialisation. Each parameter is drawn from a generator seeded by (seed, its name): see `model.init`.
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.lm_head = LMHead(cfg.d_model, cfg.vocab_size, cfg.loss_chunk_tokens or 0)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.embed.weight
        # (logits, labels) -> ce_loss; tensor parallelism swaps in a loss over vocabulary-sharded logits.
        self.loss_fn = causal_lm_loss
        self.reset_parameters()

    # ------------------------------------------------------------------ init
    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Every parameter from its own generator, seeded from (``torch.initial_seed()``, its name): the rules of
        `model.init`, so a parallel layout that generates each parameter by name gets the same weights. Parameters
        on the meta device (a model built without storage, to be sharded first) are left for that layout."""
        seed = torch.initial_seed()
        for name, p in self.named_parameters():
            if not p.is_meta:
                p.copy_(init_parameter(self.cfg, name, p.shape, parameter_generator(seed, name), p.dtype))
        for name, b in self.named_buffers():
            if not b.is_meta:
                b.copy_(init_buffer(self.cfg, name, b.shape, b.dtype))

    # --------------------------------------------------------------- forward
    def rope_tables(
        self, seq_len: int, device: torch.device, start: int = 0
    ) -> tuple[torch.Tensor, torch.Tensor] | None:
        """RoPE (cos, sin) [seq_len, head_dim] in float32 for positions from ``start``, or None without RoPE.

        Recomputed every forward (a few thousand sin/cos, negligible) rather than cached in a buffer, so meta-device
        construction, ``to_empty`` and ``torch.compile`` need no special handling.
        """
        if not self.cfg.use_rope:
            return None
        return rope_cos_sin(self.cfg.resolved_head_dim, seq_len, self.cfg.rope_theta, device, start=start)

    def forward(self, tokens: torch.Tensor, labels: torch.Tensor | None = None) -> ModelOutput:
        """tokens [B, T] int64; labels [B, T] int64 aligned with the positions (-100 = ignore) or None."""
        if tokens.dim() != 2:
            raise ValueError(f"tokens must be [batch, seq_len], got shape {tuple(tokens.shape)}")
        x = self.embed(tokens)
        rope = self.rope_tables(tokens.shape[1], tokens.device)
        aux_loss = torch.zeros((), device=x.device, dtype=torch.float32)
        for block in self.layers:
            x, aux = block(x, rope)
            aux_loss = aux_loss + aux
        h = self.norm(x)
        if labels is None:
            return ModelOutput(logits=self.lm_head(h), loss=None, ce_loss=None, aux_loss=aux_loss)
        if labels.shape != tokens.shape:
            raise ValueError(f"labels shape {tuple(labels.shape)} must equal tokens shape {tuple(tokens.shape)}")
        logits, ce_loss = self.head_loss(h, labels)
        return ModelOutput(logits=logits, loss=ce_loss + aux_loss, ce_loss=ce_loss, aux_loss=aux_loss)

    def head_loss(self, h: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor]:
        """(logits or None, mean cross entropy) of the final-norm output ``h``: fused with the LM head in chunks
        when ``loss_chunk_tokens`` is set (no logits), else full logits and ``loss_fn``. A pipeline's last stage
        calls this with the labels it receives."""
        if self.cfg.loss_chunk_tokens:
            return None, self.lm_head(h, labels)
        logits = self.lm_head(h)
        return logits, self.loss_fn(logits, labels)

    # ------------------------------------------------------------- utilities
    def moe_layers(self) -> list[nn.Module]:
        """The MoE feed-forward modules, in layer order (empty for a dense model)."""
        return [block.ffn for block in self.layers if block.is_moe]

    def num_params(self, exclude_embedding: bool = False) -> int:
        """Number of distinct parameters (a tied LM head counts once); optionally without the input embedding.

        For analytic counts, including active parameters of MoE models, see :func:`model.flops.param_counts`.
        """
        total = sum(p.numel() for p in self.parameters())
        return total - self.embed.weight.numel() if exclude_embedding else total
