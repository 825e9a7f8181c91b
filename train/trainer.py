"""The training loop: model-agnostic; DeepSpeed does data parallelism, the loader the data,
`train.checkpoint` the state, `train.metrics` the logs."""

from __future__ import annotations

import math
import signal
import sys
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from data.stream import GlobalBatchLoader
from model.flops import flops_per_token, param_counts
from model.transformer import Transformer
from train.checkpoint import (
    CheckpointError,
    latest_checkpoint,
    load_checkpoint,
    save_checkpoint,
    universal_resume_needed,
)
from train.config import RunConfig
from train.engine import build_engine, init_distributed, resolve_device, resolve_precision
from train.metrics import MetricsLogger, peak_flops_per_device
from train.parallel.autotp import is_tensor_parallel, tp_grad_norm
from train.parallel.dims import init_groups, make_layout
from train.parallel.ep import apply_expert_parallel
from train.parallel.ep import grad_norm as global_grad_norm
from train.parallel.pp import (
    build_pipeline_engine,
    is_pipeline_engine,
    pipeline_eval_step,
    pipeline_moe_stats_and_bias_update,
    pipeline_train_step,
)

EXIT_PREEMPTED = 75  # EX_TEMPFAIL: the job stopped on a signal after a checkpoint; requeue it


class StopRequest:
    """SIGTERM/SIGUSR1 set a flag; ranks agree on it at the next step boundary.

    The handler only sets a flag, so a second signal during a checkpoint save changes nothing.
    """

    def __init__(self) -> None:
        self.signum: int | None = None
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(sig, self._handle)

    def _handle(self, signum: int, frame: Any) -> None:
        if self.signum is None:
            print(f"rank {_rank()}: received signal {signum}; stopping at the next step boundary", flush=True)
        self.signum = signum

    def agreed(self, device: torch.device) -> bool:
        flag = torch.tensor([1.0 if self.signum is not None else 0.0], device=device)
        if dist.is_initialized():
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item() > 0)


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _mean_across_ranks(values: torch.Tensor) -> torch.Tensor:
    if dist.is_initialized() and dist.get_world_size() > 1:
        values = values.clone()
        dist.all_reduce(values, op=dist.ReduceOp.SUM)
        values /= dist.get_world_size()
    return values


def build_model(cfg: RunConfig) -> Transformer:
    """Same seed on every rank, so every rank starts from identical weights."""
    torch.manual_seed(cfg.train.seed)
    return Transformer(cfg.model)


def train_step(engine: Any, batch: torch.Tensor, device: torch.device) -> dict[str, torch.Tensor]:
    """One optimizer step over this rank's micro-batches [grad_accum, micro_bs, seq_len + 1]."""
    ce_sum = torch.zeros((), device=device)
    aux_sum = torch.zeros((), device=device)
    n = batch.shape[0]
    # DeepSpeed reports the global grad norm from its ZeRO/bf16 optimizers only; for plain fp32
    # ZeRO-0 we take it from the (already all-reduced) gradients before the optimizer step.
    own_norm = engine.zero_optimization_stage() == 0 and not engine.bfloat16_enabled()
    grad_norm = None
    for i, micro in enumerate(batch):
        micro = micro.to(device, non_blocking=True)
        out = engine(micro[:, :-1], labels=micro[:, 1:])
        engine.backward(out.loss)
        if own_norm and i == n - 1:
            if is_tensor_parallel(engine.module):
                grad_norm = tp_grad_norm(engine.module)  # shards summed over the TP group
            else:
                grad_norm = global_grad_norm(engine.module)  # expert shards of every EP rank included
        engine.step()  # DeepSpeed accumulates and steps the optimizer at the last micro-batch
        ce_sum += out.ce_loss.detach().float()
        aux_sum += out.aux_loss.detach().float()
    if grad_norm is None and engine.get_global_grad_norm() is not None:
        grad_norm = torch.tensor(float(engine.get_global_grad_norm()))
    return {"ce_loss": ce_sum / n, "aux_loss": aux_sum / n, "grad_norm": grad_norm}


def _moe_stats_and_bias_update(model: Transformer, step: int) -> dict[str, float]:
    """Per-layer expert load (fraction of routed slots) and the aux-loss-free bias update."""
    stats: dict[str, float] = {}
    for i, moe in enumerate(model.moe_layers()):
        last = getattr(moe, "last_stats", None)
        if not last or "load" not in last:
            continue
        load = _mean_across_ranks(last["load"].detach().float().reshape(-1))
        moe.update_bias(load)  # identical on every rank (global load), so biases stay in sync
        mean = load.mean().clamp_min(1e-12)
        stats[f"moe/layer{i}/max_over_mean_load"] = float(load.max() / mean)
        for e, frac in enumerate(load.tolist()):
            stats[f"moe/layer{i}/load_e{e}"] = frac
    return stats


def data_loader(cfg: RunConfig, dp_rank: int, split: str = "train") -> GlobalBatchLoader:
    """This DP rank's slice of the run's global batches (TP/PP ranks of one DP rank read the same data)."""
    return GlobalBatchLoader(
        cfg.data, seq_len=cfg.train.seq_len, global_batch_size=cfg.train.global_batch_size,
        micro_batch_size=cfg.train.micro_batch_size, dp_rank=dp_rank, dp_size=cfg.dp_size, seed=cfg.train.seed,
        split=split,
    )


@torch.no_grad()
def evaluate(engine: Any, cfg: RunConfig, device: torch.device, dp_rank: int) -> float | None:
    """Mean next-token loss on held-out batches of the `val` split (same batches on any world size)."""
    try:
        loader = data_loader(cfg, dp_rank, split="val")
    except ValueError as e:
        if _rank() == 0:
            print(f"eval skipped: {e}", file=sys.stderr, flush=True)
        return None
    engine.eval()
    total = torch.zeros((), device=device)
    count = 0
    for i in range(cfg.train.eval_batches):
        if is_pipeline_engine(engine):  # the pipeline runs the batch's micro-batches through all stages
            batch = loader.batch(i)
            total += pipeline_eval_step(engine, batch).to(device) * batch.shape[0]
            count += batch.shape[0]
            continue
        for micro in loader.batch(i):
            micro = micro.to(device)
            total += engine(micro[:, :-1], labels=micro[:, 1:]).ce_loss.float()
            count += 1
    engine.train()
    return float(_mean_across_ranks(total / max(1, count)))


def run(cfg: RunConfig, config_yaml: str) -> int:
    """Trains until `train.steps` (or `train.stop_at`, or a signal). Returns the process exit code."""
    stop = StopRequest()  # first, so a signal during start-up still ends in a clean stop
    device = resolve_device(cfg.train.device)
    precision = resolve_precision(cfg.train.precision, device)
    init_distributed(device)
    rank, world = _rank(), dist.get_world_size()
    # TP ranks of one DP rank read the same data: the loader's rank/size are the layout's, not the global ones.
    layout = make_layout(cfg.parallel, cfg.model, world, rank)
    groups = init_groups(layout) if layout.is_model_parallel else None
    dp_rank = layout.dp_rank
    is_main = rank == 0
    run_dir = cfg.run_dir

    model = build_model(cfg)
    # Expert parallelism shards the experts before DeepSpeed sees the parameters (no-op for ep=1).
    apply_expert_parallel(model, layout.ep, layout.dp_groups())
    # Hook points: pipeline parallelism (layout.pp > 1) builds its own engine from `layout` (train.parallel.pp);
    # tensor parallelism is applied by DeepSpeed AutoTP inside build_engine (train.parallel.autotp).
    # A TP/DP layout change since the last checkpoint is loaded through DeepSpeed's universal checkpoint, which
    # DeepSpeed must know about when the engine is built (train.checkpoint.universal_resume_needed).
    try:
        universal = universal_resume_needed(
            latest_checkpoint(run_dir) if cfg.train.resume == "auto" else None, layout, cfg.parallel.zero_stage
        )
    except CheckpointError as e:
        if is_main:
            print(f"error: {e}", file=sys.stderr, flush=True)
        return 1
    if layout.pp > 1:
        engine = build_pipeline_engine(model, cfg, layout, precision)
    else:
        engine = build_engine(model, cfg, precision, groups, load_universal=universal)
    loader = data_loader(cfg, dp_rank)

    start_step = 0
    ckpt = latest_checkpoint(run_dir) if cfg.train.resume == "auto" else None
    if ckpt is not None:
        meta = load_checkpoint(engine, ckpt)
        start_step = int(meta["step"])
        loader.load_state_dict(meta["data"])
        if is_main:
            print(f"resumed from {ckpt} at step {start_step}", flush=True)
    elif is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
    if is_main:
        (run_dir / "config.yaml").write_text(config_yaml)
    if dist.is_initialized():
        dist.barrier()

    counts = param_counts(cfg.model)
    fpt = flops_per_token(cfg.model, cfg.train.seq_len)
    tokens_per_step = cfg.train.global_batch_size * cfg.train.seq_len
    logger = MetricsLogger(
        run_dir,
        cfg.logging,
        cfg.raw,
        enabled=is_main,
        total_steps=cfg.train.steps,
        start_step=start_step,
        tokens_per_step=tokens_per_step,
        flops_per_token=fpt,
        peak_flops_total=peak_flops_per_device(device, cfg.train.peak_flops) * world,
    )
    if is_main:
        print(
            f"model {cfg.model.name}: {counts['total'] / 1e6:.2f}M params ({counts['active'] / 1e6:.2f}M active) | "
            f"world {world} ({_layout_text(layout)}) | ZeRO-{cfg.parallel.zero_stage} | {precision} on {device.type} | "
            f"global batch {cfg.train.global_batch_size} x {cfg.train.seq_len} tokens, grad accum {cfg.grad_accum_steps}",
            flush=True,
        )

    end_step = cfg.train.stop_at or cfg.train.steps
    step = start_step
    last_saved = start_step if ckpt is not None else -1
    first_loss = last_loss = None
    exit_code = 0

    def checkpoint() -> None:
        nonlocal last_saved
        if last_saved != step:
            save_checkpoint(engine, run_dir, step, loader.state_dict(), config_yaml, cfg.train.keep_last, layout)
            last_saved = step

    batches = iter(loader)
    try:
        while step < end_step:
            if stop.agreed(device):
                checkpoint()
                exit_code = EXIT_PREEMPTED
                if is_main:
                    print(f"stopped on signal at step {step}; checkpoint saved; exit {EXIT_PREEMPTED} (requeue)")
                break
            lr = engine.get_lr()[0]
            if layout.pp > 1:
                losses = pipeline_train_step(engine, next(batches))
            else:
                losses = train_step(engine, next(batches), device)
            step += 1
            reduced = _mean_across_ranks(torch.stack([losses["ce_loss"], losses["aux_loss"]]))
            ce, aux = float(reduced[0]), float(reduced[1])
            if not math.isfinite(ce):
                raise FloatingPointError(f"loss became {ce} at step {step}; lower optim.lr or check the data")
            first_loss = ce if first_loss is None else first_loss
            last_loss = ce
            if layout.pp > 1:
                moe_stats = pipeline_moe_stats_and_bias_update(engine)
            else:
                moe_stats = _moe_stats_and_bias_update(engine.module, step)
            if step % cfg.logging.log_every == 0 or step == end_step or step == start_step + 1:
                grad_norm = losses["grad_norm"]
                logger.log_train(
                    step,
                    {"loss": ce + aux, "ce_loss": ce, "aux_loss": aux, "lr": lr,
                     "grad_norm": float(grad_norm) if grad_norm is not None else float("nan")},
                )
                logger.log_extra(step, moe_stats)
            if cfg.train.eval_every and step % cfg.train.eval_every == 0 and step < cfg.train.steps:
                eval_loss = evaluate(engine, cfg, device, dp_rank)
                if eval_loss is not None:
                    logger.log_eval(step, eval_loss)
            if step % cfg.train.ckpt_every == 0 or step == end_step:
                checkpoint()
        if exit_code == 0 and step == cfg.train.steps:
            eval_loss = evaluate(engine, cfg, device, dp_rank)
            if eval_loss is not None:
                logger.log_eval(step, eval_loss)
            logger.summary(
                {
                    "model": cfg.model.name,
                    "family": cfg.model.family,
                    "n_params": counts["total"],
                    "n_active_params": counts["active"],
                    "n_nonembedding_params": counts["nonembedding"],
                    "n_active_nonembedding_params": counts["active_nonembedding"],
                    "tokens": step * tokens_per_step,
                    "flops": step * tokens_per_step * fpt,
                    "flops_per_token": fpt,
                    "final_train_loss": last_loss,
                    "eval_loss": eval_loss,
                    "seq_len": cfg.train.seq_len,
                    "global_batch_size": cfg.train.global_batch_size,
                    "steps": step,
                }
            )
    except CheckpointError as e:
        if is_main:
            print(f"error: {e}", file=sys.stderr, flush=True)
        exit_code = 1
    finally:
        # Shut the prefetch workers down now, on every path: they ignore SIGTERM (see data.stream), so
        # multiprocessing's exit-time terminate() could not stop them and the process would never exit.
        batches.close()
        wandb_dir = logger.wandb_dir
        logger.close()
    if is_main and exit_code != 1:
        _print_where(run_dir, first_loss, last_loss, start_step, step, wandb_dir)
    return exit_code


def _layout_text(layout: Any) -> str:
    sizes = [f"dp {layout.dp}"] + [f"{k} {getattr(layout, k)}" for k in ("tp", "pp", "ep") if getattr(layout, k) > 1]
    return ", ".join(sizes)


def _print_where(run_dir: Path, first: float | None, last: float | None, start: int, step: int, wandb_dir: str | None) -> None:
    latest = latest_checkpoint(run_dir)
    print("-" * 72)
    if first is not None:
        print(f"cross-entropy: {first:.4f} (step {start + 1}) -> {last:.4f} (step {step})")
    print(f"run dir:     {run_dir.resolve()}")
    print(f"checkpoint:  {latest if latest else 'none'}")
    print(f"metrics:     {(run_dir / 'metrics.jsonl').resolve()}")
    if wandb_dir:
        print(f"W&B run:     {Path(wandb_dir).parent}  (upload with `wandb sync {Path(wandb_dir).parent}`)")
    print("-" * 72, flush=True)
