"""The planner's step time against the trainer's, on this machine: several layouts of one model on 2 ranks.

    .venv/bin/python -m train.plan calibrate          # once: conf/cluster/cpu_local.yaml
    .venv/bin/python bench/plan_check.py [--steps 30] [--repeats 2]

Each layout trains `--steps` steps with torchrun (2 ranks, one thread each); the measured figure is the median of
the run's step times after the first (every step logged; the trainer's mean `measured/step_time_s` when none), the
predicted one `plan/step_time_s` logged by the same run (cluster cpu_local). Prints per layout: predicted, measured (min and spread over repeats), the
relative error, and whether the predicted order of layouts matches the measured one wherever the measured times
differ by more than their run-to-run spread. Other processes on the machine distort both: run it when the 1-minute
load average is under 1.0 and no tests run; it prints the load average before every run.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from launch.allocator import allocator_env

BASE = ["model=dense_tiny", "data=sample", "logging=none", "logging.log_every=1", "train.seq_len=256",
        "train.micro_batch_size=2", "train.global_batch_size=16", "train.eval_batches=1", "sched.warmup_steps=2",
        "train.ckpt_every=1000"]
LAYOUTS = {
    "zero0": ["parallel=zero0"],
    "zero1": ["parallel=zero1"],
    "zero2": ["parallel=zero2"],
    "zero3": ["parallel=zero3"],
    "zero2-full-recompute": ["parallel=zero2", "model.activation_checkpointing=full"],
    "zero2-mb8": ["parallel=zero2", "train.micro_batch_size=8"],
    "tp2": ["parallel=tp2"],
    "pp2": ["parallel=pp2"],
}


def run(name: str, overrides: list[str], steps: int) -> tuple[float, float]:
    with tempfile.TemporaryDirectory(prefix=f"plan_check_{name}") as tmp:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "train",
               *BASE, *overrides, f"train.steps={steps}", f"run_dir={tmp}/run"]
        # The allocator `python -m launch.run` gives CPU runs (and `train.plan calibrate` measures under).
        env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO), **allocator_env("auto"))
        proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            raise SystemExit(f"{name} failed:\n{proc.stderr[-3000:]}")
        rows = [json.loads(ln) for ln in Path(tmp, "run", "metrics.jsonl").read_text().splitlines()]
        last = [r for r in rows if "measured/step_time_s" in r][-1]
        # Every step is logged with its own throughput: the median step after the first resists a burst of load
        # from another process better than the trainer's mean.
        tokens_per_step = 16 * 256
        times = [tokens_per_step / r["tokens_per_s"] for r in rows if "tokens_per_s" in r and r["step"] >= 2]
        return last["plan/step_time_s"], statistics.median(times) if times else last["measured/step_time_s"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--repeats", type=int, default=2, help="runs per layout (interleaved)")
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args()
    measured: dict[str, list[float]] = {name: [] for name in LAYOUTS}
    predicted: dict[str, float] = {}
    for _, (name, overrides) in itertools.product(range(args.repeats), LAYOUTS.items()):
        load = os.getloadavg()[0]
        pred, meas = run(name, overrides, args.steps)
        predicted[name] = pred
        measured[name].append(meas)
        print(f"  {name:<22} predicted {pred:.4f} s  measured {meas:.4f} s  (load average before {load:.2f})",
              flush=True)
    print(f"\n{'layout':<22} {'predicted s':>11} {'measured s':>10} {'spread':>7} {'error':>7}")
    errors = {}
    for name in LAYOUTS:
        best = min(measured[name])
        spread = (max(measured[name]) - best) / best
        errors[name] = predicted[name] / best - 1
        print(f"{name:<22} {predicted[name]:>11.4f} {best:>10.4f} {100 * spread:>6.1f}% {100 * errors[name]:>+6.1f}%")
    pairs = disagree = 0
    for a, b in itertools.combinations(LAYOUTS, 2):
        ma, mb = min(measured[a]), min(measured[b])
        noise = max(max(measured[a]) - ma, max(measured[b]) - mb)
        if abs(ma - mb) <= noise:
            continue
        pairs += 1
        disagree += (ma < mb) != (predicted[a] < predicted[b])
    worst = max(abs(e) for e in errors.values())
    print(f"\nlargest |error| {100 * worst:.1f}%; order matches the measurement on {pairs - disagree} of {pairs} pairs "
          "whose measured times differ by more than their spread")
    if args.json:
        Path(args.json).write_text(json.dumps({"predicted": predicted, "measured": measured, "errors": errors,
                                               "pairs": pairs, "disagree": disagree}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
