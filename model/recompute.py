"""Activation checkpointing of one block: full, or selective per operator (as torchtitan's op-level SAC).

Selective keeps the outputs of the operators that are expensive to recompute (matrix multiplies, attention, the
grouped expert GEMM) and recomputes everything else in backward: norms, RoPE, SiLU and the gating products, the
router's softmax and top-k, the Mamba scan's elementwise pre- and post-processing. Those are cheap in FLOPs but
make up most of the saved bytes, so the block keeps well under its full activation memory for a small cost
(measured in docs/benchmarks.md).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch.utils.checkpoint import (
    CheckpointPolicy,
    checkpoint,
    create_selective_checkpoint_contexts,
    noop_context_fn,
)

_aten = torch.ops.aten
# Ops whose outputs selective checkpointing keeps. Present on every torch build we run (CPU and CUDA); the CUDA
# attention kernels are listed by name so a CPU build without them still imports.
_SAVED_OPS = {_aten.mm.default, _aten.addmm.default, _aten.bmm.default, _aten.baddbmm.default}
for _name in ("_scaled_dot_product_flash_attention_for_cpu", "_scaled_dot_product_flash_attention",
              "_scaled_dot_product_efficient_attention", "_scaled_dot_product_cudnn_attention", "_grouped_mm"):
    if hasattr(_aten, _name):
        _SAVED_OPS.add(getattr(_aten, _name).default)


def _policy(ctx: Any, op: Any, *args: Any, **kwargs: Any) -> CheckpointPolicy:
    return CheckpointPolicy.MUST_SAVE if op in _SAVED_OPS else CheckpointPolicy.PREFER_RECOMPUTE


def _selective_contexts() -> Any:
    return create_selective_checkpoint_contexts(_policy)


def checkpointed(fn: Callable[..., Any], mode: str, *args: Any) -> Any:
    """``fn(*args)`` under activation checkpointing ``mode`` ("none", "full" or "selective"); non-reentrant, so it
    composes with autograd hooks, torch.compile and the parallel wrappers' collectives (rerun in backward)."""
    if mode == "none":
        return fn(*args)
    context_fn = _selective_contexts if mode == "selective" else noop_context_fn
    return checkpoint(fn, *args, use_reentrant=False, context_fn=context_fn)

