"""Denoising / flow-matching losses, their weightings and the training-time samplers.

The central check: on a Gaussian mixture the exact posterior mean E[x0 | x_t] (in whichever coordinate
the network predicts) minimises the expected loss under every weighting, because every weighting is
a positive function of t times a squared error whose regression target has that posterior mean.
With common random numbers the Monte-Carlo loss is a quadratic in a perturbation size delta; its
slope at delta = 0 must vanish to within its standard error, and it must grow for larger |delta|.
"""

from __future__ import annotations

import math

import pytest
import torch
from scipy import stats

from core.losses import (
    WEIGHTINGS,
    denoising_loss,
    flow_matching_loss,
    get_time_sampler,
    get_weighting,
    logit_normal_time,
    lognormal_time,
    loss_weight,
    uniform_time,
)
from core.mixture import GaussianMixture
from core.paths import LinearPath, get_path
from core.predictions import PREDICTIONS, EDMPrecond, convert

WEIGHTING_NAMES = sorted(set(WEIGHTINGS) - {"x0"})  # "x0" is an alias of "snr"
N = 8192


@pytest.fixture(scope="module")
def mixture():
    return GaussianMixture.random(2, 3, seed=1)


# Each path with the time sampler that suits it; the linear path is kept off its ends, where an eps
# network scored in x0 (alpha = 0) or an x0 network scored in eps (sigma = 0) is undefined.
PATH_CASES = {
    "vp": (lambda: get_path("vp"), uniform_time),
    "linear": (lambda: LinearPath(t_min=0.01, t_max=0.99), logit_normal_time),
    "edm": (lambda: get_path("edm"), lognormal_time),
}


@pytest.fixture(scope="module", params=sorted(PATH_CASES))
def draws(request, mixture):
    """Common random numbers for one path: data, times, noise, x_t and the exact denoiser output."""
    make_path, sampler = PATH_CASES[request.param]
    path = make_path()
    g = torch.Generator().manual_seed(0)
    x0 = mixture.sample(N, generator=g, dtype=torch.float64)
    t = sampler(path, N, generator=g)
    eps = torch.randn(x0.shape, generator=g, dtype=torch.float64)
    x_t = path.marginal(x0, t, eps)
    return request.param, path, x0, t, eps, x_t, mixture.denoise(x_t, t, path)


def _directions(x_t):
    return {"const": torch.tensor([1.0, -0.5], dtype=x_t.dtype).expand_as(x_t), "sin": torch.sin(3 * x_t)}


@pytest.mark.parametrize("prediction", PREDICTIONS)
def test_exact_denoiser_minimises_every_loss(draws, prediction):
    name, path, x0, t, eps, x_t, D = draws
    exact = convert(D, "x0", prediction, x_t, t, path)
    for weighting in WEIGHTING_NAMES:
        for dname, h in _directions(x_t).items():
            tag = f"{name}/{prediction}/{weighting}/{dname}"

            def loss(delta, reduction="mean", h=h, weighting=weighting):
                def model(x, tt):
                    assert torch.equal(x, x_t)  # the loss rebuilt the same x_t from (x0, t, eps)
                    return exact + (delta[:, None] if torch.is_tensor(delta) else delta) * h

                return denoising_loss(
                    model, x0, path, prediction=prediction, weighting=weighting, t=t, noise=eps, reduction=reduction
                )

            # Per-sample slopes d loss_i / d delta at the exact predictor (autograd through the loss).
            delta = torch.zeros(N, dtype=torch.float64, requires_grad=True)
            per_sample = loss(delta, "none")
            per_sample.sum().backward()
            slope = delta.grad
            z = float(slope.mean() / (slope.std() / math.sqrt(N)))
            assert abs(z) < 4.5, f"{tag}: slope of the expected loss at the exact predictor is {z:.1f} SE from 0"

            # Larger perturbations, on the scale ref where the quadratic term doubles the loss, raise it.
            l0 = float(per_sample.detach().mean())
            curv = (float(loss(1.0)) + float(loss(-1.0)) - 2 * l0) / 2
            assert curv > 0, tag
            ref = math.sqrt(l0 / curv)
            for scale in (0.5, 2.0):
                for sign in (1.0, -1.0):
                    assert float(loss(sign * scale * ref)) > l0, f"{tag}: delta={sign * scale:+.1f} ref lowers the loss"


def test_minimiser_check_can_fail(draws, mixture):
    """The same statistic flags a predictor that is not the posterior mean (means shifted by 0.3)."""
    name, path, x0, t, eps, x_t, _ = draws
    wrong = GaussianMixture(mixture.weights, mixture.means + 0.3, mixture.variances).denoise(x_t, t, path)
    h = _directions(x_t)["const"]
    for weighting in ("snr", "min_snr", "p2"):
        delta = torch.zeros(N, dtype=torch.float64, requires_grad=True)
        out = wrong + delta[:, None] * h
        denoising_loss(
            lambda x, tt, out=out: out, x0, path, prediction="x0", weighting=weighting, t=t, noise=eps, reduction="none"
        ).sum().backward()
        z = float(delta.grad.mean() / (delta.grad.std() / math.sqrt(N)))
        assert abs(z) > 6, f"{name}/{weighting}: z={z:.1f}"


# ------------------------------------------------------------------------------------------ identities


def _setup(path_name="vp", n=64, seed=3):
    path = get_path(path_name)
    g = torch.Generator().manual_seed(seed)
    x0 = torch.randn(n, 3, 4, generator=g, dtype=torch.float64)
    eps = torch.randn(n, 3, 4, generator=g, dtype=torch.float64)
    t = uniform_time(path, n, generator=g)
    net_out = torch.randn(n, 3, 4, generator=g, dtype=torch.float64)
    return path, x0, eps, t, net_out


def _loss(out, x0, path, **kw):
    return denoising_loss(lambda x, t: out, x0, path, reduction="none", **kw)


def test_snr_weighting_on_eps_is_plain_x0_mse():
    path, x0, eps, t, eps_hat = _setup()
    a, s = path.alpha(t)[:, None, None], path.sigma(t)[:, None, None]
    x_t = a * x0 + s * eps
    x0_hat = (x_t - s * eps_hat) / a
    want = (x0_hat - x0).pow(2).mean((1, 2))
    got = _loss(eps_hat, x0, path, prediction="eps", weighting="snr", t=t, noise=eps)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=0)
    # ... which is the eps-MSE times 1 / SNR
    eps_mse = _loss(eps_hat, x0, path, prediction="eps", weighting="eps", t=t, noise=eps)
    torch.testing.assert_close(got, eps_mse * s.flatten() ** 2 / a.flatten() ** 2, rtol=1e-10, atol=0)
    torch.testing.assert_close(loss_weight("snr", path, t, "eps"), torch.exp(-path.log_snr(t)), rtol=1e-10, atol=0)
    torch.testing.assert_close(loss_weight("eps", path, t, "x0"), torch.exp(path.log_snr(t)), rtol=1e-10, atol=0)


def test_min_snr_is_eps_mse_below_gamma_and_gamma_x0_mse_above():
    path, x0, eps, t, out = _setup(n=256)
    gamma = 5.0
    snr = torch.exp(path.log_snr(t))
    assert bool((snr < gamma).any()) and bool((snr > gamma).any())
    w = get_weighting("min_snr", gamma=gamma)
    for prediction in PREDICTIONS:
        got = _loss(out, x0, path, prediction=prediction, weighting=w, t=t, noise=eps)
        eps_loss = _loss(out, x0, path, prediction=prediction, weighting="eps", t=t, noise=eps)
        x0_loss = _loss(out, x0, path, prediction=prediction, weighting="snr", t=t, noise=eps)
        torch.testing.assert_close(got, torch.where(snr < gamma, eps_loss, gamma * x0_loss), rtol=1e-8, atol=0)


def test_min_snr_on_v_and_velocity_targets():
    """Hang et al. sec. 3.4: min(SNR, gamma) / (SNR + 1) on the v-MSE of a variance-preserving path;
    on the linear path the velocity-MSE carries min(SNR, gamma) t^2."""
    w = get_weighting("min_snr", gamma=5.0)
    vp = get_path("vp")
    t = torch.linspace(0.01, 0.99, 50, dtype=torch.float64)
    snr = torch.exp(vp.log_snr(t))
    torch.testing.assert_close(loss_weight(w, vp, t, "v"), snr.clamp(max=5.0) / (snr + 1), rtol=1e-10, atol=0)
    torch.testing.assert_close(loss_weight(w, vp, t, "eps"), snr.clamp(max=5.0) / snr, rtol=1e-10, atol=0)
    lin = get_path("linear")
    snr = ((1 - t) / t) ** 2
    torch.testing.assert_close(loss_weight(w, lin, t, "velocity"), snr.clamp(max=5.0) * t**2, rtol=1e-10, atol=0)
    # v-MSE on VP is (1 + SNR) x0-MSE (Salimans & Ho 2022): "v" weighting seen from x0.
    torch.testing.assert_close(loss_weight("v", vp, t, "x0"), 1 + torch.exp(vp.log_snr(t)), rtol=1e-10, atol=0)


@pytest.mark.parametrize("path_name", ["edm", "vp"])
def test_edm_weighting_equals_unit_weight_on_the_raw_network(path_name):
    """lambda(sigma) c_out(sigma)^2 = 1 (EDM eq. 8): the weighted x0 error of the preconditioned
    denoiser equals the plain MSE of F against its effective target (x0 - c_skip y) / c_out."""
    path, x0, eps, t, _ = _setup(path_name)
    sd = 0.5
    net = torch.nn.Linear(4, 4).double()
    precond = EDMPrecond(lambda x, c_noise: net(x) * (1 + c_noise[:, None, None]), path, sigma_data=sd)
    got = denoising_loss(
        precond,
        x0,
        path,
        prediction="x0",
        weighting=get_weighting("edm", sigma_data=sd),
        t=t,
        noise=eps,
        reduction="none",
    )
    a, s = path.alpha(t)[:, None, None], path.sigma(t)[:, None, None]
    y = (a * x0 + s * eps) / a
    sig = s / a
    c_skip, c_out = sd**2 / (sig**2 + sd**2), sig * sd / (sig**2 + sd**2).sqrt()
    c_in, c_noise = 1 / (sig**2 + sd**2).sqrt(), torch.log(sig) / 4
    F = net(c_in * y) * (1 + c_noise)
    want = (F - (x0 - c_skip * y) / c_out).pow(2).mean((1, 2))
    torch.testing.assert_close(got, want.detach(), rtol=1e-9, atol=0)


def test_likelihood_weighting_is_g2_score_matching():
    path, x0, eps, t, score_hat = _setup()
    s = path.sigma(t)[:, None, None]
    want = path.g2(t) * (score_hat + eps / s).pow(2).mean((1, 2))
    got = _loss(score_hat, x0, path, prediction="score", weighting="likelihood", t=t, noise=eps)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=0)
    # Seen from an eps network: g^2 / sigma^2, which on VP is beta(t) / sigma^2 (score_sde's weighting).
    torch.testing.assert_close(loss_weight("likelihood", path, t, "eps"), path.beta(t) / path.sigma(t) ** 2)


@pytest.mark.parametrize("gamma", [0.5, 1.0])
def test_p2_weighting(gamma):
    path, x0, eps, t, eps_hat = _setup()
    snr = torch.exp(path.log_snr(t))
    want = (eps_hat - eps).pow(2).mean((1, 2)) / (1.0 + snr) ** gamma
    got = _loss(eps_hat, x0, path, prediction="eps", weighting=get_weighting("p2", gamma=gamma), t=t, noise=eps)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=0)


def test_flow_matching_target_on_linear_path():
    path, x0, eps, t, u_hat = _setup("linear")
    want = (u_hat - (eps - x0)).pow(2).mean((1, 2))
    torch.testing.assert_close(
        flow_matching_loss(lambda x, t: u_hat, x0, path, t=t, noise=eps, reduction="none"), want, rtol=1e-12, atol=0
    )


def test_default_weighting_is_the_predictions_own_mse():
    path, x0, eps, t, out = _setup()
    for prediction, weighting in (("eps", "eps"), ("x0", "snr"), ("v", "v"), ("velocity", "velocity")):
        torch.testing.assert_close(
            _loss(out, x0, path, prediction=prediction, t=t, noise=eps),
            _loss(out, x0, path, prediction=prediction, weighting=weighting, t=t, noise=eps),
            rtol=0,
            atol=0,
        )


# ------------------------------------------------------------------------------------------ time samplers


def _pvalue(samples, cdf):
    return stats.kstest(samples.numpy(), cdf).pvalue


def test_uniform_time_distribution():
    path = get_path("vp")
    n = 4000
    u = stats.uniform(loc=path.t_min, scale=path.t_max - path.t_min).cdf
    for kw in ({}, {"stratified": True}, {"antithetic": True}):
        t = get_time_sampler("uniform", **kw)(path, n, torch.Generator().manual_seed(1))
        assert t.dtype == torch.float64 and t.shape == (n,)
        assert float(t.min()) >= path.t_min and float(t.max()) <= path.t_max
        assert _pvalue(t, u) > 1e-3, kw
    t = uniform_time(path, 8, torch.Generator().manual_seed(2), stratified=True)
    assert bool(((t - path.t_min) / (path.t_max - path.t_min) * 8).floor().eq(torch.arange(8.0)).all())
    t = uniform_time(path, 7, torch.Generator().manual_seed(2), antithetic=True)
    torch.testing.assert_close(t[:3] + t[4:7], torch.full((3,), path.t_min + path.t_max, dtype=torch.float64))


@pytest.mark.parametrize("path_name", ["edm", "vp", "linear"])
def test_lognormal_time_distribution(path_name):
    path = get_path(path_name)
    t = lognormal_time(path, 4000, torch.Generator().manual_seed(3))
    assert float(t.min()) >= path.t_min and float(t.max()) <= path.t_max
    log_sigma = torch.log(path.sigma_hat(t))
    assert _pvalue(log_sigma, stats.norm(-1.2, 1.2).cdf) > 1e-3
    # the test has power: a mean off by 0.15 is rejected
    assert _pvalue(log_sigma, stats.norm(-1.05, 1.2).cdf) < 1e-3


def test_logit_normal_time_distribution():
    path = get_path("linear")
    t = get_time_sampler("logit_normal", m=0.5, s=0.8)(path, 4000, torch.Generator().manual_seed(4))
    logit = torch.log(t) - torch.log1p(-t)
    assert _pvalue(logit, stats.norm(0.5, 0.8).cdf) > 1e-3
    assert _pvalue(logit, stats.norm(0.5, 1.0).cdf) < 1e-3


def test_time_sampler_dtype_and_device():
    t = get_time_sampler("lognormal")(get_path("edm"), 5, None, "cpu", torch.float32)
    assert t.dtype == torch.float32 and t.shape == (5,)


# ------------------------------------------------------------------------------------------ reproducibility, errors


def test_reproducible_with_generator():
    path = get_path("vp")
    x0 = torch.randn(16, 2, 3)
    net = torch.nn.Linear(3, 3)

    def model(x, t):
        return net(x) * t[:, None, None]

    for sampler in ("uniform", "lognormal", "logit_normal"):
        a = denoising_loss(model, x0, path, time_sampler=sampler, generator=torch.Generator().manual_seed(5))
        b = denoising_loss(model, x0, path, time_sampler=sampler, generator=torch.Generator().manual_seed(5))
        c = denoising_loss(model, x0, path, time_sampler=sampler, generator=torch.Generator().manual_seed(6))
        assert torch.equal(a, b) and not torch.equal(a, c)
    a.backward()
    assert net.weight.grad is not None and bool(torch.isfinite(net.weight.grad).all())
    # with a generator, the global random state is left alone
    torch.manual_seed(7)
    want = torch.rand(3)
    torch.manual_seed(7)
    denoising_loss(model, x0, path, time_sampler="lognormal", generator=torch.Generator().manual_seed(5))
    assert torch.equal(torch.rand(3), want)


def test_explicit_t_and_noise_override_the_draws():
    path, x0, eps, t, out = _setup()
    a = _loss(out, x0, path, t=t, noise=eps, generator=torch.Generator().manual_seed(0))
    b = _loss(out, x0, path, t=t, noise=eps, generator=torch.Generator().manual_seed(1))
    assert torch.equal(a, b)
    # a scalar t is broadcast over the batch
    c = _loss(out, x0, path, t=0.3, noise=eps)
    d = _loss(out, x0, path, t=torch.full((64,), 0.3, dtype=torch.float64), noise=eps)
    assert torch.equal(c, d)


def test_bad_inputs_raise():
    path, x0, eps, t, out = _setup(n=4)

    def model(x, t):
        return out

    cases = [
        (dict(prediction="noise"), "noise"),
        (dict(weighting="snrr"), "snrr"),
        (dict(time_sampler="beta"), "beta"),
        (dict(reduction="sum"), "sum"),
        (dict(t=torch.tensor([0.1, 0.2, 1.5, 0.3])), "1.5"),
        (dict(t=torch.tensor([0.1, float("nan"), 0.2, 0.3])), "nan"),
        (dict(t=torch.tensor([0.1, 0.2])), r"\(4,\)"),
        (dict(noise=torch.randn(4, 3)), "noise"),
    ]
    for kw, match in cases:
        with pytest.raises(ValueError, match=match):
            denoising_loss(model, x0, path, **kw)
    with pytest.raises(ValueError, match="-1.0"):
        get_weighting("min_snr", gamma=-1.0)
    with pytest.raises(ValueError, match="0.0"):
        get_weighting("edm", sigma_data=0.0)
    with pytest.raises(ValueError, match="gama"):
        get_weighting("min_snr", gama=5.0)
    with pytest.raises(ValueError, match="p_std"):
        get_time_sampler("lognormal", p_std=0.0)
    with pytest.raises(ValueError, match="inf"):
        get_time_sampler("logit_normal", m=float("inf"))
    with pytest.raises(ValueError, match="not both"):
        get_time_sampler("uniform", stratified=True, antithetic=True)
    with pytest.raises(ValueError, match="p_mean"):
        get_time_sampler("uniform", p_mean=0.0)
    with pytest.raises(ValueError, match="0"):
        uniform_time(path, 0)
