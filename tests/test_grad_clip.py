"""The trainer's gradient norm and clipping (`train.parallel.grad`) in one process, against torch's
``clip_grad_norm_`` on the same gradients; the sharded layouts' norms are checked against single-process runs in
the layout tests."""

from __future__ import annotations

import pytest
import torch

from train.parallel.dims import Layout
from train.parallel.grad import clip_, grad_norm
from train.parallel.groups import ParallelGroups

ONE_PROCESS = ParallelGroups(Layout(world=1, dp=1))


def _params(scale: float) -> list[torch.nn.Parameter]:
    g = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.zeros(shape)) for shape in ((300, 200), (1000,), (7, 3, 5), (400_000,))]
    for p in params:
        p.grad = torch.randn(p.shape, generator=g) * scale
    params.append(torch.nn.Parameter(torch.zeros(3)))  # no gradient: skipped
    return params


def test_norm_matches_a_float64_reference() -> None:
    params = _params(1.0)
    want = torch.cat([p.grad.double().flatten() for p in params if p.grad is not None]).norm()
    got = grad_norm(params, ONE_PROCESS)
    assert got.dtype == torch.float32
    assert abs(got.double() - want) <= 1e-6 * want


@pytest.mark.parametrize("scale", [1.0, 1e-4])
def test_clipping_follows_torchs_rule(scale: float) -> None:
    ours, theirs = _params(scale), _params(scale)
    tensors = [p.grad for p in ours if p.grad is not None]
    before = [g.clone() for g in tensors]
    norm64 = torch.cat([g.double().flatten() for g in before]).norm()
    clip_(ours, grad_norm(ours, ONE_PROCESS), max_norm=1.0)
    torch.nn.utils.clip_grad_norm_([p for p in theirs if p.grad is not None], max_norm=1.0)
    coef = min(1.0, 1.0 / (float(norm64) + 1e-6))  # torch's rule, in float64
    for mine, ref, grad in zip(ours, theirs, before, strict=False):
        torch.testing.assert_close(mine.grad.double(), grad.double() * coef, rtol=1e-6, atol=0)
        # torch's own float32 norm drifts by ~1e-6 on 400k elements
        torch.testing.assert_close(mine.grad, ref.grad, rtol=1e-5, atol=0)
    if scale < 1e-3:  # inside the bound: the gradients are left as they are, not rewritten
        assert all(p.grad is t and torch.equal(t, b) for p, t, b in zip(ours, tensors, before, strict=False))
