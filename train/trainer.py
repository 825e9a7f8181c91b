"""The training loop: the same for every model and parallel layout. A `TrainModule` steps the model, the loader
gives each data-parallel rank its slice of the global batch, `train.checkpoint` saves and restores the state,
`train.metrics` logs."""

from __future__ import annotations

import math
import signal
import sys
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from data.stream import DataReadError, GlobalBatchLoader
from launch.allocator import active_allocator
from model.flops import flops_per_token, param_counts
from train.checkpoint import (
    CheckpointError,
    UntrustedCheckpointError,
    latest_checkpoint,
    load_checkpoint,
    partial_checkpoints,
    save_checkpoint,
)
from train.config import RunConfig
from train.engine import init_distributed, resolve_device, resolve_precision
from train.faults import (
    EXIT_NONFINITE,
    FaultCounters,
    last_good,
    nonfinite_hint,
    peer_failure,
    read_skipped_batches,
    record_skipped_batches,
)
from train.metrics import MetricsLogger, peak_flops_per_device
from train.numerics import SpikeDetector
from train.parallel.dims import make_layout
from train.parallel.groups import init_groups
from train.plan.live import measured_memory_gb, predict_run
from train.safe_load import deepspeed_safe_globals, forbid_unsafe_unpickling
from train.train_module import TrainModule, build_train_module
from train.watchdog import EXIT_STALLED, Watchdog

# The process groups' own timeout, a backstop behind the watchdog's (which names the stalled rank).
PG_TIMEOUT_MARGIN_S = 60
EXIT_PREEMPTED = 75  # EX_TEMPFAIL: the job stopped on a signal after a checkpoint; requeue it
EXIT_REFUSED = 2  # like a config error: rerunning the same command cannot succeed


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


def data_loader(cfg: RunConfig, dp_rank: int, split: str = "train") -> GlobalBatchLoader:
    """This DP rank's slice of the run's global batches (TP/PP ranks of one DP rank read the same data)."""
    return GlobalBatchLoader(
        cfg.data, seq_len=cfg.train.seq_len, global_batch_size=cfg.train.global_batch_size,
        micro_batch_size=cfg.train.micro_batch_size, dp_rank=dp_rank, dp_size=cfg.dp_size, seed=cfg.train.seed,
        split=split,
    )


@torch.no_grad()
def evaluate(module: TrainModule, cfg: RunConfig, device: torch.device) -> float | None:
    """Mean next-token loss on held-out batches of the `val` split (same batches on any world size)."""
    try:
        loader = data_loader(cfg, module.layout.dp_rank, split="val")
    except ValueError as e:
        if _rank() == 0:
            print(f"eval skipped: {e}", file=sys.stderr, flush=True)
        return None
    module.train(False)
    total = torch.zeros((), device=device)
    for i in range(cfg.train.eval_batches):
        total += module.eval_batch(loader.batch(i)).to(device)
    module.train(True)
    return float(_mean_across_ranks(total / max(1, cfg.train.eval_batches)))


def run(cfg: RunConfig, config_yaml: str) -> int:
    """Trains until `train.steps` (or `train.stop_at`, or a signal). Returns the process exit code."""
    stop = StopRequest()  # first, so a signal during start-up still ends in a clean stop
    forbid_unsafe_unpickling(deepspeed_safe_globals())  # before DeepSpeed can load a file
    device = resolve_device(cfg.train.device)
    precision = resolve_precision(cfg.train.precision, device)
    init_distributed(device, timedelta(seconds=cfg.train.collective_timeout_s + PG_TIMEOUT_MARGIN_S))
    rank, world = _rank(), dist.get_world_size()
    # TP ranks of one DP rank read the same data: the loader's rank/size are the layout's, not the global ones.
    layout = make_layout(cfg.parallel, cfg.model, world, rank)
    groups = init_groups(layout, timedelta(seconds=cfg.train.collective_timeout_s + PG_TIMEOUT_MARGIN_S))
    dp_rank = layout.dp_rank
    is_main = rank == 0
    run_dir = cfg.run_dir

    module = build_train_module(cfg, groups, precision, device)
    loader = data_loader(cfg, dp_rank)

    start_step = 0
    faults = FaultCounters()
    try:
        ckpt = latest_checkpoint(run_dir) if cfg.train.resume == "auto" else None
        if ckpt is not None:
            meta = load_checkpoint(module, ckpt)
            faults.load(meta["data"])
            loader.load_state_dict(meta["data"])
    except UntrustedCheckpointError as e:
        if is_main:
            print(f"checkpoint error: {e}", file=sys.stderr, flush=True)
        return EXIT_REFUSED
    except CheckpointError as e:
        if is_main:
            print(f"error: {e}", file=sys.stderr, flush=True)
        return 1
    except ValueError as e:  # the data stream changed since the checkpoint (the message says how)
        if is_main:
            print(f"error: {e}", file=sys.stderr, flush=True)
        return EXIT_REFUSED
    if ckpt is not None:
        start_step = int(meta["step"])
        if is_main:
            partial = partial_checkpoints(run_dir)
            if partial:
                print(f"warning: ignoring {', '.join(p.name for p in partial)} in {partial[0].parent}: a save that "
                      "did not finish (retention removes it at the next checkpoint)", file=sys.stderr, flush=True)
            print(f"resumed from {ckpt} at step {start_step}", flush=True)
    elif is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
    if is_main:
        (run_dir / "config.yaml").write_text(config_yaml)
    if dist.is_initialized():
        dist.barrier()
    skip = set(cfg.train.skip_batches) | faults.skipped_batches | read_skipped_batches(run_dir)

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
    prediction = predict_run(cfg, device, world)
    predicted = {} if prediction is None else {
        "plan/step_time_s": prediction.step_time_s, "plan/memory_per_gpu_gb": prediction.memory_per_gpu_gb,
        "plan/tokens_per_s_per_gpu": prediction.tokens_per_s_per_gpu, "plan/mfu": prediction.mfu}
    logger.log_extra(start_step, predicted)
    # The host allocator moves CPU step times by ~1.3x (launch/allocator.py): said where runs are compared.
    allocator = active_allocator()
    if is_main:
        on = f"{device.type} ({allocator} allocator)" if device.type == "cpu" else device.type
        print(
            f"model {cfg.model.name}: {counts['total'] / 1e6:.2f}M params ({counts['active'] / 1e6:.2f}M active) | "
            f"world {world} ({_layout_text(layout)}) | ZeRO-{cfg.parallel.zero_stage} | {precision} on {on} | "
            f"global batch {cfg.train.global_batch_size} x {cfg.train.seq_len} tokens, grad accum {cfg.grad_accum_steps}",
            flush=True,
        )
        if predicted:
            print(f"plan (python -m train.plan): {predicted['plan/step_time_s']:.3g} s/step, "
                  f"{predicted['plan/memory_per_gpu_gb']:.2f} GB per rank; measured figures at the end", flush=True)

    end_step = cfg.train.stop_at or cfg.train.steps
    step_times: list[float] = []
    step = start_step
    last_saved = start_step if ckpt is not None else -1
    first_loss = last_loss = None
    exit_code = 0
    spikes = SpikeDetector(cfg.train.spike_window, cfg.train.spike_zscore)
    rollbacks_left = cfg.train.max_rollbacks  # per launch: a relaunch may try again

    watchdog = Watchdog(cfg.train.collective_timeout_s, rank, world, lambda: last_good(run_dir))

    def checkpoint() -> None:
        nonlocal last_saved
        if last_saved != step:
            watchdog.progress(step, "checkpoint save")
            data_state = loader.state_dict() | faults.state_dict(skip)
            save_checkpoint(module, run_dir, step, data_state, config_yaml, cfg.train.keep_last)
            last_saved = step

    def next_batch() -> tuple[int, torch.Tensor]:
        """(global batch index, this rank's batch), passing over the batches listed to skip."""
        while True:
            index = loader.next_step
            batch = next(batches)
            if index not in skip:
                return index, batch

    batches = iter(loader)
    try:
        while step < end_step:
            if stop.agreed(device):
                checkpoint()
                exit_code = EXIT_PREEMPTED
                if is_main:
                    print(f"stopped on signal at step {step}; checkpoint saved; exit {EXIT_PREEMPTED} (requeue)")
                break
            watchdog.progress(step, "train step")
            if step == start_step + 1:
                watchdog.arm()
            lr = module.lr()
            t_step = time.perf_counter()
            index, batch = next_batch()
            losses = module.train_batch(batch, step + 1)
            step += 1
            replaced = torch.tensor(float(loader.replaced_samples))
            reduced = _mean_across_ranks(torch.stack([losses["ce_loss"], losses["aux_loss"], replaced.to(device)]))
            ce, aux = float(reduced[0]), float(reduced[1])
            # Each data-parallel rank's count is held by world/dp ranks (TP and PP ranks read the same data).
            faults.replaced_samples += round(float(reduced[2]) * layout.dp)
            bad = losses["nonfinite_ranks"]
            if bad or not math.isfinite(ce):
                faults.nonfinite_steps += 1
                what = (f"step {step} (batch {index}): NaN/inf loss or gradient on rank(s) {bad}; no rank applied "
                        "the update" if bad else f"step {step} (batch {index}): the loss is {ce} (gradients finite)")
                logger.log_extra(step, {"batch": index, "nonfinite_steps": faults.nonfinite_steps})
                module.discard_step_stats()
                if cfg.train.on_nan == "skip":
                    if is_main:
                        print(f"warning: {what} (train.on_nan=skip)", file=sys.stderr, flush=True)
                elif cfg.train.on_nan == "rollback" and rollbacks_left > 0 and latest_checkpoint(run_dir) is not None:
                    target = latest_checkpoint(run_dir)
                    watchdog.progress(step, "rollback")
                    batches.close()
                    meta = load_checkpoint(module, target)
                    faults.rollbacks += 1
                    rollbacks_left -= 1
                    skip.add(index)
                    if is_main:
                        record_skipped_batches(run_dir, skip)
                    loader.load_state_dict(meta["data"])
                    step = last_saved = int(meta["step"])
                    batches = iter(loader)
                    logger.rewind(step)
                    if is_main:
                        print(f"warning: {what}; rolled back to {target} (step {step}); batch {index} is skipped "
                              f"from now on ({rollbacks_left} more rollbacks allowed in this launch)",
                              file=sys.stderr, flush=True)
                else:
                    if is_main:
                        print(f"error: {what}; stopping without saving ({nonfinite_hint(cfg, run_dir, index)})",
                              file=sys.stderr, flush=True)
                    exit_code = EXIT_NONFINITE
                    break
                continue
            if step > start_step + 1:  # the first step of a launch pays warm-up
                step_times.append(time.perf_counter() - t_step)
            first_loss = ce if first_loss is None else first_loss
            last_loss = ce
            zscore, spike = spikes.update(ce)
            moe_stats = module.post_batch()
            if spike:
                faults.spikes += 1
                if is_main:
                    print(f"warning: loss spike at step {step} (batch {index}): {ce:.4f} is {zscore:.1f} standard "
                          f"deviations above the last {len(spikes.history)} steps' mean", file=sys.stderr, flush=True)
            if step % cfg.logging.log_every == 0 or step == end_step or step == start_step + 1 or spike:
                grad_norm = losses["grad_norm"]
                logger.log_train(
                    step,
                    {"loss": ce + aux, "ce_loss": ce, "aux_loss": aux, "lr": lr,
                     "grad_norm": float(grad_norm) if grad_norm is not None else float("nan"), "batch": index},
                )
                logger.log_extra(step, moe_stats | faults.metrics(zscore))
            if cfg.train.eval_every and step % cfg.train.eval_every == 0 and step < cfg.train.steps:
                watchdog.progress(step, "eval")
                eval_loss = evaluate(module, cfg, device)
                if eval_loss is not None:
                    logger.log_eval(step, eval_loss)
            if step % cfg.train.ckpt_every == 0 or step == end_step:
                checkpoint()
        if exit_code == 0 and step == cfg.train.steps:
            watchdog.progress(step, "final eval")
            eval_loss = evaluate(module, cfg, device)
            if eval_loss is not None:
                logger.log_eval(step, eval_loss)
            measured = {"measured/memory_per_gpu_gb": measured_memory_gb(device)}
            if step_times:
                measured["measured/step_time_s"] = sum(step_times) / len(step_times)
            logger.log_extra(step, predicted | measured)
            logger.summary(
                predicted | measured | {
                    "model": cfg.model.name,
                    "family": cfg.model.family,
                    "host_allocator": allocator,
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
    except DataReadError as e:  # a shard that cannot be fetched, or was refused: the line names it and the cause
        print(f"error: rank {rank} at step {step}: {e}", file=sys.stderr, flush=True)
        exit_code = 1
    except RuntimeError as e:
        if not peer_failure(e):
            raise
        cause = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        print(f"error: rank {rank}: lost a peer at step {step} ({cause}); ending this rank so the job can be "
              f"relaunched from {last_good(run_dir)}", file=sys.stderr, flush=True)
        exit_code = EXIT_STALLED
    finally:
        # Shut the prefetch workers down now, on every path: they ignore SIGTERM (see data.stream), so
        # multiprocessing's exit-time terminate() could not stop them and the process would never exit.
        batches.close()
        watchdog.close()
        wandb_dir = logger.wandb_dir
        logger.close()
    if is_main and exit_code not in (1, EXIT_NONFINITE, EXIT_STALLED):
        _print_where(run_dir, first_loss, last_loss, start_step, step, wandb_dir)
    return exit_code


def _layout_text(layout: Any) -> str:
    sizes = [f"dp {layout.dp}"] + [f"{k} {getattr(layout, k)}" for k in ("tp", "cp", "pp", "ep") if getattr(layout, k) > 1]
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
