"""One optimizer step of the trainer's TrainModule under a layout, with every rank's gradient pieces written out and
put back together under the single-device names (for comparison with tests.reference)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from tests.reference import run_config


def step_one_gradients(overrides: list[str], out_dir: str) -> None:
    """Runs in each rank (tests.forklaunch.fork_call): ZeRO-0 (gradients live on the parameters), clipping off;
    writes ``rank<R>.safetensors`` with this rank's gradient pieces as the optimizer sees them (after the
    data-parallel, tied-weight and sequence-parallel reductions), and the step's losses."""
    import torch.distributed as dist

    from data.stream import GlobalBatchLoader
    from train.engine import init_distributed
    from train.parallel.dims import make_layout
    from train.parallel.groups import init_groups
    from train.parallel.shard import shard_of
    from train.train_module import build_train_module

    world = int(os.environ["WORLD_SIZE"])
    run = run_config([*overrides, "parallel.zero_stage=0", "train.grad_clip=0"], world_size=world)
    init_distributed(torch.device("cpu"))
    layout = make_layout(run.parallel, run.model, world, dist.get_rank())
    module = build_train_module(run, init_groups(layout), "fp32", torch.device("cpu"))
    loader = GlobalBatchLoader(
        run.data, seq_len=run.train.seq_len, global_batch_size=run.train.global_batch_size,
        micro_batch_size=run.train.micro_batch_size, dp_rank=layout.dp_rank, dp_size=layout.dp, seed=run.train.seed,
    )
    pieces: dict[str, torch.Tensor] = {}
    where: dict[str, str] = {}

    def snapshot(opt: torch.optim.Optimizer, args: object, kwargs: object) -> None:
        for i, (name, p) in enumerate(module.named_parameters()):
            shard = shard_of(p)
            key = f"{i}:{name}"
            pieces[key] = p.grad.detach().clone().contiguous()
            where[key] = json.dumps({"name": name, "global_shape": shard.global_shape, "offsets": shard.offsets})

    module.engine.optimizer.register_step_pre_hook(snapshot)
    losses = module.train_batch(loader.batch(0))
    out = Path(out_dir)
    save_file(pieces, out / f"rank{layout.rank}.safetensors", metadata=where)
    if layout.rank == 0:
        (out / "losses.json").write_text(json.dumps({k: float(losses[k]) for k in ("ce_loss", "aux_loss")}))
    dist.barrier()


def assemble(out_dir: Path) -> dict[str, torch.Tensor]:
    """The full gradients from every rank's pieces; pieces held by several ranks must agree exactly."""
    from safetensors import safe_open

    full: dict[str, torch.Tensor] = {}
    for path in sorted(Path(out_dir).glob("rank*.safetensors")):
        with safe_open(str(path), "pt") as f:
            meta = f.metadata()
        tensors = load_file(str(path))
        for key, tensor in tensors.items():
            info = json.loads(meta[key])
            name = info["name"]
            target = full.setdefault(name, torch.full(info["global_shape"], float("nan")))
            region = target[tuple(slice(o, o + n) for o, n in zip(info["offsets"], tensor.shape, strict=True))]
            done = ~torch.isnan(region)
            assert torch.equal(region[done], tensor[done]), f"{name}: ranks disagree on a replicated piece"
            region.copy_(tensor)
    for name, t in full.items():
        assert not torch.isnan(t).any(), f"{name}: no rank holds part of it"
    return full


def assert_gradients_match(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor], rel: float = 1e-5) -> None:
    """Every parameter: max |got - want| <= rel * max |want| (per parameter)."""
    assert set(got) == set(want), sorted(set(got) ^ set(want))
    for name, ref in want.items():
        # a shard may describe its tensor through a view of the same elements (Mamba's in_proj as [2, d_inner, D])
        err = float((got[name].reshape(ref.shape) - ref).abs().max())
        assert err <= rel * float(ref.abs().max()) + 1e-12, (name, err, float(ref.abs().max()))
