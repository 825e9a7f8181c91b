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


def assert_losses_match(run_dir: Path, want: list[dict[str, float]], rel: float = 1e-5,
                        floor: list[float] | None = None) -> None:
    """The trainer's logged loss and ce_loss at every step within ``rel`` of the reference's, plus 4x ``floor[step]``
    where given (`References`: how far a one-ulp change of the weights moves the reference's own loss by that step);
    aux_loss within the same bound of the loss (it is small, so relative to itself would ask for more than fp32
    sums give)."""
    from tests.utils import read_metrics

    rows = {r["step"]: r for r in read_metrics(run_dir) if "ce_loss" in r}
    assert sorted(rows) == list(range(1, len(want) + 1)), sorted(rows)
    drift = [f"{abs(rows[step]['loss'] / ref['loss'] - 1):.1e}" for step, ref in enumerate(want, start=1)]
    for step, ref in enumerate(want, start=1):
        tol = rel + 4 * (floor[step - 1] if floor else 0.0)
        for key in ("loss", "ce_loss"):
            assert abs(rows[step][key] - ref[key]) <= tol * abs(ref[key]), (
                f"step {step} {key}: {rows[step][key]} vs {ref[key]}, tolerance {tol:.1e}; loss drift by step {drift}")
        assert abs(rows[step]["aux_loss"] - ref["aux_loss"]) <= tol * abs(ref["loss"]), (step, rows[step])


class References:
    """`tests.reference.micro_batch_reference` of ``base`` per model, computed once per test module, with its
    rounding floor: per step, the running maximum of how far the reference's loss moves when every initial weight
    is scaled by 1 +- 2**-23 (one ulp). Training amplifies rounding differences (an MoE token routed the other way
    at a near tie; measured on moe_tiny: ~1e-7 for four steps, then up to ~1e-5 by step 8, dense ~3e-7), and no
    layout, which sums in another order, can be held closer to the reference than the reference is to itself."""

    def __init__(self, base: list[str], steps: int) -> None:
        self.base, self.steps, self.done = base, steps, {}

    def __call__(self, model: str) -> tuple:
        if model not in self.done:
            from tests.reference import micro_batch_reference

            overrides = [*self.base, f"model={model}"]
            losses, grads = micro_batch_reference(overrides, self.steps)
            floor, worst = [], 0.0
            twins = [micro_batch_reference(overrides, self.steps, weight_scale=1 + sign * 2**-23)[0]
                     for sign in (1, -1)]
            for step, ref in enumerate(losses):
                worst = max([worst, *(abs(twin[step]["loss"] / ref["loss"] - 1) for twin in twins)])
                floor.append(worst)
            self.done[model] = (losses, grads, floor)
        return self.done[model]


STEP_ONE_TIMEOUT_S = 180


def check_layout(overrides: list[str], ranks: int, reference: tuple, out_dir: Path, rel: float = 1e-5,
                 fork: bool = True) -> str:
    """The layout's first-step gradients (gathered from every rank's pieces) and the real trainer's losses over the
    reference's steps, against the single-process ``reference`` = (losses, gradients, rounding floor) of
    `References`; returns the trainer's stdout."""
    from tests.forklaunch import fork_call
    from tests.utils import child_env, run_train

    want, want_grads, floor = reference
    # One forward and backward of a tiny model takes seconds, even at 8 ranks on 2 busy cores: a rank waiting in a
    # collective its peer never enters (a lost send in a schedule) fails the test in 3 minutes, not 10.
    fork_call(step_one_gradients, (overrides, str(out_dir)), ranks, child_env(), timeout=STEP_ONE_TIMEOUT_S)
    assert_gradients_match(assemble(out_dir), want_grads, rel)
    run_dir = out_dir / "run"
    proc = run_train([*overrides, f"run_dir={run_dir}"], nproc=ranks, fork=fork)
    assert f"world {ranks}" in proc.stdout
    assert_losses_match(run_dir, want, rel, floor)
    return proc.stdout
