"""Resharding checkpoints: every rank writes only what it holds, any other layout reads back exactly its slice.

Format: ``<dir>/rank<R:05d>.safetensors`` per writing rank holds *pieces*: the fp32 value of one parameter's
``param`` / ``exp_avg`` / ``exp_avg_sq`` (or of a buffer, kind ``buffer``) over the hyper-rectangle
``Shard(global_shape, offsets)`` of the single-device model's tensor of that name. The piece index is JSON in the
safetensors header metadata; ``<dir>/state.json`` (optimizer step, lr schedule, engine counters, the caller's
extra values) is written last, so its presence marks a complete checkpoint. Nothing is pickled.

Memory: a piece held identically by several ranks (TP/DP replicas, ZeRO peers after gathering) is written by one
of them, chosen from metadata only; ZeRO state is gathered over the ZeRO group one parameter at a time and
streamed to disk, so no rank ever holds more than one parameter's value and moments beyond its own partition.

Why not ``torch.distributed.checkpoint``: its ``.metadata`` file is a pickle, and loading it is code execution.
Why not DeepSpeed's universal checkpoint: it knows ZeRO partitions but not our TP/EP/PP shards (``Shard``), and
``ds_to_universal`` rebuilds every full tensor on one machine, which does not fit at 70B.

DeepSpeed state (:func:`param_state`): fp32 and bf16 engines; ZeRO 0 (the torch optimizer on the parameters, or
on DeepSpeed's fp32 copies of bf16 ones), ZeRO 1/2 and DeepSpeed's bf16 optimizer (flat fp32 partitions), ZeRO 3;
torch Adam/AdamW (moments ``exp_avg``/``exp_avg_sq``, not amsgrad). Not fp16; ZeRO offload is untested.
Buffers are pieces of kind ``buffer``: pass ``named_buffers`` to :func:`save_shards` / :func:`load_shards`.
"""

from __future__ import annotations

import json
import math
import os
import struct
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, Self

import torch
import torch.distributed as dist
from safetensors import safe_open

from train.parallel.shard import SHARD_ATTR, Shard

MOMENTS = ("exp_avg", "exp_avg_sq")
KINDS = ("param", *MOMENTS)
BUFFER = "buffer"
STATE_FILE = "state.json"
FORMAT = "checkpoint_shards/1"
COUNTERS = ("global_steps", "global_samples", "skipped_steps")


def rank_file(directory: str | os.PathLike, rank: int) -> Path:
    return Path(directory) / f"rank{rank:05d}.safetensors"


def _piece_key(name: str, kind: str, shard: Shard) -> str:
    return f"{name}/{kind}@{','.join(map(str, shard.offsets))}"


# ------------------------------------------------------------------------------------------------ file format
class _StreamWriter:
    """A safetensors file whose header (all pieces' shapes) is known up front, its tensors written one at a time:
    safetensors' own writers need every tensor in memory at once."""

    def __init__(self, path: Path, pieces: list[tuple[str, str, str, Shard, tuple[int, ...]]]) -> None:
        if sys.byteorder != "little":
            raise RuntimeError("safetensors stores little-endian data")
        index = [[key, name, kind, list(sh.global_shape), list(sh.offsets)] for key, name, kind, sh, _ in pieces]
        header: dict[str, Any] = {"__metadata__": {"format": FORMAT, "pieces": json.dumps(index)}}
        offset = 0
        for key, _, _, _, shape in pieces:
            nbytes = math.prod(shape) * 4
            header[key] = {"dtype": "F32", "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
            offset += nbytes
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # the data starts 8-byte aligned, as safetensors writes it
        self._order = [(key, shape) for key, _, _, _, shape in pieces]
        self._next = 0
        self._file = open(path, "wb")  # noqa: SIM115  (closed in close())
        self._file.write(struct.pack("<Q", len(raw)) + raw)

    def write(self, key: str, tensor: torch.Tensor) -> None:
        want, shape = self._order[self._next]
        if key != want or tuple(tensor.shape) != shape:
            raise RuntimeError(f"piece {key} {tuple(tensor.shape)} written where {want} {shape} was announced")
        self._file.write(tensor.detach().to("cpu", torch.float32).contiguous().numpy().data)
        self._next += 1

    def close(self) -> None:
        self._file.close()
        if self._next != len(self._order):
            raise RuntimeError(f"{self._file.name}: {len(self._order) - self._next} announced pieces not written")


class ShardReader:
    """Index of a checkpoint's pieces (headers only); :meth:`read` assembles any requested slice from them."""

    def __init__(self, directory: str | os.PathLike) -> None:
        self.directory = Path(directory)
        files = sorted(self.directory.glob("rank*.safetensors"))
        if not files:
            raise FileNotFoundError(f"{self.directory}: no rank*.safetensors files")
        self._pieces: dict[tuple[str, str], list[tuple[Path, str, Shard, tuple[int, ...]]]] = {}
        self._handles: dict[Path, Any] = {}
        for path in files:
            handle = self._handle(path)
            meta = handle.metadata() or {}
            if meta.get("format") != FORMAT:
                raise ValueError(f"{path}: not a {FORMAT} file")
            for key, name, kind, global_shape, offsets in json.loads(meta["pieces"]):
                shape = tuple(handle.get_slice(key).get_shape())
                piece = (path, key, Shard(tuple(global_shape), tuple(offsets)), shape)
                self._pieces.setdefault((name, kind), []).append(piece)

    def _handle(self, path: Path) -> Any:
        if path not in self._handles:
            self._handles[path] = safe_open(str(path), framework="pt")
        return self._handles[path]

    def names(self) -> list[str]:
        return sorted({name for name, _ in self._pieces})

    def kinds(self, name: str) -> list[str]:
        return sorted(kind for n, kind in self._pieces if n == name)

    def read(self, name: str, kind: str, shard: Shard, local_shape: Sequence[int]) -> torch.Tensor:
        """The fp32 ``full[shard.slices(local_shape)]`` of ``name``'s ``kind``, read slice by slice from the saved
        pieces that overlap it, whatever layout wrote them."""
        local_shape = tuple(local_shape)
        pieces = self._pieces.get((name, kind))
        if not pieces:
            raise KeyError(f"{self.directory}: no saved {kind} of {name!r}")
        saved_shape = pieces[0][2].global_shape
        if any(saved.global_shape != saved_shape for *_, saved, _ in pieces):
            raise ValueError(f"{self.directory}: {name!r} ({kind}) has pieces of different global shapes")
        if saved_shape != shard.global_shape:
            if math.prod(saved_shape) != math.prod(shard.global_shape):
                raise ValueError(f"{self.directory}: {name!r} ({kind}) was saved with global shape "
                                 f"{saved_shape}, requested {shard.global_shape}")
            # The same elements described through another view (a shard that is a strided slice of the
            # single-device tensor, such as Mamba's in_proj under TP): one full parameter, viewed, then sliced.
            full = self.read(name, kind, Shard(saved_shape, (0,) * len(saved_shape)), saved_shape)
            return full.reshape(shard.global_shape)[shard.slices(local_shape)].clone()
        out = torch.empty(local_shape, dtype=torch.float32)
        covered = torch.zeros(local_shape, dtype=torch.bool)  # the elements some piece supplied
        for path, key, saved, shape in pieces:
            lo = [max(o, so) for o, so in zip(shard.offsets, saved.offsets, strict=True)]
            hi = [min(o + n, so + sn) for o, n, so, sn in zip(shard.offsets, local_shape, saved.offsets, shape)]
            if any(a >= b for a, b in zip(lo, hi)):
                continue
            src = tuple(slice(a - so, b - so) for a, b, so in zip(lo, hi, saved.offsets))
            dst = tuple(slice(a - o, b - o) for a, b, o in zip(lo, hi, shard.offsets))
            sliced = self._handle(path).get_slice(key)
            out[dst] = sliced[src] if src else sliced[:]  # only these bytes are read from the file
            covered[dst] = True
        if not bool(covered.all()):
            raise ValueError(f"{self.directory}: the saved pieces of {name!r} ({kind}) cover "
                             f"{int(covered.sum())} of {covered.numel()} elements of the requested slice "
                             f"{shard.slices(local_shape)} of {shard.global_shape}")
        return out

    def close(self) -> None:
        self._handles.clear()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# ------------------------------------------------------------------------------------------ who writes what
def assign_writers(keys: Sequence[tuple[Any, int]]) -> dict[Any, int]:
    """Collective over the world (metadata only): ``keys`` are this rank's (hashable key, bytes) pieces; returns
    the global rank that writes each key any rank holds. Of the ranks holding a key, the one with the fewest bytes
    assigned so far writes it (lowest rank on ties), so replicas share the writing."""
    if not dist.is_initialized():
        return {key: 0 for key, _ in keys}
    everyone: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, list(keys))
    holders: dict[Any, list[int]] = {}
    sizes: dict[Any, int] = {}
    for rank, held in enumerate(everyone):
        for key, nbytes in held:
            holders.setdefault(key, []).append(rank)
            sizes[key] = nbytes
    load = [0] * len(everyone)
    writers = {}
    for key, ranks in holders.items():  # insertion order: the same on every rank
        writers[key] = min(ranks, key=lambda r: (load[r], r))
        load[writers[key]] += sizes[key]
    return writers


# ------------------------------------------------------------------------------------ DeepSpeed state access
def local_shape(p: torch.Tensor) -> tuple[int, ...]:
    """The shape of the rank's (TP/EP) tensor; under ZeRO-3 ``p`` itself is empty outside forward."""
    return tuple(getattr(p, "ds_shape", p.shape))


def param_shard(p: torch.Tensor) -> Shard:
    """Where ``p`` sits in the single-device tensor (``shard_of``, with a ZeRO-3 parameter at its real shape)."""
    shard = getattr(p, SHARD_ATTR, None)
    return shard if shard is not None else Shard(local_shape(p), (0,) * len(local_shape(p)))


def _mode(engine: Any) -> str:
    """zero3; hp: one flat fp32 partition per param group (ZeRO-1/2, DeepSpeed's bf16 optimizer); plain: the
    torch optimizer steps one fp32 tensor per parameter (the parameter, or its fp32 copy under bf16 ZeRO-0)."""
    if engine.fp16_enabled():
        raise NotImplementedError("checkpoint_shards: fp16 engines are not supported (fp32 or bf16)")
    if engine.zero_optimization_stage() == 3:
        return "zero3"
    opt = engine.optimizer
    return "hp" if hasattr(opt, "single_partition_of_fp32_groups") or hasattr(opt, "bf16_groups") else "plain"


def _fp32_copy(engine: Any, p: torch.Tensor) -> torch.Tensor:
    """What the torch optimizer steps for ``p`` in plain mode: ``p`` or DeepSpeed's fp32 copy of a bf16 ``p``."""
    opt = engine.optimizer
    for lp_group, hp_group in zip(getattr(opt, "fp16_groups", ()), getattr(opt, "fp32_groups", ()), strict=True):
        for lp, hp in zip(lp_group, hp_group, strict=True):
            if lp is p:
                return hp
    return p


def _inner_optimizer(engine: Any) -> torch.optim.Optimizer:
    return getattr(engine.optimizer, "optimizer", engine.optimizer)


def _masters(engine: Any) -> list[torch.Tensor]:
    """The tensors the torch optimizer steps (its state's keys)."""
    opt = engine.optimizer
    for attr in ("fp32_partitioned_groups_flat", "single_partition_of_fp32_groups", "fp32_groups_flat_partition"):
        if hasattr(opt, attr):  # ZeRO-3, ZeRO-1/2, the bf16 optimizer
            return list(getattr(opt, attr))
    return [p for group in opt.param_groups for p in group["params"]]


def _link_optimizer_state(engine: Any) -> None:
    """Points every parameter's ZeRO-1/2 (or bf16 optimizer) fragment at its slice of the flat AdamW state.

    DeepSpeed links them once, after the first param group's first step, when the other groups have no state
    yet (their fragments stay empty), and never again when the state tensors are replaced.
    """
    from deepspeed.utils.mixed_precision_linkage import lazy_init_hp_params_optimizer_state

    opt = engine.optimizer
    lp_groups = opt.bit16_groups if hasattr(opt, "bit16_groups") else opt.bf16_groups
    state = _inner_optimizer(engine).state
    for lp_params, flat in zip(lp_groups, _masters(engine), strict=True):
        if state.get(flat):
            lazy_init_hp_params_optimizer_state(lp_params, flat, state)


def optimizer_step(engine: Any) -> int | None:
    """The optimizer's step count, or None before its first step (no moments yet)."""
    steps = [int(s["step"]) for s in _inner_optimizer(engine).state.values() if "step" in s]
    return max(steps) if steps else None


def prepare_optimizer_state(engine: Any, step: int | None) -> None:
    """Before :func:`set_param_state`: creates the AdamW state torch would create lazily at the first step (zero
    moments), sets every step count to ``step`` and links ZeRO's per-parameter views of the flat state."""
    inner = _inner_optimizer(engine)
    if any(group.get("amsgrad") for group in inner.param_groups):
        raise NotImplementedError("checkpoint_shards: amsgrad state is not saved")
    if step is not None:
        for master in _masters(engine):
            state = inner.state[master]
            for k in MOMENTS:
                state.setdefault(k, torch.zeros_like(master, memory_format=torch.preserve_format))
            state["step"] = torch.tensor(float(step))
    if _mode(engine) == "hp":
        _link_optimizer_state(engine)


def param_state(engine: Any, p: torch.nn.Parameter) -> dict[str, torch.Tensor | None]:
    """fp32 master value and AdamW moments of the local (TP/EP) tensor ``p``; a moment is None before the first
    step or for a frozen parameter. Collective over ``p``'s ZeRO group under ZeRO 1-3 and the bf16 optimizer, which
    gathers this one parameter only. The result may alias live state: write it out, do not modify it."""
    mode = _mode(engine)
    has_state = optimizer_step(engine) is not None and p.requires_grad
    if mode == "plain" or (mode == "hp" and not p.requires_grad):
        master = _fp32_copy(engine, p)
        state = _inner_optimizer(engine).state.get(master, {})
        return {"param": master.detach().float(), **{k: state.get(k) if has_state else None for k in MOMENTS}}
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

    if mode == "zero3" and not p.requires_grad:  # not in the optimizer: gather the module's partitions
        from deepspeed.runtime.zero.partition_parameters import GatheredParameters

        with GatheredParameters([p]):
            return {"param": p.detach().float().clone(), **dict.fromkeys(MOMENTS)}
    if mode == "hp" and has_state:
        fragment = p._hp_mapping
        if fragment is not None and not set(MOMENTS) <= set(fragment.optim_fragment or {}):
            _link_optimizer_state(engine)
    return {"param": safe_get_full_fp32_param(p),
            **{k: safe_get_full_optimizer_state(p, k) if has_state else None for k in MOMENTS}}


@torch.no_grad()
def set_param_state(engine: Any, p: torch.nn.Parameter, state: dict[str, torch.Tensor | None]) -> None:
    """Inverse of :func:`param_state` from the full local values (each rank keeps its own ZeRO partition); run
    :func:`prepare_optimizer_state` first when moments are given. Not collective."""
    from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

    mode, value = _mode(engine), state["param"]
    if tuple(value.shape) != local_shape(p):
        raise ValueError(f"value of shape {tuple(value.shape)} for a parameter of shape {local_shape(p)}")
    moments = {k: state.get(k) for k in MOMENTS if state.get(k) is not None and p.requires_grad}
    if mode == "zero3":
        from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

        if p.requires_grad:
            safe_set_full_fp32_param(p, value)
            for k, v in moments.items():
                safe_set_full_optimizer_state(p, v, k)
        # The module's (low-precision) partition is a copy of the fp32 one (the last one padded); small
        # "persistent" parameters also stay gathered between steps.
        part = p.ds_tensor.numel()
        mine = value.reshape(-1)[dist.get_rank(p.ds_process_group) * part:][:part]
        p.ds_tensor.data.view(-1)[: mine.numel()].copy_(mine)
        if p.ds_status == ZeroParamStatus.AVAILABLE:
            p.data.copy_(value)
        return
    if mode == "hp" and p.requires_grad:
        safe_set_full_fp32_param(p, value)
        for k, v in moments.items():
            safe_set_full_optimizer_state(p, v, k)
    else:
        master = _fp32_copy(engine, p)
        for k, v in moments.items():
            _inner_optimizer(engine).state[master][k].copy_(v)
        master.data.copy_(value)
    p.data.copy_(value)  # ZeRO 0-2: every rank of the group holds the whole module tensor


def training_state(engine: Any) -> dict[str, Any]:
    """JSON-able: the optimizer step, the lr scheduler's state_dict without its lambdas, the engine counters."""
    sched = engine.lr_scheduler
    return {"optimizer_step": optimizer_step(engine),
            "lr_scheduler": None if sched is None else {k: v for k, v in sched.state_dict().items() if k != "lr_lambdas"},
            "counters": {name: int(getattr(engine, name)) for name in COUNTERS}}


def load_training_state(engine: Any, state: dict[str, Any]) -> None:
    """The lr schedule and counters of :func:`training_state` (the step goes in with prepare_optimizer_state)."""
    sched, sched_state = engine.lr_scheduler, state["lr_scheduler"]
    if sched is not None and sched_state is not None:
        if hasattr(sched, "lr_lambdas"):  # LambdaLR: keeps the lambdas this process built
            sched_state = {**sched_state, "lr_lambdas": [None] * len(sched.lr_lambdas)}
        groups = len(sched.optimizer.param_groups)
        for key in ("base_lrs", "_last_lr"):
            # Another layout may split the parameters into another number of groups (expert parallelism adds
            # DeepSpeed's MoE groups); every group follows the one schedule, so any saved value is each group's.
            saved = sched_state.get(key)
            if saved and len(saved) != groups:
                if len(set(saved)) != 1:
                    raise ValueError(f"lr schedule saved for {len(saved)} parameter groups with different values "
                                     f"{saved}; this run has {groups} groups")
                sched_state = {**sched_state, key: [saved[0]] * groups}
        sched.load_state_dict(sched_state)
        # LambdaLR writes the lr into the param groups only when it steps: restore the current value too.
        for group, lr in zip(sched.optimizer.param_groups, sched.get_last_lr(), strict=True):
            group["lr"] = lr
    for name in COUNTERS:
        setattr(engine, name, state["counters"][name])


# ------------------------------------------------------------------------------------------------ top level
def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def save_shards(engine: Any, named_params: Sequence[tuple[str, torch.nn.Parameter]], directory: str | os.PathLike,
                named_buffers: Iterable[tuple[str, torch.Tensor]] = (), extra: dict[str, Any] | None = None) -> None:
    """Collective over the world: writes this rank's pieces of ``named_params`` (single-device model name, local
    parameter) and ``named_buffers`` that no lower-loaded rank writes; rank 0 then writes ``state.json`` (with the
    JSON-able ``extra``). An earlier checkpoint's files in ``directory`` are removed first."""
    rank = dist.get_rank() if dist.is_initialized() else 0
    out, mode = Path(directory), _mode(engine)
    # Every rank serialises it, so that an unserialisable value fails everywhere before anything is written.
    blob = json.dumps({"format": FORMAT, **training_state(engine), "extra": extra}, indent=1)
    has_moments = optimizer_step(engine) is not None
    entries = []  # (key, name, tensor, kinds, is_buffer)
    for name, p in named_params:
        kinds = KINDS if has_moments and p.requires_grad else ("param",)
        entries.append(((name, param_shard(p), local_shape(p)), name, p, kinds, False))
    for name, b in named_buffers:
        entries.append(((name, param_shard(b), tuple(b.shape)), name, b, (BUFFER,), True))
    writers = assign_writers([(key, math.prod(key[2]) * 4 * len(kinds)) for key, _, _, kinds, _ in entries])
    mine = {key: [(_piece_key(name, k, key[1]), name, k, key[1], key[2]) for k in kinds]
            for key, name, _, kinds, _ in entries if writers[key] == rank}
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        for stale in [*out.glob("rank*.safetensors"), out / STATE_FILE]:
            stale.unlink(missing_ok=True)
    _barrier()
    writer = _StreamWriter(rank_file(out, rank), [pc for pieces in mine.values() for pc in pieces]) if mine else None
    if mode == "hp" and has_moments:
        _link_optimizer_state(engine)
    for key, _, tensor, kinds, is_buffer in entries:
        pieces = mine.pop(key, None)  # None: another rank writes it, or this rank did already (a tied tensor)
        if pieces is None and (is_buffer or mode == "plain"):
            continue  # nothing collective to take part in
        state = {BUFFER: tensor.detach()} if is_buffer else param_state(engine, tensor)
        for (piece_key, *_), kind in zip(pieces or (), kinds, strict=False):
            # A trainable parameter the optimizer never updated has no moments yet: zeros are torch's start.
            writer.write(piece_key, torch.zeros(key[2]) if state[kind] is None else state[kind])
        del state  # peak memory: one parameter's state at a time (no other name may keep a piece alive)
    if writer is not None:
        writer.close()
    _barrier()  # state.json last: it marks the checkpoint complete
    if rank == 0:
        (out / (STATE_FILE + ".tmp")).write_text(blob)
        os.replace(out / (STATE_FILE + ".tmp"), out / STATE_FILE)
    _barrier()


def load_shards(engine: Any, named_params: Sequence[tuple[str, torch.nn.Parameter]], directory: str | os.PathLike,
                named_buffers: Iterable[tuple[str, torch.Tensor]] = ()) -> dict[str, Any]:
    """Collective: restores weights, AdamW moments and step, buffers, lr schedule and engine counters saved by
    :func:`save_shards` under any layout into this engine's local slices; returns ``state.json``'s content."""
    state_path = Path(directory) / STATE_FILE
    if not state_path.exists():
        raise FileNotFoundError(f"{state_path} is missing: the checkpoint is incomplete")
    state = json.loads(state_path.read_text())
    if state.get("format") != FORMAT:
        raise ValueError(f"{state_path}: not a {FORMAT} checkpoint")
    step = state["optimizer_step"]
    prepare_optimizer_state(engine, step)
    with ShardReader(directory) as reader:
        for name, p in named_params:
            kinds = KINDS if step is not None and p.requires_grad else ("param",)
            shard, shape = param_shard(p), local_shape(p)
            set_param_state(engine, p, {k: reader.read(name, k, shard, shape) for k in kinds})
        for name, b in named_buffers:
            b.data.copy_(reader.read(name, BUFFER, param_shard(b), tuple(b.shape)))
    load_training_state(engine, state)
    _barrier()
    return state
