"""Training step of our model against transformers' model of the same config and weights, per family.

    .venv/bin/python bench/bench_train_step.py --families dense moe hybrid --repeats 7
    .venv/bin/python bench/bench_train_step.py --families dense --compile      # adds our torch.compile'd step

For each family (dense = LlamaForCausalLM, moe = MixtralForCausalLM, hybrid = JambaForCausalLM) the tiny config
is resized (--d-model, --layers, --ffn-hidden), both models get the same weights (`model.convert`) and each
trains with a plain loop: forward with labels, backward, clip at 1.0, AdamW: torch's `clip_grad_norm_` and default
AdamW, then the trainer's optimizer step (its gradient norm and clipping, fused AdamW) on both sides, so that
"transformers, trainer opt" against "ours, trainer opt" compares the models alone. The steps
are interleaved (one of each per repeat, after warm-up), so load on the machine hits both alike; the table shows
median seconds per step, tokens/s, MFU and the medians of the per-repeat ratios against transformers with torch's
clipping and AdamW and with the trainer's optimizer step (reference time / ours: > 1 means ours is faster).
On CUDA both run under bf16 autocast; on CPU in fp32.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from launch.allocator import ALLOCATORS, active_allocator, reexec_under
from model.config import ModelConfig
from model.convert import config_to_hf, state_dict_to_hf
from model.flops import flops_per_token
from model.transformer import Transformer
from train.metrics import peak_flops_per_device
from train.parallel.dims import Layout
from train.parallel.grad import clip_, grad_norm
from train.parallel.groups import ParallelGroups

TINY_CONFIG = {"dense": "dense_tiny", "moe": "moe_tiny", "hybrid": "hybrid_tiny"}


def family_config(family: str, d_model: int, layers: int, ffn_hidden: int, seq_len: int, **overrides) -> ModelConfig:
    raw = yaml.safe_load((ROOT / "conf" / "model" / f"{TINY_CONFIG[family]}.yaml").read_text())
    raw.update(d_model=d_model, n_layers=layers, ffn_hidden=ffn_hidden, max_seq_len=max(raw["max_seq_len"], seq_len))
    raw.update(overrides)
    return ModelConfig.from_dict(raw)


def add_shape_args(p: argparse.ArgumentParser) -> None:
    """The families and model/batch shape every training-step benchmark takes."""
    p.add_argument("--families", nargs="+", default=["dense", "moe", "hybrid"], choices=list(TINY_CONFIG))
    p.add_argument("--d-model", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--ffn-hidden", type=int, default=512)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--repeats", type=int, default=7)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def train_step(model: torch.nn.Module, loss_of: Callable[[], torch.Tensor], device: torch.device,
               fused: bool = False) -> Callable[[], float]:
    """One optimizer step of ``model``; returns its wall time in seconds. The reference clips with torch's
    ``clip_grad_norm_`` and steps torch's default AdamW; ``fused`` is the trainer's optimizer step: fused AdamW
    (`train.engine.build_optimizer`) and the trainer's norm and clipping (`train.parallel.grad`)."""
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True) if fused else torch.optim.AdamW(
        model.parameters(), lr=1e-4, foreach=device.type == "cuda")
    params = list(model.parameters())
    one_process = ParallelGroups(Layout(world=1, dp=1))

    def clip() -> None:
        if fused:
            clip_(params, grad_norm(params, one_process), 1.0)
        else:
            torch.nn.utils.clip_grad_norm_(params, 1.0)
    amp = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")

    def step() -> float:
        _sync(device)
        t0 = time.perf_counter()
        with amp:
            loss = loss_of()
        loss.backward()
        clip()
        opt.step()
        opt.zero_grad(set_to_none=True)
        _sync(device)
        return time.perf_counter() - t0

    return step


def bench_family(family: str, args: argparse.Namespace, device: torch.device) -> list[tuple[str, list[float]]]:
    from transformers import AutoModelForCausalLM

    cfg = family_config(family, args.d_model, args.layers, args.ffn_hidden, args.seq_len)
    torch.manual_seed(0)
    ours = Transformer(cfg).to(device)
    hf_config = config_to_hf(cfg)
    if cfg.num_experts > 1:
        # Both sides train the same objective: ours always adds the load-balancing loss (and a z-loss) in training;
        # transformers adds its balancing loss only with router logits on, as an MoE pre-training run sets them.
        hf_config.output_router_logits = True
    hf = AutoModelForCausalLM.from_config(hf_config, attn_implementation="sdpa").to(device)
    missing, unexpected = hf.load_state_dict(state_dict_to_hf(ours.state_dict(), cfg), strict=False)
    if unexpected or [k for k in missing if "inv_freq" not in k]:
        raise RuntimeError(f"weights did not map onto the transformers model: {missing} {unexpected}")
    tokens = torch.randint(0, cfg.vocab_size, (args.batch, args.seq_len + 1), device=device)
    x, y = tokens[:, :-1], tokens[:, 1:]
    # transformers shifts the labels itself: same inputs, T-1 scored positions.
    steps = [("transformers", train_step(hf, lambda: hf(input_ids=x, labels=x).loss, device)),
             ("ours", train_step(ours, lambda: ours(x, labels=y).loss, device))]
    # The trainer's optimizer step on both sides: what is left between these two rows is the model alone.
    hf_fused = AutoModelForCausalLM.from_config(hf_config, attn_implementation="sdpa").to(device)
    hf_fused.load_state_dict(hf.state_dict())
    steps.append(("transformers, trainer opt",
                  train_step(hf_fused, lambda: hf_fused(input_ids=x, labels=x).loss, device, True)))
    trainer_opt = Transformer(cfg).to(device)
    trainer_opt.load_state_dict(ours.state_dict())
    steps.append(("ours, trainer opt", train_step(trainer_opt, lambda: trainer_opt(x, labels=y).loss, device, True)))
    if args.compile:
        from model.compile import compile_blocks

        compiled = Transformer(dataclasses.replace(cfg)).to(device)
        compiled.load_state_dict(ours.state_dict())
        compile_blocks(compiled)
        steps.append(("ours, compiled", train_step(compiled, lambda: compiled(x, labels=y).loss, device, True)))
    for _, step in steps:  # warm-up (and compilation) outside the timed repeats
        for _ in range(args.warmup):
            step()
    times: dict[str, list[float]] = {name: [] for name, _ in steps}
    for _ in range(args.repeats):
        for name, step in steps:
            times[name].append(step())
    return [(name, times[name]) for name, _ in steps]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_shape_args(p)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument("--compile", action="store_true", help="also time our model with model.compile.compile_blocks "
                   "(and the trainer's fused AdamW)")
    p.add_argument("--peak-flops", type=float, default=None)
    p.add_argument("--allocator", choices=ALLOCATORS, default="auto",
                   help="host allocator of this process, both models alike (launch/allocator.py); default auto, as "
                        "the launchers: tcmalloc on CPU where installed")
    args = p.parse_args()
    reexec_under(args.allocator)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    peak = peak_flops_per_device(device, args.peak_flops)
    tokens_per_step = args.batch * args.seq_len
    print(f"d_model {args.d_model}, {args.layers} layers, ffn {args.ffn_hidden}, seq {args.seq_len}, batch "
          f"{args.batch} on {device.type} ({'bf16 autocast' if device.type == 'cuda' else 'fp32'}), "
          f"{torch.get_num_threads()} threads, torch {torch.__version__}, {active_allocator()} allocator, "
          f"{args.repeats} interleaved repeats")
    print(f"{'family':<8}{'loop':<26}{'s/step':>9}{'tokens/s':>10}{'MFU':>8}{'vs transformers':>17}"
          f"{'vs transformers, trainer opt':>30}")
    for family in args.families:
        rows = bench_family(family, args, device)
        cfg = family_config(family, args.d_model, args.layers, args.ffn_hidden, args.seq_len)
        fpt = flops_per_token(cfg, args.seq_len)
        reference, fused_reference = rows[0][1], dict(rows)["transformers, trainer opt"]
        for name, times in rows:
            sec = statistics.median(times)
            ratio, fused_ratio = (statistics.median(r / t for r, t in zip(ref, times, strict=True))
                                  for ref in (reference, fused_reference))
            tps = tokens_per_step / sec
            print(f"{family:<8}{name:<26}{sec:>9.4f}{tps:>10.0f}{100 * tps * fpt / peak:>7.2f}%{ratio:>16.2f}x"
                  f"{fused_ratio:>29.2f}x")


if __name__ == "__main__":
    main()
