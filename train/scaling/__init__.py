"""Scaling laws: a size ladder (ladder), reading finished runs (runs), the L(N, D) and L(C) fits
(fit), the report (report) and the command line (cli, run as `python -m train.scaling`).

The ladder function is train.scaling.ladder.ladder: the name train.scaling.ladder is the module.
"""

from train.scaling.cli import main
from train.scaling.fit import (
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
from train.scaling.ladder import (
    dense_param_counts,
    ladder_sizes,
    model_shape_for_params,
    scaled_hparams,
    write_rung_configs,
)
from train.scaling.report import ReportOptions, build_report, write_report
from train.scaling.runs import Run, find_run_dirs, frontier_points, load_run, load_runs

__all__ = [
    "N_FREE_PARAMS",
    "PARAM_NAMES",
    "ChinchillaFit",
    "FrontierFit",
    "ReportOptions",
    "Run",
    "build_report",
    "compute_frontier",
    "compute_optimal",
    "dense_param_counts",
    "find_run_dirs",
    "fit_chinchilla",
    "fit_compute_frontier",
    "frontier_points",
    "ladder_sizes",
    "load_run",
    "load_runs",
    "main",
    "model_shape_for_params",
    "predict_loss",
    "scaled_hparams",
    "write_report",
    "write_rung_configs",
]
