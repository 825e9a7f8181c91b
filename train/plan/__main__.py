"""python -m train.plan [OVERRIDES] [cluster=NAME] [cluster.KEY=VALUE] [--json] [--search [--top N]]
                      [--budget-gpu-hours H --fit REPORT.json [--out MODEL.yaml]]
python -m train.plan calibrate      (measures this machine into conf/cluster/cpu_local.yaml)

The same Hydra overrides as training (model=, parallel=, train.seq_len=, train.micro_batch_size=,
train.global_batch_size=, model.activation_checkpointing=) plus a cluster from conf/cluster/ (cluster.nodes=N sets
the node count; the world size is nodes x gpus_per_node). Prints the per-GPU memory and the step time of the
layout, or with --search every layout the trainer accepts for this model, cluster and global batch that fits,
fastest first.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import yaml

from model.config import ConfigError, ModelConfig, config_from_dict
from train.config import ParallelConfig, TrainConfig
from train.plan.cluster import ClusterConfig, load_cluster
from train.plan.predict import Prediction, describe, predict, search

CONF = Path(__file__).resolve().parents[2] / "conf"  # the training config Hydra composes


def compose(overrides: list[str]) -> dict[str, Any]:
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from omegaconf import OmegaConf

    import train.__main__  # noqa: F401  (registers the run-dir resolver conf/config.yaml uses)

    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = hydra_compose("config", overrides=[*overrides, "run_dir=unused"])
    return OmegaConf.to_container(cfg, resolve=True)


def _search_table(found: list[Prediction], top: int) -> str:
    head = f"{'tp':>3} {'cp':>3} {'pp':>3} {'dp':>5} {'ep':>3} {'zero':>4} {'mb':>3} {'recompute':>9} {'GB/GPU':>7} " \
           f"{'step s':>8} {'tok/s/GPU':>10} {'MFU':>6}"
    rows = [head]
    for p in found[:top]:
        lay = p.layout
        rows.append(f"{lay.tp:>3} {lay.cp:>3} {lay.pp:>3} {lay.dp:>5} {lay.ep:>3} {p.zero_stage:>4} {p.micro_batch:>3} "
                    f"{p.recompute:>9} {p.memory_per_gpu_gb:>7.1f} {p.time.total:>8.3f} "
                    f"{p.tokens_per_s_per_gpu:>10,.0f} {100 * p.mfu:>5.1f}%")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["calibrate"]:
        from train.plan.calibrate import main as calibrate

        return calibrate(argv[1:])
    parser = argparse.ArgumentParser(prog="python -m train.plan", description=__doc__.split("\n\n")[0])
    parser.add_argument("overrides", nargs="*", help="Hydra overrides as for training, and cluster=NAME, cluster.KEY=V")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--search", action="store_true", help="rank every valid layout that fits")
    parser.add_argument("--top", type=int, default=15, help="rows of --search to print")
    parser.add_argument("--budget-gpu-hours", type=float, help="the best model for this many GPU-hours (needs --fit)")
    parser.add_argument("--fit", help="report.json of `python -m train.scaling report` (the fitted L(N, D))")
    parser.add_argument("--out", help="with --budget-gpu-hours: write the chosen model's config here (for model=)")
    args = parser.parse_args(argv)
    cluster_args = [o for o in args.overrides if o.split("=", 1)[0].split(".")[0] == "cluster"]
    try:
        cluster = load_cluster(cluster_args)
        cfg = compose([o for o in args.overrides if o not in cluster_args])
        model = ModelConfig.from_dict(cfg["model"])
        parallel = config_from_dict(ParallelConfig, cfg["parallel"], "parallel")
        train = config_from_dict(TrainConfig, cfg["train"], "train")
        if train.seq_len > model.max_seq_len:
            raise ConfigError("train.seq_len", f"{train.seq_len} exceeds model.max_seq_len={model.max_seq_len}")
        if args.budget_gpu_hours is not None:
            return _budget(args, model, train, cluster)
        if args.search:
            found = search(model, train, cluster)
            if args.json:
                print(json.dumps([p.as_json() for p in found[: args.top]], indent=1))
            else:
                print(f"{len(found)} layouts fit on {cluster.world_size} x {cluster.name} for {model.name}, "
                      f"global batch {train.global_batch_size} x {train.seq_len}; fastest first:")
                print(_search_table(found, args.top))
            return 0
        dp = parallel.validate(cluster.world_size, model)
        train.validate(dp, model, parallel)
        p = predict(model, parallel, cluster, seq_len=train.seq_len, micro_batch=train.micro_batch_size,
                    global_batch=train.global_batch_size)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(p.as_json(), indent=1))
    else:
        print(describe(model, p, cluster, train.seq_len, train.global_batch_size))
    return 0


def _budget(args: argparse.Namespace, model: ModelConfig, train: TrainConfig, cluster: ClusterConfig) -> int:
    from train.plan.budget import Fit, plan_budget

    if not args.fit:
        raise ConfigError("--fit", "--budget-gpu-hours needs the fitted law: --fit runs/scaling/report.json")
    if args.budget_gpu_hours <= 0:
        raise ConfigError("--budget-gpu-hours", f"must be positive, got {args.budget_gpu_hours}")
    plan = plan_budget(model, train, cluster, args.budget_gpu_hours, Fit.from_report(args.fit))
    shape = plan.as_json()["model"]
    if args.out:
        Path(args.out).write_text(yaml.safe_dump(shape, sort_keys=False))
    if args.json:
        print(json.dumps(plan.as_json(), indent=1))
        return 0
    lay, iv = plan.prediction.layout, plan.loss_interval
    interval = f" ({iv[0]:.4f} to {iv[1]:.4f}, bootstrap)" if iv else ""
    print(f"{args.budget_gpu_hours:g} GPU-hours on {cluster.world_size} x {cluster.name}: "
          f"{plan.flops:.3g} FLOPs at MFU {100 * plan.prediction.mfu:.1f}%")
    print(f"model: d_model {plan.model.d_model}, n_layers {plan.model.n_layers}, n_heads {plan.model.n_heads}, "
          f"{plan.n_params / 1e9:.4g}B parameters (compute-optimal for these FLOPs: {plan.n_opt / 1e9:.4g}B)")
    print(f"tokens: {plan.tokens:.4g} | layout tp {lay.tp} cp {lay.cp} pp {lay.pp} dp {lay.dp} ep {lay.ep} "
          f"ZeRO-{plan.prediction.zero_stage} micro-batch {plan.prediction.micro_batch} "
          f"recompute {plan.prediction.recompute} | {plan.prediction.tokens_per_s_per_gpu:,.0f} tokens/s per GPU")
    print(f"predicted loss: {plan.predicted_loss:.4f}{interval} | wall-clock {plan.wall_clock_s / 3600:.1f} h")
    print(f"model config{f' written to {args.out}' if args.out else ''} (for conf/model/):")
    print(yaml.safe_dump(shape, sort_keys=False).rstrip())
    return 0


if __name__ == "__main__":
    sys.exit(main())
