"""Scaling-law reports from finished runs, and the size-ladder helper.

    python -m train.scaling report RUN_DIRS... [--out DIR] [--wandb] [--budget FLOPS]
        [--target-n N --target-d D] [--holdout-largest]
    python -m train.scaling ladder --sizes 1e5,3e5,1e6 --vocab 8000 --seq-len 128

A run directory counts as finished when it holds summary.json (the trainer writes it last);
its loss curve comes from metrics.jsonl. The fits live in train.scaling_fit and the ladder
rules in train.scaling_ladder; this module reads runs, writes report.json / report.md /
scaling.png and optionally logs them to W&B.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np

from train.scaling_fit import (  # noqa: F401  (re-exported: the public API lives here)
    N_FREE_PARAMS,
    PARAM_NAMES,
    ChinchillaFit,
    FrontierFit,
    compute_frontier,
    compute_optimal,
    fit_chinchilla,
    fit_compute_frontier,
    predict_loss,
)
from train.scaling_ladder import (  # noqa: F401
    dense_param_counts,
    ladder,
    ladder_sizes,
    model_shape_for_params,
    scaled_hparams,
    write_rung_configs,
)

ParamsKind = Literal["active", "nonembedding"]
_RUN_MARKERS = ("summary.json", "metrics.jsonl", "config.yaml")


@dataclass
class Run:
    """One finished run: its final point for L(N, D) and its curve for the frontier."""

    name: str
    path: Path
    n_params: float
    tokens: float
    flops: float
    loss: float
    loss_source: str  # "eval_loss" or "final_train_loss"
    flops_per_token: float
    curve: dict[str, np.ndarray]  # "tokens", "flops", "loss" (train) and "eval_tokens", "eval_flops", "eval_loss"


# ------------------------------------------------------------------ reading runs
def find_run_dirs(paths: Sequence[str | Path]) -> list[Path]:
    """Each path is a run directory, or a directory whose immediate subdirectories are runs."""
    runs: list[Path] = []
    for p in map(Path, paths):
        if not p.is_dir():
            raise FileNotFoundError(f"{p} is not a directory; pass run directories (or a folder of them)")
        if any((p / m).exists() for m in _RUN_MARKERS):
            runs.append(p)
        else:
            runs.extend(sorted(q for q in p.iterdir() if q.is_dir() and any((q / m).exists() for m in _RUN_MARKERS)))
    if not runs:
        raise FileNotFoundError(
            f"no runs found in {', '.join(map(str, paths))}: expected directories holding summary.json "
            "and metrics.jsonl (written by python -m train)"
        )
    return runs


def _read_metrics(path: Path) -> dict[str, np.ndarray]:
    train, evals = [], []
    with open(path) as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path}:{lineno} is not valid JSON ({exc.msg})") from None
            if "loss" in rec and "flops" in rec:
                train.append((rec["tokens"], rec["flops"], rec["loss"]))
            if "eval_loss" in rec and "flops" in rec:
                evals.append((rec["tokens"], rec["flops"], rec["eval_loss"]))
    t = np.array(train, dtype=np.float64).reshape(-1, 3)
    e = np.array(evals, dtype=np.float64).reshape(-1, 3)
    t, e = t[np.isfinite(t).all(axis=1)], e[np.isfinite(e).all(axis=1)]  # a diverged step logs NaN
    return {"tokens": t[:, 0], "flops": t[:, 1], "loss": t[:, 2],
            "eval_tokens": e[:, 0], "eval_flops": e[:, 1], "eval_loss": e[:, 2]}


def load_run(path: str | Path, params: ParamsKind = "active") -> Run:
    """Read summary.json and metrics.jsonl of a finished run."""
    path = Path(path)
    summary_path = path / "summary.json"
    if not summary_path.exists():
        raise FileNotFoundError(
            f"{path} has no summary.json: the run did not finish (the trainer writes it at the end); "
            "resume it with train.resume=auto, or leave it out / pass --skip-unfinished"
        )
    try:
        summary = json.loads(summary_path.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{summary_path} is not valid JSON ({exc.msg}); rerun the run's final step") from None
    key = {"active": "n_active_params", "nonembedding": "n_active_nonembedding_params"}[params]
    for k in (key, "tokens"):
        if k not in summary:
            raise ValueError(f"{summary_path} lacks {k!r}; it was not written by this trainer version")
    loss, source = summary.get("eval_loss"), "eval_loss"
    if loss is None or not math.isfinite(loss):
        loss, source = summary.get("final_train_loss"), "final_train_loss"
    if loss is None or not math.isfinite(loss):
        raise ValueError(f"{summary_path} has neither a finite eval_loss nor final_train_loss")
    metrics_path = path / "metrics.jsonl"
    if not metrics_path.exists():
        raise FileNotFoundError(f"{metrics_path} is missing; the loss-vs-FLOPs curve of this run cannot be read")
    n, d = float(summary[key]), float(summary["tokens"])
    flops = float(summary.get("flops") or 6.0 * summary.get("n_active_params", n) * d)
    fpt = float(summary.get("flops_per_token") or flops / d)
    return Run(path.name, path, n, d, flops, float(loss), source, fpt, _read_metrics(metrics_path))


def load_runs(paths: Sequence[str | Path], params: ParamsKind = "active", skip_unfinished: bool = False) -> list[Run]:
    runs = []
    for p in find_run_dirs(paths):
        if skip_unfinished and not (p / "summary.json").exists():
            print(f"warning: skipping {p}: no summary.json (the run did not finish)", file=sys.stderr)
            continue
        runs.append(load_run(p, params))
    if not runs:
        raise FileNotFoundError("no finished runs found (none has summary.json)")
    runs.sort(key=lambda r: (r.n_params, r.tokens, r.name))
    names = [r.name for r in runs]
    if len(set(names)) != len(names):  # same leaf name in different sweeps: use the full path
        for r in runs:
            r.name = str(r.path)
    return runs


def _smooth(y: np.ndarray, window: int) -> np.ndarray:
    """Trailing mean over `window` logged points (what W&B's smoothing shows)."""
    if window <= 1 or len(y) == 0:
        return y
    c = np.cumsum(np.insert(y, 0, 0.0))
    idx = np.arange(1, len(y) + 1)
    lo = np.maximum(idx - window, 0)
    return (c[idx] - c[lo]) / (idx - lo)


def frontier_points(
    runs: Sequence[Run], metric: str = "loss", skip_fraction: float = 0.1, smooth: int = 1
) -> tuple[np.ndarray, np.ndarray]:
    """All runs' (FLOPs, loss) points, minus each run's first skip_fraction of tokens (warm-up)."""
    cs, ls = [], []
    prefix = "" if metric == "loss" else "eval_"
    for r in runs:
        tok, c, loss = r.curve[prefix + "tokens"], r.curve[prefix + "flops"], _smooth(r.curve[metric], smooth)
        keep = tok >= skip_fraction * r.tokens
        cs.append(c[keep])
        ls.append(loss[keep])
    c, loss = np.concatenate(cs), np.concatenate(ls)
    if len(c) == 0:
        raise ValueError(f"no {metric!r} points in metrics.jsonl of any run; the frontier needs loss curves")
    return c, loss


# ------------------------------------------------------------------ the report
@dataclass
class ReportOptions:
    params: ParamsKind = "active"
    budget: float | None = None
    target_n: float | None = None
    target_d: float | None = None
    holdout_largest: bool = False
    n_bootstrap: int = 200
    confidence: float = 0.95
    seed: int = 0
    flops_per_param: float | None = 6.0  # None: the runs' median measured flops_per_token / N
    frontier_metric: Literal["loss", "eval_loss"] = "loss"
    frontier_skip: float = 0.1
    smooth: int = 1
    irreducible: bool = False

    def validate(self) -> ReportOptions:
        if (self.target_n is None) != (self.target_d is None):
            raise ValueError("give both --target-n and --target-d (the run to predict), or neither")
        for name in ("budget", "target_n", "target_d", "flops_per_param"):
            v = getattr(self, name)
            if v is not None and not v > 0:
                raise ValueError(f"{name} must be positive, got {v}")
        if self.params not in ("active", "nonembedding"):
            raise ValueError(f"params must be 'active' or 'nonembedding', got {self.params!r}")
        if self.frontier_metric not in ("loss", "eval_loss"):
            raise ValueError(f"frontier metric must be 'loss' or 'eval_loss', got {self.frontier_metric!r}")
        if not 0 <= self.frontier_skip < 1:
            raise ValueError(f"frontier_skip must be in [0, 1), got {self.frontier_skip}")
        return self


def _need_runs(n: int, what: str) -> None:
    if n < N_FREE_PARAMS:
        raise ValueError(
            f"{what}: {n} runs but L(N, D) has {N_FREE_PARAMS} free parameters, so at least {N_FREE_PARAMS} "
            "finished runs are needed (best: several sizes, each at 2-3 token counts)"
        )


def build_report(runs: Sequence[Run], opts: ReportOptions) -> tuple[dict, ChinchillaFit, FrontierFit]:
    """Fit L(N, D) and L(C) to the runs; returns the JSON-ready report and both fits."""
    opts.validate()
    _need_runs(len(runs), "cannot fit L(N, D)")
    N = np.array([r.n_params for r in runs])
    D = np.array([r.tokens for r in runs])
    L = np.array([r.loss for r in runs])
    fit = fit_chinchilla(N, D, L, n_bootstrap=opts.n_bootstrap, confidence=opts.confidence, seed=opts.seed)
    frontier = fit_compute_frontier(
        *frontier_points(runs, opts.frontier_metric, opts.frontier_skip, opts.smooth), irreducible=opts.irreducible
    )
    pred = fit.predict(N, D)
    warnings = []
    if len(np.unique(N)) > 1 and len(np.unique(D)) > 1 and abs(np.corrcoef(np.log(N), np.log(D))[0, 1]) > 0.98:
        warnings.append(
            "log N and log D are almost collinear (every run has about the same tokens per parameter): "
            "alpha and beta are poorly identified; add runs at 2-3 token counts per size"
        )
    report: dict = {
        "params_kind": opts.params,
        "runs": [
            {"name": r.name, "path": str(r.path), "N": r.n_params, "D": r.tokens, "C": r.flops, "loss": r.loss,
             "loss_source": r.loss_source, "predicted": float(p), "residual": float(r.loss - p),
             "relative_residual": float((r.loss - p) / p)}
            for r, p in zip(runs, pred)
        ],
        "fit": fit.to_dict(),
        "frontier": frontier.to_dict(),
        "warnings": warnings,
    }
    samples = fit.bootstrap_params
    if opts.target_n is not None:
        loss = float(fit.predict(opts.target_n, opts.target_d))
        boot = None if samples is None else predict_loss(samples.T, opts.target_n, opts.target_d)
        report["target"] = {"N": opts.target_n, "D": opts.target_d, "predicted_loss": loss,
                            "interval": fit.bootstrap_interval(boot)}
    if opts.budget is not None:
        measured = float(np.median([r.flops_per_token / r.n_params for r in runs]))
        k = opts.flops_per_param if opts.flops_per_param is not None else measured
        n_opt, d_opt = (float(x) for x in fit.compute_optimal(opts.budget, k))
        entry = {"C": opts.budget, "flops_per_param": k, "measured_flops_per_param": measured,
                 "N_opt": n_opt, "D_opt": d_opt, "predicted_loss": float(fit.predict(n_opt, d_opt)),
                 "frontier_loss": float(frontier.predict(opts.budget))}
        if samples is not None:
            ok = (samples[:, 2] > 0) & (samples[:, 4] > 0)
            n_b, d_b = compute_optimal(samples[ok].T, opts.budget, k)
            entry["N_opt_interval"] = fit.bootstrap_interval(n_b)
            entry["D_opt_interval"] = fit.bootstrap_interval(d_b)
        report["budget"] = entry
    if opts.holdout_largest:
        largest = N.max()
        held = N == largest
        _need_runs(int((~held).sum()), f"--holdout-largest leaves out the {int(held.sum())} run(s) at N={largest:.3g}")
        sub = fit_chinchilla(N[~held], D[~held], L[~held], n_bootstrap=0)
        hp = sub.predict(N[held], D[held])
        rows = [{"name": r.name, "N": r.n_params, "D": r.tokens, "actual": r.loss, "predicted": float(p),
                 "relative_error": float(abs(p - r.loss) / r.loss)}
                for r, p in zip([r for r, h in zip(runs, held) if h], hp)]
        report["holdout"] = {"fit": sub.to_dict(), "runs": rows,
                             "max_relative_error": max(row["relative_error"] for row in rows)}
    return report, fit, frontier


def write_report(runs: Sequence[Run], opts: ReportOptions, out_dir: str | Path, use_wandb: bool = False) -> dict:
    """Fit, then write report.json, report.md and scaling.png to out_dir (and log to W&B)."""
    from train.scaling_report import log_to_wandb, plot_report, report_markdown

    report, fit, frontier = build_report(runs, opts)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    held = [r["name"] for r in report.get("holdout", {}).get("runs", [])]
    png = plot_report(runs, fit, frontier, out / "scaling.png", holdout=held)
    if use_wandb:
        report["wandb_run_dir"] = str(log_to_wandb(report, runs, png, out))
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / "report.md").write_text(report_markdown(report))
    return report


def _float_list(text: str) -> list[float]:
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers like 1e5,3e5, got {text!r}") from None


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m train.scaling", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    r = sub.add_parser("report", help="fit and plot scaling laws from finished runs")
    r.add_argument("run_dirs", nargs="+", help="run directories, or folders holding run directories")
    r.add_argument("--out", default="scaling_report", help="output directory (default: ./scaling_report)")
    r.add_argument("--wandb", action="store_true", help="log the table and figure to W&B (WANDB_MODE, default offline)")
    r.add_argument("--budget", type=float, help="FLOP budget for the compute-optimal N and D")
    r.add_argument("--target-n", type=float, help="parameters of a run to predict")
    r.add_argument("--target-d", type=float, help="tokens of a run to predict")
    r.add_argument("--holdout-largest", action="store_true",
                   help="also fit without the largest-N run(s) and report the error predicting them")
    r.add_argument("--params", choices=["active", "nonembedding"], default="active",
                   help="N = n_active_params (default) or n_active_nonembedding_params")
    r.add_argument("--bootstrap", type=int, default=200, help="bootstrap resamples for intervals (0: none)")
    r.add_argument("--seed", type=int, default=0)
    r.add_argument("--flops-per-param", type=float, default=6.0, help="k in C = k N D for the budget (default 6)")
    r.add_argument("--measured-flops-ratio", action="store_true",
                   help="use the runs' median flops_per_token / N as k instead of --flops-per-param")
    r.add_argument("--frontier-metric", choices=["loss", "eval_loss"], default="loss")
    r.add_argument("--frontier-skip", type=float, default=0.1, help="drop each run's first fraction of tokens")
    r.add_argument("--smooth", type=int, default=1, help="trailing mean over this many logged points")
    r.add_argument("--irreducible", action="store_true", help="fit L(C) = E + a C^-b instead of a C^-b")
    r.add_argument("--skip-unfinished", action="store_true", help="skip run dirs without summary.json")
    lad = sub.add_parser("ladder", help="print Hydra overrides for a ladder of model sizes")
    lad.add_argument("--sizes", type=_float_list, required=True, help="parameter targets, e.g. 1e5,3e5,1e6")
    lad.add_argument("--vocab", type=int, required=True)
    lad.add_argument("--seq-len", type=int, required=True)
    lad.add_argument("--tokens-per-param", type=_float_list, default=[20.0], help="one or more, e.g. 10,20,40")
    lad.add_argument("--tokens", type=_float_list,
                     help="absolute token budgets for every size, e.g. 2e5,4e5 (instead of --tokens-per-param)")
    lad.add_argument("--count", choices=["nonembedding", "total"], default="nonembedding")
    lad.add_argument("--base-lr", type=float, default=3e-3, help="lr of the base size")
    lad.add_argument("--base-n", type=float, help="base size (default: the smallest rung)")
    lad.add_argument("--base-batch", type=int, default=32, help="global batch (sequences) of the base size")
    lad.add_argument("--lr-exponent", type=float, default=0.25)
    lad.add_argument("--batch-exponent", type=float, default=0.65)
    lad.add_argument("--batch-multiple", type=int, default=16, help="micro_batch_size x data-parallel ranks")
    lad.add_argument("--warmup-fraction", type=float, default=0.05, help="warm-up steps as a fraction of steps")
    lad.add_argument("--run-dir-prefix", help="add run_dir=PREFIX/<rung name> to each line")
    lad.add_argument("--json", action="store_true", help="print the rungs as JSON")
    lad.add_argument("--write-configs", metavar="DIR",
                     help="also write one Hydra config per rung to DIR (e.g. conf/experiment/ladder/dense), "
                     "replacing the rung configs written there before")
    lad.add_argument("--append", action="store_true",
                     help="with --write-configs: keep the rung configs already in DIR (to combine several calls)")
    return p


def _config_group(directory: str) -> str:
    """The Hydra group name of a directory under conf/ (the group path relative to conf/)."""
    conf = Path(__file__).resolve().parents[1] / "conf"
    try:
        return Path(directory).resolve().relative_to(conf).as_posix()
    except ValueError:
        return f"<group of {directory} under a Hydra config dir>"


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.command == "ladder":
            rungs = ladder(
                args.sizes, args.vocab, args.seq_len, base_lr=args.base_lr, base_n=args.base_n,
                tokens_per_param=args.tokens_per_param, tokens=args.tokens, count=args.count,
                run_dir_prefix=args.run_dir_prefix,
                base_batch_size=args.base_batch, lr_exponent=args.lr_exponent,
                batch_exponent=args.batch_exponent, batch_multiple=args.batch_multiple,
                warmup_fraction=args.warmup_fraction,
            )
            if args.write_configs:
                command = "python -m train.scaling " + " ".join(sys.argv[1:] if argv is None else argv)
                paths = write_rung_configs(rungs, args.write_configs, command, replace=not args.append)
                print(f"# wrote {len(paths)} rung configs to {args.write_configs}; sweep them with "
                      f"python -m train --multirun +{_config_group(args.write_configs)}=glob(*)", file=sys.stderr)
            if args.json:
                print(json.dumps(rungs, indent=2))
            for r in [] if args.json else rungs:
                print(f"# {r['name']}: target {r['n_target']:.3g}, {r['n_params_nonembedding']:,} non-embedding / "
                      f"{r['n_params_total']:,} total params, {r['tokens']:,} tokens")
                print(r["overrides"])
            return 0
        opts = ReportOptions(
            params=args.params, budget=args.budget, target_n=args.target_n, target_d=args.target_d,
            holdout_largest=args.holdout_largest, n_bootstrap=args.bootstrap, seed=args.seed,
            flops_per_param=None if args.measured_flops_ratio else args.flops_per_param,
            frontier_metric=args.frontier_metric, frontier_skip=args.frontier_skip, smooth=args.smooth,
            irreducible=args.irreducible,
        ).validate()
        runs = load_runs(args.run_dirs, args.params, args.skip_unfinished)
        if args.wandb:
            os.environ.setdefault("WANDB_MODE", "offline")
        write_report(runs, opts, args.out, use_wandb=args.wandb)
        print((Path(args.out) / "report.md").read_text())
        print(f"wrote {Path(args.out) / 'report.json'}, report.md and scaling.png")
        return 0
    except (FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
