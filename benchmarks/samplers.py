"""Sampler benchmark: polydiff's deterministic samplers against k-diffusion and diffusers.

    python -m benchmarks.samplers            # full run (d = 2 and d = 64, 4096 samples each; ~4 min on 2 cores)
    python -m benchmarks.samplers --quick    # smoke run (256 samples, NFE 5/10/20, short search; ~10 s)
    polydiff-bench-samplers                  # the console script of the same

For a Gaussian mixture in d = 2 and d = 64 with its exact denoiser, on EDM's path
``x = x0 + sigma eps`` (sigma_max = 80), every sampler starts from the same noise ``x = 80 z``
and is scored at each NFE budget by

- endpoint error: ``sqrt(mean((x_hat - x_ref)^2))`` over samples *and* dimensions, where
  ``x_ref`` is the probability-flow ODE solution from the same noise, computed independently of
  polydiff's solvers: torchdiffeq's dopri8 in ``u = log sigma`` (``dx/du = x - D(x, e^u)``, a
  well-conditioned form) at rtol = atol = 1e-10 down to sigma = 1e-6, then the exact limit
  sigma -> 0 (one denoiser call; its error is O(1e-12 / var)). It is checked against a second solve
  at 1e-8 and the largest difference is printed;
- SW2: sliced 2-Wasserstein distance (256 fixed projections) to as many exact mixture samples.

Rows: every registered polydiff deterministic sampler on the Karras grid (rho = 7, sigma in
[0.002, 80]; dopri5 and k-diffusion's dpm_adaptive get the tolerance whose NFE fits the budget),
polydiff's optimised grid (:func:`core.grid_search.best_sampler_and_grid` over unipc, unipc
order 3 and dpmpp_3m: sampler and grid searched at each budget on a pool of 8192 calibration
noises drawn from a *different* seed, 1024 of them in the loss, with reference endpoints of that
pool; never the evaluation noise or its reference), and the peers of :mod:`benchmarks.peers`
(the SDE ones draw their noise from a generator seeded with the evaluation seed). A sampler whose
cost does not divide the budget (Heun: 2 per step, 1 on the last) takes the most steps that fit;
the NFE actually used is listed under the table. An adapter check prints each deterministic
peer's error at 25, 100 and 400 steps: it must shrink (towards the ~1e-5 floor that the Karras
grid's last step from sigma = 0.002 leaves).

The last line is ``ratio polydiff_best/peer_best endpoint error`` at NFE 5, 10 and 20: the
best polydiff row (Karras or optimised) over the best peer row at each budget, the larger of the
two mixtures. ``--mixture-seed`` and ``--eval-seed`` rerun it on another mixture and noise.

The mixture denoiser here is :meth:`core.mixture.GaussianMixture.denoise` rewritten with matrix
products (same formula, no ``(B, K, d)`` tensor; checked against it at start-up), because the
benchmark makes tens of thousands of calls.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor

from benchmarks import peers
from core.grid_search import best_sampler_and_grid
from core.grids import karras_grid
from core.mixture import GaussianMixture, sliced_wasserstein
from core.paths import EDMPath
from core.samplers import SAMPLERS, steps_for_nfe

SIGMA_MAX = 80.0
MIXTURE_SEED = 0  # GaussianMixture.random(dim, 8 components, seed=0)
EVAL_SEED = 1234  # evaluation noise z and exact samples
CALIB_SEED = 4321  # calibration pool of the grid optimiser: independent of the evaluation noise
SW_SEED = 99  # projections of the sliced Wasserstein distance (the same for every row)
NFES = (4, 5, 6, 8, 10, 15, 20, 35, 50)
RATIO_NFES = (5, 10, 20)
# Candidates of the sampler search (each gets the full grid search; the others are shown on the
# Karras grid). Above NFE 20, outside the goal range, only unipc is searched, to save time.
SEARCH_SAMPLERS = ("unipc", ("unipc", {"order": 3}), "dpmpp_3m")


@dataclass
class Row:
    name: str
    group: str  # "polydiff" or "peer"
    err: dict = field(default_factory=dict)  # budget -> endpoint RMS error
    sw: dict = field(default_factory=dict)  # budget -> SW2
    nfe: dict = field(default_factory=dict)  # budget -> NFE actually used
    note: dict = field(default_factory=dict)  # budget -> short text (e.g. chosen sampler)


def fast_mixture_denoiser(mix: GaussianMixture, path):
    """``D(x, t)`` of :meth:`GaussianMixture.denoise` for ``(B, d)`` inputs sharing one ``t``.

    With diagonal variances ``var_k = alpha^2 v_k + sigma^2`` the log densities are
    ``x^2 . (1/var_k) - 2 alpha x . (mu_k / var_k) + const_k`` and the posterior mean is
    ``r @ mu + alpha x (r @ (v / var)) - alpha^2 r @ (v mu / var)``: matrix products only.
    Falls back to ``mix.denoise`` when the batch mixes times.
    """
    mu, v = mix.means, mix.variances
    logw = torch.log(mix.weights)

    def D(x: Tensor, t) -> Tensor:
        t = torch.as_tensor(t, dtype=torch.float64)
        if t.ndim == 0:
            t = t.expand(x.shape[0])
        if x.ndim != 2 or not bool((t == t[0]).all()):
            return mix.denoise(x, t, path)
        a, s = path.alpha(t[0]), path.sigma(t[0])
        x64 = x.to(torch.float64)
        var = a * a * v + s * s
        inv = 1.0 / var
        const = (a * a) * (mu * mu * inv).sum(1) + torch.log(2 * math.pi * var).sum(1)
        quad = (x64 * x64) @ inv.T - (2 * a) * (x64 @ (mu * inv).T)
        r = torch.softmax(logw - 0.5 * (quad + const), dim=1)
        g = a * v * inv
        return (r @ mu + x64 * (r @ g) - a * (r @ (g * mu))).to(x.dtype)

    return D


def pf_ode_reference(D, x: Tensor, rtol: float, sigma_end: float = 1e-6) -> Tensor:
    """PF-ODE endpoint in ``u = log sigma`` with torchdiffeq's dopri8, then the exact step to sigma = 0."""
    from torchdiffeq import odeint

    n = x.shape[0]

    def f(u, y):
        return y - D(y, (torch.exp(u) / SIGMA_MAX).expand(n))

    u = torch.tensor([math.log(SIGMA_MAX), math.log(sigma_end)], dtype=torch.float64)
    y = odeint(f, x.to(torch.float64), u, rtol=rtol, atol=rtol, method="dopri8")[-1]
    return D(y, torch.full((n,), sigma_end / SIGMA_MAX, dtype=torch.float64))


class Scorer:
    def __init__(self, ref: Tensor, exact: Tensor):
        self.ref, self.exact = ref, exact

    def __call__(self, out: Tensor) -> tuple[float, float]:
        out = out.to(torch.float64)
        err = float((out - self.ref).pow(2).mean().sqrt())
        sw = sliced_wasserstein(out, self.exact, n_proj=256, generator=torch.Generator().manual_seed(SW_SEED))
        return err, sw


def _record(row: Row, budget: int, result, score, note: str | None = None):
    out, nfe = result
    if nfe > budget:
        raise RuntimeError(f"{row.name} used {nfe} > {budget} evaluations")
    row.err[budget], row.sw[budget] = score(out)
    row.nfe[budget] = nfe
    if note:
        row.note[budget] = note


def _adaptive_runs(run, tols, max_budget: int) -> list[tuple[float, int, Tensor]]:
    """Run an adaptive solver over tolerances (loose to tight) until its NFE passes the largest budget."""
    out = []
    for tol in tols:
        x, nfe = run(tol)
        out.append((tol, nfe, x))
        if nfe > max_budget:
            break
    return out


def _pick_adaptive(runs, budget):
    """The run with the most evaluations within ``budget`` (the tightest tolerance among ties)."""
    fit = [r for r in runs if r[1] <= budget]
    if not fit:
        return None
    return max(fit, key=lambda r: (r[1], -r[0]))


def run_dimension(
    dim: int,
    n: int,
    n_pool: int,
    n_calib: int,
    budgets,
    optimise_budgets,
    search: dict,
    log,
    check_adapters=True,
    mixture_seed: int = MIXTURE_SEED,
    eval_seed: int = EVAL_SEED,
):
    path = EDMPath(sigma_max=SIGMA_MAX, sigma_min=peers.SIGMA_MIN)
    mix = GaussianMixture.random(dim=dim, n_components=8, seed=mixture_seed)
    D = fast_mixture_denoiser(mix, path)

    def D_edm(x, sigma):  # the peers' denoiser in sigma
        return D(x, sigma / SIGMA_MAX)

    g = torch.Generator().manual_seed(eval_seed)
    x = SIGMA_MAX * torch.randn(n, dim, generator=g, dtype=torch.float64)
    exact = mix.sample(n, generator=g, dtype=torch.float64)
    probe = 3.0 * torch.randn(64, dim, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    for tv in (1.0, 0.05, 1e-4, 0.0):
        tt = torch.full((64,), tv, dtype=torch.float64)
        dev = float((D(probe, tt) - mix.denoise(probe, tt, path)).abs().max())
        if dev > 1e-9:
            raise RuntimeError(f"fast mixture denoiser deviates from GaussianMixture.denoise by {dev} at t={tv}")

    t0 = time.time()
    ref = pf_ode_reference(D, x, 1e-10)
    ref_check = pf_ode_reference(D, x, 1e-8)
    log(
        f"\n=== d={dim}: {n} samples, Gaussian mixture with 8 components (seed {mixture_seed}), EDM path sigma_max=80 ==="
    )
    log(
        f"reference: dopri8 in log sigma, rtol=atol=1e-10; max |x_ref(1e-10) - x_ref(1e-8)| = "
        f"{float((ref - ref_check).abs().max()):.1e} ({time.time() - t0:.1f}s)"
    )
    score = Scorer(ref, exact)
    rows: list[Row] = []
    floor_sw = sliced_wasserstein(ref, exact, n_proj=256, generator=torch.Generator().manual_seed(SW_SEED))

    # -- polydiff on the Karras grid ------------------------------------------------------------
    t0 = time.time()
    det = [name for name, s in SAMPLERS.items() if not s.stochastic]
    for name in det:
        row = Row(f"polydiff {name}", "polydiff")
        spec = SAMPLERS[name]
        if spec.nfe is None:  # adaptive: pick the tolerance per budget
            runs = _adaptive_runs(
                lambda tol, spec=spec: spec.fn(D, path, x, karras_grid(path, 2), rtol=tol, atol=tol),
                np.geomspace(1e-1, 1e-9, 17),
                max(budgets),
            )
            for b in budgets:
                r = _pick_adaptive(runs, b)
                if r is not None:
                    _record(row, b, (r[2], r[1]), score, f"tol {r[0]:.0e}")
        else:
            for b in budgets:
                try:
                    steps = steps_for_nfe(name, b)
                except ValueError:
                    continue
                _record(row, b, spec.fn(D, path, x, karras_grid(path, steps)), score)
        rows.append(row)
    log(f"polydiff Karras rows: {time.time() - t0:.1f}s")

    # -- polydiff with a searched sampler and grid ------------------------------------------------
    if optimise_budgets:
        t0 = time.time()
        gc = torch.Generator().manual_seed(CALIB_SEED)
        x_pool = SIGMA_MAX * torch.randn(n_pool, dim, generator=gc, dtype=torch.float64)
        ref_pool = pf_ode_reference(D, x_pool, 1e-8)
        row = Row("polydiff optimised grid", "polydiff")
        for b in optimise_budgets:
            res = best_sampler_and_grid(
                D,
                path,
                b,
                samplers=SEARCH_SAMPLERS if b <= max(RATIO_NFES) else SEARCH_SAMPLERS[:1],
                x_calib=x_pool,
                reference=ref_pool,
                n_calib=n_calib,
                generator=torch.Generator().manual_seed(CALIB_SEED + b),
                **search,
                # with at most 5 interior points the loss has several local minima and runs are
                # cheap: local searches from the three best starts instead of one
                restarts=3 if b <= 6 else 1,
            )
            label = res.sampler + "".join(f" {k}={v}" for k, v in res.options.items())
            _record(row, b, SAMPLERS[res.sampler].fn(D, path, x, res.grid, **res.options), score, label)
            log(
                f"  NFE {b:2d}: {label:15s} calibration error {res.init_error:.3e} (Karras) -> {res.error:.3e} "
                f"(whole pool {res.pool_error:.3e}), {res.evaluations} sampler runs; sigmas "
                + " ".join(f"{s:.3g}" for s in (path.sigma(res.grid)).tolist())
            )
        rows.append(row)
        log(f"grid search ({n_pool} calibration noises, {n_calib} in the loss): {time.time() - t0:.1f}s")

    # -- peers -----------------------------------------------------------------------------------
    t0 = time.time()
    if peers.k_diffusion_available():
        for name, (_, cost, _) in peers.KD_SAMPLERS.items():
            row = Row(f"k-diffusion {name}", "peer")
            for b in budgets:
                steps = peers.steps_for_budget(cost, b)
                if steps is not None:
                    _record(row, b, peers.run_k_diffusion(name, D_edm, x, steps, seed=eval_seed), score)
            rows.append(row)
        row = Row("k-diffusion dpm_adaptive", "peer")
        span = math.log(SIGMA_MAX / peers.SIGMA_MIN)
        runs = []
        for h_init in (0.05, span / 4):  # the default first step, and one a quarter of the log-sigma span
            runs += _adaptive_runs(
                lambda tol, h=h_init: peers.run_k_diffusion_adaptive(D_edm, x, rtol=tol, atol=tol, h_init=h),
                np.geomspace(1.0, 1e-8, 17),
                max(budgets),
            )
        for b in budgets:
            r = _pick_adaptive(runs, b)
            if r is not None:
                _record(row, b, (r[2], r[1]), score, f"tol {r[0]:.0e}")
        rows.append(row)
    if peers.diffusers_available():
        for name, (_, _, cost, _) in peers.DIFFUSERS_SCHEDULERS.items():
            row = Row(f"diffusers {name}", "peer")
            for b in budgets:
                steps = peers.steps_for_budget(cost, b)
                if steps is not None:
                    _record(row, b, peers.run_diffusers(name, D_edm, x, steps), score)
            rows.append(row)
        lo, hi = peers.scheduler_sigma_range("dpmpp_2m")
        log(f"diffusers schedulers: trained betas give sigma in [{lo:.6g}, {hi:.6g}] (Euler: config [0.002, 80])")
    log(f"peer rows: {time.time() - t0:.1f}s")
    if check_adapters:
        k = min(256, n)
        adapter_check(D_edm, x[:k], ref[:k], log)

    print_tables(rows, budgets, dim, floor_sw, log)
    return rows


def adapter_check(D_edm, x: Tensor, ref: Tensor, log, steps=(25, 100, 400)):
    """Each deterministic peer must converge to the reference as its steps grow: print the errors
    and the observed order ``log2(e_n / e_4n) / 2`` (first order for Euler, about 2 or more for the rest).
    Runs on the given (small) subset; the Karras grid's last step from sigma = 0.002 leaves a floor near 1e-5."""
    lines = []
    cases = []
    if peers.k_diffusion_available():
        cases += [
            (f"k-diffusion {n}", lambda k, n=n: peers.run_k_diffusion(n, D_edm, x, k))
            for n in ("euler", "heun", "lms", "dpmpp_2m")
        ]
    if peers.diffusers_available():
        cases += [
            (f"diffusers {n}", lambda k, n=n: peers.run_diffusers(n, D_edm, x, k)) for n in peers.DIFFUSERS_SCHEDULERS
        ]
    for name, run in cases:
        errs = [float((run(k)[0] - ref).pow(2).mean().sqrt()) for k in steps]
        orders = [math.log2(errs[i] / errs[i + 1]) / math.log2(steps[i + 1] / steps[i]) for i in range(len(errs) - 1)]
        lines.append(
            f"  {name:<24s}"
            + "  ".join(f"{k} steps {e:.2e}" for k, e in zip(steps, errs))
            + "   order "
            + " ".join(f"{o:.2f}" for o in orders)
        )
    if lines:
        log(f"adapter check on {x.shape[0]} samples (peer error vs steps; must shrink towards the 1e-5 floor):")
        for line in lines:
            log(line)


def _fmt(v):
    return "       -" if v is None else f"{v:8.2e}"


def print_tables(rows, budgets, dim, floor_sw, log):
    width = max(len(r.name) for r in rows) + 2
    head = "".join(f"{'NFE ' + str(b):>10s}" for b in budgets)
    for title, key in (("endpoint error (RMS over samples and dims)", "err"), ("SW2 to exact samples", "sw")):
        log(f"\nd={dim}  {title}")
        log(" " * width + head)
        for r in rows:
            vals = getattr(r, key)
            log(f"{r.name:<{width}s}" + "".join(f"  {_fmt(vals.get(b))}" for b in budgets))
        if key == "sw":
            log(f"{'(reference endpoints)':<{width}s}" + f"  {_fmt(floor_sw)}  (sampling floor of SW2 at this n)")
    odd = [r for r in rows if any(r.nfe.get(b) != b for b in r.nfe)]
    if odd:
        log("NFE actually used where it differs from the budget:")
        for r in odd:
            log(f"  {r.name}: " + ", ".join(f"{b}->{r.nfe[b]}" for b in budgets if b in r.nfe and r.nfe[b] != b))
    notes = [r for r in rows if r.note and r.group == "polydiff" and "optimised" in r.name]
    for r in notes:
        log(f"  {r.name} sampler: " + ", ".join(f"{b}:{r.note[b]}" for b in budgets if b in r.note))


def ratios(rows, budgets):
    out = {}
    for b in budgets:
        ours = [r.err[b] for r in rows if r.group == "polydiff" and b in r.err]
        theirs = [r.err[b] for r in rows if r.group == "peer" and b in r.err]
        if ours and theirs:
            out[b] = min(ours) / min(theirs)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="smoke run: few samples and budgets, short search")
    p.add_argument("--dims", default="2,64", help="comma-separated dimensions (default 2,64)")
    p.add_argument("--n", type=int, default=None, help="evaluation samples per dimension (default 4096)")
    p.add_argument("--nfe", default=None, help="comma-separated budgets (default 4,5,6,8,10,15,20,35,50)")
    p.add_argument("--no-optimise", action="store_true", help="skip the grid search")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--mixture-seed", type=int, default=MIXTURE_SEED, help=f"mixture seed (default {MIXTURE_SEED})")
    p.add_argument("--eval-seed", type=int, default=EVAL_SEED, help=f"evaluation noise seed (default {EVAL_SEED})")
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    if a.quick:
        n, n_pool, n_calib = a.n or 256, 512, 128
        search = {"iters": 3, "max_params": 4}
        budgets = tuple(int(v) for v in a.nfe.split(",")) if a.nfe else (5, 10, 20)
    else:
        n, n_pool, n_calib = a.n or 4096, 8192, 1024
        search = {"iters": 15, "max_params": 8}
        budgets = tuple(int(v) for v in a.nfe.split(",")) if a.nfe else NFES
    optimise_budgets = () if a.no_optimise else budgets
    dims = [int(v) for v in a.dims.split(",")]
    if not peers.diffusers_available() or not peers.k_diffusion_available():
        print("note: k-diffusion and/or diffusers are not installed; their rows are missing", file=sys.stderr)

    def log(msg=""):
        print(msg, flush=True)

    t_all = time.time()
    worst: dict[int, float] = {}
    for dim in dims:
        rows = run_dimension(
            dim, n, n_pool, n_calib, budgets, optimise_budgets, search, log, not a.quick, a.mixture_seed, a.eval_seed
        )
        r = ratios(rows, budgets)
        log(
            f"\nd={dim} ratio polydiff_best/peer_best endpoint error: "
            + "  ".join(f"NFE{b} {v:.2f}" for b, v in r.items())
        )
        for b, v in r.items():
            worst[b] = max(worst.get(b, 0.0), v)
    log(f"\ntotal {time.time() - t_all:.0f}s; last line: the larger ratio over d in {dims}")
    log(
        "ratio polydiff_best/peer_best endpoint error: "
        + "  ".join(f"NFE{b} {worst[b]:.2f}" if b in worst else f"NFE{b} n/a" for b in RATIO_NFES)
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
