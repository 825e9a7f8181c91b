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


def run_config(overrides: list[str], world_size: int = 1):
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose("config", overrides=[*overrides, "run_dir=unused"])
    return build_run_config(OmegaConf.to_container(cfg, resolve=True), world_size=world_size)


def micro_batch_reference(overrides: list[str], steps: int, keep_model: dict | None = None, weight_scale: float = 1.0,
                          ) -> tuple[list[dict[str, float]], dict[str, torch.Tensor]]:
    """Plain PyTorch, one process, the trainer's micro-batches one after another with gradient accumulation (the
    MoE aux loss is a per-micro-batch statistic, so this is what "the same as one rank" means for MoE models), torch
    AdamW and clipping with the norm summed in float64 (torch's float32 norm of the 1M-entry embedding gradient is
    off by ~2e-5 relative on CPU). Returns per step ce/aux/loss/grad_norm, and the gradients of the first step;
    ``keep_model["model"]`` receives the trained model; ``weight_scale`` multiplies the initial weights (1 + one
    ulp: how far rounding alone moves the trajectory)."""
    run = run_config(overrides)
    torch.manual_seed(run.train.seed)
    model = Transformer(run.model)
    if weight_scale != 1.0:
        with torch.no_grad():
            for p in model.parameters():
                p.mul_(weight_scale)
    opt = build_optimizer(model, run.optim)
    sched = build_scheduler(opt, run)
    loader = GlobalBatchLoader(
        run.data, seq_len=run.train.seq_len, global_batch_size=run.train.global_batch_size,
        micro_batch_size=run.train.micro_batch_size, dp_rank=0, dp_size=1, seed=run.train.seed,
    )
    out, first_grads = [], {}
    for step in range(steps):
        batch = loader.batch(step)
        n = batch.shape[0]
        ce = aux = 0.0
        for micro in batch:
            res = model(micro[:, :-1], labels=micro[:, 1:])
            (res.loss / n).backward()
            ce += res.ce_loss.item() / n
            aux += res.aux_loss.item() / n
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        norm = torch.stack([g.double().square().sum() for g in grads]).sum().sqrt()
        if step == 0:
            first_grads = {name: p.grad.detach().clone() for name, p in model.named_parameters()}
        coef = torch.clamp(run.train.grad_clip / (norm + 1e-6), max=1.0).float()
        for g in grads:
            g.mul_(coef)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        out.append({"loss": ce + aux, "ce_loss": ce, "aux_loss": aux, "grad_norm": float(norm)})
    if keep_model is not None:
        keep_model["model"] = model
    return out, first_grads


def reference_losses(overrides: list[str], steps: int) -> list[float]:
    """Plain PyTorch: one process, the whole global batch in one forward, torch AdamW, clipping."""
    run = run_config(overrides)
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
