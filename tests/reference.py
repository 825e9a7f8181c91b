"""The single-process reference the parallel tests compare with: plain PyTorch on the same weights and data."""

from __future__ import annotations

import math

import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

import train.__main__  # noqa: F401  (registers the run-dir resolver used by conf/config.yaml)
from data.stream import GlobalBatchLoader
from model.transformer import Transformer
from tests.utils import REPO
from train.config import RunConfig, build_run_config

REL_TOL = 1e-5

# Leaf names of the parameters AdamW leaves undecayed: biases and Mamba's SSM dynamics (A_log, D); names ending in
# NO_DECAY_SUFFIX are the norms' gains. Everything else decays: projection and expert matrices, the router, the conv1d
# filter, the embedding and the LM head. Written out here, not taken from train.engine.param_groups, so that a change
# of the trainer's rule makes the layout tests differ from this reference.
NO_DECAY_LEAVES = frozenset({"bias", "A_log", "D"})
NO_DECAY_SUFFIX = "norm.weight"


def run_config(overrides: list[str], world_size: int = 1) -> RunConfig:
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose("config", overrides=[*overrides, "run_dir=unused"])
    return build_run_config(OmegaConf.to_container(cfg, resolve=True), world_size=world_size)


def lr_factor(step: int, total: int, name: str, warmup: int, min_ratio: float, decay_fraction: float) -> float:
    """The schedule's factor of optim.lr at 0-based optimizer step ``step`` of ``total``, from the formulas of
    conf/sched/*.yaml: a linear warm-up reaching 1 on step warmup - 1, then constant; cosine from 1 at the first
    step after warm-up to min_ratio at step ``total``; wsd constant, then linear over the last
    round(decay_fraction * total) steps down to min_ratio on the last step. Past the end the factor stays put."""
    if step < warmup:
        return (step + 1) / warmup
    if name == "constant":
        return 1.0
    if name == "cosine":
        t = min(1.0, (step - warmup) / max(1, total - warmup))
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * t))
    if name != "wsd":
        raise ValueError(f"no reference formula for schedule {name!r}")
    n_decay = round(decay_fraction * total)
    first_decayed = total - n_decay
    if n_decay == 0 or step < first_decayed:
        return 1.0
    t = min(1.0, (step + 1 - first_decayed) / n_decay)
    return 1.0 - (1.0 - min_ratio) * t


def lr_schedule(run: RunConfig, steps: int) -> list[float]:
    """optim.lr times the factor of each of the first ``steps`` steps (base lr times factor, as LambdaLR forms it)."""
    s = run.sched
    return [run.optim.lr * lr_factor(i, run.train.steps, s.name, s.warmup_steps, s.min_lr_ratio, s.decay_fraction)
            for i in range(steps)]


def reference_optimizer(model: torch.nn.Module, run: RunConfig) -> torch.optim.AdamW:
    """torch's fused AdamW with the run's hyper-parameters, a decayed group then an undecayed one (each in
    named_parameters order), split by NO_DECAY_LEAVES / NO_DECAY_SUFFIX; the caller sets each step's lr."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            skip = name.rsplit(".", 1)[-1] in NO_DECAY_LEAVES or name.endswith(NO_DECAY_SUFFIX)
            (no_decay if skip else decay).append(p)
    groups = [{"params": decay, "weight_decay": run.optim.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=run.optim.lr, betas=run.optim.betas, eps=run.optim.eps, fused=True)


def _step(opt: torch.optim.Optimizer, lr: float) -> None:
    """One AdamW step at ``lr`` in every group (what LambdaLR would have set before it), then the gradients freed."""
    for group in opt.param_groups:
        group["lr"] = lr
    opt.step()
    opt.zero_grad(set_to_none=True)


def micro_batch_reference(overrides: list[str], steps: int, keep_model: dict | None = None, weight_scale: float = 1.0,
                          ) -> tuple[list[dict[str, float]], dict[str, torch.Tensor]]:
    """Plain PyTorch, one process, the trainer's micro-batches one after another with gradient accumulation (the
    MoE aux loss is a per-micro-batch statistic, so this is what "the same as one rank" means for MoE models), torch
    AdamW (`reference_optimizer`, lr of `lr_schedule`) and clipping with the norm summed in float64 (torch's float32
    norm of the 1M-entry embedding gradient is off by ~2e-5 relative on CPU). Returns per step
    ce/aux/loss/grad_norm, and the gradients of the first step;
    ``keep_model["model"]`` receives the trained model; ``weight_scale`` multiplies the initial weights (1 + one
    ulp: how far rounding alone moves the trajectory)."""
    run = run_config(overrides)
    torch.manual_seed(run.train.seed)
    model = Transformer(run.model)
    if weight_scale != 1.0:
        with torch.no_grad():
            for p in model.parameters():
                p.mul_(weight_scale)
    opt = reference_optimizer(model, run)
    lrs = lr_schedule(run, steps)
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
        _step(opt, lrs[step])
        out.append({"loss": ce + aux, "ce_loss": ce, "aux_loss": aux, "grad_norm": float(norm)})
    if keep_model is not None:
        keep_model["model"] = model
    return out, first_grads


def reference_losses(overrides: list[str], steps: int) -> list[float]:
    """Plain PyTorch: one process, the whole global batch in one forward, torch AdamW (`reference_optimizer`, lr of
    `lr_schedule`), clipping."""
    run = run_config(overrides)
    torch.manual_seed(run.train.seed)
    model = Transformer(run.model)
    opt = reference_optimizer(model, run)
    lrs = lr_schedule(run, steps)
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
        _step(opt, lrs[step])
        losses.append(out.ce_loss.item())
    return losses


def assert_losses_close(got: dict[int, float], want: list[float]) -> None:
    """Losses of steps 1..len(want), each within REL_TOL of the reference."""
    assert sorted(got) == list(range(1, len(want) + 1)), sorted(got)
    for step, ref in enumerate(want, start=1):
        assert abs(got[step] - ref) <= REL_TOL * abs(ref), (step, got[step], ref)
