"""Stochastic samplers (core/samplers/sde.py) against the exact Gaussian-mixture oracle.

Distribution tests: a sampler run with the exact denoiser should produce samples that are, in
sliced Wasserstein distance, as close to exact mixture samples as two independent exact sample
sets are to each other. The "noise floor" is the mean SW over several pairs of exact sets of the
same size; a correct sampler with enough steps lands near ratio 1, and we assert ratio < FACTOR.
The SW between two exact sets of 4000 points scatters by about 40 % (2D) and 20 % (16D) around
its mean (measured over 30 pairs), so FACTOR = 2 leaves a correct sampler room of about 2.5
standard deviations, while the errors below (too few steps, a wrong sign in the drift, the
noise-selection bias of the adaptive solver without Brownian memory) land well above it.
"""

from __future__ import annotations

import functools
import math

import pytest
import torch

from core.grids import make_grid
from core.mixture import GaussianMixture, sliced_wasserstein
from core.paths import get_path
from core.samplers import SAMPLERS, sample
from core.samplers.sde import (
    W_FORMS,
    _brownian_increment,
    _drop_leading,
    _sde_drift,
    adaptive_sde,
    ancestral,
    diffusion_fn,
    euler_maruyama,
    pc,
)

N = 4000
FACTOR = 2.0
MIXTURES = {2: GaussianMixture.random(2, 6, seed=3), 16: GaussianMixture.random(16, 5, seed=4)}


def sw(a: torch.Tensor, b: torch.Tensor) -> float:
    # the same 256 directions for every comparison
    return sliced_wasserstein(a, b, n_proj=256, generator=torch.Generator().manual_seed(0))


@functools.cache
def reference(dim: int) -> tuple[torch.Tensor, float]:
    """Exact samples to compare against and the two-sample noise floor (mean over 4 pairs)."""
    mix = MIXTURES[dim]
    g = torch.Generator().manual_seed(100 + dim)
    ref = mix.sample(N, generator=g, dtype=torch.float64)
    pairs = [
        (mix.sample(N, generator=g, dtype=torch.float64), mix.sample(N, generator=g, dtype=torch.float64))
        for _ in range(4)
    ]
    return ref, sum(sw(a, b) for a, b in pairs) / len(pairs)


def start(mix: GaussianMixture, path, t0: float, n: int = N, seed: int = 1) -> torch.Tensor:
    """Exact draws of the marginal at the grid's first time (no prior mismatch in the test)."""
    g = torch.Generator().manual_seed(seed)
    x0 = mix.sample(n, generator=g, dtype=torch.float64)
    return path.sample(x0, torch.tensor(t0, dtype=torch.float64), generator=g)[0]


def run(name, dim, path_name, steps, seed=7, **options):
    mix, path = MIXTURES[dim], get_path(path_name)
    grid = make_grid("karras", path, steps) if steps is not None else make_grid("karras", path, 10)
    D = mix.denoiser(path)
    out, nfe = sample(
        name, D, path, start(mix, path, float(grid[0])), grid, generator=torch.Generator().manual_seed(seed), **options
    )
    assert nfe == D.nfe, f"{name}: returned NFE {nfe} but the denoiser ran {D.nfe} times"
    return out, nfe


CASES = [
    # (sampler, path, steps, options)
    ("euler_maruyama", "vp", 150, {}),
    ("ancestral", "vp", 100, {}),
    ("pc", "vp", 80, {}),
    ("adaptive_sde", "vp", None, {}),
]
CASES_2D_ONLY = [
    ("euler_maruyama", "vp", 150, {"w": "sigma"}),
    ("euler_maruyama", "edm", 150, {}),
    ("euler_maruyama", "linear", 150, {"w": "decreasing"}),
    ("ancestral", "vp", 100, {"eta": 0.5}),
    ("ancestral", "linear", 100, {}),
    ("pc", "edm", 80, {"predictor": "euler_maruyama"}),
]


@pytest.mark.parametrize(
    "dim, name, path_name, steps, options",
    [(d, *c) for d in (2, 16) for c in CASES] + [(2, *c) for c in CASES_2D_ONLY],
    ids=lambda v: str(v) if not isinstance(v, dict) else ",".join(f"{k}={x}" for k, x in v.items()) or "default",
)
def test_matches_exact_mixture_within_noise_floor(dim, name, path_name, steps, options):
    ref, floor = reference(dim)
    out, nfe = run(name, dim, path_name, steps, **options)
    ratio = sw(out, ref) / floor
    print(f"{dim}D {path_name} {name} {options} nfe={nfe}: SW={sw(out, ref):.4f} floor={floor:.4f} ratio={ratio:.2f}")
    assert ratio < FACTOR, f"SW {sw(out, ref):.4f} is {ratio:.2f} x the noise floor {floor:.4f}"


@pytest.mark.parametrize("dim", [2, 16])
def test_distribution_test_detects_errors(dim):
    """The SW test can fail: too few steps, and a drift with the wrong sign of w, land far above."""
    ref, floor = reference(dim)
    coarse, _ = run("euler_maruyama", dim, "vp", 4)
    assert sw(coarse, ref) > 3 * floor
    # Euler-Maruyama with the drift of w = -g^2 but the noise of w = +g^2: not the reverse SDE.
    mix, path = MIXTURES[dim], get_path("vp")
    grid = make_grid("karras", path, 100)
    x, g = start(mix, path, float(grid[0])), torch.Generator().manual_seed(7)
    D = mix.denoiser(path)
    for t, s in zip(grid[:-2], grid[1:-1]):
        w = path.g2(t)
        x = (
            x
            + (s - t) * _sde_drift(path, x, D(x, t), t, -w)
            + torch.sqrt((t - s) * w) * torch.randn(x.shape, generator=g, dtype=x.dtype)
        )
    x = D(x, grid[-2])
    ratio = sw(x, ref) / floor
    print(f"{dim}D wrong-sign w: ratio {ratio:.1f}; 4-step EM: ratio {sw(coarse, ref) / floor:.1f}")
    assert ratio > 3


# --------------------------------------------------------------------------- euler_maruyama


def euler_pf_ode_by_score(mix, path, x, grid):
    """Independent Euler loop on dx/dt = f x - g^2/2 score with the mixture's exact score."""
    for t, s in zip(grid[:-1], grid[1:]):
        x = x + (s - t) * (path.f(t) * x - 0.5 * path.g2(t) * mix.score(x, t, path))
    return x


def test_w_zero_is_the_euler_pf_ode():
    mix, path = MIXTURES[2], get_path("vp")
    grid = make_grid("karras", path, 25, final_zero=False)
    x = start(mix, path, float(grid[0]), n=64)
    ref = euler_pf_ode_by_score(mix, path, x, grid)
    for w in (0.0, lambda t: torch.zeros_like(t)):
        out, nfe = euler_maruyama(mix.denoiser(path), path, x, grid, w=w, generator=torch.Generator().manual_seed(0))
        torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)
        assert nfe == 25
    out, _ = euler_maruyama(mix.denoiser(path), path, x, grid, w="g2", w_norm=0.0)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)
    # and the ODE module's euler, on a grid that ends at t = 0 (both return alpha(0) D there)
    if "euler" in SAMPLERS:
        grid0 = make_grid("karras", path, 25)
        a, _ = euler_maruyama(mix.denoiser(path), path, x, grid0, w=0.0)
        b, _ = SAMPLERS["euler"].fn(mix.denoiser(path), path, x, grid0)
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_w_forms_match_sit_diffusion_forms():
    """Our w(t) = 2 * SiT's compute_diffusion at t_SiT = 1 - t, on SiT's linear interpolant
    (alpha_SiT = t_SiT, sigma_SiT = 1 - t_SiT), with SiT's formulas written out here."""
    path = get_path("linear")
    t = torch.linspace(0.05, 0.95, 7, dtype=torch.float64)
    ts = 1 - t
    norm = 0.7
    sit = {
        "g2": norm * ((1 / ts) * (1 - ts) ** 2 + (1 - ts)),  # SBDM: alpha'/alpha sigma^2 - sigma sigma'
        "sigma": norm * (1 - ts),
        "linear": norm * (1 - ts),
        "decreasing": 0.25 * (norm * torch.cos(math.pi * ts) + 1) ** 2,
        "increasing-decreasing": norm * torch.sin(math.pi * ts) ** 2,
        "constant": torch.full_like(t, norm),
    }
    assert set(sit) == set(W_FORMS)
    for form, eps in sit.items():
        torch.testing.assert_close(diffusion_fn(form, path, norm)(t), 2 * eps, msg=form)
    # "g2" is Song's reverse SDE: w = g^2
    torch.testing.assert_close(diffusion_fn("g2", path)(t), path.g2(t))
    torch.testing.assert_close(diffusion_fn(0.5, path)(t), 0.5 * path.g2(t))


def test_g2_forms_agree_and_last_step_options():
    mix, path = MIXTURES[2], get_path("ve")
    grid = make_grid("karras", path, 30)  # VE ends at sigma_min > 0: last_step matters
    assert float(path.sigma(grid[-1])) > 0
    x = start(mix, path, float(grid[0]), n=256)
    outs = [
        euler_maruyama(mix.denoiser(path), path, x, grid, w=w, generator=torch.Generator().manual_seed(3))[0]
        for w in ("g2", 1.0, path.g2)
    ]
    torch.testing.assert_close(outs[0], outs[1], rtol=0, atol=0)
    torch.testing.assert_close(outs[0], outs[2], rtol=0, atol=0)
    seen = []
    den, nfe = euler_maruyama(
        mix.denoiser(path),
        path,
        x,
        grid,
        last_step="denoise",
        generator=torch.Generator().manual_seed(3),
        callback=lambda i, t, xx, d: seen.append((i, t, xx, d)),
    )
    assert nfe == 30 and [s[0] for s in seen] == list(range(30)) and seen[-1][1] == float(grid[-2])
    torch.testing.assert_close(den, seen[-1][3])  # Tweedie: D at the last evaluated time
    # "mean" and "none" share every draw but the last step's noise
    m, _ = euler_maruyama(
        mix.denoiser(path), path, x, grid, last_step="mean", generator=torch.Generator().manual_seed(3)
    )
    full, _ = euler_maruyama(
        mix.denoiser(path), path, x, grid, last_step="none", generator=torch.Generator().manual_seed(3)
    )
    noise = (full - m).std() / math.sqrt(float((grid[-2] - grid[-1]) * path.g2(grid[-2])))
    assert 0.85 < noise < 1.15


def test_g2_is_rejected_where_alpha_vanishes():
    path = get_path("linear")
    mix = MIXTURES[2]
    grid = make_grid("uniform", path, 10)  # starts at t = 1, where g^2 is infinite
    x = torch.randn(8, 2, dtype=torch.float64)
    with pytest.raises(ValueError, match="w="):
        euler_maruyama(mix.denoiser(path), path, x, grid)
    out, _ = euler_maruyama(mix.denoiser(path), path, x, grid, w="sigma")  # finite w is fine at alpha = 0
    assert bool(torch.isfinite(out).all())
    out, _ = ancestral(mix.denoiser(path), path, x, grid)
    assert bool(torch.isfinite(out).all())


# --------------------------------------------------------------------------- ancestral


def test_ancestral_step_is_the_gaussian_posterior():
    """One step with a fixed x0 prediction: mean and variance of Ho et al. eq. 7 written for a
    general path, mu = alpha_{t|s} sigma_s^2 / sigma_t^2 x_t + alpha_s sigma_{t|s}^2 / sigma_t^2 x0."""
    for name in ("vp", "cosine", "edm", "linear"):
        path = get_path(name)
        t, s = torch.tensor(0.6, dtype=torch.float64), torch.tensor(0.35, dtype=torch.float64)
        x0 = torch.randn(5, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
        xt = torch.randn(5, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
        out, _ = ancestral(
            lambda x, tt, x0=x0: x0, path, xt, torch.stack([t, s]), generator=torch.Generator().manual_seed(2)
        )
        a_t, s_t, a_s, s_s = path.alpha(t), path.sigma(t), path.alpha(s), path.sigma(s)
        a_ts = a_t / a_s
        var_ts = s_t**2 - a_ts**2 * s_s**2
        mu = a_ts * s_s**2 / s_t**2 * xt + a_s * var_ts / s_t**2 * x0
        z = torch.randn(5, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
        torch.testing.assert_close(out, mu + torch.sqrt(var_ts * s_s**2 / s_t**2) * z, rtol=1e-10, atol=1e-10, msg=name)


def test_ancestral_matches_the_ode_modules_stochastic_ddim():
    if "ddim" not in SAMPLERS:
        pytest.skip("core.samplers.ode has no ddim")
    mix, path = MIXTURES[2], get_path("vp")
    grid = make_grid("karras", path, 20)
    x = start(mix, path, float(grid[0]), n=128)
    for eta in (0.0, 0.6, 1.0):
        a, _ = ancestral(mix.denoiser(path), path, x, grid, eta=eta, generator=torch.Generator().manual_seed(4))
        b, _ = SAMPLERS["ddim"].fn(
            mix.denoiser(path), path, x, grid, eta=eta, generator=torch.Generator().manual_seed(4)
        )
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)


# --------------------------------------------------------------------------- pc


def test_pc_nfe_and_budget():
    mix, path = MIXTURES[2], get_path("vp")
    x = start(mix, path, 1.0, n=32)
    for k in (0, 1, 3):
        D = mix.denoiser(path)
        _, nfe = pc(D, path, x, 10, n_corrector=k, generator=torch.Generator().manual_seed(0))
        assert nfe == D.nfe == 10 * (1 + k)
    D = mix.denoiser(path)
    _, nfe = sample("pc", D, path, x, nfe=21, generator=torch.Generator().manual_seed(0))
    assert nfe == D.nfe == 20


def test_pc_corrector_alone_relaxes_to_the_marginal():
    """Langevin steps at one time with the exact score turn a wrong start into p_t: many corrector
    steps then a denoise-free return (last_step='mean' of a 1-step grid to a nearby time)."""
    mix, path = MIXTURES[2], get_path("edm")
    t = 0.5 / path.sigma_max  # sigma = 0.5
    p_t_mean = mix.mean()
    x = p_t_mean + 0.1 * torch.randn(N, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    grid = torch.tensor([t, t * 0.999], dtype=torch.float64)
    out, nfe = pc(
        mix.denoiser(path), path, x, grid, n_corrector=150, snr=0.3, generator=torch.Generator().manual_seed(1)
    )
    g = torch.Generator().manual_seed(2)
    exact = path.sample(
        mix.sample(N, generator=g, dtype=torch.float64), torch.tensor(t, dtype=torch.float64), generator=g
    )[0]
    exact2 = path.sample(
        mix.sample(N, generator=g, dtype=torch.float64), torch.tensor(t, dtype=torch.float64), generator=g
    )[0]
    floor = sw(exact, exact2)
    print(f"Langevin-only: SW {sw(out, exact):.4f}, start {sw(x, exact):.4f}, floor {floor:.4f}")
    assert sw(x, exact) > 5 * floor and sw(out, exact) < 2.5 * floor


# --------------------------------------------------------------------------- adaptive_sde


def test_brownian_memory_keeps_the_path_brownian():
    """An adversarial accept rule that looks at the noise (reject any positive first try) leaves
    W(1) ~ N(0, 1) with memory; redrawing after rejection, as without memory, shifts its mean."""
    b = 20000
    g = torch.Generator().manual_seed(0)
    qdt, qdw = torch.zeros(b, 1, dtype=torch.float64), torch.zeros(b, 1, dtype=torch.float64)
    t = torch.zeros(b, dtype=torch.float64)
    total = torch.zeros(b, dtype=torch.float64)
    tries = torch.zeros(b, dtype=torch.int64)
    for _ in range(200):
        left = 1.0 - t
        if bool((left <= 1e-12).all()):
            break
        h = torch.where(tries == 0, left.clamp(max=0.5), left.clamp(max=0.25 * 0.5 ** tries.to(left)))
        h = torch.where(left > 1e-12, h, torch.full_like(h, 1e-3))
        dw, ndt, ndw, used = _brownian_increment(qdt, qdw, h, g)
        accept = ((dw <= 0) | (tries > 0)) & (left > 1e-12)
        ndt, ndw = _drop_leading(ndt, ndw, torch.where(accept, used, torch.zeros_like(used)))
        qdt, qdw = ndt, ndw
        total = torch.where(accept, total + dw, total)
        t = torch.where(accept, t + h, t)
        tries = torch.where(accept, torch.zeros_like(tries), tries + 1)
    assert bool((1.0 - t).abs().max() < 1e-9)
    se = 1 / math.sqrt(b)
    assert abs(float(total.mean())) < 4 * se and abs(float(total.var()) - 1) < 6 * math.sqrt(2) * se
    # The same rule with a fresh draw after each rejection: E W(1) is clearly negative.
    g = torch.Generator().manual_seed(0)
    fresh = torch.where(torch.randn(b, generator=g, dtype=torch.float64) <= 0, 0.0, 1.0)
    first = math.sqrt(0.5) * torch.randn(b, generator=g, dtype=torch.float64)
    biased = torch.where(
        first <= 0, first, math.sqrt(0.25) * torch.randn(b, generator=g, dtype=torch.float64)
    ) * fresh.new_ones(b)
    assert float(biased.mean()) < -10 * se


def single_gaussian_variance(memory: bool, eps_rel: float) -> float:
    mix = GaussianMixture(torch.ones(1), torch.zeros(1, 2), 0.05)
    path = get_path("vp")
    grid = make_grid("karras", path, 10)
    x = path.prior_sample((2000, 2), t=float(grid[0]), generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    out, _ = adaptive_sde(
        mix.denoiser(path),
        path,
        x,
        grid,
        eps_rel=eps_rel,
        brownian_memory=memory,
        generator=torch.Generator().manual_seed(2),
    )
    return float(out.var(0).mean()) / 0.05


def test_adaptive_without_memory_is_biased_in_low_dimension():
    """The paper's redraw-after-rejection over-disperses a 2D Gaussian (the accept test favours
    large |x'| through the relative tolerance); with Brownian memory the variance is right."""
    with_memory, without = single_gaussian_variance(True, 0.05), single_gaussian_variance(False, 0.05)
    print(f"variance / true: with memory {with_memory:.3f}, without {without:.3f}")
    assert abs(with_memory - 1) < 0.1 and without > 1.3


def test_adaptive_tighter_tolerance_costs_more_and_errs_less():
    # deterministic (w = 0): the strong error against the closed-form PF-ODE flow
    mix = GaussianMixture(torch.ones(1), torch.tensor([[0.5, -1.0]]), torch.tensor([[0.05, 0.2]]))
    path = get_path("vp")
    grid = make_grid("karras", path, 10)
    x = path.prior_sample((200, 2), t=float(grid[0]), generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    exact = mix.pf_ode_exact(x, float(grid[0]), float(grid[-2]), path)
    costs, errors = [], []
    for eps_rel, eps_abs in ((0.1, 0.02), (0.01, 0.002), (0.001, 0.0002)):
        D = mix.denoiser(path)
        out, nfe = adaptive_sde(D, path, x, grid, w=0.0, eps_rel=eps_rel, eps_abs=eps_abs, last_step="none")
        assert nfe == D.nfe
        costs.append(nfe)
        errors.append(float((out - exact).abs().max()))
    print(f"adaptive PF-ODE: nfe {costs}, max error {errors}")
    assert costs[0] < costs[1] < costs[2] and errors[0] > 3 * errors[1] > 9 * errors[2]
    # stochastic: a loose tolerance is far off the mixture, the default is at the noise floor
    ref, floor = reference(2)
    loose, nfe_loose = run("adaptive_sde", 2, "vp", None, eps_rel=0.5, eps_abs=0.5)
    default, nfe_default = run("adaptive_sde", 2, "vp", None)
    print(
        f"adaptive SDE 2D: loose nfe {nfe_loose} ratio {sw(loose, ref) / floor:.2f}; default nfe {nfe_default} ratio {sw(default, ref) / floor:.2f}"
    )
    assert nfe_loose < nfe_default and sw(loose, ref) > 2 * sw(default, ref)


def test_adaptive_uses_only_the_grid_ends():
    mix, path = MIXTURES[2], get_path("vp")
    x = start(mix, path, 1.0, n=64)
    g10, g40 = make_grid("karras", path, 10), make_grid("karras", path, 40)
    a, na = adaptive_sde(mix.denoiser(path), path, x, g10, generator=torch.Generator().manual_seed(0))
    b, nb = adaptive_sde(mix.denoiser(path), path, x, g40, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert na == nb
    times = []
    adaptive_sde(mix.denoiser(path), path, x, g10, last_step="none", callback=lambda i, t, xx, d: times.append(t))
    assert torch.allclose(times[-1], g10[-2].expand(64))  # stops at the last sigma > 0 of the grid
    assert all(bool((t1 <= t0).all()) for t0, t1 in zip(times, times[1:]))


# --------------------------------------------------------------------------- common behaviour


STOCHASTIC = ["euler_maruyama", "ancestral", "pc", "adaptive_sde"]


@pytest.mark.parametrize("name", STOCHASTIC)
def test_registered_stochastic_and_seeded(name):
    spec = SAMPLERS[name]
    assert spec.stochastic
    assert (spec.nfe is None) == (name == "adaptive_sde")
    mix, path = MIXTURES[2], get_path("vp")
    x = start(mix, path, 1.0, n=64).float()
    runs = [
        sample(name, mix.denoiser(path), path, x, 12, generator=torch.Generator().manual_seed(s))[0] for s in (5, 5, 6)
    ]
    assert runs[0].dtype == torch.float32 and bool(torch.isfinite(runs[0]).all())
    torch.testing.assert_close(runs[0], runs[1], rtol=0, atol=0)
    assert not torch.allclose(runs[0], runs[2])
    assert torch.equal(x, start(mix, path, 1.0, n=64).float())  # the input is not modified


@pytest.mark.parametrize(
    "name, options, match",
    [
        ("pc", {"snr": 0.0}, "snr.*0.0"),
        ("pc", {"snr": -0.1}, "snr.*-0.1"),
        ("pc", {"predictor": "langevin"}, "langevin"),
        ("pc", {"n_corrector": -1}, "n_corrector.*-1"),
        ("ancestral", {"eta": 1.5}, "eta.*1.5"),
        ("ancestral", {"eta": -0.2}, "eta.*-0.2"),
        ("euler_maruyama", {"w": "sbdm"}, "sbdm"),
        ("euler_maruyama", {"w": -1.0}, "-1.0"),
        ("euler_maruyama", {"w": lambda t: -torch.ones_like(t)}, "w=-1.0"),
        ("euler_maruyama", {"last_step": "tweedie"}, "tweedie"),
        ("euler_maruyama", {"callback": 3}, "callback"),
        ("adaptive_sde", {"eps_rel": 0.0}, "eps_rel.*0.0"),
        ("adaptive_sde", {"h_init": float("nan")}, "h_init.*nan"),
        ("adaptive_sde", {"w": "cosine"}, "cosine"),
        ("adaptive_sde", {"last_step": "mean"}, "mean"),
    ],
)
def test_bad_options_raise(name, options, match):
    mix, path = MIXTURES[2], get_path("vp")
    x = torch.randn(4, 2, dtype=torch.float64)
    with pytest.raises(ValueError, match=match):
        sample(name, mix.denoiser(path), path, x, 5, **options)


def test_bad_grid_raises():
    mix, path = MIXTURES[2], get_path("vp")
    x = torch.randn(4, 2, dtype=torch.float64)
    for name in STOCHASTIC:
        with pytest.raises(ValueError, match="decreasing"):
            sample(name, mix.denoiser(path), path, x, torch.tensor([0.2, 0.5, 0.0]))
