"""NaN/inf losses and gradients, injected for real on one rank: detected on every rank, never applied, and then
skipped, rolled back over or stopped on; loss spikes reported."""

from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path

import pytest
import torch

from tests.forklaunch import fork_call
from tests.utils import TINY, child_env, run_train
from train.numerics import INJECT_ENV, InjectedFault, SpikeDetector


def _skip_step_check(overrides: list[str], out_dir: str) -> None:
    """Runs in each rank: step 1 normally, step 2 with the injected fault and DeepSpeed's own overflow check
    reporting no overflow, step 3 normally, step 4 with the fault again and DeepSpeed's check back; writes what
    changed and on which steps the torch optimizer's real step ran."""
    import dataclasses

    import deepspeed.runtime.zero.stage3 as zero3
    import deepspeed.runtime.zero.stage_1_and_2 as zero12
    import torch.distributed as dist

    from tests.reference import run_config
    from train.engine import init_distributed
    from train.parallel.dims import make_layout
    from train.parallel.groups import init_groups
    from train.train_module import build_train_module
    from train.trainer import data_loader

    world = int(os.environ["WORLD_SIZE"])
    run = run_config(overrides, world_size=world)
    init_distributed(torch.device("cpu"))
    layout = make_layout(run.parallel, run.model, world, dist.get_rank())
    module = build_train_module(run, init_groups(layout), "fp32", torch.device("cpu"))
    loader = data_loader(run, layout.dp_rank)
    guard = module.guard
    opt = guard.optimizer
    real_steps: list[int] = []  # the guard's step at each call of the real torch step (hooks run inside it only)
    opt.register_step_pre_hook(lambda *_: real_steps.append(guard.step))

    # fp32 ZeRO-1/2/3 skip a step whose gradient norm is invalid on their own, which would keep the weights
    # without the guard. This process's DeepSpeed is told the norm is always valid where the faulted step must
    # prove the guard did the skipping.
    ds_norm_checks = {m: m.is_invalid_grad_norm for m in (zero12, zero3)}

    def deepspeed_overflow_check(on: bool) -> None:
        for m, check in ds_norm_checks.items():
            m.is_invalid_grad_norm = check if on else (lambda norm: False)

    def snapshot() -> list[torch.Tensor]:
        """The master weights and every Adam state tensor this rank's optimizer holds (through its state: ZeRO-3
        empties the parameter groups between steps)."""
        out = []
        for p, state in opt.state.items():
            out.append(p.detach().clone())
            out.extend(v.detach().clone() for v in state.values() if torch.is_tensor(v))
        assert out, "the optimizer holds no state after a step"
        return out

    def same(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
        return len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b, strict=True))

    def faulted_step(step: int) -> dict[str, object]:
        before, epoch = snapshot(), module.engine.lr_scheduler.last_epoch
        out = module.train_batch(loader.batch(step - 1), step)
        return {"nonfinite_ranks": out["nonfinite_ranks"], "state_unchanged": same(before, snapshot()),
                "lr_steps": module.engine.lr_scheduler.last_epoch - epoch,
                "deepspeed_applied": module.engine.was_step_applied(), "skipped_steps": guard.skipped_steps}

    result: dict[str, object] = {}
    module.train_batch(loader.batch(0), 1)
    deepspeed_overflow_check(False)
    result["faulted"] = faulted_step(2)
    after = snapshot()
    normal = module.train_batch(loader.batch(2), 3)
    result["next_nonfinite_ranks"] = normal["nonfinite_ranks"]
    result["next_loss"] = float(normal["ce_loss"])
    result["next_updates"] = not same(after, snapshot())
    # DeepSpeed's own check back (it skips the step itself at ZeRO-1/2/3 and, with it, the lr schedule).
    deepspeed_overflow_check(True)
    fault = InjectedFault.from_env()
    assert fault is not None
    guard._fault = dataclasses.replace(fault, step=4)  # faults are injected once per process: re-armed here
    result["again"] = faulted_step(4)
    result["real_steps"] = sorted(set(real_steps))
    Path(out_dir, f"rank{layout.rank}.json").write_text(json.dumps(result))
    dist.barrier()


# (layout, fault): fp32 ZeRO-2, our clipping path at ZeRO-0 with TP (no DeepSpeed overflow check at all), ZeRO-3
# with a NaN loss, the pipeline schedule's optimizer step (ZeRO-1), and expert parallelism (ZeRO-2).
LAYOUTS = [
    (["parallel=zero2"], "2:1:grad"),
    (["parallel=tp2", "parallel.zero_stage=0"], "2:1:grad"),
    (["parallel=zero3"], "2:0:loss"),
    (["parallel=pp2", "model.n_layers=2"], "2:1:grad"),
    (["model=moe_tiny", "parallel=ep2"], "2:0:grad"),
]


@pytest.mark.parametrize(("layout", "fault"), LAYOUTS, ids=["zero2", "tp2-zero0", "zero3-loss", "pp2", "ep2"])
def test_nonfinite_step_is_skipped_on_every_rank(tmp_path: Path, layout: list[str], fault: str) -> None:
    overrides = [*TINY, *layout, "train.global_batch_size=4"]
    fork_call(_skip_step_check, (overrides, str(tmp_path)), 2, child_env(**{INJECT_ENV: fault}), timeout=300)
    bad_rank = int(fault.split(":")[1])
    results = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    for r, res in enumerate(results):
        faulted, again = res["faulted"], res["again"]
        assert faulted["nonfinite_ranks"] == [bad_rank], f"rank {r}: {res}"
        # DeepSpeed went through with step 2, so the guard alone kept the update out: the torch optimizer's real
        # step never ran on it (nor on step 4), and did on the normal steps 1 and 3.
        assert faulted["deepspeed_applied"], f"rank {r}: DeepSpeed skipped step 2 itself: {res}"
        assert res["real_steps"] == [1, 3], f"rank {r}: the real optimizer step ran on steps {res['real_steps']}"
        assert faulted["skipped_steps"] == 1, f"rank {r}: {res}"
        assert faulted["state_unchanged"], f"rank {r}: step 2 changed weights or Adam state"
        assert faulted["lr_steps"] == 1, f"rank {r}: the lr schedule moved {faulted['lr_steps']} steps on step 2"
        assert res["next_nonfinite_ranks"] == [] and math.isfinite(res["next_loss"]) and res["next_updates"], res
        # Step 4, DeepSpeed's check back: ZeRO-1/2/3 withhold it themselves (the guard's wrapper is never called),
        # at ZeRO-0 the guard does; either way the schedule advances once.
        assert again["nonfinite_ranks"] == [bad_rank], f"rank {r}: {res}"
        assert again["skipped_steps"] == 1 + again["deepspeed_applied"], f"rank {r}: {res}"
        assert again["state_unchanged"], f"rank {r}: step 4 changed weights or Adam state"
        assert again["lr_steps"] == 1, f"rank {r}: the lr schedule moved {again['lr_steps']} steps on step 4"


def _losses(run_dir: Path) -> dict[int, float]:
    rows = [json.loads(ln) for ln in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["ce_loss"] for r in rows if "ce_loss" in r}


def _batches(run_dir: Path) -> dict[int, int]:
    rows = [json.loads(ln) for ln in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["batch"] for r in rows if "ce_loss" in r}


@pytest.fixture(scope="module")
def skip_reference(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """2 ranks, ZeRO-2, never trained on global batch 6 (the batch of step 7)."""
    run_dir = tmp_path_factory.mktemp("skip_reference")
    run_train([*TINY, "parallel=zero2", "train.skip_batches=[6]", f"run_dir={run_dir}"], nproc=2)
    return run_dir


def test_rollback_reloads_the_checkpoint_and_skips_the_batch(tmp_path: Path, skip_reference: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(INJECT_ENV, "7:1:grad")
    run_dir = tmp_path / "run"
    proc = run_train([*TINY, "parallel=zero2", "train.on_nan=rollback", f"run_dir={run_dir}"], nproc=2)
    warnings = [ln for ln in proc.stderr.splitlines() if "rolled back" in ln]
    assert len(warnings) == 1 and "rank(s) [1]" in warnings[0] and "step_5" in warnings[0], proc.stderr[-2000:]
    # Steps 6.. replayed from step 5's checkpoint on batches 5, 7, 8, ...: bit-identical to a run told to skip 6.
    assert _losses(run_dir) == _losses(skip_reference)
    assert _batches(run_dir) == {s: s - 1 if s < 7 else s for s in range(1, 11)}
    meta = json.loads((run_dir / "checkpoints" / "latest" / "meta.json").read_text())
    assert meta["step"] == 10 and meta["data"]["faults"]["skipped_batches"] == [6]
    assert meta["data"]["faults"]["rollbacks"] == 1 and meta["data"]["faults"]["nonfinite_steps"] == 1

    # A relaunch from the checkpoint before the rollback (as if the run had died before its next save) skips
    # batch 6 too, without any fault this time.
    monkeypatch.delenv(INJECT_ENV)
    ckpts = run_dir / "checkpoints"
    shutil.rmtree(ckpts / "step_10")
    (ckpts / "latest").unlink()
    (ckpts / "latest").symlink_to("step_5")
    run_train([*TINY, "parallel=zero2", f"run_dir={run_dir}"], nproc=2)
    assert _losses(run_dir) == _losses(skip_reference)


def test_stop_saves_nothing_and_says_what_to_do(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(INJECT_ENV, "7:0:loss")
    run_dir = tmp_path / "run"
    proc = run_train([*TINY, "parallel=zero2", f"run_dir={run_dir}"], nproc=2, check=False)
    assert proc.returncode == 3
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and "step 7 (batch 6)" in errors[0] and "rank(s) [0]" in errors[0], proc.stderr[-2000:]
    assert "train.on_nan=rollback" in errors[0] and "train.skip_batches=[6]" in errors[0]
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["latest", "step_5"]
    assert max(_losses(run_dir)) == 6


def test_skip_goes_on_and_counts_it(tmp_path: Path, skip_reference: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(INJECT_ENV, "3:0:grad")
    run_dir = tmp_path / "run"
    proc = run_train([*TINY, "parallel=zero2", "train.on_nan=skip", f"run_dir={run_dir}"], nproc=2)
    assert "step 3 (batch 2): NaN/inf loss or gradient on rank(s) [0]" in proc.stderr
    losses = _losses(run_dir)
    assert sorted(losses) == [1, 2, 4, 5, 6, 7, 8, 9, 10] and all(math.isfinite(v) for v in losses.values())
    assert losses[2] == _losses(skip_reference)[2]  # nothing changed before the fault
    rows = [json.loads(ln) for ln in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r for r in rows if "nonfinite_steps" in r][-1]["nonfinite_steps"] == 1.0


def test_spike_detector_flags_outliers_and_keeps_them_out_of_the_window() -> None:
    det = SpikeDetector(window=20, zscore=4.0)
    gen = torch.Generator().manual_seed(0)
    losses = (3.0 + 0.01 * torch.randn(40, generator=gen)).tolist()
    losses[25] = losses[26] = 3.5
    flagged = [i for i, x in enumerate(losses) if det.update(x)[1]]
    assert flagged == [25, 26] and det.count == 2  # the second spike is judged against a window without the first
    assert det.update(3.0)[0] is not None and not det.update(3.0)[1]


def test_trainer_reports_an_injected_loss_spike(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(INJECT_ENV, "16:0:spike")  # rank 0 trains step 16 on random tokens
    run_dir = tmp_path / "run"
    proc = run_train([*TINY, "train.steps=18", "train.spike_window=10", "train.spike_zscore=3",
                      f"run_dir={run_dir}"], nproc=1)
    rows = [json.loads(ln) for ln in (run_dir / "metrics.jsonl").read_text().splitlines()]
    losses = {r["step"]: r["ce_loss"] for r in rows if "ce_loss" in r}
    # The test's own z-score of step 16 against steps 6-15.
    window = [losses[s] for s in range(6, 16)]
    mean = sum(window) / 10
    sd = math.sqrt(sum((x - mean) ** 2 for x in window) / 9)
    assert (losses[16] - mean) / sd > 3
    spikes = [ln for ln in proc.stderr.splitlines() if "loss spike" in ln]
    assert len(spikes) == 1 and spikes[0].startswith("warning: loss spike at step 16 (batch 15)"), spikes
    extra = {r["step"]: r for r in rows if "loss_spikes" in r}
    assert extra[16]["loss_spikes"] == 1.0 and extra[16]["loss_zscore"] == pytest.approx((losses[16] - mean) / sd)
