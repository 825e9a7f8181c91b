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
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from model.mamba import selective_scan_chunked, selective_scan_ref

CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}


def best_time(fn: Callable[[], None], reps: int, device: torch.device, clock: str = "wall") -> float:
    """Seconds of the fastest of ``reps`` runs after one warm-up (the fastest is least disturbed)."""
    now = CLOCKS["wall"] if device.type == "cuda" else CLOCKS[clock]
    fn()
    best = float("inf")
    for _ in range(reps):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = now()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        best = min(best, now() - t0)
    return best


def scan_inputs(batch: int, d_inner: int, d_state: int, seq_len: int, device: torch.device) -> list[torch.Tensor]:
    """Inputs shaped as the Mamba mixer passes them, with Mamba's initial A and dt ranges."""
    g = torch.Generator().manual_seed(0)
    u = torch.randn(batch, d_inner, seq_len, generator=g)
    delta = torch.randn(batch, d_inner, seq_len, generator=g)
    A = -torch.arange(1, d_state + 1, dtype=torch.float32).expand(d_inner, -1).contiguous()
    B = torch.randn(batch, d_state, seq_len, generator=g)
    C = torch.randn(batch, d_state, seq_len, generator=g)
    D = torch.ones(d_inner)
    z = torch.randn(batch, d_inner, seq_len, generator=g)
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


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seq-lens", type=int, nargs="+", default=[256, 512, 1024, 2048, 4096, 8192])
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--d-inner", type=int, default=256, help="Mamba channels (expand * d_model)")
    p.add_argument("--d-state", type=int, default=16)
    p.add_argument("--heads", type=int, default=4, help="attention heads; head_dim = d_inner / heads")
    p.add_argument("--chunk-size", type=int, default=64)
    p.add_argument("--ref-max-t", type=int, default=2048, help="longest T the sequential forward is timed at")
    p.add_argument("--ref-bwd-max-t", type=int, default=1024, help="longest T the sequential fwd+bwd is timed at")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--clock", choices=sorted(CLOCKS), default="wall", help="wall time, or this process's CPU time")
    args = p.parse_args()
    if args.d_inner % args.heads:
        p.error(f"--d-inner {args.d_inner} must be divisible by --heads {args.heads}")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")

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
