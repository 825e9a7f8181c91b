"""Training data loader throughput in one process, from the local shards that `make data` builds.

    .venv/bin/python bench/bench_data.py                          # conf/data/mixture.yaml, default shapes
    .venv/bin/python bench/bench_data.py --data sample --shapes 8x1024 1x4096 --profile

The loader is `data.stream.GlobalBatchLoader`, configured from conf/data/<name>.yaml as the trainer configures it
(one data-parallel rank, seed 1234). Per batch shape (micro-batch x seq_len; the rank's step is --accum
micro-batches) it times two things:

* ``batch(step)``: the whole per-step work of one loader process (sample ids from the mixture and the seeded
  permutations, memory-mapped reads, uint16 -> int64), on one thread, by the process's CPU time, which other
  jobs on a shared machine disturb far less than wall time;
* ``iter``: the trainer's path, ``iter(loader)`` with the config's DataLoader worker processes (or --workers),
  in wall time as the training process receives the batches.

With ``--remote`` it also times ``iter`` reading the first source from loopback servers (tests/servers.py: nginx
and moto's S3 server) through a fresh node cache, prefetching ``data.prefetch_steps`` steps ahead: "shard" caching
(the source fits the cache: each shard downloaded once) and "member" reads (a cache of a quarter of the source;
the source re-written with members of seq_len / 2 tokens, as docs/data.md recommends for corpora larger than the
cache), with the bytes nginx sent per byte of tokens consumed. Reading starts cold: the first step's wait is in.

    .venv/bin/python bench/bench_data.py --data sample --shapes 8x1024 --remote

Tokens count seq_len per sequence (the positions trained on). Each figure is the median of --repeats interleaved
rounds. The last column is the ratio to what dense_1b (conf/model/dense_1b.yaml, seq 4096) trains on per second on
one H100 at 40% MFU, from `model.flops.flops_per_token` and the dense bf16 peak of 989e12 FLOP/s. Shards this
small stay in the page cache after the first read: this measures the loader, not the disk.
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import statistics
import sys
import time
from pathlib import Path

import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from data.stream import DataConfig, GlobalBatchLoader
from model.config import ModelConfig
from model.flops import flops_per_token

H100_PEAK_BF16 = 989e12
TARGET_MFU = 0.4
TARGET_TOKENS_PER_S = 1.5e6  # per loader process
TARGET_REMOTE_TOKENS_PER_S = 0.5e6  # per loader process, from a loopback server with prefetch


def dense_1b_tokens_per_s(mfu: float = TARGET_MFU, peak: float = H100_PEAK_BF16, seq_len: int = 4096) -> float:
    cfg = ModelConfig.from_dict(yaml.safe_load((ROOT / "conf" / "model" / "dense_1b.yaml").read_text()))
    return mfu * peak / flops_per_token(cfg, seq_len)


def data_config(name: str, workers: int | None) -> DataConfig:
    raw = yaml.safe_load((ROOT / "conf" / "data" / f"{name}.yaml").read_text())
    for source in raw["sources"]:
        source["path"] = str(ROOT / source["path"])  # the configs name paths from the repository root
    if workers is not None:
        raw["num_workers"] = workers
    return DataConfig.from_dict(raw)


def make_loader(cfg: DataConfig, micro_batch: int, seq_len: int, accum: int) -> GlobalBatchLoader:
    return GlobalBatchLoader(
        cfg,
        seq_len=seq_len,
        global_batch_size=micro_batch * accum,
        micro_batch_size=micro_batch,
        dp_rank=0,
        dp_size=1,
        seed=1234,
    )


def time_batches(loader: GlobalBatchLoader, first_step: int, seconds: float) -> tuple[float, int]:
    """Tokens/s of ``loader.batch`` over consecutive steps for about ``seconds`` of CPU time; the next step."""
    tokens, step, start = 0, first_step, time.process_time()
    while (elapsed := time.process_time() - start) < seconds:
        tokens += loader.batch(step)[..., 1:].numel()
        step += 1
    return tokens / elapsed, step


def time_iter(loader: GlobalBatchLoader, seconds: float) -> float:
    """Tokens/s the training process receives from ``iter(loader)`` (its worker start-up excluded)."""
    batches = iter(loader)
    next(batches)
    tokens, start = 0, time.perf_counter()
    while (elapsed := time.perf_counter() - start) < seconds:
        tokens += next(batches)[..., 1:].numel()
    batches.close()  # shuts the DataLoader's workers down
    return tokens / elapsed


def time_cold_iter(loader: GlobalBatchLoader, steps: int) -> float:
    """Tokens/s the training process receives over the first ``steps`` batches of ``iter(loader)``, from a cold
    cache (worker start-up and the first fetches included)."""
    tokens, start = 0, time.perf_counter()
    batches = iter(loader)
    for _, batch in zip(range(steps), batches, strict=False):
        tokens += batch[..., 1:].numel()
    elapsed = time.perf_counter() - start
    batches.close()
    return tokens / elapsed


def remote_rows(cfg: DataConfig, shapes: list[tuple[int, int]], accum: int, steps: int) -> list[dict]:
    """iter tokens/s from nginx and moto on loopback, shard caching and member reads (see the module doc)."""
    import dataclasses
    import os
    import tempfile

    from data.prepare import write_token_shards
    from data.source import TokenSource
    from tests.servers import MotoS3, Nginx

    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-remote") as tmp:
        tmp = Path(tmp)
        src = TokenSource(cfg.sources[0].path, "train")
        tokens = src.read(0, src.num_tokens)
        nginx = Nginx(Path(cfg.sources[0].path).parent, tmp / "nginx")
        moto = MotoS3(tmp / "moto")
        os.environ.update(moto.env)
        try:
            for micro_batch, seq_len in shapes:
                name = f"members{seq_len // 2}"
                write_token_shards(tmp / "www" / name, {"train": [tokens]}, vocab_size=src.vocab_size,
                                   member_tokens=seq_len // 2, shard_tokens=1 << 20)
                small = Nginx(tmp / "www", tmp / f"nginx-{name}")
                urls = {"http": (f"{nginx.url}/{Path(cfg.sources[0].path).name}", f"{small.url}/{name}"),
                        "s3": (moto.upload(Path(cfg.sources[0].path), "bench", "set"),
                               moto.upload(tmp / "www" / name, "bench", name))}
                payload = len(tokens) * src.dtype.itemsize
                for kind, (whole, members) in urls.items():
                    for mode, url, cache_gb in (("shard", whole, 50.0), ("member", members, payload / 4 / 2**30)):
                        fetch = dataclasses.replace(cfg.fetch, cache_dir=str(tmp / f"cache-{kind}-{mode}-{seq_len}"),
                                                    cache_max_gb=cache_gb)
                        one = dataclasses.replace(cfg, sources=[dataclasses.replace(cfg.sources[0], path=url)],
                                                  fetch=fetch)
                        server = small if mode == "member" else nginx
                        sent = server.bytes_sent()
                        rate = time_cold_iter(make_loader(one, micro_batch, seq_len, accum), steps)
                        consumed = steps * micro_batch * accum * (seq_len + 1) * src.dtype.itemsize
                        rows.append({"server": kind, "mode": mode, "micro_batch": micro_batch, "seq_len": seq_len,
                                     "iter_tokens_per_s": rate,
                                     "fetched_per_consumed": (server.bytes_sent() - sent) / consumed
                                     if kind == "http" else None})
                small.stop()
        finally:
            nginx.stop()
            moto.stop()
    return rows


def profile_batches(loader: GlobalBatchLoader, steps: int, top: int) -> None:
    profiler = cProfile.Profile()
    profiler.enable()
    for step in range(steps):
        loader.batch(step)
    profiler.disable()
    pstats.Stats(profiler).sort_stats("tottime").print_stats(top)


def parse_shape(text: str) -> tuple[int, int]:
    micro_batch, _, seq_len = text.partition("x")
    return int(micro_batch), int(seq_len)


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default="mixture", help="conf/data/<name>.yaml (default: mixture)")
    p.add_argument("--shapes", nargs="+", default=["8x1024", "1x4096", "4x4096", "8x128"], help="MICROxSEQ")
    p.add_argument("--accum", type=int, default=1, help="micro-batches per step of the rank")
    p.add_argument("--workers", type=int, help="DataLoader workers for the iter timing (default: the config's)")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--seconds", type=float, default=0.5, help="per shape, per repeat, per path")
    p.add_argument("--profile", action="store_true", help="cProfile batch() of the first shape")
    p.add_argument("--remote", action="store_true", help="also time iter() from nginx and S3 (moto) on loopback")
    p.add_argument("--remote-steps", type=int, default=200, help="steps per --remote figure, from a cold cache")
    args = p.parse_args(argv)
    torch.set_num_threads(1)

    cfg = data_config(args.data, args.workers)
    shapes = [parse_shape(s) for s in args.shapes]
    loaders = {shape: make_loader(cfg, *shape, args.accum) for shape in shapes}
    next_step = {shape: 0 for shape in shapes}
    direct: dict[tuple[int, int], list[float]] = {shape: [] for shape in shapes}
    through_iter: dict[tuple[int, int], list[float]] = {shape: [] for shape in shapes}
    for _ in range(args.repeats):  # interleaved: a burst of load on the machine hits every shape alike
        for shape, loader in loaders.items():
            tokens_per_s, next_step[shape] = time_batches(loader, next_step[shape], args.seconds)
            direct[shape].append(tokens_per_s)
            through_iter[shape].append(time_iter(loader, args.seconds))

    consumed = dense_1b_tokens_per_s()
    print(
        f"data={args.data} ({', '.join(f'{s.path} x {w:.2f}' for s, w in zip(cfg.sources, cfg.weights))}), "
        f"accum {args.accum}, iter workers {cfg.num_workers}, torch {torch.__version__}, {args.repeats} repeats"
    )
    print(
        f"dense_1b at seq 4096 trains on {consumed:,.0f} tokens/s on one H100 at {TARGET_MFU:.0%} MFU "
        f"(model.flops); target per loader process {TARGET_TOKENS_PER_S:,.0f} tokens/s"
    )
    print("| micro-batch x seq | batch() tokens/s (CPU time) | iter tokens/s (wall) | batch() / dense_1b on H100 |")
    print("|---|---|---|---|")
    rows = []
    for (micro_batch, seq_len), shape in zip(shapes, loaders, strict=True):
        row = {
            "micro_batch": micro_batch,
            "seq_len": seq_len,
            "accum": args.accum,
            "batch_tokens_per_s": statistics.median(direct[shape]),
            "iter_tokens_per_s": statistics.median(through_iter[shape]),
            "dense_1b_h100_tokens_per_s": consumed,
        }
        rows.append(row)
        print(
            f"| {micro_batch} x {seq_len} | {row['batch_tokens_per_s']:,.0f} | {row['iter_tokens_per_s']:,.0f} "
            f"| {row['batch_tokens_per_s'] / consumed:,.0f}x |"
        )
    if args.profile:
        profile_batches(loaders[shapes[0]], steps=200, top=15)
    if args.remote:
        print(f"\nremote: {cfg.sources[0].path} from loopback servers, {args.remote_steps} steps from a cold cache, "
              f"prefetch {cfg.fetch.prefetch_steps} steps, {cfg.fetch.fetch_threads} fetch threads; goal "
              f"{TARGET_REMOTE_TOKENS_PER_S:,.0f} tokens/s per loader process")
        print("| server | cache | micro-batch x seq | iter tokens/s (wall) | bytes fetched / bytes consumed |")
        print("|---|---|---|---|---|")
        for row in remote_rows(cfg, shapes, args.accum, args.remote_steps):
            ratio = "-" if row["fetched_per_consumed"] is None else f"{row['fetched_per_consumed']:.2f}"
            print(f"| {row['server']} | {row['mode']} | {row['micro_batch']} x {row['seq_len']} "
                  f"| {row['iter_tokens_per_s']:,.0f} | {ratio} |")
            rows.append(row)
    return rows


if __name__ == "__main__":
    main()
