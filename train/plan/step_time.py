"""Time of one optimizer step on one rank, from the model, the layout and the cluster.

Compute. Every GEMM of a block is a roofline: the larger of its FLOPs at ``matmul_efficiency`` of peak (on a CPU,
the efficiency measured for GEMMs as thin as its smallest dimension) and the bytes it moves at HBM bandwidth, plus
a kernel's overhead. Attention's score and value products run at
``attention_efficiency`` and, causal, do half of the T x T work. Norms, activations, residuals and the Mamba scan
are memory traffic. Backward costs twice the forward (2.5x for the attention kernel); full recompute adds one
forward, selective the forward of everything but the GEMMs.

Communication, ring algorithms (Thakur et al. 2005, as NCCL and gloo run them), for B bytes over n ranks:
all-reduce ``2 (n-1)/n B / bw + 2 (n-1) latency``; all-gather, reduce-scatter and all-to-all
``(n-1)/n B / bw + (n-1) latency``. Ranks are ordered TP fastest, then DP (EP within it), then PP
(`train.parallel.dims`), so a group of stride ``s`` and size ``n`` stays inside a node when ``s * n`` fits in it
and uses NVLink; otherwise each rank's NIC.

Per micro-batch: tensor parallelism all-reduces the block's output after attention (or the Mamba mixer) and after
the feed-forward, in forward and in backward (with sequence parallelism an all-gather and a reduce-scatter of the
same bytes, one more all-gather of each input in backward and the norm weights' gradient all-reduces: the calls
`train.plan.host.tp_calls` lists) and again in a recomputed forward; expert parallelism sends the routed tokens out and back
(all-to-all) in forward and backward; a pipeline stage sends its output on and receives its gradient back.

Context parallelism: each rank computes a cp-th of every sequence's positions; the attention all-to-alls move q, k,
v and the output (Ulysses), and the Mamba scan runs rank after rank (each part starts from the previous one's
state), so its time does not fall with cp.

Pipeline: 1F1B over ``m`` micro-batches and ``p`` stages takes ``m + p - 1`` slots of one micro-batch's forward,
backward and messages, so ``(p-1)/(m+p-1)`` of it is bubble (Narayanan et al. 2021).

Data parallelism: ZeRO 0-1 reduce the accumulated gradients once per step (ZeRO-1 as a reduce-scatter plus the
parameter all-gather after the step: an all-reduce's volume); DeepSpeed's ZeRO-2 reduce-scatters every micro-batch's
gradients (they are partitioned, so they cannot accumulate unreduced) and gathers the parameters after the step;
ZeRO-3 gathers each parameter for every micro-batch's forward and backward (Rajbhandari et al. 2020) and
reduce-scatters its gradients. With ``overlap_grad_reduce`` a reduction hides behind the backward it follows and
only the rest is exposed; ZeRO-3's traffic hides behind the forward passes (prefetch), not the backward ones, where
gathers and reduce-scatters share the links (on GPU clusters its reduction is charged as one all-reduce per step).
Without ``cluster.overlap_comm`` (a CPU rank: one thread computes and makes every blocking gloo call) nothing hides.
The optimizer step streams the rank's partition of weights, gradients and moments.

Host (`train.plan.host`): each operator the rank dispatches costs ``op_overhead_s``, each collective call
``collective_overhead_s`` beyond its ring time (all-gathers and reduce-scatters move their bytes
``gather_scatter_slowdown`` times slower than the ring), and DeepSpeed's per-parameter work ``zero_param_s`` (ZeRO
1-2) or ``zero3_param_s`` (ZeRO-3) per parameter and micro-batch. They are 0 on GPU clusters, whose host runs ahead
of the kernels, and measured on this machine by `python -m train.plan calibrate`.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from model.config import ModelConfig
from train.memory import PRECISION_BYTES, local_numels, zero_buckets
from train.parallel.dims import Layout
from train.plan import host
from train.plan.cluster import ClusterConfig

ADAMW_BYTES_PER_ELEMENT = 30  # fp32 weight, gradient, two moments read; weight and moments written; bf16 copy
# An unfused attention (Megatron-LM before FlashAttention) writes the scores, and its fused scale-mask-softmax
# and the dropout read and write them again: 6 passes over T x T per head in forward.
UNFUSED_SCORE_PASSES = 6
ELEMENTWISE_PASSES = 12  # d_model-wide reads and writes per token of norms, residuals and RoPE in one block


@dataclass(frozen=True)
class StepTime:
    """Seconds of one step on the slowest rank; ``total`` is the critical path."""

    compute: float  # forward, backward and recompute of all micro-batches
    host: float  # of ``compute``, the host's operator dispatch and DeepSpeed's per-parameter work
    tp_comm: float
    cp_comm: float
    ep_comm: float
    pp_comm: float
    bubble: float
    dp_comm: float  # all of it; ``dp_exposed`` is the part on the critical path
    dp_exposed: float
    optimizer: float
    total: float

    def as_dict(self) -> dict[str, float]:
        return asdict(self)


def all_reduce(nbytes: float, n: int, bw: float, lat: float) -> float:
    return 0.0 if n <= 1 else 2 * (n - 1) / n * nbytes / bw + 2 * (n - 1) * lat


def all_gather(nbytes: float, n: int, bw: float, lat: float) -> float:
    """Also reduce-scatter and all-to-all: each rank sends (n-1)/n of the bytes."""
    return 0.0 if n <= 1 else (n - 1) / n * nbytes / bw + (n - 1) * lat


def pipeline_bubble_fraction(micro_batches: int, stages: int) -> float:
    return (stages - 1) / (micro_batches + stages - 1)


def _link(cluster: ClusterConfig, stride: int, size: int) -> tuple[float, float]:
    if stride * size <= cluster.gpus_per_node:
        return cluster.intra_node_bandwidth, cluster.intra_node_latency_s
    return cluster.inter_node_bandwidth, cluster.inter_node_latency_s


class _Costs:
    """Kernel times on one accelerator of ``cluster`` with ``elem``-byte activations."""

    def __init__(self, cluster: ClusterConfig, elem: int) -> None:
        self.c, self.elem = cluster, elem

    def gemm(self, m: float, n: float, k: float, count: int = 1) -> float:
        c = self.c
        flops = 2 * m * n * k
        moved = self.elem * (m * k + k * n + m * n)
        eff = c.gemm_efficiency(min(m, n, k))
        return count * (max(flops / (c.peak_flops * eff), moved / c.hbm_bandwidth)
                        + c.kernel_overhead_s)

    def memory(self, nbytes: float, kernels: int = 1) -> float:
        return nbytes / self.c.hbm_bandwidth + kernels * self.c.kernel_overhead_s

    def attention(self, flops: float) -> float:
        return flops / (self.c.peak_flops * self.c.attention_efficiency) + self.c.kernel_overhead_s


def _block_forward(cfg: ModelConfig, layer: int, tokens: int, seq_len: int, tp: int, sp: bool, ep: int,
                   k: _Costs, attention_kernel: str = "flash", cp: int = 1) -> tuple[float, float, float]:
    """(GEMM time, attention-kernel time, other time) of one block's forward on one rank, ``tokens`` its positions
    (under context parallelism a cp-th of each sequence: its attention covers all ``seq_len`` positions of a cp-th
    of the heads, the same work)."""
    d, t = cfg.d_model, tokens
    gemm = attn = other = 0.0
    other += k.memory(ELEMENTWISE_PASSES * k.elem * t * d / (tp if sp else 1), kernels=6)
    if cfg.is_attention_layer(layer):
        hd = cfg.resolved_head_dim
        gemm += k.gemm(t, (cfg.n_heads + 2 * cfg.n_kv_heads) * hd / tp, d)
        gemm += k.gemm(t, d, cfg.n_heads * hd / tp)
        if attention_kernel == "flash":
            attn += k.attention(2 * 2 * t * seq_len * cfg.n_heads * hd / tp / 2)  # QK^T and PV, causal half
        else:  # batched GEMMs over the whole T x T matrix, which softmax (and dropout) read and write in HBM
            heads = cfg.n_heads / tp
            attn += k.gemm(seq_len, seq_len, hd, count=int(2 * heads * t / seq_len))
            other += k.memory(UNFUSED_SCORE_PASSES * k.elem * t * seq_len * heads, kernels=3)
    else:
        di = cfg.mamba_d_inner / tp
        gemm += k.gemm(t, 2 * di, d) + k.gemm(t, cfg.resolved_dt_rank + 2 * cfg.mamba_d_state, di)
        gemm += k.gemm(t, di, cfg.resolved_dt_rank) + k.gemm(t, d, di)
        # The scan reads u, delta, z and B, C and writes y per channel; the conv reads d_conv inputs. Under context
        # parallelism each rank's scan starts from the previous rank's final state: the cp parts run one after another.
        other += cp * k.memory(k.elem * t * di * (6 + cfg.mamba_d_conv), kernels=4)
    if cfg.is_moe_layer(layer):
        gemm += k.gemm(t, cfg.num_experts, d)
        rows = t * cfg.top_k  # this rank's experts see top_k rows per token of its EP group, spread evenly
        experts = cfg.num_experts // ep
        gemm += k.gemm(rows, cfg.ffn_hidden / tp, d, 2) + k.gemm(rows, d, cfg.ffn_hidden / tp)
        gemm += (experts - 1) * 3 * k.c.kernel_overhead_s  # grouped GEMMs: one kernel, a tile loop per expert
        other += k.memory(3 * k.elem * rows * cfg.ffn_hidden / tp + 4 * k.elem * rows * d, kernels=6)
    else:
        gemm += k.gemm(t, cfg.ffn_hidden / tp, d, 2) + k.gemm(t, d, cfg.ffn_hidden / tp)
        other += k.memory(3 * k.elem * t * cfg.ffn_hidden / tp, kernels=2)
    return gemm, attn, other


def _collective(kind: str, nbytes: float, n: int, bw: float, lat: float, c: ClusterConfig, calls: int = 1) -> float:
    """One collective of ``nbytes`` issued in ``calls`` calls, each paying the host's call overhead."""
    if n <= 1:
        return 0.0
    if kind == "all_reduce":
        return calls * c.collective_overhead_s + all_reduce(nbytes, n, bw, lat)
    return calls * c.collective_overhead_s + all_gather(nbytes * c.gather_scatter_slowdown, n, bw, lat)


def step_time(cfg: ModelConfig, layout: Layout, cluster: ClusterConfig, *, zero_stage: int, micro_batch: int,
              seq_len: int, global_batch: int, sp: bool, overlap_grad_reduce: bool = True,
              attention_kernel: str = "flash") -> StepTime:
    elem = PRECISION_BYTES[cluster.precision]
    k = _Costs(cluster, elem)
    tp, pp, dp, ep, cp = layout.tp, layout.pp, layout.dp, layout.ep, layout.cp
    tokens = micro_batch * seq_len // cp
    micro_batches = global_batch // (micro_batch * dp)
    per_stage = cfg.n_layers / pp
    layers = range(cfg.n_layers)
    call = cluster.collective_overhead_s

    parts = [_block_forward(cfg, i, tokens, seq_len, tp, sp, ep, k, attention_kernel, cp) for i in layers]
    gemm = sum(p[0] for p in parts) / pp
    attn = sum(p[1] for p in parts) / pp
    other = sum(p[2] for p in parts) / pp
    # The last stage also runs the LM head and its loss (the first only an embedding gather): it sets the pace.
    head = k.gemm(tokens, cfg.vocab_size / tp, cfg.d_model) + k.memory(3 * 4 * tokens * cfg.vocab_size / tp)
    forward = gemm + attn + other + head
    backward = 2 * (gemm + other + head) + (2.5 if attention_kernel == "flash" else 2) * attn
    mode = cfg.checkpointing_mode
    recompute = {"none": 0.0, "full": forward - head, "selective": attn + other}[mode]

    # Host: every operator the stage dispatches (recomputation counted in backward), serial with the kernels where
    # the host is the device; DeepSpeed's per-parameter work in every micro-batch.
    ops = [host.block_ops(cfg, i, seq_len // cp, micro_batch, tp) for i in layers]
    out_fwd, out_bwd = host.outside_ops(cfg, tokens)
    stepped = local_numels(cfg, layout)
    n_params = len(stepped) / pp
    host_fwd = cluster.op_overhead_s * (sum(o[0] for o in ops) / pp + out_fwd)
    host_bwd = cluster.op_overhead_s * (sum(o[1] for o in ops) / pp + out_bwd + host.GUARD_OPS_PER_PARAM * n_params)
    if zero_stage == 3:  # parameters up to the persistence threshold stay gathered (norms)
        threshold = zero_buckets(cfg).persistence_threshold
        zero_host = cluster.zero3_param_s * sum(n > threshold for _, n in stepped) / pp
    else:
        zero_host = cluster.zero_param_s * n_params if zero_stage in (1, 2) else 0.0
    forward += host_fwd
    backward += host_bwd + zero_host

    # Tensor parallelism: the collectives train/parallel/tp.py issues per block and outside the blocks.
    tp_bw, tp_lat = _link(cluster, 1, tp)
    act = elem * tokens * cfg.d_model
    sizes = {"act": act, "small": elem * cfg.d_model, "tokens": 4.0 * tokens}
    if cfg.family == "hybrid":
        sizes["mamba"] = elem * tokens * (cfg.resolved_dt_rank + 2 * cfg.mamba_d_state)
    tp_blocks = sum(_collective(kind, sizes[size], tp, tp_bw, tp_lat, cluster)
                    for i in layers for kind, size in host.tp_calls(cfg, i, sp, mode == "full"))
    tp_comm = tp_blocks / pp + sum(_collective(kind, sizes[size], tp, tp_bw, tp_lat, cluster)
                                   for kind, size in host.tp_outside_calls(sp))

    # Context parallelism: four all-to-alls of q, k, v and the output per attention layer in forward, four in
    # backward (and in a recomputed forward); the Mamba hand-offs are one small message each (latency).
    cp_bw, cp_lat = _link(cluster, tp, cp)
    attention_layers = sum(cfg.is_attention_layer(i) for i in layers) / pp
    mamba_layers = per_stage - attention_layers
    kv_heads = cfg.n_kv_heads if (cfg.n_kv_heads // max(1, tp)) % cp == 0 else cfg.n_heads
    qkvo = elem * tokens * cfg.resolved_head_dim * (2 * cfg.n_heads + 2 * kv_heads) / tp
    cp_calls = attention_layers * (8 + (4 if mode == "full" else 0)) + mamba_layers * 4
    cp_per_micro = 0.0 if cp == 1 else (
        attention_layers * (2 + (1 if mode == "full" else 0)) * _collective("all_to_all", qkvo, cp, cp_bw, cp_lat,
                                                                               cluster, calls=0)
        + mamba_layers * 4 * cp_lat + cp_calls * call)

    ep_bw, ep_lat = _link(cluster, tp, ep)
    moe_layers = sum(cfg.is_moe_layer(i) for i in layers) / pp
    ep_comm = moe_layers * 4 * _collective("all_to_all", elem * tokens * cfg.top_k * cfg.d_model, ep, ep_bw,
                                           ep_lat, cluster)

    pp_bw, pp_lat = _link(cluster, tp * cp * dp, pp)
    p2p = 0.0 if pp == 1 else 2 * (act / (tp if sp else 1) / pp_bw + pp_lat + call)

    slot = forward + backward + recompute + tp_comm + cp_per_micro + ep_comm + p2p
    pipeline = (micro_batches + pp - 1) * slot

    # Gradients (and ZeRO's parameter traffic) over the data x context parallel group; experts over their smaller
    # group (expert and context parallelism do not combine).
    expert = sum(n for s, n in stepped if s.split == "expert")
    dense = sum(n for _, n in stepped) - expert
    dp_bw, dp_lat = _link(cluster, tp, dp * cp)
    edp = dp // ep
    edp_bw, edp_lat = _link(cluster, tp * ep, edp)

    def dp_op(kind: str, count: float = 1.0) -> float:  # one collective of every parameter, in buckets
        calls = math.ceil(dense / zero_buckets(cfg).reduce) if zero_stage else 1
        return count * (_collective(kind, elem * dense, dp * cp, dp_bw, dp_lat, cluster, calls)
                        + _collective(kind, elem * expert, edp, edp_bw, edp_lat, cluster))

    if zero_stage <= 1:  # one reduction of the accumulated gradients per step (ZeRO-1 then gathers: same volume)
        per_micro, per_step = 0.0, dp_op("all_reduce")
    elif zero_stage == 2:  # DeepSpeed reduce-scatters every micro-batch's gradients, gathers after the step
        per_micro, per_step = dp_op("reduce_scatter"), dp_op("all_gather")
    elif cluster.overlap_comm:
        # Gathers for forward and for backward every micro-batch; the gradient reduction charged as one all-reduce
        # per step, as this model always has for GPU clusters (its published ZeRO-3 rows are held to it).
        per_micro, per_step = dp_op("all_gather", 2), dp_op("all_reduce")
    else:  # gathers for forward and for backward, reduce-scatter, every micro-batch
        per_micro, per_step = dp_op("all_gather", 2) + dp_op("reduce_scatter"), 0.0
    dp_total = micro_batches * per_micro + per_step
    if not cluster.overlap_comm:  # one thread per rank makes every blocking call: nothing hides
        dp_exposed = dp_total
    elif zero_stage == 3:
        # Prefetching hides the gathers behind the forward passes; in backward the gathers and the gradient
        # reduce-scatters share the links and wait on each other.
        dp_exposed = max(0.0, dp_total - max(backward if overlap_grad_reduce and pp == 1 else 0.0,
                                             micro_batches * forward))
    elif zero_stage == 2:  # each micro-batch's reduce-scatter behind its backward; the gather after the step
        dp_exposed = micro_batches * max(0.0, per_micro - (backward if overlap_grad_reduce else 0.0)) + per_step
    else:
        # DeepSpeed's pipeline engine reduces gradients after the last backward of the schedule (ReduceGrads).
        dp_exposed = max(0.0, per_step - (backward if overlap_grad_reduce and pp == 1 else 0.0))

    shard = dp * cp if zero_stage >= 1 else 1
    optimizer = k.memory(ADAMW_BYTES_PER_ELEMENT * (dense / shard + expert / (edp if zero_stage >= 1 else 1)),
                         kernels=12)
    total = pipeline + dp_exposed + optimizer
    return StepTime(
        compute=micro_batches * (forward + backward + recompute),
        host=micro_batches * (host_fwd + host_bwd + zero_host), tp_comm=micro_batches * tp_comm,
        cp_comm=micro_batches * cp_per_micro, ep_comm=micro_batches * ep_comm, pp_comm=micro_batches * p2p,
        bubble=(pp - 1) * slot, dp_comm=dp_total, dp_exposed=dp_exposed, optimizer=optimizer, total=total,
    )
