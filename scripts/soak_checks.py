"""The soak test's planning and checks (scripts/soak.py): pure functions of measured times, metrics records and
RSS samples, so that tests/test_soak_script.py can show each check catching the fault it exists for."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

from scipy.stats import theilslopes

DIE_S = 10.0  # a guess at kill -> torchrun gone, for planning only (the agent tears the other rank down in seconds)


def plan_steps(budget_s: float, step_s: float, startup_s: float, end_s: float, kill_min_s: float,
               kill_max_s: float, final_s: float, ckpt_s: float) -> tuple[int, int]:
    """(train.steps, expected kills) that fill ``budget_s``: each kill costs the dying, a fresh start-up and on
    average half a checkpoint interval of steps done again."""
    kills = int(max(0.0, budget_s - final_s) // ((kill_min_s + kill_max_s) / 2 + DIE_S)) if kill_max_s > 0 else 0
    overhead = (kills + 1) * startup_s + kills * (DIE_S + ckpt_s / 2) + end_s
    return max(1, int((budget_s - overhead) / step_s)), kills


def train_records(path: Path) -> list[dict[str, Any]]:
    """The train records of a metrics.jsonl (eval and diagnostics records carry no ``loss``). A line cut by a kill
    is skipped: its step then shows up as missing."""
    if not path.exists():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except ValueError:
            continue
    return [r for r in records if isinstance(r, dict) and "loss" in r]


def step_seconds(records: list[dict[str, Any]]) -> float:
    """Seconds per step from the logged throughput: the lower quartile, since other work on a shared machine only
    ever slows steps down (a soak that runs past its budget beats one that ends early). The first record after a
    start includes start-up and is left out."""
    times = sorted(r["tokens"] / r["step"] / r["tokens_per_s"] for r in records[1:] if r.get("tokens_per_s"))
    if not times:
        raise ValueError("no train records after the first to time a step; run more calibration steps")
    return times[len(times) // 4]


def check_steps(records: list[dict[str, Any]], steps: int) -> tuple[bool, str]:
    counts = Counter(r["step"] for r in records)
    missing = [s for s in range(1, steps + 1) if counts[s] == 0]
    repeated = sorted(s for s, n in counts.items() if n > 1)
    extra = sorted(s for s in counts if not 1 <= s <= steps)
    if not (missing or repeated or extra):
        return True, f"steps 1..{steps} each logged once"
    return False, f"missing {few(missing)}, logged more than once {few(repeated)}, outside 1..{steps} {few(extra)}"


def check_batches(soak: list[dict[str, Any]], ref: list[dict[str, Any]]) -> tuple[str, str]:
    """'ok' / 'fail' / 'skip' (records carry no ``batch``): the soak consumed the reference's batches, in order,
    each once."""
    if not any("batch" in r for r in soak + ref):
        return "skip", "records carry no batch index"
    soak_batches = [r.get("batch") for r in sorted(soak, key=lambda r: r["step"])]
    ref_batches = [r.get("batch") for r in sorted(ref, key=lambda r: r["step"])]
    if soak_batches != ref_batches:
        differ = [i + 1 for i, (a, b) in enumerate(zip(soak_batches, ref_batches, strict=False)) if a != b]
        return "fail", f"batch indices differ from the reference at steps {few(differ)}"
    repeated = sorted(b for b, n in Counter(soak_batches).items() if n > 1)
    if repeated:
        return "fail", f"batches consumed more than once: {few(repeated)}"
    return "ok", f"{len(soak_batches)} batch indices equal the reference's, each consumed once"


def loss_diffs(soak: list[dict[str, Any]], ref: list[dict[str, Any]], steps: int) -> dict[str, Any]:
    """The final losses and their difference, and the largest relative difference over all steps both logged."""
    soak_loss = {r["step"]: r["loss"] for r in soak}
    ref_loss = {r["step"]: r["loss"] for r in ref}
    common = sorted(soak_loss.keys() & ref_loss.keys())
    rel = [abs(soak_loss[s] - ref_loss[s]) / max(abs(ref_loss[s]), 1e-12) for s in common]
    final = {"soak": soak_loss.get(steps), "reference": ref_loss.get(steps)}
    if None not in final.values():
        final["abs_diff"] = abs(final["soak"] - final["reference"])
        final["rel_diff"] = final["abs_diff"] / max(abs(final["reference"]), 1e-12)
    worst = max(range(len(common)), key=rel.__getitem__, default=None)
    return {"final": final, "curve_max_rel_diff": None if worst is None else rel[worst],
            "curve_worst_step": None if worst is None else common[worst], "common_steps": len(common)}


def rss_growth(samples: list[tuple[float, int]], warm_t: float | None, end_t: float | None = None
               ) -> tuple[float, float] | None:
    """(growth fraction, judged seconds) of RSS between ``warm_t`` and ``end_t`` (the last step, before the final
    eval and exit), along a Theil-Sen line: RSS steps up and back down by 10-20% around allocations (a checkpoint,
    the allocator's caches), which a robust trend ignores and a leak does not escape. None below three samples."""
    end_t = float("inf") if end_t is None else end_t
    inside = [(t, rss) for t, rss in samples if warm_t is not None and warm_t <= t <= end_t]
    if len(inside) < 3:
        return None
    t, rss = zip(*inside, strict=True)
    slope, intercept = theilslopes(rss, t)[:2]
    return (intercept + slope * t[-1]) / (intercept + slope * t[0]) - 1.0, t[-1] - t[0]


def few(values: list[Any], n: int = 8) -> str:
    more = f" (+{len(values) - n} more)" if len(values) > n else ""
    return ", ".join(map(str, values[:n])) + more if values else "none"


def judge(args: Any, steps: int, launches: list[dict[str, Any]], kills: list[dict[str, Any]],
          soak_recs: list[dict[str, Any]], ref_recs: list[dict[str, Any]]) -> list[dict[str, str]]:
    """Every check as {name, status (ok | fail | skip), detail}. ``launches``: the soak's, then the reference."""
    *soaked, ref = launches
    checks: list[dict[str, str]] = []

    def add(name: str, status: bool | str, detail: str) -> None:
        status = ("ok" if status else "fail") if isinstance(status, bool) else status
        checks.append({"name": name, "status": status, "detail": detail})

    add("kills", len(kills) > 0 or args.kill_max == 0, f"{len(kills)} kills, {len(soaked) - 1} relaunches")
    bad = [f"{i['label']}: {i['outcome']} (exit {i['rc']})" for i in soaked
           if i["outcome"] not in ("killed", "finished")]
    add("launches", not bad, "each kill ended its job; no other launch failed" if not bad else "; ".join(bad))
    last = soaked[-1] if soaked else {"outcome": "never launched", "end_step": 0}
    add("finished", last["outcome"] == "finished" and last["end_step"] == steps,
        f"the last launch ended {last['outcome']} at step {last['end_step']} of {steps}")
    add("reference", ref["outcome"] == "finished" and ref["end_step"] == steps,
        f"{ref['outcome']} at step {ref['end_step']} of {steps}")
    stray = [s for i in launches for s in i["stragglers"]]
    add("processes", not stray, "every launch's processes gone when it ended" if not stray else "; ".join(stray))
    add("steps", *check_steps(soak_recs, steps))
    add("batches", *check_batches(soak_recs, ref_recs))
    diffs = loss_diffs(soak_recs, ref_recs, steps)
    final = diffs["final"]
    if "rel_diff" in final:
        exact = ", bit-exact" if final["abs_diff"] == 0 else ""
        add("final_loss", final["rel_diff"] <= args.loss_rtol,
            f"soak {final['soak']:.9g} reference {final['reference']:.9g} diff {final['abs_diff']:.3g} "
            f"(relative {final['rel_diff']:.3g}, limit {args.loss_rtol:g}{exact})")
    else:
        add("final_loss", False, f"step {steps} not logged: soak {final['soak']}, reference {final['reference']}")
    worst = diffs["curve_max_rel_diff"]
    add("loss_curve", worst is not None and worst <= args.loss_rtol,
        f"largest relative difference over {diffs['common_steps']} steps: {worst:.3g} (step "
        f"{diffs['curve_worst_step']})" if worst is not None else "no step logged by both runs")
    judged, short = [], []
    for i in launches:
        for rank, r in sorted(i["rss"].items()):
            if r["growth"] is not None:
                text = f"{i['label']} r{rank} {100 * r['growth']:+.1f}% over {r['judged_s'] / 60:.1f} min"
                (judged if r["judged"] else short).append((text, r["growth"]))
    over = [t for t, g in judged if g >= args.rss_limit]
    detail = (f"growth after warm-up (limit {100 * args.rss_limit:g}%): " + "; ".join(t for t, _ in judged) if judged
              else f"no launch ran {args.rss_min_minutes:g} min past warm-up")
    add("rss", not over if judged else "skip", detail + (f"; too short to judge: {len(short)}" if short else ""))
    return checks
