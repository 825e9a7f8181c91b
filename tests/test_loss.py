"""The LM head fused with the cross entropy (`model.loss.linear_cross_entropy`) against ``F.cross_entropy`` on the
full logits: loss and the gradients of the hidden states and of the head weight, for chunk sizes that do and do not
divide the tokens, ignored labels, a tied head, and the memory it keeps for backward."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from model.config import ModelConfig
from model.loss import IGNORE_INDEX, linear_cross_entropy
from model.transformer import Transformer

N, D, V = 37, 16, 50


def _inputs(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(N, D, generator=g, dtype=torch.float64)
    weight = torch.randn(V, D, generator=g, dtype=torch.float64) * 0.3
    labels = torch.randint(0, V, (N,), generator=g)
    labels[torch.rand(N, generator=g) < 0.3] = IGNORE_INDEX
    return hidden, weight, labels


def _reference(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor):
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    loss = F.cross_entropy(h @ w.t(), labels, ignore_index=IGNORE_INDEX)
    loss.backward()
    return loss.detach(), h.grad, w.grad


@pytest.mark.parametrize("upstream", [1.0, 3.0])
@pytest.mark.parametrize("chunk", [1, 8, N, 1000])
def test_fused_loss_and_gradients_equal_cross_entropy_on_full_logits(chunk, upstream):
    hidden, weight, labels = _inputs()
    want, want_dh, want_dw = _reference(hidden, weight, labels)
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    loss = linear_cross_entropy(h, w, labels, chunk)
    (upstream * loss).backward()  # 1: the stored gradients as they are; otherwise scaled
    assert torch.allclose(loss.double(), want, rtol=1e-6)  # the loss is accumulated in float32
    # float64 inputs, softmax in float32: within 1e-6 of the largest entry
    for got, want_grad in ((h.grad, upstream * want_dh), (w.grad, upstream * want_dw)):
        assert (got - want_grad).abs().max() <= 1e-6 * want_grad.abs().max()


def test_fused_loss_with_every_label_ignored_is_zero_with_zero_gradients():
    hidden, weight, _ = _inputs()
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    loss = linear_cross_entropy(h, w, torch.full((N,), IGNORE_INDEX), 8)
    loss.backward()
    assert loss.item() == 0.0 and not h.grad.any() and not w.grad.any()


def test_fused_loss_over_no_tokens_is_zero_with_zero_gradients():
    _, weight, _ = _inputs()
    h, w = torch.zeros(0, D, dtype=torch.float64, requires_grad=True), weight.clone().requires_grad_()
    loss = linear_cross_entropy(h, w, torch.zeros(0, dtype=torch.long), 8)
    loss.backward()
    assert loss.item() == 0.0 and h.grad.shape == (0, D) and not w.grad.any()


def test_model_loss_fused_equals_full_logits_for_a_tied_head_in_float32():
    base = {"vocab_size": 101, "d_model": 32, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "ffn_hidden": 64,
            "max_seq_len": 32, "tie_embeddings": True, "attn_backend": "sdpa"}
    grads = {}
    for chunk in (None, 5):
        torch.manual_seed(0)
        model = Transformer(ModelConfig(**base, loss_chunk_tokens=chunk))
        tokens = torch.randint(0, 101, (3, 11), generator=torch.Generator().manual_seed(1))
        labels = tokens.roll(-1, 1)
        labels[:, -1] = IGNORE_INDEX
        out = model(tokens, labels)
        out.loss.backward()
        assert (out.logits is None) == (chunk is not None)
        grads[chunk] = (out.loss.detach(), {n: p.grad for n, p in model.named_parameters()})
    (l0, g0), (l1, g1) = grads[None], grads[5]
    assert torch.allclose(l0, l1, rtol=1e-6)
    for name in g0:
        assert torch.allclose(g0[name], g1[name], rtol=1e-4, atol=1e-7), name


def test_fused_loss_keeps_no_logits_for_backward():
    """What autograd keeps after the forward: the fused loss holds the gradients it computed ([N, D] and [V, D]),
    never anything of size N x V; the unfused loss keeps the logits."""
    tokens, vocab, dim = 512, 4096, 32
    hidden = torch.randn(tokens, dim, requires_grad=True)
    weight = torch.randn(vocab, dim, requires_grad=True)
    labels = torch.randint(0, vocab, (tokens,))

    def saved_bytes(fn) -> int:
        sizes: dict[int, int] = {}

        def pack(t: torch.Tensor) -> torch.Tensor:
            sizes[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            fn()
        return sum(sizes.values())

    fused = saved_bytes(lambda: linear_cross_entropy(hidden, weight, labels, 128))
    full = saved_bytes(lambda: F.cross_entropy(hidden @ weight.t(), labels))
    assert fused <= (tokens + vocab) * dim * 4 + 1024, fused
    assert full >= tokens * vocab * 4, full
