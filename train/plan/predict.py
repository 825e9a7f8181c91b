"""One prediction: per-rank memory and step time of a validated run config on a cluster."""

from __future__ import annotations

import itertools
from dataclasses import dataclass, replace
from typing import Any

from model.config import ConfigError, ModelConfig
from model.flops import flops_per_token, param_counts
from train.config import ParallelConfig, TrainConfig
from train.memory import activations, model_states
from train.parallel.dims import Layout, validate_layout
from train.plan.cluster import ClusterConfig
from train.plan.step_time import StepTime, pipeline_bubble_fraction, step_time

GB = 2**30


@dataclass(frozen=True)
class Prediction:
    layout: Layout
    zero_stage: int
    sp: bool
    micro_batch: int
    micro_batches: int
    recompute: str
    memory: dict[str, float]  # GB per rank, by kind
    memory_per_gpu_gb: float
    fits: bool
    time: StepTime
    tokens_per_s_per_gpu: float
    mfu: float

    @property
    def step_time_s(self) -> float:
        return self.time.total

    def as_json(self) -> dict[str, Any]:
        lay = self.layout
        return {
            "layout": {"tp": lay.tp, "pp": lay.pp, "dp": lay.dp, "ep": lay.ep, "cp": lay.cp, "zero_stage": self.zero_stage,
                       "sequence_parallel": self.sp},
            "micro_batch_size": self.micro_batch, "micro_batches": self.micro_batches,
            "activation_checkpointing": self.recompute,
            "memory_per_gpu_gb": self.memory_per_gpu_gb, "memory_gb": self.memory, "fits": self.fits,
            "step_time_s": self.time.total, "step_time_breakdown_s": self.time.as_dict(),
            "tokens_per_s_per_gpu": self.tokens_per_s_per_gpu, "mfu": self.mfu,
        }


def predict(model: ModelConfig, parallel: ParallelConfig, cluster: ClusterConfig, *, seq_len: int,
            micro_batch: int, global_batch: int, overlap_grad_reduce: bool = True,
            attention_kernel: str = "flash") -> Prediction:
    """Raises ConfigError (naming the key) for a layout the trainer would refuse."""
    world = cluster.world_size
    layout = validate_layout(parallel, model, world)
    sp = parallel.sp
    precision = cluster.precision
    micro_batches = global_batch // (micro_batch * layout.dp)
    states = model_states(model, layout, parallel.zero_stage, precision)
    # 1F1B: the first stage holds the activations of min(p, m) micro-batches at its peak.
    in_flight = min(layout.pp, micro_batches)
    per_stage = model.n_layers // layout.pp
    local_seq = seq_len // layout.cp  # context parallelism: each rank holds a cp-th of every sequence
    act = activations(model, micro_batch, local_seq, precision, layout.tp, sp, range(per_stage))
    memory_bytes = {
        "parameters": states.parameters, "gradients": states.gradients, "optimizer": states.optimizer + states.master,
        "activations": in_flight * act.saved + act.recomputed,
        "communication": states.buckets + max(states.transient, states.step),
    }
    for mode in ("none", "full", "selective"):
        other = activations(replace(model, activation_checkpointing=mode), micro_batch, local_seq, precision,
                            layout.tp, sp, range(per_stage))
        memory_bytes[f"activations_{mode}"] = in_flight * other.saved + other.recomputed
    total = states.held + max(states.transient, states.step) + memory_bytes["activations"]
    time = step_time(model, layout, cluster, zero_stage=parallel.zero_stage, micro_batch=micro_batch,
                     seq_len=seq_len, global_batch=global_batch, sp=sp, overlap_grad_reduce=overlap_grad_reduce,
                     attention_kernel=attention_kernel)
    tokens_per_s = global_batch * seq_len / time.total / world
    return Prediction(
        layout=layout, zero_stage=parallel.zero_stage, sp=sp, micro_batch=micro_batch, micro_batches=micro_batches,
        recompute=model.checkpointing_mode, memory={k: v / GB for k, v in memory_bytes.items()},
        memory_per_gpu_gb=total / GB, fits=total <= cluster.usable_memory, time=time,
        tokens_per_s_per_gpu=tokens_per_s, mfu=tokens_per_s * flops_per_token(model, seq_len) / cluster.peak_flops,
    )


def describe(model: ModelConfig, p: Prediction, cluster: ClusterConfig, seq_len: int, global_batch: int) -> str:
    """The table `python -m train.plan` prints."""
    lay, t = p.layout, p.time
    counts = param_counts(model)
    lines = [
        (f"model {model.name}: {counts['total'] / 1e9:.3g}B params ({counts['active'] / 1e9:.3g}B active) | "
        f"cluster {cluster.name}: {cluster.nodes} x {cluster.gpus_per_node} = {cluster.world_size} | "
        f"{cluster.precision}"),
        (f"layout tp {lay.tp} cp {lay.cp} pp {lay.pp} dp {lay.dp} ep {lay.ep} | ZeRO-{p.zero_stage} | sp {p.sp} | "
        f"micro-batch {p.micro_batch} x {p.micro_batches} | global batch {global_batch} x {seq_len} | "
        f"recompute {p.recompute}"),
        "",
        "memory per GPU (GB)",
    ]
    m = p.memory
    for key in ("parameters", "gradients", "optimizer", "activations", "communication"):
        lines.append(f"  {key:<14} {m[key]:9.2f}")
    lines.append(f"  {'activations by recompute':<26} none {m['activations_none']:.2f} | selective "
                 f"{m['activations_selective']:.2f} | full {m['activations_full']:.2f}")
    verdict = "fits" if p.fits else "DOES NOT FIT"
    lines.append(f"  {'total':<14} {p.memory_per_gpu_gb:9.2f}  of {cluster.usable_memory / GB:.1f} usable: {verdict}")
    lines += ["", "step time (s)"]
    for key, value in t.as_dict().items():
        if key != "total":
            lines.append(f"  {key:<14} {value:9.4f}")
    lines.append(f"  {'total':<14} {t.total:9.4f}  (bubble fraction {pipeline_bubble_fraction(p.micro_batches, lay.pp):.3f})")
    lines += ["", f"tokens/s per GPU {p.tokens_per_s_per_gpu:,.0f} | MFU {100 * p.mfu:.1f}%"]
    return "\n".join(lines)


def search(model: ModelConfig, train: TrainConfig, cluster: ClusterConfig) -> list[Prediction]:
    """Every layout `train.parallel.dims.validate_layout` accepts on this cluster for this global batch, with every
    micro-batch size and recompute mode, that fits; fastest first."""
    world = cluster.world_size
    divisors = [d for d in range(1, world + 1) if world % d == 0]
    experts = [d for d in range(1, max(1, model.num_experts) + 1) if max(1, model.num_experts) % d == 0]
    found = []
    for tp, cp, pp, ep, zero, mode in itertools.product(
        [d for d in divisors if d <= cluster.gpus_per_node], divisors, divisors, experts, (0, 1, 2, 3),
        ("none", "selective", "full"),
    ):
        if pp > model.n_layers or world % (tp * cp * pp) or train.seq_len % (cp * tp):
            continue
        dp = world // (tp * cp * pp)
        for mb in (1, 2, 4, 8, 16, 32):
            if train.global_batch_size % (mb * dp):
                continue
            try:
                p = predict(replace(model, activation_checkpointing=mode),
                            ParallelConfig(name="search", zero_stage=zero, tp=tp, pp=pp, ep=ep, cp=cp), cluster,
                            seq_len=train.seq_len, micro_batch=mb, global_batch=train.global_batch_size)
            except ConfigError:
                continue
            if p.fits:
                found.append(p)
    return sorted(found, key=lambda p: -p.tokens_per_s_per_gpu)
