"""Initial value of every parameter of `model.transformer.Transformer`, by its single-device name.

Each parameter is drawn from its own generator, seeded from (run seed, parameter name) with a stable hash, so a
parameter's value depends on nothing else: not on the order parameters are built in, nor on which of them a
process holds. A tensor-parallel or expert-parallel rank can therefore generate one full parameter at a time and
keep its slice (``train.parallel.init``), and every layout starts from the single-device model's weights.

Rules (``init_std`` = ``ModelConfig.init_std``):
- embedding, LM head, attention q/k/v, MLP gate/up, MoE router and expert w1/w3, Mamba in_proj/x_proj:
  N(0, init_std);
- projections that write into the residual stream (attention ``o_proj``, MLP ``down_proj``, expert ``w2``,
  Mamba ``out_proj``): N(0, init_std / sqrt(2 * n_layers)), as GPT-2, so the residual variance does not grow
  with depth;
- every norm weight and Mamba's ``D``: 1; Mamba projection biases: 0;
- Mamba's own: ``conv1d`` as torch's Conv1d default (uniform +-1/sqrt(fan_in), fan_in = d_conv for a depthwise
  conv), ``dt_proj.weight`` uniform +-dt_rank**-0.5, ``dt_proj.bias`` the inverse softplus of a dt log-uniform in
  [DT_MIN, DT_MAX] (floored at DT_INIT_FLOOR), ``A_log[c, n] = log(n + 1)``.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from model.config import ModelConfig

Rule = Callable[[tuple[int, ...], torch.Generator], Tensor]


def parameter_seed(seed: int, name: str) -> int:
    """A 63-bit seed from (run seed, parameter name): the same in every process and Python session (Python's
    ``hash`` of a string is salted per process)."""
    digest = hashlib.sha256(f"{int(seed)}:{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def parameter_generator(seed: int, name: str) -> torch.Generator:
    """A CPU generator seeded with :func:`parameter_seed`."""
    return torch.Generator().manual_seed(parameter_seed(seed, name))


def _normal(std: float) -> Rule:
    return lambda shape, gen: torch.empty(shape).normal_(0.0, std, generator=gen)


def _uniform(bound: float) -> Rule:
    return lambda shape, gen: torch.empty(shape).uniform_(-bound, bound, generator=gen)


def _constant(value: float) -> Rule:
    return lambda shape, gen: torch.full(shape, value)


def _dt_bias(shape: tuple[int, ...], gen: torch.Generator) -> Tensor:
    from model.mamba import DT_INIT_FLOOR, DT_MAX, DT_MIN  # lazily: a dense model needs no Mamba module

    log_dt = torch.rand(shape, generator=gen) * (math.log(DT_MAX) - math.log(DT_MIN)) + math.log(DT_MIN)
    dt = log_dt.exp().clamp(min=DT_INIT_FLOOR)
    return dt + torch.log(-torch.expm1(-dt))  # softplus(bias) == dt


def _a_log(shape: tuple[int, ...], gen: torch.Generator) -> Tensor:
    d_inner, d_state = shape
    return torch.log(torch.arange(1, d_state + 1, dtype=torch.float32)).repeat(d_inner, 1)


def _block_rules(cfg: ModelConfig, layer: int) -> dict[str, Rule]:
    std, out_std = cfg.init_std, cfg.init_std / math.sqrt(2 * cfg.n_layers)
    rules: dict[str, Rule] = {"mixer_norm.weight": _constant(1.0), "ffn_norm.weight": _constant(1.0)}
    if cfg.is_attention_layer(layer):
        rules |= {f"mixer.{p}_proj.weight": _normal(std) for p in ("q", "k", "v")}
        rules["mixer.o_proj.weight"] = _normal(out_std)
    else:
        conv_bound = 1.0 / math.sqrt(cfg.mamba_d_conv)  # depthwise: fan_in = 1 channel * kernel size
        rules |= {
            "mixer.in_proj.weight": _normal(std),
            "mixer.x_proj.weight": _normal(std),
            "mixer.out_proj.weight": _normal(out_std),
            "mixer.conv1d.weight": _uniform(conv_bound),
            "mixer.conv1d.bias": _uniform(conv_bound),
            "mixer.dt_proj.weight": _uniform(cfg.resolved_dt_rank**-0.5),
            "mixer.dt_proj.bias": _dt_bias,
            "mixer.A_log": _a_log,
            "mixer.D": _constant(1.0),
        }
        rules |= {f"mixer.{p}_proj.bias": _constant(0.0) for p in ("in", "x", "out")}
        rules |= {f"mixer.{n}_layernorm.weight": _constant(1.0) for n in ("dt", "b", "c")}
    if cfg.is_moe_layer(layer):
        rules |= {"ffn.router.weight": _normal(std), "ffn.w1": _normal(std), "ffn.w3": _normal(std),
                  "ffn.w2": _normal(out_std)}
    else:
        rules |= {"ffn.gate_proj.weight": _normal(std), "ffn.up_proj.weight": _normal(std),
                  "ffn.down_proj.weight": _normal(out_std)}
    return rules


def _rule(cfg: ModelConfig, name: str) -> Rule:
    top = {"embed.weight": _normal(cfg.init_std), "lm_head.weight": _normal(cfg.init_std),
           "norm.weight": _constant(1.0)}
    parts = name.split(".", 2)
    if parts[0] == "layers" and len(parts) == 3 and parts[1].isdigit() and int(parts[1]) < cfg.n_layers:
        rule = _block_rules(cfg, int(parts[1])).get(parts[2])
    else:
        rule = top.get(name)
    if rule is None:
        raise KeyError(f"no initialisation rule for parameter {name!r} of a {cfg.family} model")
    return rule


def init_parameter(cfg: ModelConfig, name: str, shape: Sequence[int], generator: torch.Generator,
                   dtype: torch.dtype = torch.float32) -> Tensor:
    """The full single-device initial value of parameter ``name`` (e.g. ``layers.0.mixer.q_proj.weight``) of
    shape ``shape``, drawn from ``generator`` (see :func:`parameter_generator`). Drawn in float32, then cast to
    ``dtype``, so every dtype starts from the same values."""
    return _rule(cfg, name)(tuple(shape), generator).to(dtype)


def init_buffer(cfg: ModelConfig, name: str, shape: Sequence[int], dtype: torch.dtype = torch.float32) -> Tensor:
    """The initial value of buffer ``name``: the MoE selection bias ``layers.{i}.ffn.expert_bias`` starts at 0."""
    if not name.endswith(".ffn.expert_bias"):
        raise KeyError(f"no initialisation rule for buffer {name!r}")
    return torch.zeros(tuple(shape), dtype=dtype)
