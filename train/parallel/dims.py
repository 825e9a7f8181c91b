"""The parallel layout: sizes of the tensor (TP), context (CP), pipeline (PP), data (DP) and expert (EP) dimensions,
this rank's coordinates in them, and their validation. Pure arithmetic: usable before any process group exists
(config validation, planning); the groups themselves are built by ``train.parallel.groups`` from megatron-core.

Rank order (TP fastest, then CP, then DP, then PP; EP cuts each DP group into consecutive blocks)::

    rank = ((pp_rank * dp + dp_rank) * cp + cp_rank) * tp + tp_rank          dp_rank = edp_rank * ep + ep_rank

This is megatron-core's default order (tp-cp-ep-dp-pp with expert_tensor_parallel_size = tp), DeepSpeed's
``PipeModelDataParallelTopology`` (axes pipe, data, model; its data axis is our dp x cp, since CP ranks hold the
same weights and average gradients like data-parallel ones) and DeepSpeed MoE's expert groups, so every library we
hand the groups to agrees with this arithmetic.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from model.config import ConfigError, ModelConfig

PP_PARTITIONS = ("parameters", "uniform", "blocks")  # how pipeline stages split the layers (train.parallel.pp)
ZERO_STAGES_WITH_PP = (0, 1)  # DeepSpeed's PipelineEngine asserts ZeRO < 2
ZERO_STAGES_WITH_EP = (0, 1, 2)  # DeepSpeed's MoE support stops at ZeRO-2


@dataclass(frozen=True)
class Layout:
    """Sizes of every parallel dimension and this rank's coordinates in them."""

    world: int
    dp: int
    tp: int = 1
    pp: int = 1
    ep: int = 1
    rank: int = 0
    cp: int = 1

    # ------------------------------------------------------------ coordinates
    @property
    def tp_rank(self) -> int:
        return self.rank % self.tp

    @property
    def cp_rank(self) -> int:
        return (self.rank // self.tp) % self.cp

    @property
    def dp_rank(self) -> int:
        return (self.rank // (self.tp * self.cp)) % self.dp

    @property
    def pp_rank(self) -> int:
        return self.rank // (self.tp * self.cp * self.dp)

    @property
    def dp_cp(self) -> int:
        """Ranks that hold the same parameters and average their gradients: data x context parallel."""
        return self.dp * self.cp

    @property
    def dp_cp_rank(self) -> int:
        return self.dp_rank * self.cp + self.cp_rank

    @property
    def ep_rank(self) -> int:
        return self.dp_rank % self.ep

    @property
    def edp_rank(self) -> int:
        """Index among the ranks holding the same experts (expert data parallelism)."""
        return self.dp_rank // self.ep

    def global_rank(self, pp_rank: int, dp_rank: int, tp_rank: int, cp_rank: int = 0) -> int:
        return ((pp_rank * self.dp + dp_rank) * self.cp + cp_rank) * self.tp + tp_rank

    def describe(self) -> str:
        return (f"world {self.world} = pp {self.pp} x dp {self.dp} x cp {self.cp} x tp {self.tp} "
                f"(ep {self.ep} inside dp)")

    # ------------------------------------------------------------ all groups (lists of global ranks)
    def _coords(self) -> list[tuple[int, int, int, int]]:
        return [(p, d, c, t) for p in range(self.pp) for d in range(self.dp) for c in range(self.cp)
                for t in range(self.tp)]

    def _groups(self, varying: str) -> list[list[int]]:
        """The groups whose members differ only in the axes named in ``varying`` (of "pdct")."""
        groups: dict[tuple[int, ...], list[int]] = {}
        for coord in self._coords():
            key = tuple(v for axis, v in zip("pdct", coord, strict=True) if axis not in varying)
            p, d, c, t = coord
            groups.setdefault(key, []).append(self.global_rank(p, d, t, c))
        return list(groups.values())

    def tp_groups(self) -> list[list[int]]:
        return self._groups("t")

    def cp_groups(self) -> list[list[int]]:
        return self._groups("c")

    def dp_groups(self) -> list[list[int]]:
        return self._groups("d")

    def dp_cp_groups(self) -> list[list[int]]:
        """Ranks holding the same parameters (data and context parallel): gradients average and ZeRO shards here."""
        return self._groups("dc")

    def pp_groups(self) -> list[list[int]]:
        return self._groups("p")

    def ep_groups(self) -> list[list[int]]:
        """Consecutive blocks of ``ep`` ranks of each DP group (they exchange tokens)."""
        return [g[i : i + self.ep] for g in self.dp_groups() for i in range(0, self.dp, self.ep)]

    def edp_groups(self) -> list[list[int]]:
        """Ranks of one DP group holding the same experts (strided by ``ep``); expert gradients reduce here."""
        return [g[i :: self.ep] for g in self.dp_groups() for i in range(self.ep)]


def _check(ok: bool, key: str, msg: str) -> None:
    if not ok:
        raise ConfigError(key, msg)


def validate_layout(parallel: Any, model: ModelConfig, world_size: int) -> Layout:
    """Checks a ``ParallelConfig`` against the model and the world size; returns the layout (rank 0's view).

    Called from ``ParallelConfig.validate`` when the run config is built, before any process group exists, so a
    layout that cannot work fails in a second with the sizes involved and the setting to change.
    """
    tp, pp, ep, cp, zero = parallel.tp, parallel.pp, parallel.ep, parallel.cp, parallel.zero_stage
    _check(zero in (0, 1, 2, 3), "parallel.zero_stage", f"got {zero}; DeepSpeed ZeRO has stages 0-3 (parallel=zero0..zero3)")
    for key, size in (("tp", tp), ("pp", pp), ("ep", ep), ("cp", cp)):
        _check(isinstance(size, int) and size >= 1, f"parallel.{key}", f"must be an integer >= 1, got {size!r}")
    _check(world_size >= 1, "parallel", f"world size must be >= 1, got {world_size}")
    model_split = tp * pp * cp
    _check(
        world_size % model_split == 0,
        "parallel.tp" if tp > 1 else "parallel.cp" if cp > 1 else "parallel.pp",
        f"world size {world_size} is not divisible by tp*cp*pp = {tp}*{cp}*{pp} = {model_split}; launch a multiple "
        f"of {model_split} ranks or change parallel.tp/parallel.cp/parallel.pp",
    )
    dp = world_size // model_split

    if tp > 1:
        _check_tensor_parallel(model, tp)
    if pp > 1:
        _check(
            pp <= model.n_layers,
            "parallel.pp",
            f"pp={pp} stages for model.n_layers={model.n_layers} layers: every stage needs a layer; use pp <= {model.n_layers}",
        )
        _check(
            zero in ZERO_STAGES_WITH_PP,
            "parallel.zero_stage",
            f"pipeline parallelism (pp={pp}) works with ZeRO stage 0 or 1 only (DeepSpeed's pipeline engine refuses "
            f"stages 2/3); got zero_stage={zero}: use parallel=pp2 (ZeRO-1) or parallel.pp=1",
        )
    if ep > 1:
        moe_layers = sum(model.is_moe_layer(i) for i in range(model.n_layers))
        _check(
            moe_layers > 0,
            "parallel.ep",
            f"ep={ep} needs a model with MoE layers, model {model.name!r} ({model.family}) has none; use parallel.ep=1",
        )
        _check(
            model.num_experts % ep == 0,
            "parallel.ep",
            f"model.num_experts={model.num_experts} is not divisible by ep={ep}; pick ep among "
            f"{[d for d in range(1, model.num_experts + 1) if model.num_experts % d == 0]}",
        )
        _check(
            dp % ep == 0,
            "parallel.ep",
            f"ep={ep} must divide the data-parallel size dp = world/(tp*pp) = {world_size}/{tp * pp} = {dp} "
            "(expert groups are cut out of the data-parallel ranks); launch more ranks or lower parallel.ep",
        )
        _check(
            zero in ZERO_STAGES_WITH_EP,
            "parallel.zero_stage",
            f"expert parallelism (ep={ep}) works with ZeRO stages 0-2 (DeepSpeed's ZeRO-3 does not partition expert "
            f"groups: docs/parallelism.md); got zero_stage={zero}: use parallel.zero_stage=2 or parallel.ep=1",
        )
    if cp > 1:
        _check_context_parallel(model, tp, cp, ep)
    return Layout(world=world_size, dp=dp, tp=tp, pp=pp, ep=ep, rank=0, cp=cp)


def _check_context_parallel(model: ModelConfig, tp: int, cp: int, ep: int) -> None:
    """Attention scatters whole heads over the CP ranks (all-to-all, `train.parallel.cp`); routing statistics are
    averaged over the sequence's parts, which capacity-based token dropping cannot be."""
    heads = model.n_heads // tp  # tp divides the heads (checked before)
    _check(
        heads % cp == 0,
        "parallel.cp",
        f"cp={cp} must divide the attention heads per tensor-parallel rank, model.n_heads/tp = {model.n_heads}/{tp} "
        f"= {heads} (each CP rank attends with whole heads over the whole sequence); use a cp that divides {heads}",
    )
    if any(model.is_moe_layer(i) for i in range(model.n_layers)):
        _check(ep == 1, "parallel.ep", f"expert parallelism with context parallelism (cp={cp}) is not supported yet; "
                                      "use parallel.ep=1 (experts replicated) or parallel.cp=1")
        _check(model.capacity_factor is None, "model.capacity_factor",
               f"capacity-based token dropping counts capacity per sequence part under cp={cp}, which one rank would "
               "not reproduce; use model.capacity_factor=null (dropless) or parallel.cp=1")


def _check_tensor_parallel(model: ModelConfig, tp: int) -> None:
    """What tensor parallelism splits must split evenly: heads, the SwiGLU and expert hidden dims, the Mamba
    channels, and the vocabulary (embedding and LM head)."""
    def divisible(key: str, value: int, what: str) -> None:
        _check(value % tp == 0, "parallel.tp",
               f"model.{key}={value} is not divisible by tp={tp}: {what}; use a tp that divides {value}")

    divisible("n_heads", model.n_heads, "attention is split by heads")
    divisible("n_kv_heads", model.n_kv_heads, "each rank needs whole key/value heads")
    divisible("ffn_hidden", model.ffn_hidden, "the SwiGLU (and expert) hidden dimension is split")
    if model.family == "hybrid":
        divisible("mamba_d_inner", model.mamba_d_inner, "Mamba channels (mamba_expand * d_model) are split")
    _check(
        model.vocab_size % tp == 0,
        "parallel.tp",
        f"model.vocab_size={model.vocab_size} is not divisible by tp={tp}: the embedding and LM head are split by "
        f"vocabulary; pad model.vocab_size to a multiple of {tp}",
    )


def make_layout(parallel: Any, model: ModelConfig, world_size: int, rank: int) -> Layout:
    """This rank's layout (validated)."""
    base = validate_layout(parallel, model, world_size)
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} outside the world of {world_size} ranks")
    return Layout(world=base.world, dp=base.dp, tp=base.tp, pp=base.pp, ep=base.ep, rank=rank, cp=base.cp)
