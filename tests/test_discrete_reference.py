"""core.discrete against the official SEDD code (../shared/fixtures/sedd_reference.pt, README section).

Tolerances are the README's: rtol 1e-5 / atol 1e-6 in general, rtol 5e-3 where the official
float32 formulas cancel (log-linear rate near t=1, uniform score entropy at tiny sigma, the
absorbing denoiser probabilities, uniform transposed transitions and analytic probabilities).
Discrete outputs must match exactly, from the recorded uniforms or from the same global seed.
"""

import math

import pytest
import torch

from core.discrete import (
    Absorbing,
    Geometric,
    LogLinear,
    Uniform,
    analytic_probs,
    denoise_probs,
    euler_probs,
    sample_analytic,
    sample_categorical,
    sample_euler,
    score_entropy_loss,
)
from tests.conftest import load_fixture

GRAPHS = ("absorb", "uniform")
LOOSE = dict(rtol=5e-3, atol=1e-6)
TIGHT = dict(rtol=1e-5, atol=1e-6)


@pytest.fixture(scope="module")
def ref():
    return load_fixture("sedd_reference.pt")


def setup(name):
    if name == "absorb":
        return Absorbing(8), LogLinear(1e-3)
    return Uniform(8), Geometric(1e-4, 20.0)


def close(actual, expected, **tol):
    torch.testing.assert_close(actual.to(expected.dtype), expected, **(tol or TIGHT))


def reference_model(ref, name):
    """The fixture's deterministic log-score model: ``W[x] + sigma c`` (absorb: minus log(esigm1) + log(D-1))."""
    W, c = ref[f"{name}/model/W"], ref[f"{name}/model/c"]

    def log_score_fn(x, sigma):
        sigma = sigma.reshape(-1)
        raw = W[x] + sigma[:, None, None] * c
        if name == "absorb":
            # as model/transformer.py SEDD.forward with scale_by_sigma (official float32 formula)
            esigm1 = torch.where(sigma < 0.5, torch.expm1(sigma), sigma.exp() - 1)
            raw = raw - esigm1.log()[:, None, None] - math.log(raw.shape[-1] - 1)
        return torch.scatter(raw, -1, x[..., None], torch.zeros_like(raw[..., :1]))

    return log_score_fn


# -- noise ---------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "key,noise",
    [("loglinear", LogLinear(1e-3)), ("geometric", Geometric(1e-4, 20.0)), ("geometric_default", Geometric())],
)
def test_noise(ref, key, noise):
    t = ref["noise/t_grid"]
    sigma, dsigma = noise(t)
    assert sigma.dtype == torch.float32
    close(sigma, ref[f"noise/{key}/total_noise"])
    # the official float32 rate cancels near t = 1 (README: rel 1.3e-5)
    close(dsigma, ref[f"noise/{key}/rate_noise"], **(LOOSE if key == "loglinear" else TIGHT))
    close(noise.sigma(t), sigma, rtol=0, atol=0)
    close(noise.rate(t), dsigma, rtol=0, atol=0)


# -- graph functions -----------------------------------------------------------------------------
@pytest.mark.parametrize("name", GRAPHS)
def test_graph_rates_and_transitions(ref, name):
    graph, noise = setup(name)
    x0, x_in = ref["inputs/x0"], ref[f"inputs/{name}/x_in"]
    sigma, dsigma = noise(ref["inputs/t_batch"])
    close(sigma, ref[f"{name}/sigma"])
    close(dsigma, ref[f"{name}/dsigma"])
    close(graph.rate(x0), ref[f"{name}/rate_x0"], rtol=0, atol=0)
    close(graph.transp_rate(x_in), ref[f"{name}/transp_rate_xin"], rtol=0, atol=0)
    loose = LOOSE if name == "uniform" else TIGHT
    close(graph.transp_transition(x_in, sigma[:, None]), ref[f"{name}/transp_transition_xin_sigma"], **loose)
    # a (B,) sigma is read per sequence, like SEDD's sigma[:, None]
    close(graph.transp_transition(x_in, sigma), ref[f"{name}/transp_transition_xin_sigma"], **loose)
    close(
        graph.transp_transition(x_in, ref["inputs/dsigma_fixed"]),
        ref[f"{name}/transp_transition_xin_dsigmafixed"],
        **loose,
    )
    if name == "uniform":
        close(graph.transition(x_in, sigma[:, None]), ref["uniform/transition_xin_sigma"], **LOOSE)


@pytest.mark.parametrize("name", GRAPHS)
def test_sample_transition_and_limit(ref, name):
    graph, noise = setup(name)
    x0 = ref["inputs/x0"]
    sigma = noise.sigma(ref["inputs/t_batch"])
    key = f"{name}/sample_transition"
    close(-torch.expm1(-sigma[:, None]), ref[f"{key}/move_chance"])
    torch.manual_seed(100)
    out = graph.sample_transition(x0, sigma[:, None])
    assert torch.equal(out, ref[f"{key}/out"])
    # RNG-free recomputation from the recorded draws
    moved = ref[f"{key}/uniforms"] < ref[f"{key}/move_chance"]
    new = torch.full_like(x0, graph.mask_id) if name == "absorb" else ref[f"{key}/randint"]
    assert torch.equal(torch.where(moved, new, x0), out)
    # an explicit generator gives the same stream as the seeded global RNG
    assert torch.equal(graph.sample_transition(x0, sigma, torch.Generator().manual_seed(100)), out)
    torch.manual_seed(4)
    assert torch.equal(graph.sample_limit(4, 6), ref[f"{name}/sample_limit"])


@pytest.mark.parametrize("name", GRAPHS)
def test_reverse_rate_and_staggered_score(ref, name):
    graph, _ = setup(name)
    x_in = ref[f"inputs/{name}/x_in"]
    score = ref[f"{name}/logscore"].exp()
    close(graph.reverse_rate(x_in, score), ref[f"{name}/reverse_rate_xin"])
    close(graph.staggered_score(score, ref["inputs/dsigma_fixed"]), ref[f"{name}/staggered_score"])
    close(graph.staggered_score(score, ref["inputs/dsigma_fixed"][:, 0]), ref[f"{name}/staggered_score"])


@pytest.mark.parametrize("name", GRAPHS)
def test_score_entropy(ref, name):
    graph, noise = setup(name)
    sigma = noise.sigma(ref["inputs/t_batch"])[:, None]
    x0, x_in, xp = ref["inputs/x0"], ref[f"inputs/{name}/x_in"], ref[f"{name}/sample_transition/out"]
    logscore = ref[f"{name}/logscore"]
    close(graph.score_entropy(logscore, sigma, xp, x0), ref[f"{name}/score_entropy_xp"])
    # uniform at sigma ~ 1.8e-4: the official ratio 1 - N/(esigm1 + N) cancels (README: rel 3.4e-4)
    loose = LOOSE if name == "uniform" else TIGHT
    close(graph.score_entropy(logscore, sigma, x_in, x0), ref[f"{name}/score_entropy_xin"], **loose)


# -- the loss ------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", GRAPHS)
def test_model_and_loss(ref, name):
    graph, noise = setup(name)
    model = reference_model(ref, name)
    x0, xp = ref["inputs/x0"], ref[f"{name}/sample_transition/out"]
    t = ref["inputs/t_batch"]
    close(model(xp, noise.sigma(t)), ref[f"{name}/model/logscore_xp"])
    loss = score_entropy_loss(model, graph, noise, x0, t=t, xt=xp)
    close(loss, ref[f"{name}/loss/deterministic"])

    torch.manual_seed(7)
    seeded = score_entropy_loss(model, graph, noise, x0)
    close(seeded, ref[f"{name}/loss/seeded7"])
    # the same draws through an explicit generator, and the recorded (t, x_t) reproduce it too
    g = torch.Generator().manual_seed(7)
    close(score_entropy_loss(model, graph, noise, x0, generator=g), seeded, rtol=0, atol=0)
    recorded = score_entropy_loss(
        model, graph, noise, x0, t=ref[f"{name}/loss/seeded7/t"], xt=ref[f"{name}/loss/seeded7/perturbed"]
    )
    close(recorded, ref[f"{name}/loss/seeded7"])


# -- one sampling step from the recorded uniforms ---------------------------------------------------
@pytest.mark.parametrize("name", GRAPHS)
def test_sampling_steps(ref, name):
    graph, noise = setup(name)
    model = reference_model(ref, name)
    x_in = ref[f"inputs/{name}/x_in"]
    t, dt = ref[f"{name}/sampling/t"], float(ref[f"{name}/sampling/dt"])
    sigma, dsigma = noise(t[:, 0])
    score = model(x_in, sigma).exp()
    close(score, ref[f"{name}/sampling/score_xin"])

    key = f"{name}/sampling/euler"
    rev_rate = dt * dsigma[:, None, None] * graph.reverse_rate(x_in, score)
    close(rev_rate, ref[f"{key}/rev_rate"])
    probs = euler_probs(graph, x_in, score, dt * dsigma)
    close(probs, ref[f"{key}/probs"])
    assert torch.equal(sample_categorical(ref[f"{key}/probs"], uniforms=ref[f"{key}/uniforms"]), ref[f"{key}/out"])
    assert torch.equal(sample_categorical(probs, uniforms=ref[f"{key}/uniforms"]), ref[f"{key}/out"])
    torch.manual_seed(11)
    assert torch.equal(sample_categorical(probs), ref[f"{key}/out"])

    key = f"{name}/sampling/analytic"
    step = noise.sigma(t[:, 0]) - noise.sigma(t[:, 0] - dt)
    close(step[:, None], ref[f"{key}/dsigma"], rtol=2e-5, atol=1e-6)  # sigma(t) - sigma(t - dt) in float32
    close(graph.staggered_score(score, step), ref[f"{key}/stag_score"])
    loose = LOOSE if name == "uniform" else TIGHT
    close(graph.transp_transition(x_in, step), ref[f"{key}/transp_transition"], **loose)
    probs = analytic_probs(graph, x_in, score, step)
    close(probs, ref[f"{key}/probs"], **loose)
    assert torch.equal(sample_categorical(probs, uniforms=ref[f"{key}/uniforms"]), ref[f"{key}/out"])

    key = f"{name}/sampling/denoiser"
    s_eps = noise.sigma(torch.full((4,), 1e-5))
    probs = denoise_probs(graph, x_in, model(x_in, s_eps).exp(), s_eps)
    assert probs.shape == ref[f"{key}/probs"].shape
    # absorb: 1 - exp(-sigma) at sigma ~ 1e-5 loses digits in float32 (README: rel 2.4e-3)
    close(probs, ref[f"{key}/probs"], **LOOSE)
    assert torch.equal(sample_categorical(probs, uniforms=ref[f"{key}/uniforms"]), ref[f"{key}/out"])


# -- the full predictor-corrector sampler (4 steps + denoiser) from the same global seed ------------
@pytest.mark.parametrize("name", GRAPHS)
@pytest.mark.parametrize("pred", ["euler", "analytic"])
def test_pc_sampler(ref, name, pred):
    graph, noise = setup(name)
    model = reference_model(ref, name)
    key = f"{name}/pc_sampler/{pred}"
    sampler = sample_euler if pred == "euler" else sample_analytic

    torch.manual_seed(21)
    x_init = graph.sample_limit(4, 6)
    assert torch.equal(x_init, ref[f"{key}/x_init"])

    # Record every categorical draw so that each call can be compared with the official one.
    calls = []

    def score_fn(x, sigma):
        return model(x, sigma).exp()

    import core.discrete.sampling as sampling

    original = sampling.sample_categorical

    def recorder(probs, generator=None, uniforms=None):
        out = original(probs, generator, uniforms=uniforms)
        calls.append((probs, out))
        return out

    sampling.sample_categorical = recorder
    try:
        out, nfe = sampler(score_fn, graph, noise, x_init, 4, eps=1e-5)
    finally:
        sampling.sample_categorical = original

    assert torch.equal(nfe, torch.full((4,), 5))
    assert len(calls) == 5
    for k, (probs, call_out) in enumerate(calls):
        expected = ref[f"{key}/probs"][k]
        if probs.shape[-1] < expected.shape[-1]:  # the absorbing denoiser drops the mask column
            probs = torch.nn.functional.pad(probs, (0, 1))
        tol = LOOSE if (k == 4 or name == "uniform") else dict(rtol=1e-4, atol=1e-6)
        close(probs, expected, **tol)
        assert torch.equal(call_out, ref[f"{key}/per_call_out"][k])
    assert torch.equal(out, ref[f"{key}/out"])
