"""DeepSpeed ZeRO 0-3 on 2 ranks against a single-process plain-PyTorch loop, and exact resume."""

from __future__ import annotations

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

import train.__main__  # noqa: F401  (registers the run-dir resolver used by conf/config.yaml)
from data.stream import GlobalBatchLoader
from model.transformer import Transformer
from tests.utils import REPO, TINY, run_train, start_from_checkpoint, train_losses
from train.config import build_run_config
from train.engine import build_optimizer, build_scheduler

STEPS = 10
REL_TOL = 1e-5


def reference_losses(overrides: list[str], steps: int) -> list[float]:
    """Plain PyTorch: one process, the whole global batch in one forward, torch AdamW, clipping."""
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose("config", overrides=[*overrides, "run_dir=unused"])
    run = build_run_config(OmegaConf.to_container(cfg, resolve=True), world_size=1)
    torch.manual_seed(run.train.seed)
    model = Transformer(run.model)
    opt = build_optimizer(model, run.optim)
    sched = build_scheduler(opt, run)
    G = run.train.global_batch_size
    loader = GlobalBatchLoader(
        run.data, seq_len=run.train.seq_len, global_batch_size=G, micro_batch_size=G, dp_rank=0, dp_size=1,
        seed=run.train.seed,
    )
    losses = []
    for step in range(steps):
        x = loader.batch(step)[0]
        out = model(x[:, :-1], labels=x[:, 1:])
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), run.train.grad_clip)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        losses.append(out.ce_loss.item())
    return losses


@pytest.fixture(scope="module")
def reference(sample_data) -> list[float]:
    return reference_losses(TINY, STEPS)


def assert_close(got: dict[int, float], want: list[float]) -> None:
    assert sorted(got) == list(range(1, len(want) + 1)), sorted(got)
    for step, ref in enumerate(want, start=1):
        assert abs(got[step] - ref) <= REL_TOL * abs(ref), (step, got[step], ref)


@pytest.mark.slow
@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_zero_two_ranks_match_single_process_and_resume_exactly(stage, reference, tmp_path):
    full = tmp_path / "full"
    run_train([*TINY, f"parallel=zero{stage}", f"run_dir={full}"], nproc=2)
    full_losses = train_losses(full)
    assert_close(full_losses, reference)
    assert reference[-1] < reference[0]

    # A new launch resumes from the step-5 checkpoint: the following losses are bit-identical.
    part = start_from_checkpoint(full, tmp_path / "part", 5)
    proc = run_train([*TINY, f"parallel=zero{stage}", f"run_dir={part}"], nproc=2)
    assert "resumed from" in proc.stdout
    resumed = train_losses(part)
    assert sorted(resumed) == list(range(6, STEPS + 1))
    for step in range(6, STEPS + 1):
        assert resumed[step] == full_losses[step], (stage, step, resumed[step], full_losses[step])


@pytest.mark.slow
def test_cli_zero2_two_ranks_equals_zero0_one_rank_accumulating(reference, tmp_path):
    """`python -m train parallel=zero0` (1 rank, 4 micro-batches accumulated) gives the same losses."""
    one = tmp_path / "one"
    run_train([*TINY, "parallel=zero0", f"run_dir={one}", "train.ckpt_every=100"], nproc=1)
    assert_close(train_losses(one), reference)
