"""MoE layer: equality with HF Mixtral/Jamba blocks and with a per-token reference (values and gradients, grouped
GEMM and per-expert paths, capacity dropping, idle experts), hand-checked losses, router gradients, aux-loss-free
balancing, step load statistics, and a forward/backward that compiles as one graph."""

from __future__ import annotations

import math

import pytest
import torch
from functorch.compile import make_boxed_func
from torch._dynamo.backends.common import aot_autograd
from transformers import JambaConfig, MixtralConfig
from transformers.models.jamba.modeling_jamba import JambaSparseMoeBlock
from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock, load_balancing_loss_func

from model.config import ConfigError, ModelConfig
from model.moe import MoE, _grouped_mm_usable
from tests.rounding import U64, gamma


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


# Both sides in float64: rounding in these 16- and 24-term products is ~1e-15 of the values (Higham eq. 3.5); a
# wrong expert weight, a dropped renormalisation or an aux loss off by top_k is off by O(0.1).
TOL = 1e-12


def hf_tol(t: torch.Tensor, num_experts: int = 4) -> float:
    """transformers' routers take the softmax in float32 even for float64 weights, their one float32 step: each
    routing weight (softmax over E logits, then renormalised over top_k) and its gradient carry a relative error of
    at most gamma(E + 6), and each entry is a sum of top_k = 2 weighted expert terms; 8x that times the entries'
    scale leaves room for the terms' partial cancellation and is still ~1e-6 of it, far below any bug."""
    return 8 * gamma(num_experts + 6) * float(t.abs().max())


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
    hf = MixtralSparseMoeBlock(hf_cfg).double()
    ours = MoE(moe_config()).double()
    copy_from_hf(ours, hf, "gate", ("w1", "w3", "w2"))
    x = torch.randn(3, 11, 16, dtype=torch.float64)

    x_hf, x_ours = x.clone().requires_grad_(), x.clone().requires_grad_()
    y_hf, logits = hf(x_hf)
    y_ours, _ = ours(x_ours)
    assert torch.allclose(y_ours, y_hf, atol=hf_tol(y_hf), rtol=0), (y_ours - y_hf).abs().max()

    probe = torch.randn(y_hf.shape, dtype=torch.float64)
    (y_hf * probe).sum().backward()
    (y_ours * probe).sum().backward()
    assert torch.allclose(x_ours.grad, x_hf.grad, atol=hf_tol(x_hf.grad), rtol=0)
    assert torch.allclose(ours.router.weight.grad, hf.gate.weight.grad, atol=hf_tol(hf.gate.weight.grad), rtol=0)
    hf_w1_grad = torch.stack([e.w1.weight.grad for e in hf.experts])
    assert torch.allclose(ours.w1.grad, hf_w1_grad, atol=hf_tol(hf_w1_grad), rtol=0)

    # HF's loss counts tokens per expert, ours counts token slots: HF = top_k * ours.
    hf_lb = load_balancing_loss_func((logits,), num_experts=4, top_k=2)
    assert torch.allclose(2 * ours.last_stats["lb_loss"], hf_lb.double(), atol=hf_tol(hf_lb), rtol=0)


def test_matches_hf_jamba_block_without_renormalisation():
    torch.manual_seed(1)
    hf_cfg = JambaConfig(hidden_size=16, intermediate_size=24, num_experts=4, num_experts_per_tok=2)
    hf = JambaSparseMoeBlock(hf_cfg).double()
    ours = MoE(moe_config(moe_renormalize=False)).double()
    copy_from_hf(ours, hf, "router", ("gate_proj", "up_proj", "down_proj"))
    x = torch.randn(2, 9, 16, dtype=torch.float64)
    y_hf, _ = hf(x)
    y_ours, _ = ours(x)
    assert torch.allclose(y_ours, y_hf, atol=hf_tol(y_hf), rtol=0), (y_ours - y_hf).abs().max()


def two_expert_moe(top_k: int, **overrides) -> tuple[MoE, torch.Tensor]:
    """2 experts, d_model 2, identity router: the router logits are the tokens themselves.

    Tokens (logits): three of (ln 3, 0) -> probs (3/4, 1/4) and one (0, ln 7) -> probs (1/8, 7/8).
    """
    moe = MoE(moe_config(d_model=2, n_heads=1, n_kv_heads=1, ffn_hidden=4, num_experts=2, top_k=top_k, **overrides))
    moe = moe.double()  # float64: the hand-computed values hold to ~1e-16
    with torch.no_grad():
        moe.router.weight.copy_(torch.eye(2))
    ln3, ln7 = math.log(3.0), math.log(7.0)
    x = torch.tensor([[[ln3, 0.0], [ln3, 0.0], [ln3, 0.0], [0.0, ln7]]], dtype=torch.float64)
    return moe, x


def test_load_balancing_and_z_loss_hand_computed():
    # P = mean probs = ((3 * 3/4 + 1/8) / 4, (3 * 1/4 + 7/8) / 4) = (19/32, 13/32).
    # top-1 picks experts 0, 0, 0, 1 -> f = (3/4, 1/4); lb = 2 * (3/4 * 19/32 + 1/4 * 13/32) = 140/128.
    # logsumexp per token: ln 4 (three times) and ln 8 -> z = (3 * (2 ln 2)^2 + (3 ln 2)^2) / 4 = 21/4 (ln 2)^2.
    moe, x = two_expert_moe(top_k=1, aux_loss_coeff=0.5, z_loss_coeff=0.25)
    _, aux = moe(x)
    stats = moe.last_stats
    assert stats["load"].tolist() == [0.75, 0.25]
    assert stats["lb_loss"].item() == pytest.approx(1.09375, rel=1e-14)
    assert stats["z_loss"].item() == pytest.approx(21 / 4 * math.log(2.0) ** 2, rel=1e-14)
    assert aux.item() == pytest.approx(0.5 * 1.09375 + 0.25 * 21 / 4 * math.log(2.0) ** 2, rel=1e-14)
    assert stats["dropped_fraction"].item() == 0.0

    # top-2 routes every token to both experts: f = (1/2, 1/2), lb = 2 * (19/64 + 13/64) = 1.
    moe2, x2 = two_expert_moe(top_k=2)
    moe2(x2)
    assert moe2.last_stats["load"].tolist() == [0.5, 0.5]
    assert moe2.last_stats["lb_loss"].item() == pytest.approx(1.0, rel=1e-14)


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
    # Central difference in float64: cancellation ~2**-53 |f| / eps (bounded below, times 1e3 for the rounding inside
    # f) and truncation eps^2 |f'''| / 6 (below eps for |f'''| < 6 / eps), a few 1e-6 in all; an aux-loss or
    # z-loss gradient left out of the router moves it by ~1e-2.
    cancellation = 4 * U64 * (abs(plus.item()) + abs(minus.item())) / (2 * eps)
    assert abs(numeric.item() - (grad * direction).sum().item()) <= 1e3 * cancellation + eps


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
    assert torch.allclose(y_capped[0, keep], y_full[0, keep], atol=TOL, rtol=0)
    # The load statistic counts routed slots, dropped or not.
    assert capped.last_stats["load"].tolist() == [0.75, 0.25]


def test_generous_capacity_matches_dropless():
    torch.manual_seed(4)
    dropless = MoE(moe_config()).double()
    capped = MoE(moe_config(capacity_factor=4.0)).double()  # capacity = all slots
    capped.load_state_dict(dropless.state_dict())
    x = torch.randn(2, 7, 16, dtype=torch.float64)
    assert torch.allclose(capped(x)[0], dropless(x)[0], atol=TOL, rtol=0)
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


def per_token_reference(moe: MoE, x: torch.Tensor) -> torch.Tensor:
    """``moe``'s output written token by token: router softmax, top-k on probabilities plus the selection bias,
    (renormalised) weights, then each chosen expert's SwiGLU on that token alone. With a capacity, expert e serves
    its first ``capacity`` slots in (token, choice) order and the rest add nothing."""
    tokens = x.reshape(-1, x.shape[-1])
    probs = torch.softmax(tokens @ moe.router.weight.t(), dim=-1)
    capacity = moe.capacity(tokens.shape[0])
    served = [0] * moe.num_experts
    out = []
    for t, token in enumerate(tokens):
        chosen = torch.topk(probs[t].detach() + moe.expert_bias, moe.top_k).indices.tolist()
        weights = probs[t, chosen]
        if moe.renormalize:
            weights = weights / weights.sum()
        y = torch.zeros_like(token)
        for weight, e in zip(weights, chosen, strict=True):
            served[e] += 1
            if capacity is None or served[e] <= capacity:
                hidden = torch.nn.functional.silu(moe.w1[e] @ token) * (moe.w3[e] @ token)
                y = y + weight * (moe.w2[e] @ hidden)
        out.append(y)
    return torch.stack(out).reshape(x.shape)


def grads_of(moe: MoE, x: torch.Tensor, forward, probe: torch.Tensor) -> list[torch.Tensor]:
    moe.zero_grad(set_to_none=True)
    leaf = x.clone().requires_grad_()
    (forward(leaf) * probe).sum().backward()
    return [leaf.grad] + [p.grad for p in (moe.router.weight, moe.w1, moe.w3, moe.w2)]


def check_against_reference(moe: MoE, x: torch.Tensor, atol: float) -> None:
    probe = torch.randn_like(x)
    y = moe(x)[0]
    y_ref = per_token_reference(moe, x)
    assert torch.allclose(y, y_ref, atol=atol, rtol=0), (y - y_ref).abs().max()
    ours = grads_of(moe, x, lambda leaf: moe(leaf)[0], probe)
    ref = grads_of(moe, x, lambda leaf: per_token_reference(moe, leaf), probe)
    for name, g, g_ref in zip(("x", "router", "w1", "w3", "w2"), ours, ref, strict=True):
        assert torch.allclose(g, g_ref, atol=atol, rtol=0), (name, (g - g_ref).abs().max())


@pytest.mark.parametrize(
    "dtype, top_k, renormalize",
    [(torch.float32, 2, True), (torch.float32, 1, True), (torch.float32, 3, False), (torch.float64, 2, True)],
)
def test_matches_per_token_reference(dtype, top_k, renormalize):
    # float32 with rows of 16 and 32 floats runs torch's grouped GEMM; float64 the per-expert matmuls.
    torch.manual_seed(5)
    moe = MoE(moe_config(ffn_hidden=32, top_k=top_k, moe_renormalize=renormalize)).to(dtype)
    x = torch.randn(2, 12, 16, dtype=dtype)
    assert _grouped_mm_usable(x, moe.w1, moe.w3, moe.w2) == (dtype == torch.float32)
    check_against_reference(moe, x, atol=1e-5)


def test_experts_compute_in_the_autocast_dtype():
    torch.manual_seed(10)
    moe = MoE(moe_config(ffn_hidden=32))
    x = torch.randn(2, 12, 16, requires_grad=True)
    y = moe(x)[0]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y_bf16 = moe(x)[0]
    y_bf16.sum().backward()
    assert y_bf16.dtype == torch.float32 and moe.w1.grad.dtype == torch.float32
    assert torch.allclose(y_bf16, y, atol=2e-2 * y.abs().max().item(), rtol=0)


def test_capacity_matches_per_token_reference():
    torch.manual_seed(6)
    moe = MoE(moe_config(ffn_hidden=32, capacity_factor=0.5))  # 6 slots per expert for 24 tokens x 2
    x = torch.randn(2, 12, 16)
    check_against_reference(moe, x, atol=1e-5)
    routed = moe.last_stats["load"] * 48
    expected_dropped = (routed - 6).clamp(min=0).sum() / 48
    assert expected_dropped > 0
    assert torch.allclose(moe.last_stats["dropped_fraction"], expected_dropped)


def test_expert_without_tokens():
    torch.manual_seed(7)
    moe = MoE(moe_config(ffn_hidden=32))
    with torch.no_grad():
        moe.expert_bias[3] = -10.0  # probabilities are < 1: expert 3 is never selected
    x = torch.randn(2, 12, 16)
    check_against_reference(moe, x, atol=1e-5)
    assert moe.last_stats["load"][3] == 0
    for w in (moe.w1, moe.w3, moe.w2):  # still in the graph, with a zero gradient
        assert torch.equal(w.grad[3], torch.zeros_like(w.grad[3])) and w.grad[:3].abs().sum() > 0


def test_step_load_averages_training_forwards():
    torch.manual_seed(8)
    moe = MoE(moe_config())
    loads = []
    for _ in range(2):
        moe(torch.randn(2, 5, 16))
        loads.append(moe.last_stats["load"])
    moe.eval()
    moe(torch.randn(2, 5, 16))  # evaluation forwards are not part of the step
    assert torch.allclose(moe.pop_step_load(), (loads[0] + loads[1]) / 2)
    assert moe.pop_step_load() is None


def traced_graphs(moe: MoE, x: torch.Tensor) -> list[torch.fx.GraphModule]:
    """The forward and backward graphs of ``moe`` on ``x`` as torch.compile traces them (one graph: fullgraph)."""
    graphs = []

    def keep(graph: torch.fx.GraphModule, _inputs) -> object:
        graphs.append(graph)
        return make_boxed_func(graph.forward)

    torch._dynamo.reset()
    compiled = torch.compile(
        moe, fullgraph=True, dynamic=False, backend=aot_autograd(fw_compiler=keep, bw_compiler=keep)
    )
    y, aux = compiled(x.clone().requires_grad_())
    (y.float().square().sum() + aux).backward()
    assert len(graphs) == 2
    return graphs


def host_reads(graphs: list[torch.fx.GraphModule]) -> list[str]:
    """Nodes that read a tensor's value on the host (``.item()``, ``.tolist()``) or whose shape depends on data."""
    found = []
    for graph in graphs:
        for node in graph.graph.nodes:
            value = node.meta.get("val")
            shape = value.shape if isinstance(value, torch.Tensor) else ()
            if node.target is torch.ops.aten._local_scalar_dense.default or not all(isinstance(n, int) for n in shape):
                found.append(node.format_node())
    return found


@pytest.mark.parametrize("capacity_factor", [None, 0.5])
def test_forward_and_backward_read_nothing_on_the_host(capacity_factor):
    """Traced with static shapes, the grouped-GEMM forward and backward hold no host read and no shape that depends
    on routing, so nothing waits for the device. bf16: torch's shape function for ``_grouped_mm`` takes only bf16.
    Evaluation mode: the training-only step-load bookkeeping asks autograd in Python whether it runs inside a
    recomputation, which the tracer cannot follow (no tensor is read there)."""
    torch.manual_seed(9)
    moe = MoE(moe_config(ffn_hidden=32, capacity_factor=capacity_factor)).to(torch.bfloat16).eval()
    graphs = traced_graphs(moe, torch.randn(2, 12, 16, dtype=torch.bfloat16))
    assert any(node.target is torch.ops.aten._grouped_mm.default for g in graphs for node in g.graph.nodes)
    assert host_reads(graphs) == []
    # The same check sees the per-expert path read the counts.
    assert host_reads(traced_graphs(moe.double(), torch.randn(2, 12, 16, dtype=torch.float64)))
