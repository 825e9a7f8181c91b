"""The lr schedules (`train.engine.lr_multiplier`, `build_scheduler`) against values worked out by hand from the
formulas of conf/sched/*.yaml, at the boundaries where an off-by-one or a forgotten offset shows.

The formulas, for 0-based optimizer step s of T = train.steps, warm-up W, floor m = min_lr_ratio:
- warm-up (every schedule): (s + 1) / W for s < W, so the first step trains at lr / W and step W - 1 at the full lr;
- constant: 1 after warm-up;
- cosine: m + (1 - m) (1 + cos(pi p)) / 2 with p = (s - W) / (T - W), clamped to 1: 1 on the first step after
  warm-up, m at s = T (one past the last step) and after;
- wsd: 1 until the last n = round(decay_fraction T) steps, which fall linearly, 1 - (1 - m) (s - (T - n) + 1) / n,
  reaching m on the last step T - 1 and staying there.

Every expected value below is a literal or one of these formulas evaluated by hand for the given numbers, never a call
into the code under test. The same values are asked of tests.reference.lr_factor, which the layout tests' reference
uses, so that neither side can drift alone. All values are float64 scalars a few operations deep, hence rel=1e-12.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable

import pytest
import torch

from tests.reference import REL_TOL, lr_factor, lr_schedule, micro_batch_reference, run_config
from tests.utils import TINY, read_metrics, run_train
from train.config import SchedConfig
from train.engine import build_optimizer, build_scheduler, lr_multiplier

REL = 1e-12
COS = math.cos
PI = math.pi

Factor = Callable[[int, int, SchedConfig], float]


def _engine(step: int, total: int, sched: SchedConfig) -> float:
    return lr_multiplier(step, total, sched)


def _reference(step: int, total: int, sched: SchedConfig) -> float:
    return lr_factor(step, total, sched.name, sched.warmup_steps, sched.min_lr_ratio, sched.decay_fraction)


IMPLEMENTATIONS = pytest.mark.parametrize("factor", [_engine, _reference], ids=["train.engine", "tests.reference"])

# (T, schedule, {step: expected factor}); step T and beyond are past the end, which LambdaLR does evaluate once the
# last optimizer step has called scheduler.step().
CASES = [
    # Cosine, T=10, W=2, m=0.1: the decay spans T - W = 8 steps, p = (s - 2) / 8.
    ("cosine_warmup", 10, SchedConfig("cosine", warmup_steps=2, min_lr_ratio=0.1, decay_fraction=1.0), {
        0: 0.5,  # first step: 1/W
        1: 1.0,  # last warm-up step
        2: 1.0,  # first step after warm-up: p = 0
        3: 0.1 + 0.45 * (1 + COS(PI / 8)),
        4: 0.1 + 0.45 * (1 + math.sqrt(0.5)),  # p = 1/4
        6: 0.55,  # p = 1/2: halfway between 1 and the floor
        9: 0.1 + 0.45 * (1 + COS(7 * PI / 8)),  # last step
        10: 0.1,  # p = 1: the floor, at train.steps
        17: 0.1,  # clamped past the end
    }),
    # Cosine without warm-up, T=5, m=0.2: p = s / 5.
    ("cosine_no_warmup", 5, SchedConfig("cosine", warmup_steps=0, min_lr_ratio=0.2, decay_fraction=1.0), {
        0: 1.0,
        1: 0.2 + 0.4 * (1 + COS(PI / 5)),
        4: 0.2 + 0.4 * (1 + COS(4 * PI / 5)),
        5: 0.2,
        6: 0.2,
    }),
    # Cosine to zero, T=12, W=4: p = (s - 4) / 8.
    ("cosine_to_zero", 12, SchedConfig("cosine", warmup_steps=4, min_lr_ratio=0.0, decay_fraction=1.0), {
        0: 0.25,
        2: 0.75,
        3: 1.0,
        4: 1.0,
        8: 0.5,
        11: 0.5 * (1 + COS(7 * PI / 8)),
        12: 0.0,
    }),
    # WSD, T=10, W=2, m=0.1, decay_fraction=0.3: the last n = 3 steps (7, 8, 9) decay by 0.9/3 each.
    ("wsd", 10, SchedConfig("wsd", warmup_steps=2, min_lr_ratio=0.1, decay_fraction=0.3), {
        0: 0.5,
        1: 1.0,
        2: 1.0,
        6: 1.0,  # last stable step
        7: 0.7,  # decay start: already one decrement down
        8: 0.4,
        9: 0.1,  # last step: the floor
        10: 0.1,
        14: 0.1,
    }),
    # WSD decaying over the whole run without warm-up, T=4, m=0: 3/4, 2/4, 1/4, 0.
    ("wsd_all_decay", 4, SchedConfig("wsd", warmup_steps=0, min_lr_ratio=0.0, decay_fraction=1.0), {
        0: 0.75,
        1: 0.5,
        2: 0.25,
        3: 0.0,
        4: 0.0,
    }),
    # WSD with no decay phase: constant after warm-up, also past the end.
    ("wsd_no_decay", 6, SchedConfig("wsd", warmup_steps=3, min_lr_ratio=0.1, decay_fraction=0.0), {
        0: 1 / 3,
        1: 2 / 3,
        2: 1.0,
        3: 1.0,
        5: 1.0,
        6: 1.0,
    }),
    # Constant with warm-up: min_lr_ratio plays no part.
    ("constant_warmup", 8, SchedConfig("constant", warmup_steps=4, min_lr_ratio=0.1, decay_fraction=0.0), {
        0: 0.25,
        1: 0.5,
        3: 1.0,
        4: 1.0,
        7: 1.0,
        8: 1.0,
        20: 1.0,
    }),
    ("constant", 5, SchedConfig("constant", warmup_steps=0, min_lr_ratio=1.0, decay_fraction=0.0), {
        0: 1.0,
        4: 1.0,
        5: 1.0,
    }),
]


@IMPLEMENTATIONS
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_factor_matches_the_hand_computed_value(case: tuple, factor: Factor) -> None:
    _, total, sched, want = case
    got = {step: factor(step, total, sched) for step in want}
    assert got == {step: pytest.approx(value, rel=REL, abs=0.0) for step, value in want.items()}


@IMPLEMENTATIONS
@pytest.mark.parametrize("name", ["constant", "cosine", "wsd"])
def test_warmup_climbs_by_one_over_warmup_per_step_to_the_full_lr(name: str, factor: Factor) -> None:
    """Steps 0..W-1 at 1/W, 2/W, ..., 1 (exact: (k + 1) / W is one division), whatever follows."""
    sched = SchedConfig(name, warmup_steps=5, min_lr_ratio=0.1, decay_fraction=0.5)
    assert [factor(s, 40, sched) for s in range(5)] == [0.2, 0.4, 0.6, 0.8, 1.0]


@IMPLEMENTATIONS
def test_cosine_falls_monotonically_from_the_peak_to_the_floor(factor: Factor) -> None:
    """After warm-up each step's factor is below the previous one's, none below the floor, and the floor comes at
    T exactly: a schedule that skips the warm-up offset or drops the floor breaks one of the three."""
    T, W, m = 50, 7, 0.25
    sched = SchedConfig("cosine", warmup_steps=W, min_lr_ratio=m, decay_fraction=1.0)
    curve = [factor(s, T, sched) for s in range(W, T + 1)]
    assert curve[0] == 1.0 and curve[-1] == pytest.approx(m, rel=REL)
    assert all(a > b for a, b in itertools.pairwise(curve))
    assert min(curve[:-1]) > m


# The shipped presets with conf/train/default.yaml's 300 steps (cosine, wsd: W=20; cosine m=0.1 over 280 steps; wsd
# m=0 over the last round(0.2 * 300) = 60 steps from step 240).
PRESETS = [
    ("constant", {0: 1.0, 19: 1.0, 20: 1.0, 299: 1.0, 300: 1.0}),
    ("cosine", {0: 1 / 20, 19: 1.0, 20: 1.0, 160: 0.55, 299: 0.1 + 0.45 * (1 + COS(279 * PI / 280)), 300: 0.1}),
    ("wsd", {0: 1 / 20, 19: 1.0, 20: 1.0, 239: 1.0, 240: 59 / 60, 269: 0.5, 298: 1 / 60, 299: 0.0, 300: 0.0}),
]


@IMPLEMENTATIONS
@pytest.mark.parametrize("preset,want", PRESETS, ids=[p[0] for p in PRESETS])
def test_shipped_presets_compose_to_the_documented_schedule(preset: str, want: dict[int, float], factor: Factor,
                                                          sample_data) -> None:
    run = run_config(["data=sample", "logging=none", f"sched={preset}"])
    assert run.train.steps == 300
    got = {step: factor(step, run.train.steps, run.sched) for step in want}
    assert got == {step: pytest.approx(value, rel=REL, abs=1e-15) for step, value in want.items()}


def test_optimizer_steps_at_the_lr_the_schedule_gives(sample_data) -> None:
    """Through build_optimizer + build_scheduler (LambdaLR), as the trainer wires them: the lr every group holds
    when optimizer step s runs is optim.lr times the hand-computed factor of step s."""
    run = run_config(["data=sample", "logging=none", "train.steps=10", "optim.lr=2e-3", "sched=wsd",
                      "sched.warmup_steps=2", "sched.min_lr_ratio=0.1", "sched.decay_fraction=0.3"])
    model = torch.nn.Linear(4, 3)  # a matrix and a bias: one parameter in each group
    opt = build_optimizer(model, run.optim)
    sched = build_scheduler(opt, run)
    want = [0.5, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 0.7, 0.4, 0.1]  # the "wsd" case of CASES
    seen = []
    for _ in range(10):
        model(torch.ones(2, 4)).sum().backward()
        seen.append([group["lr"] for group in opt.param_groups])
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
    assert len(opt.param_groups) == 2
    assert seen == [[pytest.approx(2e-3 * f, rel=REL, abs=0.0)] * 2 for f in want]
    assert [group["lr"] for group in opt.param_groups] == [pytest.approx(2e-4, rel=REL)] * 2  # past the end
    assert lr_schedule(run, 10) == [pytest.approx(2e-3 * f, rel=REL, abs=0.0) for f in want]


# (overrides on tests.utils.TINY, factor per step 1..10 as metrics.jsonl numbers them) for a 10-step run.
TRAINER_RUNS = [
    ("cosine", ["sched=cosine", "sched.warmup_steps=2", "sched.min_lr_ratio=0.1"],
     [0.5, 1.0, 1.0, 0.1 + 0.45 * (1 + COS(PI / 8)), 0.1 + 0.45 * (1 + math.sqrt(0.5)),
      0.1 + 0.45 * (1 + COS(3 * PI / 8)), 0.55, 0.1 + 0.45 * (1 + COS(5 * PI / 8)),
      0.1 + 0.45 * (1 + COS(6 * PI / 8)), 0.1 + 0.45 * (1 + COS(7 * PI / 8))]),
    ("wsd", ["sched=wsd", "sched.warmup_steps=2", "sched.min_lr_ratio=0.1", "sched.decay_fraction=0.3"],
     [0.5, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 0.7, 0.4, 0.1]),
    ("constant", ["sched=constant", "sched.warmup_steps=4"], [0.25, 0.5, 0.75] + [1.0] * 7),
]


@pytest.mark.slow
@pytest.mark.parametrize("overrides,want", [r[1:] for r in TRAINER_RUNS], ids=[r[0] for r in TRAINER_RUNS])
def test_trainer_steps_at_the_scheduled_lr(overrides: list[str], want: list[float], sample_data, tmp_path) -> None:
    """The real trainer (one rank, DeepSpeed): the lr it logs for each step is optim.lr = 3e-3 times the hand-computed
    factor, and its losses follow the single-process reference, which takes its lr from tests.reference.lr_schedule.
    The layout tests all run cosine, so this is where wsd and constant are seen end to end."""
    run_overrides = [*TINY, *overrides, "train.ckpt_every=100"]
    run_train([*run_overrides, f"run_dir={tmp_path}"], nproc=1)
    logged = {r["step"]: r for r in read_metrics(tmp_path) if "loss" in r}
    assert sorted(logged) == list(range(1, 11))
    assert [logged[s]["lr"] for s in range(1, 11)] == [pytest.approx(3e-3 * f, rel=REL, abs=0.0) for f in want]
    ref, _ = micro_batch_reference(run_overrides, 10)
    for step, r in enumerate(ref, start=1):
        assert abs(logged[step]["loss"] - r["loss"]) <= REL_TOL * r["loss"], (step, logged[step]["loss"], r["loss"])
