"""Causal self-attention with grouped-query heads (GQA) and optional rotary position embedding.

Backends:
- ``flash_attn``: ``flash_attn.flash_attn_func`` (CUDA, fp16/bf16 only); takes GQA natively.
- ``sdpa``: ``torch.nn.functional.scaled_dot_product_attention`` with ``is_causal=True`` and ``enable_gqa``.
- ``auto``: flash_attn when it is importable and the tensors are CUDA fp16/bf16, else sdpa.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from model.config import ConfigError, ModelConfig
from model.layers import apply_rope

try:  # optional dependency: only on GPU machines with the flash-attn wheel installed
    from flash_attn import flash_attn_func
except ImportError:  # pragma: no cover - depends on the environment
    flash_attn_func = None

FLASH_DTYPES = (torch.float16, torch.bfloat16)


def flash_attn_available() -> bool:
    return flash_attn_func is not None


def resolve_backend(requested: str, x: torch.Tensor) -> str:
    """The backend to run for activations ``x`` (its device and dtype decide between flash_attn and sdpa)."""
    flash_ok = flash_attn_func is not None and x.is_cuda and x.dtype in FLASH_DTYPES
    if requested == "auto":
        return "flash_attn" if flash_ok else "sdpa"
    if requested == "flash_attn" and not flash_ok:
        if flash_attn_func is None:
            raise RuntimeError(
                "attn_backend=flash_attn but flash_attn is not importable; install flash-attn or use sdpa"
            )
        raise RuntimeError(
            f"attn_backend=flash_attn needs CUDA fp16/bf16 activations, got {x.device} {x.dtype}; "
            "run under bf16 autocast/weights on GPU or use attn_backend=sdpa"
        )
    return requested


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, backend: str) -> torch.Tensor:
    """Causal attention on q [B, T, H, Dh], k/v [B, T, Hkv, Dh] -> [B, T, H, Dh]; softmax scale 1/sqrt(Dh)."""
    if backend == "flash_attn":
        return flash_attn_func(q, k, v, dropout_p=0.0, causal=True)
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # sdpa wants [B, H, T, Dh]
    out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=q.shape[1] != k.shape[1])
    return out.transpose(1, 2)


class Attention(nn.Module):
    """Multi-head causal self-attention; ``n_kv_heads < n_heads`` shares each k/v head among a group of q heads.

    Head counts are inferred from the projection outputs (``view(..., -1, head_dim)``), so a tensor-parallel
    wrapper that shards q/k/v by heads works without changing this code.
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        if cfg.attn_backend == "flash_attn" and flash_attn_func is None:
            raise ConfigError(
                "model.attn_backend", "flash_attn requested but flash_attn is not importable; install it or use sdpa"
            )
        self.head_dim = cfg.resolved_head_dim
        self.backend = cfg.attn_backend
        self.use_rope = cfg.use_rope
        self.q_proj = nn.Linear(cfg.d_model, cfg.n_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(cfg.d_model, cfg.n_kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(cfg.d_model, cfg.n_kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(cfg.n_heads * self.head_dim, cfg.d_model, bias=False)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """x [B, T, D]; ``rope`` = (cos, sin) tables [T, head_dim], required when the config uses RoPE."""
        batch, seq, _ = x.shape
        q = self.q_proj(x).view(batch, seq, -1, self.head_dim)
        k = self.k_proj(x).view(batch, seq, -1, self.head_dim)
        v = self.v_proj(x).view(batch, seq, -1, self.head_dim)
        if self.use_rope:
            if rope is None:
                raise ValueError("Attention with use_rope=True needs the (cos, sin) tables; pass rope=...")
            cos, sin = rope
            q = apply_rope(q, cos, sin).to(v.dtype)
            k = apply_rope(k, cos, sin).to(v.dtype)
        out = self.attend(q, k, v)
        return self.o_proj(out.reshape(batch, seq, -1))

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Causal attention of this sequence's q [B, T, H, Dh] over its k/v [B, T, Hkv, Dh]."""
        return causal_attention(q, k, v, resolve_backend(self.backend, q))
