"""What a rank launches per micro-batch, counted, for the host-side costs of a step (`train.plan.step_time`).

On a GPU the host queues kernels asynchronously and its cost hides behind them; on a CPU every operator's Python
dispatch, autograd bookkeeping and module hooks run on the same thread as its arithmetic, one after another, and
for a small model they are most of the step. So the planner counts, per micro-batch on one rank:

- operators dispatched in forward and backward (`block_ops`, `outside_ops`, and the trainer's gradient hooks),
  charged ``cluster.op_overhead_s`` each;
- collective calls (`tp_calls`), each charged ``cluster.collective_overhead_s`` on top of its ring time;
- DeepSpeed's per-parameter work: ZeRO 1-2's gradient hook on every parameter in every micro-batch's backward
  (``zero_param_s``), ZeRO-3's fetch and release of every parameter above the persistence threshold in forward
  and again in backward plus its gradient hook (``zero3_param_s``).

The operator counts are the trainer's own model code, counted with a ``TorchDispatchMode`` over one block's forward
and backward (tests/test_plan.py recounts them against the live model): an attention block with RoPE and a SwiGLU
feed-forward dispatches 79 operators forward and 140 backward, whatever the tensor sizes. The Mamba mixer's chunked
scan dispatches a fixed number per position and per chunk (`model.mamba.scan_chunk_length` positions); the fused LM head and loss a fixed
number per chunk of ``loss_chunk_tokens`` tokens (its backward is computed in its forward).
"""

from __future__ import annotations

import math

from model.config import ModelConfig
from model.mamba import scan_chunk_length

# (forward, backward) operators, counted as described above.
ATTENTION_BLOCK = (79, 140)  # norm, attention with RoPE, residual, norm, SwiGLU, residual
ROPE = (24, 26)  # of the above, RoPE's share (hybrid models run attention without it)
MOE_FFN_EXTRA = (42, 48)  # router, top-k, grouped experts and aux losses instead of the SwiGLU: one kernel for all experts
MAMBA_BLOCK_FIXED = (108, 224)  # norm, in/x/dt/out projections, conv, gate, residuals and the SwiGLU around the scan
MAMBA_PER_CHUNK = (31, 78)  # the chunked selective scan, per chunk of each sequence
MAMBA_PER_STEP = (1, 2)  # and per time step: the recurrence is one in-place operator per position
OUTSIDE_FIXED = (40, 5)  # embedding, RoPE tables, final norm, MoE aux-loss sum
LOSS_PER_CHUNK = (42, 0)  # fused LM head + cross entropy per chunk of tokens
# Activation checkpointing re-runs the forward inside backward through torch.utils.checkpoint: counted, the block's
# backward grows by 1.7x its forward operators (full: the whole forward again, plus the checkpoint's own) or 1.6x
# (selective: everything but the GEMMs and attention, more but smaller pieces).
RECOMPUTE_OPS = {"none": 0.0, "full": 1.7, "selective": 1.6}
SELECTIVE_FORWARD_EXTRA = 6
# The trainer's non-finite guard (`train.numerics.NonFiniteGuard`) sums every gradient into one scalar from a hook
# on every parameter: two operators per parameter and micro-batch.
GUARD_OPS_PER_PARAM = 2


def block_ops(cfg: ModelConfig, layer: int, seq_len: int, micro_batch: int = 1, tp: int = 1) -> tuple[float, float]:
    """(forward, backward) operators of block ``layer`` for ``micro_batch`` sequences of ``seq_len`` positions on
    this rank (a tp-th of the Mamba channels), recomputation included in backward."""
    if cfg.is_attention_layer(layer):
        fwd, bwd = ATTENTION_BLOCK
        if not cfg.use_rope:
            fwd, bwd = fwd - ROPE[0], bwd - ROPE[1]
    else:
        chunk = scan_chunk_length(micro_batch, seq_len, cfg.mamba_d_state, max(1, cfg.mamba_d_inner // tp),
                                  cfg.mamba_chunk_size)
        chunks = math.ceil(seq_len / chunk)
        fwd = MAMBA_BLOCK_FIXED[0] + chunks * MAMBA_PER_CHUNK[0] + seq_len * MAMBA_PER_STEP[0]
        bwd = MAMBA_BLOCK_FIXED[1] + chunks * MAMBA_PER_CHUNK[1] + seq_len * MAMBA_PER_STEP[1]
    if cfg.is_moe_layer(layer):
        fwd, bwd = fwd + MOE_FFN_EXTRA[0], bwd + MOE_FFN_EXTRA[1]
    mode = cfg.checkpointing_mode
    bwd += RECOMPUTE_OPS[mode] * fwd
    if mode == "selective":
        fwd += SELECTIVE_FORWARD_EXTRA
    return fwd, bwd


def outside_ops(cfg: ModelConfig, tokens: int) -> tuple[float, float]:
    """(forward, backward) operators outside the blocks for ``tokens`` tokens on this rank (embedding and the
    fused head and loss; split over the first and last pipeline stage, which the planner treats as one)."""
    chunks = math.ceil(tokens / cfg.loss_chunk_tokens) if cfg.loss_chunk_tokens else 1
    return OUTSIDE_FIXED[0] + chunks * LOSS_PER_CHUNK[0], OUTSIDE_FIXED[1] + chunks * LOSS_PER_CHUNK[1]


def tp_calls(cfg: ModelConfig, layer: int, sp: bool, recompute: bool) -> list[tuple[str, str]]:
    """The tensor-parallel collectives one block issues per micro-batch, as (kind, size) with kind one of
    ``all_reduce``, ``all_gather``, ``reduce_scatter`` and size ``act`` (the block's [B, T, D] activations),
    ``small`` (a norm weight's gradient) or ``mamba`` (x_proj's output), as train/parallel/tp.py issues them.

    Without sequence parallelism: an all-reduce after the mixer and after the feed-forward in forward, and of
    their inputs' gradients in backward. With it: an all-gather into and a reduce-scatter out of each in forward,
    the transposes in backward plus one more all-gather of each input (the projections keep only their local
    rows), and an all-reduce of each norm weight's gradient."""
    if sp:
        forward = [("all_gather", "act"), ("reduce_scatter", "act")] * 2
        backward = [("reduce_scatter", "act"), ("all_gather", "act"), ("all_gather", "act")] * 2
        backward += [("all_reduce", "small")] * 2
    else:
        forward = [("all_reduce", "act")] * 2
        backward = [("all_reduce", "act")] * 2
    if not cfg.is_attention_layer(layer):  # x_proj's row-parallel output; dt/B/C norm gradients
        forward.append(("all_reduce", "mamba"))
        backward += [("all_reduce", "small")] * 3
    return forward + backward + (forward if recompute else [])


def tp_outside_calls(sp: bool) -> list[tuple[str, str]]:
    """Outside the blocks per micro-batch: the vocabulary-parallel embedding's all-reduce, the LM head's input
    (an all-gather with sequence parallelism, a copy whose gradient is all-reduced without), and the three
    all-reduces of [B, T] softmax statistics in the vocabulary-parallel loss."""
    head = [("all_gather", "act"), ("reduce_scatter", "act")] if sp else [("all_reduce", "act")]
    return [("all_reduce", "act"), *head, *[("all_reduce", "tokens")] * 3]
