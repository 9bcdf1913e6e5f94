"""Optimised time grids (core/grid_search.py).

The held-out reference comes from torchdiffeq's dopri8 in log sigma, not from core's dopri5 that
the optimiser itself uses, and the optimiser never sees the held-out noise.
"""

import math

import numpy as np
import pytest
import torch

from core.grid_search import (
    _GridParam,
    _stratify,
    best_sampler_and_grid,
    grid_error,
    optimise_grid,
    reference_endpoints,
)
from core.grids import karras_grid, uniform_t_grid, validate_grid
from core.mixture import GaussianMixture
from core.paths import EDMPath, get_path
from core.samplers import SAMPLERS

EDM = EDMPath()


def _mixture():
    return GaussianMixture.random(dim=2, n_components=4, seed=3)


def _dopri8_reference(mix, x, sigma_end=1e-6):
    """Independent PF-ODE solve on the EDM path: dx/du = x - D(x, e^u), u = log sigma."""
    from torchdiffeq import odeint

    n = x.shape[0]

    def f(u, y):
        return y - mix.denoise(y, (torch.exp(u) / 80.0).expand(n), EDM)

    u = torch.tensor([math.log(80.0), math.log(sigma_end)], dtype=torch.float64)
    y = odeint(f, x, u, rtol=1e-10, atol=1e-10, method="dopri8")[-1]
    return mix.denoise(y, torch.full((n,), sigma_end / 80.0, dtype=torch.float64), EDM)


@pytest.fixture(scope="module")
def held_out():
    mix = _mixture()
    x = 80.0 * torch.randn(256, 2, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    return mix, x, _dopri8_reference(mix, x)


def test_reference_endpoints_match_closed_form_single_gaussian():
    g = GaussianMixture(torch.ones(1), torch.tensor([[0.5, -1.0]]), torch.tensor([[0.04, 0.2]]))
    x = 80.0 * torch.randn(64, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    ref = reference_endpoints(g.denoiser(EDM), EDM, x, 1.0)
    exact = g.pf_ode_exact(x, 1.0, 0.0, EDM)
    assert float((ref - exact).abs().max()) < 1e-6


def test_reference_endpoints_agree_with_independent_solver(held_out):
    mix, x, ref = held_out
    ours = reference_endpoints(mix.denoiser(EDM), EDM, x[:64], 1.0)
    assert float((ours - ref[:64]).abs().max()) < 1e-5


@pytest.mark.parametrize("sampler,nfe", [("unipc", 6), ("dpmpp_2m", 8)])
def test_optimised_grid_beats_karras_on_held_out_noise(held_out, sampler, nfe):
    mix, x, ref = held_out
    D = mix.denoiser(EDM)
    grid, info = optimise_grid(
        sampler,
        D,
        EDM,
        nfe,
        shape=(2,),
        n_calib=128,
        generator=torch.Generator().manual_seed(0),
        iters=8,
        max_params=6,
        return_info=True,
    )
    karras = karras_grid(EDM, nfe)
    err_opt = grid_error(sampler, D, EDM, grid, x, ref)
    err_karras = grid_error(sampler, D, EDM, karras, x, ref)
    # the calibration error went down, and so did the error on noise the optimiser never saw
    assert info.error < 0.8 * info.init_error
    assert err_opt < 0.5 * err_karras, (err_opt, err_karras)
    # a valid grid of the same length, ends unchanged, and the sampler spends exactly the budget
    g = validate_grid(grid)
    assert len(g) == len(karras)
    assert float(g[0]) == float(karras[0]) and float(g[-1]) == 0.0
    assert bool((g >= 0).all()) and bool((g <= 1).all()) and bool((g[1:] < g[:-1]).all())
    _, used = SAMPLERS[sampler].fn(D, EDM, x[:4], grid)
    assert used == nfe


def test_reproducible_with_the_same_generator():
    mix = _mixture()
    D = mix.denoiser(EDM)
    kw = dict(shape=(2,), n_calib=64, iters=3, max_params=4, restarts=1)
    a = optimise_grid("dpmpp_2m", D, EDM, 5, generator=torch.Generator().manual_seed(7), **kw)
    b = optimise_grid("dpmpp_2m", D, EDM, 5, generator=torch.Generator().manual_seed(7), **kw)
    c = optimise_grid("dpmpp_2m", D, EDM, 5, generator=torch.Generator().manual_seed(8), **kw)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_heun_budget_and_never_worse_than_init():
    mix = _mixture()
    D = mix.denoiser(EDM)
    # heun: 2 evaluations per step and 1 on the last, so 7 NFE buys 4 steps
    grid, info = optimise_grid(
        "heun",
        D,
        EDM,
        7,
        shape=(2,),
        n_calib=64,
        generator=torch.Generator().manual_seed(0),
        iters=2,
        max_params=3,
        restarts=1,
        return_info=True,
    )
    assert len(grid) == 5
    assert info.error <= info.init_error
    x = 80.0 * torch.randn(8, 2, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    assert SAMPLERS["heun"].fn(D, EDM, x, grid)[1] == 7


def test_bad_input_raises():
    D = _mixture().denoiser(EDM)
    kw = dict(shape=(2,), n_calib=8, iters=1)
    with pytest.raises(ValueError, match="no_such_sampler"):
        optimise_grid("no_such_sampler", D, EDM, 5, **kw)
    with pytest.raises(ValueError, match="heun"):
        optimise_grid("heun", D, EDM, 2, **kw)  # heun needs 3 NFE at least
    with pytest.raises(ValueError, match="stochastic"):
        optimise_grid("euler_maruyama", D, EDM, 5, **kw)
    with pytest.raises(ValueError, match="adaptive"):
        optimise_grid("dopri5", D, EDM, 20, **kw)
    with pytest.raises(ValueError, match="nfe"):
        optimise_grid("euler", D, EDM, 0, **kw)
    with pytest.raises(ValueError, match="steps"):
        optimise_grid("euler", D, EDM, 5, init=karras_grid(EDM, 3), **kw)
    with pytest.raises(ValueError, match="method"):
        optimise_grid("euler", D, EDM, 5, method="adam", **kw)
    with pytest.raises(ValueError, match="shape"):
        optimise_grid("euler", D, EDM, 5, n_calib=8, iters=1)
    with pytest.raises(ValueError, match="reference"):
        optimise_grid("euler", D, EDM, 5, reference=torch.zeros(3, 2), **kw)
    with pytest.raises(ValueError, match="fits"):
        best_sampler_and_grid(D, EDM, 2, samplers=["heun"], **kw)
    with pytest.raises(ValueError, match="stochastic"):
        best_sampler_and_grid(D, EDM, 5, samplers=["unipc", "pc"], **kw)


@pytest.mark.parametrize(
    "name,kwargs,grid_fn",
    [
        ("edm", {}, lambda p: karras_grid(p, 7)),  # finite start, lands on data (lambda = +inf)
        ("vp", {}, lambda p: karras_grid(p, 6)),
        ("linear", {}, lambda p: uniform_t_grid(p, 6)),  # from alpha = 0 (lambda = -inf) to data (t_min = 0)
        ("ve", {}, lambda p: karras_grid(p, 6)),  # VE ends at sigma_min > 0: both lambda ends finite
        ("gvp", {"t_min": 0.01}, lambda p: uniform_t_grid(p, 5)),  # from pure noise to t_min > 0
    ],
)
def test_parametrisation_round_trip_and_always_valid(name, kwargs, grid_fn):
    path = get_path(name, **kwargs)
    g0 = grid_fn(path)
    for max_params in (None, 3):
        param = _GridParam(path, g0, max_params)
        torch.testing.assert_close(param.grid_of(np.zeros(param.n_params)), g0, rtol=1e-9, atol=1e-12)
        rng = np.random.default_rng(0)
        for _ in range(20):
            g = param.grid_of(rng.normal(scale=1.5, size=param.n_params))
            validate_grid(g)  # strictly decreasing, in [0, 1]
            assert len(g) == len(g0) and float(g[0]) == float(g0[0]) and float(g[-1]) == float(g0[-1])


def test_stratified_subsample_is_unbiased():
    gen = torch.Generator().manual_seed(0)
    err = torch.rand(400, generator=gen, dtype=torch.float64) ** 8  # heavy tail
    y = err + 0.1 * torch.rand(400, generator=gen, dtype=torch.float64)  # another grid's errors
    idx, w = _stratify(err, 40, gen)
    assert len(set(idx.tolist())) == 40
    assert set(torch.argsort(err, descending=True)[:10].tolist()) <= set(idx.tolist())
    assert float(w.sum()) == pytest.approx(1.0)
    est = [float((w * y[_stratify(err, 40, gen)[0]]).sum()) for _ in range(3000)]
    assert np.mean(est) == pytest.approx(float(y.mean()), rel=0.01)


def test_best_sampler_and_grid_picks_a_candidate_no_worse_than_karras():
    mix = _mixture()
    D = mix.denoiser(EDM)
    gen = torch.Generator().manual_seed(0)
    x = 80.0 * torch.randn(192, 2, generator=gen, dtype=torch.float64)
    ref = reference_endpoints(D, EDM, x, 1.0)
    cands = [("ddim", {}), ("dpmpp_2m", {}), ("unipc", {"order": 3})]
    res = best_sampler_and_grid(
        D,
        EDM,
        6,
        samplers=["ddim", "dpmpp_2m", ("unipc", {"order": 3})],
        x_calib=x,
        reference=ref,
        n_calib=96,
        generator=gen,
        iters=4,
        max_params=4,
    )
    assert (res.sampler, res.options) in cands
    assert res.error <= res.init_error
    assert res.nfe == 6 and len(res.grid) == 7
    # the winner is ranked on the whole pool, and beats every candidate's Karras grid there
    assert res.pool_error == pytest.approx(grid_error(res.sampler, D, EDM, res.grid, x, ref, **res.options))
    for name, opts in cands:
        assert res.pool_error < grid_error(name, D, EDM, karras_grid(EDM, 6), x, ref, **opts)


def test_derivative_free_method_also_improves(held_out):
    mix, x, ref = held_out
    D = mix.denoiser(EDM)
    grid, info = optimise_grid(
        "dpmpp_2m",
        D,
        EDM,
        5,
        shape=(2,),
        n_calib=64,
        generator=torch.Generator().manual_seed(0),
        iters=10,
        method="nelder-mead",
        restarts=0,
        return_info=True,
    )
    assert info.error < 0.7 * info.init_error
    assert grid_error("dpmpp_2m", D, EDM, grid, x, ref) < grid_error("dpmpp_2m", D, EDM, karras_grid(EDM, 5), x, ref)
