"""The best model for a compute budget: GPU-hours on a cluster turned into FLOPs at the throughput the planner
predicts for each candidate shape's fastest layout, joined with a fitted L(N, D) (`python -m train.scaling
report`).

With C = k N D FLOPs (k = training FLOPs per token per parameter of the shape), L(N, D) = E + A/N^alpha + B/D^beta
is lowest at N_opt = G (C/k)^(beta/(alpha+beta)), G = (alpha A / (beta B))^(1/(alpha+beta)) (Hoffmann et al.
2022, "Training Compute-Optimal Large Language Models", appendix D). The FLOPs a budget buys depend on the shape
(its best layout's MFU), so the shape and its optimum are iterated to a fixed point.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from model.config import ConfigError, ModelConfig
from model.flops import flops_per_token, param_counts
from train.config import TrainConfig
from train.plan.cluster import ClusterConfig
from train.plan.predict import Prediction, search

ASPECT = 128  # d_model / n_layers of the candidate shapes (Llama 2 7B: 4096 / 32)


@dataclass(frozen=True)
class Fit:
    E: float
    A: float
    alpha: float
    B: float
    beta: float
    params_kind: str
    bootstrap: np.ndarray | None  # [samples, 5] in (E, A, alpha, B, beta) order

    @classmethod
    def from_report(cls, path: str | Path) -> Fit:
        try:
            report = json.loads(Path(path).read_text())
            fit = report["fit"]
            boot = fit.get("bootstrap_params")
            return cls(*(float(fit[k]) for k in ("E", "A", "alpha", "B", "beta")),
                       params_kind=report.get("params_kind", "total"),
                       bootstrap=None if not boot else np.asarray(boot, dtype=np.float64))
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise ConfigError("--fit", f"cannot read a scaling report from {path} ({e}); write one with "
                                       "python -m train.scaling report") from None

    def loss(self, n: float, d: float) -> float:
        return self.E + self.A / n**self.alpha + self.B / d**self.beta

    def loss_interval(self, n: float, d: float, confidence: float = 0.95) -> tuple[float, float] | None:
        if self.bootstrap is None or not len(self.bootstrap):
            return None
        e, a, al, b, be = self.bootstrap.T
        values = e + a / n**al + b / d**be
        tail = 50 * (1 - confidence)
        lo, hi = np.percentile(values, [tail, 100 - tail])
        return float(lo), float(hi)

    def n_opt(self, flops: float, k: float) -> float:
        g = (self.alpha * self.A / (self.beta * self.B)) ** (1 / (self.alpha + self.beta))
        return g * (flops / k) ** (self.beta / (self.alpha + self.beta))


def count(model: ModelConfig, kind: str) -> int:
    counts = param_counts(model)
    return counts.get(kind, counts["total"])


def shape_for(template: ModelConfig, n_target: float, kind: str) -> ModelConfig:
    """The template scaled to about ``n_target`` parameters (of ``kind``): head size 64, SwiGLU hidden 8/3 d
    rounded up to 64, layers chosen for ``n_target``, the aspect d/L nearest ASPECT."""
    best: tuple[float, ModelConfig] | None = None
    # Heads of 64; from d_model 1024 up a multiple of 8 heads (tensor parallelism up to 8, GQA groups of 4).
    widths = [*range(64, 1024, 64), *range(1024, 32769, 512)]
    for d in widths:
        heads = d // 64
        gqa = template.n_kv_heads != template.n_heads and heads % 4 == 0
        kv = heads // 4 if gqa else heads
        base = replace(template, name=f"{template.family}_{d}", d_model=d, n_heads=heads, n_kv_heads=kv, head_dim=None,
                       ffn_hidden=64 * math.ceil(8 * d / 3 / 64), mamba_dt_rank=None)
        one = count(replace(base, n_layers=1), kind)
        two = count(replace(base, n_layers=2), kind)
        per_layer, fixed = two - one, 2 * one - two
        layers = round((n_target - fixed) / per_layer) if per_layer else 0
        if layers < 1:
            continue
        cand = replace(base, n_layers=layers)
        if template.family == "hybrid":  # keep the template's period pattern whole
            period = max(template.attn_layer_period, template.expert_layer_period)
            cand = replace(cand, n_layers=max(period, period * round(layers / period)))
        miss = abs(math.log(count(cand, kind) / n_target))
        score = miss * 20 + abs(math.log(d / cand.n_layers / ASPECT))
        if best is None or score < best[0]:
            best = (score, cand)
    if best is None:
        raise ConfigError("--budget-gpu-hours", f"no shape of the template near {n_target:.3g} parameters")
    return best[1]


@dataclass(frozen=True)
class BudgetPlan:
    model: ModelConfig
    n_params: int
    tokens: float
    flops: float
    prediction: Prediction
    predicted_loss: float
    loss_interval: tuple[float, float] | None
    wall_clock_s: float
    n_opt: float
    flops_per_param: float

    def as_json(self) -> dict[str, Any]:
        return {"model": asdict(self.model), "n_params": self.n_params, "tokens": self.tokens,
                "flops": self.flops, "flops_per_param": self.flops_per_param, "n_opt": self.n_opt,
                "predicted_loss": self.predicted_loss, "loss_interval": self.loss_interval,
                "wall_clock_s": self.wall_clock_s, "layout": self.prediction.as_json()}


def plan_budget(template: ModelConfig, train: TrainConfig, cluster: ClusterConfig, gpu_hours: float, fit: Fit,
                iterations: int = 8) -> BudgetPlan:
    """Fixed point of: shape -> fastest fitting layout -> FLOPs the budget buys -> the fit's N_opt -> shape."""
    seconds = gpu_hours * 3600 / cluster.world_size
    mfu, n_target = 0.4, None
    chosen = None
    for _ in range(iterations):
        flops = gpu_hours * 3600 * cluster.peak_flops * mfu
        model = template if n_target is None else shape_for(template, n_target, fit.params_kind)
        k = flops_per_token(model, train.seq_len) / count(model, fit.params_kind)
        n_next = fit.n_opt(flops, k)
        model = shape_for(template, n_next, fit.params_kind)
        found = search(model, train, cluster)
        if not found:
            raise ConfigError("--budget-gpu-hours", f"no layout of a {count(model, 'total') / 1e9:.3g}B model fits "
                                                    f"{cluster.world_size} x {cluster.name}")
        best = found[0]
        chosen = (model, best)
        if n_target is not None and abs(math.log(n_next / n_target)) < 0.01 and abs(best.mfu - mfu) < 1e-3:
            break
        n_target, mfu = n_next, best.mfu
    assert chosen is not None
    model, best = chosen
    model = replace(model, activation_checkpointing=best.recompute)
    flops = gpu_hours * 3600 * cluster.peak_flops * best.mfu
    n = count(model, fit.params_kind)
    fpt = flops_per_token(model, train.seq_len)
    tokens = flops / fpt
    return BudgetPlan(model=model, n_params=n, tokens=tokens, flops=flops, prediction=best,
                      predicted_loss=fit.loss(n, tokens), loss_interval=fit.loss_interval(n, tokens),
                      wall_clock_s=seconds, n_opt=fit.n_opt(flops, fpt / n), flops_per_param=fpt / n)
