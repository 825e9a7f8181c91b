"""MoE layer: equality with HF Mixtral/Jamba blocks, hand-checked losses, router gradients,
aux-loss-free balancing and capacity dropping."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import JambaConfig, MixtralConfig
from transformers.models.jamba.modeling_jamba import JambaSparseMoeBlock
from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock, load_balancing_loss_func

from model.config import ConfigError, ModelConfig
from model.moe import MoE


def moe_config(**overrides) -> ModelConfig:
    base = {
        "family": "moe",
        "d_model": 16,
        "n_heads": 2,
        "n_kv_heads": 2,
        "ffn_hidden": 24,
        "num_experts": 4,
        "top_k": 2,
    }
    base.update(overrides)
    return ModelConfig(**base).validate()


def copy_from_hf(ours: MoE, hf: torch.nn.Module, router_name: str, names: tuple[str, str, str]) -> None:
    with torch.no_grad():
        ours.router.weight.copy_(getattr(hf, router_name).weight)
        for ours_name, hf_name in zip(("w1", "w3", "w2"), names, strict=True):
            getattr(ours, ours_name).copy_(torch.stack([getattr(e, hf_name).weight for e in hf.experts]))


def test_matches_hf_mixtral_block_outputs_and_gradients():
    torch.manual_seed(0)
    hf_cfg = MixtralConfig(
        hidden_size=16, intermediate_size=24, num_local_experts=4, num_experts_per_tok=2, router_jitter_noise=0.0
    )
    hf = MixtralSparseMoeBlock(hf_cfg)
    ours = MoE(moe_config())
    copy_from_hf(ours, hf, "gate", ("w1", "w3", "w2"))
    x = torch.randn(3, 11, 16)

    x_hf, x_ours = x.clone().requires_grad_(), x.clone().requires_grad_()
    y_hf, logits = hf(x_hf)
    y_ours, _ = ours(x_ours)
    assert torch.allclose(y_ours, y_hf, atol=1e-5, rtol=0), (y_ours - y_hf).abs().max()

    probe = torch.randn(y_hf.shape)
    (y_hf * probe).sum().backward()
    (y_ours * probe).sum().backward()
    assert torch.allclose(x_ours.grad, x_hf.grad, atol=1e-5, rtol=0)
    assert torch.allclose(ours.router.weight.grad, hf.gate.weight.grad, atol=1e-5, rtol=0)
    hf_w1_grad = torch.stack([e.w1.weight.grad for e in hf.experts])
    assert torch.allclose(ours.w1.grad, hf_w1_grad, atol=1e-5, rtol=0)

    # HF's loss counts tokens per expert, ours counts token slots: HF = top_k * ours.
    hf_lb = load_balancing_loss_func((logits,), num_experts=4, top_k=2)
    assert torch.allclose(2 * ours.last_stats["lb_loss"], hf_lb, atol=1e-6, rtol=0)


def test_matches_hf_jamba_block_without_renormalisation():
    torch.manual_seed(1)
    hf_cfg = JambaConfig(hidden_size=16, intermediate_size=24, num_experts=4, num_experts_per_tok=2)
    hf = JambaSparseMoeBlock(hf_cfg)
    ours = MoE(moe_config(moe_renormalize=False))
    copy_from_hf(ours, hf, "router", ("gate_proj", "up_proj", "down_proj"))
    x = torch.randn(2, 9, 16)
    y_hf, _ = hf(x)
    y_ours, _ = ours(x)
    assert torch.allclose(y_ours, y_hf, atol=1e-5, rtol=0), (y_ours - y_hf).abs().max()


def two_expert_moe(top_k: int, **overrides) -> tuple[MoE, torch.Tensor]:
    """2 experts, d_model 2, identity router: the router logits are the tokens themselves.

    Tokens (logits): three of (ln 3, 0) -> probs (3/4, 1/4) and one (0, ln 7) -> probs (1/8, 7/8).
    """
    moe = MoE(moe_config(d_model=2, n_heads=1, n_kv_heads=1, ffn_hidden=4, num_experts=2, top_k=top_k, **overrides))
    with torch.no_grad():
        moe.router.weight.copy_(torch.eye(2))
    ln3, ln7 = math.log(3.0), math.log(7.0)
    x = torch.tensor([[[ln3, 0.0], [ln3, 0.0], [ln3, 0.0], [0.0, ln7]]])
    return moe, x


def test_load_balancing_and_z_loss_hand_computed():
    # P = mean probs = ((3 * 3/4 + 1/8) / 4, (3 * 1/4 + 7/8) / 4) = (19/32, 13/32).
    # top-1 picks experts 0, 0, 0, 1 -> f = (3/4, 1/4); lb = 2 * (3/4 * 19/32 + 1/4 * 13/32) = 140/128.
    # logsumexp per token: ln 4 (three times) and ln 8 -> z = (3 * (2 ln 2)^2 + (3 ln 2)^2) / 4 = 21/4 (ln 2)^2.
    moe, x = two_expert_moe(top_k=1, aux_loss_coeff=0.5, z_loss_coeff=0.25)
    _, aux = moe(x)
    stats = moe.last_stats
    assert torch.allclose(stats["load"], torch.tensor([0.75, 0.25]))
    assert stats["lb_loss"].item() == pytest.approx(1.09375, abs=1e-6)
    assert stats["z_loss"].item() == pytest.approx(21 / 4 * math.log(2.0) ** 2, abs=1e-6)
    assert aux.item() == pytest.approx(0.5 * 1.09375 + 0.25 * 21 / 4 * math.log(2.0) ** 2, abs=1e-6)
    assert stats["dropped_fraction"].item() == 0.0

    # top-2 routes every token to both experts: f = (1/2, 1/2), lb = 2 * (19/64 + 13/64) = 1.
    moe2, x2 = two_expert_moe(top_k=2)
    moe2(x2)
    assert torch.allclose(moe2.last_stats["load"], torch.tensor([0.5, 0.5]))
    assert moe2.last_stats["lb_loss"].item() == pytest.approx(1.0, abs=1e-6)


def test_router_gradient_matches_finite_differences():
    torch.manual_seed(2)
    moe = MoE(moe_config(aux_loss_coeff=0.1, z_loss_coeff=0.01)).double()
    x = torch.randn(2, 6, 16, dtype=torch.float64)
    probe = torch.randn(2, 6, 16, dtype=torch.float64)

    def loss() -> torch.Tensor:
        y, aux = moe(x)
        return (y * probe).sum() + aux

    loss().backward()
    grad = moe.router.weight.grad.clone()
    assert grad.abs().max() > 0
    direction = torch.randn_like(grad)
    eps = 1e-6
    with torch.no_grad():
        moe.router.weight += eps * direction
        plus = loss()
        moe.router.weight -= 2 * eps * direction
        minus = loss()
    numeric = (plus - minus) / (2 * eps)
    assert numeric.item() == pytest.approx((grad * direction).sum().item(), rel=1e-6, abs=1e-9)


def test_aux_free_bias_moves_load_towards_balance():
    torch.manual_seed(3)
    moe = MoE(moe_config(num_experts=4, top_k=1, aux_free_bias_rate=0.001))
    x = torch.randn(4, 16, 16)
    tokens_mean = x.reshape(-1, 16).mean(0)
    spread = []  # max - min expert load, per step
    with torch.no_grad():
        moe.router.weight[0] = 0.3 * tokens_mean / tokens_mean.norm() ** 2  # skew: expert 0 wins most tokens
        for _ in range(200):
            moe(x)
            load = moe.last_stats["load"]
            spread.append((load.max() - load.min()).item())
            moe.update_bias(load)
    assert spread[0] > 0.4, spread[0]  # the skew is real
    # Sign updates oscillate around balance: judge the worst of the last 20 steps.
    assert max(spread[-20:]) < 0.25 * spread[0], (spread[0], spread[-20:])
    assert moe.expert_bias[0] < 0
    assert "expert_bias" in moe.state_dict()


def test_update_bias_is_a_noop_without_rate():
    moe = MoE(moe_config(aux_free_bias_rate=0.0))
    moe.update_bias(torch.tensor([1.0, 0.0, 0.0, 0.0]))
    assert torch.equal(moe.expert_bias, torch.zeros(4))


def test_capacity_drops_late_slots_in_token_order():
    # top-1 routes tokens to experts 0, 0, 0, 1; capacity = ceil(1.0 * 4 * 1 / 2) = 2 slots per expert,
    # so expert 0 keeps tokens 0 and 1 and drops token 2; token 3 (expert 1) is kept.
    dropless, x = two_expert_moe(top_k=1)
    capped, _ = two_expert_moe(top_k=1, capacity_factor=1.0)
    capped.load_state_dict(dropless.state_dict())
    assert capped.capacity(4) == 2
    with torch.no_grad():
        y_full, _ = dropless(x)
        y_capped, _ = capped(x)
    assert capped.last_stats["dropped_fraction"].item() == pytest.approx(0.25)
    assert torch.equal(y_capped[0, 2], torch.zeros(2))
    assert y_full[0, 2].abs().sum() > 0
    keep = [0, 1, 3]
    assert torch.allclose(y_capped[0, keep], y_full[0, keep], atol=1e-7)
    # The load statistic counts routed slots, dropped or not.
    assert torch.allclose(capped.last_stats["load"], torch.tensor([0.75, 0.25]))


def test_generous_capacity_matches_dropless():
    torch.manual_seed(4)
    dropless = MoE(moe_config())
    capped = MoE(moe_config(capacity_factor=4.0))  # capacity = all slots
    capped.load_state_dict(dropless.state_dict())
    x = torch.randn(2, 7, 16)
    assert torch.allclose(capped(x)[0], dropless(x)[0], atol=1e-7)
    assert capped.last_stats["dropped_fraction"].item() == 0.0


@pytest.mark.parametrize(
    "overrides, key",
    [
        ({"num_experts": 1}, "model.num_experts"),
        ({"top_k": 5}, "model.top_k"),
        ({"capacity_factor": 0.0}, "model.capacity_factor"),
        ({"aux_free_bias_rate": -1.0}, "model.aux_free_bias_rate"),
    ],
)
def test_bad_config_names_the_key(overrides, key):
    cfg = ModelConfig(family="moe", d_model=16, n_heads=2, n_kv_heads=2, ffn_hidden=24, num_experts=4)
    for name, value in overrides.items():
        setattr(cfg, name, value)
    with pytest.raises(ConfigError) as info:
        MoE(cfg)
    assert info.value.key == key
