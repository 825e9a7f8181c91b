"""scripts/soak.py's checks (the soak itself, `make soak`, runs for an hour and is not part of the suite): each
check passes on a clean run and names the fault it exists to catch."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest

from scripts.soak_checks import (
    check_batches,
    check_steps,
    judge,
    loss_diffs,
    plan_steps,
    rss_growth,
    step_seconds,
    train_records,
)


def records(steps: range, batch: bool = False, loss: float = 5.0) -> list[dict]:
    return [{"step": s, "loss": loss + s, **({"batch": s - 1} if batch else {})} for s in steps]


def test_steps_each_once_passes_and_a_replayed_or_lost_step_fails():
    assert check_steps(records(range(1, 11)), 10)[0]
    # A resume whose metrics were not truncated logs the replayed steps twice.
    ok, detail = check_steps(records(range(1, 11)) + records(range(6, 9)), 10)
    assert not ok and "more than once 6, 7, 8" in detail
    ok, detail = check_steps([r for r in records(range(1, 11)) if r["step"] != 4], 10)
    assert not ok and "missing 4" in detail


def test_batches_match_the_reference_or_name_the_step_where_they_differ():
    assert check_batches(records(range(1, 6)), records(range(1, 6)))[0] == "skip"
    assert check_batches(records(range(1, 6), batch=True), records(range(1, 6), batch=True))[0] == "ok"
    replayed = records(range(1, 6), batch=True)
    replayed[3]["batch"] = 2  # the loader restarted one batch early after a resume
    status, detail = check_batches(replayed, records(range(1, 6), batch=True))
    assert status == "fail" and "at steps 4" in detail


def test_loss_diffs_bit_exact_and_off():
    same = loss_diffs(records(range(1, 6)), records(range(1, 6)), 5)
    assert same["final"]["abs_diff"] == 0 and same["curve_max_rel_diff"] == 0
    off = loss_diffs(records(range(1, 6), loss=5.001), records(range(1, 6)), 5)
    assert off["final"]["rel_diff"] == pytest.approx(0.001 / 10)
    assert loss_diffs(records(range(1, 5)), records(range(1, 6)), 5)["final"]["soak"] is None


def test_rss_growth_ignores_steps_up_and_back_and_measures_a_leak():
    # Flat at 500 with 20% bumps for 30 s of every 2 min (what a rank's RSS does around allocations).
    bumpy = [(float(t), 600 if t % 120 < 30 else 500) for t in range(0, 600, 5)]
    growth, span = rss_growth(bumpy, warm_t=100)
    assert growth == 0 and span == 495
    leaking = [(float(t), 1000 + t) for t in range(0, 600, 5)]  # 1 byte per second
    growth, _ = rss_growth(leaking, warm_t=100, end_t=400)
    assert growth == pytest.approx(1400 / 1100 - 1)
    assert rss_growth(bumpy, warm_t=None) is None


def test_plan_without_kills_fills_the_budget_with_steps():
    steps, kills = plan_steps(600, 0.5, startup_s=20, end_s=10, kill_min_s=0, kill_max_s=0, final_s=0, ckpt_s=60)
    assert kills == 0 and steps == (600 - 20 - 10) / 0.5
    with_kills, kills = plan_steps(1800, 0.2, 10, 5, 120, 300, 300, 60)
    assert kills > 0 and with_kills < 1800 / 0.2


def test_step_seconds_and_records_from_a_metrics_file(tmp_path):
    lines = [{"step": 1, "tokens": 100, "tokens_per_s": 1.0, "loss": 9.0},  # includes start-up: ignored
             {"step": 2, "tokens": 200, "tokens_per_s": 400.0, "loss": 8.0},
             {"step": 2, "tokens": 200, "eval_loss": 8.5},
             {"step": 3, "tokens": 300, "tokens_per_s": 500.0, "loss": 7.0}]
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in lines) + '{"step": 4, "tokens": 4')  # cut by a kill
    recs = train_records(path)
    assert [r["step"] for r in recs] == [1, 2, 3]
    assert "missing 4" in check_steps(recs, 4)[1]
    assert step_seconds(recs) == pytest.approx(0.2)  # 100 tokens a step at 400 and 500 tokens/s: the faster


def launch(label: str, outcome: str, end_step: int, growth: float | None = 0.0, judged: bool = True,
           stragglers: tuple[str, ...] = ()) -> dict:
    return {"label": label, "outcome": outcome, "rc": 0 if outcome == "finished" else -9, "end_step": end_step,
            "stragglers": list(stragglers), "rss": {0: {"growth": growth, "judged_s": 300.0, "judged": judged}}}


def test_judge_passes_a_clean_soak_and_fails_each_fault():
    args = SimpleNamespace(kill_max=5, loss_rtol=1e-4, rss_limit=0.05, rss_min_minutes=3)
    kills = [{"step": 7}]
    clean = [launch("launch_01", "killed", 7, judged=False), launch("launch_02", "finished", 10),
             launch("reference", "finished", 10)]
    recs = records(range(1, 11), batch=True)
    status = {c["name"]: c["status"] for c in judge(args, 10, clean, kills, recs, recs)}
    assert set(status.values()) == {"ok"}, status

    faulty = [launch("launch_01", "hung: no step logged for 300 s", 7, stragglers=("pid 42: python -m train",)),
              launch("launch_02", "finished", 10, growth=0.08), launch("reference", "finished", 10)]
    status = {c["name"]: c["status"] for c in judge(args, 10, faulty, [], recs, records(range(1, 11), batch=True,
                                                                                       loss=5.01))}
    assert {n for n, s in status.items() if s == "fail"} == {"kills", "launches", "processes", "rss", "final_loss",
                                                             "loss_curve"}
