"""The LM head + cross entropy fused in token chunks (`model.loss.linear_cross_entropy`) against the head's full
logits and ``F.cross_entropy``: bytes kept for backward and forward+backward time, per vocabulary size.

    .venv/bin/python bench/bench_loss.py --tokens 4096 --d-model 512 --vocab 8000 32000 128256
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from model.loss import linear_cross_entropy
from train.saved_activations import saved_activation_bytes


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, default=4096)
    p.add_argument("--d-model", type=int, default=512)
    p.add_argument("--vocab", type=int, nargs="+", default=[8000, 32000, 128256])
    p.add_argument("--chunk", type=int, default=1024)
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args()
    print(f"{args.tokens} tokens, d_model {args.d_model}, fp32, chunk {args.chunk}, {torch.get_num_threads()} threads")
    print(f"{'vocab':>8}{'full MiB':>10}{'fused MiB':>11}{'ratio':>8}{'full s':>9}{'fused s':>9}{'speed-up':>10}")
    for vocab in args.vocab:
        measure(vocab, args)


def measure(vocab: int, args: argparse.Namespace) -> None:
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(args.tokens, args.d_model, generator=g, requires_grad=True)
    weight = (torch.randn(vocab, args.d_model, generator=g) * 0.02).requires_grad_()
    labels = torch.randint(0, vocab, (args.tokens,), generator=g)
    runs = {"full": lambda: F.cross_entropy((hidden @ weight.t()).float(), labels),
            "fused": lambda: linear_cross_entropy(hidden, weight, labels, args.chunk)}
    saved, times = {}, {name: [] for name in runs}
    for name, fn in runs.items():
        saved[name], loss = saved_activation_bytes(fn)
        loss.backward()
    for _ in range(args.repeats):
        for name, fn in runs.items():
            hidden.grad = weight.grad = None
            t0 = time.perf_counter()
            fn().backward()
            times[name].append(time.perf_counter() - t0)
    full, fused = (statistics.median(times[n]) for n in ("full", "fused"))
    speedup = statistics.median(a / b for a, b in zip(times["full"], times["fused"], strict=True))
    print(f"{vocab:>8}{saved['full'] / 2**20:>10.1f}{saved['fused'] / 2**20:>11.1f}"
          f"{saved['fused'] / saved['full']:>7.2f}x{full:>9.3f}{fused:>9.3f}{speedup:>9.2f}x")


if __name__ == "__main__":
    main()
