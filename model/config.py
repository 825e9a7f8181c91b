"""Model configuration: one dataclass for the dense, MoE and hybrid (Jamba-style) decoders.

The layer pattern follows Jamba's definition: layer ``i`` uses attention when
``i % attn_layer_period == attn_layer_offset`` (otherwise a Mamba mixer), and a MoE
feed-forward when ``i % expert_layer_period == expert_layer_offset`` (otherwise a dense
SwiGLU MLP). A dense Llama is ``attn_layer_period=1, attn_layer_offset=0`` with
``num_experts=0``; a Mixtral is the same with experts on every layer.
"""

from __future__ import annotations

import math
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any, Literal, Union


class ConfigError(ValueError):
    """A configuration value is invalid. ``key`` is the dotted config key to fix."""

    def __init__(self, key: str, message: str):
        self.key = key
        self.message = message
        super().__init__(f"{key}: {message}")

    def __reduce__(self):  # picklable across Hydra/submitit job boundaries
        return (type(self), (self.key, self.message))


def _describe(tp: Any) -> str:
    """What a config value of annotated type ``tp`` must look like, for error messages."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (Union, types.UnionType):
        return " or ".join(_describe(a) for a in args)
    if origin is Literal:
        return "one of " + ", ".join(str(a) for a in args)
    if origin is tuple and len(args) == 2 and args[1] is Ellipsis:
        return f"a list of {_describe(args[0])} values"
    if origin is tuple:
        return f"a list of {len(args)} {'numbers' if float in args else 'values'}"
    names = {bool: "true or false", int: "an integer", float: "a number", str: "a string", type(None): "null"}
    return names.get(tp, getattr(tp, "__name__", str(tp)))


def convert_value(value: Any, tp: Any, key: str) -> Any:
    """``value`` as annotated type ``tp`` (int, float, bool, str, Literal, tuples, unions of these, null);
    raises ConfigError naming ``key`` and the expected type when it does not fit. Integral floats become ints
    (``1e4`` steps) and numbers become strings for string fields; nothing else is coerced."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (Union, types.UnionType):
        for alt in args:
            try:
                return convert_value(value, alt, key)
            except ConfigError:
                pass
    elif origin is Literal:
        if any(type(value) is type(a) and value == a for a in args):
            return value
    elif origin is tuple and len(args) == 2 and args[1] is Ellipsis:
        if isinstance(value, list | tuple):
            return tuple(convert_value(v, args[0], f"{key}[{i}]") for i, v in enumerate(value))
    elif origin is tuple:
        if isinstance(value, list | tuple) and len(value) == len(args):
            return tuple(convert_value(v, t, f"{key}[{i}]") for i, (v, t) in enumerate(zip(value, args, strict=True)))
    elif tp is type(None):
        if value is None:
            return None
    elif tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
    elif tp is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            if not math.isfinite(value):
                raise ConfigError(key, f"expected a finite number, got {value}")
            return float(value)
    elif tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, int | float) and not isinstance(value, bool):
            return str(value)
    else:
        return value  # a type this helper does not check: the dataclass's own validation decides
    raise ConfigError(key, f"expected {_describe(tp)}, got {value!r}")


def config_from_dict(cls: type, d: Mapping[str, Any], prefix: str) -> Any:
    """Builds dataclass ``cls`` from a config mapping: every value converted to its field's annotated type, unknown
    keys refused; errors name the dotted key (``prefix.field``)."""
    hints = typing.get_type_hints(cls)
    known = [f.name for f in fields(cls)]
    unknown = sorted(set(d) - set(known))
    if unknown:
        raise ConfigError(f"{prefix}.{unknown[0]}", f"unknown option; known options: {', '.join(sorted(known))}")
    return cls(**{k: convert_value(v, hints[k], f"{prefix}.{k}") for k, v in d.items()})


Family = Literal["dense", "moe", "hybrid"]


@dataclass
class ModelConfig:
    name: str = "dense_tiny"
    family: Family = "dense"
    vocab_size: int = 8000
    d_model: int = 256
    n_layers: int = 4
    n_heads: int = 8
    n_kv_heads: int = 4
    head_dim: int | None = None  # default d_model // n_heads
    ffn_hidden: int = 688  # SwiGLU hidden size (per expert for MoE)
    max_seq_len: int = 2048
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    tie_embeddings: bool = False
    init_std: float = 0.02
    attn_backend: Literal["auto", "flash_attn", "sdpa"] = "auto"
    # Which positional encoding attention layers use. Jamba uses none (the Mamba layers
    # carry position); Llama and Mixtral use RoPE.
    use_rope: bool = True

    # --- Mixture of experts (family moe or hybrid) ---
    num_experts: int = 0
    top_k: int = 2
    # Mixtral renormalises the k selected router probabilities to sum to 1; Jamba's MoE does not.
    moe_renormalize: bool = True
    expert_layer_period: int = 1
    expert_layer_offset: int = 0
    aux_loss_coeff: float = 0.01  # load-balancing loss coefficient
    z_loss_coeff: float = 0.001  # router z-loss coefficient
    capacity_factor: float | None = None  # None = dropless
    aux_free_bias_rate: float = 0.0  # >0 enables aux-loss-free balancing bias updates

    # --- Mamba mixer (family hybrid) ---
    attn_layer_period: int = 1
    attn_layer_offset: int = 0
    mamba_d_state: int = 16
    mamba_d_conv: int = 4
    mamba_expand: int = 2
    mamba_dt_rank: int | None = None  # default ceil(d_model / 16)
    mamba_conv_bias: bool = True
    mamba_proj_bias: bool = False
    mamba_chunk_size: int = 64  # chunk length of the parallel scan

    # --- Performance ---
    # What a block keeps for backward: "none" (everything autograd saves), "full" (its input only; the block runs
    # again in backward) or "selective" (matmul and attention outputs; norms, RoPE and activations are recomputed:
    # `model.recompute`). true / false mean full / none.
    activation_checkpointing: str | bool = "none"
    # The LM head and cross entropy run this many tokens at a time without materialising the [tokens, vocab] logits
    # (`model.loss.linear_cross_entropy`); null computes the full logits and `model.loss.causal_lm_loss`.
    loss_chunk_tokens: int | None = 1024

    # ---------------------------------------------------------------- derived
    @property
    def checkpointing_mode(self) -> str:
        """``activation_checkpointing`` as "none", "full" or "selective" (true / false mean full / none)."""
        mode = self.activation_checkpointing
        if isinstance(mode, bool):
            return "full" if mode else "none"
        return mode

    @property
    def resolved_head_dim(self) -> int:
        return self.head_dim if self.head_dim is not None else self.d_model // self.n_heads

    @property
    def resolved_dt_rank(self) -> int:
        return self.mamba_dt_rank if self.mamba_dt_rank is not None else math.ceil(self.d_model / 16)

    @property
    def mamba_d_inner(self) -> int:
        return self.mamba_expand * self.d_model

    def is_attention_layer(self, i: int) -> bool:
        return i % self.attn_layer_period == self.attn_layer_offset

    def is_moe_layer(self, i: int) -> bool:
        return self.num_experts > 0 and i % self.expert_layer_period == self.expert_layer_offset

    # ------------------------------------------------------------- validation
    def validate(self, prefix: str = "model") -> ModelConfig:
        def err(key: str, msg: str) -> ConfigError:
            return ConfigError(f"{prefix}.{key}", msg)

        if self.family not in ("dense", "moe", "hybrid"):
            raise err("family", f"got {self.family!r}; use dense, moe or hybrid")
        for key in ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "ffn_hidden", "max_seq_len"):
            if getattr(self, key) <= 0:
                raise err(key, f"must be positive, got {getattr(self, key)}")
        for key in ("head_dim", "mamba_dt_rank"):
            if getattr(self, key) is not None and getattr(self, key) <= 0:
                raise err(key, f"must be positive or null (derived from d_model), got {getattr(self, key)}")
        for key in ("rope_theta", "norm_eps", "init_std"):
            if getattr(self, key) <= 0:
                raise err(key, f"must be positive, got {getattr(self, key)}")
        for key in ("aux_loss_coeff", "z_loss_coeff", "aux_free_bias_rate"):
            if getattr(self, key) < 0:
                raise err(key, f"must be >= 0 (0 disables it), got {getattr(self, key)}")
        for key in ("expert_layer_period", "attn_layer_period"):
            if getattr(self, key) < 1:
                raise err(key, f"must be >= 1, got {getattr(self, key)}")
        if self.n_heads % self.n_kv_heads != 0:
            raise err(
                "n_kv_heads",
                f"n_heads={self.n_heads} is not divisible by n_kv_heads={self.n_kv_heads}; "
                "pick n_kv_heads that divides n_heads (GQA groups must be equal)",
            )
        if self.head_dim is None and self.d_model % self.n_heads != 0:
            raise err(
                "n_heads", f"d_model={self.d_model} is not divisible by n_heads={self.n_heads}; set model.head_dim"
            )
        if self.resolved_head_dim % 2 != 0 and self.use_rope:
            raise err("head_dim", f"RoPE needs an even head_dim, got {self.resolved_head_dim}")
        if self.attn_backend not in ("auto", "flash_attn", "sdpa"):
            raise err("attn_backend", f"got {self.attn_backend!r}; use auto, flash_attn or sdpa")
        if self.family == "dense" and self.num_experts != 0:
            raise err("num_experts", "a dense model has num_experts=0; use family=moe for experts")
        if self.family in ("moe",) and self.num_experts < 2:
            raise err("num_experts", f"family={self.family} needs num_experts >= 2, got {self.num_experts}")
        if self.num_experts > 0:
            if not 1 <= self.top_k <= self.num_experts:
                raise err("top_k", f"must be in [1, num_experts={self.num_experts}], got {self.top_k}")
            if not 0 <= self.expert_layer_offset < self.expert_layer_period:
                raise err("expert_layer_offset", "must be in [0, expert_layer_period)")
            if self.capacity_factor is not None and self.capacity_factor <= 0:
                raise err("capacity_factor", "must be positive or null (dropless)")
        self.activation_checkpointing = self.checkpointing_mode
        if self.activation_checkpointing not in ("none", "full", "selective"):
            raise err("activation_checkpointing", f"got {self.activation_checkpointing!r}; use none, full or selective")
        if self.loss_chunk_tokens is not None and self.loss_chunk_tokens < 1:
            raise err("loss_chunk_tokens", f"must be >= 1 or null (full logits), got {self.loss_chunk_tokens}")
        if self.family != "hybrid" and (self.attn_layer_period, self.attn_layer_offset) != (1, 0):
            raise err("attn_layer_period", "only family=hybrid interleaves Mamba layers; keep period 1, offset 0")
        if not 0 <= self.attn_layer_offset < self.attn_layer_period:
            raise err("attn_layer_offset", "must be in [0, attn_layer_period)")
        if self.family == "hybrid":
            for key in ("mamba_d_state", "mamba_d_conv", "mamba_expand", "mamba_chunk_size"):
                if getattr(self, key) <= 0:
                    raise err(key, f"must be positive, got {getattr(self, key)}")
        return self

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], prefix: str = "model") -> ModelConfig:
        return config_from_dict(cls, d, prefix).validate(prefix)
