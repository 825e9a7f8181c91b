"""Outputs of the scaling-law report: markdown table, the scaling.png figure and W&B logging."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from train.scaling_fit import PARAM_NAMES, ChinchillaFit, FrontierFit

if TYPE_CHECKING:  # train.scaling imports this module; the type is only needed for annotations
    from train.scaling import Run


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
