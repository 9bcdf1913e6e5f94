"""Gaussian paths, prediction conversions and the exact Gaussian-mixture oracle."""

import math

import pytest
import torch

from core.mixture import GaussianMixture, sliced_wasserstein
from core.paths import PATHS, check_time, get_path
from core.predictions import PREDICTIONS, EDMPrecond, as_denoiser, convert, from_x0_eps, to_x0_eps

ALL = sorted(PATHS)
torch.set_default_dtype(torch.float32)


def interior(path, n=9):
    lo = max(path.t_min, 0.02)
    return torch.linspace(lo, min(path.t_max, 0.98), n, dtype=torch.float64)


@pytest.mark.parametrize("name", ALL)
def test_derivatives_match_finite_differences(name):
    path = get_path(name)
    t = interior(path)
    h = 1e-6
    for f, df in ((path.alpha, path.d_alpha), (path.sigma, path.d_sigma)):
        fd = (f(t + h) - f(t - h)) / (2 * h)
        torch.testing.assert_close(df(t), fd, rtol=1e-5, atol=1e-6)
    fd = (path.log_snr(t + h) - path.log_snr(t - h)) / (2 * h)
    torch.testing.assert_close(path.d_log_snr(t), fd, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ALL)
def test_log_snr_inverse_and_monotone(name):
    path = get_path(name)
    t = interior(path, 25)
    lam = path.log_snr(t)
    assert bool((lam[1:] < lam[:-1]).all()), "logSNR must decrease in t"
    torch.testing.assert_close(path.t_from_log_snr(lam), t, rtol=0, atol=1e-9)
    # the generic bisection agrees with each analytic inverse
    base = type(path).__mro__[-2]
    torch.testing.assert_close(base.t_from_log_snr(path, lam), t, rtol=0, atol=1e-9)
    torch.testing.assert_close(path.t_from_sigma(path.sigma_hat(t)), t, rtol=0, atol=1e-9)


@pytest.mark.parametrize("name", ALL)
def test_sde_reproduces_marginal_variance(name):
    """d/dt (alpha^2 v + sigma^2) = 2 f (alpha^2 v + sigma^2) + g^2 (the SDE's variance ODE)."""
    path = get_path(name)
    t = interior(path)
    h = 1e-6
    for v in (0.0, 0.3, 2.0):
        var = lambda s, v=v: path.alpha(s) ** 2 * v + path.sigma(s) ** 2  # noqa: E731
        lhs = (var(t + h) - var(t - h)) / (2 * h)
        rhs = 2 * path.f(t) * var(t) + path.g2(t)
        torch.testing.assert_close(lhs, rhs, rtol=1e-5, atol=1e-5)
    # and the mean ODE: d alpha / dt = f alpha
    torch.testing.assert_close(path.d_alpha(t), path.f(t) * path.alpha(t), rtol=1e-9, atol=1e-12)


def test_known_values():
    t = torch.tensor([0.0, 0.5, 1.0], dtype=torch.float64)
    vp = get_path("vp")
    torch.testing.assert_close(vp.alpha(t), torch.exp(-0.25 * t**2 * 19.9 - 0.05 * t))
    torch.testing.assert_close(get_path("subvp").sigma(t), 1 - vp.alpha(t) ** 2)
    torch.testing.assert_close(get_path("ve").sigma(t), 0.01 * (5000.0**t))
    torch.testing.assert_close(get_path("edm").sigma(t), 80 * t)
    torch.testing.assert_close(get_path("linear").alpha(t), 1 - t)
    torch.testing.assert_close(get_path("gvp").sigma(t), torch.sin(math.pi * t / 2))
    cos = get_path("cosine")
    assert float(cos.alpha(torch.tensor(1.0))) == pytest.approx(0.0, abs=1e-7)
    assert float(cos.alpha(torch.tensor(0.0))) == pytest.approx(1.0)


@pytest.mark.parametrize("name", ALL)
def test_marginal_statistics_of_mixture(name):
    """Monte-Carlo moments of x_t = alpha x0 + sigma eps match the closed-form marginal."""
    path = get_path(name)
    gm = GaussianMixture.random(dim=3, n_components=4, seed=1)
    g = torch.Generator().manual_seed(0)
    x0 = gm.sample(200_000, g, dtype=torch.float64)
    t = torch.tensor(0.4, dtype=torch.float64)
    xt, _ = path.sample(x0, t.expand(x0.shape[0]), generator=g)
    a, s = float(path.alpha(t)), float(path.sigma(t))
    cov = a * a * gm.covariance() + s * s * torch.eye(3, dtype=torch.float64)
    scale = cov.diag().sqrt()
    torch.testing.assert_close(xt.mean(0) / scale, a * gm.mean() / scale, atol=0.02, rtol=0)
    torch.testing.assert_close(torch.cov(xt.T) / torch.outer(scale, scale), cov / torch.outer(scale, scale),
                               atol=0.02, rtol=0)


@pytest.mark.parametrize("name", ALL)
def test_mixture_score_and_denoiser_are_consistent(name):
    """Score equals autograd of log p_t; Tweedie: E[x0|x_t] = (x_t + sigma^2 score) / alpha."""
    path = get_path(name)
    gm = GaussianMixture.random(dim=4, n_components=3, seed=2)
    x = torch.randn(16, 4, dtype=torch.float64, requires_grad=True)
    t = torch.full((16,), 0.3, dtype=torch.float64)
    (grad,) = torch.autograd.grad(gm.log_prob(x, t, path).sum(), x)
    score = gm.score(x.detach(), t, path)
    torch.testing.assert_close(score, grad, rtol=1e-8, atol=1e-10)
    a, s = path.alpha(t)[:, None], path.sigma(t)[:, None]
    torch.testing.assert_close(gm.denoise(x.detach(), t, path), (x.detach() + s * s * score) / a)


def test_denoiser_is_posterior_mean_by_monte_carlo():
    path = get_path("vp")
    gm = GaussianMixture.random(dim=2, n_components=3, seed=3)
    g = torch.Generator().manual_seed(1)
    x0 = gm.sample(400_000, g, dtype=torch.float64)
    t = torch.tensor(0.3, dtype=torch.float64)
    xt, _ = path.sample(x0, t.expand(len(x0)), generator=g)
    # E[(x0 - D(x_t)) h(x_t)] = 0 for test functions h: the orthogonality that defines E[x0|x_t]
    r = x0 - gm.denoise(xt, t, path)
    for h in (torch.ones_like(xt[:, :1]), xt[:, :1], torch.tanh(xt[:, 1:])):
        assert float((r * h).mean(0).abs().max()) < 0.01


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("src", PREDICTIONS)
def test_prediction_conversions_round_trip(name, src):
    path = get_path(name)
    g = torch.Generator().manual_seed(4)
    x0 = torch.randn(5, 3, generator=g, dtype=torch.float64)
    eps = torch.randn(5, 3, generator=g, dtype=torch.float64)
    t = torch.linspace(0.1, 0.9, 5, dtype=torch.float64)
    xt = path.marginal(x0, t, eps)
    pred = from_x0_eps(x0, eps, src, xt, t, path)
    rx0, reps = to_x0_eps(pred, src, xt, t, path)
    torch.testing.assert_close(rx0, x0)
    torch.testing.assert_close(reps, eps)
    for dst in PREDICTIONS:
        back = convert(convert(pred, src, dst, xt, t, path), dst, src, xt, t, path)
        torch.testing.assert_close(back, pred)
    # velocity is d x_t / dt along the conditional path
    torch.testing.assert_close(from_x0_eps(x0, eps, "velocity", xt, t, path), path.velocity(x0, t, eps))


def test_as_denoiser_and_edm_precond_wrap_networks():
    path = get_path("vp")
    gm = GaussianMixture.random(dim=2, n_components=2, seed=5)
    x = torch.randn(8, 2, dtype=torch.float64)
    t = torch.full((8,), 0.5, dtype=torch.float64)

    def eps_model(x, t):
        return convert(gm.denoise(x, t, path), "x0", "eps", x, t, path)

    torch.testing.assert_close(as_denoiser(eps_model, path, "eps")(x, t), gm.denoise(x, t, path))

    class Exact(torch.nn.Module):
        """F such that the preconditioned D is exact: F = (D - c_skip y) / c_out."""

        def forward(self, x_in, c_noise):
            sigma = torch.exp(4 * c_noise)
            c_skip, c_out, c_in, _ = pre.coefficients(sigma)
            y = x_in / c_in[:, None]
            tt = path.t_from_sigma(sigma)
            d = gm.denoise(path.alpha(tt)[:, None] * y, tt, path)
            return (d - c_skip[:, None] * y) / c_out[:, None]

    pre = EDMPrecond(Exact(), path, sigma_data=0.5)
    torch.testing.assert_close(pre(x, t), gm.denoise(x, t, path))
    s = torch.tensor([0.1, 1.0, 10.0], dtype=torch.float64)
    c_skip, c_out, c_in, _ = pre.coefficients(s)
    # EDM Table 1 identities: unit-variance training target and effective weight 1
    torch.testing.assert_close(c_skip * 0 + pre.loss_weight(s) * c_out**2, torch.ones(3, dtype=torch.float64))
    torch.testing.assert_close(c_in**2 * (s**2 + 0.25), torch.ones(3, dtype=torch.float64))


def test_single_gaussian_pf_ode_closed_form_is_a_flow():
    path = get_path("vp")
    gm = GaussianMixture(torch.ones(1), torch.tensor([[0.5, -1.0]]), torch.tensor([[0.2, 0.05]]))
    x = torch.randn(4, 2, dtype=torch.float64)
    a = gm.pf_ode_exact(gm.pf_ode_exact(x, 0.9, 0.5, path), 0.5, 0.1, path)
    torch.testing.assert_close(a, gm.pf_ode_exact(x, 0.9, 0.1, path))
    # it satisfies dx/dt = f x - g^2/2 score
    t, h = 0.5, 1e-5
    xm = gm.pf_ode_exact(x, 0.9, t - h, path)
    xp = gm.pf_ode_exact(x, 0.9, t + h, path)
    xt = gm.pf_ode_exact(x, 0.9, t, path)
    tt = torch.tensor(t, dtype=torch.float64)
    rhs = path.f(tt) * xt - 0.5 * path.g2(tt) * gm.score(xt, tt, path)
    torch.testing.assert_close((xp - xm) / (2 * h), rhs, rtol=1e-5, atol=1e-6)


def test_sliced_wasserstein_separates_and_bad_shapes():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(2000, 3, generator=g), torch.randn(2000, 3, generator=g)
    assert sliced_wasserstein(a, b, generator=g) < 0.1
    assert sliced_wasserstein(a, b + 1.0, generator=g) > 0.4
    with pytest.raises(ValueError, match="same shape"):
        sliced_wasserstein(a, b[:10])


def test_bad_input_names_the_value():
    with pytest.raises(ValueError, match="unknown path 'vpp'"):
        get_path("vpp")
    with pytest.raises(ValueError, match="nan"):
        check_time(torch.tensor([0.1, float("nan")]))
    with pytest.raises(ValueError, match="1.5"):
        check_time(torch.tensor([0.1, 1.5]))
    with pytest.raises(ValueError, match="unknown prediction type 'noise'"):
        convert(torch.zeros(1, 1), "noise", "x0", torch.zeros(1, 1), 0.5, get_path("vp"))
    with pytest.raises(ValueError, match="t_min"):
        get_path("linear", t_min=0.5, t_max=0.2)
    for s in (-0.9, -1.0, float("nan")):  # s < 0 collapsed alpha to 0 at every t > 0; -1 divided by zero
        with pytest.raises(ValueError, match=f"offset s must be finite and >= 0, got {s}"):
            get_path("cosine", s=s)
