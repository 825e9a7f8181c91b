"""Per-rank memory of the live DeepSpeed engine beside the formulas of train/memory.py, for several layouts on 2
ranks forked from this process (one fresh pair per layout, so each peak RSS is its own):

    .venv/bin/python bench/memory.py --model dense_125m --seq-len 128
    .venv/bin/python bench/memory.py --model dense_tiny --layouts zero0 zero3 tp2

Per rank: parameter, gradient, optimizer (moments + fp32 master) and bucket bytes counted from the engine's tensors
after the last backward of a step (each storage once: ZeRO's flat buffers alias the parameters, and in fp32 its
ZeRO-3 master partition is the parameter partition), the bytes one micro-batch saves for backward (saved-tensor
hooks, parameters excluded), the baseline RSS (after imports, before the model) and the peak RSS above it (VmHWM,
reset at the start of the rank). Two steps run; the second is the one measured. The ranks run under the allocator
the launchers give training (`--allocator`, default auto: tcmalloc where installed; launch/allocator.py).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any, Self

import torch
import torch.multiprocessing as mp
from torch import nn

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from launch.allocator import ALLOCATORS, active_allocator, reexec_under

LINES = ("parameters", "gradients", "optimizer", "master", "buckets")


# ------------------------------------------------------------------------------------------ live tensors
def _status_kb(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(key)


def rss() -> int:
    return _status_kb("VmRSS")


def peak_rss() -> int:
    return _status_kb("VmHWM")


def reset_peak_rss() -> None:
    """VmHWM back to the current RSS (Linux >= 4.0)."""
    Path("/proc/self/clear_refs").write_text("5")


class _Census:
    """Bytes by role, each storage counted once, under the first role it is found in."""

    def __init__(self) -> None:
        self.seen: set[int] = set()
        self.bytes = dict.fromkeys((*LINES, "other"), 0)

    def add(self, role: str, obj: Any, depth: int = 0) -> None:
        if isinstance(obj, torch.Tensor):
            if obj.is_meta:
                return
            storage = obj.untyped_storage()
            if storage.nbytes() and storage.data_ptr() not in self.seen:
                self.seen.add(storage.data_ptr())
                self.bytes[role] += storage.nbytes()
            if obj.grad is not None:
                self.add("gradients", obj.grad)
        elif depth < 4 and isinstance(obj, dict):
            for v in obj.values():
                self.add(role, v, depth + 1)
        elif depth < 4 and isinstance(obj, (list, tuple)):
            for v in obj:
                self.add(role, v, depth + 1)
        elif depth < 4 and type(obj).__module__.startswith("deepspeed") and hasattr(obj, "__dict__"):
            for v in vars(obj).values():
                self.add(role, v, depth + 1)


# ZeRO optimizer attributes by role (DeepSpeed 0.19: stage 1/2, stage 3, the bf16 optimizer).
_ROLES = {
    "gradients": ("averaged_gradients", "grad_partitions_flat_buffer"),
    "master": ("single_partition_of_fp32_groups", "fp32_partitioned_groups_flat", "fp32_groups_flat_partition"),
    "buckets": ("ipg_buckets", "ipg_buffer"),
}


def live_bytes(engine: Any) -> dict[str, int]:
    """Bytes this rank's engine holds by role: the module's parameters (and ZeRO-3 partitions) first, then their
    gradients, the torch optimizer's state, ZeRO's gradient partitions, fp32 masters and buckets; whatever else the
    ZeRO optimizer holds is ``other``."""
    census = _Census()
    params = list(engine.module.parameters())
    for p in params:
        census.add("parameters", p.data)
        if hasattr(p, "ds_tensor"):
            census.add("parameters", p.ds_tensor)
    for p in params:
        if p.grad is not None:
            census.add("gradients", p.grad)
    opt = engine.optimizer
    inner = getattr(opt, "optimizer", opt)
    census.add("optimizer", dict(inner.state))
    for role, attrs in _ROLES.items():
        for attr in attrs:
            census.add(role, getattr(opt, attr, None))
    census.add("other", {k: v for k, v in vars(opt).items() if k not in ("optimizer", "param_groups")})
    return census.bytes


class SavedTensors(torch.autograd.graph.saved_tensors_hooks):
    """Bytes autograd saves for backward inside the context, each storage once, parameters excluded; under full
    activation checkpointing also the block inputs torch.utils.checkpoint keeps (it saves nothing through hooks)."""

    def __init__(self, module: nn.Module, blocks: list[nn.Module], checkpointed: bool) -> None:
        self.module, self.seen, self.bytes = module, set(), 0
        self.handles = [b.register_forward_pre_hook(self._block_input) for b in blocks] if checkpointed else []
        super().__init__(self._pack, lambda t: t)

    def _count(self, t: torch.Tensor) -> None:
        storage = t.untyped_storage()
        params = {p.untyped_storage().data_ptr() for p in self.module.parameters()}
        if storage.data_ptr() not in params and storage.data_ptr() not in self.seen:
            self.seen.add(storage.data_ptr())
            self.bytes += storage.nbytes()

    def _pack(self, t: torch.Tensor) -> torch.Tensor:
        self._count(t)
        return t

    def _block_input(self, module: nn.Module, args: tuple[Any, ...]) -> None:
        if module.training and torch.is_grad_enabled():
            self._count(args[0])

    def __enter__(self) -> Self:
        super().__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        for h in self.handles:
            h.remove()
        super().__exit__(*exc)


# ------------------------------------------------------------------------------------------------- ranks
def run_config(overrides: list[str], world: int) -> Any:
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    import train.__main__  # noqa: F401  (registers the run-dir resolver of conf/config.yaml)
    from train.config import build_run_config

    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose("config", overrides=[*overrides, "run_dir=unused", "logging=none"])
    return build_run_config(OmegaConf.to_container(cfg, resolve=True), world_size=world)


def _blocks(engine: Any) -> list[nn.Module]:
    from model.transformer import Block

    return [m for m in engine.module.modules() if isinstance(m, Block)]


def measure_rank(cfg: Any, rank: int, world: int, port: int, steps: int = 2) -> dict[str, Any]:
    """This rank's figures (runs in a forked rank; call `init` of torch.distributed nowhere else)."""
    os.environ.update({"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world),
                       "LOCAL_WORLD_SIZE": str(world), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
    torch.set_num_threads(1)
    from train.engine import init_distributed
    from train.parallel.dims import make_layout
    from train.parallel.groups import init_groups
    from train.train_module import build_train_module

    reset_peak_rss()
    baseline = rss()
    init_distributed(torch.device("cpu"))
    groups = init_groups(make_layout(cfg.parallel, cfg.model, world, rank))
    module = build_train_module(cfg, groups, "fp32", torch.device("cpu"))
    built_peak = peak_rss() - baseline
    engine = module.engine
    gen = torch.Generator().manual_seed(1000 + groups.layout.dp_rank)
    shape = (cfg.grad_accum_steps, cfg.train.micro_batch_size, cfg.train.seq_len + 1)
    for _ in range(steps - 1):
        module.train_batch(torch.randint(0, cfg.model.vocab_size, shape, generator=gen))
    checkpointed = cfg.model.activation_checkpointing not in (False, "none")
    held: dict[str, int] = {}
    saved = 0
    for i, micro in enumerate(torch.randint(0, cfg.model.vocab_size, shape, generator=gen)):
        if i == 0:
            with SavedTensors(engine.module, _blocks(engine), checkpointed) as hooks:
                out = engine(micro[:, :-1], labels=micro[:, 1:])
            saved = hooks.bytes
        else:
            out = engine(micro[:, :-1], labels=micro[:, 1:])
        engine.backward(out.loss)
        if i == shape[0] - 1:
            held = live_bytes(engine)
        engine.step()
    result = {"rank": rank, "baseline": baseline, "built_peak": built_peak, "peak": peak_rss() - baseline,
              "activations": saved, **held}
    import torch.distributed as dist

    dist.destroy_process_group()
    return result


def _rank_main(cfg: Any, rank: int, world: int, port: int, queue: Any) -> None:
    try:
        queue.put(measure_rank(cfg, rank, world, port))
    except BaseException as e:  # reported by the parent, then re-raised
        import traceback

        queue.put({"rank": rank, "error": f"{e!r}\n{traceback.format_exc()}"})
        raise


def run_layout(overrides: list[str], world: int = 2, timeout: float = 900) -> list[dict[str, Any]]:
    """Figures of every rank of ``world`` forked ranks for one composed config."""
    from tests.utils import free_port

    cfg = run_config(overrides, world)
    ctx = mp.get_context("fork")
    queue = ctx.SimpleQueue()
    port = free_port()
    procs = [ctx.Process(target=_rank_main, args=(cfg, r, world, port, queue)) for r in range(world)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout)
        if p.is_alive():
            p.kill()
    results = []
    while not queue.empty():
        results.append(queue.get())
    errors = [r["error"] for r in results if "error" in r]
    if errors or len(results) != world:
        raise RuntimeError(f"{overrides}: {len(results)} of {world} ranks reported\n" + "\n".join(errors))
    return sorted(results, key=lambda r: r["rank"])


def predicted(cfg: Any, rank: int, world: int) -> tuple[Any, Any]:
    from train.memory import activations, model_states
    from train.parallel.dims import make_layout

    layout = make_layout(cfg.parallel, cfg.model, world, rank)
    return (model_states(cfg.model, layout, cfg.parallel.zero_stage),
            activations(cfg.model, cfg.train.micro_batch_size, cfg.train.seq_len, tp=layout.tp, sp=cfg.parallel.sp))


def warm_up() -> None:
    """What every rank imports, once, before forking."""
    import deepspeed  # noqa: F401

    import train.train_module

    try:
        import train.parallel.tp  # noqa: F401
    except ImportError:
        pass


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="dense_125m")
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--micro-batch", type=int, default=1)
    ap.add_argument("--layouts", nargs="+", default=["zero0", "zero1", "zero2", "zero3", "tp2"])
    ap.add_argument("--checkpointing", default=None, help="model.activation_checkpointing (default: the model's)")
    ap.add_argument("--allocator", choices=ALLOCATORS, default="auto",
                    help="host allocator of the ranks, as `python -m launch.run --allocator` (default: auto)")
    args = ap.parse_args()
    reexec_under(args.allocator)  # the ranks are forked from this process: it must run under their allocator
    warm_up()
    mb = 1 << 20
    print(f"{args.model}, seq {args.seq_len}, micro-batch {args.micro_batch}, 2 ranks, fp32, {active_allocator()} "
          "allocator; MiB per rank (measured / train.memory)")
    header = (f"{'layout':8s} {'rank':>4s} {'params':>15s} {'grads':>15s} {'optim+master':>15s} {'buckets':>15s} "
              f"{'activations':>15s} {'transient':>9s} {'other':>6s} {'baseline':>8s} {'build pk':>8s} {'peak-base':>9s}")
    print(header)
    peaks = {}
    for layout in args.layouts:
        world = 2
        overrides = [f"model={args.model}", f"parallel={layout}", "data=sample", f"train.seq_len={args.seq_len}",
                     f"train.micro_batch_size={args.micro_batch}",
                     f"train.global_batch_size={args.micro_batch * world}"]
        if args.checkpointing is not None:
            overrides.append(f"++model.activation_checkpointing={args.checkpointing}")
        cfg = run_config(overrides, world)
        if cfg.dp_size != world:
            overrides[5] = f"train.global_batch_size={args.micro_batch * cfg.dp_size}"
            cfg = run_config(overrides, world)
        results = run_layout(overrides, world)
        for r in results:
            states, acts = predicted(cfg, r["rank"], world)

            def pair(measured: int, formula: int) -> str:
                return f"{measured / mb:7.1f}/{formula / mb:<7.1f}"

            print(f"{layout:8s} {r['rank']:4d} {pair(r['parameters'], states.parameters)} "
                  f"{pair(r['gradients'], states.gradients)} "
                  f"{pair(r['optimizer'] + r['master'], states.optimizer + states.master)} "
                  f"{pair(r['buckets'], states.buckets)} {pair(r['activations'], acts.saved)} "
                  f"{states.transient / mb:9.1f} {r['other'] / mb:6.1f} {r['baseline'] / mb:8.0f} "
                  f"{r['built_peak'] / mb:8.0f} {r['peak'] / mb:9.0f}")
        peaks[layout] = max(r["peak"] for r in results)
    if "zero0" in peaks and "zero3" in peaks:
        print(f"peak RSS above baseline, ZeRO-3 / ZeRO-0: {peaks['zero3'] / peaks['zero0']:.2f}")


if __name__ == "__main__":
    main()
