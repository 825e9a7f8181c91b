"""Rounding-error bounds for the tolerances of the numerical tests (Higham, Accuracy and Stability of Numerical
Algorithms, 2nd ed.: u is the unit roundoff, a sum of n terms in any order is off by at most gamma(n) times the sum
of their magnitudes, eq. 3.5). A tolerance built from these holds whatever kernel or summation order a CPU's BLAS
picks, because it bounds every order; a bug moves a result by far more than the bound (tests say by how much)."""

from __future__ import annotations

import torch

U32 = 2.0**-24  # float32
U64 = 2.0**-53  # float64


def gamma(n: int, u: float = U32) -> float:
    """Relative error bound of an n-term sum (or dot product) in precision u, whatever the order: n u / (1 - n u)."""
    return n * u / (1 - n * u)


def log_softmax_error(logits: torch.Tensor) -> torch.Tensor:
    """Per row, a bound on |float32 log_softmax - exact| at every entry, for logits exact in float64 [n, V] that are
    rounded to float32 first: rounding moves each logit by u |z|, hence a log-probability by at most 2 u max|z|
    (its own logit and the log-sum-exp, a convex combination of the logits); subtracting the row maximum, the
    exponentials (a few ulp each) and their V-term sum put a relative error of gamma(V + 4) on the sum, an absolute
    one on its log; the subtractions (z - max, then the log-sum) round by u times 2 max|z| and by u |log p|."""
    z = logits.double()
    logp = torch.log_softmax(z, dim=-1)
    zmax = z.abs().amax(dim=-1)
    return 4 * U32 * zmax + gamma(z.shape[-1] + 4) + U32 * logp.abs().amax(dim=-1)


def mean_cross_entropy_error(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                             ignore_index: int = -100) -> float:
    """A bound on |float32 mean cross entropy of hidden @ weight.T - exact|, for float32 hidden [n, D] and weight
    [V, D]: each logit's D-term product is off by gamma(D) of |h| . |w| (moving a row's log-probabilities by twice
    the row's largest), then `log_softmax_error`; the mean adds gamma(n) + 2u of the rows' summed losses."""
    keep = labels != ignore_index
    h, w, y = hidden.double()[keep], weight.double(), labels[keep]
    logits = h @ w.t()
    matmul = 2 * gamma(h.shape[-1]) * (h.abs() @ w.abs().t()).amax(dim=-1)
    nll = torch.nn.functional.cross_entropy(logits, y, reduction="none")
    rows = matmul + log_softmax_error(logits)
    n = max(1, int(keep.sum()))
    return float((rows.sum() + (gamma(n) + 2 * U32) * nll.sum()) / n)
