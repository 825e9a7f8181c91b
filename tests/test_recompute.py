"""Activation checkpointing modes (none / full / selective) and torch.compile of the blocks.

Every mode gives the same loss and gradients; selective keeps at most 0.7x the activation bytes of none (measured
on the real forward with `train.saved_activations`), full keeps only the block input; a compiled model trains to
the eager losses."""

from __future__ import annotations

import pytest
import torch

from model.compile import compile_blocks
from model.config import ConfigError, ModelConfig
from model.transformer import Transformer
from tests.reference import micro_batch_reference
from tests.utils import TINY, run_train, train_losses
from train.saved_activations import saved_activation_bytes

B, T = 2, 32
HYBRID = {"family": "hybrid", "num_experts": 4, "top_k": 2, "moe_renormalize": False, "use_rope": False,
          "expert_layer_period": 2, "expert_layer_offset": 1, "attn_layer_period": 2, "attn_layer_offset": 1,
          "mamba_d_state": 8, "mamba_chunk_size": 8}
BLOCKS = {  # (config, layer): one block of each kind
    "attention+mlp": ({"family": "dense"}, 0),
    "attention+moe": ({"family": "moe", "num_experts": 4, "top_k": 2}, 0),
    "mamba+mlp": (HYBRID, 0),
}
MAX_SELECTIVE_RATIO = 0.7


def _cfg(mode: str, **kw) -> ModelConfig:
    return ModelConfig(vocab_size=128, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_hidden=128,
                       max_seq_len=64, attn_backend="sdpa", activation_checkpointing=mode, **kw)


def _block_run(kind: str, mode: str) -> tuple[int, torch.Tensor, dict[str, torch.Tensor], int]:
    extra, layer = BLOCKS[kind]
    torch.manual_seed(0)
    model = Transformer(_cfg(mode, **extra)).train()
    block = model.layers[layer]
    x = torch.randn(B, T, 64, generator=torch.Generator().manual_seed(1), requires_grad=True)
    rope = model.rope_tables(T, x.device)
    saved, (out, aux) = saved_activation_bytes(lambda: block(x, rope))
    loss = out.square().mean() + aux
    loss.backward()
    grads = {n: p.grad for n, p in block.named_parameters()} | {"input": x.grad}
    returned = out.untyped_storage().nbytes() + aux.untyped_storage().nbytes()
    return saved, loss.detach(), grads, returned


@pytest.mark.parametrize("kind", list(BLOCKS))
def test_checkpointing_modes_give_the_same_gradients_and_selective_saves_memory(kind):
    runs = {mode: _block_run(kind, mode) for mode in ("none", "selective", "full")}
    saved = {mode: r[0] for mode, r in runs.items()}
    print(kind, "saved bytes:", saved, "selective/none:", saved["selective"] / saved["none"])
    _, want_loss, want, returned = runs["none"]
    for mode in ("selective", "full"):
        _, loss, grads, _ = runs[mode]
        assert torch.equal(loss, want_loss)
        for name, g in want.items():
            assert torch.equal(grads[name], g), (mode, name)
    assert saved["selective"] <= MAX_SELECTIVE_RATIO * saved["none"], saved
    # The block's input existed before its forward: full keeps only what it returns (and MoE's few statistics).
    assert returned <= saved["full"] <= returned + 256, saved


def test_checkpointing_accepts_booleans_and_refuses_unknown_modes():
    assert _cfg(True).validate().activation_checkpointing == "full"
    assert _cfg(False).validate().activation_checkpointing == "none"
    with pytest.raises(ConfigError, match="model.activation_checkpointing"):
        _cfg("sometimes").validate()


def test_compiled_blocks_train_to_the_eager_losses():
    """Three AdamW steps of a hybrid (attention, Mamba, MoE) model under selective checkpointing: compiled blocks
    give the eager losses within 1e-5."""
    # Compiled in this process: with one compile thread inductor starts no worker pool, whose idle threads would
    # keep later tests from forking their ranks (tests/utils.run_train).
    with torch._inductor.config.patch(compile_threads=1):
        losses = _compiled_and_eager_losses()
    for eager, comp in zip(losses[False], losses[True], strict=True):
        assert abs(eager - comp) <= 1e-5 * abs(eager), losses


def _compiled_and_eager_losses() -> dict[bool, list[float]]:
    losses = {}
    for compiled in (False, True):
        torch.manual_seed(0)
        model = Transformer(_cfg("selective", **HYBRID)).train()
        if compiled:
            compile_blocks(model)
            for block in model.layers:  # an MoE layer stays eager inside its compiled block (model/compile.py)
                parts = [block.mixer, block.ffn_norm, block.ffn] if block.is_moe else [block]
                compiled_parts = [p._compiled_call_impl is not None for p in parts]
                assert compiled_parts == ([True, True, False] if block.is_moe else [True])
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        tokens = torch.randint(0, 128, (B, T + 1), generator=torch.Generator().manual_seed(2))
        losses[compiled] = []
        for _ in range(3):
            loss = model(tokens[:, :-1], labels=tokens[:, 1:]).loss
            loss.backward()
            opt.step()
            opt.zero_grad()
            losses[compiled].append(loss.item())
    return losses


@pytest.mark.slow
def test_trainer_with_compile_and_selective_checkpointing_matches_the_eager_reference(tmp_path, sample_data):
    """``train.compile=true model.activation_checkpointing=selective`` through the trainer (DeepSpeed engine, one
    rank): the eager single-process reference's losses within 1e-5."""
    overrides = [*TINY, "parallel=zero1", "train.steps=3", "train.global_batch_size=4", "train.micro_batch_size=2",
                 "train.seq_len=32", "train.ckpt_every=100", "model.activation_checkpointing=selective"]
    run_train([*overrides, "train.compile=true", f"run_dir={tmp_path}"], nproc=1)
    got = train_losses(tmp_path)
    want, _ = micro_batch_reference(overrides, 3)
    assert sorted(got) == [1, 2, 3]
    for step, ref in enumerate(want, start=1):
        assert abs(got[step] - ref["loss"]) <= 1e-5 * ref["loss"], (step, got[step], ref["loss"])
