"""Resharding checkpoints (train/checkpoint_shards.py) with real DeepSpeed engines (2 gloo ranks forked from this
process) saved under one layout / ZeRO stage and loaded under another. The file format alone:
tests/test_checkpoint_shards_format.py."""

from __future__ import annotations

import os
import traceback
import weakref
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import deepspeed
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn

from tests.rounding import gamma
from tests.utils import free_port
from train.checkpoint_shards import (
    load_shards,
    optimizer_step,
    param_state,
    save_shards,
)
from train.parallel.shard import mark_shard

# ------------------------------------------------------------------------------------------- DeepSpeed engines
V, D, H, B, T = 16, 8, 12, 4, 5  # vocab, width, hidden, global batch, sequence
WORLD = 2


@dataclass(frozen=True)
class Layout:
    """tp x dp ranks hold one model; WORLD // (tp * dp) independent replicas of it fill the world."""

    tp: int
    dp: int
    stage: int
    bf16: bool = False

    def coords(self, rank: int) -> tuple[int, int, int]:  # replica, dp rank, tp rank
        size = self.tp * self.dp
        return rank // size, rank % size // self.tp, rank % self.tp


_GROUPS: dict[tuple[int, int], tuple] = {}


def _groups(lay: Layout, rank: int) -> tuple:
    """(tp group, dp group) of ``rank``; new_group is collective, so every rank creates every group."""
    if (lay.tp, lay.dp) not in _GROUPS:
        mine = []
        for axis in (2, 1):  # a tp group: the ranks that differ only in their tp coordinate; a dp group likewise
            def others(r: int, axis: int = axis) -> tuple[int, ...]:
                return tuple(c for i, c in enumerate(lay.coords(r)) if i != axis)

            for key in sorted({others(r) for r in range(WORLD)}):
                ranks = [r for r in range(WORLD) if others(r) == key]
                group = dist.new_group(ranks)
                if rank in ranks:
                    mine.append(group)
        _GROUPS[(lay.tp, lay.dp)] = tuple(mine)
    return _GROUPS[(lay.tp, lay.dp)]


class Mpu:
    """DeepSpeed's view of the groups: gradients reduce over dp, the model is split over tp."""

    def __init__(self, lay: Layout, rank: int) -> None:
        self.lay, (self.tp_group, self.dp_group) = lay, _groups(lay, rank)
        _, self.dp_rank, self.tp_rank = lay.coords(rank)

    def get_data_parallel_group(self):
        return self.dp_group

    def get_data_parallel_rank(self) -> int:
        return self.dp_rank

    def get_data_parallel_world_size(self) -> int:
        return self.lay.dp

    def get_model_parallel_group(self):
        return self.tp_group

    def get_model_parallel_rank(self) -> int:
        return self.tp_rank

    def get_model_parallel_world_size(self) -> int:
        return self.lay.tp

    get_tensor_model_parallel_group = get_model_parallel_group
    get_tensor_model_parallel_rank = get_model_parallel_rank
    get_tensor_model_parallel_world_size = get_model_parallel_world_size


class _CopyToTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x

    @staticmethod
    def backward(ctx, grad):
        grad = grad.clone()
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


class _ReduceFromTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        x = x.clone()
        dist.all_reduce(x, group=group)
        return x

    @staticmethod
    def backward(ctx, grad):
        return grad, None


def full_tensors() -> dict[str, torch.Tensor]:
    """The single-device model's parameters, the same on every rank."""
    g = torch.Generator().manual_seed(0)
    shapes = {"embed.weight": (V, D), "up.weight": (H, D), "up.bias": (H,), "down.weight": (D, H), "down.bias": (D,),
              "head.weight": (V, D), "gain": (V,)}
    return {name: torch.randn(shape, generator=g) * 0.3 for name, shape in shapes.items()}


TP_DIM = {"up.weight": 0, "up.bias": 0, "down.weight": 1}  # column-parallel up, row-parallel down


class Net(nn.Module):
    """Embedding, a column-/row-parallel MLP (its tp-rank slices marked with mark_shard), a head, a frozen gain and
    a buffer; the same function of the full tensors under every tp."""

    def __init__(self, tp: int, tp_rank: int, tp_group) -> None:
        super().__init__()
        full, self.tp_group = full_tensors(), tp_group if tp > 1 else None
        self.embed = nn.Embedding(V, D)
        self.up = nn.Linear(D, H // tp)
        self.down = nn.Linear(H // tp, D)
        self.head = nn.Linear(D, V, bias=False)
        self.gain = nn.Parameter(torch.empty(V), requires_grad=False)
        self.register_buffer("expert_bias", torch.zeros(V))
        for name, p in self.named_parameters():
            src = full[name]
            if name in TP_DIM:
                src = mark_shard(src.chunk(tp, TP_DIM[name])[tp_rank], src, TP_DIM[name], tp_rank, tp)
            with torch.no_grad():
                p.copy_(src)
            p.shard = getattr(src, "shard", None)

    def forward(self, ids: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        x = self.embed(ids)
        if self.tp_group is not None:
            x = _CopyToTP.apply(x, self.tp_group)
        y = F.linear(F.gelu(self.up(x)), self.down.weight)
        if self.tp_group is not None:
            y = _ReduceFromTP.apply(y, self.tp_group)
        logits = self.head(y + self.down.bias) * self.gain + self.expert_bias
        return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten())


def batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(100 + step)
    return torch.randint(0, V, (B, T), generator=g), torch.randint(0, V, (B, T), generator=g)


def lr_lambda(step: int) -> float:
    return min(1.0, (step + 1) / 4)  # warm-up: the lr differs at every step checked here


def make_optimizer(net: nn.Module) -> torch.optim.AdamW:
    params = [p for p in net.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.ndim >= 2], "weight_decay": 0.1},
              {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}]  # 2 groups: DeepSpeed links 1
    return torch.optim.AdamW(groups, lr=1e-2, betas=(0.9, 0.95), foreach=False)


def build(lay: Layout, rank: int):
    mpu = Mpu(lay, rank)
    net = Net(lay.tp, mpu.tp_rank, mpu.tp_group)
    opt = make_optimizer(net)
    config = {
        "train_batch_size": B, "train_micro_batch_size_per_gpu": B // lay.dp, "gradient_accumulation_steps": 1,
        "gradient_clipping": 0.0, "zero_allow_untested_optimizer": True, "steps_per_print": 10**9,
        "zero_optimization": {"stage": lay.stage, "stage3_param_persistence_threshold": 10},  # biases persist
        "bf16": {"enabled": lay.bf16},
    }
    if lay.bf16 and lay.stage == 1:  # DeepSpeed's bf16 optimizer (as under pipelines), not the ZeRO-1/2 one
        config["data_types"] = {"grad_accum_dtype": "fp32"}
    engine, *_ = deepspeed.initialize(model=net, optimizer=opt, config=config, mpu=mpu,
                                      lr_scheduler=torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda))
    return engine, mpu


def train_step(engine, mpu: Mpu, step: int) -> None:
    ids, targets = batch(step)
    rows = slice(mpu.dp_rank * (B // engine.dp_world_size), (mpu.dp_rank + 1) * (B // engine.dp_world_size))
    engine.backward(engine(ids[rows], targets[rows]))
    engine.step()


def named(engine) -> list[tuple[str, nn.Parameter]]:
    return list(engine.module.named_parameters())


def full_state(engine, mpu: Mpu) -> dict[str, dict[str, torch.Tensor]]:
    """Every parameter's full tensors: param_state's local ones, concatenated over tp along the marked dim."""
    out = {}
    for name, p in named(engine):
        local = param_state(engine, p)
        out[name] = {}
        for kind, t in local.items():
            t = t.clone() if t is not None else None
            if t is not None and name in TP_DIM and mpu.lay.tp > 1:
                parts = [torch.empty_like(t) for _ in range(mpu.lay.tp)]
                dist.all_gather(parts, t.contiguous(), group=mpu.tp_group)
                t = torch.cat(parts, TP_DIM[name])
            out[name][kind] = t
    return out


def reference(steps: int) -> dict[str, dict[str, torch.Tensor]]:
    """Plain torch on one process: the full model, the full batch."""
    net = Net(1, 0, None)
    opt = make_optimizer(net)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda)
    for step in range(steps):
        opt.zero_grad()
        net(*batch(step)).backward()
        opt.step()
        sched.step()
    return {n: {"param": p.detach(), **{k: opt.state[p].get(k) for k in ("exp_avg", "exp_avg_sq")}}
            for n, p in net.named_parameters()}


@contextmanager
def one_parameter_at_a_time():
    """Wraps DeepSpeed's gathers: when one starts, nothing gathered for another parameter may still be alive."""
    import deepspeed.utils as du

    live: list[tuple[int, weakref.ref]] = []
    originals = {n: getattr(du, n) for n in ("safe_get_full_fp32_param", "safe_get_full_optimizer_state")}
    calls = [0]

    def wrap(fn):
        def gather(p, *args):
            others = [r for pid, r in live if pid != id(p) and r() is not None]
            assert not others, f"{len(others)} gathered tensors of another parameter alive while gathering {p.shape}"
            out = fn(p, *args)
            live.append((id(p), weakref.ref(out)))
            calls[0] += 1
            return out
        return gather

    for n, fn in originals.items():
        setattr(du, n, wrap(fn))
    try:
        yield calls
    finally:
        for n, fn in originals.items():
            setattr(du, n, fn)


# One step after an exact reload at another layout, only the gradients' float32 summation order differs (another
# split of the batch over data-parallel ranks or of the MLP over tp ranks): each entry is a sum over the B * T tokens
# of products summed over at most max(V, D, H) terms, so any two orders differ by at most gamma(B T max(V, D, H))
# of its magnitude (Higham eq. 3.5), here ~2e-5, compared relative to each tensor's largest entry (AdamW's moments
# and update carry it with O(1) factors). A wrong slice or a lost moment is off by O(1).
RESHARDED_STEP_TOL = gamma(B * T * max(V, D, H))


def _assert_rel(got: torch.Tensor, want: torch.Tensor, tol: float, what: str) -> None:
    """Relative to the tensor's largest element: the moments have elements near 0 where a per-element relative
    error means nothing."""
    err = float((got - want).abs().max() / want.abs().max())
    assert err <= tol, f"{what}: relative error {err:.2e} > {tol:.1e}"


def _check_state(engine, mpu: Mpu, expected: dict, exact: bool, what: str) -> None:
    for name, p in named(engine):
        sl = tuple(slice(None) for _ in range(TP_DIM.get(name, 0)))
        if name in TP_DIM and mpu.lay.tp > 1:
            n = p.ds_shape[TP_DIM[name]] if hasattr(p, "ds_shape") else p.shape[TP_DIM[name]]
            sl = (*sl, slice(mpu.tp_rank * n, (mpu.tp_rank + 1) * n))
        for kind, got in param_state(engine, p).items():
            want = expected[name][kind]
            if want is None:
                assert got is None, (what, name, kind)
                continue
            want = want[sl]
            if exact:
                assert torch.equal(got, want), f"{what}: {name} {kind} differs by {(got - want).abs().max()}"
            else:
                _assert_rel(got, want, RESHARDED_STEP_TOL, f"{what}: {name} {kind}")


# case -> (source, targets). The first target is the source's layout (bit-identical); the others change the ZeRO
# stage, the data-parallel size (two 1-rank replicas) or the tp split. bf16: the fp32 master state still reloads
# exactly, but the bf16 forward rounds differently under another layout, so one more step is compared only there.
CASES = {
    "zero0": (Layout(1, 2, 0), [Layout(1, 2, 0), Layout(2, 1, 1), Layout(1, 1, 3)]),
    "zero1": (Layout(1, 2, 1), [Layout(1, 2, 1), Layout(1, 1, 0), Layout(2, 1, 2)]),
    "zero2": (Layout(1, 2, 2), [Layout(1, 2, 2), Layout(1, 1, 0), Layout(1, 2, 3)]),
    "zero3": (Layout(1, 2, 3), [Layout(1, 2, 3), Layout(2, 1, 3), Layout(1, 2, 1)]),
    "tp2-zero1": (Layout(2, 1, 1), [Layout(2, 1, 1), Layout(1, 1, 0), Layout(1, 2, 3)]),
    "bf16-zero1": (Layout(1, 2, 1, True), [Layout(1, 2, 1, True), Layout(1, 1, 0, True), Layout(2, 1, 3, True),
                                            Layout(1, 2, 2, True)]),
}


def _roundtrip(rank: int, case: str, ckpt: Path) -> None:
    source, targets = CASES[case]
    engine, mpu = build(source, rank)
    for step in range(2):
        train_step(engine, mpu, step)
    engine.module.expert_bias.copy_(torch.arange(V, dtype=torch.float32))
    with one_parameter_at_a_time() as calls:
        save_shards(engine, named(engine), ckpt, named_buffers=[("expert_bias", engine.module.expert_bias)])
    if rank == 0:  # every piece once, written by both ranks (they share the writing), readable by safetensors alone
        files = sorted(f.name for f in ckpt.iterdir())
        assert files == ["rank00000.safetensors", "rank00001.safetensors", "state.json"], files
        keys = [key for f in files[:2] for key in load_file(ckpt / f)]
        split = 3 * len(TP_DIM) if source.tp > 1 else 0  # the tp-split parameters: a second piece of each kind
        assert len(set(keys)) == len(keys) == 3 * 6 + 1 + 1 + split, keys  # 6 trainable, gain, expert_bias
    plain = source.stage == 0 and not source.bf16  # the torch optimizer's own state: nothing to gather
    assert calls[0] == (0 if plain else 3 * 6)  # 6 trainable parameters, 3 gathers each, one after the other
    expected = full_state(engine, mpu)
    if not source.bf16:
        ref = reference(2)
        for name in expected:  # the saved state itself is right: plain torch on one process
            for kind, want in ref[name].items():
                got = expected[name][kind]
                assert (got is None) == (want is None), (name, kind)
                if got is not None:
                    _assert_rel(got, want, 1e-5, f"{name} {kind} vs torch")
    lr = [g["lr"] for g in engine.optimizer.param_groups]
    train_step(engine, mpu, 2)
    after = full_state(engine, mpu)
    for i, lay in enumerate(targets):
        target, tmpu = build(lay, rank)
        train_step(target, tmpu, 5)  # loading overwrites all; ZeRO-3 now keeps small parameters gathered
        load_shards(target, named(target), ckpt, named_buffers=[("expert_bias", target.module.expert_bias)])
        what = f"{case} -> ZeRO-{lay.stage} tp{lay.tp} dp{lay.dp}"
        _check_state(target, tmpu, expected, exact=True, what=what)
        assert optimizer_step(target) == 2 and [g["lr"] for g in target.optimizer.param_groups] == lr, what
        assert (target.global_steps, target.global_samples, target.skipped_steps) == (2, 2 * B, 0), what
        assert torch.equal(target.module.expert_bias, torch.arange(V, dtype=torch.float32)), what
        if i == 0 or not lay.bf16:
            train_step(target, tmpu, 2)
            _check_state(target, tmpu, after, exact=i == 0, what=f"{what}, one more step")


def _worker(rank: int, port: int, case: str, ckpt: str, errors) -> None:
    os.environ.update({"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(WORLD),
                       "LOCAL_WORLD_SIZE": str(WORLD), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
    torch.set_num_threads(1)
    deepspeed.utils.logger.setLevel("WARNING")
    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False  # skips a minutes-long JIT build
    deepspeed.init_distributed(dist_backend="gloo", auto_mpi_discovery=False)
    try:
        _roundtrip(rank, case, Path(ckpt))
    except Exception:
        errors.put(f"rank {rank}: {traceback.format_exc()}")
        raise
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("case", list(CASES))
def test_deepspeed_roundtrip_across_layouts(case, tmp_path):
    """Saved by 2 ranks (data-parallel ZeRO 0-3, or tp2; fp32 or bf16), loaded by the same layout (bit-identical,
    also after one more step), another ZeRO stage, two 1-rank replicas or a tp2 split of the MLP: exact fp32
    weights, moments, step, lr, counters and buffer; in fp32 one more step matches the source's within the float32
    summation bound RESHARDED_STEP_TOL."""
    ctx = mp.get_context("fork")  # deepspeed is imported here already: the ranks start in ~0 s
    errors = ctx.SimpleQueue()
    port = free_port()
    procs = [ctx.Process(target=_worker, args=(r, port, case, str(tmp_path / "ckpt"), errors)) for r in range(WORLD)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(240)
    for p in procs:
        if p.is_alive():  # a rank stuck in a collective its peer left
            p.kill()
    msgs = []
    while not errors.empty():
        msgs.append(errors.get())
    assert not msgs, "\n".join(msgs)
    assert all(p.exitcode == 0 for p in procs), [p.exitcode for p in procs]
