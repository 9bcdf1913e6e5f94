"""Invariants of the graph system (core/system.py, graph/), independent of the official code.

- Noise: symmetric noise is symmetric with a zero diagonal and unit-variance off-diagonal entries,
  padded rows/columns are zero; node noise zeroes padded rows.
- Networks: permutation equivariance (permuting nodes of x, adj and flags permutes the outputs), zero
  output on padded nodes and on the diagonal, symmetric adjacency scores.
- Samplers: a tiny coupled Gaussian system (two node features and one edge weight, jointly Gaussian,
  on different paths) sampled with its exact scores by PC (reverse diffusion / Euler + Langevin) and
  S4, on a grid and with GDSS's discrete tables, reproduces the exact marginal, cross-covariances
  included; scores that ignore the coupling do not (the test's power).
- A one-component system is the core's single-tensor sampler: system_pc equals core ``pc`` and
  ``euler_maruyama`` draw for draw.
- Loss: with exact scores the best rescaling of the model output is 1 (the loss's minimiser is the
  true score), for each weighting; the perturbed state is masked and symmetric.
- Bad input raises ValueError.
"""

import pytest
import torch

from core.grids import karras_grid
from core.mixture import GaussianMixture
from core.paths import VEPath, VPPath
from core.system import (
    Component,
    GaussianSystem,
    discrete_betas,
    discrete_grid,
    discrete_index,
    discrete_kernel,
    iid_noise,
    langevin_alpha,
    langevin_step,
    mask_pairs,
    replay_noise,
    symmetric_noise,
    system_loss,
    system_pc,
    system_s4,
    transition,
)
from graph.gdss import gdss_sample, gdss_system
from graph.layers import AttentionLayer
from graph.model import ScoreNetworkA, ScoreNetworkX, ScoreNetworkX_GMH
from graph.utils import gen_noise, node_flags, pow_tensor

F64 = torch.float64


def random_flags(b, n, g, min_nodes=2):
    sizes = torch.randint(min_nodes, n + 1, (b,), generator=g)
    return (torch.arange(n).expand(b, n) < sizes[:, None]).to(F64)


# ------------------------------------------------------------------------------------------ noise


def test_symmetric_noise():
    g = torch.Generator().manual_seed(0)
    flags = random_flags(4000, 6, g)
    z = symmetric_noise(torch.empty(4000, 6, 6, dtype=F64), flags, g)
    assert torch.equal(z, z.transpose(-1, -2))
    assert torch.equal(torch.diagonal(z, dim1=-2, dim2=-1), torch.zeros(4000, 6, dtype=F64))
    pad = flags == 0
    assert bool((z[pad] == 0).all()) and bool((z.transpose(1, 2)[pad] == 0).all())
    # real off-diagonal entries are N(0, 1)
    real = (flags[:, :, None] * flags[:, None, :]).bool() & ~torch.eye(6, dtype=torch.bool)
    vals = z[real]
    assert abs(float(vals.mean())) < 0.02 and abs(float(vals.var()) - 1) < 0.03
    # 4D channel stacks are masked on both node axes
    a = torch.randn(3, 2, 6, 6, generator=g, dtype=F64)
    m = mask_pairs(a, flags[:3])
    assert torch.equal(m, a * flags[:3, None, :, None] * flags[:3, None, None, :])
    x = iid_noise(torch.empty(4000, 6, 3, dtype=F64), flags, g)
    assert bool((x[pad] == 0).all()) and abs(float(x[~pad].var()) - 1) < 0.03


def test_noise_is_reproducible_and_checks_shapes():
    like = torch.empty(2, 5, 5)
    a = gen_noise(like, None, sym=True, generator=torch.Generator().manual_seed(1))
    b = gen_noise(like, None, sym=True, generator=torch.Generator().manual_seed(1))
    assert torch.equal(a, b)
    with pytest.raises(ValueError, match="mask"):
        iid_noise(torch.empty(2, 5, 3), torch.ones(2, 4))
    with pytest.raises(ValueError, match="square"):
        symmetric_noise(torch.empty(2, 5, 4))


# ------------------------------------------------------------------------------------------ networks


def small_nets():
    torch.manual_seed(0)
    return {
        "x": ScoreNetworkX(5, depth=2, nhid=8).double(),
        "x_gmh": ScoreNetworkX_GMH(5, depth=2, nhid=8, num_linears=2, c_init=2, c_hid=4, c_final=3, adim=8).double(),
        "adj": ScoreNetworkA(5, 7, nhid=8, num_layers=3, num_linears=2, c_init=2, c_hid=4, c_final=3, adim=8).double(),
        "adj_mlp": ScoreNetworkA(5, 7, 8, 2, 3, 3, 4, 2, 8, num_heads=2, conv="MLP").double(),
    }


def graph_batch(g, b=3, n=7, f=5):
    flags = random_flags(b, n, g, min_nodes=3)
    a = torch.randn(b, n, n, generator=g, dtype=F64).triu(1)
    adj = mask_pairs(a + a.transpose(-1, -2), flags)
    x = torch.randn(b, n, f, generator=g, dtype=F64) * flags[..., None]
    return x, adj, flags


@pytest.mark.parametrize("name", ["x", "x_gmh", "adj", "adj_mlp"])
def test_networks_are_permutation_equivariant(name):
    net = small_nets()[name].eval()
    g = torch.Generator().manual_seed(1)
    x, adj, flags = graph_batch(g)
    perm = torch.randperm(7, generator=g)
    with torch.no_grad():
        out = net(x, adj, flags)
        out_p = net(x[:, perm], adj[:, perm][:, :, perm], flags[:, perm])
    expected = out[:, perm] if out.shape == x.shape else out[:, perm][:, :, perm]
    torch.testing.assert_close(out_p, expected, rtol=1e-10, atol=1e-12)
    assert float(out.abs().max()) > 1e-3  # not trivially zero


@pytest.mark.parametrize("name", ["x", "x_gmh", "adj", "adj_mlp"])
def test_padded_nodes_give_zero_output(name):
    net = small_nets()[name].eval()
    g = torch.Generator().manual_seed(2)
    x, adj, flags = graph_batch(g)
    with torch.no_grad():
        out = net(x, adj, flags)
        # the values on padded nodes cannot leak into real ones
        x2 = x + (1 - flags)[..., None] * 3.0
        out2 = net(x2, adj, flags)
    pad = flags == 0
    assert bool((out[pad] == 0).all())
    torch.testing.assert_close(out2, out, rtol=1e-10, atol=1e-12)
    if out.ndim == 3 and out.shape[-1] == out.shape[-2]:
        assert bool((out.transpose(1, 2)[pad] == 0).all())
        assert torch.equal(torch.diagonal(out, dim1=-2, dim2=-1), torch.zeros(3, 7, dtype=F64))
        torch.testing.assert_close(out, out.transpose(-1, -2), rtol=1e-12, atol=1e-12)


def test_attention_layer_shapes_and_pow_tensor():
    g = torch.Generator().manual_seed(3)
    x, adj, flags = graph_batch(g)
    layer = AttentionLayer(2, 5, 8, 6, 2, 3).double()
    xo, ao = layer(x, pow_tensor(adj, 2), flags)
    assert xo.shape == (3, 7, 6) and ao.shape == (3, 3, 7, 7)
    torch.testing.assert_close(pow_tensor(adj, 3)[:, 2], adj @ adj @ adj)
    assert torch.equal(node_flags(adj), (adj.abs().sum(-1) > 1e-5).to(F64))


# ------------------------------------------------------------------------------------------ a Gaussian system

# Free variables v = (X_00, X_10, A_01): two node features of a 3-node graph whose third node is padding,
# and the edge weight between the two real nodes, jointly Gaussian.
MU = torch.tensor([0.5, -0.3, 1.0], dtype=F64)
SIGMA = torch.tensor([[0.30, 0.10, 0.15], [0.10, 0.20, -0.12], [0.15, -0.12, 0.40]], dtype=F64)
PATH_X, PATH_A = VPPath(0.1, 20.0), VEPath(0.05, 5.0)
SYSTEM = GaussianSystem(
    [Component("x", PATH_X, "iid", prediction="eps"), Component("adj", PATH_A, "symmetric", prediction="score")]
)


def pack(v):
    b = v.shape[0]
    x = torch.zeros(b, 3, 1, dtype=v.dtype)
    x[:, 0, 0], x[:, 1, 0] = v[:, 0], v[:, 1]
    a = torch.zeros(b, 3, 3, dtype=v.dtype)
    a[:, 0, 1] = a[:, 1, 0] = v[:, 2]
    return x, a


def unpack(x, a):
    return torch.stack([x[:, 0, 0], x[:, 1, 0], a[:, 0, 1]], dim=1)


def coefs(t):
    t = torch.as_tensor(t, dtype=F64)
    a = torch.stack([PATH_X.alpha(t), PATH_X.alpha(t), PATH_A.alpha(t)])
    s = torch.stack([PATH_X.sigma(t), PATH_X.sigma(t), PATH_A.sigma(t)])
    return a, s


def marginal(t, sigma=SIGMA):
    a, s = coefs(t)
    return a * MU, a[:, None] * sigma * a[None, :] + torch.diag(s * s)


def gaussian_models(coupled=True):
    """Exact scores of the system; ``coupled=False`` drops the X-A covariance (a wrong joint score)."""
    sig = SIGMA.clone()
    if not coupled:
        sig[:2, 2] = sig[2, :2] = 0.0

    def score(state, t):
        m, c = marginal(float(t[0]), sig)
        return -torch.linalg.solve(c, (unpack(*state) - m).T).T

    def model_x(state, t, mask):
        sx = pack(score(state, t))[0]
        return -PATH_X.sigma(t[0].to(F64)) * sx  # an eps prediction

    def model_a(state, t, mask):
        return pack(score(state, t))[1]

    return model_x, model_a


MASK3 = torch.tensor([1.0, 1.0, 0.0], dtype=F64)


def start(b, t0, g):
    m, c = marginal(t0)
    v = m + torch.randn(b, 3, generator=g, dtype=F64) @ torch.linalg.cholesky(c).T
    return pack(v)


def moments(state):
    v = unpack(*state)
    return v.mean(0), torch.cov(v.T)


RUNS = {
    "pc_reverse": (system_pc, {"predictor": "reverse_diffusion", "snr": 0.16}),
    "pc_euler": (system_pc, {"predictor": "euler_maruyama", "snr": 0.16}),
    "pc_reverse_only": (system_pc, {"predictor": "reverse_diffusion", "corrector": "none"}),
    "s4": (system_s4, {"snr": 0.16}),
}


B_GAUSS, STEPS = 4000, 100


@pytest.mark.parametrize("run", sorted(RUNS))
@pytest.mark.parametrize("discrete", [False, True])
def test_system_sampler_reproduces_gaussian_marginals(run, discrete):
    """Mean and covariance of (X_00, X_10, A_01) after 100 steps from the exact t = 1 marginal.

    Observed errors (4000 samples, Monte Carlo std of a mean about 0.011): means <= 0.017, covariances
    <= 0.022; scores without the coupling miss the cross-covariance by 0.14 (next test).
    """
    fn, opts = RUNS[run]
    g = torch.Generator().manual_seed(4)
    if discrete:
        # GDSS's discretisation with tables of 100 entries: steps of length 1/100 from the times
        # linspace(1, 1e-3, 100); the last starts at 1e-3 and ends at t = 0.
        grid, extra, t_end = discrete_grid(STEPS, 1e-3), {"discrete_steps": STEPS}, 0.0
    else:
        grid, extra, t_end = torch.linspace(1.0, 1e-3, STEPS + 1, dtype=F64), {}, 1e-3
    mask = MASK3.expand(B_GAUSS, 3)
    state = start(B_GAUSS, 1.0, g)
    (x, a), nfe = fn(gaussian_models(), SYSTEM, state, grid, mask=mask, generator=g, last_step="none", **opts, **extra)
    # The padding stays empty and the adjacency symmetric with a zero diagonal.
    assert bool((x[:, 2] == 0).all()) and bool((a[:, 2] == 0).all()) and bool((a[:, :, 2] == 0).all())
    assert torch.equal(a, a.transpose(1, 2)) and bool((torch.diagonal(a, dim1=1, dim2=2) == 0).all())
    mean, cov = moments((x, a))
    m_ref, c_ref = marginal(t_end)
    torch.testing.assert_close(mean, m_ref, rtol=0, atol=0.04)
    torch.testing.assert_close(cov, c_ref, rtol=0, atol=0.04)
    with_corrector = fn is system_pc and opts.get("corrector", "langevin") == "langevin"
    assert nfe == STEPS * (2 if with_corrector else 1)


def test_uncoupled_scores_miss_the_cross_covariance():
    """The marginal test has power: scores without the X-A coupling give the wrong joint law."""
    g = torch.Generator().manual_seed(5)
    grid = torch.linspace(1.0, 1e-3, STEPS + 1, dtype=F64)
    (x, a), _ = system_pc(
        gaussian_models(coupled=False),
        SYSTEM,
        start(B_GAUSS, 1.0, g),
        grid,
        mask=MASK3.expand(B_GAUSS, 3),
        generator=g,
        last_step="none",
        snr=0.16,
    )
    _, cov = moments((x, a))
    _, c_ref = marginal(1e-3)
    assert float((cov[:2, 2] - c_ref[:2, 2]).abs().max()) > 0.1


@pytest.mark.parametrize("predictor", ["reverse_diffusion", "euler_maruyama"])
def test_probability_flow_converges_at_first_order(predictor):
    """``probability_flow=True`` (half the score, no noise) integrates the system's PF-ODE: the error
    against a fine-grid solution from the same start falls like 1/steps (observed slopes 1.1)."""
    b = 256
    state = start(b, 1.0, torch.Generator().manual_seed(4))
    outs = {}
    for n in (20, 80, 640):
        grid = torch.linspace(1.0, 1e-3, n + 1, dtype=F64)
        (x, a), _ = system_pc(
            gaussian_models(),
            SYSTEM,
            state,
            grid,
            mask=MASK3.expand(b, 3),
            corrector="none",
            predictor=predictor,
            probability_flow=True,
            generator=torch.Generator().manual_seed(0),
        )
        assert bool((x[:, 2] == 0).all()) and torch.equal(a, a.transpose(1, 2))
        outs[n] = unpack(x, a)
    e_coarse = (outs[20] - outs[640]).abs().max()
    e_fine = (outs[80] - outs[640]).abs().max()
    slope = float(torch.log(e_coarse / e_fine) / torch.log(torch.tensor(4.0)))
    assert 0.8 < slope < 1.5, slope


def test_one_component_system_equals_core_samplers():
    """A system of one component is the core single-tensor sampler, draw for draw."""
    from core.samplers import SAMPLERS

    if "pc" not in SAMPLERS or "euler_maruyama" not in SAMPLERS:
        pytest.skip("core.samplers.sde does not provide pc / euler_maruyama")
    path = VPPath()
    mix = GaussianMixture.random(dim=3, n_components=3, seed=1)
    den = mix.denoiser(path)
    system = GaussianSystem([Component("x", path, prediction="x0")])
    models = [lambda s, t, m: den(s[0], t)]
    x0 = path.prior_sample((64, 3), generator=torch.Generator().manual_seed(0), dtype=F64)
    cases = (
        ("pc", {"predictor": "reverse_diffusion", "snr": 0.16}, {"snr": 0.16}),
        ("pc", {"predictor": "euler_maruyama", "snr": 0.16}, {"snr": 0.16, "predictor": "euler_maruyama"}),
        ("euler_maruyama", {"predictor": "euler_maruyama", "corrector": "none"}, {}),
    )
    # with and without a last step onto data (sigma = 0), which both return alpha(0) D
    for grid in (karras_grid(path, 12), karras_grid(path, 12, final_zero=False)):
        for core_name, opts, core_opts in cases:
            ref, _ = SAMPLERS[core_name].fn(
                den, path, x0, grid, generator=torch.Generator().manual_seed(3), **core_opts
            )
            (out,), _ = system_pc(models, system, (x0,), grid, generator=torch.Generator().manual_seed(3), **opts)
            torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)


def test_corrector_holds_the_other_components_fixed():
    """n_corrector Langevin steps per component, each seeing the others as they were before the corrector."""
    g = torch.Generator().manual_seed(8)
    b = 5
    state = start(b, 0.5, g)
    mask = MASK3.expand(b, 3)
    models = gaussian_models()
    grid = torch.tensor([0.5, 0.45], dtype=F64)
    zs = [[SYSTEM[k].draw(state[k], mask, g) for _ in range(3)] for k in range(2)]
    (x, a), nfe = system_pc(
        models, SYSTEM, state, grid, mask=mask, noise=replay_noise(*zs), predictor="none", n_corrector=2, snr=0.2
    )
    assert nfe == 2
    t = grid[0]
    alpha = (PATH_X.alpha(t) / PATH_X.alpha(grid[1])) ** 2, (PATH_A.alpha(t) / PATH_A.alpha(grid[1])) ** 2
    expected = []
    for k in range(2):
        local = list(state)
        for j in range(2):
            score = SYSTEM.scores(models, tuple(local), t, mask, which=[k])[k]
            x_new, mean = langevin_step(local[k], score, zs[k][j], alpha[k], 0.2)
            local[k] = x_new if j == 0 else mean  # last_step="mean" returns the last step's mean
        expected.append(local[k])
    torch.testing.assert_close(x, expected[0])
    torch.testing.assert_close(a, expected[1])


# ------------------------------------------------------------------------------------------ loss


def test_loss_is_minimised_by_the_true_score():
    """For fixed draws the loss of ``c * model`` is quadratic in c; with the exact score its minimiser is 1."""
    g = torch.Generator().manual_seed(6)
    b = 20000
    v0 = MU + torch.randn(b, 3, generator=g, dtype=F64) @ torch.linalg.cholesky(SIGMA).T
    state0 = pack(v0)
    mask = MASK3.expand(b, 3)
    t = 0.05 + 0.9 * torch.rand(b, generator=g, dtype=F64)
    noise = [c.draw(s, mask, g) for c, s in zip(SYSTEM, state0)]
    mx, ma = gaussian_models()

    def exact_per_time(model):
        # the model sees a batch with mixed times: evaluate each sample's score at its own time
        def wrapped(state, tv, m):
            out = torch.zeros_like(state[0] if model is mx else state[1])
            for tt in torch.unique(tv):
                i = tv == tt
                out[i] = model(tuple(s[i] for s in state), tv[i], None)
            return out

        return wrapped

    # 40 distinct times keep the per-time loop short
    t = (t * 40).round() / 40
    models = (exact_per_time(mx), exact_per_time(ma))
    for opts in ({}, {"reduce_mean": True}, {"likelihood_weighting": True}):
        losses = []
        for c in (0.0, 1.0, 2.0):
            scaled = [lambda s, tv, m, f=f, c=c: c * f(s, tv, m) for f in models]
            losses.append(torch.stack(system_loss(scaled, SYSTEM, state0, mask=mask, t=t, noise=noise, **opts)))
        l0, l1, l2 = losses
        a2 = (l2 - 2 * l1 + l0) / 2  # L(c) = a2 c^2 + a1 c + a0
        a1 = l1 - l0 - a2
        c_star = -a1 / (2 * a2)
        torch.testing.assert_close(c_star, torch.ones(2, dtype=F64), rtol=0, atol=0.05)


def test_loss_perturbs_with_masked_symmetric_noise():
    seen = {}

    def model_x(state, t, mask):
        seen["state"], seen["t"] = state, t
        return torch.zeros_like(state[0])

    g = torch.Generator().manual_seed(7)
    system = gdss_system()
    x, adj, flags = graph_batch(g, b=4, n=6, f=3)
    adj = adj.abs().round()
    flags = node_flags(adj)
    x = x * flags[..., None]
    lx, la = system_loss([model_x, lambda s, t, m: torch.zeros_like(s[1])], system, (x, adj), mask=flags, generator=g)
    xt, at = seen["state"]
    assert torch.equal(at, at.transpose(1, 2)) and bool((torch.diagonal(at, dim1=1, dim2=2) == 0).all())
    pad = flags == 0
    assert bool((xt[pad] == 0).all()) and bool((at[pad] == 0).all())
    assert seen["t"].shape == (4,) and bool((seen["t"] >= 1e-5).all())
    # a zero eps prediction scores the noise itself: 0.5 * sum z^2 per sample, here ~ half the entries
    assert float(lx) > 0 and float(la) > 0


# ------------------------------------------------------------------------------------------ discretisations


def test_discrete_tables_agree_with_the_path():
    """DDPM's betas sum to the integral of beta(t) (= -2 log alpha(1)); SMLD's increments to sigma_max^2."""
    vp, ve = VPPath(0.1, 20.0), VEPath(0.01, 50.0)
    n = 1000
    total = discrete_betas(vp, n).sum()
    torch.testing.assert_close(total, -2 * torch.log(vp.alpha(torch.tensor(1.0, dtype=F64))), rtol=1e-12, atol=0)
    t = (torch.arange(n, dtype=F64) / (n - 1) + 1e-9).clamp(max=1.0)  # one time per table entry
    assert torch.equal(discrete_index(t, n), torch.arange(n))
    _, var = discrete_kernel(ve, t, n)
    torch.testing.assert_close(var.sum(), torch.tensor(50.0**2, dtype=F64), rtol=1e-12, atol=0)
    assert torch.equal(langevin_alpha(ve, t, n), torch.ones_like(t))
    # S4's transition: the mean undoes the forward drift, the std is the forward kernel's (GDSS's formulas)
    x = torch.randn(2, 3, dtype=F64)
    t, s = torch.tensor(0.6, dtype=F64), torch.tensor(0.5, dtype=F64)
    m1, _ = transition(vp, x, t, 0.55)
    m2, _ = transition(vp, m1, 0.55, s)
    m, std = transition(vp, x, t, s)
    torch.testing.assert_close(m2, m)
    torch.testing.assert_close(m, x * vp.alpha(s) / vp.alpha(t))
    torch.testing.assert_close(std, torch.sqrt(1 - (vp.alpha(t) / vp.alpha(s)) ** 2))
    _, std_ve = transition(ve, x, t, s)
    torch.testing.assert_close(std_ve, torch.sqrt(ve.sigma(t) ** 2 - ve.sigma(s) ** 2))


# ------------------------------------------------------------------------------------------ GDSS end to end


@pytest.mark.parametrize("solver", ["pc", "s4"])
def test_gdss_sample_smoke(solver):
    torch.manual_seed(0)
    mx, ma = ScoreNetworkX(4, 2, 8).eval(), ScoreNetworkA(4, 6, 8, 2, 2, 2, 4, 2, 8).eval()
    flags = random_flags(5, 6, torch.Generator().manual_seed(0)).float()
    x, adj, nfe = gdss_sample(
        mx, ma, gdss_system(), flags, 4, solver=solver, steps=20, generator=torch.Generator().manual_seed(1)
    )
    assert torch.isfinite(x).all() and torch.isfinite(adj).all()
    assert torch.equal(adj, adj.transpose(1, 2))
    assert bool((x[flags == 0] == 0).all()) and bool((adj[flags == 0] == 0).all())
    assert nfe == (40 if solver == "pc" else 20)
    x2, adj2, _ = gdss_sample(
        mx, ma, gdss_system(), flags, 4, solver=solver, steps=20, generator=torch.Generator().manual_seed(1)
    )
    assert torch.equal(x, x2) and torch.equal(adj, adj2)


# ------------------------------------------------------------------------------------------ bad input


def test_bad_input_raises():
    b = 2
    mask = MASK3.expand(b, 3)
    state = pack(torch.zeros(b, 3, dtype=F64))
    models = gaussian_models()
    grid = torch.linspace(1.0, 0.1, 4, dtype=F64)
    with pytest.raises(ValueError, match="predictor"):
        system_pc(models, SYSTEM, state, grid, mask=mask, predictor="heun")
    with pytest.raises(ValueError, match="corrector"):
        system_pc(models, SYSTEM, state, grid, mask=mask, corrector="ald")
    with pytest.raises(ValueError, match="one model per component"):
        system_pc(models[:1], SYSTEM, state, grid, mask=mask)
    with pytest.raises(ValueError, match="snr"):
        system_s4(models, SYSTEM, state, grid, mask=mask, snr=0.0)
    with pytest.raises(ValueError, match="decreasing"):
        system_pc(models, SYSTEM, state, grid.flip(0), mask=mask)
    with pytest.raises(ValueError, match="2 tensors"):
        system_s4(models, SYSTEM, state[:1], grid, mask=mask)
    with pytest.raises(ValueError, match="discrete"):
        system_pc(models, SYSTEM, state, grid, mask=mask, discrete_steps=1)
    with pytest.raises(ValueError, match="exhausted"):
        system_pc(models, SYSTEM, state, grid, mask=mask, noise=replay_noise([], []))
    with pytest.raises(ValueError, match="noise"):
        Component("c", PATH_X, noise="gaussian")
    with pytest.raises(ValueError, match="prediction"):
        Component("c", PATH_X, prediction="logits")
    with pytest.raises(ValueError, match="t must have shape"):
        system_loss(models, SYSTEM, state, mask=mask, t=torch.ones(3))
    with pytest.raises(ValueError, match="alpha"):
        from core.paths import LinearPath

        lin = GaussianSystem([Component("x", LinearPath())])
        system_s4([lambda s, t, m: s[0]], lin, (torch.zeros(2, 3),), torch.tensor([1.0, 0.5, 0.0]))
