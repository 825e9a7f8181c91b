"""A ladder of dense model sizes for scaling-law runs: shapes from a parameter target, and
learning rate, batch and steps scaled with N.

Shape rule (documented in docs/scaling.md):
- head_dim = 32 while d_model < 512, else 64; d_model is a multiple of head_dim.
- ffn_hidden = the multiple of 32 nearest 8/3 * d_model (SwiGLU keeps ~the FLOPs of a 4x MLP).
- n_kv_heads = n_heads // kv_group (kv_group=1: plain multi-head attention).
- Among all (d_model, n_layers) with aspect ratio d_model / n_layers in [aspect_min, aspect_max]
  (32..64 by default, the range small models train well in), pick the one minimising
  |ln(N(shape) / N_target)| + 0.05 * |ln(aspect / sqrt(aspect_min * aspect_max))|:
  the closest parameter count, ties broken towards the middle of the aspect range.

Hyper-parameter rule: tokens = tokens_per_param * N (20, Chinchilla);
lr = base_lr * (N / base_n)^-lr_exponent and batch = base_batch * (N / base_n)^batch_exponent.
The default exponents come from DeepSeek LLM (2024), whose fitted optima are lr ~ C^-0.125 and
batch ~ C^0.327; with C = 6 N * 20 N ~ N^2 these become lr ~ N^-0.25 and batch ~ N^0.65.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

from model.config import ModelConfig
from model.flops import param_counts

CountKind = Literal["nonembedding", "total"]


@dataclass(frozen=True)
class DenseShape:
    d_model: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    ffn_hidden: int

    def model_config(self, vocab_size: int, tie_embeddings: bool = False) -> ModelConfig:
        return ModelConfig(
            name=f"dense_d{self.d_model}_l{self.n_layers}", family="dense", vocab_size=vocab_size,
            d_model=self.d_model, n_layers=self.n_layers, n_heads=self.n_heads, n_kv_heads=self.n_kv_heads,
            ffn_hidden=self.ffn_hidden, tie_embeddings=tie_embeddings,
        )


def dense_param_counts(shape: DenseShape, vocab_size: int, tie_embeddings: bool = False) -> dict[str, int]:
    """model.flops.param_counts of the shape: the same counts the trainer writes to summary.json."""
    return param_counts(shape.model_config(vocab_size, tie_embeddings))


def _round_to(x: float, multiple: int) -> int:
    return max(multiple, round(x / multiple) * multiple)


def shape_for(d_model: int, n_layers: int, kv_group: int = 1) -> DenseShape:
    """The ladder's shape for a given width and depth (head_dim, ffn and kv heads by the rule)."""
    head_dim = 32 if d_model < 512 else 64
    if d_model % head_dim:
        raise ValueError(f"d_model={d_model} must be a multiple of head_dim={head_dim}")
    n_heads = d_model // head_dim
    n_kv = max(1, n_heads // kv_group)
    while n_heads % n_kv:  # GQA needs equal groups
        n_kv -= 1
    return DenseShape(d_model, n_layers, n_heads, n_kv, _round_to(8.0 / 3.0 * d_model, 32))


def model_shape_for_params(
    n_target: float,
    vocab_size: int,
    *,
    count: CountKind = "nonembedding",
    aspect_min: float = 32.0,
    aspect_max: float = 64.0,
    kv_group: int = 1,
    tie_embeddings: bool = False,
    max_layers: int = 128,
) -> dict[str, int]:
    """Choose d_model / n_layers / n_heads / n_kv_heads / ffn_hidden for ~n_target parameters.

    `count` says which parameters, as model.flops counts them: "nonembedding" (all but the input
    embedding table; an untied LM head counts) or "total". These match the report's
    --params nonembedding / active for dense models.
    """
    if n_target <= 0:
        raise ValueError(f"n_target must be positive, got {n_target}")
    if not 0 < aspect_min <= aspect_max:
        raise ValueError(f"need 0 < aspect_min <= aspect_max, got {aspect_min}, {aspect_max}")
    if count not in ("nonembedding", "total"):
        raise ValueError(f"count must be 'nonembedding' or 'total', got {count!r}")
    mid = math.sqrt(aspect_min * aspect_max)
    best, best_score = None, math.inf
    smallest = None
    for n_layers in range(1, max_layers + 1):
        lo, hi = aspect_min * n_layers, aspect_max * n_layers
        counts_here = []
        for d_model in range(32, int(hi) + 1, 32):
            if d_model < lo or (d_model >= 512 and d_model % 64):
                continue
            shape = shape_for(d_model, n_layers, kv_group)
            n = dense_param_counts(shape, vocab_size, tie_embeddings)[count]
            counts_here.append(n)
            smallest = n if smallest is None else min(smallest, n)
            score = abs(math.log(n / n_target)) + 0.05 * abs(math.log(d_model / n_layers / mid))
            if score < best_score:
                best, best_score = shape, score
        if counts_here and min(counts_here) > 3 * n_target:  # deeper shapes only grow
            break
    if best is None:
        raise ValueError(f"no shape with aspect ratio in [{aspect_min}, {aspect_max}] and <= {max_layers} layers")
    got = dense_param_counts(best, vocab_size, tie_embeddings)[count]
    if abs(math.log(got / n_target)) > math.log(1.5):
        raise ValueError(
            f"no ladder shape has ~{n_target:.3g} {count} parameters with vocab {vocab_size} (closest: {got:,}; "
            f"the smallest possible is {smallest:,}, mostly the {vocab_size} x d_model LM head); "
            f"choose sizes of at least ~{smallest:.2g}, or a smaller vocab"
        )
    out = asdict(best)
    out.update({f"n_params_{k}": v for k, v in dense_param_counts(best, vocab_size, tie_embeddings).items()})
    return out


def scaled_hparams(
    n_params: float,
    base_lr: float,
    base_n: float,
    *,
    seq_len: int,
    base_batch_size: int = 32,
    tokens_per_param: float = 20.0,
    lr_exponent: float = 0.25,
    batch_exponent: float = 0.65,
    batch_multiple: int = 16,
    warmup_fraction: float = 0.05,
) -> dict[str, float | int]:
    """lr, global_batch_size (sequences), steps and tokens for a model of n_params parameters.

    The batch is rounded to a multiple of batch_multiple (so it splits over micro-batches and
    data-parallel ranks) and steps = round(tokens / (batch * seq_len)), at least 1; warm-up is
    warmup_fraction of the steps (at least 1), so every rung warms up over the same share of training.
    """
    for name, v in (("n_params", n_params), ("base_lr", base_lr), ("base_n", base_n), ("seq_len", seq_len)):
        if v <= 0:
            raise ValueError(f"{name} must be positive, got {v}")
    if tokens_per_param <= 0 or base_batch_size <= 0 or batch_multiple <= 0:
        raise ValueError("tokens_per_param, base_batch_size and batch_multiple must be positive")
    if not 0 <= warmup_fraction < 1:
        raise ValueError(f"warmup_fraction must be in [0, 1), got {warmup_fraction}")
    ratio = n_params / base_n
    lr = base_lr * ratio**-lr_exponent
    batch = _round_to(base_batch_size * ratio**batch_exponent, batch_multiple)
    target_tokens = tokens_per_param * n_params
    steps = max(1, round(target_tokens / (batch * seq_len)))
    warmup = min(steps, max(1, round(warmup_fraction * steps))) if warmup_fraction > 0 else 0
    return {"lr": lr, "global_batch_size": batch, "steps": steps, "tokens": steps * batch * seq_len,
            "warmup_steps": warmup}


def ladder_sizes(n_min: float, n_max: float, n_rungs: int) -> list[float]:
    """n_rungs parameter targets spaced evenly in log between n_min and n_max."""
    if not 0 < n_min <= n_max or n_rungs < 1:
        raise ValueError(f"need 0 < n_min <= n_max and n_rungs >= 1; got {n_min}, {n_max}, {n_rungs}")
    if n_rungs == 1:
        return [float(n_min)]
    step = (math.log(n_max) - math.log(n_min)) / (n_rungs - 1)
    return [float(math.exp(math.log(n_min) + i * step)) for i in range(n_rungs)]


def ladder(
    sizes: Sequence[float],
    vocab_size: int,
    seq_len: int,
    *,
    base_lr: float = 3e-3,
    base_n: float | None = None,
    tokens_per_param: Sequence[float] = (20.0,),
    tokens: Sequence[float] | None = None,
    count: CountKind = "nonembedding",
    tie_embeddings: bool = False,
    run_dir_prefix: str | None = None,
    **hparam_kwargs,
) -> list[dict]:
    """One rung per (size, tokens_per_param): shape, hyper-parameters and the Hydra override line.

    `tokens`, if given, replaces tokens_per_param by absolute token budgets (the same D for every
    size: the natural choice when the corpus, not compute, bounds D). Hyper-parameters scale with
    the chosen count of the rung's actual shape; base_n defaults to the smallest rung so base_lr
    and base_batch_size are that rung's values.
    """
    if not sizes:
        raise ValueError("give at least one size")
    if tokens is not None and (not tokens or min(tokens) <= 0):
        raise ValueError(f"tokens must be positive token budgets, got {list(tokens)}")
    shapes = [model_shape_for_params(n, vocab_size, count=count, tie_embeddings=tie_embeddings) for n in sizes]
    counts = [s[f"n_params_{count}"] for s in shapes]
    base = float(base_n) if base_n is not None else float(min(counts))
    rungs = []
    for target, shape, n in zip(sizes, shapes, counts):
        budgets = [(d / n, f"d{d:.2g}") for d in tokens] if tokens is not None else [
            (tpp, f"tpp{tpp:g}") for tpp in tokens_per_param]
        for tpp, d_label in budgets:
            hp = scaled_hparams(n, base_lr, base, seq_len=seq_len, tokens_per_param=tpp, **hparam_kwargs)
            name = f"n{n:.2g}_{d_label}".replace("+", "")
            overrides = [
                f"model.name=ladder_{name}",
                f"model.vocab_size={vocab_size}",
                *(f"model.{k}={shape[k]}" for k in ("d_model", "n_layers", "n_heads", "n_kv_heads", "ffn_hidden")),
                f"model.max_seq_len={seq_len}",
                f"model.tie_embeddings={str(tie_embeddings).lower()}",
                f"train.seq_len={seq_len}",
                f"train.global_batch_size={hp['global_batch_size']}",
                f"train.steps={hp['steps']}",
                f"optim.lr={hp['lr']:.4g}",
                f"sched.warmup_steps={hp['warmup_steps']}",
            ]
            if run_dir_prefix:
                overrides.append(f"run_dir={run_dir_prefix.rstrip('/')}/{name}")
            rungs.append(
                {"name": name, "n_target": float(target), "tokens_per_param": float(tpp), **shape, **hp,
                 "vocab_size": vocab_size, "seq_len": seq_len, "tie_embeddings": tie_embeddings,
                 "overrides": " ".join(overrides)}
            )
    names = [r["name"] for r in rungs]
    if len(set(names)) != len(names):
        raise ValueError(f"two rungs share a name (run directory): {names}; give sizes that differ by more than ~5%")
    return rungs


GENERATED_MARKER = "# generated by python -m train.scaling ladder --write-configs"


def rung_config(rung: dict) -> dict:
    """The rung as a nested Hydra config: the same values as its override line, minus run_dir."""
    model = {"name": f"ladder_{rung['name']}", "vocab_size": rung["vocab_size"],
             **{k: rung[k] for k in ("d_model", "n_layers", "n_heads", "n_kv_heads", "ffn_hidden")},
             "max_seq_len": rung["seq_len"], "tie_embeddings": rung["tie_embeddings"]}
    return {
        "model": model,
        "train": {"seq_len": rung["seq_len"], "global_batch_size": rung["global_batch_size"], "steps": rung["steps"]},
        "optim": {"lr": float(f"{rung['lr']:.4g}")},
        "sched": {"warmup_steps": rung["warmup_steps"]},
    }


def write_rung_configs(
    rungs: Sequence[dict], out_dir: str | Path, command: str = "", replace: bool = True
) -> list[Path]:
    """One `# @package _global_` YAML per rung in out_dir (a Hydra config group: sweep it with
    `+GROUP=glob(*)`). With replace, the files this function wrote there before are deleted first,
    so the group holds exactly this ladder; other files in out_dir are always left alone."""
    import yaml  # PyYAML: a dependency of Hydra/OmegaConf

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for old in out.glob("*.yaml") if replace else []:
        if GENERATED_MARKER in old.read_text().splitlines()[:2]:
            old.unlink()
    paths = []
    for rung in rungs:
        path = out / f"{rung['name']}.yaml"
        header = [
            "# @package _global_",  # Hydra reads the package only from the file's first lines
            GENERATED_MARKER,
            *([f"# {command}"] if command else []),
            (f"# {rung['name']}: target {rung['n_target']:.3g}, {rung['n_params_nonembedding']:,} non-embedding / "
             f"{rung['n_params_total']:,} total params, {rung['tokens']:,} tokens"),
        ]
        path.write_text("\n".join(header) + "\n" + yaml.safe_dump(rung_config(rung), sort_keys=False))
        paths.append(path)
    return paths
