"""Analytic parameter counts and training FLOPs per token, for MFU and scaling laws.

Everything is computed from the config alone (no model is built), so a scaling ladder can be planned
before anything is allocated. The counts mirror the modules in ``model/`` exactly; tests check them
against built models and against ``torch.utils.flop_counter``.
"""

from __future__ import annotations

from model.config import ModelConfig


def _attention_params(cfg: ModelConfig) -> int:
    q_dim = cfg.n_heads * cfg.resolved_head_dim
    kv_dim = cfg.n_kv_heads * cfg.resolved_head_dim
    return cfg.d_model * q_dim + 2 * cfg.d_model * kv_dim + q_dim * cfg.d_model


def _mamba_matmul_params(cfg: ModelConfig) -> int:
    """Weights of the Mamba mixer's dense projections (in_proj, x_proj, dt_proj, out_proj), biases excluded."""
    d, di, n, r = cfg.d_model, cfg.mamba_d_inner, cfg.mamba_d_state, cfg.resolved_dt_rank
    return d * 2 * di + di * (r + 2 * n) + r * di + di * d


def _mamba_params(cfg: ModelConfig) -> int:
    """All Mamba mixer parameters, laid out as HF's JambaMambaMixer (which model/mamba.py mirrors)."""
    d, di, n, r, k = cfg.d_model, cfg.mamba_d_inner, cfg.mamba_d_state, cfg.resolved_dt_rank, cfg.mamba_d_conv
    params = _mamba_matmul_params(cfg)
    params += di * k + (di if cfg.mamba_conv_bias else 0)  # depthwise conv1d
    params += di  # dt_proj bias
    params += (2 * di + d) if cfg.mamba_proj_bias else 0  # in_proj / out_proj biases
    params += di * n + di  # A_log, D
    params += r + 2 * n  # dt / B / C RMSNorm weights
    return params


def _ffn_params(cfg: ModelConfig, moe: bool, active: bool) -> int:
    expert = 3 * cfg.d_model * cfg.ffn_hidden
    if not moe:
        return expert
    experts = cfg.top_k if active else cfg.num_experts
    return cfg.d_model * cfg.num_experts + experts * expert  # router + experts


def param_counts(cfg: ModelConfig) -> dict[str, int]:
    """Parameter counts of :class:`model.transformer.Transformer` built from ``cfg``.

    Keys: ``total``; ``active`` (per token: only ``top_k`` of ``num_experts`` experts count in MoE layers);
    ``embedding`` (the input embedding table, V*D; with tied embeddings the LM head is this same tensor);
    ``nonembedding`` = total - embedding; ``active_nonembedding`` = active - embedding.
    An untied LM head counts as non-embedding: it is a matmul every token pays for.
    """
    embedding = cfg.vocab_size * cfg.d_model
    head = 0 if cfg.tie_embeddings else embedding
    total = active = embedding + head + cfg.d_model  # + final norm
    for i in range(cfg.n_layers):
        layer = 2 * cfg.d_model  # two RMSNorms
        layer += _attention_params(cfg) if cfg.is_attention_layer(i) else _mamba_params(cfg)
        moe = cfg.is_moe_layer(i)
        total += layer + _ffn_params(cfg, moe, active=False)
        active += layer + _ffn_params(cfg, moe, active=True)
    return {
        "total": total,
        "active": active,
        "embedding": embedding,
        "nonembedding": total - embedding,
        "active_nonembedding": active - embedding,
    }


def matmul_params_per_token(cfg: ModelConfig) -> int:
    """Weights each token multiplies with (dense projections, router, ``top_k`` experts, LM head).

    Excludes the embedding lookup (a gather), norms, biases and the Mamba mixer's elementwise parameters.
    """
    count = cfg.vocab_size * cfg.d_model  # LM head, tied or not
    for i in range(cfg.n_layers):
        count += _attention_params(cfg) if cfg.is_attention_layer(i) else _mamba_matmul_params(cfg)
        count += _ffn_params(cfg, cfg.is_moe_layer(i), active=True)
    return count


def mamba_scan_flops_per_token(cfg: ModelConfig) -> int:
    """Forward FLOPs per token of one Mamba mixer's non-matmul work (selective scan + causal conv).

    Count used, per token: for each of ``d_inner * d_state`` state entries 8 FLOPs (delta*A and its exp: 2;
    delta*B*u: 2; state update dA*x + dBu: 2; the output contraction with C: 2), plus per channel
    ``2 * d_conv`` for the depthwise conv and 2 for the ``D * u`` skip connection. Gating, softplus and
    the small RMSNorms are left out (a few FLOPs per channel).
    """
    di = cfg.mamba_d_inner
    return 8 * di * cfg.mamba_d_state + 2 * cfg.mamba_d_conv * di + 2 * di


def flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """Training (forward + backward) FLOPs per token at sequence length ``seq_len``.

    ``6 * matmul_params_per_token(cfg)`` (2 forward + 4 backward per weight, ``top_k`` experts and the router
    in MoE layers, the LM head included, the embedding lookup excluded)
    ``+ 12 * n_attention_layers * seq_len * n_heads * head_dim`` for the attention scores and values: the
    standard non-halved count of PaLM (Chowdhery et al., 2022, appendix B) and Chinchilla, which charges the
    full T x T score matrix even though causal masking could skip half of it
    ``+ 3 * n_mamba_layers * mamba_scan_flops_per_token(cfg)`` (backward taken as twice the forward).
    """
    if seq_len <= 0:
        raise ValueError(f"seq_len must be positive, got {seq_len}")
    n_attn = sum(cfg.is_attention_layer(i) for i in range(cfg.n_layers))
    n_mamba = cfg.n_layers - n_attn
    attention = 12 * n_attn * seq_len * cfg.n_heads * cfg.resolved_head_dim
    return float(6 * matmul_params_per_token(cfg) + attention + 3 * n_mamba * mamba_scan_flops_per_token(cfg))
