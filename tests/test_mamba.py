"""Selective scans (chunked vs the sequential oracle, forward and backward) and the Mamba mixer
against transformers' JambaMambaMixer."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from transformers import JambaConfig
from transformers.models.jamba.modeling_jamba import JambaMambaMixer

from model import mamba
from model.config import ModelConfig
from model.mamba import (
    DT_MAX,
    DT_MIN,
    MambaMixer,
    _SelectiveScanCore,
    selective_scan,
    selective_scan_chunked,
    selective_scan_ref,
)

NAMES = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")


def scan_inputs(batch: int, d_inner: int, n: int, seq_len: int, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "u": torch.randn(batch, d_inner, seq_len, generator=g),
        "delta": torch.randn(batch, d_inner, seq_len, generator=g) - 1.0,
        "A": -torch.exp(torch.randn(d_inner, n, generator=g)),
        "B": torch.randn(batch, n, seq_len, generator=g),
        "C": torch.randn(batch, n, seq_len, generator=g),
        "D": torch.randn(d_inner, generator=g),
        "z": torch.randn(batch, d_inner, seq_len, generator=g),
        "delta_bias": 0.5 * torch.randn(d_inner, generator=g),
    }


def output_and_grads(scan, inputs: dict[str, torch.Tensor], probe: torch.Tensor, **kwargs):
    leaves = {k: v.clone().requires_grad_() for k, v in inputs.items()}
    y = scan(**leaves, delta_softplus=True, **kwargs)
    grads = torch.autograd.grad((y * probe).sum(), list(leaves.values()))
    return y.detach(), dict(zip(leaves, grads, strict=True))


def assert_close_to_scale(actual: torch.Tensor, expected: torch.Tensor, name: str, tol: float = 1e-5) -> None:
    err = (actual - expected).abs().max().item()
    scale = expected.abs().max().item()
    assert err <= tol * max(scale, 1e-12), f"{name}: max error {err:.3e} vs scale {scale:.3e}"


@pytest.mark.parametrize("seq_len", [1, 7, 64, 100, 257])
@pytest.mark.parametrize("chunk_size", [16, 64])
def test_chunked_scan_matches_reference_forward_and_backward(seq_len, chunk_size):
    inputs = scan_inputs(2, 6, 4, seq_len, seed=seq_len)
    probe = torch.randn(2, 6, seq_len, generator=torch.Generator().manual_seed(1))
    y_ref, g_ref = output_and_grads(selective_scan_ref, inputs, probe)
    y_fast, g_fast = output_and_grads(selective_scan_chunked, inputs, probe, chunk_size=chunk_size)
    assert_close_to_scale(y_fast, y_ref, "output")
    for name in NAMES:
        assert_close_to_scale(g_fast[name], g_ref[name], f"grad {name}")


def test_chunked_scan_without_optional_inputs():
    full = scan_inputs(1, 5, 3, 45, seed=3)
    inputs = {k: full[k] for k in ("u", "A", "B", "C")}
    inputs["delta"] = F.softplus(full["delta"])  # no softplus inside: delta must already be positive
    y_ref = selective_scan_ref(**inputs)
    y_fast = selective_scan_chunked(**inputs, chunk_size=8)
    assert_close_to_scale(y_fast, y_ref, "output")


def test_scan_core_backward_gradcheck():
    # The hand-written backward against finite differences, in float64, with a tail after 5 chunks of 4.
    g = torch.Generator().manual_seed(5)
    seq_len, batch, d_inner, n = 23, 2, 3, 2
    delta = torch.rand(batch, seq_len, d_inner, generator=g, dtype=torch.float64)
    A = -2 * torch.rand(d_inner, n, generator=g, dtype=torch.float64)
    du = torch.randn(batch, seq_len, d_inner, generator=g, dtype=torch.float64)
    B = torch.randn(batch, seq_len, n, generator=g, dtype=torch.float64)
    C = torch.randn(batch, seq_len, n, generator=g, dtype=torch.float64)
    h0 = torch.randn(batch, n, d_inner, generator=g, dtype=torch.float64)
    inputs = tuple(t.requires_grad_() for t in (delta, A, du, B, C, h0))
    # Both outputs (y and the final state) and the initial state's gradient, as context parallelism chains them.
    assert torch.autograd.gradcheck(lambda d, a, u, b, c, h: _SelectiveScanCore.apply(d, a, u, b, c, 4, h), inputs)


@pytest.mark.parametrize("scan", [selective_scan_ref, selective_scan_chunked], ids=["ref", "chunked"])
def test_scan_split_in_two_with_state_hand_off_equals_one_scan(scan):
    """A sequence scanned as two parts, the second starting from the first's final state, gives the whole scan's
    outputs and every gradient (the hand-off context parallelism makes between ranks)."""
    inputs = scan_inputs(2, 6, 4, 40, seed=11)
    probe = torch.randn(2, 6, 40, generator=torch.Generator().manual_seed(3))
    y_ref, g_ref = output_and_grads(selective_scan_ref, inputs, probe)

    leaves = {k: v.detach().clone().requires_grad_() for k, v in inputs.items()}
    cut = 17
    first = {k: (v[..., :cut] if v.dim() == 3 else v) for k, v in leaves.items()}
    second = {k: (v[..., cut:] if v.dim() == 3 else v) for k, v in leaves.items()}
    y1, state = scan(**first, delta_softplus=True, return_final_state=True)
    y2 = scan(**second, delta_softplus=True, initial_state=state)
    y = torch.cat((y1, y2), dim=-1)
    (y * probe).sum().backward()
    assert_close_to_scale(y, y_ref, "output")
    for name in NAMES:
        assert_close_to_scale(leaves[name].grad, g_ref[name], f"grad {name}")


def test_chunked_scan_is_stable_with_extreme_decays():
    # delta * A down to about -2e4 per step: exp of a cumulative log-decay would overflow in any
    # formulation that divides by the decay; the result must stay finite and equal the oracle.
    inputs = scan_inputs(1, 4, 3, 300, seed=7)
    inputs["delta"] = inputs["delta"] + 6.0
    inputs["A"] = inputs["A"] * 100.0
    inputs["delta_bias"] = torch.zeros(4)
    probe = torch.randn(1, 4, 300, generator=torch.Generator().manual_seed(2))
    y_ref, g_ref = output_and_grads(selective_scan_ref, inputs, probe)
    y_fast, g_fast = output_and_grads(selective_scan_chunked, inputs, probe, chunk_size=128)
    assert torch.isfinite(y_fast).all() and all(torch.isfinite(g).all() for g in g_fast.values())
    assert_close_to_scale(y_fast, y_ref, "output")
    for name in NAMES:
        assert_close_to_scale(g_fast[name], g_ref[name], f"grad {name}")


def test_chunked_scan_matches_reference_at_long_length():
    # 3000 steps at tiny width: 46 full chunks and a tail, states carried across every chunk boundary both ways.
    inputs = scan_inputs(1, 3, 2, 3000, seed=11)
    probe = torch.randn(1, 3, 3000, generator=torch.Generator().manual_seed(3))
    y_ref, g_ref = output_and_grads(selective_scan_ref, inputs, probe)
    y_fast, g_fast = output_and_grads(selective_scan_chunked, inputs, probe, chunk_size=64)
    assert_close_to_scale(y_fast, y_ref, "output")
    for name in NAMES:
        assert_close_to_scale(g_fast[name], g_ref[name], f"grad {name}")


def test_chunks_shrink_to_the_element_budget(monkeypatch):
    # A budget of 40 elements per chunk buffer at batch 2, N 4, d_inner 5 leaves 1 step per chunk (and 2 at
    # 80): the chunk layout changes, the result does not.
    inputs = scan_inputs(2, 5, 4, 37, seed=13)
    probe = torch.randn(2, 5, 37, generator=torch.Generator().manual_seed(4))
    y_ref, g_ref = output_and_grads(selective_scan_ref, inputs, probe)
    for budget in (40, 80):
        monkeypatch.setattr(mamba, "CHUNK_ELEMENTS", budget)
        y_fast, g_fast = output_and_grads(selective_scan_chunked, inputs, probe, chunk_size=64)
        assert_close_to_scale(y_fast, y_ref, f"output, budget {budget}")
        for name in NAMES:
            assert_close_to_scale(g_fast[name], g_ref[name], f"grad {name}, budget {budget}")


def test_chunked_scan_saves_no_state_sized_tensor():
    # What forward leaves for backward: the [batch, T, d_inner] and [batch, T, N] inputs and one state per chunk,
    # not the [batch, T, N, d_inner] decays or states (16x the inputs at N = 16).
    batch, d_inner, n, seq_len = 2, 32, 16, 512
    leaves = {k: v.requires_grad_() for k, v in scan_inputs(batch, d_inner, n, seq_len).items()}
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
        selective_scan_chunked(**leaves, delta_softplus=True, chunk_size=64)
    assert max(saved) <= batch * seq_len * d_inner
    assert sum(saved) <= 12 * batch * seq_len * d_inner < batch * seq_len * d_inner * n


def test_dispatch_uses_chunked_scan_on_cpu():
    inputs = scan_inputs(1, 3, 2, 20, seed=9)
    y = selective_scan(**inputs, delta_softplus=True, chunk_size=8)
    assert torch.equal(y, selective_scan_chunked(**inputs, delta_softplus=True, chunk_size=8))


def test_scan_rejects_grouped_b():
    inputs = scan_inputs(1, 3, 2, 5)
    inputs["B"] = inputs["B"].unsqueeze(1)
    with pytest.raises(ValueError, match="grouped B/C"):
        selective_scan_chunked(**inputs)


def hybrid_config(**overrides) -> ModelConfig:
    base = {
        "family": "hybrid",
        "d_model": 32,
        "n_heads": 2,
        "n_kv_heads": 2,
        "ffn_hidden": 64,
        "n_layers": 2,
        "attn_layer_period": 2,
        "attn_layer_offset": 1,
        "mamba_d_state": 8,
        "mamba_d_conv": 4,
        "mamba_expand": 2,
        "mamba_chunk_size": 16,
        "norm_eps": 1e-6,
        "use_rope": False,
    }
    base.update(overrides)
    return ModelConfig(**base).validate()


def test_mixer_matches_hf_jamba_mixer_outputs_and_gradients():
    torch.manual_seed(0)
    hf_cfg = JambaConfig(
        hidden_size=32, mamba_d_state=8, mamba_d_conv=4, mamba_expand=2, rms_norm_eps=1e-6, use_mamba_kernels=False
    )
    hf = JambaMambaMixer(hf_cfg, layer_idx=0)
    ours = MambaMixer(hybrid_config())
    with torch.no_grad():  # HF's norm weights start at 1 and A_log at log(1..N): perturb so they matter
        for p in hf.parameters():
            p.add_(0.1 * torch.randn_like(p))
    ours.load_state_dict(hf.state_dict())  # strict: the parameter names are HF's

    x = torch.randn(2, 37, 32)
    y_hf = hf(x)
    y_ours = ours(x)
    assert_close_to_scale(y_ours, y_hf, "mixer output")

    probe = torch.randn_like(y_hf)
    (y_hf * probe).sum().backward()
    (y_ours * probe).sum().backward()
    hf_params = dict(hf.named_parameters())
    for name, p in ours.named_parameters():
        assert_close_to_scale(p.grad, hf_params[name].grad, f"grad {name}", tol=2e-5)


def test_mixer_initialisation_follows_mamba():
    torch.manual_seed(1)
    cfg = hybrid_config()
    mixer = MambaMixer(cfg)
    n = cfg.mamba_d_state
    assert mixer.A_log.shape == (cfg.mamba_d_inner, n)
    assert torch.allclose(
        mixer.A_log, torch.log(torch.arange(1, n + 1, dtype=torch.float32)).expand(cfg.mamba_d_inner, -1)
    )
    assert torch.equal(mixer.D.detach(), torch.ones(cfg.mamba_d_inner))
    dt = F.softplus(mixer.dt_proj.bias.detach())
    assert dt.min() >= DT_MIN * (1 - 1e-4) and dt.max() <= DT_MAX * (1 + 1e-4)
    # log-uniform: the log of dt spreads over most of [log DT_MIN, log DT_MAX]
    assert dt.log().max() - dt.log().min() > 0.5 * (math.log(DT_MAX) - math.log(DT_MIN))
    assert mixer.dt_proj.weight.shape == (cfg.mamba_d_inner, cfg.resolved_dt_rank)
    assert mixer(torch.randn(1, 5, cfg.d_model)).shape == (1, 5, cfg.d_model)
