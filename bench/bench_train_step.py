"""Training-step throughput: our model (plain loop and DeepSpeed engine) against a plain PyTorch +
transformers LlamaForCausalLM loop on the same architecture and weights.

    .venv/bin/python bench/bench_train_step.py --model dense_tiny --seq-len 256 --batch 8 --steps 10

Prints tokens/s of each and the ratios against the transformers loop (same process, same inputs).
On CUDA it runs bf16 autocast; on CPU fp32. MFU is reported against --peak-flops (or a table/CPU estimate).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from model.config import ModelConfig
from model.convert import config_to_hf, state_dict_to_hf
from model.flops import flops_per_token
from model.transformer import Transformer
from train.metrics import peak_flops_per_device


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_loop(step_fn, steps: int, warmup: int, device: torch.device) -> float:
    for _ in range(warmup):
        step_fn()
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        step_fn()
    _sync(device)
    return (time.perf_counter() - t0) / steps


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="dense_tiny")
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--peak-flops", type=float, default=None)
    p.add_argument("--no-deepspeed", action="store_true")
    args = p.parse_args()

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    amp = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else torch.autocast("cpu", enabled=False)
    raw = yaml.safe_load((Path(__file__).resolve().parents[1] / "conf" / "model" / f"{args.model}.yaml").read_text())
    cfg = ModelConfig.from_dict(raw)
    cfg.max_seq_len = max(cfg.max_seq_len, args.seq_len)
    torch.manual_seed(0)
    ours = Transformer(cfg).to(device)
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_config(config_to_hf(cfg), attn_implementation="sdpa").to(device)
    hf.load_state_dict(state_dict_to_hf(ours.state_dict(), cfg), strict=False)
    tokens = torch.randint(0, cfg.vocab_size, (args.batch, args.seq_len + 1), device=device)
    x, y = tokens[:, :-1], tokens[:, 1:]

    def plain_step(model, loss_of):
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, foreach=device.type == "cuda")

        def step():
            with amp:
                loss = loss_of(model)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)

        return step

    results = {}
    results["hf_plain"] = time_loop(plain_step(hf, lambda m: m(input_ids=x, labels=tokens[:, :-1]).loss), args.steps,
                                    args.warmup, device)
    results["ours_plain"] = time_loop(plain_step(ours, lambda m: m(x, labels=y).loss), args.steps, args.warmup, device)
    if not args.no_deepspeed:
        import deepspeed

        for k, v in {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1",
                     "MASTER_PORT": "29533"}.items():
            os.environ.setdefault(k, v)
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
        deepspeed.init_distributed(dist_backend="nccl" if device.type == "cuda" else "gloo", auto_mpi_discovery=False)
        engine, *_ = deepspeed.initialize(
            model=ours, optimizer=torch.optim.AdamW(ours.parameters(), lr=1e-4),
            config={"train_micro_batch_size_per_gpu": args.batch, "gradient_accumulation_steps": 1,
                    "gradient_clipping": 1.0, "zero_optimization": {"stage": 1},
                    "bf16": {"enabled": device.type == "cuda"}, "steps_per_print": 10**9},
        )

        def ds_step():
            loss = engine(x, labels=y).loss
            engine.backward(loss)
            engine.step()

        results["ours_deepspeed_zero1"] = time_loop(ds_step, args.steps, args.warmup, device)

    tokens_per_step = args.batch * args.seq_len
    fpt = flops_per_token(cfg, args.seq_len)
    peak = peak_flops_per_device(device, args.peak_flops)
    print(f"model {cfg.name} seq {args.seq_len} batch {args.batch} on {device.type} "
          f"({'bf16 autocast' if device.type == 'cuda' else 'fp32'}), {torch.get_num_threads()} threads")
    print(f"{'loop':<24}{'s/step':>10}{'tokens/s':>12}{'MFU':>8}{'vs hf_plain':>13}")
    for name, sec in results.items():
        tps = tokens_per_step / sec
        print(f"{name:<24}{sec:>10.4f}{tps:>12.0f}{100 * tps * fpt / peak:>7.2f}%{results['hf_plain'] / sec:>12.2f}x")


if __name__ == "__main__":
    main()
