"""Which parameters AdamW decays (`train.engine.param_groups`, `build_optimizer`), against name lists written out
here for the dense, MoE and hybrid tiny models.

The rule (train.engine.param_groups' docstring, model/mamba.py): weight decay on matrices only; none on norms, biases
or Mamba's SSM dynamics A_log and D (flagged ``_no_weight_decay``). So the embedding, the LM head, every projection,
the experts' stacked matrices, the router and the Mamba conv1d filter decay; the RMSNorm gains (block, final and
Mamba's dt/B/C norms), the conv1d and dt_proj biases, A_log (a 2-d matrix) and D do not. The same lists are asked
of tests.reference.reference_optimizer, whose groups the layout tests' reference steps with.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

from model.transformer import Transformer
from tests.reference import reference_optimizer, run_config
from train.config import RunConfig
from train.engine import build_optimizer, param_groups

ATTENTION = ["mixer.q_proj.weight", "mixer.k_proj.weight", "mixer.v_proj.weight", "mixer.o_proj.weight"]
MLP = ["ffn.gate_proj.weight", "ffn.up_proj.weight", "ffn.down_proj.weight"]
MOE = ["ffn.w1", "ffn.w3", "ffn.w2", "ffn.router.weight"]
MAMBA_DECAY = ["mixer.in_proj.weight", "mixer.conv1d.weight", "mixer.x_proj.weight", "mixer.dt_proj.weight",
               "mixer.out_proj.weight"]
MAMBA_NO_DECAY = ["mixer.A_log", "mixer.D", "mixer.conv1d.bias", "mixer.dt_proj.bias", "mixer.dt_layernorm.weight",
                  "mixer.b_layernorm.weight", "mixer.c_layernorm.weight"]
BLOCK_NORMS = ["mixer_norm.weight", "ffn_norm.weight"]


def _layers(per_layer: dict[int, list[str]]) -> set[str]:
    return {f"layers.{i}.{name}" for i, names in per_layer.items() for name in names}


# model -> (decayed, not decayed), every parameter of the model in exactly one of the two.
EXPECTED = {
    "dense_tiny": (
        {"embed.weight", "lm_head.weight"} | _layers({i: ATTENTION + MLP for i in range(4)}),
        {"norm.weight"} | _layers({i: BLOCK_NORMS for i in range(4)}),
    ),
    "moe_tiny": (
        {"embed.weight", "lm_head.weight"} | _layers({i: ATTENTION + MOE for i in range(4)}),
        {"norm.weight"} | _layers({i: BLOCK_NORMS for i in range(4)}),
    ),
    # Layers 0 and 2: Mamba + MLP; 1 and 3: attention + MoE.
    "hybrid_tiny": (
        {"embed.weight", "lm_head.weight"}
        | _layers({0: MAMBA_DECAY + MLP, 1: ATTENTION + MOE, 2: MAMBA_DECAY + MLP, 3: ATTENTION + MOE}),
        {"norm.weight"} | _layers({i: BLOCK_NORMS for i in range(4)}) | _layers({0: MAMBA_NO_DECAY, 2: MAMBA_NO_DECAY}),
    ),
}
WEIGHT_DECAY = 0.25  # not the default 0.1, so a group that ignores the configured value shows


def _model(name: str) -> tuple[Transformer, RunConfig]:
    run = run_config([f"model={name}", "data=sample", "logging=none", f"optim.weight_decay={WEIGHT_DECAY}"])
    torch.manual_seed(0)
    return Transformer(run.model), run


def _engine_groups(model: Transformer, run: RunConfig) -> list[dict]:
    return param_groups(model, run.optim.weight_decay)


def _optimizer_groups(model: Transformer, run: RunConfig) -> list[dict]:
    return build_optimizer(model, run.optim).param_groups


def _reference_groups(model: Transformer, run: RunConfig) -> list[dict]:
    return reference_optimizer(model, run).param_groups


GROUPINGS: dict[str, Callable[[Transformer, RunConfig], list[dict]]] = {
    "train.engine.param_groups": _engine_groups,
    "train.engine.build_optimizer": _optimizer_groups,
    "tests.reference.reference_optimizer": _reference_groups,
}


def _decay_by_name(model: Transformer, groups: list[dict]) -> dict[str, float]:
    """Each parameter's weight decay as its group sets it; a parameter in no group or in two fails."""
    names = {id(p): name for name, p in model.named_parameters()}
    seen: dict[str, float] = {}
    for group in groups:
        for p in group["params"]:
            name = names[id(p)]
            assert name not in seen, f"{name} is in two groups"
            seen[name] = group["weight_decay"]
    assert set(seen) == set(names.values()), sorted(set(names.values()) - set(seen))
    return seen


@pytest.mark.parametrize("grouping", list(GROUPINGS))
@pytest.mark.parametrize("model_name", list(EXPECTED))
def test_decayed_parameters_are_exactly_the_listed_ones(model_name: str, grouping: str, sample_data) -> None:
    decay, no_decay = EXPECTED[model_name]
    model, run = _model(model_name)
    assert decay.isdisjoint(no_decay) and decay | no_decay == {name for name, _ in model.named_parameters()}
    got = _decay_by_name(model, GROUPINGS[grouping](model, run))
    assert {name for name, wd in got.items() if wd == WEIGHT_DECAY} == decay
    assert {name for name, wd in got.items() if wd == 0.0} == no_decay


@pytest.mark.parametrize("model_name", list(EXPECTED))
def test_optimizer_has_the_run_hyper_parameters_in_each_group(model_name: str, sample_data) -> None:
    """build_optimizer: the decayed group first, then the undecayed one, with optim's lr, betas and eps, fused."""
    model, run = _model(model_name)
    opt = build_optimizer(model, run.optim)
    assert [g["weight_decay"] for g in opt.param_groups] == [WEIGHT_DECAY, 0.0]
    for g in opt.param_groups:
        assert (g["lr"], tuple(g["betas"]), g["eps"], g["fused"]) == (3e-3, (0.9, 0.95), 1e-8, True)


def test_mamba_parameters_flagged_no_weight_decay_are_not_decayed(sample_data) -> None:
    """model/mamba.py flags A_log and D ``_no_weight_decay`` for optimizers to honour: each flagged parameter
    (four in hybrid_tiny: A_log and D of layers 0 and 2) gets weight decay 0."""
    model, run = _model("hybrid_tiny")
    flagged = {name for name, p in model.named_parameters() if getattr(p, "_no_weight_decay", False)}
    assert flagged == {"layers.0.mixer.A_log", "layers.0.mixer.D", "layers.2.mixer.A_log", "layers.2.mixer.D"}
    got = _decay_by_name(model, param_groups(model, run.optim.weight_decay))
    assert {name: got[name] for name in flagged} == dict.fromkeys(flagged, 0.0)
