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
from tests.rounding import U32, U64, gamma, log_softmax_error

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


def _error_bounds(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, chunk: int, upstream: float,
                  ) -> tuple[float, torch.Tensor, torch.Tensor]:
    """Bounds on the fused loss's error against the exact (float64) values, from its float32 arithmetic: each
    row's log-probabilities are off by at most e_i (`tests.rounding.log_softmax_error`), so the probabilities by
    p (e_i + 2u) (the exponential's rounding) and the gradient of the logits, softmax - one-hot, by
    (e_i + 3u)(p + onehot); the loss sums the rows' -log p in float32 (gamma(N) of their magnitudes) and the head's
    gradient sums the chunks' float32 partial products (gamma(chunks) of theirs); scaling by 1/count and by the
    upstream gradient rounds by u each."""
    logits = hidden @ weight.t()
    valid = labels != IGNORE_INDEX
    count = int(valid.sum())
    logp = torch.log_softmax(logits, dim=-1)
    onehot = F.one_hot(labels.clamp(min=0), V).double() * valid[:, None]
    row_err = log_softmax_error(logits) * valid
    nll = -(logp * onehot).sum(dim=-1)
    loss_err = (row_err.sum() + gamma(N) * nll.sum()) / count + 2 * U32 * nll.sum() / count
    dlogits_err = (row_err + 3 * U32)[:, None] * (logp.exp() + onehot) * valid[:, None] / count
    dlogits = (logp.exp() - onehot) * valid[:, None] / count
    dh_err = dlogits_err @ weight.abs() + gamma(V, U64) * (dlogits.abs() @ weight.abs())
    chunks = -(-N // chunk)
    dw_err = (dlogits_err.t() @ hidden.abs() + gamma(chunks + 1) * (dlogits.abs().t() @ hidden.abs()))
    rounding = 2 * U32 * abs(upstream)  # the scalings
    return loss_err, (dh_err + rounding) * abs(upstream), (dw_err + rounding) * abs(upstream)


@pytest.mark.parametrize("upstream", [1.0, 3.0])
@pytest.mark.parametrize("chunk", [1, 8, N, 1000])
def test_fused_loss_and_gradients_equal_cross_entropy_on_full_logits(chunk, upstream):
    """Within the float32 error bounds of `_error_bounds` (the loss ~3e-6 relative here); a chunk dropped, a row
    counted twice or a wrong 1/count is off by 1/26 or more."""
    hidden, weight, labels = _inputs()
    want, want_dh, want_dw = _reference(hidden, weight, labels)
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    loss = linear_cross_entropy(h, w, labels, chunk)
    (upstream * loss).backward()  # 1: the stored gradients as they are; otherwise scaled
    loss_err, dh_err, dw_err = _error_bounds(hidden, weight, labels, chunk, upstream)
    assert abs(loss.double() - want) <= loss_err, (float(loss), float(want), loss_err)
    assert ((h.grad - upstream * want_dh).abs() <= dh_err).all()
    assert ((w.grad - upstream * want_dw).abs() <= dw_err).all()


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


def test_model_loss_fused_equals_full_logits_for_a_tied_head():
    """A tied head, float64 weights: both paths round the logits to float32 for the softmax, so each loss is within
    the float32 bound of the exact one (twice the bound apart at most), and each gradient of the logits within
    max_i e_i + 3u of the exact one relative to the probabilities' scale (``log_softmax_error``); backward is
    float64 and linear in that gradient, so the parameters' gradients agree to a few times that, far inside
    rtol 1e-4 (a missing tied-head share or chunk changes them by O(1))."""
    base = {"vocab_size": 101, "d_model": 32, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "ffn_hidden": 64,
            "max_seq_len": 32, "tie_embeddings": True, "attn_backend": "sdpa"}
    grads = {}
    tokens = torch.randint(0, 101, (3, 11), generator=torch.Generator().manual_seed(1))
    labels = tokens.roll(-1, 1)
    labels[:, -1] = IGNORE_INDEX
    for chunk in (None, 5):
        torch.manual_seed(0)
        model = Transformer(ModelConfig(**base, loss_chunk_tokens=chunk)).double()
        out = model(tokens, labels)
        out.loss.backward()
        assert (out.logits is None) == (chunk is not None)
        grads[chunk] = (out.loss.detach(), {n: p.grad for n, p in model.named_parameters()})
    with torch.no_grad():
        logits = model(tokens).logits.reshape(-1, 101)[labels.reshape(-1) != IGNORE_INDEX]
    row_err = log_softmax_error(logits)
    nll = F.cross_entropy(logits, labels.reshape(-1)[labels.reshape(-1) != IGNORE_INDEX], reduction="none")
    loss_bound = (row_err.sum() + (gamma(nll.numel()) + 2 * U32) * nll.sum()) / nll.numel()
    assert float(row_err.max()) < 1e-5  # the premise of rtol 1e-4 on the gradients
    (l0, g0), (l1, g1) = grads[None], grads[5]
    assert abs(l0 - l1) <= 2 * loss_bound, (float(l0), float(l1), float(loss_bound))
    for name in g0:
        assert torch.allclose(g0[name], g1[name], rtol=1e-4, atol=1e-4 * float(g0[name].abs().max())), name


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
