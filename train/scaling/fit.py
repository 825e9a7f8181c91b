"""Scaling-law fits: L(N, D) by Chinchilla's approach 3 and L(C) on the compute frontier.

L(N, D) = E + A / N^alpha + B / D^beta is fitted as in Hoffmann et al. (2022), approach 3:
with a = log A, b = log B, e = log E the prediction is
log L_hat = logsumexp(a - alpha log N, b - beta log D, e), and we minimise the Huber loss
(delta = 1e-3) of log L_hat - log L with L-BFGS from a grid of starting points, keeping the
best. Parameter intervals come from a bootstrap over runs.

Compute-optimal allocation for a budget C = k N D (k = 6 for the usual 6 N D estimate, or
the runs' measured FLOPs per token per parameter): minimising A N^-alpha + B (C / (k N))^-beta
over N gives alpha A N^-alpha = beta B D^-beta, hence
    N_opt = G (C / k)^(beta / (alpha + beta)),  D_opt = (C / k) / N_opt = G^-1 (C / k)^(alpha / (alpha + beta)),
    G = (alpha A / (beta B))^(1 / (alpha + beta)).
"""

from __future__ import annotations

import contextlib
import ctypes
import itertools
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import scipy
from scipy.optimize import least_squares, minimize

PARAM_NAMES = ("E", "A", "alpha", "B", "beta")
N_FREE_PARAMS = len(PARAM_NAMES)

# Chinchilla's initialisation grid (alpha, beta, e, a, b): 5 * 5 * 5 * 6 * 6 = 4500 points.
_GRID_ALPHA = np.arange(0.0, 2.01, 0.5)
_GRID_E = np.arange(-1.0, 1.01, 0.5)
_GRID_A = np.arange(0.0, 25.01, 5.0)


def _as_positive_array(name: str, values: Sequence[float] | np.ndarray) -> np.ndarray:
    arr = np.asarray(values, dtype=np.float64).reshape(-1)
    if not np.all(np.isfinite(arr)) or np.any(arr <= 0):
        raise ValueError(f"{name} must be finite and positive; got {arr[~(np.isfinite(arr) & (arr > 0))][:3]}")
    return arr


@dataclass(frozen=True)
class ChinchillaFit:
    """Fitted L(N, D) = E + A / N^alpha + B / D^beta, with optional bootstrap intervals."""

    E: float
    A: float
    alpha: float
    B: float
    beta: float
    objective: float  # mean Huber loss / delta at the optimum
    n_runs: int
    confidence: float = 0.95
    intervals: dict[str, tuple[float, float]] = field(default_factory=dict)
    bootstrap_params: np.ndarray | None = field(default=None, repr=False)  # [n_bootstrap, 5] in PARAM_NAMES order

    @property
    def params(self) -> np.ndarray:
        return np.array([self.E, self.A, self.alpha, self.B, self.beta])

    def predict(self, N: float | np.ndarray, D: float | np.ndarray) -> float | np.ndarray:
        return predict_loss(self.params, N, D)

    def compute_optimal(self, C: float | np.ndarray, flops_per_param: float = 6.0) -> tuple[np.ndarray, np.ndarray]:
        return compute_optimal(self.params, C, flops_per_param)

    def bootstrap_interval(self, values: np.ndarray) -> tuple[float, float] | None:
        """Percentile interval of a quantity computed per bootstrap sample (None without a bootstrap)."""
        if values is None or len(values) == 0:
            return None
        tail = 100.0 * (1.0 - self.confidence) / 2.0
        lo, hi = np.percentile(values, [tail, 100.0 - tail])
        return float(lo), float(hi)

    def to_dict(self) -> dict:
        return {
            **{name: float(v) for name, v in zip(PARAM_NAMES, self.params)},
            "objective": self.objective,
            "n_runs": self.n_runs,
            "confidence": self.confidence,
            "n_bootstrap": 0 if self.bootstrap_params is None else len(self.bootstrap_params),
            "intervals": {k: list(v) for k, v in self.intervals.items()},
            # The samples themselves, so a later consumer (python -m train.plan --budget-gpu-hours) can put an
            # interval on any prediction.
            "bootstrap_params": [] if self.bootstrap_params is None else self.bootstrap_params.tolist(),
        }


def predict_loss(params: Sequence[float], N: float | np.ndarray, D: float | np.ndarray) -> float | np.ndarray:
    """L(N, D) for params (E, A, alpha, B, beta)."""
    E, A, alpha, B, beta = params
    return E + A / np.power(N, alpha) + B / np.power(D, beta)


def compute_optimal(
    params: Sequence[float], C: float | np.ndarray, flops_per_param: float = 6.0
) -> tuple[np.ndarray, np.ndarray]:
    """(N_opt, D_opt) minimising L(N, D) subject to flops_per_param * N * D = C (closed form, see module doc)."""
    _, A, alpha, B, beta = params
    if np.any(np.asarray(alpha) <= 0) or np.any(np.asarray(beta) <= 0):
        raise ValueError(f"compute-optimal allocation needs alpha > 0 and beta > 0; got alpha={alpha}, beta={beta}")
    nd = np.asarray(C, dtype=np.float64) / flops_per_param  # the product N * D the budget buys
    G = (alpha * A / (beta * B)) ** (1.0 / (alpha + beta))
    n_opt = G * nd ** (beta / (alpha + beta))
    return n_opt, nd / n_opt


# ------------------------------------------------------------------ L(N, D) objective
def _objective(theta: np.ndarray, log_n: np.ndarray, log_d: np.ndarray, log_l: np.ndarray, delta: float):
    """Mean Huber(log L_hat - log L) / delta and its gradient; theta = (a, b, e, alpha, beta)."""
    a, b, e, alpha, beta = theta
    terms = np.stack([a - alpha * log_n, b - beta * log_d, np.full_like(log_n, e)])
    top = terms.max(axis=0)
    weights = np.exp(terms - top)
    total = weights.sum(axis=0)
    log_pred = top + np.log(total)
    weights /= total  # softmax: d log_pred / d term_i
    r = log_pred - log_l
    abs_r = np.abs(r)
    huber = np.where(abs_r <= delta, 0.5 * r * r, delta * (abs_r - 0.5 * delta))
    m = len(r)
    # Dividing by delta keeps the objective O(|r| / delta) so L-BFGS's tolerances stay meaningful.
    dr = np.clip(r, -delta, delta) / (m * delta)
    grad = np.array(
        [
            np.sum(dr * weights[0]),
            np.sum(dr * weights[1]),
            np.sum(dr * weights[2]),
            -np.sum(dr * weights[0] * log_n),
            -np.sum(dr * weights[1] * log_d),
        ]
    )
    return huber.sum() / (m * delta), grad


def _grid_objective(grid: np.ndarray, log_n: np.ndarray, log_d: np.ndarray, log_l: np.ndarray, delta: float):
    """Objective at every grid point at once: grid [G, 5] -> [G]."""
    a, b, e, alpha, beta = (grid[:, i : i + 1] for i in range(5))
    log_pred = np.logaddexp(np.logaddexp(a - alpha * log_n, b - beta * log_d), e)
    abs_r = np.abs(log_pred - log_l)
    huber = np.where(abs_r <= delta, 0.5 * abs_r * abs_r, delta * (abs_r - 0.5 * delta))
    return huber.mean(axis=1) / delta


def default_init_grid() -> np.ndarray:
    """Chinchilla's grid of starting points as rows (a, b, e, alpha, beta)."""
    rows = itertools.product(_GRID_A, _GRID_A, _GRID_E, _GRID_ALPHA, _GRID_ALPHA)
    return np.array(list(rows), dtype=np.float64)


_BOUNDS = [(None, None), (None, None), (None, None), (0.0, 3.0), (0.0, 3.0)]


@contextlib.contextmanager
def _blas_single_thread() -> Iterator[None]:
    """Run scipy's L-BFGS-B with one BLAS thread.

    Its 5x5 linear algebra gains nothing from threads, and OpenBLAS threads waiting for busy
    cores made each fit ~10x slower on a loaded 2-core machine. threadpoolctl does this properly
    when installed; otherwise we set the thread count of the OpenBLAS bundled with scipy's
    wheels through its exported C functions (nothing happens for other BLAS builds).
    """
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        threadpool_limits = None
    if threadpool_limits is not None:
        with threadpool_limits(1, user_api="blas"):
            yield
        return
    libs = sorted((Path(scipy.__file__).parent.parent / "scipy.libs").glob("libscipy_openblas*.so*"))
    try:
        lib = ctypes.CDLL(str(libs[0])) if libs else None  # already loaded: this only returns its handle
        get, set_ = lib.scipy_openblas_get_num_threads, lib.scipy_openblas_set_num_threads
    except (OSError, AttributeError):
        lib = None
    if lib is None:
        yield
        return
    before = get()
    set_(1)
    try:
        yield
    finally:
        set_(before)


def _lbfgs(theta0: np.ndarray, data: tuple, delta: float) -> tuple[np.ndarray, float]:
    res = minimize(
        _objective,
        theta0,
        args=(*data, delta),
        jac=True,
        method="L-BFGS-B",
        bounds=_BOUNDS,
        options={"maxiter": 2000, "ftol": 1e-13, "gtol": 1e-10},
    )
    return res.x, float(res.fun)


def _fit_theta(
    data: tuple, delta: float, grid: np.ndarray, n_starts: int, extra_starts: Sequence[np.ndarray] = ()
) -> tuple[np.ndarray, float]:
    # Evaluating all 4500 grid points is cheap; running L-BFGS from each is not, so we start
    # from the n_starts best grid points (plus any given starts) and keep the best optimum.
    scores = _grid_objective(grid, *data, delta)
    starts = list(extra_starts) + list(grid[np.argsort(scores)[:n_starts]])
    best_theta, best_obj = None, np.inf
    for theta0 in starts:
        theta, obj = _lbfgs(np.asarray(theta0, dtype=np.float64), data, delta)
        if obj < best_obj:
            best_theta, best_obj = theta, obj
    return best_theta, best_obj


def _theta_to_params(theta: np.ndarray) -> np.ndarray:
    a, b, e, alpha, beta = theta
    return np.array([np.exp(e), np.exp(a), alpha, np.exp(b), beta])


def _bootstrap(theta: np.ndarray, data: tuple, delta: float, n_bootstrap: int, seed: int) -> np.ndarray:
    """Refit resamples of the runs (with replacement); returns [n_bootstrap, 5] params in PARAM_NAMES order."""
    rng = np.random.default_rng(seed)
    m = len(data[0])
    rows = []
    for _ in range(n_bootstrap):
        idx = rng.integers(0, m, size=m)
        while len(np.unique(idx)) < N_FREE_PARAMS:  # a resample must still determine 5 parameters
            idx = rng.integers(0, m, size=m)
        # Start from the full fit only: a resample's optimum lies near it, and one L-BFGS
        # run per resample keeps 200 refits to a few seconds.
        theta_b, _ = _lbfgs(theta, tuple(x[idx] for x in data), delta)
        rows.append(_theta_to_params(theta_b))
    return np.array(rows)


def fit_chinchilla(
    N: Sequence[float] | np.ndarray,
    D: Sequence[float] | np.ndarray,
    L: Sequence[float] | np.ndarray,
    *,
    delta: float = 1e-3,
    n_starts: int = 16,
    n_bootstrap: int = 200,
    confidence: float = 0.95,
    seed: int = 0,
    init_grid: np.ndarray | None = None,
) -> ChinchillaFit:
    """Fit L(N, D) = E + A/N^alpha + B/D^beta to runs (N params, D tokens, final loss L).

    n_bootstrap resamples of the runs (with replacement, seeded) are refitted to give
    percentile intervals at `confidence`; n_bootstrap=0 skips the bootstrap.
    """
    n = _as_positive_array("N", N)
    d = _as_positive_array("D", D)
    loss = _as_positive_array("L", L)
    if not len(n) == len(d) == len(loss):
        raise ValueError(f"N, D and L must have equal lengths; got {len(n)}, {len(d)}, {len(loss)}")
    if len(n) < N_FREE_PARAMS:
        raise ValueError(
            f"L(N, D) has {N_FREE_PARAMS} free parameters but only {len(n)} runs were given; "
            f"at least {N_FREE_PARAMS} runs (with several N and several D) are needed"
        )
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    grid = default_init_grid() if init_grid is None else np.asarray(init_grid, dtype=np.float64)
    data = (np.log(n), np.log(d), np.log(loss))
    with _blas_single_thread():
        theta, obj = _fit_theta(data, delta, grid, n_starts)
        samples = _bootstrap(theta, data, delta, n_bootstrap, seed) if n_bootstrap > 0 else None
    intervals: dict[str, tuple[float, float]] = {}
    if samples is not None:
        tail = 100.0 * (1.0 - confidence) / 2.0
        lo, hi = np.percentile(samples, [tail, 100.0 - tail], axis=0)
        intervals = {name: (float(lo[i]), float(hi[i])) for i, name in enumerate(PARAM_NAMES)}

    E, A, alpha, B, beta = (float(v) for v in _theta_to_params(theta))
    return ChinchillaFit(
        E=E,
        A=A,
        alpha=alpha,
        B=B,
        beta=beta,
        objective=obj,
        n_runs=len(n),
        confidence=confidence,
        intervals=intervals,
        bootstrap_params=samples,
    )


# ------------------------------------------------------------------ L(C) on the frontier
@dataclass(frozen=True)
class FrontierFit:
    """L(C) = E + a * C^-b on the compute frontier (E = 0 for the plain power law)."""

    a: float
    b: float
    E: float
    irreducible: bool
    frontier_flops: np.ndarray = field(repr=False)
    frontier_loss: np.ndarray = field(repr=False)

    def predict(self, C: float | np.ndarray) -> float | np.ndarray:
        return self.E + self.a * np.power(C, -self.b)

    def to_dict(self) -> dict:
        return {
            "a": self.a,
            "b": self.b,
            "E": self.E,
            "irreducible": self.irreducible,
            "flops_range": [float(self.frontier_flops.min()), float(self.frontier_flops.max())],
            "n_points": len(self.frontier_flops),
            "points": [[float(c), float(v)] for c, v in zip(self.frontier_flops, self.frontier_loss)],
        }


def compute_frontier(C: np.ndarray, L: np.ndarray, n_bins: int = 40) -> tuple[np.ndarray, np.ndarray]:
    """Lower envelope of (FLOPs, loss) points from all runs: in each of n_bins log-spaced FLOP bins
    the lowest loss, kept only where it beats every lower-compute point (Pareto frontier)."""
    c = _as_positive_array("C", C)
    loss = np.asarray(L, dtype=np.float64).reshape(-1)
    if len(c) != len(loss):
        raise ValueError(f"C and L must have equal lengths; got {len(c)} and {len(loss)}")
    ok = np.isfinite(loss)
    c, loss = c[ok], loss[ok]
    if len(c) == 0:
        raise ValueError("no finite (FLOPs, loss) points to build the compute frontier from")
    edges = np.geomspace(c.min(), c.max() * (1 + 1e-12), n_bins + 1)
    which = np.clip(np.searchsorted(edges, c, side="right") - 1, 0, n_bins - 1)
    env_c, env_l, best = [], [], np.inf
    for k in range(n_bins):
        in_bin = np.flatnonzero(which == k)
        if len(in_bin) == 0:
            continue
        j = in_bin[np.argmin(loss[in_bin])]
        if loss[j] < best:
            best = loss[j]
            env_c.append(c[j])
            env_l.append(loss[j])
    return np.array(env_c), np.array(env_l)


def fit_compute_frontier(
    C: Sequence[float] | np.ndarray,
    L: Sequence[float] | np.ndarray,
    *,
    envelope: bool = True,
    n_bins: int = 40,
    irreducible: bool = False,
) -> FrontierFit:
    """Fit L(C) = a C^-b (least squares in log space) to the lower envelope of the (C, L) points.

    With envelope=False the points are taken as the frontier already. irreducible=True fits
    L(C) = E + a C^-b instead (least squares on log L).
    """
    if envelope:
        c, loss = compute_frontier(np.asarray(C), np.asarray(L), n_bins=n_bins)
    else:
        c, loss = _as_positive_array("C", C), _as_positive_array("L", L)
    needed = 3 if irreducible else 2
    if len(c) < needed + 1:
        raise ValueError(
            f"the compute frontier has {len(c)} points but the L(C) fit needs at least {needed + 1}; "
            "log more often (metrics.jsonl) or add runs at other sizes"
        )
    log_c, log_l = np.log(c), np.log(loss)
    slope, intercept = np.polyfit(log_c, log_l, 1)
    a, b, E = float(np.exp(intercept)), float(-slope), 0.0
    if irreducible:
        # Parameterise E = exp(e), a = exp(la) to keep both positive; start from E at half the lowest loss.
        def resid(p: np.ndarray) -> np.ndarray:
            la, bb, e = p
            return np.logaddexp(e, la - bb * log_c) - log_l

        e0 = np.log(0.5 * loss.min())
        la0 = np.log(np.mean(np.maximum(loss - 0.5 * loss.min(), 1e-12) * c**b))
        sol = least_squares(resid, x0=[la0, b, e0], method="lm", xtol=1e-14, ftol=1e-14, max_nfev=20000)
        a, b, E = float(np.exp(sol.x[0])), float(sol.x[1]), float(np.exp(sol.x[2]))
    return FrontierFit(a=a, b=b, E=E, irreducible=irreducible, frontier_flops=c, frontier_loss=loss)
