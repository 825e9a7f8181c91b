"""The trainer's gradient norm and clipping (`train.parallel.grad`) in one process, against the exact norm and
against torch's ``clip_grad_norm_`` on the same gradients; the sharded layouts' norms are checked against
single-process runs in the layout tests.

Tolerances come from the arithmetic, not from one machine's BLAS. The main gradients are multiples of 1/8 (times a
power of two) whose sum of squares, in units of the smallest square, stays below 2**24: every float32 product and
partial sum is then exact, so any summation order a BLAS kernel picks gives the exact sum, and the norm is only
rounded once to float64 and once to float32. Random Gaussian gradients are checked against the worst-case bound of
a float32 sum of n squares, |error| <= n u / (1 - n u) * sum (Higham, Accuracy and Stability of Numerical
Algorithms, 2nd ed., eq. 3.5), with u = 2**-24.
"""

from __future__ import annotations

import math

import pytest
import torch

from train.parallel.dims import Layout
from train.parallel.grad import clip_, grad_norm
from train.parallel.groups import ParallelGroups

ONE_PROCESS = ParallelGroups(Layout(world=1, dp=1))
U32 = 2.0**-24  # unit roundoff of float32
SHAPES = ((300, 200), (1000,), (7, 3, 5), (400_000,))


def _exact_params(scale: float) -> tuple[list[torch.nn.Parameter], int]:
    """Gradients k/8 * scale, k in [-7, 7]; returns them and sum(k**2), which must stay below 2**24 for exactness."""
    g = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.zeros(shape)) for shape in SHAPES]
    k_squares = 0
    for p in params:
        k = torch.randint(-7, 8, p.shape, generator=g)
        k_squares += int(k.square().sum())
        p.grad = k.float() / 8 * scale
    params.append(torch.nn.Parameter(torch.zeros(3)))  # no gradient: skipped
    assert k_squares < 2**24, "the gradients' squares would not sum exactly in float32"
    return params, k_squares


def test_norm_is_exact_when_every_float32_sum_is_exact() -> None:
    params, k_squares = _exact_params(1.0)
    exact = math.sqrt(k_squares) / 8
    got = grad_norm(params, ONE_PROCESS)
    assert got.dtype == torch.float32
    # One float32 rounding after the (correctly rounded) float64 square root: at most one float32 ulp.
    assert abs(float(got) - exact) <= 2 * U32 * exact, (float(got), exact)
    # The smallest tensor (105 entries) moves the norm by far more than that: leaving any tensor out fails.
    without_smallest = math.sqrt(k_squares - sum(int((p.grad * 8).square().sum()) for p in params[2:3])) / 8
    assert exact - without_smallest > 100 * U32 * exact


def test_norm_of_gaussian_gradients_is_within_the_float32_summation_bound() -> None:
    g = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.zeros(shape)) for shape in SHAPES]
    for p in params:
        p.grad = torch.randn(p.shape, generator=g)
    want = torch.cat([p.grad.double().flatten() for p in params]).norm().item()
    got = float(grad_norm(params, ONE_PROCESS))
    n = max(p.numel() for p in params)
    gamma = n * U32 / (1 - n * U32)  # relative bound of each tensor's float32 sum of squares
    # sqrt halves the relative error of the sum; the float64 total and the float32 result add a rounding each.
    assert abs(got - want) <= (gamma / 2 + 2 * U32) * want, (got, want)


@pytest.mark.parametrize("scale", [1.0, 2.0**-14])  # a norm of ~366 (clipped) and of ~0.022 (inside the bound)
def test_clipping_follows_torchs_rule(scale: float) -> None:
    (ours, k_squares), (theirs, _) = _exact_params(scale), _exact_params(scale)
    tensors = [p.grad for p in ours if p.grad is not None]
    before = [g.clone() for g in tensors]
    exact_norm = math.sqrt(k_squares) / 8 * scale
    clip_(ours, grad_norm(ours, ONE_PROCESS), max_norm=1.0)
    torch.nn.utils.clip_grad_norm_([p for p in theirs if p.grad is not None], max_norm=1.0)
    coef = min(1.0, 1.0 / (exact_norm + 1e-6))  # torch's rule on the exact norm
    # Ours: the norm within 2u (one float32 ulp), the factor rounded to float32 (u), the product rounded (u); 4u to
    # first order, 5u with room for the second-order terms.
    ours_tol = 5 * U32
    # torch's float32 norm is a sum of up to n squares in an order of its choosing: the summation bound again.
    n = max(p.numel() for p in tensors)
    theirs_tol = n * U32 / (1 - n * U32) / 2 + 4 * U32
    for mine, ref, grad in zip(ours, theirs, before, strict=False):
        want = grad.double() * coef
        assert ((mine.grad.double() - want).abs() <= ours_tol * want.abs()).all()
        assert ((ref.grad.double() - mine.grad.double()).abs() <= (ours_tol + theirs_tol) * want.abs()).all()
    if coef == 1.0:  # inside the bound: the gradients are left as they are, not rewritten
        assert all(p.grad is t and torch.equal(t, b) for p, t, b in zip(ours, tensors, before, strict=False))
    else:
        assert coef < 0.01  # the clipped case really clips
