#!/usr/bin/env python
"""Soak test (`make soak`): a 2-rank dense_tiny ZeRO-2 run under repeated SIGKILLs of one of its ranks.

For ``--minutes`` of wall time the run is SIGKILLed every few minutes (one worker rank picked at random, never
torchrun itself), left to die, and relaunched with ``train.resume=auto``; kills stop ``--final-minutes`` before the
end so the run finishes its steps. An uninterrupted reference run of the same config and steps follows (it adds
about ``steps x step time``). Both run a copy of the code taken at the start, so edits to the working tree during the
soak do not mix versions. The checks (scripts/soak_checks.py): every step 1..N logged exactly once, the batch
indices of the reference (when records carry ``batch``), the final loss equal to the reference's, each launch's
processes gone when it ends, per-rank RSS flat (< ``--rss-limit``) in launches long enough to judge. Prints a
report, writes ``<soak-dir>/report.json`` and exits 1 when a check fails.

    .venv/bin/python scripts/soak.py            # 30 min, kills every 2-5 min (what `make soak` runs)
    .venv/bin/python scripts/soak.py --minutes 6.5 --kill-min 0.4 --kill-max 0.6 --final-minutes 4.5 \\
        --ckpt-minutes 0.25                       # a rehearsal: 2 kills, ~12 min with the reference
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import psutil

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # `python scripts/soak.py` puts scripts/, not the repository, on the path
from scripts.soak_checks import judge, plan_steps, rss_growth, step_seconds, train_records

NPROC = 2
BASE_OVERRIDES = ["model=dense_tiny", "parallel=zero2", "data=sample", "logging=none", "logging.log_every=1"]
CODE_DIRS = ("train", "model", "data", "launch", "conf")  # what `python -m train` imports and reads


def snapshot_code(dest: Path) -> dict[str, Any]:
    """Copies the trainer's packages and configs to ``dest`` (the launches run there; artifacts/ is linked)."""
    shutil.rmtree(dest, ignore_errors=True)
    for name in CODE_DIRS:
        shutil.copytree(REPO / name, dest / name, ignore=shutil.ignore_patterns("__pycache__"))
    (dest / "artifacts").symlink_to(REPO / "artifacts")

    def git(*cmd: str) -> str:
        return subprocess.run(["git", *cmd], check=False, cwd=REPO, capture_output=True, text=True).stdout.strip()

    uncommitted = git("status", "--porcelain", "--", *CODE_DIRS).splitlines()
    return {"commit": git("rev-parse", "HEAD"), "uncommitted": uncommitted}


def _checkpoint_step(run_dir: Path) -> int:
    name = _latest(run_dir) or ""
    return int(name.removeprefix("step_")) if name.removeprefix("step_").isdigit() else 0


def _latest(run_dir: Path) -> str | None:
    try:
        return os.readlink(run_dir / "checkpoints" / "latest")
    except OSError:
        return None


def _last_step(metrics: Path) -> int:
    """The step of the last train record (reads only the file's tail)."""
    try:
        with metrics.open("rb") as f:
            f.seek(max(0, f.seek(0, os.SEEK_END) - 4096))
            lines = f.read().decode(errors="replace").splitlines()
    except OSError:
        return 0
    for line in reversed(lines):
        try:
            record = json.loads(line)
        except ValueError:
            continue  # the first, cut line of the tail, or a line being written
        if "loss" in record:
            return int(record["step"])
    return 0


def _ranks(agent: psutil.Process) -> dict[int, psutil.Process]:
    """The worker processes torchrun started, by local rank (its direct children; their DataLoader workers are
    theirs)."""
    ranks = {}
    for child in agent.children():
        try:
            local = child.environ().get("LOCAL_RANK")
        except psutil.Error:
            continue
        if local is not None:
            ranks[int(local)] = child
    return ranks


def _alive(p: psutil.Process) -> bool:
    try:
        return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def _kill_all(procs: list[psutil.Process]) -> None:
    for p in procs:
        try:
            p.kill()  # psutil checks the pid still names the same process
        except psutil.Error:
            pass


class Soak:
    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.dir = Path(args.soak_dir).resolve()
        self.code = self.dir / "code"
        self.t0 = time.monotonic()
        self.rng = random.Random(args.seed)
        self.kills: list[dict[str, Any]] = []
        self.launches: list[dict[str, Any]] = []
        self.steps = 0
        self._procs: list[psutil.Process] = []  # the running job's, for clean-up on interrupt
        self.rss_log: Any = None  # rss.jsonl, open while launches run

    def elapsed(self) -> float:
        return time.monotonic() - self.t0

    def _progress(self, label: str, step: int, rss: dict[int, int]) -> None:
        e = int(self.elapsed())
        mem = " ".join(f"r{r} {rss[r] / 2**20:.0f}M" for r in sorted(rss)) or "-"
        print(f"[soak {e // 60:02d}:{e % 60:02d}] {label} | step {step}/{self.steps or '?'} | kills {len(self.kills)} "
              f"| rss {mem}", flush=True)

    def launch(self, label: str, run_dir: Path, overrides: list[str], kill_at: float | None) -> dict[str, Any]:
        """Runs one torchrun job to its end (or kills a rank at ``kill_at`` on the soak clock and waits for the job
        to die); returns what happened, with per-rank RSS samples."""
        a = self.args
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(NPROC),
               "-m", "train", *BASE_OVERRIDES, *a.overrides, *overrides, f"run_dir={run_dir}"]
        env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                                 "MASTER_PORT", "LOCAL_WORLD_SIZE")}
        metrics = run_dir / "metrics.jsonl"
        latest_seen = _latest(run_dir)
        info: dict[str, Any] = {"label": label, "start_s": self.elapsed(), "start_step": _checkpoint_step(run_dir),
                                "log": str(self.dir / "logs" / f"{label}.log"), "outcome": None, "warm_s": None,
                                "first_record_s": None, "last_record_s": None, "stragglers": []}
        samples: dict[int, list[tuple[float, int]]] = {}
        with open(info["log"], "w") as log:
            proc = subprocess.Popen(cmd, cwd=self.code, env=env, stdout=log, stderr=subprocess.STDOUT,
                                    start_new_session=True)
        agent = psutil.Process(proc.pid)
        seen: dict[int, psutil.Process] = {}
        self._procs = [agent]
        next_sample = next_progress = time.monotonic()
        last_step, last_change = _last_step(metrics), time.monotonic()
        if info["start_step"]:
            print(f"[soak] {label}: resumes from the checkpoint at step {info['start_step']}", flush=True)
        rss: dict[int, int] = {}
        while proc.poll() is None:
            now = time.monotonic()
            try:
                for p in agent.children(recursive=True):
                    seen.setdefault(p.pid, p)
            except psutil.Error:
                pass
            self._procs = [agent, *seen.values()]
            ranks = _ranks(agent) if _alive(agent) else {}
            step = _last_step(metrics)
            if step != last_step:
                last_step, last_change = step, now
                info["last_record_s"] = self.elapsed()
                info["first_record_s"] = info["first_record_s"] or self.elapsed()
            if _latest(run_dir) != latest_seen:
                latest_seen = _latest(run_dir)
                # Warm: the first checkpoint done --rss-warmup after the first step (allocators and caches settled).
                first = info["first_record_s"]
                if info["warm_s"] is None and first is not None and self.elapsed() - first >= a.rss_warmup:
                    info["warm_s"] = self.elapsed()
            if now >= next_sample:
                next_sample = now + a.rss_every
                rss = self._sample(label, ranks, samples)
            if now >= next_progress:
                next_progress = now + a.progress_every
                self._progress(label, step, rss)
            if kill_at is not None and self.elapsed() >= kill_at and ranks:
                rank = self.rng.choice(sorted(ranks))
                victim = ranks[rank]
                victim.kill()
                ckpt = _checkpoint_step(run_dir)
                self.kills.append({"at_s": round(self.elapsed(), 1), "launch": label, "rank": rank,
                                   "pid": victim.pid, "step": step, "checkpoint_step": ckpt})
                print(f"[soak] SIGKILL rank {rank} (pid {victim.pid}) at step {step}, last checkpoint {ckpt}",
                      flush=True)
                kill_at, info["killed_rank"] = None, rank
                try:
                    proc.wait(timeout=a.die_timeout)
                except subprocess.TimeoutExpired:
                    info["outcome"] = f"hung: still running {a.die_timeout:.0f} s after the kill"
            elif now - last_change > a.stall_timeout:
                info["outcome"] = f"hung: no step logged for {a.stall_timeout:.0f} s"
            if info["outcome"]:
                _kill_all([agent, *seen.values()])
                proc.wait()
                break
            time.sleep(0.5)
        info["rc"] = proc.returncode
        info["end_s"] = self.elapsed()
        info["end_step"] = _last_step(metrics)
        if info["outcome"] is None:  # exit 0 after a kill: it landed while the job was ending
            info["outcome"] = "finished" if proc.returncode == 0 else "killed" if "killed_rank" in info else "crashed"
        info["stragglers"] = self._stragglers(list(seen.values()))
        info["rss"] = {r: self._growth(s, info["warm_s"], info["last_record_s"]) for r, s in samples.items()}
        self._procs = []
        self.launches.append(info)
        if info["outcome"] not in ("killed", "finished"):
            tail = Path(info["log"]).read_text(errors="replace").splitlines()[-15:]
            print(f"[soak] {label}: {info['outcome']} (exit {info['rc']}); end of {info['log']}:", flush=True)
            print("\n".join("    " + line for line in tail), flush=True)
        return info

    def _sample(self, label: str, ranks: dict[int, psutil.Process], samples: dict) -> dict[int, int]:
        rss = {}
        for rank, p in ranks.items():
            try:
                rss[rank] = p.memory_info().rss
                workers = sum(c.memory_info().rss for c in p.children(recursive=True))
            except psutil.Error:
                continue
            samples.setdefault(rank, []).append((self.elapsed(), rss[rank]))
            self.rss_log.write(json.dumps({"launch": label, "t": round(self.elapsed(), 1), "rank": rank,
                                            "rss": rss[rank], "workers_rss": workers}) + "\n")
        self.rss_log.flush()
        return rss

    def _growth(self, samples: list[tuple[float, int]], warm_s: float | None, end_s: float | None) -> dict[str, Any]:
        growth = rss_growth(samples, warm_s, end_s)
        peak = max((rss for _, rss in samples), default=0)
        if growth is None:
            return {"growth": None, "judged_s": 0.0, "judged": False, "peak": peak}
        frac, span = growth
        judged = span >= self.args.rss_min_minutes * 60
        return {"growth": round(frac, 5), "judged_s": round(span, 1), "judged": judged, "peak": peak}

    def _stragglers(self, procs: list[psutil.Process]) -> list[str]:
        """The job's processes still alive after it ended (given 30 s), killed and named."""
        deadline = time.monotonic() + 30
        while any(_alive(p) for p in procs) and time.monotonic() < deadline:
            time.sleep(0.5)
        left = [p for p in procs if _alive(p)]
        names = []
        for p in left:
            try:
                names.append(f"pid {p.pid}: {' '.join(p.cmdline())[:120]}")
            except psutil.Error:
                names.append(f"pid {p.pid}")
        _kill_all(left)
        return names

    def cleanup(self) -> None:
        _kill_all(self._procs)


# ---------------------------------------------------------------- the soak

def calibrate(soak: Soak) -> dict[str, float]:
    """A short run timed for start-up, step and end (final checkpoint, eval, exit)."""
    a = soak.args
    run_dir = soak.dir / "calibrate"
    n = a.calibrate_steps
    info = soak.launch("calibrate", run_dir, [f"train.steps={n}", f"train.ckpt_every={n}", "train.resume=never"], None)
    if info["outcome"] != "finished" or info["first_record_s"] is None:
        raise SystemExit(f"soak: the calibration run failed ({info['outcome']}); see {info['log']}")
    step_s = step_seconds(train_records(run_dir / "metrics.jsonl"))
    startup_s = info["first_record_s"] - info["start_s"] - step_s
    end_s = info["end_s"] - info["last_record_s"]
    return {"step_s": step_s, "startup_s": max(0.0, startup_s), "end_s": max(0.0, end_s)}


def soak_phase(soak: Soak, ckpt_every: int) -> None:
    a = soak.args
    run_dir = soak.dir / "run"
    budget_end = a.minutes * 60
    kills_until = budget_end - a.final_minutes * 60
    overrides = [f"train.steps={soak.steps}", f"train.ckpt_every={ckpt_every}", "train.resume=auto"]
    failures = 0
    for n in range(1, 1000):
        kill_at = soak.elapsed() + soak.rng.uniform(a.kill_min * 60, a.kill_max * 60) if a.kill_max > 0 else None
        if kill_at is not None and kill_at > kills_until:
            kill_at = None  # the final stretch: no more kills, the run finishes its steps
        info = soak.launch(f"launch_{n:02d}", run_dir, overrides, kill_at)
        if info["outcome"] == "finished":
            return
        if info["outcome"] != "killed":
            failures += 1
            if failures > a.max_failures:
                print(f"[soak] giving up after {failures} launches that failed on their own", flush=True)
                return
        if soak.elapsed() > 2 * budget_end + 600:
            print("[soak] giving up: far past the time budget without finishing", flush=True)
            return


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("overrides", nargs="*", help="extra Hydra overrides for every launch (e.g. train.seq_len=64)")
    p.add_argument("--minutes", type=float, default=30,
                   help="wall time of calibration and killed run (the reference follows)")
    p.add_argument("--kill-min", type=float, default=2, help="minutes from a launch to its kill, at least")
    p.add_argument("--kill-max", type=float, default=5, help="... at most (uniform; 0: never kill)")
    p.add_argument("--final-minutes", type=float, default=5, help="no kills in this last stretch of --minutes")
    p.add_argument("--ckpt-minutes", type=float, default=1, help="checkpoint interval in wall time")
    p.add_argument("--ckpt-every", type=int, help="checkpoint interval in steps (instead of --ckpt-minutes)")
    p.add_argument("--steps", type=int, help="train.steps (default: what fills --minutes at the measured speed)")
    p.add_argument("--calibrate-steps", type=int, default=50, help="steps of the timing run")
    p.add_argument("--seed", type=int, default=0, help="seeds the kill times and the choice of rank")
    p.add_argument("--rss-every", type=float, default=5, help="seconds between RSS samples")
    p.add_argument("--rss-warmup", type=float, default=90, help="warm-up ends at the first checkpoint this many s "
                   "after a launch's first step (RSS climbs by ~10%% in the first minute or so)")
    p.add_argument("--rss-limit", type=float, default=0.05, help="largest RSS growth allowed after warm-up")
    p.add_argument("--rss-min-minutes", type=float, default=3, help="judge RSS of launches this long past warm-up")
    p.add_argument("--loss-rtol", type=float, default=1e-4, help="final loss vs reference, relative")
    p.add_argument("--die-timeout", type=float, default=120, help="seconds a killed job may take to end")
    p.add_argument("--stall-timeout", type=float, default=300, help="seconds without a logged step that mean a hang")
    p.add_argument("--max-failures", type=int, default=2, help="launches failing on their own before giving up")
    p.add_argument("--progress-every", type=float, default=30, help="seconds between progress lines")
    p.add_argument("--soak-dir", default=str(REPO / "runs" / "soak"), help="artifacts (replaced by each soak)")
    a = p.parse_args(argv)
    if a.kill_max and a.kill_max < a.kill_min:
        p.error(f"--kill-max {a.kill_max} is below --kill-min {a.kill_min}; pass a range, e.g. 2 and 5")
    return a


def run_all(soak: Soak, report: dict[str, Any]) -> None:
    """Calibration, the soak and the reference; fills ``report``."""
    a = soak.args
    calib = None
    if a.steps is None or a.ckpt_every is None:
        calib = calibrate(soak)
        print(f"[soak] calibration: {calib['step_s']:.3f} s/step, start-up {calib['startup_s']:.1f} s, "
              f"end {calib['end_s']:.1f} s", flush=True)
    ckpt_every = a.ckpt_every or max(1, round(a.ckpt_minutes * 60 / calib["step_s"]))
    soak.steps, expected_kills = a.steps, None
    if soak.steps is None:
        soak.steps, expected_kills = plan_steps(
            a.minutes * 60 - soak.elapsed(), calib["step_s"], calib["startup_s"], calib["end_s"],
            a.kill_min * 60, a.kill_max * 60, a.final_minutes * 60, ckpt_every * calib["step_s"])
    if soak.steps < 2 * ckpt_every:
        raise SystemExit(f"soak: {soak.steps} steps do not span two checkpoints of {ckpt_every} steps; "
                         "raise --minutes or lower --ckpt-minutes")
    report.update(calibration=calib, steps=soak.steps, ckpt_every=ckpt_every, expected_kills=expected_kills)
    ref_min = f"~{soak.steps * calib['step_s'] / 60:.1f} min" if calib else "its own time"
    print(f"[soak] train.steps={soak.steps} train.ckpt_every={ckpt_every}, ~{expected_kills} kills expected; "
          f"the reference run then adds {ref_min}", flush=True)
    soak_phase(soak, ckpt_every)
    report["soak_s"] = round(soak.elapsed(), 1)
    soak.launch("reference", soak.dir / "reference",
                [f"train.steps={soak.steps}", f"train.ckpt_every={ckpt_every}", "train.resume=never"], None)


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    soak = Soak(a)
    for sub in ("calibrate", "run", "reference", "logs", "code", "report.json", "rss.jsonl"):
        path = soak.dir / sub
        shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)
    (soak.dir / "logs").mkdir(parents=True)
    report: dict[str, Any] = {"args": vars(a), "code": snapshot_code(soak.code)}
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        with (soak.dir / "rss.jsonl").open("w") as soak.rss_log:
            run_all(soak, report)
    except KeyboardInterrupt:
        soak.cleanup()
        print("[soak] interrupted; the job's processes are killed", file=sys.stderr, flush=True)
        return 130
    soak_recs = train_records(soak.dir / "run" / "metrics.jsonl")
    ref_recs = train_records(soak.dir / "reference" / "metrics.jsonl")
    launches = [i for i in soak.launches if i["label"] != "calibrate"]
    checks = judge(a, soak.steps, launches, soak.kills, soak_recs, ref_recs)
    passed = all(c["status"] != "fail" for c in checks)
    report.update(total_s=round(soak.elapsed(), 1), kills=soak.kills, launches=soak.launches, checks=checks,
                  passed=passed)
    (soak.dir / "report.json").write_text(json.dumps(report, indent=1))
    ref = soak.launches[-1]
    print("-" * 72)
    print(f"soak {report['soak_s'] / 60:.1f} min: {len(soak.kills)} kills, {soak.steps} steps; reference run "
          f"{(ref['end_s'] - ref['start_s']) / 60:.1f} min")
    for c in checks:
        print(f"{c['status']:>4}  {c['name']:<11} {c['detail']}")
    print(f"{'PASS' if passed else 'FAIL'}: {soak.dir / 'report.json'}", flush=True)
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
