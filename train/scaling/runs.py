"""Reading finished runs for the scaling-law report: final (N, D, loss) points and loss curves.

A run directory counts as finished when it holds summary.json (the trainer writes it last);
its loss curve comes from metrics.jsonl.
"""

from __future__ import annotations

import json
import math
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np

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
