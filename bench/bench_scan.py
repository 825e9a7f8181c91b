"""Selective-scan speed: our chunked scan against the sequential loop (the test oracle) and against
causal SDPA attention of the same width, over sequence lengths.

    .venv/bin/python bench/bench_scan.py
    .venv/bin/python bench/bench_scan.py --seq-lens 256 1024 --d-inner 512 --batch 2

Prints a markdown table of forward and forward+backward times (best of --reps after one warm-up)
and the ratios sequential / chunked and attention / chunked. The sequential loop is measured only
up to --ref-max-t (forward) and --ref-bwd-max-t (forward+backward); longer lengths show a linear
extrapolation of its per-step cost, marked "~". Runs on CUDA when available (mamba_ssm is not
used here: this measures the pure-PyTorch scans), else on CPU. On a CPU shared with other jobs,
``--clock cpu --threads 1`` measures this process's CPU time, which other jobs disturb far less
than wall time.

``--slope`` measures how the cost grows with T instead: forward+backward of the chunked scan (or, with
``--slope-of mixer``, of the whole Mamba mixer), called as in training, at each --seq-lens (default 1k..16k),
this process's CPU time on one thread (unless --threads), median of --reps, and prints the times and the
least-squares slope of log time against log T (1.0 = linear). ``--baseline PATH`` times another version of
model/mamba.py (e.g. ``git show REV:model/mamba.py > /tmp/old_mamba.py``) in the same process, interleaved:

    .venv/bin/python bench/bench_scan.py --slope
    .venv/bin/python bench/bench_scan.py --slope --slope-of mixer --baseline /tmp/old_mamba.py
"""

from __future__ import annotations

import argparse
import importlib.util
import itertools
import math
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from model import mamba
from model.config import ModelConfig
from model.mamba import selective_scan_chunked, selective_scan_ref

CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}


def timed(fn: Callable[[], None], device: torch.device, clock: str = "wall") -> float:
    """Seconds of one run of ``fn`` (wall time on CUDA, where the CPU clock would miss the kernels)."""
    now = CLOCKS["wall"] if device.type == "cuda" else CLOCKS[clock]
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = now()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return now() - t0


def best_time(fn: Callable[[], None], reps: int, device: torch.device, clock: str = "wall") -> float:
    """Seconds of the fastest of ``reps`` runs after one warm-up (the fastest is least disturbed)."""
    fn()
    return min(timed(fn, device, clock) for _ in range(reps))


def scan_inputs(batch: int, d_inner: int, d_state: int, seq_len: int, device: torch.device) -> list[torch.Tensor]:
    """Inputs shaped and laid out as the Mamba mixer passes them ([batch, channels, T] views of [batch, T, channels]
    tensors), with Mamba's initial A and dt ranges."""
    g = torch.Generator().manual_seed(0)

    def channels_last(channels: int) -> torch.Tensor:
        return torch.randn(batch, seq_len, channels, generator=g).transpose(1, 2)

    u, delta = channels_last(d_inner), channels_last(d_inner)
    A = -torch.arange(1, d_state + 1, dtype=torch.float32).expand(d_inner, -1).contiguous()
    B, C = channels_last(d_state), channels_last(d_state)
    D = torch.ones(d_inner)
    z = channels_last(d_inner)
    dt_bias = torch.log(torch.expm1(torch.full((d_inner,), 0.01)))  # softplus(dt_bias) = 0.01
    return [t.to(device).requires_grad_() for t in (u, delta, A, B, C, D, z, dt_bias)]


def scan_step(
    scan: Callable[..., torch.Tensor], inputs: list[torch.Tensor], backward: bool, **kw
) -> Callable[[], None]:
    def run() -> None:
        with torch.set_grad_enabled(backward):
            u, delta, A, B, C, D, z, dt_bias = inputs
            y = scan(u, delta, A, B, C, D, z, delta_bias=dt_bias, delta_softplus=True, **kw)
            if backward:
                y.sum().backward()

    return run


def attention_step(batch: int, width: int, heads: int, seq_len: int, device: torch.device, backward: bool):
    g = torch.Generator().manual_seed(0)
    q, k, v = (
        torch.randn(batch, heads, seq_len, width // heads, generator=g).to(device).requires_grad_() for _ in range(3)
    )

    def run() -> None:
        with torch.set_grad_enabled(backward):
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
            if backward:
                out.sum().backward()

    return run


def fmt(seconds: float, extrapolated: bool = False) -> str:
    text = f"{seconds * 1e3:.1f}" if seconds < 10 else f"{seconds * 1e3:.0f}"
    return ("~" if extrapolated else "") + text


def load_module(path: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"baseline_{Path(path).stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def mixer_step(module: ModuleType, d_inner: int, d_state: int, chunk: int, seq_len: int, device: torch.device):
    """Forward+backward of ``module``'s MambaMixer (expand 2, so d_model = d_inner / 2) on one sequence."""
    cfg = ModelConfig(
        family="hybrid", d_model=d_inner // 2, n_heads=1, n_kv_heads=1, ffn_hidden=d_inner, n_layers=2,
        attn_layer_period=2, attn_layer_offset=1, mamba_d_state=d_state, mamba_chunk_size=chunk,
    ).validate()  # fmt: skip
    torch.manual_seed(0)
    mixer = module.MambaMixer(cfg).to(device)
    x = torch.randn(1, seq_len, cfg.d_model, device=device, requires_grad=True)
    return lambda: mixer(x).sum().backward()


def slope(args: argparse.Namespace, device: torch.device) -> None:
    """Times forward+backward at each T (median of reps, interleaved over T and versions) and fits log t = s log T."""
    versions = {"current": mamba}
    if args.baseline:
        versions["baseline"] = load_module(args.baseline)
    steps = {}
    for seq_len in args.seq_lens:
        for name, module in versions.items():
            if args.slope_of == "mixer":
                steps[seq_len, name] = mixer_step(module, args.d_inner, args.d_state, args.chunk_size, seq_len, device)
            else:
                inputs = scan_inputs(args.batch, args.d_inner, args.d_state, seq_len, device)
                scan = module.selective_scan_chunked
                steps[seq_len, name] = scan_step(scan, inputs, backward=True, chunk_size=args.chunk_size)
            steps[seq_len, name]()  # warm-up
    times = {key: [] for key in steps}
    for _ in range(args.reps):
        for key, step in steps.items():
            times[key].append(timed(step, device, args.clock))
    medians = {key: statistics.median(t) for key, t in times.items()}

    print(
        f"{args.slope_of} forward+backward, device={device} threads={torch.get_num_threads()} batch={args.batch} "
        f"d_inner={args.d_inner} d_state={args.d_state} chunk={args.chunk_size} clock={args.clock}; "
        f"ms, median of {args.reps}"
    )
    print()
    print("| T | " + " | ".join(versions) + (" | baseline / current |" if args.baseline else " |"))
    print("|" + "---|" * (len(versions) + 1 + bool(args.baseline)))
    for seq_len in args.seq_lens:
        cells = [str(seq_len)] + [fmt(medians[seq_len, name]) for name in versions]
        if args.baseline:
            cells.append(f"{medians[seq_len, 'baseline'] / medians[seq_len, 'current']:.2f}x")
        print("| " + " | ".join(cells) + " |")
    print()
    log_t = [math.log(t) for t in args.seq_lens]
    for name in versions:
        log_y = [math.log(medians[t, name]) for t in args.seq_lens]
        fit = statistics.linear_regression(log_t, log_y).slope
        points = list(zip(log_t, log_y, strict=True))
        local = ", ".join(f"{(y1 - y0) / (t1 - t0):.2f}" for (t0, y0), (t1, y1) in itertools.pairwise(points))
        print(f"{name}: log-log slope {fit:.3f} (between consecutive T: {local})")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--seq-lens", type=int, nargs="+", default=None, help="default 256..8192, or 1024..16384 with --slope"
    )
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--d-inner", type=int, default=256, help="Mamba channels (expand * d_model)")
    p.add_argument("--d-state", type=int, default=16)
    p.add_argument("--heads", type=int, default=4, help="attention heads; head_dim = d_inner / heads")
    p.add_argument("--chunk-size", type=int, default=64)
    p.add_argument("--ref-max-t", type=int, default=2048, help="longest T the sequential forward is timed at")
    p.add_argument("--ref-bwd-max-t", type=int, default=1024, help="longest T the sequential fwd+bwd is timed at")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--clock", choices=sorted(CLOCKS), default=None, help="wall time, or this process's CPU time")
    p.add_argument("--slope", action="store_true", help="fit how forward+backward time grows with T (see above)")
    p.add_argument("--slope-of", choices=["scan", "mixer"], default="scan")
    p.add_argument("--baseline", default=None, help="--slope: another model/mamba.py to time alongside")
    args = p.parse_args()
    if args.seq_lens is None:
        args.seq_lens = [1024, 2048, 4096, 8192, 16384] if args.slope else [256, 512, 1024, 2048, 4096, 8192]
    if args.clock is None:
        args.clock = "cpu" if args.slope else "wall"
    if args.slope and not args.threads:
        args.threads = 1
    if args.d_inner % args.heads:
        p.error(f"--d-inner {args.d_inner} must be divisible by --heads {args.heads}")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if args.slope:
        slope(args, device)
        return

    print(
        f"device={device} threads={torch.get_num_threads()} batch={args.batch} d_inner={args.d_inner} "
        f"d_state={args.d_state} chunk={args.chunk_size} attention={args.heads}x{args.d_inner // args.heads} "
        f"clock={args.clock}; times in ms (best of reps); ~ = sequential extrapolated linearly from its longest "
        "measured T"
    )
    print()
    print(
        "| T | chunked fwd | sequential fwd | SDPA fwd | seq/chunked fwd | SDPA/chunked fwd "
        "| chunked fwd+bwd | sequential fwd+bwd | SDPA fwd+bwd | seq/chunked fwd+bwd | SDPA/chunked fwd+bwd |"
    )
    print("|" + "---|" * 11)
    ref_per_step = {False: None, True: None}  # seconds per time step at the longest measured T
    for seq_len in args.seq_lens:
        inputs = scan_inputs(args.batch, args.d_inner, args.d_state, seq_len, device)
        cells = [str(seq_len)]
        for backward, ref_max in ((False, args.ref_max_t), (True, args.ref_bwd_max_t)):
            chunked = best_time(
                scan_step(selective_scan_chunked, inputs, backward, chunk_size=args.chunk_size),
                args.reps,
                device,
                args.clock,
            )
            if seq_len <= ref_max:
                ref = best_time(
                    scan_step(selective_scan_ref, inputs, backward), max(1, args.reps - 2), device, args.clock
                )
                ref_per_step[backward] = ref / seq_len
                extrapolated = False
            elif ref_per_step[backward] is not None:
                ref, extrapolated = ref_per_step[backward] * seq_len, True
            else:
                ref, extrapolated = float("nan"), True
            attn = best_time(
                attention_step(args.batch, args.d_inner, args.heads, seq_len, device, backward),
                args.reps,
                device,
                args.clock,
            )
            mark = "~" if extrapolated else ""
            cells += [
                fmt(chunked),
                fmt(ref, extrapolated),
                fmt(attn),
                f"{mark}{ref / chunked:.1f}x",
                f"{attn / chunked:.2f}x",
            ]
        print("| " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
