"""GPU kernels against references: SDPA's flash backend, the MoE layer's experts, the chunked selective scan,
bf16 training against fp32, and the optional flash_attn / mamba_ssm kernels.

On a CUDA machine ``pytest -m gpu tests/test_gpu.py`` runs them on the GPU. Without CUDA the same bodies run on CPU
(in bf16 where they use it) as part of ``make test``, so the tests and the code they drive cannot rot where there is
no GPU; the kernels under test are then the CPU ones, and the CUDA-only kernels (flash_attn, mamba_ssm) are skipped
with the reason. ``PRETRAIN_GPU_TESTS_DEVICE=cuda|cpu`` picks the device explicitly.
"""

from __future__ import annotations

import math
import os

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from model.attention import causal_attention
from model.config import ModelConfig
from model.mamba import selective_scan, selective_scan_chunked, selective_scan_ref
from model.moe import MoE
from model.transformer import Transformer

DEVICE_ENV = "PRETRAIN_GPU_TESTS_DEVICE"


def _device() -> torch.device:
    forced = os.environ.get(DEVICE_ENV)
    if forced:
        return torch.device(forced)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


DEVICE = _device()
pytestmark = [pytest.mark.gpu]


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """||actual - expected|| / ||expected|| in float64."""
    actual, expected = actual.double(), expected.double()
    return ((actual - expected).norm() / expected.norm()).item()


# ------------------------------------------------------------------------------------------------ attention
def _qkv(batch: int, seq: int, heads: int, kv_heads: int, head_dim: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    shapes = [(batch, seq, heads, head_dim), (batch, seq, kv_heads, head_dim), (batch, seq, kv_heads, head_dim)]
    return [torch.randn(s, generator=gen).to(DEVICE, torch.bfloat16).requires_grad_() for s in shapes]


def _attention_and_grads(q, k, v, backend: str, probe: torch.Tensor) -> list[torch.Tensor]:
    out = causal_attention(q, k, v, backend)
    grads = torch.autograd.grad((out.float() * probe).sum(), (q, k, v))
    return [out, *grads]


def _math_reference(q, k, v, probe: torch.Tensor) -> list[torch.Tensor]:
    """SDPA's math backend in float32 on the same (bf16-valued) inputs."""
    q32, k32, v32 = (t.detach().float().requires_grad_() for t in (q, k, v))
    with sdpa_kernel([SDPBackend.MATH]):
        return _attention_and_grads(q32, k32, v32, "sdpa", probe)


# bf16 keeps 8 significant bits: outputs and gradients of a few-hundred-term softmax average stay within ~1%.
BF16_RELATIVE = 2e-2


@pytest.mark.parametrize("kv_heads", [8, 2], ids=["mha", "gqa"])
def test_sdpa_flash_backend_matches_math_backend(kv_heads):
    q, k, v = _qkv(2, 512, 8, kv_heads, 64)
    probe = torch.randn(q.shape, generator=torch.Generator().manual_seed(1)).to(DEVICE)
    with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):  # refuses (raises) rather than falling back
        flash = _attention_and_grads(q, k, v, "sdpa", probe)
    for name, got, want in zip(("out", "dq", "dk", "dv"), flash, _math_reference(q, k, v, probe), strict=True):
        assert got.dtype == torch.bfloat16
        assert relative_error(got, want) < BF16_RELATIVE, name


def test_flash_attn_package_matches_math_backend():
    pytest.importorskip("flash_attn", reason="flash_attn is not installed")
    if DEVICE.type != "cuda":
        pytest.skip("flash_attn runs on CUDA only")
    q, k, v = _qkv(2, 512, 8, 2, 64)
    probe = torch.randn(q.shape, generator=torch.Generator().manual_seed(1)).to(DEVICE)
    got_all = _attention_and_grads(q, k, v, "flash_attn", probe)
    for name, got, want in zip(("out", "dq", "dk", "dv"), got_all, _math_reference(q, k, v, probe), strict=True):
        assert relative_error(got, want) < BF16_RELATIVE, name


# ------------------------------------------------------------------------------------------------ MoE
def _moe_reference(x: torch.Tensor, weights: dict[str, torch.Tensor], top_k: int, keep: torch.Tensor) -> torch.Tensor:
    """Per-token Mixtral MoE (softmax router, top-k, renormalised combine weights) from ``weights`` named as the
    layer's parameters; rows where ``keep`` is False are zero."""
    router, w1, w3, w2 = (weights[n] for n in ("router.weight", "w1", "w3", "w2"))
    probs = F.softmax(x @ router.t(), dim=-1)
    top_p, top_e = probs.topk(top_k, dim=-1)
    top_p = top_p / top_p.sum(-1, keepdim=True)
    rows = []
    for t in range(x.shape[0]):
        y = x.new_zeros(x.shape[1])
        for p, e in zip(top_p[t], top_e[t].tolist(), strict=True):
            y = y + p * ((F.silu(w1[e] @ x[t]) * (w3[e] @ x[t])) @ w2[e].t())
        rows.append(y if keep[t] else torch.zeros_like(y))
    return torch.stack(rows)


def _clear_top_k(x: torch.Tensor, moe: MoE, margin: float) -> torch.Tensor:
    """Tokens whose k-th and (k+1)-th router logits differ by more than ``margin``: bf16 rounding of the logits
    (relative 2**-9) cannot change their choice of experts, so the reference may route them independently."""
    with torch.no_grad():
        top = (x.double() @ moe.router.weight.double().t()).topk(moe.top_k + 1, dim=-1).values
    return top[:, -2] - top[:, -1] > margin


def test_moe_layer_bf16_matches_float32_per_token_reference():
    """The layer in bf16 (on Hopper: torch's grouped GEMM over the experts) against an independent per-token
    float32 computation from the same bf16 weights, outputs and gradients."""
    cfg = ModelConfig(family="moe", d_model=256, n_heads=4, n_kv_heads=4, ffn_hidden=512, num_experts=8, top_k=2)
    torch.manual_seed(0)
    moe = MoE(cfg)
    with torch.no_grad():
        moe.router.weight.normal_(0.0, 0.2)  # logits of std ~3: few near-ties, rounding errors < 0.02
    moe = moe.to(DEVICE, torch.bfloat16)
    x = torch.randn(2, 256, cfg.d_model, generator=torch.Generator().manual_seed(1)).to(DEVICE, torch.bfloat16)
    x.requires_grad_()
    tokens = x.detach().reshape(-1, cfg.d_model)
    keep = _clear_top_k(tokens, moe, margin=0.05)
    assert keep.float().mean() > 0.9, "too many near-tied routing decisions to compare"
    probe = torch.randn(tokens.shape, generator=torch.Generator().manual_seed(2)).to(DEVICE) * keep[:, None]

    y, _ = moe(x)
    (y.reshape(-1, cfg.d_model).float() * probe).sum().backward()

    ref_weights = {n: p.detach().float().requires_grad_() for n, p in moe.named_parameters()}
    ref_x = tokens.float().requires_grad_()
    ref_y = _moe_reference(ref_x, ref_weights, cfg.top_k, keep)
    (ref_y * probe).sum().backward()

    assert relative_error(y.reshape(-1, cfg.d_model)[keep], ref_y[keep]) < BF16_RELATIVE
    assert relative_error(x.grad.reshape(-1, cfg.d_model), ref_x.grad) < BF16_RELATIVE
    for name, p in moe.named_parameters():
        assert relative_error(p.grad, ref_weights[name].grad) < BF16_RELATIVE, name


# ------------------------------------------------------------------------------------------------ scan
def _scan_inputs(batch: int, d_inner: int, d_state: int, seq: int, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)

    def randn(*shape, scale=1.0):
        return (torch.randn(*shape, generator=gen) * scale).to(DEVICE)

    return {
        "u": randn(batch, d_inner, seq).to(dtype),
        "delta": randn(batch, d_inner, seq, scale=0.5).to(dtype),
        "A": -torch.exp(randn(d_inner, d_state, scale=0.5)),
        "B": randn(batch, d_state, seq).to(dtype),
        "C": randn(batch, d_state, seq).to(dtype),
        "D": randn(d_inner),
        "z": randn(batch, d_inner, seq).to(dtype),
        "delta_bias": randn(d_inner, scale=0.1),
    }


def _scan_and_grads(scan, inputs: dict[str, torch.Tensor], probe: torch.Tensor, **kwargs) -> list[torch.Tensor]:
    leaves = {k: v.detach().clone().requires_grad_() for k, v in inputs.items()}
    y = scan(**leaves, delta_softplus=True, **kwargs)
    grads = torch.autograd.grad((y.float() * probe).sum(), list(leaves.values()))
    return [y, *grads]


def test_chunked_selective_scan_matches_sequential_reference():
    """float32, T not a multiple of the chunk (the tail runs step by step): forward and every input's gradient."""
    inputs = _scan_inputs(2, 64, 16, 300, torch.float32)
    probe = torch.randn(2, 64, 300, generator=torch.Generator().manual_seed(1)).to(DEVICE)
    got = _scan_and_grads(selective_scan_chunked, inputs, probe, chunk_size=64)
    want = _scan_and_grads(selective_scan_ref, inputs, probe)
    for name, g, w in zip(["y", *inputs], got, want, strict=True):
        assert relative_error(g, w) < 1e-4, name


def test_chunked_selective_scan_bf16_inputs_match_reference():
    """bf16 activations (as under autocast): both scans compute in float32, so only the output's rounding differs."""
    inputs = _scan_inputs(2, 64, 16, 256, torch.bfloat16)
    got = selective_scan_chunked(**inputs, delta_softplus=True, chunk_size=64)
    want = selective_scan_ref(**inputs, delta_softplus=True)
    assert got.dtype == torch.bfloat16
    assert relative_error(got, want) < 1e-2


def test_mamba_ssm_kernel_matches_sequential_reference():
    pytest.importorskip("mamba_ssm.ops.selective_scan_interface", reason="mamba_ssm is not installed")
    if DEVICE.type != "cuda":
        pytest.skip("mamba_ssm's kernel runs on CUDA only")
    inputs = _scan_inputs(2, 64, 16, 300, torch.float32)
    probe = torch.randn(2, 64, 300, generator=torch.Generator().manual_seed(1)).to(DEVICE)
    got = _scan_and_grads(selective_scan, inputs, probe)  # dispatches to the kernel for CUDA tensors
    want = _scan_and_grads(selective_scan_ref, inputs, probe)
    for name, g, w in zip(["y", *inputs], got, want, strict=True):
        assert relative_error(g, w) < 1e-3, name


# ------------------------------------------------------------------------------------------------ training
TINY_FAMILIES = {
    "dense": {"family": "dense"},
    "moe": {"family": "moe", "num_experts": 4, "top_k": 2},
    "hybrid": {
        "family": "hybrid",
        "num_experts": 4,
        "top_k": 2,
        "expert_layer_period": 2,
        "expert_layer_offset": 1,
        "attn_layer_period": 2,
        "attn_layer_offset": 1,
        "use_rope": False,
    },
}
STEPS = 50
# Largest |loss_bf16 - loss_fp32| allowed at any of the 50 steps, in nats: the losses fall by ~4 nats meanwhile.
LOSS_TOLERANCE = 0.05


def _train_losses(family: str, bf16_autocast: bool) -> list[float]:
    cfg = ModelConfig(
        vocab_size=256,
        d_model=64,
        n_layers=2,
        n_heads=4,
        n_kv_heads=2,
        ffn_hidden=128,
        max_seq_len=64,
        attn_backend="sdpa",
        **TINY_FAMILIES[family],
    )
    torch.manual_seed(0)
    model = Transformer(cfg).to(DEVICE)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, fused=DEVICE.type == "cuda")
    # A fixed batch of a noiseless random bigram chain: learnable, so the loss falls far within 50 steps.
    gen = torch.Generator().manual_seed(0)
    successor = torch.randperm(cfg.vocab_size, generator=gen)
    tokens = torch.empty(8, 65, dtype=torch.int64)
    tokens[:, 0] = torch.randint(0, cfg.vocab_size, (8,), generator=gen)
    for t in range(1, tokens.shape[1]):
        tokens[:, t] = successor[tokens[:, t - 1]]
    tokens = tokens.to(DEVICE)
    losses = []
    for _ in range(STEPS):
        with torch.autocast(DEVICE.type, dtype=torch.bfloat16, enabled=bf16_autocast):
            loss = model(tokens[:, :-1], labels=tokens[:, 1:]).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize("family", list(TINY_FAMILIES))
def test_bf16_autocast_training_tracks_float32(family):
    fp32 = _train_losses(family, bf16_autocast=False)
    bf16 = _train_losses(family, bf16_autocast=True)
    assert all(math.isfinite(x) for x in bf16)
    assert fp32[-1] < fp32[0] - 2.0, "the reference run did not learn: the comparison would say little"
    worst = max(abs(a - b) for a, b in zip(bf16, fp32, strict=True))
    assert worst < LOSS_TOLERANCE, (worst, bf16[-5:], fp32[-5:])
