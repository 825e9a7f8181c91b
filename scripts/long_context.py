#!/usr/bin/env python
"""Long context on CPU: hybrid_tiny at 32k tokens per sequence over 4 context-parallel ranks (not in `make test`).

1. Trains ``--steps`` steps of one 32k-token sequence each under torchrun (`parallel.cp=4`, gloo) and reports the
   loss at the start and the end.
2. Measures the bytes of activations each CP rank keeps for backward in one forward (every storage the forward
   leaves alive, `train.saved_activations`) beside one process holding the whole sequence, and the planner's formula
   (`train.memory.activations`) for a rank holding T / cp positions.

    .venv/bin/python scripts/long_context.py                       # 32k, cp 4, 12 steps (docs/parallelism.md)
    .venv/bin/python scripts/long_context.py --seq 8192 --steps 4  # a quicker rehearsal

Writes ``<out>/report.json`` and prints a summary; exits 1 if the loss did not fall.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # `python scripts/long_context.py` puts scripts/, not the repository, on the path
PYTHON = sys.executable


def overrides(seq: int, cp: int, steps: int, run_dir: Path) -> list[str]:
    return ["model=hybrid_tiny", f"model.max_seq_len={seq}", f"train.seq_len={seq}", "parallel=cp2",
            f"parallel.cp={cp}", "data=sample", "logging=none", "logging.log_every=1", "train.global_batch_size=1",
            "train.micro_batch_size=1", f"train.steps={steps}", "sched.warmup_steps=2", "optim.lr=3e-3",
            f"train.ckpt_every={steps}", "train.eval_every=0", f"run_dir={run_dir}"]


def compose(args: list[str], world: int):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from omegaconf import OmegaConf

    import train.__main__  # noqa: F401  (registers the run-dir resolver)
    from train.config import build_run_config

    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = hydra_compose("config", overrides=args)
    return build_run_config(OmegaConf.to_container(cfg, resolve=True), world_size=world)


def measure(args: list[str], out: Path) -> None:
    """One forward of the first sequence on this rank (all of it when the world is one process)."""
    import resource

    import torch
    import torch.distributed as dist

    from data.stream import GlobalBatchLoader
    from model.transformer import Transformer
    from train.engine import init_distributed
    from train.parallel.cp import split_sequence
    from train.parallel.dims import make_layout
    from train.parallel.groups import init_groups
    from train.parallel.init import build_parallel_model
    from train.saved_activations import saved_activation_bytes

    torch.set_num_threads(1)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    run = compose(args, world)
    if world > 1:
        init_distributed(torch.device("cpu"))
        layout = make_layout(run.parallel, run.model, world, dist.get_rank())
        model = build_parallel_model(run, init_groups(layout))
        rank, cp_rank, cp = layout.rank, layout.cp_rank, layout.cp
    else:
        torch.manual_seed(run.train.seed)
        model, rank, cp_rank, cp = Transformer(run.model), 0, 0, 1
    loader = GlobalBatchLoader(run.data, seq_len=run.train.seq_len, global_batch_size=1, micro_batch_size=1,
                               dp_rank=0, dp_size=1, seed=run.train.seed)
    tokens, labels = split_sequence(loader.batch(0)[0], cp_rank, cp)
    kept, loss = saved_activation_bytes(lambda: model.train()(tokens, labels=labels).loss)
    loss.backward()
    peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    (out / f"measure_cp{cp}_rank{rank}.json").write_text(json.dumps({"saved_bytes": kept, "peak_rss": peak_rss}))
    if world > 1:
        dist.barrier()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seq", type=int, default=32768)
    parser.add_argument("--cp", type=int, default=4)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--out", type=Path, default=REPO / "runs" / "long_context")
    parser.add_argument("--measure", action="store_true", help=argparse.SUPPRESS)  # internal: one rank's forward
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    run_dir = args.out / "run"
    train_args = overrides(args.seq, args.cp, args.steps, run_dir)
    if args.measure:
        measure(train_args, args.out)
        return 0

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    torchrun = [PYTHON, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={args.cp}"]
    print(f"[1/3] training {args.steps} steps of one {args.seq}-token sequence on {args.cp} CP ranks", flush=True)
    start = time.perf_counter()
    subprocess.run([*torchrun, "-m", "train", *train_args, "train.resume=never"], cwd=REPO, env=env, check=True)
    train_s = time.perf_counter() - start
    losses = [r["loss"] for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())
              if "loss" in r and "step" in r]
    print(f"[2/3] activations per CP rank ({args.cp} ranks)", flush=True)
    me = [str(Path(__file__).resolve()), "--measure", f"--seq={args.seq}", f"--out={args.out}"]
    subprocess.run([*torchrun, *me, f"--cp={args.cp}"], cwd=REPO, env=env, check=True)
    print("[3/3] activations of one process holding the whole sequence", flush=True)
    subprocess.run([PYTHON, *me, "--cp=1"], cwd=REPO, env={**env, "WORLD_SIZE": "1"}, check=True)

    from train.memory import activations

    ranks = [json.loads((args.out / f"measure_cp{args.cp}_rank{r}.json").read_text()) for r in range(args.cp)]
    one = json.loads((args.out / "measure_cp1_rank0.json").read_text())
    formula = activations(compose(train_args, args.cp).model, 1, args.seq // args.cp).saved
    report = {
        "seq_len": args.seq, "cp": args.cp, "steps": args.steps, "train_seconds": round(train_s, 1),
        "first_loss": losses[0], "last_loss": losses[-1], "losses": losses,
        "saved_bytes_per_rank": [r["saved_bytes"] for r in ranks], "saved_bytes_one_process": one["saved_bytes"],
        "formula_bytes_per_rank": formula, "peak_rss_per_rank": [r["peak_rss"] for r in ranks],
        "peak_rss_one_process": one["peak_rss"],
    }
    (args.out / "report.json").write_text(json.dumps(report, indent=2))
    gib = 2**30
    worst = max(report["saved_bytes_per_rank"])
    print(f"loss {losses[0]:.3f} -> {losses[-1]:.3f} over {args.steps} steps ({train_s:.0f} s)")
    print(f"saved activations per CP rank {worst / gib:.2f} GiB (formula {formula / gib:.2f}), one process "
          f"{one['saved_bytes'] / gib:.2f} GiB: {worst / one['saved_bytes']:.3f}x")
    print(f"peak RSS per CP rank {max(report['peak_rss_per_rank']) / gib:.2f} GiB, one process "
          f"{one['peak_rss'] / gib:.2f} GiB | {args.out / 'report.json'}")
    return 0 if losses[-1] < losses[0] else 1


if __name__ == "__main__":
    sys.exit(main())
