"""Single-GPU training throughput of the three families at seq 4096: tokens/s, MFU and peak memory.

    python bench/gpu.py                           # every config below, compile off then on (<= 8 minutes)
    python bench/gpu.py --only dense_1b --json out.json
    python bench/gpu.py --dry                     # the same code on CPU, tiny models, seq 64, 2 steps (seconds)

Needs only torch and this repository's ``model`` package (PyYAML is used when importable). Each config trains
with a plain loop on random tokens: forward with labels, backward, gradient clipping at 1.0, fused AdamW. The
weights stay float32 and the step runs under bf16 autocast (the usual mixed precision; ``--precision bf16``
casts the weights to bf16 instead). Attention runs through ``F.scaled_dot_product_attention`` (the header says
whether its flash backend accepts the model's heads), Mamba layers through ``model.mamba.selective_scan`` (the
chunked PyTorch scan; mamba_ssm's kernel if installed). Compiled runs compile each decoder block
(``model.compile.compile_blocks``).

Per config: tokens/s over the timed steps, MFU = tokens/s x ``model.flops.flops_per_token`` / peak (989e12,
the dense bf16 peak of an H100/H200 SXM, or ``--peak-flops``), peak memory
(``torch.cuda.max_memory_allocated``), the warm-up time (compilation included) and the last loss. A config
that runs out of memory is reported and retried at half the micro-batch; configs left when ``--budget-s``
(360 s) has passed are reported as skipped, so the whole run ends within about 8 minutes.
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from model.config import ModelConfig
from model.flops import flops_per_token, param_counts
from model.transformer import Transformer

PEAK_BF16_FLOPS = 989e12  # H100 / H200 SXM, dense bf16

# An MoE with dense_1b's trunk whose active feed-forward equals dense_1b's: top-2 of 8 experts of half its width.
MOE_OF_DENSE_1B = {
    "name": "moe_8x_dense_1b",
    "family": "moe",
    "num_experts": 8,
    "top_k": 2,
    "ffn_hidden": 4096,
    "expert_layer_period": 1,
    "expert_layer_offset": 0,
    "capacity_factor": None,
}


@dataclass
class BenchConfig:
    label: str
    model: str  # conf/model/<model>.yaml
    overrides: dict[str, Any] = field(default_factory=dict)
    batch: int = 4
    seq_len: int = 4096
    compile: bool = False


# Each runs with compile off and then on; all eager runs come first, so a tight time budget still covers every family.
CONFIGS = [
    BenchConfig("dense_1b", "dense_1b"),
    BenchConfig("moe_8x_dense_1b", "dense_1b", MOE_OF_DENSE_1B),
    BenchConfig("jamba_1b", "jamba_1b"),
]

DRY_CONFIGS = [
    BenchConfig("dense_tiny", "dense_tiny", batch=2, seq_len=64),
    BenchConfig("moe_tiny", "moe_tiny", batch=2, seq_len=64),
    BenchConfig("hybrid_tiny", "hybrid_tiny", batch=2, seq_len=64),
]


# ------------------------------------------------------------------------------------------------ configs
def _scalar(text: str) -> Any:
    lowered = text.lower()
    if lowered in ("null", "~", ""):
        return None
    if lowered in ("true", "false"):
        return lowered == "true"
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text.strip("\"'")


def parse_flat_yaml(text: str) -> dict[str, Any]:
    """``key: value`` lines with ``#`` comments (the shape of conf/model/*.yaml), for machines without PyYAML."""
    out = {}
    for line in text.splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            key, _, value = line.partition(":")
            out[key.strip()] = _scalar(value.strip())
    return out


def load_yaml(path: Path) -> dict[str, Any]:
    try:
        import yaml
    except ImportError:
        return parse_flat_yaml(path.read_text())
    return yaml.safe_load(path.read_text())


def model_config(bench: BenchConfig) -> ModelConfig:
    raw = load_yaml(ROOT / "conf" / "model" / f"{bench.model}.yaml")
    raw.update(bench.overrides)
    raw["max_seq_len"] = max(raw.get("max_seq_len", 0), bench.seq_len)
    raw["attn_backend"] = "sdpa"
    return ModelConfig.from_dict(raw)


# ------------------------------------------------------------------------------------------------ model
def build_model(cfg: ModelConfig, device: torch.device, dtype: torch.dtype) -> Transformer:
    """The model with its real initialisation, allocated on ``device`` directly: the parameters are drawn on the
    host one at a time (`model.init`), never the whole model at once."""
    with torch.device("meta"):
        model = Transformer(cfg)
    model.to_empty(device=device)
    torch.manual_seed(0)
    model.reset_parameters()
    return model.to(dtype)


def compile_model(model: Transformer) -> None:
    try:
        from model.compile import compile_blocks
    except ImportError:
        for block in model.layers:
            block.compile()
    else:
        compile_blocks(model)


def flash_sdpa_accepts(cfg: ModelConfig, device: torch.device) -> bool:
    """Whether SDPA's flash backend runs this model's attention (heads, kv heads, head_dim) in bf16."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from model.attention import causal_attention

    q = torch.randn(1, 128, cfg.n_heads, cfg.resolved_head_dim, device=device, dtype=torch.bfloat16)
    kv = torch.randn(1, 128, cfg.n_kv_heads, cfg.resolved_head_dim, device=device, dtype=torch.bfloat16)
    try:
        with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
            causal_attention(q, kv, kv, "sdpa")
    except RuntimeError:
        return False
    return True


# ------------------------------------------------------------------------------------------------ one run
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def describe(bench: BenchConfig, cfg: ModelConfig) -> dict[str, Any]:
    counts = param_counts(cfg)
    return {
        "config": bench.label,
        "compile": bench.compile,
        "batch": bench.batch,
        "seq_len": bench.seq_len,
        "params_total": counts["total"],
        "params_active": counts["active"],
        "flops_per_token": flops_per_token(cfg, bench.seq_len),
    }


def train_step(model: Transformer, optimizer: torch.optim.Optimizer, batch: torch.Tensor, bf16_autocast: bool):
    """One optimizer step on ``batch`` [B, T + 1]; returns the loss (a tensor: reading it would synchronise)."""
    with torch.autocast(batch.device.type, dtype=torch.bfloat16, enabled=bf16_autocast):
        loss = model(batch[:, :-1], labels=batch[:, 1:]).loss
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.detach()


def measure(model: Transformer, cfg: ModelConfig, bench: BenchConfig, args: argparse.Namespace) -> dict[str, Any]:
    device = next(model.parameters()).device
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.1, fused=device.type == "cuda")
    gen = torch.Generator(device=device).manual_seed(0)
    batch = torch.randint(0, cfg.vocab_size, (bench.batch, bench.seq_len + 1), device=device, generator=gen)
    bf16_autocast = args.precision == "autocast"
    start = time.perf_counter()
    for _ in range(args.warmup):
        train_step(model, optimizer, batch, bf16_autocast)
    _sync(device)
    warmup_s = time.perf_counter() - start
    start = time.perf_counter()
    losses = [train_step(model, optimizer, batch, bf16_autocast) for _ in range(args.steps)]
    _sync(device)
    elapsed = time.perf_counter() - start
    tokens_per_s = args.steps * bench.batch * bench.seq_len / elapsed
    return {
        "status": "ok",
        "warmup_s": warmup_s,
        "step_s": elapsed / args.steps,
        "tokens_per_s": tokens_per_s,
        "mfu": tokens_per_s * flops_per_token(cfg, bench.seq_len) / args.peak_flops,
        "loss": losses[-1].float().item(),
    }


def run_config(bench: BenchConfig, args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    cfg = model_config(bench)
    row = describe(bench, cfg)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    try:
        model = build_model(cfg, device, torch.bfloat16 if args.precision == "bf16" else torch.float32)
        if bench.compile:
            compile_model(model)
        row.update(measure(model, cfg, bench, args))
    except torch.cuda.OutOfMemoryError:
        row["status"] = "oom"
    except Exception as exc:  # a config that fails (a compiler error, say) must not hide the others' results
        if args.dry:
            raise
        message = str(exc).splitlines()[0] if str(exc) else ""
        row["status"] = f"error: {type(exc).__name__}: {message}"[:200]
    model = None  # the model and its optimizer state go before the next config allocates
    gc.collect()
    if device.type == "cuda":
        row["peak_mem_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
        torch.cuda.empty_cache()
    if bench.compile:
        torch._dynamo.reset()  # the next config's blocks compile afresh, not against this one's guards
    return row


# ------------------------------------------------------------------------------------------------ output
def _billions(count: int) -> str:
    return f"{count / 1e9:.2f}" if count >= 1e8 else f"{count / 1e9:.4f}"


def format_row(row: dict[str, Any]) -> str:
    def num(key: str, fmt: str) -> str:
        value = row.get(key)
        return format(value, fmt) if value is not None else "-"

    shape = f"{row['batch']}x{row['seq_len']}"
    params = "/".join(_billions(row[k]) for k in ("params_total", "params_active"))
    mfu = f"{100 * row['mfu']:.1f}%" if "mfu" in row else "-"
    return (
        f"| {row['config']} | {'on' if row['compile'] else 'off'} | {shape} | {params} | {num('tokens_per_s', ',.0f')}"
        f" | {num('step_s', '.3f')} | {mfu} | {num('peak_mem_gib', '.1f')} | {num('warmup_s', '.1f')}"
        f" | {num('loss', '.3f')} | {row['status']} |"
    )


TABLE_HEAD = (
    "| config | compile | batch x seq | params B total/active | tokens/s | s/step | MFU | peak GiB"
    " | warm-up s | loss | status |\n|---|---|---|---|---|---|---|---|---|---|---|"
)


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dry", action="store_true", help="CPU, tiny models, seq 64, 2 steps, fp32")
    p.add_argument("--only", nargs="+", help="config labels to run (default: all)")
    p.add_argument("--compile", choices=["off", "on", "both"], help="compile modes to run (default: both; --dry: off)")
    p.add_argument("--batch", type=int, help="micro-batch for every config (default: each config's own)")
    p.add_argument("--seq-len", type=int, help="sequence length for every config (default: 4096)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument(
        "--precision",
        choices=["autocast", "bf16", "fp32"],
        default="autocast",
        help="autocast: fp32 weights, bf16 autocast; bf16: bf16 weights; fp32: no bf16",
    )
    p.add_argument("--peak-flops", type=float, default=PEAK_BF16_FLOPS)
    p.add_argument("--budget-s", type=float, default=360.0, help="start no config after this many seconds")
    p.add_argument("--json", type=Path, help="also write the rows (and the machine) to this file")
    args = p.parse_args(argv)

    configs = DRY_CONFIGS if args.dry else CONFIGS
    if args.dry:
        args.warmup, args.steps, args.precision = 1, 2, "fp32"
        device = torch.device("cpu")
    elif not torch.cuda.is_available():
        p.error("no CUDA device; use --dry for the CPU check")
    else:
        device = torch.device("cuda")
    if args.only:
        configs = [c for c in configs if c.label in args.only]
    compile_modes = {"off": [False], "on": [True], "both": [False, True]}[
        args.compile or ("off" if args.dry else "both")
    ]
    configs = [replace(c, compile=mode) for mode in compile_modes for c in configs]
    configs = [replace(c, batch=args.batch or c.batch, seq_len=args.seq_len or c.seq_len) for c in configs]

    machine = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "precision": args.precision,
        "peak_flops": args.peak_flops,
    }
    print(" ".join(f"{k}={v}" for k, v in machine.items()), f"warmup={args.warmup} steps={args.steps}")
    if device.type == "cuda":
        for label, cfg in {c.label: model_config(c) for c in configs}.items():
            print(
                f"{label}: SDPA flash backend {'accepts' if flash_sdpa_accepts(cfg, device) else 'REFUSES'} "
                f"{cfg.n_heads} heads / {cfg.n_kv_heads} kv heads / head_dim {cfg.resolved_head_dim}"
            )
    print(TABLE_HEAD, flush=True)
    start, rows = time.perf_counter(), []
    for bench in configs:
        while True:
            if time.perf_counter() - start > args.budget_s:
                row = {**describe(bench, model_config(bench)), "status": "skipped (time budget)"}
            else:
                row = run_config(bench, args, device)
            rows.append(row)
            print(format_row(row), flush=True)
            if row["status"] != "oom" or bench.batch == 1:
                break
            bench = replace(bench, batch=bench.batch // 2)
    if args.json:
        args.json.write_text(json.dumps({"machine": machine, "rows": rows}, indent=1))
    return rows


if __name__ == "__main__":
    failed = [r for r in main() if r["status"].startswith("error")]
    sys.exit(1 if failed else 0)
