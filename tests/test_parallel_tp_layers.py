"""Megatron-style tensor parallelism (`train.parallel.tp.apply_tensor_parallel`) on 2 gloo ranks against the
single-device model, for every family (dense, dense with tied embeddings, MoE, hybrid with Mamba, attention and
MoE layers), with and without sequence parallelism: loss (fused with the vocabulary-parallel head, and on sharded
logits), aux loss, every gradient (shards gathered with their
`train.parallel.shard` records), parameter and state-dict names, per-rank parameter bytes; with SP also the
residual stream's shape and the activation bytes a block saves for backward.

Ranks are forked from the test process after it imported torch and megatron-core (~7 s, paid once).
"""

from __future__ import annotations

import copy
import dataclasses
import os
import threading
import traceback
from typing import Any

import megatron.core.tensor_parallel  # noqa: F401  (imported before forking, once)
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from megatron.core import parallel_state

from model.config import ModelConfig
from model.loss import IGNORE_INDEX
from model.moe import MoE
from model.transformer import Transformer
from tests.utils import free_port
from train.parallel.shard import shard_of
from train.parallel.tp import TensorParallelExperts, apply_tensor_parallel

WORLD = 2
B, T = 2, 16
BASE = {"vocab_size": 256, "d_model": 64, "n_heads": 4, "n_kv_heads": 2, "ffn_hidden": 96, "max_seq_len": 64,
        "n_layers": 2, "attn_backend": "sdpa", "aux_loss_coeff": 0.01, "z_loss_coeff": 0.001}
FAMILIES = {
    "dense": {"family": "dense"},
    "dense_tied": {"family": "dense", "tie_embeddings": True},
    "moe": {"family": "moe", "num_experts": 4, "top_k": 2},
    # layer 0: Mamba + SwiGLU, layer 1: attention + MoE (Jamba's pattern, no RoPE); biases on the Mamba projections
    "hybrid": {"family": "hybrid", "num_experts": 4, "top_k": 2, "moe_renormalize": False, "use_rope": False,
               "expert_layer_period": 2, "expert_layer_offset": 1, "attn_layer_period": 2, "attn_layer_offset": 1,
               "mamba_d_state": 8, "mamba_chunk_size": 4, "mamba_proj_bias": True},
}
# Activation checkpointing recomputes the SP gathers in backward.
FAMILIES["hybrid_ckpt"] = {**FAMILIES["hybrid"], "activation_checkpointing": True}
CASES = [(f, sp) for f in FAMILIES if f != "hybrid_ckpt" for sp in (False, True)] + [("hybrid_ckpt", True)]
REL_TOL = 1e-5
MAX_PARAM_BYTES = 0.55
MAX_SP_SAVED = 0.85
FUSED_CHUNK = 7  # the TP model's loss runs fused with its head, 7 tokens a chunk (the last one short)


def _cfg(family: str) -> ModelConfig:
    return ModelConfig(**BASE, **FAMILIES[family], loss_chunk_tokens=None)


class RecordingMoE(MoE):
    """A subclass of MoE standing in for expert parallelism's: the TP class switch must wrap its experts too."""

    def _run_experts(self, grouped: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        self.calls = getattr(self, "calls", 0) + 1
        return super()._run_experts(grouped, counts)


def _tp_model(family: str, sp: bool) -> tuple[Transformer, Transformer]:
    torch.manual_seed(0)
    ref = Transformer(_cfg(family))
    model = copy.deepcopy(ref)
    model.cfg = dataclasses.replace(ref.cfg, loss_chunk_tokens=FUSED_CHUNK)
    model.lm_head.chunk_tokens = FUSED_CHUNK
    for block in model.layers:
        if block.is_moe:
            block.ffn.__class__ = RecordingMoE
    group = parallel_state.get_tensor_model_parallel_group()
    apply_tensor_parallel(model, group, dist.get_rank(group), WORLD, sp)
    return ref, model


def _full(local: torch.Tensor, param: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """The single-device tensor assembled from every TP rank's ``local`` (the slice recorded on ``param``)."""
    shard = shard_of(param)
    if shard.is_full(tuple(param.shape)):
        return local
    full = local.new_zeros(shard.global_shape)
    full[shard.slices(tuple(local.shape))] = local
    dist.all_reduce(full, group=parallel_state.get_tensor_model_parallel_group())
    return full.reshape(like.shape)  # Mamba's in_proj is recorded as a slice of its [2, d_inner, D] view


def _nbytes(model: torch.nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


def _check_family(family: str, sp: bool) -> dict[str, Any]:
    ref, model = _tp_model(family, sp)
    rows_seen = []
    for block in model.layers:
        block.mixer_norm.register_forward_pre_hook(lambda m, args: rows_seen.append(args[0].shape[1]))
    gen = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, BASE["vocab_size"], (B, T), generator=gen)
    labels = torch.randint(0, BASE["vocab_size"], (B, T), generator=gen)
    labels[torch.rand(B, T, generator=gen) < 0.25] = IGNORE_INDEX
    labels[:, 0] = IGNORE_INDEX

    want = ref(tokens, labels=labels)
    want.loss.backward()
    got = model(tokens, labels=labels)
    got.loss.backward()

    for key in ("loss", "ce_loss", "aux_loss"):
        g, w = getattr(got, key).item(), getattr(want, key).item()
        assert abs(g - w) <= REL_TOL * abs(w) + 1e-12, (key, g, w)
    with torch.no_grad():  # the pieces a pipeline stage calls, one at a time
        x, rope = model.embed(tokens), model.rope_tables(T, tokens.device)
        for block in model.layers:
            x, _ = block(x, rope)
        h = model.norm(x)
        staged = model.loss_fn(model.lm_head(h), labels).item()  # the vocab-parallel loss on sharded logits
        staged_fused = model.head_loss(h, labels)[1].item()
    for value in (staged, staged_fused):
        assert abs(value - want.ce_loss.item()) <= REL_TOL * want.ce_loss.item(), (value, want.ce_loss.item())
    assert got.logits is None and model(tokens).logits.shape == (B, T, BASE["vocab_size"] // WORLD)
    if sp and family == "dense":  # raised by the embedding's split, on every rank alike
        with pytest.raises(ValueError, match="seq_len divisible by tp=2"):
            model(tokens[:, :-1])
    # (activation checkpointing runs every block's forward again in backward)
    assert len(rows_seen) >= len(model.layers) and set(rows_seen) == {T // WORLD if sp else T}, rows_seen
    assert [n for n, _ in model.named_parameters()] == [n for n, _ in ref.named_parameters()]
    assert list(model.state_dict()) == list(ref.state_dict())
    for moe in [b.ffn for b in model.layers if b.is_moe]:
        assert type(moe).__name__ == "TensorParallelRecordingMoE" and isinstance(moe, TensorParallelExperts)
        assert moe.calls >= 1
    ratio = _nbytes(model) / _nbytes(ref)
    assert ratio <= MAX_PARAM_BYTES, ratio

    ref_params = dict(ref.named_parameters())
    worst = 0.0
    for name, p in model.named_parameters():
        r = ref_params[name]
        sharded = not shard_of(p).is_full(tuple(p.shape))
        assert getattr(p, "tensor_model_parallel", False) == sharded, name
        seq_rows_only = sp and name.endswith(("mixer_norm.weight", "ffn_norm.weight", "out_proj.bias"))
        assert getattr(p, "sequence_parallel", False) == (seq_rows_only or name == "norm.weight" and sp), name
        assert torch.equal(_full(p.detach(), p, r), r.detach()), f"{name}: weights differ from the single device's"
        grad = _full(p.grad, p, r)
        err, scale = (grad - r.grad).abs().max().item(), r.grad.abs().max().item()
        assert err <= REL_TOL * scale, f"{name}: gradient max abs err {err:.2e}, max |ref grad| {scale:.2e}"
        worst = max(worst, err / scale if scale else 0.0)
    return {"param_bytes_ratio": ratio, "worst_grad_err": worst}


def _saved_activation_bytes(model: Transformer, layer: int, sp: bool) -> int:
    """Bytes of the distinct activation storages one block saves for backward (parameters excluded)."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        s = t.untyped_storage()
        if s.data_ptr() not in params:
            storages[s.data_ptr()] = s.nbytes()
        return t

    x = torch.randn(B, T // WORLD if sp else T, model.cfg.d_model, requires_grad=True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model.layers[layer](x, model.rope_tables(T, x.device))
    return sum(storages.values())


def _saved_ratios() -> dict[str, float]:
    ratios = {}
    for label, family, layer in (("attention+mlp", "dense", 0), ("mamba+mlp", "hybrid", 0),
                                 ("attention+moe", "hybrid", 1)):
        no_sp, with_sp = (_saved_activation_bytes(_tp_model(family, sp)[1], layer, sp) for sp in (False, True))
        ratios[label] = with_sp / no_sp
    return ratios


def _worker(rank: int, port: int, results: Any) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=WORLD)
    try:
        for family, sp in CASES:
            try:
                results.put((rank, (family, sp), _check_family(family, sp)))
            except Exception:  # noqa: BLE001  (reported by the test of this case)
                results.put((rank, (family, sp), {"error": traceback.format_exc()}))
        try:
            results.put((rank, "saved", _saved_ratios()))
        except Exception:  # noqa: BLE001
            results.put((rank, "saved", {"error": traceback.format_exc()}))
    finally:
        parallel_state.destroy_model_parallel()
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def tp_results() -> dict[Any, list[dict[str, Any]]]:
    # Forking is safe only while this process has no other thread (fresh interpreters then: ~10 s more).
    ctx = mp.get_context("fork" if threading.active_count() == 1 else "spawn")
    queue = ctx.SimpleQueue()
    port = free_port()
    procs = [ctx.Process(target=_worker, args=(r, port, queue)) for r in range(WORLD)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(180)
    for p in procs:
        if p.is_alive():
            os.kill(p.pid, 9)
    out: dict[Any, list[dict[str, Any]]] = {}
    while not queue.empty():
        _rank, key, value = queue.get()
        out.setdefault(key, []).append(value)
    assert [p.exitcode for p in procs] == [0] * WORLD, (out, [p.exitcode for p in procs])
    return out


@pytest.mark.parametrize(("family", "sp"), CASES, ids=[f"{f}-{'sp' if sp else 'tp'}" for f, sp in CASES])
def test_tensor_parallel_matches_single_device(tp_results, family, sp):
    per_rank = tp_results.get((family, sp), [])
    assert len(per_rank) == WORLD, per_rank
    errors = [r["error"] for r in per_rank if "error" in r]
    assert not errors, "\n".join(errors)


def test_sequence_parallel_saves_activation_memory(tp_results):
    per_rank = tp_results["saved"]
    assert not [r for r in per_rank if "error" in r], per_rank
    ratios = per_rank[0]
    print("saved-for-backward bytes, SP / no SP at TP2:", ratios)
    assert all(r < 1.0 for r in ratios.values()), ratios
    assert ratios["attention+mlp"] <= MAX_SP_SAVED, ratios
