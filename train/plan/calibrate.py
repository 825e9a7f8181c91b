"""python -m train.plan calibrate [--ranks 2] [--out conf/cluster/cpu_local.yaml]

Measures this machine for the planner's `cpu_local` cluster, one thread per rank as the trainer's ranks run
(torchrun sets OMP_NUM_THREADS=1): the fraction of the core's fp32 peak that large GEMMs and causal attention
reach, memory bandwidth (a large copy), the cost of one small kernel, and gloo's all-reduce bandwidth and latency
between ranks over loopback. The peak itself is physics: cores x 2.5 GHz x FMA lanes (`train.metrics`).
"""

from __future__ import annotations

import argparse
import os
import socket
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.multiprocessing as mp
import yaml

from train.metrics import cpu_flops_per_cycle
from train.plan.cluster import CLUSTERS

CLUSTER = CLUSTERS / "cpu_local.yaml"


def _best(fn: Callable[[], object], repeats: int = 5) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def measure_kernels() -> dict[str, float]:
    torch.set_num_threads(1)
    peak = 2.5e9 * cpu_flops_per_cycle()
    n = 1024
    a, b = torch.randn(n, n), torch.randn(n, n)
    gemm = 2 * n**3 / _best(lambda: a @ b)
    heads, seq, hd = 4, 512, 64
    q = torch.randn(1, heads, seq, hd, requires_grad=True)

    def attention() -> None:
        out = torch.nn.functional.scaled_dot_product_attention(q, q, q, is_causal=True)
        out.sum().backward()

    attn_flops = 3.5 * 2 * 2 * heads * seq * seq * hd / 2  # forward + 2.5x backward, causal half
    attn = attn_flops / _best(attention)
    big = torch.empty(64 * 2**20 // 4)
    src = torch.randn_like(big)
    bandwidth = 2 * big.numel() * 4 / _best(lambda: big.copy_(src))
    tiny = torch.ones(1)
    overhead = _best(lambda: [tiny.add(1) for _ in range(1000)]) / 1000
    return {"peak_flops": peak, "matmul_efficiency": min(1.0, gemm / peak), "attention_efficiency": min(1.0, attn / peak),
            "hbm_bandwidth": bandwidth, "kernel_overhead_s": overhead}


def _allreduce_worker(rank: int, world: int, port: int, out: dict) -> None:
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    small, large = torch.ones(16), torch.ones(16 * 2**20 // 4)
    t_small = _best(lambda: dist.all_reduce(small), repeats=20)
    t_large = _best(lambda: dist.all_reduce(large), repeats=5)
    if rank == 0:
        # Ring all-reduce: t = 2 (n-1)/n B / bw + 2 (n-1) latency.
        latency = t_small / (2 * (world - 1))
        bw = 2 * (world - 1) / world * large.numel() * 4 / max(t_large - 2 * (world - 1) * latency, 1e-9)
        out.update(intra_node_bandwidth=bw, intra_node_latency_s=latency, inter_node_bandwidth=bw,
                   inter_node_latency_s=latency)
    dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def measure_links(world: int) -> dict[str, float]:
    with mp.Manager() as manager:
        out = manager.dict()
        mp.spawn(_allreduce_worker, args=(world, _free_port(), out), nprocs=world, join=True)
        return dict(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m train.plan calibrate", description=__doc__.split("\n\n")[0])
    parser.add_argument("--ranks", type=int, default=2, help="ranks per node the figures are for")
    parser.add_argument("--out", default=str(CLUSTER), help="cluster config to update")
    args = parser.parse_args(argv)
    measured = measure_kernels() | measure_links(args.ranks)
    path = Path(args.out)
    values = yaml.safe_load(path.read_text()) if path.is_file() else {"name": "cpu_local", "nodes": 1}
    total_gb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    values.update({k: float(f"{v:.4g}") for k, v in measured.items()})
    values.update(gpus_per_node=args.ranks, memory_per_gpu_gb=round(total_gb / args.ranks, 1), precision="fp32")
    header = ("# This machine, measured by `python -m train.plan calibrate` (one thread per rank, gloo over loopback);\n"
              "# peak_flops is the cores' fp32 FMA peak, the efficiencies are what GEMMs and attention reach of it.\n")
    path.write_text(header + yaml.safe_dump(values, sort_keys=False))
    for k, v in measured.items():
        print(f"{k:<22} {v:.4g}")
    print(f"written to {path}")
    return 0
