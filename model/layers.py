"""Building blocks of the decoders: RMSNorm, rotary position embedding, SwiGLU MLP, LM head."""

from __future__ import annotations

import torch
from torch import nn

from model.loss import linear_cross_entropy


class RMSNorm(nn.Module):
    """Root-mean-square layer norm (Zhang & Sennrich, 2019), computed in float32 as Llama does."""

    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(dtype)


def rope_inv_freq(head_dim: int, theta: float, device: torch.device | None = None) -> torch.Tensor:
    """Inverse frequencies ``theta ** (-2i / head_dim)`` for i in [0, head_dim / 2), in float32."""
    exponents = torch.arange(0, head_dim, 2, dtype=torch.int64, device=device).float() / head_dim
    return 1.0 / (theta**exponents)


def rope_cos_sin(
    head_dim: int, seq_len: int, theta: float, device: torch.device | None = None, dtype: torch.dtype = torch.float32,
    start: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Cos and sin tables [seq_len, head_dim] for positions start..start+seq_len-1 (computed in float32, cast to
    ``dtype``); ``start`` > 0 for a part of a longer sequence.

    The frequencies are laid out in the "rotate_half" convention: the first and second halves of the
    head dimension form the (real, imaginary) pairs, so the table is the frequency vector repeated twice.
    This is the layout HuggingFace Llama/Mixtral checkpoints assume, so their q/k weights load unpermuted.
    """
    inv_freq = rope_inv_freq(head_dim, theta, device)
    positions = torch.arange(start, start + seq_len, device=device, dtype=torch.float32)
    # Elementwise outer product (not a matmul) so FLOP counters do not count it as model compute.
    angles = positions[:, None] * inv_freq[None, :]
    angles = torch.cat((angles, angles), dim=-1)
    return angles.cos().to(dtype), angles.sin().to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """(x1, x2) -> (-x2, x1) over the two halves of the last dimension."""
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate ``x`` [B, T, H, Dh] by position. ``cos``/``sin`` are [T, Dh] (from :func:`rope_cos_sin`)."""
    cos = cos[None, :, None, :]
    sin = sin[None, :, None, :]
    return x * cos + rotate_half(x) * sin


class SwiGLU(nn.Module):
    """Gated feed-forward ``down(silu(gate(x)) * up(x))`` (Shazeer, 2020), as in Llama."""

    def __init__(self, d_model: int, hidden: int):
        super().__init__()
        self.gate_proj = nn.Linear(d_model, hidden, bias=False)
        self.up_proj = nn.Linear(d_model, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(nn.functional.silu(self.gate_proj(x)) * self.up_proj(x))


class LMHead(nn.Linear):
    """Projection to the vocabulary. ``forward(h)`` -> logits [..., V]; ``forward(h, labels)`` -> the mean cross
    entropy of those logits, computed ``chunk_tokens`` tokens at a time without materialising them
    (`model.loss.linear_cross_entropy`). Labels go through the module call so that whatever wraps the head (ZeRO-3
    parameter gathering, tensor-parallel input hooks) sees the loss as the head's forward."""

    def __init__(self, d_model: int, vocab_size: int, chunk_tokens: int):
        super().__init__(d_model, vocab_size, bias=False)
        self.chunk_tokens = chunk_tokens

    def forward(self, x: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        if labels is None:
            return super().forward(x)
        return linear_cross_entropy(x, self.weight, labels, self.chunk_tokens)
