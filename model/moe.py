"""Mixture-of-experts feed-forward: top-k softmax router (Mixtral semantics) over SwiGLU experts.

Routing: softmax over experts in float32, top-k selection (optionally on probabilities plus the
aux-loss-free ``expert_bias``), combine weights taken from the unbiased probabilities and
renormalised over the k picks (``moe_renormalize``; Jamba skips it). Losses per layer:

* load balancing: ``E * sum_i f_i * P_i``, f_i the fraction of routed token slots (tokens * k)
  sent to expert i, P_i the mean router probability of expert i. Hugging Face's Mixtral
  ``load_balancing_loss_func`` counts tokens rather than slots, so its value is ``k`` times this.
* router z-loss: ``mean(logsumexp(logits)^2)``.

Experts run on token slots sorted by expert, each on one contiguous slice: dropless by default;
with ``capacity_factor`` each expert keeps its first ``ceil(capacity_factor * tokens * k / E)``
slots in token order and the rest contribute zero (the block's residual carries those tokens).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from model.config import ConfigError, ModelConfig


def _grouped_mm_usable(x: Tensor) -> bool:
    """torch's grouped GEMM: CUDA, bf16, Hopper or newer (its CPU backward fails in torch 2.13)."""
    return (
        hasattr(torch, "_grouped_mm")
        and x.is_cuda
        and x.dtype == torch.bfloat16
        and torch.cuda.get_device_capability(x.device) >= (9, 0)
    )


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
        routed = torch.bincount(slot_expert, minlength=self.num_experts)
        load = routed.float() / slot_expert.numel()
        lb_loss = self.num_experts * (load * probs.mean(dim=0)).sum()
        z_loss = torch.logsumexp(logits, dim=-1).square().mean()

        # Group slots by expert; a stable sort keeps token order inside each group (capacity priority).
        order = torch.argsort(slot_expert, stable=True)
        kept = routed
        capacity = self.capacity(num_tokens)
        if capacity is not None:
            group_start = torch.cumsum(routed, 0) - routed
            rank_in_expert = torch.arange(order.numel(), device=x.device) - group_start[slot_expert[order]]
            order = order[rank_in_expert < capacity]
            kept = routed.clamp(max=capacity)
        dropped_fraction = 1.0 - kept.sum().float() / slot_expert.numel()

        token_of_slot = order // k
        expert_out = self._run_experts(tokens[token_of_slot], kept)
        expert_out = expert_out * weights.reshape(-1)[order].to(x.dtype).unsqueeze(-1)
        y = torch.zeros_like(tokens).index_add_(0, token_of_slot, expert_out)

        self.last_stats = {
            "load": load.detach(),
            "lb_loss": lb_loss.detach(),
            "z_loss": z_loss.detach(),
            "dropped_fraction": dropped_fraction.detach(),
        }
        if self.training and not _recomputing():
            self._load_sum = load.detach() if self._load_sum is None else self._load_sum + load.detach()
            self._load_count += 1
        aux_loss = self.aux_loss_coeff * lb_loss + self.z_loss_coeff * z_loss
        return y.reshape(batch, seq_len, d_model), aux_loss

    def _run_experts(self, grouped: Tensor, counts: Tensor) -> Tensor:
        """The experts on ``grouped`` [sum(counts), D], rows sorted by expert. Expert parallelism replaces this with
        a dispatch to the ranks holding the experts, which then call ``_expert_mlp`` on the rows they receive."""
        return self._expert_mlp(grouped, counts)

    def _expert_mlp(self, rows: Tensor, counts: Tensor) -> Tensor:
        """SwiGLU of each local expert on its contiguous slice of ``rows``."""
        if _grouped_mm_usable(rows):
            offsets = torch.cumsum(counts, 0).to(torch.int32)
            gate = torch._grouped_mm(rows, self.w1.transpose(1, 2), offs=offsets)
            up = torch._grouped_mm(rows, self.w3.transpose(1, 2), offs=offsets)
            return torch._grouped_mm(F.silu(gate) * up, self.w2.transpose(1, 2), offs=offsets)
        # A loop over experts (not tokens): E matmuls on contiguous slices. Empty slices are computed too (no
        # cost): every expert weight stays in the graph, so a rank whose experts got no rows still joins any
        # collective that a parallel wrapper puts around this in backward.
        outputs = []
        for e, part in enumerate(rows.split(counts.tolist())):
            hidden = F.silu(part @ self.w1[e].t()) * (part @ self.w3[e].t())
            outputs.append(hidden @ self.w2[e].t())
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
