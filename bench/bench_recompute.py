"""Activation checkpointing modes: bytes a training forward leaves for backward and the time of forward+backward.

    .venv/bin/python bench/bench_recompute.py --families dense moe hybrid --repeats 7

For each family (the tiny config resized as in bench_train_step.py) and mode (none, selective, full): the bytes of
activations alive when the forward returns (`train.saved_activations`: every storage the forward allocated that is
still held, whatever the recompute policy), and the median forward+backward time, modes interleaved. Ratios are
against "none".
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.bench_train_step import add_shape_args, family_config
from model.transformer import Transformer
from train.saved_activations import saved_activation_bytes

MODES = ("none", "selective", "full")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_shape_args(p)
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"d_model {args.d_model}, {args.layers} layers, ffn {args.ffn_hidden}, seq {args.seq_len}, batch "
          f"{args.batch}, fp32, {torch.get_num_threads()} threads, {args.repeats} interleaved repeats")
    print(f"{'family':<8}{'mode':<11}{'saved MiB':>10}{'vs none':>9}{'fwd+bwd s':>11}{'vs none':>9}")
    for family in args.families:
        measure(family, args)


def measure(family: str, args: argparse.Namespace) -> None:
    models = {}
    for mode in MODES:
        torch.manual_seed(0)
        models[mode] = Transformer(family_config(family, args.d_model, args.layers, args.ffn_hidden, args.seq_len,
                                                 activation_checkpointing=mode)).train()
    vocab = models["none"].cfg.vocab_size
    tokens = torch.randint(0, vocab, (args.batch, args.seq_len + 1), generator=torch.Generator().manual_seed(1))
    x, y = tokens[:, :-1], tokens[:, 1:]
    saved = {}
    for mode, model in models.items():
        saved[mode], loss = saved_activation_bytes(lambda m=model: m(x, labels=y).loss)
        loss.backward()
    times: dict[str, list[float]] = {mode: [] for mode in MODES}
    for _ in range(args.repeats):
        for mode, model in models.items():
            model.zero_grad(set_to_none=True)
            t0 = time.perf_counter()
            model(x, labels=y).loss.backward()
            times[mode].append(time.perf_counter() - t0)
    for mode in MODES:
        sec = statistics.median(times[mode])
        ratio = statistics.median(t / n for t, n in zip(times[mode], times["none"], strict=True))
        print(f"{family:<8}{mode:<11}{saved[mode] / 2**20:>10.1f}{saved[mode] / saved['none']:>8.2f}x"
              f"{sec:>11.4f}{ratio:>8.2f}x")


if __name__ == "__main__":
    main()
