"""A copy of the training state keyed by the single-device model's names, so that a run can resume under
another pipeline / data-parallel layout (used by train.checkpoint; pipeline engines and plain ones alike)."""

from __future__ import annotations

from typing import Any

import torch

# ------------------------------------------------------------------------------- layout-free checkpoint state
# A copy of the training state keyed by the single-device model's names (``Transformer.state_dict()`` keys):
# fp32 weights, AdamW moments and step, persistent buffers, lr schedule and engine counters. Written next to
# DeepSpeed's own (layout-bound) files, it lets a run resume under another pipeline/data-parallel layout
# (PP2 -> PP1, PP1 -> PP2, DP size changes). Data parallelism and ZeRO 0/1 only: TP and EP shards are not
# gathered here.
LAYOUT_FREE_DIR = "layout_free"
ADAM_KEYS = ("exp_avg", "exp_avg_sq")


def _inner_optimizer(engine: Any) -> torch.optim.Optimizer:
    return getattr(engine.optimizer, "optimizer", engine.optimizer)


def _uses_hp_mapping(engine: Any) -> bool:
    return engine.zero_optimization_stage() > 0 or engine.bfloat16_enabled()


def _link_zero_optimizer_state(engine: Any) -> None:
    """Points every parameter's ZeRO fragment at its slice of the flat AdamW state.

    DeepSpeed 0.19 links them once, right after the first param group's first step, when the other groups have
    no state yet; their parameters then have no ``exp_avg`` fragment (``safe_get_full_optimizer_state`` fails).
    """
    from deepspeed.utils.mixed_precision_linkage import lazy_init_hp_params_optimizer_state

    zero = engine.optimizer
    for lp_params, flat in zip(zero.bit16_groups, zero.single_partition_of_fp32_groups):
        lazy_init_hp_params_optimizer_state(lp_params, flat, zero.optimizer.state)


def layout_free_supported(module: Any) -> bool:
    """ZeRO 0/1 (bf16 with ZeRO-1 only), no tensor parallelism, no expert-parallel shards."""
    engine = module.engine
    if engine.zero_optimization_stage() > 1 or module.layout.tp > 1:
        return False
    if engine.fp16_enabled() or (engine.bfloat16_enabled() and engine.zero_optimization_stage() == 0):
        return False  # DeepSpeed's BF16_Optimizer / fp16 wrappers keep their state in other structures
    return all(getattr(p, "allreduce", True) for p in engine.module.parameters())


def _check_layout_free_supported(module: Any) -> None:
    if not layout_free_supported(module):
        raise RuntimeError("layout-free checkpoint state supports ZeRO stage 0/1 without TP/EP only")


def save_layout_free_state(module: Any, ckpt_dir: Any) -> None:
    """Collective (every rank): writes ``<ckpt_dir>/layout_free/stage<S>.pt`` from data-parallel rank 0 of
    each pipeline stage (one file for a non-pipeline engine)."""
    from pathlib import Path

    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

    _check_layout_free_supported(module)
    engine = module.engine
    inner = _inner_optimizer(engine)
    steps = [float(s["step"]) for s in inner.state.values() if "step" in s]
    params: dict[str, dict[str, torch.Tensor]] = {}
    seen: set[str] = set()
    if _uses_hp_mapping(engine) and steps:
        _link_zero_optimizer_state(engine)
    for key, p in module.named_parameters():
        if key in seen or getattr(p, "ds_pipe_replicated", False):
            continue  # a tied weight is saved once, from the stage that owns it
        seen.add(key)
        if _uses_hp_mapping(engine):  # collective over the data-parallel group
            entry = {"param": safe_get_full_fp32_param(p)}
            for k in ADAM_KEYS:
                entry[k] = safe_get_full_optimizer_state(p, k) if steps else None
        else:
            state = inner.state.get(p, {})
            entry = {"param": p.detach().float()} | {k: state.get(k) for k in ADAM_KEYS}
        params[key] = {k: (v.detach().cpu().clone() if v is not None else None) for k, v in entry.items()}
    if module.layout.dp_rank != 0:
        return
    stage = module.layout.pp_rank
    out = Path(ckpt_dir) / LAYOUT_FREE_DIR
    out.mkdir(parents=True, exist_ok=True)
    blob = {
        "params": params,
        "buffers": {k: v.detach().cpu().clone() for k, v in module.named_buffers()},
        "optimizer_step": steps[0] if steps else None,
        "lr_scheduler": engine.lr_scheduler.state_dict() if engine.lr_scheduler is not None else None,
        "counters": {"global_steps": engine.global_steps, "global_samples": engine.global_samples,
                     "skipped_steps": engine.skipped_steps},
    }
    torch.save(blob, out / f"stage{stage}.pt")


def has_layout_free_state(ckpt_dir: Any) -> bool:
    from pathlib import Path

    return any((Path(ckpt_dir) / LAYOUT_FREE_DIR).glob("stage*.pt"))


@torch.no_grad()
def load_layout_free_state(module: Any, ckpt_dir: Any) -> None:
    """Collective: restores weights, AdamW state, buffers, lr schedule and counters saved by
    :func:`save_layout_free_state` under any pipeline/data-parallel layout into this engine."""
    from pathlib import Path

    from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

    _check_layout_free_supported(module)
    engine = module.engine
    files = sorted((Path(ckpt_dir) / LAYOUT_FREE_DIR).glob("stage*.pt"))
    if not files:
        raise RuntimeError(f"{ckpt_dir} has no {LAYOUT_FREE_DIR}/ state; it cannot be resumed under another layout")
    params: dict[str, dict] = {}
    buffers: dict[str, torch.Tensor] = {}
    blobs = [torch.load(f, map_location="cpu", weights_only=False) for f in files]
    for blob in blobs:
        params.update(blob["params"])
        buffers.update(blob["buffers"])
    head = blobs[0]
    step = head["optimizer_step"]
    inner = _inner_optimizer(engine)
    if step is not None and _uses_hp_mapping(engine):
        # ZeRO creates its flat AdamW state lazily at the first step: create what is missing, then link it.
        for flat in engine.optimizer.single_partition_of_fp32_groups:
            if not inner.state.get(flat):
                inner.state[flat] = {"step": torch.tensor(step), **{k: torch.zeros_like(flat) for k in ADAM_KEYS}}
        _link_zero_optimizer_state(engine)
    for key, p in module.named_parameters():
        if key not in params:
            raise RuntimeError(f"{ckpt_dir}: no saved state for parameter {key!r}")
        entry = params[key]
        if tuple(entry["param"].shape) != tuple(p.shape):
            raise RuntimeError(f"{ckpt_dir}: {key} has shape {tuple(entry['param'].shape)}, model has {tuple(p.shape)}")
        p.data.copy_(entry["param"].to(p.device, p.dtype))
        if _uses_hp_mapping(engine):
            safe_set_full_fp32_param(p, entry["param"].to(p.device))
            if step is not None:
                for k in ADAM_KEYS:
                    safe_set_full_optimizer_state(p, entry[k].to(p.device), k)
        elif step is not None:
            inner.state[p] = {"step": torch.tensor(step), **{k: entry[k].to(p.device).clone() for k in ADAM_KEYS}}
    if step is not None:
        for state in inner.state.values():
            state["step"] = torch.tensor(step)
    for key, buf in module.named_buffers():
        buf.copy_(buffers[key].to(buf.device, buf.dtype))
    if engine.lr_scheduler is not None and head["lr_scheduler"] is not None:
        engine.lr_scheduler.load_state_dict(head["lr_scheduler"])
        # LambdaLR writes the lr into the param groups only when it steps: restore the current value too.
        for group, lr in zip(engine.optimizer.param_groups, engine.lr_scheduler.get_last_lr()):
            group["lr"] = lr
    for name, value in head["counters"].items():
        setattr(engine, name, value)
