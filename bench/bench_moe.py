"""Our MoE layer (`model.moe.MoE`) against transformers' `MixtralSparseMoeBlock`: forward + backward, same weights.

    .venv/bin/python bench/bench_moe.py
    .venv/bin/python bench/bench_moe.py --shapes 256,512,8,2,4,256 --repeats 30 --threads 2
    MALLOC_MMAP_THRESHOLD_=268435456 MALLOC_TRIM_THRESHOLD_=1073741824 .venv/bin/python bench/bench_moe.py

The last line keeps glibc from handing large freed blocks back to the system: otherwise every step page-faults
in fresh pages for the grouped path's whole-batch intermediates (thousands of faults per step, several ms), while
the per-expert blocks of the loops are reused from the heap.

Each shape is d_model,ffn_hidden,experts,top_k,batch,seq. Both layers get the same weights (the names of
`model.convert`: router = gate, w1/w3/w2 = experts.{e}.w1/w3/w2); the outputs and input gradients are checked
equal before timing. One step is forward, backward of ``(y * probe).sum()`` and nothing else (no optimizer).
Steps alternate between the layers (one of each per repeat, after warm-up), so load on the machine hits all alike;
times are process CPU seconds (``time.process_time``: all threads of this process) and the table shows their medians
and the median of the per-repeat ratios (transformers / ours: > 1 means ours is faster). "ours, loop" is our layer
forced onto its per-expert fallback (used where torch has no grouped GEMM). fp32 on CPU.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from unittest import mock

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from model import moe as moe_module
from model.config import ModelConfig

SHAPES = ["128,256,4,2,4,256", "256,512,8,2,4,256"]  # moe_tiny's layer, and a bigger one


def build_layers(d_model: int, ffn_hidden: int, experts: int, top_k: int) -> tuple[torch.nn.Module, moe_module.MoE]:
    from transformers import MixtralConfig
    from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock

    hf_cfg = MixtralConfig(
        hidden_size=d_model,
        intermediate_size=ffn_hidden,
        num_local_experts=experts,
        num_experts_per_tok=top_k,
        router_jitter_noise=0.0,
    )
    hf = MixtralSparseMoeBlock(hf_cfg)
    cfg = ModelConfig(
        family="moe", d_model=d_model, n_heads=1, n_kv_heads=1, ffn_hidden=ffn_hidden, num_experts=experts, top_k=top_k
    )
    ours = moe_module.MoE(cfg.validate())
    with torch.no_grad():
        ours.router.weight.copy_(hf.gate.weight)
        for name in ("w1", "w3", "w2"):
            getattr(ours, name).copy_(torch.stack([getattr(e, name).weight for e in hf.experts]))
    return hf, ours


def step_of(layer: torch.nn.Module, x: torch.Tensor, probe: torch.Tensor) -> Callable[[], tuple[float, torch.Tensor]]:
    """Forward + backward of ``layer`` on a fresh leaf copy of ``x``; returns (CPU seconds, input gradient)."""

    def step() -> tuple[float, torch.Tensor]:
        leaf = x.clone().requires_grad_()
        start = time.process_time()
        y = layer(leaf)[0]
        (y * probe).sum().backward()
        elapsed = time.process_time() - start
        layer.zero_grad(set_to_none=True)
        return elapsed, leaf.grad

    return step


def loop_fallback(step: Callable[[], tuple[float, torch.Tensor]]) -> Callable[[], tuple[float, torch.Tensor]]:
    def step_on_loop() -> tuple[float, torch.Tensor]:
        with mock.patch.object(moe_module, "_grouped_mm_usable", lambda *_: False):
            return step()

    return step_on_loop


def bench_shape(shape: str, repeats: int, warmup: int) -> None:
    d_model, ffn_hidden, experts, top_k, batch, seq = (int(v) for v in shape.split(","))
    torch.manual_seed(0)
    hf, ours = build_layers(d_model, ffn_hidden, experts, top_k)
    x, probe = torch.randn(batch, seq, d_model), torch.randn(batch, seq, d_model)
    with torch.no_grad():
        y_hf, y_ours = hf(x)[0], ours(x)[0]
    steps = {"transformers": step_of(hf, x, probe), "ours": step_of(ours, x, probe)}
    steps["ours, loop"] = loop_fallback(steps["ours"])
    grads = {name: step()[1] for name, step in steps.items()}
    out_err = (y_ours - y_hf).abs().max().item()
    grad_err = max((g - grads["transformers"]).abs().max().item() for g in grads.values())
    if out_err > 1e-4 or grad_err > 1e-4:
        raise RuntimeError(f"layers disagree: output {out_err:.2e}, input gradient {grad_err:.2e}")

    for _ in range(warmup):
        for step in steps.values():
            step()
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(repeats):
        for name, step in steps.items():
            times[name].append(step()[0])
    print(
        f"\nd_model {d_model}, ffn_hidden {ffn_hidden}, {experts} experts top-{top_k}, tokens {batch} x {seq}; "
        f"max |diff| output {out_err:.1e}, input grad {grad_err:.1e}"
    )
    print(f"{'layer':<14}{'median ms':>10}{'transformers / this':>22}")
    for name, ts in times.items():
        ratio = statistics.median(h / t for h, t in zip(times["transformers"], ts, strict=True))
        print(f"{name:<14}{1e3 * statistics.median(ts):>10.2f}{ratio:>22.3f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shapes", nargs="+", default=SHAPES, help="d_model,ffn_hidden,experts,top_k,batch,seq")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} thread(s), {args.repeats} interleaved repeats")
    for shape in args.shapes:
        bench_shape(shape, args.repeats, args.warmup)


if __name__ == "__main__":
    main()
