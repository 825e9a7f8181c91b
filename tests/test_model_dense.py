"""Dense decoder: equality with transformers' Llama, attention backends, FLOPs/params, checkpointing, configs."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import yaml
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode
from transformers import LlamaConfig, LlamaForCausalLM

from model import attention as attention_mod
from model.attention import causal_attention
from model.config import ConfigError, ModelConfig
from model.convert import config_from_hf, load_into, state_dict_from_hf, state_dict_to_hf
from model.flops import flops_per_token, matmul_params_per_token, param_counts
from model.transformer import Transformer
from tests.rounding import U32, U64, gamma, log_softmax_error

CONF_DIR = Path(__file__).resolve().parents[1] / "conf" / "model"

# (GQA, untied), (MHA, tied), (GQA with head_dim != d_model / n_heads, tied)
LLAMA_CASES = [
    {"hidden_size": 64, "num_attention_heads": 4, "num_key_value_heads": 2, "tie_word_embeddings": False},
    {"hidden_size": 48, "num_attention_heads": 3, "num_key_value_heads": 3, "tie_word_embeddings": True},
    {
        "hidden_size": 64,
        "num_attention_heads": 4,
        "num_key_value_heads": 1,
        "head_dim": 24,
        "tie_word_embeddings": True,
    },
]


def tiny_cfg(**overrides) -> ModelConfig:
    base = {
        "vocab_size": 101,
        "d_model": 32,
        "n_layers": 2,
        "n_heads": 4,
        "n_kv_heads": 2,
        "ffn_hidden": 64,
        "attn_backend": "sdpa",
    }
    base.update(overrides)
    return ModelConfig(**base).validate()


def hf_llama(seed: int, **shape) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=131,
        intermediate_size=80,
        num_hidden_layers=3,
        max_position_embeddings=64,
        rms_norm_eps=1e-5,
        rope_theta=5000.0,
        initializer_range=0.1,
        attn_implementation="eager",
        **shape,
    )
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():  # HF inits norms to 1: randomise them so the norm weights are tested too
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
    return model


@pytest.mark.parametrize("case", range(len(LLAMA_CASES)))
def test_logits_and_loss_match_hf_llama(case: int):
    hf = hf_llama(case, **LLAMA_CASES[case])
    cfg = config_from_hf(hf.config)
    cfg.attn_backend = "sdpa"
    ours = Transformer(cfg).eval()
    load_into(ours, state_dict_from_hf(hf.state_dict(), cfg))
    if cfg.tie_embeddings:
        assert ours.lm_head.weight is ours.embed.weight

    g = torch.Generator().manual_seed(100 + case)
    tokens = torch.randint(0, cfg.vocab_size, (2, 24), generator=g)
    hf_labels = tokens.clone()
    hf_labels[0, 5:9] = -100  # some ignored targets
    labels = torch.full_like(tokens, -100)
    labels[:, :-1] = hf_labels[:, 1:]  # ours are pre-shifted: labels[t] is the target of position t

    with torch.no_grad():
        ref = hf(tokens, labels=hf_labels)
        out = ours(tokens, labels)
        logits = ours(tokens).logits
    assert out.logits is None  # the loss ran fused with the LM head
    assert (logits - ref.logits).abs().max().item() < 1e-5
    assert abs(out.loss.item() - ref.loss.item()) < 1e-5
    assert out.aux_loss.item() == 0.0 and out.loss.item() == out.ce_loss.item()

    # Export gives back exactly HF's tensors.
    exported = state_dict_to_hf(ours.state_dict(), cfg)
    hf_sd = hf.state_dict()
    if cfg.tie_embeddings:
        hf_sd.pop("lm_head.weight")
    assert sorted(exported) == sorted(hf_sd)
    assert all(torch.equal(exported[k], hf_sd[k]) for k in hf_sd)


def naive_causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Textbook causal softmax attention on [B, T, H, Dh] with k/v heads repeated per group."""
    groups = q.shape[2] // k.shape[2]
    k = k.repeat_interleave(groups, dim=2)
    v = v.repeat_interleave(groups, dim=2)
    scores = torch.einsum("bthd,bshd->bhts", q, k) / math.sqrt(q.shape[-1])
    seq = q.shape[1]
    mask = torch.ones(seq, seq, dtype=torch.bool).triu(1)
    probs = scores.masked_fill(mask, float("-inf")).softmax(-1)
    return torch.einsum("bhts,bshd->bthd", probs, v)


@pytest.mark.parametrize("kv_heads", [6, 2, 1])
def test_sdpa_matches_naive_attention(kv_heads: int):
    """In float64 on both sides: rounding in these 8- and 17-term sums is ~1e-15 of max|v|; a mask shifted by one,
    a wrong scale or k/v heads grouped wrongly are off by O(0.1)."""
    g = torch.Generator().manual_seed(kv_heads)
    q = torch.randn(2, 17, 6, 8, generator=g, dtype=torch.float64)
    k = torch.randn(2, 17, kv_heads, 8, generator=g, dtype=torch.float64)
    v = torch.randn(2, 17, kv_heads, 8, generator=g, dtype=torch.float64)
    out = causal_attention(q, k, v, "sdpa")
    assert (out - naive_causal_attention(q, k, v)).abs().max().item() <= 64 * gamma(17 + 8, U64) * v.abs().max()


def test_flash_attn_request_without_flash_attn_is_a_clear_error():
    if attention_mod.flash_attn_available():
        pytest.skip("flash_attn is installed here")
    with pytest.raises(ConfigError, match="flash_attn.*not importable"):
        Transformer(tiny_cfg(attn_backend="flash_attn"))
    assert attention_mod.resolve_backend("auto", torch.zeros(1)) == "sdpa"


def test_init_is_deterministic_and_scaled():
    cfg = tiny_cfg(n_layers=8, d_model=128, ffn_hidden=256)
    torch.manual_seed(3)
    a = Transformer(cfg)
    torch.manual_seed(3)
    b = Transformer(cfg)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    std = cfg.init_std
    assert abs(a.layers[0].mixer.q_proj.weight.std().item() - std) < 0.1 * std
    out_std = std / math.sqrt(2 * cfg.n_layers)
    assert abs(a.layers[0].ffn.down_proj.weight.std().item() - out_std) < 0.1 * out_std
    assert torch.equal(a.norm.weight, torch.ones_like(a.norm.weight))


def test_loss_ignores_masked_targets():
    torch.manual_seed(0)
    model = Transformer(tiny_cfg()).double()  # logits exact to float64; the loss rounds them to float32
    tokens = torch.randint(0, 101, (2, 8))
    labels = torch.randint(0, 101, (2, 8))
    labels[1] = -100
    out = model(tokens, labels)
    logits = model(tokens).logits[0].double()
    expected = torch.nn.functional.cross_entropy(logits, labels[0])  # float64: only row 0 counts
    # The float32 loss is within the bound of its log-softmax and 8-term mean of the exact one; counting row 1's
    # ignored targets would move it by O(1).
    nll = torch.nn.functional.cross_entropy(logits, labels[0], reduction="none")
    bound = float(log_softmax_error(logits).mean() + (gamma(16) + 2 * U32) * nll.mean())
    assert abs(out.loss.item() - expected.item()) <= bound, (out.loss.item(), expected.item(), bound)
    all_ignored = model(tokens, torch.full_like(labels, -100)).loss
    assert all_ignored.item() == 0.0
    assert model(tokens).loss is None


def test_activation_checkpointing_gives_identical_grads():
    cfg = tiny_cfg()
    torch.manual_seed(1)
    plain = Transformer(cfg)
    ckpt_cfg = tiny_cfg(activation_checkpointing=True)
    torch.manual_seed(1)
    ckpt = Transformer(ckpt_cfg)
    calls = []
    ckpt.layers[0].mixer.register_forward_hook(lambda *_: calls.append(1))
    tokens = torch.randint(0, 101, (2, 12))
    labels = torch.randint(0, 101, (2, 12))
    plain(tokens, labels).loss.backward()
    loss = ckpt(tokens, labels).loss
    assert len(calls) == 1
    loss.backward()
    assert len(calls) == 2, "the checkpointed block must be recomputed in backward"
    for (name, p), q in zip(plain.named_parameters(), ckpt.parameters()):
        assert torch.equal(p.grad, q.grad), name


@pytest.mark.parametrize("tied", [False, True])
def test_param_counts_match_built_model(tied: bool):
    cfg = tiny_cfg(tie_embeddings=tied, head_dim=12)
    model = Transformer(cfg)
    counts = param_counts(cfg)
    assert counts["total"] == model.num_params() == counts["active"]
    assert counts["nonembedding"] == model.num_params(exclude_embedding=True) == counts["active_nonembedding"]
    assert counts["embedding"] == model.embed.weight.numel()
    linear_weights = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
    assert matmul_params_per_token(cfg) == linear_weights  # includes the head, tied or not


def test_flops_per_token_matches_torch_flop_counter():
    """Forward+backward matmul FLOPs counted by torch equal the analytic count (math SDPA charges full T x T)."""
    cfg = tiny_cfg(n_kv_heads=1)
    torch.manual_seed(0)
    model = Transformer(cfg)
    batch, seq = 2, 16
    tokens = torch.randint(0, cfg.vocab_size, (batch, seq))
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        model(tokens, tokens).loss.backward()
    assert counter.get_total_flops() == flops_per_token(cfg, seq) * batch * seq


def test_model_yaml_configs():
    files = sorted(CONF_DIR.glob("*.yaml"))
    names = {f.stem for f in files}
    assert {
        "dense_tiny",
        "dense_125m",
        "dense_350m",
        "dense_1b",
        "moe_tiny",
        "moe_8x1b",
        "hybrid_tiny",
        "jamba_1b",
    } <= names
    sizes = {}
    for f in files:
        cfg = ModelConfig.from_dict(yaml.safe_load(f.read_text()))
        assert cfg.name == f.stem
        sizes[cfg.name] = param_counts(cfg)
        if cfg.name.endswith("_tiny"):
            assert cfg.vocab_size == 8000
    # The names promise sizes: check they hold within 15%.
    for name, target in (("dense_125m", 125e6), ("dense_350m", 350e6), ("dense_1b", 1e9), ("jamba_1b", 1e9)):
        assert abs(sizes[name]["total"] / target - 1) < 0.15, (name, sizes[name]["total"])
    jamba = ModelConfig.from_dict(yaml.safe_load((CONF_DIR / "jamba_1b.yaml").read_text()))
    assert sum(jamba.is_attention_layer(i) for i in range(jamba.n_layers)) * 8 == jamba.n_layers
    # dense_tiny builds and runs on CPU.
    tiny = ModelConfig.from_dict(yaml.safe_load((CONF_DIR / "dense_tiny.yaml").read_text()))
    model = Transformer(tiny)
    assert model.num_params() == sizes["dense_tiny"]["total"]
    out = model(torch.randint(0, tiny.vocab_size, (1, 32)), torch.randint(0, tiny.vocab_size, (1, 32)))
    assert abs(out.loss.item() - math.log(tiny.vocab_size)) < 0.5  # near-uniform predictions at init
