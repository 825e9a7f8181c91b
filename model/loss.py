"""Causal-LM cross entropy, and the LM head fused with it so the [tokens, vocab] logits never exist at once.

`causal_lm_loss` takes logits. `linear_cross_entropy` takes the final hidden states and the head weight and walks
the tokens in chunks: per chunk it computes the logits in float32, the loss, and right away the gradients of the
hidden states and of the weight (softmax minus one-hot, times the weight / the hidden states), then drops the
chunk's logits. Backward only scales the stored gradients. No matmul is repeated (unlike recomputing chunked
logits in backward), and the activation memory of the loss is the hidden states' size instead of ``tokens x V``
floats, several times over (logits, their float32 copy, softmax), as in Liger-Kernel's fused linear cross entropy
(Hsu et al., 2024) and Apple's Cut Cross-Entropy (Wijmans et al., 2024).

With a vocabulary split over a process group (tensor parallelism: each rank holds rows
``[vocab_start, vocab_start + V_local)`` of the head), the row maximum, the sum of exponentials and the target
logit are all-reduced over the group per chunk (as Megatron's vocab-parallel cross entropy does), and the
gradient of the hidden states is this rank's partial sum, which the caller's tensor-parallel region reduces.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor

IGNORE_INDEX = -100


def causal_lm_loss(logits: Tensor, labels: Tensor) -> Tensor:
    """Mean cross entropy (float32) over the positions whose label is not -100.

    ``labels[b, t]`` is the target for position t, i.e. already shifted (``labels[:, t] = tokens[:, t + 1]``).
    If every label is ignored the loss is 0 rather than NaN.
    """
    flat_logits = logits.reshape(-1, logits.shape[-1]).float()
    flat_labels = labels.reshape(-1)
    total = F.cross_entropy(flat_logits, flat_labels, ignore_index=IGNORE_INDEX, reduction="sum")
    count = (flat_labels != IGNORE_INDEX).sum().clamp(min=1)
    return total / count


def _all_reduce(t: Tensor, op: Any, group: Any) -> Tensor:
    if group is not None:
        dist.all_reduce(t, op=op, group=group)
    return t


class _LinearCrossEntropy(torch.autograd.Function):
    """Mean cross entropy of ``hidden @ weight.T`` against ``labels``; gradients computed in forward, chunk by
    chunk (see the module docstring)."""

    @staticmethod
    def forward(ctx: Any, hidden: Tensor, weight: Tensor, labels: Tensor, chunk_tokens: int, vocab_start: int,
                group: Any) -> Tensor:
        needs_grad = ctx.needs_input_grad[0] or ctx.needs_input_grad[1]
        local_vocab = weight.shape[0]
        valid = labels != IGNORE_INDEX
        # Mean over the scored tokens: every chunk's gradient is scaled by the same 1 / count.
        scale = 1.0 / valid.sum().clamp(min=1).to(torch.float32)
        loss = torch.zeros((), dtype=torch.float32, device=hidden.device)
        grad_hidden = torch.empty_like(hidden) if needs_grad else None
        grad_weight = None
        for start in range(0, hidden.shape[0], chunk_tokens):
            rows = slice(start, start + chunk_tokens)
            h, target, ok = hidden[rows], labels[rows] - vocab_start, valid[rows]
            mine = ok & (target >= 0) & (target < local_vocab)  # this rank holds the target's row
            index = torch.where(mine, target, 0)[:, None]
            logits = (h @ weight.t()).float()  # [n, V_local]
            if group is None:
                # One fused pass per row (max, exponentials, sum); the big [n, V] array is read twice in all.
                logits = torch.log_softmax(logits, dim=-1)
                loss -= (logits.gather(1, index).squeeze(1) * mine).sum()
                probs = logits.exp_()  # in place: the log-probabilities are not needed any more
            else:
                row_max = _all_reduce(logits.detach().amax(dim=-1), dist.ReduceOp.MAX, group)
                logits -= row_max[:, None]
                target_logit = _all_reduce(logits.gather(1, index).squeeze(1) * mine, dist.ReduceOp.SUM, group)
                probs = logits.exp_()
                sum_exp = _all_reduce(probs.sum(dim=-1), dist.ReduceOp.SUM, group)
                loss += ((sum_exp.log() - target_logit) * ok).sum()
                probs /= sum_exp[:, None]
            if needs_grad:
                # d(loss)/d(logits) = (softmax - one_hot(target)) / count, zero on ignored rows. The per-row factor
                # is applied to the [n, D] operands and results of the two matmuls, not to the [n, V] array.
                probs.scatter_add_(1, index, -mine[:, None].to(probs.dtype))
                grad_logits = probs.to(hidden.dtype)
                row_scale = (ok * scale)[:, None].to(hidden.dtype)
                out = grad_hidden[rows]
                torch.mm(grad_logits, weight, out=out)
                out *= row_scale
                partial = grad_logits.t() @ (h * row_scale)
                if grad_weight is None:
                    grad_weight = partial.float()
                else:
                    grad_weight += partial
        if needs_grad and grad_weight is None:  # no tokens
            grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
        ctx.save_for_backward(grad_hidden, grad_weight)
        ctx.weight_dtype = weight.dtype
        return loss * scale

    @staticmethod
    def backward(ctx: Any, grad_loss: Tensor) -> tuple[Tensor | None, ...]:
        grad_hidden, grad_weight = ctx.saved_tensors
        if grad_loss.device.type == "cpu" and float(grad_loss) == 1.0:
            # The usual case (the loss is the objective): the stored gradients are the answer. Reading a CPU scalar
            # is free; on an accelerator it would stall the backward, so there they are always scaled.
            grad_h, grad_w = grad_hidden, grad_weight.to(ctx.weight_dtype)
        else:
            grad_h = grad_hidden * grad_loss.to(grad_hidden.dtype)
            grad_w = (grad_weight * grad_loss).to(ctx.weight_dtype)
        grad_h = grad_h if ctx.needs_input_grad[0] else None
        grad_w = grad_w if ctx.needs_input_grad[1] else None
        return grad_h, grad_w, None, None, None, None


def linear_cross_entropy(hidden: Tensor, weight: Tensor, labels: Tensor, chunk_tokens: int, vocab_start: int = 0,
                         group: Any = None) -> Tensor:
    """``causal_lm_loss(hidden @ weight.T, labels)`` without materialising the logits.

    hidden [..., D] (the final-norm output), weight [V_local, D] (the LM head's rows ``vocab_start`` onwards, all
    of them without tensor parallelism), labels [...] global token ids (-100 = ignore). ``group``: the process
    group the vocabulary is split over (None = not split). Returns the float32 mean over the scored tokens.
    """
    if chunk_tokens < 1:
        raise ValueError(f"linear_cross_entropy: chunk_tokens must be >= 1, got {chunk_tokens}")
    if hidden.shape[:-1] != labels.shape:
        raise ValueError(f"hidden {tuple(hidden.shape)} and labels {tuple(labels.shape)} disagree on the tokens")
    return _LinearCrossEntropy.apply(hidden.reshape(-1, hidden.shape[-1]), weight, labels.reshape(-1),
                                     chunk_tokens, vocab_start, group)
