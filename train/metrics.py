"""Training metrics: console progress line, `metrics.jsonl`, and W&B (offline by default).

Only the rank that owns logging (global rank 0) creates a logger that writes; the others
get one whose methods do nothing, so the trainer needs no rank checks.
"""

from __future__ import annotations

import json
import os
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import torch

from train.config import LoggingConfig

# Dense bf16 peak per device, for MFU.
_GPU_PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L40S": 362e12, "A10": 125e12}


def cpu_flops_per_cycle() -> int:
    """fp32 FLOP per cycle and core: two FMA units of 16 lanes with AVX-512, of 8 with AVX2."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return 32
    return 64 if " avx512f" in flags else 32


def peak_flops_per_device(device: torch.device, configured: float | None) -> float:
    """The denominator of MFU. On CPU this is an estimate: threads x 2.5 GHz x fp32 FLOP/cycle (AVX-512 or AVX2
    FMA); pass ``train.peak_flops`` for a measured figure."""
    if configured:
        return float(configured)
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, value in _GPU_PEAK_FLOPS.items():
            if key in name:
                return value
        return 312e12
    return torch.get_num_threads() * 2.5e9 * cpu_flops_per_cycle()


def _fmt_duration(seconds: float) -> str:
    seconds = int(max(0, seconds))
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


def _si(x: float) -> str:
    for unit, scale in (("P", 1e15), ("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(x) >= scale:
            return f"{x / scale:.2f}{unit}"
    return f"{x:.0f}"


class MetricsLogger:
    def __init__(
        self,
        run_dir: Path,
        logging_cfg: LoggingConfig,
        config: dict[str, Any],
        *,
        enabled: bool,
        total_steps: int,
        start_step: int,
        tokens_per_step: int,
        flops_per_token: float,
        peak_flops_total: float,
    ):
        self.enabled = enabled
        self.cfg = logging_cfg
        self.total_steps = total_steps
        self.tokens_per_step = tokens_per_step
        self.flops_per_token = flops_per_token
        self.peak_flops_total = peak_flops_total
        self.path = Path(run_dir) / "metrics.jsonl"
        self._t_last = time.perf_counter()
        self._step_last = start_step
        self._t_start = self._t_last
        self._wandb = None
        self._wandb_step = -1  # W&B refuses steps below one it has seen (replayed steps after a rollback)
        self._logged = False
        if not enabled:
            return
        self._truncate_after(start_step)
        if logging_cfg.backend == "wandb" and logging_cfg.mode != "disabled":
            self._wandb = _init_wandb(Path(run_dir), logging_cfg, config)

    def _truncate_after(self, step: int) -> None:
        """On resume, drop lines logged after the checkpoint so the file reads as one run."""
        if not self.path.exists():
            return
        kept = [ln for ln in self.path.read_text().splitlines() if ln.strip() and json.loads(ln).get("step", 0) <= step]
        self.path.write_text("".join(ln + "\n" for ln in kept))

    def rewind(self, step: int) -> None:
        """After a rollback to ``step``: the file forgets later steps, as on resume. W&B keeps its points (it
        cannot rewrite history) and receives the replayed steps only once they pass what it has."""
        self._t_last, self._step_last = time.perf_counter(), step
        if self.enabled:
            self._truncate_after(step)

    def _wandb_log(self, payload: dict[str, Any], step: int) -> None:
        if self._wandb is not None and step >= self._wandb_step:
            self._wandb.log(payload, step=step)
            self._wandb_step = step

    def _write(self, record: dict[str, Any]) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")

    def log_train(self, step: int, values: dict[str, float]) -> dict[str, float]:
        """`step` is the number of optimizer steps done. Returns the record it wrote."""
        now = time.perf_counter()
        steps = max(1, step - self._step_last)
        dt = max(1e-9, now - self._t_last)
        tokens_per_s = steps * self.tokens_per_step / dt
        record = {
            "step": step,
            "tokens": step * self.tokens_per_step,
            "flops": step * self.tokens_per_step * self.flops_per_token,
            **values,
            "tokens_per_s": tokens_per_s,
            "mfu": tokens_per_s * self.flops_per_token / self.peak_flops_total,
        }
        self._t_last, self._step_last = now, step
        if not self.enabled:
            return record
        self._write(record)
        # The first interval after a (re)start includes start-up time: no ETA from it.
        eta = _fmt_duration((self.total_steps - step) * dt / steps) if self._logged else "--"
        self._logged = True
        print(
            f"step {step:>6}/{self.total_steps} | loss {record['loss']:.4f} | lr {record['lr']:.2e} | "
            f"gnorm {record['grad_norm']:.3f} | tokens {_si(record['tokens'])} | {_si(tokens_per_s)} tok/s | "
            f"MFU {100 * record['mfu']:.2f}% | {_si(record['flops'])}FLOP | ETA {eta}",
            flush=True,
        )
        if self._wandb is not None:
            payload = {f"train/{k}": v for k, v in record.items() if k not in ("step", "tokens", "flops")}
            payload.update({"train/tokens": record["tokens"], "train/flops": record["flops"]})
            payload["flops/loss"] = record["loss"]
            self._wandb_log(payload, step)
        return record

    def log_eval(self, step: int, eval_loss: float) -> None:
        if not self.enabled:
            return
        tokens = step * self.tokens_per_step
        record = {"step": step, "tokens": tokens, "flops": tokens * self.flops_per_token, "eval_loss": eval_loss}
        self._write(record)
        print(f"eval  {step:>6}/{self.total_steps} | eval_loss {eval_loss:.4f} | ppl {_exp(eval_loss):.2f}", flush=True)
        self._wandb_log(
            {"eval/loss": eval_loss, "train/tokens": tokens, "train/flops": record["flops"], "flops/eval_loss": eval_loss},
            step,
        )

    def log_extra(self, step: int, values: dict[str, float]) -> None:
        """Per-layer MoE load and other diagnostics (W&B and jsonl only, not the console)."""
        if not self.enabled or not values:
            return
        self._write({"step": step, **values})
        self._wandb_log(values, step)

    def summary(self, values: dict[str, Any]) -> None:
        if not self.enabled:
            return
        (self.path.parent / "summary.json").write_text(json.dumps(values, indent=1))
        if self._wandb is not None:
            for k, v in values.items():
                self._wandb.summary[k] = v

    def close(self) -> None:
        if self._wandb is not None:
            self._wandb.finish()
            self._wandb = None

    @property
    def wandb_dir(self) -> str | None:
        return self._wandb.dir if self._wandb is not None else None


def _exp(x: float) -> float:
    import math

    return math.exp(min(x, 50.0))


def _init_wandb(run_dir: Path, cfg: LoggingConfig, config: dict[str, Any]):
    import wandb

    os.environ.setdefault("WANDB_SILENT", "true")
    # A stable id per run dir: a resumed run appends to the same W&B run.
    id_file = run_dir / "wandb_id.txt"
    if id_file.exists():
        run_id = id_file.read_text().strip()
    else:
        run_id = uuid.uuid4().hex[:12]
        id_file.write_text(run_id)
    run = wandb.init(
        project=cfg.project,
        entity=cfg.entity,
        mode=cfg.mode,
        dir=str(run_dir),
        id=run_id,
        resume="allow",
        config=config,
        name=run_dir.name,
        settings=wandb.Settings(console="off", x_disable_stats=True),
    )
    # Curves against tokens and FLOPs overlay across runs of different sizes (scaling laws).
    run.define_metric("train/tokens")
    run.define_metric("train/flops")
    run.define_metric("train/*", step_metric="train/tokens")
    run.define_metric("eval/*", step_metric="train/tokens")
    run.define_metric("flops/*", step_metric="train/flops")
    print(f"W&B ({cfg.mode}) run {run_id} in {run.dir}", file=sys.stderr, flush=True)
    return run
