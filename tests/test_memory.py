"""train/memory.py against what is really held: the model-state bytes of live DeepSpeed engines on 2 gloo ranks
(ZeRO 0-3 and TP2, counted storage by storage), the bytes a block saves for backward (saved-tensor hooks), and the
ZeRO-3 build, which must never hold the whole model on a rank and must start from the single-device weights."""

from __future__ import annotations

import dataclasses
import math
import weakref

import pytest
import torch
import yaml
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from bench.memory import SavedTensors, run_config, run_layout
from model.config import ModelConfig
from model.transformer import Transformer
from tests.forklaunch import fork_call
from tests.utils import REPO, child_env
from train.memory import block_activation_bytes, model_states, param_specs
from train.parallel.dims import make_layout

TINY = ["model=dense_tiny", "data=sample", "train.seq_len=32", "train.micro_batch_size=1"]


def _close(measured: int, formula: int, what: str) -> None:
    assert abs(measured - formula) <= 0.01 * max(formula, 1), f"{what}: measured {measured}, formula {formula}"


@pytest.mark.parametrize("layout", ["zero0", "zero1", "zero2", "zero3", "tp2", "cp2-zero3"])
def test_model_states_equal_the_live_engine(layout):
    # cp2: ZeRO partitions over data x context parallel ranks (here the 2 CP ranks of one data-parallel replica)
    parallel = ["parallel=zero3", "parallel.cp=2"] if layout == "cp2-zero3" else [f"parallel={layout}"]
    overrides = [*TINY, *parallel, f"train.global_batch_size={1 if layout in ('tp2', 'cp2-zero3') else 2}"]
    cfg = run_config(overrides, 2)
    for r in run_layout(overrides, 2):
        states = model_states(cfg.model, make_layout(cfg.parallel, cfg.model, 2, r["rank"]), cfg.parallel.zero_stage)
        what = f"{layout} rank {r['rank']}"
        _close(r["parameters"], states.parameters, f"{what} parameters")
        _close(r["gradients"], states.gradients, f"{what} gradients")
        _close(r["optimizer"], states.optimizer, f"{what} AdamW moments")
        _close(r["master"], states.master, f"{what} fp32 master")
        _close(r["buckets"], states.buckets, f"{what} buckets")
        assert r["other"] < 1024, f"{what}: {r['other']} bytes held by the optimizer in no known role"


def _model_cfg(name: str, **overrides) -> ModelConfig:
    cfg = ModelConfig.from_dict(yaml.safe_load((REPO / "conf" / "model" / f"{name}.yaml").read_text()))
    return dataclasses.replace(cfg, **overrides)


@pytest.mark.parametrize("seq", [48, 160])
@pytest.mark.parametrize("name", ["dense_tiny", "moe_tiny", "hybrid_tiny"])
def test_block_activations_equal_the_saved_tensors(name, seq):
    cfg = _model_cfg(name)
    torch.manual_seed(0)
    model = Transformer(cfg)
    batch = 2
    x = torch.randn(batch, seq, cfg.d_model, requires_grad=True)
    rope = model.rope_tables(seq, x.device)
    for i, block in enumerate(model.layers):
        with SavedTensors(model, [], checkpointed=False) as saved:
            block(x, rope)
        formula = block_activation_bytes(cfg, i, batch * seq)
        # The RoPE tables are built once per forward and shared by every block: the formula leaves them to the head.
        rope_bytes = 0 if rope is None else sum(t.untyped_storage().nbytes() for t in rope)
        _close(saved.bytes - rope_bytes, formula, f"{name} block {i}")


def test_param_specs_split_as_tensor_parallelism_does():
    cfg = _model_cfg("hybrid_tiny")
    specs = {s.name: s for s in param_specs(cfg)}
    assert sum(s.numel for s in specs.values()) == Transformer(cfg).num_params()
    assert specs["embed.weight"].split == "tp" and specs["layers.0.mixer.A_log"].split == "tp"
    assert specs["layers.1.ffn.w2"].split == "expert" and specs["layers.1.ffn.router.weight"].split == "replicated"
    assert specs["layers.0.mixer.dt_layernorm.weight"].split == "replicated"


# ------------------------------------------------------------------------------------------ the ZeRO-3 build
class _PeakParameterBytes(TorchDispatchMode):
    """Peak bytes of live CPU storages while building: every tensor an op returns (held weakly) and every parameter
    of the model under construction, including its ZeRO-3 partition, summed by storage after each op."""

    def __init__(self) -> None:
        super().__init__()
        self.refs: list[weakref.ref] = []
        self.params: list[torch.nn.Parameter] = []
        self.peak = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.refs += [weakref.ref(t) for t in tree_leaves(out) if isinstance(t, torch.Tensor) and not t.is_meta]
        tensors = [r() for r in self.refs]
        for p in self.params:
            tensors += [p.data, getattr(p, "ds_tensor", None)]
        storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes()
                    for t in tensors if t is not None and not t.is_meta}
        self.peak = max(self.peak, sum(storages.values()))
        return out


def _zero3_build(overrides: list[str]) -> None:
    from deepspeed.runtime.zero.partition_parameters import GatheredParameters

    from train.engine import deepspeed_config, init_distributed
    from train.parallel import init
    from train.parallel.groups import init_groups

    cfg = run_config(overrides, 2)
    init_distributed(torch.device("cpu"))
    rank = torch.distributed.get_rank()
    groups = init_groups(make_layout(cfg.parallel, cfg.model, 2, rank))
    tracker = _PeakParameterBytes()
    fill = init._fill

    def fill_and_track(p, data):  # every parameter the build fills, from then on counted with its partition
        fill(p, data)
        tracker.params.append(p)

    init._fill = fill_and_track
    try:
        with tracker:
            model = init.build_parallel_model(cfg, groups, deepspeed_config(cfg, "fp32"))
    finally:
        init._fill = fill
    numels = [s.numel for s in param_specs(cfg.model)]
    whole, largest = 4 * sum(numels), 4 * max(numels)
    own = 4 * sum(math.ceil(n / 2) + (n if n <= 10 * cfg.model.d_model else 0) for n in numels)
    assert tracker.peak <= own + largest + 65536, (tracker.peak, own, largest)
    assert tracker.peak < 0.8 * whole, (tracker.peak, whole)
    assert all(p.ds_tensor.numel() == math.ceil(p.ds_numel / 2) for p in model.parameters())

    torch.manual_seed(cfg.train.seed)
    reference = dict(Transformer(cfg.model).named_parameters())
    for name, p in model.named_parameters():
        with GatheredParameters([p]):
            assert torch.equal(p.data, reference[name].data), name


def test_zero3_build_partitions_each_parameter_as_it_is_generated():
    """Peak live parameter bytes while building under ZeRO-3 on 2 ranks: the rank's partitions plus one full
    parameter, well under the whole model; the gathered weights are the single-device model's."""
    fork_call(_zero3_build, ([*TINY, "parallel=zero3", "train.global_batch_size=2", "model.n_layers=8"],), 2,
              child_env(), timeout=300)


@pytest.mark.parametrize("seq", [48, 160])
@pytest.mark.parametrize("name", ["dense_tiny", "moe_tiny", "hybrid_tiny"])
def test_selective_block_activations_equal_what_the_forward_keeps(name, seq):
    """Selective checkpointing keeps matmul outputs in its own cache (invisible to saved-tensor hooks): compare with
    every storage the block's forward leaves alive, less the outputs it returns."""
    from train.saved_activations import saved_activation_bytes

    cfg = _model_cfg(name, activation_checkpointing="selective")
    torch.manual_seed(0)
    model = Transformer(cfg).train()
    batch = 2
    x = torch.randn(batch, seq, cfg.d_model, requires_grad=True)
    rope = model.rope_tables(seq, x.device)
    for i, block in enumerate(model.layers):
        kept, (out, aux) = saved_activation_bytes(lambda b=block: b(x, rope))
        kept -= out.untyped_storage().nbytes() + aux.untyped_storage().nbytes()
        formula = block_activation_bytes(cfg, i, batch * seq, mode="selective")
        assert abs(kept - formula) <= 0.1 * formula, f"{name} block {i}: measured {kept}, formula {formula}"
