"""python -m train.plan calibrate [--ranks 2] [--out conf/cluster/cpu_local.yaml]

Measures this machine for the planner's `cpu_local` cluster, one thread per rank as the trainer's ranks run
(torchrun sets OMP_NUM_THREADS=1), every rank at once so they share memory bandwidth and caches as in training:
the fraction of the core's fp32 peak that large GEMMs and causal attention reach, memory bandwidth (a large copy),
the cost of one small kernel, gloo's all-reduce bandwidth and latency between ranks over loopback, and the host's
costs (`train.plan.calibrate_host`): one operator under autograd, one collective call, DeepSpeed's per-parameter
work at ZeRO 1 and 3. The peak is cores x 2.5 GHz x FMA lanes (`train.metrics`), or the fastest GEMM measured
where that is faster (a core running above 2.5 GHz).
"""

from __future__ import annotations

import argparse
import os
import socket
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import yaml

from launch.allocator import ALLOCATORS, active_allocator, reexec_under
from train.metrics import cpu_flops_per_cycle
from train.plan.calibrate_host import collective_costs, op_overhead, timed, zero_param_costs
from train.plan.cluster import CLUSTERS

CLUSTER = CLUSTERS / "cpu_local.yaml"


def measure_kernels() -> dict[str, float]:
    """Run by every rank at once: each timed call starts after a barrier, so the ranks' kernels overlap as in
    training (they share the memory bus and the L3)."""
    torch.set_num_threads(1)
    sync = dist.is_initialized()
    n = 1024
    a, b = torch.randn(n, n), torch.randn(n, n)
    gemm = 2 * n**3 / timed(lambda: a @ b, sync=sync)
    rate_by_dim = []
    for dim in (32, 64, 128, 256, 512, 1024):  # a transformer's GEMMs: many tokens through a thin weight
        x, w = torch.randn(2048, dim), torch.randn(dim, dim)
        rate_by_dim.append((dim, 2 * 2048 * dim**2 / timed(lambda x=x, w=w: x @ w, repeats=9, sync=sync)))
    # The nominal peak assumes 2.5 GHz; a core that turbos above it shows GEMMs faster than that "peak", and then the
    # fastest GEMM measured is the better bound (efficiencies stay fractions of a real peak, never clipped).
    peak = max(2.5e9 * cpu_flops_per_cycle(), gemm, *(rate for _, rate in rate_by_dim))
    by_dim = [[dim, round(rate / peak, 4)] for dim, rate in rate_by_dim]
    heads, seq, hd = 4, 512, 64
    q = torch.randn(1, heads, seq, hd, requires_grad=True)

    def attention() -> None:
        out = torch.nn.functional.scaled_dot_product_attention(q, q, q, is_causal=True)
        out.sum().backward()

    attn_flops = 3.5 * 2 * 2 * heads * seq * seq * hd / 2  # forward + 2.5x backward, causal half
    attn = attn_flops / timed(attention, sync=sync)
    # A large copy, in several fresh buffers: one allocation's pages (huge or not) swing the figure by up to 2x.
    rates = []
    for _ in range(5):
        big = torch.empty(64 * 2**20 // 4)
        src = torch.randn_like(big)
        rates.append(2 * big.numel() * 4 / timed(lambda big=big, src=src: big.copy_(src), repeats=5, sync=sync))
    bandwidth = sorted(rates)[len(rates) // 2]
    tiny = torch.ones(1)
    overhead = timed(lambda: [tiny.add(1) for _ in range(1000)]) / 1000
    return {"peak_flops": peak, "matmul_efficiency": gemm / peak, "matmul_efficiency_by_dim": by_dim,
            "attention_efficiency": min(1.0, attn / peak), "hbm_bandwidth": bandwidth, "kernel_overhead_s": overhead}


def _worker(rank: int, world: int, port: int, out: dict) -> None:
    import deepspeed

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False  # as train.engine: skip a build never used
    deepspeed.init_distributed(dist_backend="gloo", auto_mpi_discovery=False)
    dist.barrier()
    measured = measure_kernels()
    small, large = torch.ones(16), torch.ones(16 * 2**20 // 4)
    t_small = timed(lambda: dist.all_reduce(small), repeats=21, sync=True)
    t_large = timed(lambda: dist.all_reduce(large), repeats=5, sync=True)
    # Ring all-reduce: t = 2 (n-1)/n B / bw + 2 (n-1) latency.
    latency = t_small / (2 * (world - 1))
    bw = 2 * (world - 1) / world * large.numel() * 4 / max(t_large - 2 * (world - 1) * latency, 1e-9)
    measured |= {"intra_node_bandwidth": bw, "intra_node_latency_s": latency, "inter_node_bandwidth": bw,
                 "inter_node_latency_s": latency}
    measured |= {"op_overhead_s": op_overhead()} | collective_costs(latency, bw)
    measured |= zero_param_costs()
    out[rank] = measured
    dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def measure(world: int) -> dict[str, float]:
    """Every figure, the mean over the ranks that measured it at once."""
    with mp.Manager() as manager:
        out = manager.dict()
        mp.spawn(_worker, args=(world, _free_port(), out), nprocs=world, join=True)
        ranks = [out[r] for r in range(world)]
    by_dim = [[dim, round(sum(r["matmul_efficiency_by_dim"][i][1] for r in ranks) / world, 4)]
              for i, (dim, _) in enumerate(ranks[0]["matmul_efficiency_by_dim"])]
    return {key: sum(r[key] for r in ranks) / world for key in ranks[0] if key != "matmul_efficiency_by_dim"} | {
        "matmul_efficiency_by_dim": by_dim}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m train.plan calibrate", description=__doc__.split("\n\n")[0])
    parser.add_argument("--ranks", type=int, default=2, help="ranks per node the figures are for")
    parser.add_argument("--out", default=str(CLUSTER), help="cluster config to update")
    parser.add_argument("--allocator", choices=ALLOCATORS, default="auto",
                        help="host allocator to measure under: the launchers' (default auto; launch/allocator.py)")
    args = parser.parse_args(argv)
    reexec_under(args.allocator)  # the host costs depend on it (~1.3x on CPU steps); the ranks inherit it
    measured = measure(args.ranks)
    path = Path(args.out)
    values = yaml.safe_load(path.read_text()) if path.is_file() else {"name": "cpu_local", "nodes": 1}
    total_gb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    values.update({k: v if isinstance(v, list) else float(f"{v:.4g}") for k, v in measured.items()})
    values.update(gpus_per_node=args.ranks, memory_per_gpu_gb=round(total_gb / args.ranks, 1), precision="fp32")
    values["overlap_comm"] = False  # one thread per rank computes and makes every blocking gloo call
    header = ("# This machine, measured by `python -m train.plan calibrate` (one thread per rank, all ranks at once,\n"
              "# gloo over loopback); peak_flops is the cores' fp32 FMA peak, the efficiencies are what GEMMs and\n"
              "# attention reach of it; op_overhead_s and the rest are the host's costs (train/plan/host.py).\n"
              f"# Host allocator: {active_allocator()} (launch/allocator.py), as `python -m launch.run` gives runs.\n")
    path.write_text(header + yaml.safe_dump(values, sort_keys=False))
    for k, v in measured.items():
        print(f"{k:<24} {v}" if isinstance(v, list) else f"{k:<24} {v:.4g}")
    print(f"written to {path}")
    return 0
