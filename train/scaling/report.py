"""The scaling-law report: fits to the runs (report.json), its markdown table, the scaling.png
figure and W&B logging."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np

from train.scaling.fit import (
    N_FREE_PARAMS,
    PARAM_NAMES,
    ChinchillaFit,
    FrontierFit,
    compute_optimal,
    fit_chinchilla,
    fit_compute_frontier,
    predict_loss,
)
from train.scaling.runs import ParamsKind, Run, frontier_points


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


def _interval_text(iv) -> str:
    return "" if not iv else f"[{iv[0]:.4g}, {iv[1]:.4g}]"


def report_markdown(report: dict) -> str:
    fit, fr = report["fit"], report["frontier"]
    kind = {"active": "active parameters", "nonembedding": "active non-embedding parameters"}[report["params_kind"]]
    lines = [
        "# Scaling-law report", "",
        f"N = {kind}, D = training tokens, C = training FLOPs, loss = final eval loss (train loss where no eval).", "",
        "| run | N | D | C | loss | fit | residual |", "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in report["runs"]:
        lines.append(f"| {r['name']} | {r['N']:.3g} | {r['D']:.3g} | {r['C']:.3g} | {r['loss']:.4f} "
                     f"| {r['predicted']:.4f} | {100 * r['relative_residual']:+.2f}% |")
    conf = f"{100 * fit['confidence']:.0f}%"
    title = f"## L(N, D) = E + A / N^alpha + B / D^beta ({fit['n_runs']} runs, {fit['n_bootstrap']} bootstrap resamples)"
    lines += ["", title, "",
              f"| parameter | estimate | {conf} interval |", "|---|---:|---:|"]
    lines += [f"| {k} | {fit[k]:.4g} | {_interval_text(fit['intervals'].get(k))} |" for k in PARAM_NAMES]
    lines += ["", "## Compute frontier", "",
              f"L(C) = {fr['a']:.4g} * C^-{fr['b']:.4f}" + (f" + {fr['E']:.4g}" if fr["irreducible"] else "")
              + f", fitted on {fr['n_points']} frontier points, C from {fr['flops_range'][0]:.3g} "
              f"to {fr['flops_range'][1]:.3g}."]
    if "target" in report:
        t = report["target"]
        text = f"N = {t['N']:.4g}, D = {t['D']:.4g}: loss {t['predicted_loss']:.4f} {_interval_text(t['interval'])}"
        lines += ["", "## Predicted run", "", text]
    if "budget" in report:
        b = report["budget"]
        head = (f"C = {b['C']:.4g} FLOPs with C = {b['flops_per_param']:.3g} N D "
                f"(measured in the runs: {b['measured_flops_per_param']:.3g} FLOPs per token per parameter):")
        body = (f"N_opt = {b['N_opt']:.4g} {_interval_text(b.get('N_opt_interval'))}, "
                f"D_opt = {b['D_opt']:.4g} {_interval_text(b.get('D_opt_interval'))} "
                f"(D/N = {b['D_opt'] / b['N_opt']:.3g}), predicted loss {b['predicted_loss']:.4f}; "
                f"the frontier fit gives {b['frontier_loss']:.4f}.")
        lines += ["", "## Compute-optimal allocation", "", head, "", body]
    if "holdout" in report:
        h = report["holdout"]
        lines += ["", "## Hold-out: the largest model predicted from the smaller ones", "",
                  "| run | N | D | actual | predicted | error |", "|---|---:|---:|---:|---:|---:|"]
        lines += [f"| {r['name']} | {r['N']:.3g} | {r['D']:.3g} | {r['actual']:.4f} | {r['predicted']:.4f} "
                  f"| {100 * r['relative_error']:.2f}% |" for r in h["runs"]]
        lines += ["", f"Largest relative error: {100 * h['max_relative_error']:.2f}%"]
    if report["warnings"]:
        lines += ["", "## Warnings", ""] + [f"- {w}" for w in report["warnings"]]
    return "\n".join(lines) + "\n"


def plot_report(
    runs: Sequence[Run], fit: ChinchillaFit, frontier: FrontierFit, path: str | Path, holdout: Sequence[str] = ()
) -> Path:
    """Write scaling.png: loss vs FLOPs with the frontier fit, L(N, D) residuals, loss vs tokens."""
    # The object-oriented API with the Agg canvas leaves pyplot's global backend untouched.
    import matplotlib
    import matplotlib.ticker
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize
    from matplotlib.figure import Figure

    fig = Figure(figsize=(17, 5))
    FigureCanvasAgg(fig)
    ax_c, ax_r, ax_t = fig.subplots(1, 3)
    cmap = matplotlib.colormaps["viridis"]
    log_n = np.log10([r.n_params for r in runs])
    norm = Normalize(vmin=log_n.min(), vmax=max(log_n.max(), log_n.min() + 1e-9))

    for r, ln in zip(runs, log_n):
        color = cmap(norm(ln))
        ax_c.plot(r.curve["flops"], r.curve["loss"], color=color, lw=1, alpha=0.8)
        ax_c.scatter([r.flops], [r.loss], color=color, s=18, zorder=3)
        ax_t.plot(r.curve["tokens"], r.curve["loss"], color=color, lw=1, alpha=0.8)
        ax_t.scatter(r.curve["eval_tokens"], r.curve["eval_loss"], color=color, s=10, marker="s")
        tok = np.geomspace(max(r.tokens / 20, 1.0), r.tokens, 50)
        ax_t.plot(tok, fit.predict(r.n_params, tok), color=color, lw=1, ls="--")
    c = np.geomspace(frontier.frontier_flops.min() / 2, max(r.flops for r in runs) * 4, 100)
    label = f"L(C) = {frontier.a:.3g} C^-{frontier.b:.3f}" + (f" + {frontier.E:.3g}" if frontier.irreducible else "")
    ax_c.scatter(frontier.frontier_flops, frontier.frontier_loss, color="black", s=8, label="frontier", zorder=4)
    ax_c.plot(c, frontier.predict(c), color="red", ls="--", label=label, zorder=5)
    ax_c.set(xscale="log", yscale="log", xlabel="training FLOPs", ylabel="loss", title="Loss against compute")
    ax_c.legend(fontsize=8)

    held = set(holdout)
    n = np.array([r.n_params for r in runs])
    resid = np.array([100 * (r.loss - fit.predict(r.n_params, r.tokens)) / fit.predict(r.n_params, r.tokens)
                      for r in runs])
    tpp = np.array([r.tokens / r.n_params for r in runs])
    is_held = np.array([r.name in held for r in runs])
    sc = ax_r.scatter(n[~is_held], resid[~is_held], c=np.log10(tpp[~is_held]), cmap="plasma", s=30)
    if is_held.any():
        ax_r.scatter(n[is_held], resid[is_held], color="red", marker="x", s=50, label="held out (in the full fit)")
        ax_r.legend(fontsize=8)
    fig.colorbar(sc, ax=ax_r, label="log10 tokens per parameter")
    ax_r.axhline(0.0, color="gray", lw=1)
    ax_r.set(xscale="log", xlabel="N (parameters)", ylabel="(loss - fit) / fit  [%]",
             title=f"L(N, D) fit residuals\nE={fit.E:.3g}, alpha={fit.alpha:.3f}, beta={fit.beta:.3f}")

    ax_t.set(xscale="log", yscale="log", xlabel="tokens", ylabel="loss", title="Loss against tokens (dashed: fit)")
    fig.colorbar(ScalarMappable(norm=norm, cmap=cmap), ax=ax_t, label="log10 N")
    for ax in (ax_c, ax_t):  # plain numbers on the log loss axes: losses span less than a decade
        ax.yaxis.set_major_formatter(matplotlib.ticker.FormatStrFormatter("%.3g"))
        ax.yaxis.set_minor_formatter(matplotlib.ticker.FormatStrFormatter("%.3g"))
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=100)
    return path


def log_to_wandb(
    report: dict, runs: Sequence[Run], png_path: str | Path, out_dir: str | Path, project: str = "scaling"
) -> Path:
    """Log the runs table, loss-against-FLOPs curves, the figure and the fit to a W&B run.

    WANDB_MODE is respected (default offline); the run is written under out_dir/wandb.
    Returns the W&B run's directory.
    """
    import wandb

    run = wandb.init(
        project=project,
        dir=str(out_dir),
        mode=os.environ.get("WANDB_MODE", "offline"),
        job_type="scaling-report",
        config={"params_kind": report["params_kind"], "n_runs": len(runs)},
    )
    try:
        run.define_metric("flops")
        run.define_metric("loss/*", step_metric="flops")
        for r in runs:  # each run's curve, at most 200 points, plotted against FLOPs in the W&B UI
            key = "loss/" + r.name.replace("/", "_")
            idx = np.unique(np.linspace(0, len(r.curve["flops"]) - 1, min(200, len(r.curve["flops"]))).astype(int))
            for i in idx:
                run.log({"flops": float(r.curve["flops"][i]), "tokens": float(r.curve["tokens"][i]),
                         key: float(r.curve["loss"][i])})
        cols = ["name", "N", "D", "C", "loss", "predicted", "relative_residual"]
        runs_table = wandb.Table(columns=cols, data=[[row[c] for c in cols] for row in report["runs"]])
        frontier_table = wandb.Table(columns=["flops", "loss"], data=report["frontier"]["points"])
        run.log({"runs": runs_table, "frontier": frontier_table, "scaling": wandb.Image(str(png_path))})
        fit = report["fit"]
        summary = {f"fit/{k}": fit[k] for k in PARAM_NAMES}
        summary.update({"frontier/a": report["frontier"]["a"], "frontier/b": report["frontier"]["b"]})
        if "holdout" in report:
            summary["holdout/max_relative_error"] = report["holdout"]["max_relative_error"]
        if "budget" in report:
            summary.update({"budget/N_opt": report["budget"]["N_opt"], "budget/D_opt": report["budget"]["D_opt"]})
        run.summary.update(summary)
        run_dir = Path(run.dir).parent
    finally:
        run.finish()
    return run_dir
