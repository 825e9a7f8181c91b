"""MoE and hybrid families against transformers' Mixtral and Jamba (pure-PyTorch path): import, export, counts."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import yaml
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode
from transformers import AutoModelForCausalLM, JambaConfig, JambaForCausalLM, MixtralConfig, MixtralForCausalLM

from model.config import ModelConfig
from model.convert import (
    config_from_hf,
    config_to_hf,
    load_into,
    save_model_dir,
    state_dict_from_hf,
    state_dict_to_hf,
    to_hf_dir,
)
from model.flops import flops_per_token, mamba_scan_flops_per_token, matmul_params_per_token, param_counts
from model.transformer import Transformer

COMMON = {
    "vocab_size": 89,
    "hidden_size": 32,
    "intermediate_size": 48,
    "num_attention_heads": 4,
    "initializer_range": 0.1,
}
MIXTRAL_CASES = {
    "gqa_top2": {"num_hidden_layers": 2, "num_key_value_heads": 2, "num_local_experts": 4, "num_experts_per_tok": 2},
    "mha_top1_tied": {
        "num_hidden_layers": 2,
        "num_key_value_heads": 4,
        "num_local_experts": 3,
        "num_experts_per_tok": 1,
        "tie_word_embeddings": True,
    },
}
JAMBA_CASES = {
    "no_moe": {
        "num_hidden_layers": 4,
        "num_key_value_heads": 2,
        "num_experts": 1,
        "attn_layer_period": 2,
        "attn_layer_offset": 1,
    },
    "moe_every_other": {
        "num_hidden_layers": 4,
        "num_key_value_heads": 2,
        "num_experts": 4,
        "num_experts_per_tok": 2,
        "expert_layer_period": 2,
        "expert_layer_offset": 1,
        "attn_layer_period": 2,
        "attn_layer_offset": 1,
    },
    "moe_all_top1_tied": {
        "num_hidden_layers": 3,
        "num_key_value_heads": 1,
        "num_experts": 3,
        "num_experts_per_tok": 1,
        "expert_layer_period": 1,
        "expert_layer_offset": 0,
        "attn_layer_period": 3,
        "attn_layer_offset": 2,
        "tie_word_embeddings": True,
        "mamba_d_state": 4,
    },
}
SEQ = 20
CONF_DIR = Path(__file__).resolve().parents[1] / "conf" / "model"


def hf_config(family: str, case: str):
    if family == "mixtral":
        return MixtralConfig(**COMMON, **MIXTRAL_CASES[case], attn_implementation="eager")
    return JambaConfig(
        **COMMON, **JAMBA_CASES[case], use_mamba_kernels=False, attn_implementation="eager", use_cache=False
    )


@torch.no_grad()
def randomise_non_matmul(model: torch.nn.Module, seed: int) -> None:
    """HF/our init leaves norms at 1, biases at 0 and A_log/D at fixed values: randomise them so they are tested."""
    g = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        if name.endswith(("norm.weight", ".D")):
            p.copy_(torch.rand(p.shape, generator=g) + 0.5)
        elif name.endswith((".bias", "A_log")):
            p.add_(torch.randn(p.shape, generator=g) * 0.3)


def tokens_and_labels(vocab: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, vocab, (2, SEQ), generator=g)
    labels = torch.full_like(tokens, -100)
    labels[:, :-1] = tokens[:, 1:]
    return tokens, labels


def ours_for(cfg) -> Transformer:
    cfg.attn_backend = "sdpa"
    cfg.mamba_chunk_size = 8  # several scan chunks at SEQ=20
    return Transformer(cfg).eval()


CASES = [("mixtral", c) for c in MIXTRAL_CASES] + [("jamba", c) for c in JAMBA_CASES]
HF_CLASS = {"mixtral": MixtralForCausalLM, "jamba": JambaForCausalLM}


@pytest.mark.parametrize("family,case", CASES)
def test_import_from_hf_matches_logits_and_loss(family: str, case: str):
    torch.manual_seed(0)
    hf = HF_CLASS[family](hf_config(family, case)).eval()
    randomise_non_matmul(hf, 1)
    cfg = config_from_hf(hf.config)
    ours = ours_for(cfg)
    load_into(ours, state_dict_from_hf(hf.state_dict(), cfg))
    tokens, labels = tokens_and_labels(cfg.vocab_size, 2)
    with torch.no_grad():
        ref = hf(tokens, labels=tokens)
        out = ours(tokens, labels)
        logits = ours(tokens).logits
    assert (logits - ref.logits).abs().max().item() < 1e-5
    assert abs(out.ce_loss.item() - ref.loss.item()) < 1e-5
    assert out.aux_loss.item() > 0 if cfg.num_experts else out.aux_loss.item() == 0


@pytest.mark.parametrize("family,case", CASES)
def test_export_to_hf_matches_logits(family: str, case: str):
    cfg = config_from_hf(hf_config(family, case))
    torch.manual_seed(3)
    ours = ours_for(cfg)
    randomise_non_matmul(ours, 4)
    hf_sd = state_dict_to_hf(ours.state_dict(), cfg)
    hf = HF_CLASS[family](config_to_hf(cfg)).eval()
    result = hf.load_state_dict(hf_sd, strict=False)
    assert result.missing_keys == (["lm_head.weight"] if cfg.tie_embeddings else []) and not result.unexpected_keys
    tokens, _ = tokens_and_labels(cfg.vocab_size, 5)
    with torch.no_grad():
        assert (ours(tokens).logits - hf(tokens).logits).abs().max().item() < 1e-5


@pytest.mark.parametrize("family,case", [("mixtral", "gqa_top2"), ("jamba", "moe_every_other")])
def test_to_hf_directory_loads_with_auto_model(tmp_path: Path, family: str, case: str):
    cfg = config_from_hf(hf_config(family, case))
    torch.manual_seed(5)
    ours = ours_for(cfg)
    save_model_dir(ours, cfg, tmp_path / "ours")
    to_hf_dir(tmp_path / "ours", tmp_path / "hf")
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    assert type(hf) is HF_CLASS[family]
    tokens, _ = tokens_and_labels(cfg.vocab_size, 6)
    with torch.no_grad():
        assert (ours(tokens).logits - hf(tokens).logits).abs().max().item() < 1e-5

    # A trained aux-loss-free selection bias has no HF equivalent: refuse unless told to drop it.
    with torch.no_grad():
        ours.moe_layers()[0].expert_bias[0] = 0.5
    save_model_dir(ours, cfg, tmp_path / "biased")
    with pytest.raises(ValueError, match="expert_bias.*--drop-expert-bias"):
        to_hf_dir(tmp_path / "biased", tmp_path / "hf2")
    to_hf_dir(tmp_path / "biased", tmp_path / "hf2", drop_expert_bias=True)


@pytest.mark.parametrize("family,case", CASES)
def test_param_counts_match_built_model(family: str, case: str):
    cfg = config_from_hf(hf_config(family, case))
    model = ours_for(cfg)
    counts = param_counts(cfg)
    assert counts["total"] == model.num_params()
    assert counts["nonembedding"] == model.num_params(exclude_embedding=True)
    # Active = everything except the (num_experts - top_k) unused experts' weights in each MoE layer.
    inactive = sum(
        (cfg.num_experts - cfg.top_k) * (moe.w1[0].numel() + moe.w2[0].numel() + moe.w3[0].numel())
        for moe in model.moe_layers()
    )
    assert counts["active"] == model.num_params() - inactive
    assert len(model.moe_layers()) == sum(cfg.is_moe_layer(i) for i in range(cfg.n_layers))


@pytest.mark.parametrize("family,case", CASES)
def test_flops_per_token_decomposition(family: str, case: str):
    """Matmul part from the built model's linear/expert weights; attention and scan terms as documented."""
    cfg = config_from_hf(hf_config(family, case))
    model = ours_for(cfg)
    dense = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
    routed = sum(cfg.top_k * (moe.w1[0].numel() + moe.w2[0].numel() + moe.w3[0].numel()) for moe in model.moe_layers())
    assert matmul_params_per_token(cfg) == dense + routed
    n_attn = sum(b.is_attention for b in model.layers)
    n_mamba = cfg.n_layers - n_attn
    expected = 6 * (dense + routed) + 12 * n_attn * SEQ * cfg.n_heads * cfg.resolved_head_dim
    expected += 3 * n_mamba * mamba_scan_flops_per_token(cfg)
    assert flops_per_token(cfg, SEQ) == expected


def test_moe_flops_match_torch_flop_counter():
    """Dropless top-k MoE: torch counts exactly 6 x (router + k experts) per token plus the attention term."""
    cfg = config_from_hf(hf_config("mixtral", "gqa_top2"))
    torch.manual_seed(0)
    model = ours_for(cfg).train()
    tokens, labels = tokens_and_labels(cfg.vocab_size, 7)
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        model(tokens, labels).loss.backward()
    assert counter.get_total_flops() == flops_per_token(cfg, SEQ) * tokens.numel()


@pytest.mark.parametrize("name", ["moe_tiny", "hybrid_tiny"])
def test_tiny_yaml_models_train_and_checkpoint(name: str):
    """The shipped tiny MoE/hybrid configs build and export; checkpointing recomputes the same kernels on the same
    inputs, so its gradients are bit-identical; and an SGD step along them lowers the loss by what the gradients
    predict to first order, lr * ||g||^2 (float64 weights), which a gradient scaled wrongly, with a sign flipped or
    missing a block's share would not."""
    raw = yaml.safe_load((CONF_DIR / f"{name}.yaml").read_text())
    cfg = ModelConfig.from_dict(raw)
    config_to_hf(cfg)  # exportable to Mixtral / Jamba as shipped
    grads, models, losses = [], [], []
    tokens, labels = tokens_and_labels(cfg.vocab_size, 8)
    for checkpointing in (False, True):
        torch.manual_seed(0)
        model = Transformer(ModelConfig.from_dict({**raw, "activation_checkpointing": checkpointing})).double()
        assert model.num_params() == param_counts(cfg)["total"]
        out = model(tokens, labels)
        assert out.aux_loss.item() > 0
        out.loss.backward()
        grads.append([p.grad for p in model.parameters()])
        models.append(model)
        losses.append(out.loss.item())
    for a, b in zip(*grads):
        assert torch.equal(a, b)
    assert all(g.abs().sum() > 0 for g in grads[0])
    # A step of length 1e-3: the second-order term, lr/2 g'Hg / ||g||^2, is ~1e-3 of the first-order one here, and
    # the loss's float32 rounding (~9 * 2**-24 per evaluation) is below 1e-3 of lr * ||g||^2.
    model = models[1]
    g2 = sum(float(g.square().sum()) for g in grads[1])
    lr = 1e-3 / math.sqrt(g2)
    torch.optim.SGD(model.parameters(), lr=lr).step()
    with torch.no_grad():
        after = model(tokens, labels).loss.item()
    predicted = lr * g2
    assert abs((losses[1] - after) - predicted) <= 0.01 * predicted, (losses[1] - after, predicted)
