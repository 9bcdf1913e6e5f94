"""Probability-flow likelihood (core/likelihood.py) against closed forms.

For Gaussian data the PF-ODE flow and every marginal density are known in closed form
(:meth:`GaussianMixture.pf_ode_exact`, :meth:`GaussianMixture.log_prob`), so the ODE estimate
must equal ``log p_{t_start}(x) - log p_{t_end}(x_T) + log prior(x_T)`` with ``x_T`` the exact
flow of ``x``: the change of variables along the exact map, including the (small) mismatch
between ``p_{t_end}`` and the Gaussian prior. On linear and GVP paths ``p_1`` is the prior, and
the estimate must equal ``log p_{t_start}(x)`` for any data, mixtures included.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor

from core.likelihood import bits_per_dim, dequantize, discrete_bits_per_dim, log_likelihood
from core.mixture import GaussianMixture
from core.paths import get_path

GAUSS = GaussianMixture(
    torch.ones(1),
    torch.tensor([[0.3, -0.5, 1.0]], dtype=torch.float64),
    torch.tensor([[0.2, 0.05, 1.5]], dtype=torch.float64),
)
MIX = GaussianMixture.random(2, 4, seed=11, var_range=(0.05, 0.3))


def t_start_of(path) -> float:
    """log_likelihood's default t_start: t_min, or 1e-5 where sigma(t_min) = 0."""
    return path.t_min if float(path.sigma(torch.tensor(path.t_min, dtype=torch.float64))) > 0 else 1e-5


def exact_flow_logp(mix, path, x, t_start, t_end):
    x_end = mix.pf_ode_exact(x, t_start, t_end, path)
    return mix.log_prob(x, t_start, path) - mix.log_prob(x_end, t_end, path) + path.prior_logp(x_end, t=t_end)


@pytest.mark.parametrize("name", ["vp", "linear", "edm"])
def test_gaussian_nll_is_the_closed_form(name):
    path = get_path(name)
    x = GAUSS.sample(16, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    ts = t_start_of(path)
    log_p, nfe = log_likelihood(GAUSS.denoiser(path), path, x, rtol=1e-7, atol=1e-7)
    # pf_ode_exact divides by alpha: stop the exact flow a hair before alpha = 0 (linear), where the
    # marginal already equals the prior to 1e-12
    t_end = min(path.t_max, 1 - 1e-9)
    expected = exact_flow_logp(GAUSS, path, x, ts, t_end)
    err = float((log_p - expected).abs().max())
    err_data = float((log_p - GAUSS.log_prob(x)).abs().max())
    print(f"{name}: nfe {nfe}, |NLL - closed form| {err:.2e}, |NLL - data log-density| {err_data:.2e} (t_start={ts:g})")
    assert err < 1e-5
    # the data density itself: off only by the diffusion up to t_start and the prior mismatch
    assert err_data < 0.05


def test_default_tolerance_error_and_rk4():
    path = get_path("vp")
    x = GAUSS.sample(16, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    expected = exact_flow_logp(GAUSS, path, x, path.t_min, path.t_max)
    log_p, nfe = log_likelihood(GAUSS.denoiser(path), path, x)  # dopri5, rtol = atol = 1e-5
    assert float((log_p - expected).abs().max()) < 2e-4
    errs = []
    for steps in (10, 20, 40):
        D = GAUSS.denoiser(path)
        log_p, nfe = log_likelihood(D, path, x, method="rk4", steps=steps)
        assert nfe == D.nfe == 4 * steps
        errs.append(float((log_p - expected).abs().max()))
    order = math.log2(errs[1] / errs[2])
    print(f"rk4 errors {errs}, observed order {order:.2f}")
    assert errs[0] > errs[1] > errs[2] and order > 3


@pytest.mark.parametrize("name", ["linear", "gvp"])
def test_mixture_nll_is_the_exact_log_prob(name):
    path = get_path(name)
    x = MIX.sample(32, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    log_p, nfe = log_likelihood(MIX.denoiser(path), path, x, rtol=1e-7, atol=1e-7)
    err = float((log_p - MIX.log_prob(x, 1e-5, path)).abs().max())
    err_data = float((log_p - MIX.log_prob(x)).abs().max())
    print(f"{name} mixture: nfe {nfe}, |NLL - exact p_t_start| {err:.2e}, |NLL - data log-density| {err_data:.2e}")
    assert err < 1e-5 and err_data < 1e-3


def test_mixture_nll_under_vp_up_to_the_prior_mismatch():
    path = get_path("vp")
    x = MIX.sample(32, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    log_p, _ = log_likelihood(MIX.denoiser(path), path, x)
    err = float((log_p - MIX.log_prob(x)).abs().max())
    print(f"vp mixture: |NLL - data log-density| {err:.2e}")
    assert err < 0.02


@pytest.mark.parametrize("probe", ["rademacher", "gaussian"])
def test_hutchinson_is_unbiased_around_the_exact_trace(probe):
    """Each of 8 points is repeated 256 times; every copy gets its own probe, and the trajectory
    (fixed rk4 grid) does not depend on the probe, so the copies are independent estimates."""
    path = get_path("linear")
    pts = MIX.sample(8, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    reps = 256
    x = pts.repeat_interleave(reps, 0)
    opts = dict(method="rk4", steps=24, t_start=1e-3)
    exact, _ = log_likelihood(MIX.denoiser(path), path, pts, **opts)
    est, _ = log_likelihood(
        MIX.denoiser(path), path, x, trace="hutchinson", probe=probe, generator=torch.Generator().manual_seed(5), **opts
    )
    est = est.reshape(8, reps)
    mean, se = est.mean(1), est.std(1) / math.sqrt(reps)
    z = (mean - exact) / se
    print(f"{probe}: |z| max {float(z.abs().max()):.2f}, MC sd per estimate {float(est.std(1).mean()):.3f}")
    assert bool((est.std(1) > 0).all())
    assert float(z.abs().max()) < 4
    # more probes per sample: the same mean, a smaller spread (about 1/2 with 4 probes)
    est4, _ = log_likelihood(
        MIX.denoiser(path),
        path,
        x,
        trace="hutchinson",
        n_probes=4,
        probe=probe,
        generator=torch.Generator().manual_seed(6),
        **opts,
    )
    ratio = float(est4.reshape(8, reps).std(1).mean() / est.std(1).mean())
    assert 0.35 < ratio < 0.65


def test_hutchinson_is_seeded_and_probes_fixed():
    path = get_path("vp")
    x = MIX.sample(4, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    a, _ = log_likelihood(MIX.denoiser(path), path, x, trace="hutchinson", generator=torch.Generator().manual_seed(1))
    b, _ = log_likelihood(MIX.denoiser(path), path, x, trace="hutchinson", generator=torch.Generator().manual_seed(1))
    c, _ = log_likelihood(MIX.denoiser(path), path, x, trace="hutchinson", generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert not torch.allclose(a, c)


def test_float32_and_no_grad_context():
    path = get_path("linear")
    x = MIX.sample(8, generator=torch.Generator().manual_seed(8))
    with torch.no_grad():
        log_p, _ = log_likelihood(MIX.denoiser(path), path, x, rtol=1e-4, atol=1e-4)
    assert log_p.dtype == torch.float32
    torch.testing.assert_close(log_p.double(), MIX.log_prob(x.double(), 1e-5, path), rtol=0, atol=2e-3)


# --------------------------------------------------------------------------- bits per dim


def test_dequantize_maps_bins_to_cells():
    k = torch.tensor([[0, 255], [128, 7]])
    x, logdet = dequantize(k, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    lo = -1 + 2 * k.double() / 256
    assert bool(((x >= lo) & (x < lo + 2 / 256)).all())
    torch.testing.assert_close(logdet, torch.full((2,), 2 * math.log(2 / 256), dtype=torch.float64))
    # score_sde's offset: 7 bits for data in [-1, 1], 8 for [0, 1]
    assert float(bits_per_dim(0.0, 2, logdet=logdet[0])) == pytest.approx(7.0)
    _, ld01 = dequantize(k, data_range=(0.0, 1.0))
    assert float(bits_per_dim(0.0, (2,), logdet=ld01[0])) == pytest.approx(8.0)


def test_uniform_model_gives_eight_bits():
    """Hand computation: a uniform density on [-1, 1]^D has log p = -D log 2 everywhere, so the
    dequantised NLL is D log 2 + 7 D log 2 nats = 8 bits per dimension = the entropy of uniform bytes."""
    k = torch.randint(0, 256, (100, 3), generator=torch.Generator().manual_seed(0))
    x, logdet = dequantize(k, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    nll = torch.full((100,), 3 * math.log(2.0), dtype=torch.float64)
    torch.testing.assert_close(bits_per_dim(nll, 3, logdet=logdet), torch.full((100,), 8.0, dtype=torch.float64))


def discretised_gaussian(m: float, s: float) -> torch.Tensor:
    """P(k) of bytes from a Gaussian on x in [-1, 1] (cells of width 2/256; the tails go to the end bins)."""
    edges = -1 + 2 * torch.arange(257, dtype=torch.float64) / 256
    cdf = 0.5 * (1 + torch.erf((edges - m) / (s * math.sqrt(2))))
    cdf[0], cdf[-1] = 0.0, 1.0
    return cdf[1:] - cdf[:-1]


def hand_bits(k: torch.Tensor, m: float, s: float) -> torch.Tensor:
    """E_u of the dequantised NLL in bits per dim, by hand: x is uniform on its cell (centre c,
    width w), so E (x - m)^2 = (c - m)^2 + w^2 / 12; the Jacobian to bytes adds 7 bits per dim."""
    w = 2 / 256
    c = -1 + w * (k.double() + 0.5)
    nats = 0.5 * ((c - m) ** 2 + w**2 / 12) / s**2 + math.log(s * math.sqrt(2 * math.pi))
    return (nats / math.log(2) + 7).reshape(k.shape[0], -1).mean(1)


def test_dequantised_bound_matches_hand_computation_and_upper_bounds_the_entropy():
    m, s = 0.1, 0.05  # about 6 bins per standard deviation
    P = discretised_gaussian(m, s)
    k = torch.multinomial(P.float(), 4000, replacement=True, generator=torch.Generator().manual_seed(0)).reshape(
        2000, 2
    )
    x, logdet = dequantize(k, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    nll_x = (0.5 * ((x - m) / s) ** 2 + math.log(s * math.sqrt(2 * math.pi))).sum(1)
    bpd = bits_per_dim(nll_x, 2, logdet=logdet)
    hand = hand_bits(k, m, s)
    # the Monte Carlo estimate (one u per sample) against its expectation
    assert float((bpd.mean() - hand.mean()).abs()) < 0.01
    # Jensen, bin by bin: E_u[-log2 p(k + u)] >= -log2 P(k)
    bins = torch.arange(256)[:, None]
    seen = P > 1e-12  # far-tail P underflows or loses its digits to cancellation in the cdf difference
    assert bool((hand_bits(bins, m, s)[seen] >= -torch.log2(P[seen])).all())
    # and in expectation over k (exact sums over the 256 bins): the bound exceeds the entropy of P
    bound = float((P * hand_bits(bins, m, s)).sum())
    entropy = float(-(P * torch.log2(P.clamp(min=1e-300))).sum())
    print(
        f"bits/dim: estimate {float(bpd.mean()):.4f}, hand {float(hand.mean()):.4f} (2000 samples); "
        f"E_P bound {bound:.5f} vs entropy {entropy:.5f}"
    )
    assert entropy < bound < entropy + 0.01  # a small gap: the density is smooth on a bin


def test_discrete_bits_per_dim_through_the_ode():
    """End to end: bytes, dequantised, PF-ODE likelihood of a Gaussian model in x-space with its
    exact denoiser: the same as the closed-form density at the same u, and near the hand value."""
    m, s = 0.1, 0.05
    model = GaussianMixture(torch.ones(1), torch.tensor([[m, m]], dtype=torch.float64), s**2)
    path = get_path("linear")
    P = discretised_gaussian(m, s)
    k = torch.multinomial(P.float(), 64, replacement=True, generator=torch.Generator().manual_seed(0)).reshape(32, 2)
    opts = dict(dtype=torch.float64, rtol=1e-7, atol=1e-7)
    bpd, nfe = discrete_bits_per_dim(model.denoiser(path), path, k, generator=torch.Generator().manual_seed(1), **opts)
    x, logdet = dequantize(k, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    closed = bits_per_dim(-model.log_prob(x, 1e-5, path), 2, logdet=logdet)
    assert nfe > 0
    torch.testing.assert_close(bpd, closed, rtol=0, atol=1e-5)
    bpd4, _ = discrete_bits_per_dim(
        model.denoiser(path), path, k, n_dequant=4, generator=torch.Generator().manual_seed(2), **opts
    )
    assert float((bpd4.mean() - hand_bits(k, m, s).mean()).abs()) < 0.02


# --------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "options, match",
    [
        ({"trace": "skilling"}, "skilling"),
        ({"method": "euler"}, "euler"),
        ({"probe": "bernoulli"}, "bernoulli"),
        ({"n_probes": 0}, "n_probes.*0"),
        ({"steps": 0}, "steps.*0"),
        ({"rtol": 0.0}, "rtol.*0.0"),
        ({"t_start": 0.5, "t_end": 0.4}, "t_start=0.5"),
        ({"t_start": 0.0}, "sigma = 0"),
        ({"t_end": 1.5}, "1.5"),
        ({"t_start": float("nan")}, "nan"),
    ],
)
def test_bad_input_raises(options, match):
    path = get_path("linear")
    x = torch.zeros(2, 2, dtype=torch.float64)
    with pytest.raises(ValueError, match=match):
        log_likelihood(MIX.denoiser(path), path, x, **options)


def test_bad_data_raises():
    path = get_path("linear")
    with pytest.raises(ValueError, match="finite"):
        log_likelihood(MIX.denoiser(path), path, torch.tensor([[0.0, float("inf")]]))
    with pytest.raises(ValueError, match="float"):
        log_likelihood(MIX.denoiser(path), path, torch.zeros(2, 2, dtype=torch.int64))
    for bad in (torch.tensor([[256]]), torch.tensor([[-1]]), torch.tensor([[1.5]])):
        with pytest.raises(ValueError, match=str(bad.item())):
            dequantize(bad)
    with pytest.raises(ValueError, match="n_bins"):
        dequantize(torch.tensor([[0]]), n_bins=1)
    with pytest.raises(ValueError, match="data_range"):
        dequantize(torch.tensor([[0]]), data_range=(1.0, -1.0))
    with pytest.raises(ValueError, match="dims"):
        bits_per_dim(1.0, 0)


# -- embedding_elbo: discrete tokens diffused as embeddings ---------------------------------------


def _point_mass_posterior(E: Tensor, path):
    """Exact posterior over tokens for uniform data on point-mass embeddings E (V, D)."""

    def log_w(z, t):
        a = path.alpha(t.double()).to(z.dtype)[:, None, None, None]
        s = path.sigma(t.double()).to(z.dtype)[:, None, None, None]
        return -((z[:, :, None, :] - a * E).pow(2).sum(-1)) / (2 * s[..., 0] ** 2)

    return (lambda z, t: log_w(z, t).softmax(-1) @ E), log_w


@pytest.mark.parametrize("name,t_start", [("vp", None), ("cosine", None), ("linear", 1e-4)])
def test_embedding_elbo_tight_for_exact_posterior(name, t_start):
    # Uniform data over V point masses: -log p = log V per token exactly. With the exact posterior
    # mean as denoiser and the exact posterior as decoder the continuous-time bound is tight up to
    # the prior mismatch, so its Monte-Carlo mean must sit at log V (and never clearly below it).
    from core.likelihood import embedding_elbo

    path = get_path(name)
    E = 1.5 * torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [0.0, -1.0]], dtype=torch.float64)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 4, (4000, 2), generator=g)
    D, log_w = _point_mass_posterior(E, path)
    out = embedding_elbo(ids, E, path, D, log_w, samples=32, t_start=t_start, generator=g)
    per_tok = out["total"] / 2
    se = float(per_tok.std() / math.sqrt(per_tok.numel()))
    assert abs(float(per_tok.mean()) - math.log(4)) < 4 * se + 5e-3, (float(per_tok.mean()), se)
    assert float(out["recon"].mean()) < 1e-3 and float(out["prior"].mean()) < 1e-2
    # a useless denoiser (always the origin) pays for every bit of information in the diffusion term
    bad = embedding_elbo(ids, E, path, lambda z, t: torch.zeros_like(z), log_w, samples=4, t_start=t_start,
                         generator=g)
    assert float(bad["total"].mean()) / 2 > math.log(4) + 1.0


def test_embedding_elbo_rejects_bad_input():
    from core.likelihood import embedding_elbo

    path = get_path("linear")
    E = torch.eye(3, dtype=torch.float64)
    ids = torch.zeros(2, 3, dtype=torch.int64)
    D = lambda z, t: z  # noqa: E731
    with pytest.raises(ValueError, match="sigma is 0"):
        embedding_elbo(ids, E, path, D, lambda z, t: z)  # linear path: sigma(0) = 0
    with pytest.raises(ValueError, match="ids must be"):
        embedding_elbo(ids.float(), E, path, D, lambda z, t: z, t_start=0.01)
    with pytest.raises(ValueError, match="t_start < t_end"):
        embedding_elbo(ids, E, path, D, lambda z, t: z, t_start=0.5, t_end=0.2)
