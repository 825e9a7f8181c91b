"""The single-process reference the parallel tests compare with: plain PyTorch on the same weights and data."""

from __future__ import annotations

import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

import train.__main__  # noqa: F401  (registers the run-dir resolver used by conf/config.yaml)
from data.stream import GlobalBatchLoader
from model.transformer import Transformer
from tests.utils import REPO
from train.config import build_run_config
from train.engine import build_optimizer, build_scheduler

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


def assert_losses_close(got: dict[int, float], want: list[float]) -> None:
    """Losses of steps 1..len(want), each within REL_TOL of the reference."""
    assert sorted(got) == list(range(1, len(want) + 1)), sorted(got)
    for step, ref in enumerate(want, start=1):
        assert abs(got[step] - ref) <= REL_TOL * abs(ref), (step, got[step], ref)
