"""Time grids optimised for a given model, sampler and NFE budget.

AutoDiffusion (Li et al. 2023, seed 161) shows that the time steps of a fast sampler are worth
searching per model instead of fixing a rule such as Karras' rho spacing; it scores candidates by
FID and searches with an evolutionary algorithm. For a deterministic sampler there is a sharper
score: the probability-flow ODE maps each starting noise to one endpoint, so a grid can be judged
by how far the sampler lands from an accurate solve of the *same* ODE from the *same* noise
(the teacher trajectories of GITS, Chen et al. 2024, and of Align Your Steps, Sabour et al. 2024).
That error is a smooth function of the grid times, which a local optimiser can follow:

    grid* = argmin_grid  mean_{z in calibration}  || sampler(D, x_T(z), grid) - ODE(D, x_T(z)) ||^2

- calibration noise is drawn from the caller's generator (keep it apart from evaluation noise);
  the reference endpoints come from core's ``dopri5`` at tight tolerance on the same path, run
  down to ``sigma_hat = 1e-6`` and finished with the exact step onto sigma = 0
  (:func:`reference_endpoints`), or are given by the caller;
- the first and last grid points stay where they are (the start of the noise, and t = 0 or the
  path's last time); the interior points are parametrised by their half log-SNR
  ``lambda = log(alpha / sigma)`` through positive increments ``exp(theta)`` (a softmax of the
  span when both ends are finite), so every parameter vector is a strictly decreasing grid with
  the same number of steps and hence the same NFE. Above ``max_params`` interior points the
  log-increments move as a piecewise-linear function of the step index;
- the loss is ``log`` of the mean squared endpoint error, minimised by L-BFGS with forward
  finite-difference gradients in float64 (one sampler run per parameter). The samplers of
  :mod:`core.samplers.ode` turn path coefficients into Python floats, so autograd cannot reach
  the grid; finite differences of the real sampler need neither that nor a differentiable
  denoiser. ``method="nelder-mead"`` selects scipy's derivative-free simplex search instead;
- the loss is not convex (with 3-5 interior points L-BFGS from the Karras grid stops in a local
  minimum), so the search starts from the best of the init grid and a small lattice of Karras
  grids with other rho and last non-zero noise level (``restarts`` of them);
- the per-noise error of a few-step sampler is heavy-tailed (noises near the boundary between
  two modes land in the other mode), so a calibration pool larger than ``n_calib`` is
  stratified: its worst quarter under the init grid is always in the loss, the rest is
  subsampled and reweighted (an unbiased estimate of the pool's mean).

:func:`best_sampler_and_grid` adds AutoDiffusion's other axis at a fixed NFE: which sampler (and
sampler options), with its own optimised grid, lands closest on the whole calibration pool.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor

from .grids import karras_grid, lands_on_data, make_grid, sigma_range, validate_grid
from .paths import GaussianPath
from .samplers import SAMPLERS, steps_for_nfe
from .samplers.registry import get_spec

__all__ = ["GridSearchResult", "reference_endpoints", "optimise_grid", "best_sampler_and_grid", "grid_error"]


@dataclass
class GridSearchResult:
    """What an optimisation found, and what it started from (errors are RMS over samples and dims)."""

    sampler: str
    nfe: int
    grid: Tensor
    init_grid: Tensor
    init_error: float
    error: float
    evaluations: int  # sampler runs spent
    history: list[float] = field(default_factory=list)  # best RMS error after each local search
    options: dict = field(default_factory=dict)  # the sampler's keyword options
    pool_error: float | None = None  # RMS error over the whole calibration pool (best_sampler_and_grid)

    def __repr__(self) -> str:
        return (
            f"GridSearchResult(sampler={self.sampler!r}, options={self.options}, nfe={self.nfe}, steps={len(self.grid) - 1}, "
            f"init_error={self.init_error:.4g}, error={self.error:.4g}, evaluations={self.evaluations})"
        )


def _half_lambda(path: GaussianPath, t: Tensor) -> Tensor:
    return 0.5 * path.log_snr(t.to(torch.float64))


def _t_from_half_lambda(path: GaussianPath, lam: Tensor) -> Tensor:
    return path.t_from_log_snr(2.0 * lam)


def reference_endpoints(
    denoiser,
    path: GaussianPath,
    x: Tensor,
    t_start: float,
    t_end: float = 0.0,
    *,
    rtol: float = 1e-8,
    atol: float = 1e-8,
    sigma_hat_stop: float | None = None,
) -> Tensor:
    """Accurate probability-flow ODE endpoints from ``x`` at ``t_start`` to ``t_end`` (float64).

    Runs core's adaptive ``dopri5`` at ``rtol``/``atol``. Where ``t_end`` is data (sigma = 0) the
    ODE is integrated down to ``sigma_hat_stop`` (default ``1e-6 * min(sigma_hat(t_start), 1)``,
    so 1e-6 from any start at unit noise or above) and finished with the exact step onto sigma = 0,
    ``alpha(0) D``, whose error is of order ``sigma_hat_stop^2`` over the data variance.
    """
    x = x.to(torch.float64)
    t_start, t_end = float(t_start), float(t_end)
    sig_end = float(path.sigma(torch.tensor(t_end, dtype=torch.float64)))
    if sig_end == 0.0:
        s0 = float(path.sigma_hat(torch.tensor(t_start, dtype=torch.float64)))
        stop = sigma_hat_stop if sigma_hat_stop is not None else 1e-6 * min(s0, 1.0)
        t_stop = float(path.t_from_sigma(torch.tensor(stop, dtype=torch.float64)))
        if not (t_end < t_stop < t_start):
            raise ValueError(f"sigma_hat_stop={stop} does not lie between t_end={t_end} and t_start={t_start}")
        grid = torch.tensor([t_start, t_stop, t_end], dtype=torch.float64)
    else:
        grid = torch.tensor([t_start, t_end], dtype=torch.float64)
    out, _ = SAMPLERS["dopri5"].fn(denoiser, path, x, grid, rtol=rtol, atol=atol)
    return out


# -- parametrisation: interior grid points through positive increments of lambda -------------------


class _GridParam:
    """Map unconstrained ``theta`` to a grid with fixed ends and ``steps - 1`` interior points.

    In half log-SNR ``lambda`` (increasing from noise to data): with a finite start ``lambda_0``,
    ``lambda_i = lambda_{i-1} + exp(theta_i)``; with a start at pure noise (``lambda_0 = -inf``) the
    first interior point is ``theta_1`` itself. A finite end ``lambda_N`` (a grid that does not reach
    data, e.g. VE) bounds the points: the ``N`` increments are then a softmax of
    ``(theta, 0)`` times ``lambda_N - lambda_0`` (or of the span to the first interior point).
    """

    def __init__(self, path: GaussianPath, grid: Tensor, max_params: int | None = None):
        self.path = path
        self.grid = validate_grid(grid)
        self.steps = len(self.grid) - 1
        lam = _half_lambda(path, self.grid)
        self.lam0, self.lamN = float(lam[0]), float(lam[-1])
        self.n_interior = self.steps - 1
        if not math.isfinite(self.lam0) and not math.isfinite(self.lamN):
            if self.n_interior < 1:
                raise ValueError("a grid from pure noise to data needs at least one interior point")
        self.theta0 = self.encode(lam[1:-1])
        # theta = theta0 + B c: with more interior points than max_params, c holds the values of a
        # piecewise-linear function of the step index at max_params knots (a smooth deformation).
        p = len(self.theta0)
        if max_params is None or max_params >= p:
            self.basis = np.eye(p)
        else:
            u = np.linspace(0.0, 1.0, p)
            knots = np.linspace(0.0, 1.0, max_params)
            width = knots[1] - knots[0]
            self.basis = np.clip(1.0 - np.abs(u[:, None] - knots[None, :]) / width, 0.0, None)
        self.n_params = self.basis.shape[1]

    def encode(self, lam_interior: Tensor) -> np.ndarray:
        lam = lam_interior.tolist()
        n = len(lam)
        if n == 0:
            return np.zeros(0)
        if math.isfinite(self.lamN):
            lo = self.lam0 if math.isfinite(self.lam0) else lam[0]
            pts = ([self.lam0] if math.isfinite(self.lam0) else []) + lam + [self.lamN]
            inc = np.diff(np.array(pts))
            logs = np.log(inc)
            theta = logs[:-1] - logs[-1]  # softmax with the last logit pinned at 0
            if not math.isfinite(self.lam0):
                theta = np.concatenate([[lo], theta])
            return theta
        theta = np.empty(n)
        prev = self.lam0
        for i, v in enumerate(lam):
            if i == 0 and not math.isfinite(prev):
                theta[0] = v
            else:
                theta[i] = math.log(v - prev)
            prev = v
        return theta

    def lambdas(self, theta: np.ndarray) -> np.ndarray:
        n = self.n_interior
        theta = np.asarray(theta, dtype=np.float64)
        if n == 0:
            return np.zeros(0)
        if math.isfinite(self.lamN):
            if math.isfinite(self.lam0):
                start, logits = self.lam0, theta
            else:
                start, logits = theta[0], theta[1:]
            z = np.concatenate([logits, [0.0]])
            w = np.exp(z - z.max())
            w = w / w.sum()
            inc = w * (self.lamN - start)
            lam = start + np.cumsum(inc)[:-1]
            if not math.isfinite(self.lam0):
                lam = np.concatenate([[start], lam[: n - 1]])
            return lam
        out = np.empty(n)
        prev = self.lam0
        for i in range(n):
            if i == 0 and not math.isfinite(prev):
                out[0] = theta[0]
            else:
                out[i] = prev + math.exp(min(theta[i], 50.0))
            prev = out[i]
        return out

    def grid_of(self, c: np.ndarray) -> Tensor:
        theta = self.theta0 + self.basis @ np.asarray(c, dtype=np.float64)
        lam = torch.as_tensor(self.lambdas(theta), dtype=torch.float64)
        inner = _t_from_half_lambda(self.path, lam) if len(lam) else lam
        g = torch.cat([self.grid[:1], inner, self.grid[-1:]])
        return validate_grid(g, "optimised grid")


def _init_grid(path: GaussianPath, init, steps: int, final_zero: bool) -> Tensor:
    if isinstance(init, str):
        return make_grid(init, path, steps, final_zero=final_zero)
    g = validate_grid(init, "init grid")
    if len(g) - 1 != steps:
        raise ValueError(f"init grid has {len(g) - 1} steps but the NFE budget gives {steps}")
    return g


def _calibration_noise(path, grid, x_calib, shape, n_calib, generator, dtype=torch.float64):
    if x_calib is not None:
        x = torch.as_tensor(x_calib).to(torch.float64)
        if x.ndim < 2 or x.shape[0] < 1:
            raise ValueError(f"calibration noise must have shape (n, ...), got {tuple(x.shape)}")
        return x
    if shape is None:
        raise ValueError("give the data shape (shape=...) or the calibration noise (x_calib=...)")
    if isinstance(n_calib, bool) or not isinstance(n_calib, int) or n_calib < 1:
        raise ValueError(f"n_calib must be a positive integer, got {n_calib!r}")
    return path.prior_sample((n_calib, *tuple(shape)), t=float(grid[0]), generator=generator, dtype=dtype)


def grid_error(sampler: str, denoiser, path, grid, x: Tensor, reference: Tensor, **sampler_options) -> float:
    """RMS endpoint error (over samples and dims) of ``sampler`` on ``grid`` from ``x`` against ``reference``."""
    out, _ = SAMPLERS[sampler].fn(denoiser, path, x, grid, **sampler_options)
    return float((out.to(torch.float64) - reference).pow(2).mean().sqrt())


def _check_sampler(name: str) -> None:
    spec = get_spec(name)  # ValueError for an unknown name
    if spec.stochastic:
        raise ValueError(f"sampler {name!r} is stochastic: its endpoint is not a function of the grid")
    if spec.nfe is None:
        raise ValueError(f"sampler {name!r} is adaptive: its NFE is not set by the grid")


def _stratify(err: Tensor, n: int, generator: torch.Generator | None) -> tuple[Tensor, Tensor]:
    """Stratified subsample of a calibration pool for an unbiased, low-variance mean of ``err``.

    The endpoint error of a few-step sampler is heavy-tailed: most noises land close to the ODE
    solution and a few, near the boundary between two modes, land in the other mode. A uniform
    subsample holds only a handful of the latter and the optimiser then fits those few. Here the
    stratum of the ``n // 4`` largest ``err`` (of the init grid) is taken whole and the rest is
    sampled uniformly; weights ``1 / N`` and ``(N - n_hard) / (n_rest N)`` keep the weighted sum
    an unbiased estimate of the pool mean for any grid. Returns indices and weights.
    """
    big = err.shape[0]
    n_hard = n // 4
    order = torch.argsort(err, descending=True)
    hard, rest = order[:n_hard], order[n_hard:]
    pick = torch.randperm(rest.shape[0], generator=generator)[: n - n_hard]
    idx = torch.cat([hard, rest[pick]])
    w = torch.cat(
        [
            torch.full((n_hard,), 1.0 / big, dtype=torch.float64),
            torch.full((n - n_hard,), (big - n_hard) / ((n - n_hard) * big), dtype=torch.float64),
        ]
    )
    return idx, w


def _lattice(path: GaussianPath, steps: int, lands: bool) -> list[Tensor]:
    """Karras grids with rho in {2, 4, 7, 15} and, where the grid lands on data, five last non-zero
    levels from the default sigma_min up to ``min(1, sigma_max / 10)`` (geometric)."""
    s_min, s_max = sigma_range(path)
    lows = [s_min]
    if lands:
        top = min(1.0, s_max / 10)
        if top > s_min:
            lows = np.geomspace(s_min, top, 5).tolist()
    out = []
    for rho in (2.0, 4.0, 7.0, 15.0):
        for lo in lows:
            try:
                out.append(karras_grid(path, steps, sigma_min=lo, rho=rho, final_zero=lands))
            except ValueError:
                continue
    return out


def _local_search(param: _GridParam, loss_of_grid, f_start: float, iters: int, method: str, fd_step: float):
    """Minimise ``loss_of_grid(param.grid_of(c))`` from ``c = 0``; returns the best ``(c, loss)`` seen."""
    from scipy.optimize import minimize

    best = {"c": np.zeros(param.n_params), "f": f_start}

    def loss(c) -> float:
        try:
            grid = param.grid_of(c)
        except ValueError:
            return math.inf  # increments so extreme that times collide in float64
        f = loss_of_grid(grid)
        if f < best["f"]:
            best["c"], best["f"] = np.array(c, dtype=np.float64).copy(), f
        return f

    c0 = np.zeros(param.n_params)
    if param.n_params == 0:
        return c0, f_start
    if method == "lbfgs":

        def fun_and_grad(c):
            f = loss(c)
            g = np.zeros_like(c)
            if not math.isfinite(f):
                return 1e300, g
            # forward differences: one sampler run per parameter
            for i in range(len(c)):
                ci = c.copy()
                ci[i] += fd_step
                fi = loss(ci)
                g[i] = (fi - f) / fd_step if math.isfinite(fi) else 0.0
            return f, g

        minimize(fun_and_grad, c0, jac=True, method="L-BFGS-B", options={"maxiter": iters, "gtol": 1e-9})
    else:

        def fun(c):
            f = loss(c)
            return f if math.isfinite(f) else 1e300

        # about the runs of as many L-BFGS iterations (a gradient plus a line search each); scipy's
        # default simplex around 0 is 0.00025 wide, half a unit of log-increment is a step the loss resolves
        budget = 2 * iters * (param.n_params + 1)
        simplex = np.vstack([c0, c0 + 0.5 * np.eye(param.n_params)])
        options = {"maxfev": budget, "xatol": 1e-6, "fatol": 1e-9, "initial_simplex": simplex}
        minimize(fun, c0, method="Nelder-Mead", options=options)
    return best["c"], best["f"]


def optimise_grid(
    sampler: str,
    denoiser,
    path: GaussianPath,
    nfe: int,
    *,
    shape: Sequence[int] | None = None,
    x_calib: Tensor | None = None,
    n_calib: int = 256,
    n_pool: int | None = None,
    generator: torch.Generator | None = None,
    reference: Tensor | Callable[[Tensor, float], Tensor] | None = None,
    reference_options: dict | None = None,
    init="karras",
    iters: int = 40,
    method: str = "lbfgs",
    fd_step: float = 1e-5,
    max_params: int | None = 8,
    restarts: int = 2,
    sampler_options: dict | None = None,
    return_info: bool = False,
):
    """Optimise the time grid of a deterministic ``sampler`` for ``denoiser`` at an NFE budget.

    Args:
        sampler: a registered deterministic sampler with a fixed cost (not ``dopri5``).
        denoiser: ``D(x, t) -> x0_hat`` (the model a user has; any callable, need not be differentiable).
        path: the :class:`~core.paths.GaussianPath`.
        nfe: the budget; the grid gets the most steps that fit (:func:`~core.samplers.steps_for_nfe`).
        shape: the shape of one sample, to draw ``n_pool`` (default ``n_calib``) calibration noises
            with ``generator`` (``path.prior_sample`` at the grid's first time); or pass the pool
            ``x_calib`` ``(n_pool, ...)`` directly. Keep it apart from any noise you evaluate on.
        n_calib: samples in the loss. A larger pool is stratified (:func:`_stratify`): the
            ``n_calib // 4`` noises the init grid handles worst, plus a uniform draw of the rest,
            weighted so that the loss stays an unbiased estimate of the pool's mean squared error.
        reference: endpoints ``(n_pool, ...)`` of the pool, or a callable ``(x, t_start) ->
            endpoints``; default :func:`reference_endpoints` with ``reference_options``.
        init: ``"karras"``, ``"logsnr"``, ``"uniform"`` or a grid tensor with the right number of steps.
        iters: L-BFGS iterations per local search (Nelder-Mead: ``2 iters (params + 1)`` runs);
            0 keeps the best of init and the lattice.
        restarts: local searches, from the best of init and a lattice of Karras grids (other rho,
            other last noise level); 0 searches from init alone.
        max_params: above this many interior points the increments move as a piecewise-linear
            function of the step index with ``max_params`` knots (fewer runs per gradient).
        method: ``"lbfgs"`` (finite-difference gradients) or ``"nelder-mead"`` (derivative-free).
        sampler_options: keyword options of the sampler (e.g. ``order`` of unipc).
        return_info: also return a :class:`GridSearchResult` with initial and final calibration errors.

    Returns the optimised grid (float64, descending, same number of steps as ``init``), and the
    result record when ``return_info``. The final grid is never worse on the calibration set than
    ``init``: if the search does not improve, ``init`` comes back.
    """
    _check_sampler(sampler)
    if method not in ("lbfgs", "nelder-mead"):
        raise ValueError(f"unknown method {method!r}; choose 'lbfgs' or 'nelder-mead'")
    if isinstance(iters, bool) or not isinstance(iters, int) or iters < 0:
        raise ValueError(f"iters must be a non-negative integer, got {iters!r}")
    lands = lands_on_data(path, True)
    steps = steps_for_nfe(sampler, nfe, final_zero=lands)
    opts = dict(sampler_options or {})
    g0 = _init_grid(path, init, steps, lands)
    spec = get_spec(sampler)
    if spec.nfe(steps, lands) > nfe:
        raise ValueError(f"init grid of {steps} steps costs {spec.nfe(steps, lands)} > nfe={nfe} for {sampler!r}")

    x = _calibration_noise(path, g0, x_calib, shape, n_pool or n_calib, generator)
    if reference is None:
        ref = reference_endpoints(denoiser, path, x, float(g0[0]), float(g0[-1]), **(reference_options or {}))
    elif callable(reference):
        ref = reference(x, float(g0[0]))
    else:
        ref = reference
    ref = torch.as_tensor(ref).to(torch.float64)
    if ref.shape != x.shape:
        raise ValueError(f"reference endpoints have shape {tuple(ref.shape)}, calibration noise {tuple(x.shape)}")

    fn = SAMPLERS[sampler].fn
    runs = 1
    weights = None
    if x.shape[0] > n_calib:
        out, _ = fn(denoiser, path, x, g0, **opts)
        err = (out.to(torch.float64) - ref).pow(2).flatten(1).mean(1)
        idx, weights = _stratify(err, n_calib, generator)
        x, ref = x[idx], ref[idx]

    def loss_of_grid(grid: Tensor) -> float:
        """log of the mean squared endpoint error (inf where the grid is unusable)."""
        nonlocal runs
        runs += 1
        out, _ = fn(denoiser, path, x, grid, **opts)
        per_sample = (out.to(torch.float64) - ref).pow(2).flatten(1).mean(1)
        e = float(per_sample.mean() if weights is None else (weights * per_sample).sum())
        if not math.isfinite(e):
            return math.inf
        return math.log(e) if e > 0 else -745.0

    f0 = loss_of_grid(g0)
    best_grid, best_f = g0, f0
    history = [math.exp(0.5 * f0)]
    if steps > 1:
        # Multi-start: the error is not convex in the grid (at 3-4 steps L-BFGS from Karras stops in
        # a local minimum), so the local search starts from the best of init and a small lattice of
        # Karras grids with other rho and last non-zero noise levels (``restarts=0``: init only).
        starts = [(f0, g0)]
        if restarts > 0:
            for cand in _lattice(path, steps, lands):
                if not torch.equal(cand, g0):
                    starts.append((loss_of_grid(cand), cand))
        starts = sorted((s for s in starts if math.isfinite(s[0])), key=lambda s: s[0])[: max(1, restarts)]
        if starts and starts[0][0] < best_f:
            best_f, best_grid = starts[0]
        for f_start, g_start in starts if iters > 0 else []:
            param = _GridParam(path, g_start, max_params)
            theta, f = _local_search(param, loss_of_grid, f_start, iters, method, fd_step)
            if f < best_f:
                best_grid, best_f = param.grid_of(theta), f
        history.append(math.exp(0.5 * best_f))

    grid = best_grid
    if not return_info:
        return grid
    info = GridSearchResult(
        sampler=sampler,
        nfe=nfe,
        grid=grid,
        init_grid=g0,
        init_error=math.exp(0.5 * f0),
        error=math.exp(0.5 * best_f),
        evaluations=runs,
        history=history,
        options=opts,
    )
    return grid, info


def best_sampler_and_grid(
    denoiser,
    path: GaussianPath,
    nfe: int,
    *,
    samplers: Sequence[str | tuple[str, dict]] | None = None,
    shape: Sequence[int] | None = None,
    x_calib: Tensor | None = None,
    n_calib: int = 256,
    n_pool: int | None = None,
    generator: torch.Generator | None = None,
    reference=None,
    reference_options: dict | None = None,
    init="karras",
    iters: int = 40,
    method: str = "lbfgs",
    max_params: int | None = 8,
    restarts: int = 1,
) -> GridSearchResult:
    """AutoDiffusion's joint search at a fixed NFE: the sampler and its grid with the least error.

    Every candidate gets its own :func:`optimise_grid` on one shared calibration pool; a
    candidate is a sampler name or ``(name, options)`` (e.g. ``("unipc", {"order": 3})``); default:
    every registered deterministic sampler with a grid-fixed cost that fits ``nfe``. The winner is
    the candidate whose optimised grid has the least mean squared error over the *whole* pool (one
    more run each): the stratified losses of the searches are estimates on different subsets, too
    noisy to rank samplers whose errors are close. Returns the winner's
    :class:`GridSearchResult` (``options`` holds its sampler options, ``pool_error`` the RMS error
    that ranked it, ``evaluations`` the sampler runs of the whole search).
    """
    if samplers is None:
        samplers = [n for n, s in SAMPLERS.items() if not s.stochastic and s.nfe is not None]
    cands = [(c, {}) if isinstance(c, str) else (c[0], dict(c[1])) for c in samplers]
    if not cands:
        raise ValueError("no candidate samplers")
    for name, _ in cands:
        _check_sampler(name)
    lands = lands_on_data(path, True)
    fits = []
    for name, opts in cands:
        try:
            steps_for_nfe(name, nfe, final_zero=lands)
        except ValueError:
            continue
        fits.append((name, opts))
    if not fits:
        raise ValueError(f"no candidate sampler fits an NFE budget of {nfe}: {[c[0] for c in cands]}")
    first = make_grid(init, path, 1) if isinstance(init, str) else validate_grid(init)
    x = _calibration_noise(path, first, x_calib, shape, n_pool or n_calib, generator)
    if reference is None:
        ref = reference_endpoints(denoiser, path, x, float(first[0]), float(first[-1]), **(reference_options or {}))
    else:
        ref = reference(x, float(first[0])) if callable(reference) else reference
    ref = torch.as_tensor(ref).to(torch.float64)
    results = []
    total = 0
    for name, opts in fits:
        _, info = optimise_grid(
            name,
            denoiser,
            path,
            nfe,
            x_calib=x,
            reference=ref,
            n_calib=n_calib,
            generator=generator,
            init=init,
            iters=iters,
            method=method,
            max_params=max_params,
            restarts=restarts,
            sampler_options=opts,
            return_info=True,
        )
        info.pool_error = grid_error(name, denoiser, path, info.grid, x, ref, **opts)
        total += info.evaluations + 1
        results.append(info)
    winner = min(results, key=lambda r: r.pool_error)
    winner.evaluations = total
    return winner
