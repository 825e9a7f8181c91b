"""Context parallelism (CP): each of the ``cp`` ranks of a CP group holds one contiguous part of every sequence,
``T / cp`` positions, through the whole model: `apply_context_parallel` switches the classes of the single-device
model's mixers in place, as tensor parallelism does, and `split_sequence` gives each rank its part of a batch.

What crosses the parts:
- Attention (Ulysses, Jacobs et al. 2023): an all-to-all turns [B, T/cp, H, Dh] queries, keys and values into
  [B, T, H/cp, Dh] (every position, a cp-th of the heads), the usual causal kernel runs (flash_attn or SDPA, the
  exact softmax over the whole sequence), and a second all-to-all turns the output back. Key/value heads fewer than
  ``cp`` are first repeated per query head, as grouped-query attention would use them. The all-to-alls' backward is
  the opposite all-to-all.
- Mamba: the recurrence runs from the first position to the last, so rank r passes rank r+1 the d_conv - 1 inputs
  before its part (for the causal conv1d) and the SSM state after its part's last step; the backward passes the
  gradients of both back (`model.mamba` chains a scan from a given state and returns its final state).
- MoE: routing is per token, but the load-balancing loss multiplies sequence-wide means (the fraction of slots and
  the router probability per expert): they are averaged over the CP group, so the loss is the one of whole sequences.
- RoPE: positions are global (rank r's part starts at r * T / cp).

Why contiguous parts, not zig-zag: the Mamba hand-off needs each rank's part to follow the previous rank's, and with
the all-to-all every rank computes the causal attention of its heads over the whole sequence, so contiguous parts
leave no rank with more attention work than another (a ring exchange would need zig-zag to balance; we have none).

Every other operation is per position, and CP ranks hold the same parameters: their gradients average over data x
context parallel ranks (``ParallelGroups.dp_group``), which with equal parts of every sequence is the mean over all
tokens. Activation checkpointing recomputes a block's forward in backward: what a mixer received from its
neighbour is kept for that second forward, which sends and receives nothing (its neighbours are past that point).
"""

from __future__ import annotations

import functools
from collections import deque
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from model.attention import Attention
from model.mamba import MambaMixer, selective_scan_chunked
from model.moe import MoE
from train.parallel.sp import Collective, identity


def split_sequence(micro: Tensor, cp_rank: int, cp: int) -> tuple[Tensor, Tensor]:
    """(tokens, labels) of this CP rank's part of a micro-batch of samples [B, T + 1]: positions
    [cp_rank * T / cp, (cp_rank + 1) * T / cp)."""
    tokens, labels = micro[:, :-1], micro[:, 1:]
    if cp == 1:
        return tokens, labels
    part = tokens.shape[1] // cp
    return tokens.narrow(1, cp_rank * part, part), labels.narrow(1, cp_rank * part, part)


def _recomputing() -> bool:
    """Whether this forward runs inside backward (activation checkpointing recomputing a block)."""
    return torch._C._current_graph_task_id() != -1


# ------------------------------------------------------------------------------------------ all-to-all (attention)
def seq_to_heads(x: Tensor, group: Any) -> Tensor:
    """[B, T/cp, H, Dh] (this rank's positions) -> [B, T, H/cp, Dh] (this rank's heads), positions in rank order."""
    cp = dist.get_world_size(group)
    b, t, h, d = x.shape
    send = x.reshape(b, t, cp, h // cp, d).permute(2, 0, 1, 3, 4).contiguous()
    recv = torch.empty_like(send)
    dist.all_to_all_single(recv, send, group=group)
    return recv.permute(1, 0, 2, 3, 4).reshape(b, cp * t, h // cp, d)


def heads_to_seq(x: Tensor, group: Any) -> Tensor:
    """The inverse of `seq_to_heads`: [B, T, H/cp, Dh] -> [B, T/cp, H, Dh]."""
    cp = dist.get_world_size(group)
    b, seq, hc, d = x.shape
    send = x.reshape(b, cp, seq // cp, hc, d).transpose(0, 1).contiguous()
    recv = torch.empty_like(send)
    dist.all_to_all_single(recv, send, group=group)
    return recv.permute(1, 2, 0, 3, 4).reshape(b, seq // cp, cp * hc, d)


class ContextParallelAttention:
    """Mixin over `Attention`: the causal attention of the whole sequence, heads scattered over the CP group."""

    cp_group: Any

    def attend(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        cp = dist.get_world_size(self.cp_group)
        if k.shape[2] % cp:  # too few key/value heads to scatter: one copy per query head, as GQA uses them
            repeat = q.shape[2] // k.shape[2]
            k, v = (t.repeat_interleave(repeat, dim=2) for t in (k, v))
        q, k, v = (Collective.apply(t, self.cp_group, seq_to_heads, heads_to_seq) for t in (q, k, v))
        out = super().attend(q, k, v)  # type: ignore[misc]
        return Collective.apply(out, self.cp_group, heads_to_seq, seq_to_heads)


# ------------------------------------------------------------------------------------------ point to point (Mamba)
def _peer(group: Any, offset: int) -> int | None:
    """Global rank of the CP rank ``offset`` places on from this one, or None past either end."""
    rank = dist.get_rank(group) + offset
    return dist.get_global_rank(group, rank) if 0 <= rank < dist.get_world_size(group) else None


def _exchange(send: Tensor | None, to: int | None, recv_like: Tensor, source: int | None) -> Tensor | None:
    """Sends ``send`` to global rank ``to`` and receives a tensor shaped like ``recv_like`` from ``source`` (either
    may be None), both in flight together."""
    works, received = [], None
    if source is not None:
        received = torch.empty_like(recv_like, memory_format=torch.contiguous_format)
        works.append(dist.irecv(received, src=source))
    if send is not None and to is not None:
        works.append(dist.isend(send.contiguous(), dst=to))
    for work in works:
        work.wait()
    return received


class _Received:
    """What a mixer received from its CP neighbour in forwards that activation checkpointing will run again: the
    second forward takes it from here, in the same order (each micro-batch's block is recomputed once, in the
    order of the first forwards)."""

    def __init__(self) -> None:
        self.queue: deque[Tensor] = deque()

    def take(self, receive: Any, keep: bool) -> Tensor:
        if _recomputing():
            return self.queue.popleft()
        received = receive()
        if keep:
            self.queue.append(received)
        return received


class _ShiftForward(torch.autograd.Function):
    """Rank r's ``tail`` goes to rank r+1; returns what rank r-1 sent (zeros on the first rank). Backward: the
    reverse shift of the gradients."""

    @staticmethod
    def forward(ctx: Any, tail: Tensor, group: Any, received: _Received, keep: bool) -> Tensor:  # type: ignore[override]
        ctx.group = group
        prev, nxt = _peer(group, -1), _peer(group, +1)

        def receive() -> Tensor:
            got = _exchange(tail, nxt, tail, prev)
            return torch.zeros_like(tail) if got is None else got

        return received.take(receive, keep)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        prev, nxt = _peer(ctx.group, -1), _peer(ctx.group, +1)
        got = _exchange(grad, prev, grad, nxt)
        return (torch.zeros_like(grad) if got is None else got), None, None, None


class _ReceiveState(torch.autograd.Function):
    """The SSM state rank r-1 ended its part with (rank r > 0). ``anchor`` only ties this node into the graph, so
    that backward runs it: it sends the state's gradient back to rank r-1."""

    @staticmethod
    def forward(ctx: Any, anchor: Tensor, like: Tensor, group: Any, received: _Received, keep: bool) -> Tensor:  # type: ignore[override]
        ctx.group = group
        return received.take(lambda: _exchange(None, None, like, _peer(group, -1)), keep)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        _exchange(grad, _peer(ctx.group, -1), grad, None)
        return None, None, None, None, None


class _SendState(torch.autograd.Function):
    """Sends this part's final SSM state to rank r+1; returns a zero to add to the output, so that backward runs
    this node, which receives the state's gradient from rank r+1."""

    @staticmethod
    def forward(ctx: Any, state: Tensor, group: Any) -> Tensor:  # type: ignore[override]
        ctx.group, ctx.shape, ctx.dtype = group, state.shape, state.dtype
        if not _recomputing():
            _exchange(state, _peer(group, +1), state, None)
        return state.new_zeros(())

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        like = grad.new_empty(ctx.shape, dtype=ctx.dtype)
        return _exchange(None, None, like, _peer(ctx.group, +1)), None


class ContextParallelMamba:
    """Mixin over `MambaMixer`: the conv1d's left context and the SSM state come from the previous CP rank."""

    cp_group: Any
    cp_recompute: bool  # whether the block recomputes its forward in backward (activation checkpointing)
    cp_received: dict[str, _Received]  # "conv" and "state", from the previous rank
    d_conv: int
    chunk_size: int
    D: nn.Parameter
    dt_proj: nn.Linear

    def _keep(self) -> bool:
        return self.cp_recompute and torch.is_grad_enabled() and self.training  # type: ignore[attr-defined]

    def _causal_conv(self, x: Tensor, past: Tensor | None = None) -> Tensor:
        tail = x[:, x.shape[1] - (self.d_conv - 1):]
        past = _ShiftForward.apply(tail, self.cp_group, self.cp_received["conv"], self._keep())
        return super()._causal_conv(x, past)  # type: ignore[misc]

    def _scan(self, u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, z: Tensor) -> Tensor:
        group = self.cp_group
        first, last = _peer(group, -1) is None, _peer(group, +1) is None
        like = u.new_empty(u.shape[0], u.shape[1], A.shape[1], dtype=torch.float32)
        h0 = None if first else _ReceiveState.apply(A, like, group, self.cp_received["state"], self._keep())
        y, h_last = selective_scan_chunked(
            u, delta, A, B, C, self.D.float(), z, delta_bias=self.dt_proj.bias.float(), delta_softplus=True,
            chunk_size=self.chunk_size, initial_state=h0, return_final_state=True,
        )
        return y if last else y + _SendState.apply(h_last, group).to(y.dtype)


# ------------------------------------------------------------------------------------------ MoE routing statistics
def _all_reduce_mean(x: Tensor, group: Any) -> Tensor:
    x = x.clone(memory_format=torch.contiguous_format)
    dist.all_reduce(x, group=group)
    return x / dist.get_world_size(group)


class ContextParallelRouting:
    """Mixin over `MoE`: the balancing statistics of whole sequences. The mean goes forward; backward passes the
    gradient through unscaled, since the CP ranks' gradients are averaged afterwards (with the data-parallel ones)."""

    cp_group: Any

    def _routing_stats(self, load: Tensor, mean_probs: Tensor) -> tuple[Tensor, Tensor]:
        both = Collective.apply(torch.cat((load, mean_probs)), self.cp_group, _all_reduce_mean, identity)
        return both[: load.shape[0]], both[load.shape[0]:]


# ------------------------------------------------------------------------------------------ applying it
@functools.cache
def _context_parallel_class(mixin: type, cls: type) -> type:
    return type(f"ContextParallel{cls.__name__}", (mixin, cls), {})


def _switch(module: nn.Module, mixin: type, group: Any) -> None:
    module.__class__ = _context_parallel_class(mixin, type(module))
    module.cp_group = group


def apply_context_parallel(model: nn.Module, group: Any, cp_rank: int, cp: int) -> None:
    """Makes ``model`` (a `model.transformer.Transformer`, possibly already tensor/expert parallel) compute this CP
    rank's part of every sequence, given its part of the tokens (`split_sequence`)."""
    for module in model.modules():
        if isinstance(module, ContextParallelAttention | ContextParallelMamba | ContextParallelRouting):
            raise TypeError(f"{type(module).__name__} is already context-parallel")
    for block in model.layers:
        if isinstance(block.mixer, Attention):
            _switch(block.mixer, ContextParallelAttention, group)
        elif isinstance(block.mixer, MambaMixer):
            _switch(block.mixer, ContextParallelMamba, group)
            block.mixer.cp_recompute = block.activation_checkpointing != "none"
            block.mixer.cp_received = {"conv": _Received(), "state": _Received()}
        if isinstance(block.ffn, MoE):
            _switch(block.ffn, ContextParallelRouting, group)
    base = model.rope_tables

    def rope_tables(seq_len: int, device: torch.device, start: int = 0) -> tuple[Tensor, Tensor] | None:
        return base(seq_len, device, start=start + cp_rank * seq_len)

    model.rope_tables = rope_tables
