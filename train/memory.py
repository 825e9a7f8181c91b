"""Per-rank training memory from the config and the layout alone (no model is built): model states (parameters,
gradients, AdamW states), DeepSpeed's communication buckets, and the activations one micro-batch saves for backward.

Model states follow DeepSpeed 0.19 as this project drives it (torch AdamW, fp32 moments ``exp_avg`` and
``exp_avg_sq``; with bf16 an fp32 master copy of what the rank steps). With ``Ψ`` the elements a rank holds after
tensor, pipeline and expert parallelism and ``S`` its ZeRO partition of them (``Ψ_dense / dp + Ψ_expert / edp``):

    ZeRO   parameters              gradients (held at the step)   moments    master (fp32 copy)
    0      Ψ                       Ψ                               8 Ψ        bf16: 4 Ψ; fp32: none (AdamW steps Ψ)
    1, 2   Ψ                       S (fp32)                        8 S        4 S
    3      S + small params whole  S (fp32)                        8 S        bf16: 4 S; fp32: none

ZeRO 1-2 keep their fp32 partition as a copy even when the parameters are fp32 (DeepSpeed 0.19 clones it), so
"count each storage once" still finds it; ZeRO-3 steps fp32 partitions in place
(`train.engine.zero3_master_weights_shared`).

ZeRO-1 also holds the whole gradient ``Ψ`` during backward, until the reduction at the last micro-batch; that and
the communication buffers alive only during backward are `ModelStates.transient`. Buckets are sized from the
model (`zero_buckets`) and have their own line.

Activations: bytes a micro-batch keeps from forward to backward (what autograd saves, counted once per storage,
parameters excluded), per block kind, with activation checkpointing off ("none"), "full" (a block keeps its input
and runs again in backward: one block's activations come back during backward) or "selective" (a block keeps its
input and the outputs of its matmuls, `model.recompute`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from model.config import ModelConfig
from train.parallel.dims import Layout

PRECISION_BYTES = {"fp32": 4, "bf16": 2}
FP32 = 4
INT64 = 8
DEEPSPEED_ALLREDUCE_ELEMENTS = 500_000_000  # DeepSpeed's ZeRO-0 gradient all-reduce flattens up to this many


# ---------------------------------------------------------------------------------------------- parameters
@dataclass(frozen=True)
class ParamSpec:
    """One parameter of the single-device model and how tensor/expert parallelism splits it."""

    name: str
    numel: int
    split: str  # "tp": 1/tp per TP rank; "replicated": whole on every TP rank; "expert": 1/ep experts, 1/tp hidden


def _split_kind(name: str) -> str:
    """As train/parallel/tp.py and ep.py shard: megatron column/row layers, the vocab-parallel embedding and head,
    Mamba's per-channel tensors are split over TP; norms, the router and row-parallel biases are replicated;
    experts are split over EP and (their hidden size) over TP."""
    if name.endswith(("ffn.w1", "ffn.w2", "ffn.w3")):
        return "expert"
    if "norm" in name or name.endswith(("router.weight", "x_proj.bias", "out_proj.bias")):
        return "replicated"
    return "tp"


def param_specs(cfg: ModelConfig) -> tuple[ParamSpec, ...]:
    """Every parameter of ``Transformer(cfg)`` (a tied head once), from a model built on the meta device."""
    key = repr(cfg)  # the planner's search asks for the same model thousands of times
    if key not in _SPECS:
        from train.parallel.init import single_device_shapes

        shapes = single_device_shapes(cfg)
        _SPECS[key] = tuple(ParamSpec(name, math.prod(shape), _split_kind(name)) for name, shape in shapes.items())
    return _SPECS[key]


_SPECS: dict[str, tuple[ParamSpec, ...]] = {}


def local_numels(cfg: ModelConfig, layout: Layout, names: set[str] | None = None) -> list[tuple[ParamSpec, int]]:
    """(parameter, elements on this rank after TP/EP) for the parameters in ``names`` (a pipeline stage's; None:
    all, which with pp > 1 is divided among the stages as ``1/pp`` of each, an average)."""
    out = []
    for spec in param_specs(cfg):
        if names is not None and spec.name not in names:
            continue
        div = {"tp": layout.tp, "replicated": 1, "expert": layout.tp * layout.ep}[spec.split]
        numel = spec.numel // div
        out.append((spec, numel if names is not None or layout.pp == 1 else numel // layout.pp))
    return out


# ------------------------------------------------------------------------------------------------ buckets
@dataclass(frozen=True)
class ZeroBuckets:
    """DeepSpeed's communication sizes in elements, from the model's width rather than DeepSpeed's defaults (5e8
    elements, meant for billions of parameters: a 2 GB fp32 ZeRO-3 gradient bucket, and every parameter left
    gathered between its forward and backward use)."""

    reduce: int  # gradient reduction bucket (ZeRO 1-3)
    allgather: int  # ZeRO 1/2 parameter all-gather after the step
    prefetch: int  # ZeRO-3 parameters fetched ahead
    persistence_threshold: int  # ZeRO-3 keeps parameters up to this size gathered (norms)
    max_live: int  # ZeRO-3 gathered parameters at most alive; also the reuse distance under which one stays
    sub_group: int  # ZeRO-3 steps its partition this many elements at a time (AdamW's temporaries are this size)

    def deepspeed(self, stage: int) -> dict[str, int]:
        """The ``zero_optimization`` keys for ``stage``."""
        if stage == 0:
            return {}
        keys = {"reduce_bucket_size": self.reduce, "allgather_bucket_size": self.allgather}
        if stage == 3:
            keys |= {"stage3_prefetch_bucket_size": self.prefetch,
                     "stage3_param_persistence_threshold": self.persistence_threshold,
                     "stage3_max_live_parameters": self.max_live, "stage3_max_reuse_distance": self.max_live,
                     "sub_group_size": self.sub_group}
        return keys


def zero_buckets(cfg: ModelConfig) -> ZeroBuckets:
    """``d_model**2`` buckets (at least 2**20 elements, so a tiny model is not reduced in hundreds of pieces) and a
    ``10 * d_model`` persistence threshold, the widths Hugging Face's DeepSpeed integration derives from the hidden
    size; at most one square matrix's worth of parameters gathered beyond the module running."""
    square = max(cfg.d_model**2, 2**20)
    return ZeroBuckets(reduce=square, allgather=square, prefetch=int(0.9 * square),
                       persistence_threshold=10 * cfg.d_model, max_live=square, sub_group=square)


# ------------------------------------------------------------------------------------------- model states
@dataclass(frozen=True)
class ModelStates:
    """Bytes per rank. The first five are held through the step; ``transient`` is alive only inside backward and
    the gradient reduction."""

    parameters: int
    gradients: int  # held at the optimizer step
    optimizer: int  # AdamW moments (exp_avg, exp_avg_sq)
    master: int  # fp32 copy of what the rank steps, where DeepSpeed keeps one apart from the parameters
    buckets: int  # communication buffers kept between steps (ZeRO-3's gradient bucket)
    # ZeRO-0: DeepSpeed's flattened copy of the gradients it all-reduces; ZeRO-1: the unreduced gradients and the
    # reduction bucket; ZeRO-2: the bucket; ZeRO-3: the parameters gathered at once.
    transient: int
    # The optimizer step's temporaries: torch's single-tensor AdamW makes two tensors the size of what it steps at
    # once (sqrt(exp_avg_sq) and the denominator): a parameter (ZeRO-0), the flat partition (ZeRO-1/2), a sub-group
    # (ZeRO-3).
    step: int = 0

    @property
    def held(self) -> int:
        return self.parameters + self.gradients + self.optimizer + self.master + self.buckets

    @property
    def peak(self) -> int:
        return self.held + max(self.transient, self.step)


def model_states(cfg: ModelConfig, layout: Layout, zero_stage: int, precision: str = "fp32",
                 names: set[str] | None = None) -> ModelStates:
    """Per-rank model-state bytes of ``cfg`` under ``layout`` and ``zero_stage``; ``names``: the rank's pipeline
    stage (see `local_numels`)."""
    p_bytes = PRECISION_BYTES[precision]
    params = local_numels(cfg, layout, names)
    local = sum(n for _, n in params)
    if zero_stage == 0:
        return ModelStates(parameters=local * p_bytes, gradients=local * p_bytes, optimizer=2 * FP32 * local,
                           master=FP32 * local if precision == "bf16" else 0, buckets=0,
                           transient=min(local, DEEPSPEED_ALLREDUCE_ELEMENTS) * p_bytes,
                           step=2 * FP32 * max(n for _, n in params))
    # ZeRO partitions over the ranks holding the same parameters: data x context parallel.
    dp = layout.dp_cp
    edp = dp // layout.ep
    expert = sum(n for spec, n in params if spec.split == "expert")
    buckets = zero_buckets(cfg)
    bucket = min(buckets.reduce, local) * p_bytes
    if zero_stage in (1, 2):
        part = math.ceil((local - expert) / dp) + math.ceil(expert / edp)
        return ModelStates(parameters=local * p_bytes, gradients=part * FP32, optimizer=2 * FP32 * part,
                           master=FP32 * part, buckets=0,
                           transient=bucket + (local * p_bytes if zero_stage == 1 else 0), step=2 * FP32 * part)
    if zero_stage != 3:
        raise ValueError(f"zero_stage must be 0-3, got {zero_stage}")
    # ZeRO-3 partitions each parameter on its own (the last rank's piece padded); small ones also stay whole.
    part = sum(math.ceil(n / dp) for _, n in params)
    persistent = sum(n for _, n in params if n <= buckets.persistence_threshold)
    gathered = max(buckets.max_live, max(n for _, n in params))
    return ModelStates(parameters=(part + persistent) * p_bytes, gradients=part * FP32, optimizer=2 * FP32 * part,
                       master=FP32 * part if precision == "bf16" else 0, buckets=min(buckets.reduce, local) * FP32,
                       transient=gathered * p_bytes, step=2 * FP32 * min(part, buckets.sub_group))


# -------------------------------------------------------------------------------------------- activations
@dataclass(frozen=True)
class Activations:
    """Bytes of one micro-batch on this rank."""

    saved: int  # kept from forward to backward
    recomputed: int = 0  # alive again during backward: one block's activations under full checkpointing

    @property
    def peak(self) -> int:
        return self.saved + self.recomputed


def _norm(width: int, a: int) -> int:
    """RMSNorm computed in fp32: its fp32 input, the 1/rms per token and the normalised input in the activation
    dtype (the output is counted where a matmul saves it)."""
    return FP32 * width + FP32 + a * width


def _attention(cfg: ModelConfig, a: int, tp: int) -> int:
    """q (after RoPE), k, v, the output (the o_proj input), the fp32 log-sum-exp per head; SDPA/flash keep these."""
    hd = cfg.resolved_head_dim
    q, kv = cfg.n_heads * hd // tp, cfg.n_kv_heads * hd // tp
    return a * (2 * q + 2 * kv) + FP32 * cfg.n_heads // tp


def _swiglu(hidden: int, a: int) -> int:
    """gate, silu(gate), up and their product (the down_proj input)."""
    return 4 * a * hidden


def _moe(cfg: ModelConfig, a: int, tp: int) -> int:
    """Per token: router probabilities and logits (fp32), z-loss term, the k gathered/renormalised weights and
    per-slot weights, three int64 slot indices, and per slot the gathered input, the expert output before and
    after weighting, and the SwiGLU of the token's share of the expert hidden size."""
    e, k = cfg.num_experts, cfg.top_k
    router = FP32 * (2 * e + 1 + k + (1 if cfg.moe_renormalize else 0) + k) + 3 * INT64 * k
    return router + 3 * a * k * cfg.d_model + k * _swiglu(cfg.ffn_hidden // tp, a)


def _mamba(cfg: ModelConfig, a: int, tp: int, tokens: int) -> int:
    """Per token: in_proj output (conv input and gate), conv input and output and its silu, dt/B/C and their norms,
    delta and its softplus, the scan's inputs and chunk-entering states, the gated output (out_proj input)."""
    di, n, r = cfg.mamba_d_inner // tp, cfg.mamba_d_state, cfg.resolved_dt_rank
    # in_proj out (conv input and gate), the conv's channels-last input and output, silu out (x_proj input)
    projections = a * (2 * di + 2 * di + di + di)
    dt_b_c = sum(_norm(w, a) for w in (r, n, n)) + a * r  # the three norms, dt_proj input
    scan = FP32 * (di + di + di + 2 * n + 2 * di)  # delta, softplus(delta), du, B and C, y and the gated y
    # The scan also keeps the state entering each chunk ([n, di] per mamba_chunk_size tokens) and A = -exp(A_log)
    # twice ([di, n], whatever the tokens).
    states = FP32 * n * di / cfg.mamba_chunk_size + 2 * FP32 * di * n / tokens
    return projections + dt_b_c + scan + round(states)


def _selective(cfg: ModelConfig, layer: int, a: int, tp: int) -> int:
    """Per token under selective checkpointing (`model.recompute`): the outputs of the matmuls, attention and the
    grouped expert GEMM, nothing else. Attention: q, k, v, the attention output and its fp32 log-sum-exp, o_proj.
    Mamba: in_proj (hidden and gate), x_proj (dt, B, C), dt_proj, the scan's output contraction, out_proj. SwiGLU:
    gate, up, down. MoE: the router logits and, per routed slot, the experts' gate, up and down."""
    d, hd = cfg.d_model, cfg.resolved_head_dim
    if cfg.is_attention_layer(layer):
        q, kv = cfg.n_heads * hd // tp, cfg.n_kv_heads * hd // tp
        mixer = a * (2 * q + 2 * kv + d) + FP32 * cfg.n_heads // tp
    else:
        di = cfg.mamba_d_inner // tp
        mixer = a * (2 * di + cfg.resolved_dt_rank + 2 * cfg.mamba_d_state + di + di + d)
    if cfg.is_moe_layer(layer):
        ffn = a * (cfg.num_experts + cfg.top_k * (2 * cfg.ffn_hidden // tp + d))
    else:
        ffn = a * (2 * cfg.ffn_hidden // tp + d)
    return mixer + ffn


def block_activation_bytes(cfg: ModelConfig, layer: int, tokens: int, precision: str = "fp32", tp: int = 1,
                           sp: bool = False, mode: str = "none") -> int:
    """Bytes block ``layer`` saves for backward over ``tokens`` tokens (micro-batch x sequence) with checkpointing
    ``mode`` "none" or "selective" (its input, kept by the caller, excluded). Under TP the split activations are
    1/tp; with sequence parallelism the norms' inputs too."""
    a = PRECISION_BYTES[precision]
    if mode == "selective":
        return _selective(cfg, layer, a, tp) * tokens
    seq_div = tp if sp else 1
    per_token = 2 * _norm(cfg.d_model, a) // seq_div + 2 * a * cfg.d_model  # two norms, mixer and ffn inputs
    if cfg.is_attention_layer(layer):
        per_token += _attention(cfg, a, tp)
    else:
        per_token += _mamba(cfg, a, tp, tokens)
    per_token += _moe(cfg, a, tp) if cfg.is_moe_layer(layer) else _swiglu(cfg.ffn_hidden // tp, a)
    return per_token * tokens


def head_activation_bytes(cfg: ModelConfig, tokens: int, precision: str = "fp32", tp: int = 1) -> int:
    """Final norm, token ids and labels, and the loss: with full logits (``loss_chunk_tokens`` unset) the LM-head
    input and the fp32 log-probabilities over this rank's vocabulary; with the chunked linear cross entropy the
    gradients it computes in forward, fp32, for the head input (per token) and the head weight (once)."""
    a = PRECISION_BYTES[precision]
    per_token = _norm(cfg.d_model, a) + 2 * INT64
    if getattr(cfg, "loss_chunk_tokens", None) is None:
        return tokens * (per_token + a * cfg.d_model + FP32 * cfg.vocab_size // tp)
    return tokens * (per_token + FP32 * cfg.d_model) + FP32 * cfg.vocab_size // tp * cfg.d_model


def activations(cfg: ModelConfig, micro_batch: int, seq_len: int, precision: str = "fp32", tp: int = 1,
                sp: bool = False, layers: range | None = None) -> Activations:
    """One micro-batch on this rank: its blocks (``layers``, default all) and the head. ``cfg.checkpointing_mode``
    "full" / "selective": each block keeps its input (and under selective its matmul outputs); during backward the
    rest of one block's activations is alive again."""
    tokens = micro_batch * seq_len
    layers = range(cfg.n_layers) if layers is None else layers
    blocks = [block_activation_bytes(cfg, i, tokens, precision, tp, sp) for i in layers]
    head = head_activation_bytes(cfg, tokens, precision, tp)
    mode = cfg.checkpointing_mode
    if mode == "none":
        return Activations(saved=sum(blocks) + head)
    block_input = PRECISION_BYTES[precision] * cfg.d_model * tokens // (tp if sp else 1)
    if mode == "full":
        return Activations(saved=len(blocks) * block_input + head, recomputed=max(blocks, default=0))
    # selective: each block keeps its input and its matmul outputs; backward recomputes the rest of one block.
    kept = [block_activation_bytes(cfg, i, tokens, precision, tp, sp, "selective") for i in layers]
    recomputed = max((b - k for b, k in zip(blocks, kept, strict=True)), default=0)
    return Activations(saved=len(blocks) * block_input + sum(kept) + head, recomputed=recomputed)


# ---------------------------------------------------------------------------------------------- the rank
@dataclass(frozen=True)
class RankMemory:
    """What one rank holds at the peak of a step: model states, buckets and one micro-batch's activations."""

    states: ModelStates
    activations: Activations

    @property
    def total(self) -> int:
        states = self.states
        return states.held + max(states.transient + self.activations.peak, states.step)


def rank_memory(cfg: ModelConfig, layout: Layout, zero_stage: int, micro_batch: int, seq_len: int,
                precision: str = "fp32", sp: bool = False) -> RankMemory:
    """Model states and activations of one rank (pipeline stages as an average, see `local_numels`)."""
    layers = None
    if layout.pp > 1:
        per = cfg.n_layers // layout.pp
        layers = range(layout.pp_rank * per, (layout.pp_rank + 1) * per)
    return RankMemory(model_states(cfg, layout, zero_stage, precision),
                      activations(cfg, micro_batch, seq_len // layout.cp, precision, layout.tp, sp, layers))
