"""Scaling-law reports from finished runs, and the size-ladder helper.

    python -m train.scaling report RUN_DIRS... [--out DIR] [--wandb] [--budget FLOPS]
        [--target-n N --target-d D] [--holdout-largest]
    python -m train.scaling ladder --sizes 1e5,3e5,1e6 --vocab 8000 --seq-len 128

The command line of train.scaling: runs are read by train.scaling.runs, fitted and written
(report.json / report.md / scaling.png, optionally W&B) by train.scaling.report; the ladder
rules are in train.scaling.ladder.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from train.scaling.ladder import ladder, write_rung_configs
from train.scaling.report import ReportOptions, write_report
from train.scaling.runs import load_runs


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
    conf = Path(__file__).resolve().parents[2] / "conf"
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
