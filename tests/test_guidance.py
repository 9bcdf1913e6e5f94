"""Classifier-free guidance wrappers on a class-conditional Gaussian mixture with exact denoisers.

Each class is a two-component sub-mixture; the unconditional data distribution is their mixture with
the class prior, so both the conditional denoiser E[x0 | x_t, y] and the unconditional one E[x0 | x_t]
are exact (core.mixture).
"""

from __future__ import annotations

import math

import pytest
import torch

from core.grids import make_grid
from core.guidance import adaptive_guidance, cfg_denoiser, cfg_net, sigma_interval
from core.mixture import GaussianMixture
from core.paths import get_path
from core.predictions import as_denoiser, convert
from core.samplers import sample

K = 3  # classes; label K is the null label
PRIOR = torch.tensor([0.3, 0.3, 0.4], dtype=torch.float64)


@pytest.fixture(scope="module")
def mixtures():
    g = torch.Generator().manual_seed(0)
    classes = []
    for c in range(K):
        angle = torch.tensor(2 * math.pi * c / K)
        centre = 2.0 * torch.stack([torch.cos(angle), torch.sin(angle)]).double()
        means = centre + 0.6 * torch.randn(2, 2, generator=g, dtype=torch.float64)
        classes.append(GaussianMixture(torch.tensor([1.0, 2.0]), means, 0.05))
    full = GaussianMixture(
        torch.cat([PRIOR[c] * classes[c].weights for c in range(K)]),
        torch.cat([m.means for m in classes]),
        torch.cat([m.variances for m in classes]),
    )
    return classes, full


class Net:
    """``net(x, t, y)``: the exact denoiser of class ``y`` (the full mixture for the null label), with
    a log of the batch sizes it was called with."""

    def __init__(self, mixtures, path):
        self.classes, self.full = mixtures
        self.path = path
        self.batches: list[int] = []

    def __call__(self, x, t, y):
        self.batches.append(x.shape[0])
        out = torch.empty_like(x)
        for c in range(K + 1):
            m = y == c
            if bool(m.any()):
                out[m] = (self.classes[c] if c < K else self.full).denoise(x[m], t[m], self.path)
        return out


class Counted:
    def __init__(self, fn):
        self.fn, self.calls = fn, 0

    def __call__(self, x, t):
        self.calls += 1
        return self.fn(x, t)


def _pair(mixtures, path, y):
    net = Net(mixtures, path)
    cond = Counted(lambda x, t: net(x, t, y))
    uncond = Counted(lambda x, t: mixtures[1].denoise(x, t, path))
    return net, cond, uncond


def _point(path, n=12, t=0.4, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 2, generator=g, dtype=torch.float64) * 2.0
    y = torch.arange(n) % K
    return x, torch.full((n,), t, dtype=torch.float64), y


def test_scale_one_is_conditional_zero_unconditional_and_general_scale_is_the_formula(mixtures):
    path = get_path("vp")
    x, t, y = _point(path)
    net, cond, uncond = _pair(mixtures, path, y)
    c, u = cond(x, t), uncond(x, t)
    assert (c - u).abs().max() > 0.1  # the classes matter at this noise level
    for make in (lambda s: cfg_denoiser(cond, uncond, s), lambda s: cfg_net(net, y, K, s)):
        assert torch.equal(make(0.0)(x, t), u)
        torch.testing.assert_close(make(1.0)(x, t), c, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(make(2.5)(x, t), -1.5 * u + 2.5 * c, rtol=1e-12, atol=1e-12)


def test_guidance_commutes_with_prediction_conversion(mixtures):
    """Guiding eps outputs and converting gives the guided denoiser: the mix is affine."""
    path = get_path("vp")
    x, t, y = _point(path)
    net = Net(mixtures, path)

    def eps_net(x, t, y):
        return convert(net(x, t, y), "x0", "eps", x, t, path)

    via_eps = as_denoiser(cfg_net(eps_net, y, K, 3.0), path, "eps")(x, t)
    torch.testing.assert_close(via_eps, cfg_net(net, y, K, 3.0)(x, t), rtol=1e-10, atol=1e-10)


def test_nfe_counting_and_batching(mixtures):
    path = get_path("vp")
    x, t, y = _point(path)
    net, cond, uncond = _pair(mixtures, path, y)
    two = cfg_denoiser(cond, uncond, 2.0)
    two(x, t)
    assert (two.nfe, two.calls, cond.calls, uncond.calls) == (2, 2, 1, 1)
    batched = cfg_net(net, y, K, 2.0)
    net.batches.clear()
    batched(x, t)
    assert (batched.nfe, batched.calls, net.batches) == (2, 1, [2 * len(y)])
    assert torch.equal(batched.sample_nfe, torch.full((len(y),), 2))


def test_interval_calls_only_the_conditional_model_outside(mixtures):
    path = get_path("vp")
    x, t, y = _point(path)
    net, cond, uncond = _pair(mixtures, path, y)
    g = cfg_denoiser(cond, uncond, 2.0, interval=(0.2, 0.6))
    for tt, want_uncond in ((0.1, 0), (0.7, 0), (0.4, 1), (0.2, 1), (0.6, 1)):
        before = uncond.calls
        out = g(x, torch.full_like(t, tt))
        assert uncond.calls - before == want_uncond, tt
        if not want_uncond:
            assert torch.equal(out, cond(x, torch.full_like(t, tt)))
    assert g.nfe == 2 * 1 + 3 * 2

    # Per-sample times straddling the interval: the unconditional pass covers only the samples inside.
    tt = torch.where(torch.arange(len(y)) % 2 == 0, 0.4, 0.8).double()
    gb = cfg_net(net, y, K, 2.0, interval=(0.2, 0.6))
    net.batches.clear()
    out = gb(x, tt)
    assert net.batches == [len(y) + len(y) // 2]
    c, u = cond(x, tt), uncond(x, tt)
    inside = tt <= 0.6
    want = torch.where(inside[:, None], u + 2.0 * (c - u), c)
    torch.testing.assert_close(out, want, rtol=1e-12, atol=1e-12)
    assert torch.equal(gb.sample_nfe, 1 + inside.long())


def test_sigma_interval():
    edm = get_path("edm")
    lo, hi = sigma_interval(edm, 0.28, 5.42)
    assert lo == pytest.approx(0.28 / 80) and hi == pytest.approx(5.42 / 80)
    vp = get_path("vp")
    lo, hi = sigma_interval(vp, 0.28, 5.42)
    assert float(vp.sigma_hat(torch.tensor(lo, dtype=torch.float64))) == pytest.approx(0.28)
    assert float(vp.sigma_hat(torch.tensor(hi, dtype=torch.float64))) == pytest.approx(5.42)


# ------------------------------------------------------------------------------------------ sampling


def _run(guided, path, x, grid):
    guided.reset()
    out, steps = sample("ddim", guided, path, x.clone(), grid)
    return out, steps


@pytest.fixture(scope="module")
def sampling_setup(mixtures):
    path = get_path("vp")
    grid = make_grid("karras", path, 30)
    n = 128
    x = path.prior_sample((n, 2), t=float(grid[0]), generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    y = torch.arange(n) % K
    return path, grid, x, y


@pytest.mark.parametrize("form", ["two_models", "batched"])
def test_adaptive_guidance_that_never_triggers_is_cfg(mixtures, sampling_setup, form):
    path, grid, x, y = sampling_setup
    net, cond, uncond = _pair(mixtures, path, y)

    def make(gamma):
        if form == "two_models":
            return adaptive_guidance(cond, uncond, 3.0, gamma)
        return cfg_net(net, y, K, 3.0, gamma=gamma)

    cfg = make(None)
    ref, steps = _run(cfg, path, x, grid)
    assert cfg.nfe == 2 * steps
    for gamma in (1.0, 1.5):
        ag = make(gamma)
        out, _ = _run(ag, path, x, grid)
        assert torch.equal(out, ref) and ag.nfe == cfg.nfe
        assert not bool(ag.stopped.any())


def test_adaptive_guidance_saves_evaluations_and_stays_close(mixtures, sampling_setup):
    path, grid, x, y = sampling_setup
    net = Net(mixtures, path)
    cfg = cfg_net(net, y, K, 3.0)
    ref, steps = _run(cfg, path, x, grid)
    cond_only, _ = _run(cfg_net(net, y, K, 1.0), path, x, grid)
    gap = (cond_only - ref).norm(dim=1).mean()
    assert gap > 0.05  # guidance changes the samples
    for gamma in (0.99, 0.999):
        ag = cfg_net(net, y, K, 3.0, gamma=gamma)
        out, _ = _run(ag, path, x, grid)
        assert ag.nfe < cfg.nfe and int(ag.sample_nfe.sum()) < 2 * steps * len(y)
        # every sample keeps guidance through the first quarter of the steps, and most stop in the
        # second half, where Castillo et al. find the guided and conditional steps aligned
        assert bool(ag.stopped.all())
        assert float(ag.stop_t.max()) < float(grid[steps // 4])
        assert float(ag.stop_t.median()) <= float(grid[steps // 2])
        dist = (out - ref).norm(dim=1).mean()
        assert dist < 0.1 * gap, (gamma, float(dist), float(gap))
        # reset() clears the state: a second run repeats the first exactly
        again, _ = _run(ag, path, x, grid)
        assert torch.equal(again, out)


def test_adaptive_guidance_state_is_per_run(mixtures):
    path = get_path("vp")
    x, t, _ = _point(path)
    classes, full = mixtures
    ag = adaptive_guidance(lambda x, t: classes[0].denoise(x, t, path), lambda x, t: full.denoise(x, t, path), 2.0, 0.5)
    ag(x, torch.full_like(t, 0.05))
    assert bool(ag.stopped.any())
    with pytest.raises(ValueError, match="reset"):
        ag(x[:4], t[:4])
    ag.reset()
    assert ag.nfe == 0 and ag.stopped is None
    ag(x[:4], t[:4])
    assert ag.sample_nfe.shape == (4,) and ag.nfe == 2


def test_bad_arguments_raise(mixtures):
    path = get_path("vp")
    _, cond, uncond = _pair(mixtures, path, torch.zeros(2, dtype=torch.long))
    for scale, match in ((-1.0, "-1.0"), (float("nan"), "nan"), ("2", "'2'"), (True, "True")):
        with pytest.raises(ValueError, match=match):
            cfg_denoiser(cond, uncond, scale)
    for interval, match in (((0.6, 0.2), r"\(0.6, 0.2\)"), ((-0.1, 0.5), "-0.1"), ((0.2,), r"\(0.2,\)"), (0.3, "0.3")):
        with pytest.raises(ValueError, match=match):
            cfg_denoiser(cond, uncond, 2.0, interval=interval)
    for gamma, match in ((0.0, "0.0"), (float("nan"), "nan"), (-0.5, "-0.5")):
        with pytest.raises(ValueError, match=match):
            adaptive_guidance(cond, uncond, 2.0, gamma)
    with pytest.raises(ValueError, match="sigma_lo"):
        sigma_interval(path, 2.0, 1.0)
    with pytest.raises(ValueError, match="null_label"):
        cfg_net(lambda x, t, y: x, torch.zeros(3, dtype=torch.long), torch.tensor([3, 3]), 2.0)
