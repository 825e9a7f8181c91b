"""Mixture-of-experts feed-forward: top-k softmax router (Mixtral semantics) over SwiGLU experts.

Routing: softmax over experts in float32, top-k selection (optionally on probabilities plus the
aux-loss-free ``expert_bias``), combine weights taken from the unbiased probabilities and
renormalised over the k picks (``moe_renormalize``; Jamba skips it). Losses per layer:

* load balancing: ``E * sum_i f_i * P_i``, f_i the fraction of routed token slots (tokens * k)
  sent to expert i, P_i the mean router probability of expert i. Hugging Face's Mixtral
  ``load_balancing_loss_func`` counts tokens rather than slots, so its value is ``k`` times this.
* router z-loss: ``mean(logsumexp(logits)^2)``.

Experts run on token slots sorted by expert, each on one contiguous slice: dropless by default; with
``capacity_factor`` each expert keeps its first ``ceil(capacity_factor * tokens * k / E)`` slots in token order and
the rest contribute zero (the block's residual carries those tokens; they are sorted behind every expert's slots).
All experts run as one grouped GEMM per projection (``torch._grouped_mm``) wherever torch has one for the device and
dtype; no shape depends on the routing, so there neither forward nor backward reads anything back to the host.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.flop_counter import flop_registry, register_flop_formula

from model.config import ConfigError, ModelConfig


def _grouped_mm_usable(rows: Tensor, *weights: Tensor) -> bool:
    """Whether ``torch._grouped_mm`` takes ``rows`` [S, D] against ``weights`` [E, *, D] in ``rows``' dtype.

    CUDA: bf16 on Hopper or newer. CPU (torch 2.13): fp32 / bf16 / fp16, forward and backward, when every row is a
    multiple of 16 bytes; torch's shape function for compilation accepts bf16 only, so compiled fp32 takes the loop.
    """
    if not hasattr(torch, "_grouped_mm") or any(w.dtype != rows.dtype for w in weights):
        return False
    if rows.is_cuda:
        return rows.dtype == torch.bfloat16 and torch.cuda.get_device_capability(rows.device) >= (9, 0)
    if rows.device.type != "cpu" or rows.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        return False
    if rows.dtype != torch.bfloat16 and torch.compiler.is_compiling():
        return False
    per_16_bytes = 16 // rows.element_size()
    return all(w.shape[1] % per_16_bytes == 0 and w.shape[2] % per_16_bytes == 0 for w in weights)


if torch.ops.aten._grouped_mm not in flop_registry:  # torch 2.13's FLOP counter would count the experts as free

    @register_flop_formula(torch.ops.aten._grouped_mm)
    def _grouped_mm_flops(a_shape: tuple[int, ...], b_shape: tuple[int, ...], *args, **kwargs) -> int:
        """2 x multiply-adds of all groups together: [M, K] x [G, K, N], [M, K] x [K, N] split along K, or a bmm."""
        if len(a_shape) == 3 and len(b_shape) == 2:  # [G, M, K] x [K, N] split along N
            return 2 * a_shape[1] * a_shape[2] * b_shape[1]
        return 2 * math.prod(a_shape) * b_shape[-1]


def _recomputing() -> bool:
    """Whether this forward runs inside a backward pass (activation checkpointing recomputes the block there):
    its statistics were already counted by the original forward."""
    return torch._C._current_graph_task_id() != -1


class MoE(nn.Module):
    """Sparse SwiGLU mixture of experts. ``forward(x [B, T, D]) -> (y [B, T, D], aux_loss 0-dim)``.

    Parameters (HF Mixtral names in brackets): ``router`` [E, D] (``block_sparse_moe.gate``),
    ``w1`` / ``w3`` [E, ffn_hidden, D] gate / up projections (``experts.{e}.w1`` / ``w3``),
    ``w2`` [E, D, ffn_hidden] down projection (``experts.{e}.w2``); buffer ``expert_bias`` [E].
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        if cfg.num_experts < 2:
            raise ConfigError("model.num_experts", f"a MoE layer needs at least 2 experts, got {cfg.num_experts}")
        if not 1 <= cfg.top_k <= cfg.num_experts:
            raise ConfigError("model.top_k", f"must be in [1, num_experts={cfg.num_experts}], got {cfg.top_k}")
        if cfg.capacity_factor is not None and cfg.capacity_factor <= 0:
            raise ConfigError(
                "model.capacity_factor", f"must be positive or null (dropless), got {cfg.capacity_factor}"
            )
        if cfg.aux_free_bias_rate < 0:
            raise ConfigError("model.aux_free_bias_rate", f"must be >= 0 (0 disables), got {cfg.aux_free_bias_rate}")
        self.num_experts = cfg.num_experts
        self.top_k = cfg.top_k
        self.renormalize = cfg.moe_renormalize
        self.aux_loss_coeff = cfg.aux_loss_coeff
        self.z_loss_coeff = cfg.z_loss_coeff
        self.capacity_factor = cfg.capacity_factor
        self.bias_rate = cfg.aux_free_bias_rate
        self.init_std = cfg.init_std

        self.router = nn.Linear(cfg.d_model, cfg.num_experts, bias=False)
        self.w1 = nn.Parameter(torch.empty(cfg.num_experts, cfg.ffn_hidden, cfg.d_model))
        self.w3 = nn.Parameter(torch.empty(cfg.num_experts, cfg.ffn_hidden, cfg.d_model))
        self.w2 = nn.Parameter(torch.empty(cfg.num_experts, cfg.d_model, cfg.ffn_hidden))
        # Saved with checkpoints: the learned selection offsets are part of the model's routing.
        self.register_buffer("expert_bias", torch.zeros(cfg.num_experts), persistent=True)
        self.last_stats: dict[str, Tensor] = {}  # statistics of the last forward
        self._load_sum: Tensor | None = None  # summed over the training forwards since `pop_step_load`
        self._load_count = 0
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        for w in (self.router.weight, self.w1, self.w3, self.w2):
            nn.init.normal_(w, 0.0, self.init_std)
        self.expert_bias.zero_()

    def capacity(self, num_tokens: int) -> int | None:
        """Token slots each expert keeps in a forward over ``num_tokens`` tokens (None = dropless)."""
        if self.capacity_factor is None:
            return None
        return math.ceil(self.capacity_factor * num_tokens * self.top_k / self.num_experts)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        if x.dim() != 3:
            raise ValueError(f"MoE expects [batch, seq, d_model], got shape {tuple(x.shape)}")
        batch, seq_len, d_model = x.shape
        tokens = x.reshape(-1, d_model)
        num_tokens, k = tokens.shape[0], self.top_k

        logits = self.router(tokens)
        logits = logits.to(torch.promote_types(logits.dtype, torch.float32))  # routing in >= fp32
        probs = F.softmax(logits, dim=-1)
        # The bias steers which experts are picked, never how much they weigh.
        _, experts = torch.topk(probs.detach() + self.expert_bias, k, dim=-1)  # [N, k]
        weights = probs.gather(-1, experts)
        if self.renormalize:
            weights = weights / weights.sum(dim=-1, keepdim=True)

        slot_expert = experts.reshape(-1)  # slot s = token s // k, its (s % k)-th choice: token order
        num_slots = slot_expert.numel()
        # Counted by scatter rather than bincount, which reads the largest index back to the host on CUDA.
        routed = slot_expert.new_zeros(self.num_experts).index_add_(0, slot_expert, torch.ones_like(slot_expert))
        load, mean_probs = self._routing_stats(routed.float() / num_slots, probs.mean(dim=0))
        lb_loss = self.num_experts * (load * mean_probs).sum()
        z_loss = torch.logsumexp(logits, dim=-1).square().mean()

        # Group slots by expert; a stable sort keeps token order inside each group (capacity priority).
        order = torch.argsort(slot_expert, stable=True)
        kept = routed
        capacity = self.capacity(num_tokens)
        if capacity is not None:
            sorted_expert = slot_expert[order]
            group_start = torch.cumsum(routed, 0) - routed
            rank_in_expert = torch.arange(num_slots, device=x.device) - group_start[sorted_expert]
            # Dropped slots move behind every expert's rows (key E), so all shapes stay fixed (no host sync).
            overflow = torch.where(rank_in_expert < capacity, sorted_expert, self.num_experts)
            order = order[torch.argsort(overflow, stable=True)]
            kept = routed.clamp(max=capacity)
        dropped_fraction = 1.0 - kept.sum().float() / num_slots

        token_of_slot = order // k
        grouped = tokens.index_select(0, token_of_slot)
        if capacity is not None:  # the experts leave the outputs and input gradients of dropped rows unspecified
            dropped = (torch.arange(num_slots, device=x.device) >= kept.sum()).unsqueeze(-1)
            grouped = grouped.masked_fill(dropped, 0.0)
        expert_out = self._run_experts(grouped, kept)
        if capacity is not None:
            expert_out = expert_out.masked_fill(dropped, 0.0)
        expert_out = expert_out * weights.reshape(-1)[order].to(x.dtype).unsqueeze(-1)
        y = torch.zeros_like(tokens).index_add_(0, token_of_slot, expert_out)

        self.last_stats = {
            "load": load.detach(),
            "lb_loss": lb_loss.detach(),
            "z_loss": z_loss.detach(),
            "dropped_fraction": dropped_fraction.detach(),
        }
        if self.training:
            self._accumulate_load(load.detach())
        aux_loss = self.aux_loss_coeff * lb_loss + self.z_loss_coeff * z_loss
        return y.reshape(batch, seq_len, d_model), aux_loss

    def _routing_stats(self, load: Tensor, mean_probs: Tensor) -> tuple[Tensor, Tensor]:
        """The fraction of slots per expert and the mean router probability over the sequence, from this forward's
        tokens. A context-parallel wrapper, whose forward sees only part of each sequence, averages them over the
        other parts, so the balancing loss is the one of whole sequences."""
        return load, mean_probs

    @torch.compiler.disable
    def _accumulate_load(self, load: Tensor) -> None:
        """Adds a training forward's load to the step's sum. Python bookkeeping, kept out of torch.compile's graphs:
        the counter would be a constant there and recompile the block every step."""
        if not _recomputing():
            self._load_sum = load if self._load_sum is None else self._load_sum + load
            self._load_count += 1

    def _run_experts(self, grouped: Tensor, counts: Tensor) -> Tensor:
        """The experts on ``grouped`` [S, D], rows sorted by expert: expert e's ``counts[e]`` rows follow expert
        e-1's; rows past ``counts.sum()`` (slots over capacity) are dropped, their outputs and gradients unspecified.
        Expert parallelism replaces this with a dispatch to the ranks holding the experts, which then call
        ``_expert_mlp`` on the rows they receive."""
        return self._expert_mlp(grouped, counts)

    def _expert_mlp(self, rows: Tensor, counts: Tensor) -> Tensor:
        """SwiGLU of each local expert on its contiguous slice of ``rows`` (``counts``: int64 rows per expert; rows
        past ``counts.sum()`` are not computed, their outputs and gradients unspecified). Every expert weight stays
        in the graph, empty slices included, so a rank whose experts got no rows still joins any collective that a
        parallel wrapper puts around this in backward."""
        if torch.is_autocast_enabled(rows.device.type):  # what nn.Linear experts would compute in
            dtype = torch.get_autocast_dtype(rows.device.type)
            rows, w1, w3, w2 = (t.to(dtype) for t in (rows, self.w1, self.w3, self.w2))
        else:
            w1, w3, w2 = self.w1, self.w3, self.w2
        if _grouped_mm_usable(rows, w1, w3, w2):
            # One grouped GEMM per projection over all experts: no per-expert Python and no host sync.
            offsets = torch.cumsum(counts, 0, dtype=torch.int32)
            gate = torch._grouped_mm(rows, w1.transpose(1, 2), offs=offsets)
            up = torch._grouped_mm(rows, w3.transpose(1, 2), offs=offsets)
            return torch._grouped_mm(F.silu(gate) * up, w2.transpose(1, 2), offs=offsets)
        # Where torch has no grouped GEMM (float64, CUDA before Hopper, odd sizes): one matmul per expert, which
        # reads the counts on the host. unbind: one gradient per weight, not one zero-filled copy per expert.
        split = counts.tolist()
        outputs = []
        for part, gate_e, up_e, down_e in zip(rows[: sum(split)].split(split), w1.unbind(), w3.unbind(), w2.unbind()):
            outputs.append((F.silu(part @ gate_e.t()) * (part @ up_e.t())) @ down_e.t())
        outputs.append(rows.new_zeros(rows.shape[0] - sum(split), w2.shape[1]))
        return torch.cat(outputs)

    def pop_step_load(self) -> Tensor | None:
        """Mean expert load over the training forwards since the last call (all micro-batches of a step), or
        None if there were none; resets the accumulator."""
        if self._load_sum is None:
            return None
        load = self._load_sum / self._load_count
        self._load_sum, self._load_count = None, 0
        return load

    @torch.no_grad()
    def update_bias(self, load: Tensor) -> None:
        """Aux-loss-free balancing step: raise the selection bias of under-loaded experts, lower the
        over-loaded ones, by ``aux_free_bias_rate`` each (no-op when the rate is 0)."""
        if self.bias_rate == 0:
            return
        if load.shape != self.expert_bias.shape:
            raise ValueError(f"update_bias: load must have shape [{self.num_experts}], got {tuple(load.shape)}")
        load = load.to(self.expert_bias)
        self.expert_bias += self.bias_rate * torch.sign(load.mean() - load)
