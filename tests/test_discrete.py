"""core.discrete checked against independent results: matrix exponentials, exact concrete scores of
small factorised or enumerable distributions, the RADD identities, and sampler invariants."""

import itertools
import math

import pytest
import torch
from scipy import special, stats

from core.discrete import (
    Absorbing,
    Geometric,
    LogLinear,
    Uniform,
    absorbing_dce_loss,
    absorbing_log_score,
    absorbing_score,
    analytic_probs,
    dce_weight,
    get_graph,
    get_noise,
    infill_condition,
    lambda_dce_loss,
    prefix_condition,
    sample_absorbing,
    sample_analytic,
    sample_categorical,
    sample_euler,
    score_entropy_loss,
    time_grid,
)

torch.set_default_dtype(torch.float32)
D64 = torch.float64


def make(name, V=5):
    return (Absorbing(V), LogLinear(1e-3)) if name == "absorb" else (Uniform(V), Geometric(1e-4, 20.0))


def q_matrix(graph, dtype=D64):
    """Q with Q[j, i] = rate i -> j, built from the columns ``graph.rate(i)``."""
    return graph.rate(torch.arange(graph.dim), dtype=dtype).T


def p_matrix(graph, sigma):
    """exp(sigma Q) from ``graph.transition``: column i is transition(i)."""
    return graph.transition(torch.arange(graph.dim), torch.tensor(sigma, dtype=D64)).T


def pad_mask(graph, pi):
    """Data distributions over the graph's states (zero mass on the absorbing mask)."""
    return torch.nn.functional.pad(pi, (0, graph.dim - pi.shape[-1]))


def exact_marginal(graph, pi, sigma):
    """p_t for per-token data distributions pi (L, V) at per-sequence sigma (B,): (B, L, dim)."""
    sigma = torch.as_tensor(sigma, dtype=D64).reshape(-1)
    trans = graph.transition(torch.arange(graph.dim).expand(len(sigma), -1), sigma)  # (B, a, y)
    return torch.einsum("la,bay->bly", pad_mask(graph, pi), trans)


def exact_score_fn(graph, pi):
    """Exact concrete score p_t(y) / p_t(x_l) of a factorised distribution (tokens independent)."""

    def score_fn(x, sigma):
        sigma = sigma.double()
        if bool((sigma == sigma[0]).all()):  # one sequence-wide time: compute the marginal once
            p = exact_marginal(graph, pi, sigma[:1]).expand(x.shape[0], -1, -1)
        else:
            p = exact_marginal(graph, pi, sigma)
        return p / p.gather(-1, x[..., None])

    return score_fn


def tv_marginals(x, pi):
    """Largest total variation over positions between empirical and target per-token laws."""
    V = pi.shape[-1]
    emp = torch.nn.functional.one_hot(x, max(V, int(x.max()) + 1)).double().mean(0)[:, :V]
    return 0.5 * (emp - pi).abs().sum(-1).max().item()


def random_pi(L, V, seed):
    """Per-position data distributions (L, V), every token with mass >= ~0.04."""
    g = torch.Generator().manual_seed(seed)
    return _norm(torch.rand(L, V, generator=g, dtype=D64) + 0.2)


def _norm(p):
    return p / p.sum(-1, keepdim=True)


# -- noise schedules -------------------------------------------------------------------------------
@pytest.mark.parametrize("noise", [LogLinear(1e-3), LogLinear(0.2), Geometric(), Geometric(1e-4, 20.0)])
def test_noise_rate_is_derivative(noise):
    t = torch.linspace(0.01, 0.99, 17, dtype=D64)
    h = 1e-6
    fd = (noise.sigma(t + h) - noise.sigma(t - h)) / (2 * h)
    torch.testing.assert_close(noise.rate(t), fd, rtol=1e-6, atol=1e-8)
    assert noise.sigma(t).dtype == D64 and noise(t.float())[0].dtype == torch.float32


def test_noise_closed_forms():
    t = torch.linspace(0, 1, 11, dtype=D64)
    ll = LogLinear(1e-3)
    torch.testing.assert_close(ll.mask_prob(t), (1 - 1e-3) * t, rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(ll.sigma(torch.tensor(1.0, dtype=D64)), torch.tensor(-math.log(1e-3), dtype=D64))
    geo = Geometric(1e-4, 20.0)
    torch.testing.assert_close(geo.sigma(torch.tensor([0.0, 1.0], dtype=D64)), torch.tensor([1e-4, 20.0], dtype=D64))
    # the t-DCE weight of the log-linear schedule is 1 / t for any eps
    tt = torch.linspace(0.05, 1, 20, dtype=D64)
    for eps in (1e-3, 0.3):
        torch.testing.assert_close(dce_weight(LogLinear(eps), tt), 1 / tt, rtol=1e-10, atol=0)
    assert isinstance(get_noise("geometric", sigma_min=0.1, sigma_max=2), Geometric)


# -- graphs: rate matrices and transition kernels -------------------------------------------------------
@pytest.mark.parametrize("name", ["absorb", "uniform"])
def test_rate_matrix_is_a_generator(name):
    graph, _ = make(name)
    Q = q_matrix(graph)
    torch.testing.assert_close(Q.sum(0), torch.zeros(graph.dim, dtype=D64))  # columns conserve mass
    off = Q - torch.diag(torch.diag(Q))
    assert bool((off >= 0).all())
    # transp_rate(i) is row i of the same Q
    torch.testing.assert_close(graph.transp_rate(torch.arange(graph.dim), dtype=D64), Q)


@pytest.mark.parametrize("name", ["absorb", "uniform"])
@pytest.mark.parametrize("sigma", [1e-4, 0.3, 2.5])
def test_transition_is_matrix_exponential(name, sigma):
    graph, _ = make(name)
    Q = q_matrix(graph)
    expm = torch.linalg.matrix_exp(sigma * Q)
    P = p_matrix(graph, sigma)
    torch.testing.assert_close(P, expm, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(P.sum(0), torch.ones(graph.dim, dtype=D64))  # stochastic columns
    assert bool((P >= 0).all())
    rows = graph.transp_transition(torch.arange(graph.dim), torch.tensor(sigma, dtype=D64))
    torch.testing.assert_close(rows, expm, rtol=1e-10, atol=1e-12)
    # Kolmogorov forward equation d/dsigma exp(sigma Q) = Q exp(sigma Q)
    h = 1e-6
    dP = (p_matrix(graph, sigma + h) - p_matrix(graph, sigma - h)) / (2 * h) if sigma > h else None
    if dP is not None:
        torch.testing.assert_close(dP, Q @ P, rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("name", ["absorb", "uniform"])
def test_semigroup(name):
    graph, _ = make(name)
    for s1, s2 in [(0.1, 0.7), (1.3, 0.02), (3.0, 2.0)]:
        torch.testing.assert_close(
            p_matrix(graph, s1) @ p_matrix(graph, s2), p_matrix(graph, s1 + s2), rtol=1e-10, atol=1e-12
        )


@pytest.mark.parametrize("name", ["absorb", "uniform"])
def test_sample_transition_frequencies(name):
    graph, _ = make(name, V=4)
    n, sigma = 20000, 0.7
    g = torch.Generator().manual_seed(0)
    P = p_matrix(graph, sigma)
    for i in range(graph.dim):
        x = torch.full((n // 100, 100), i)
        out = graph.sample_transition(x, sigma, generator=g)
        counts = torch.bincount(out.flatten(), minlength=graph.dim).double()
        expected = P[:, i] * n
        support = expected > 0
        assert counts[~support].sum() == 0, "a draw landed outside the support"
        if support.sum() > 1:
            p = stats.chisquare(counts[support].numpy(), expected[support].numpy()).pvalue
            assert p > 1e-3, (i, counts, expected)
    # the limit draws: uniform is uniform, absorbing is all-mask
    lim = graph.sample_limit(200, 50, generator=g)
    if name == "absorb":
        assert bool((lim == graph.mask_id).all())
    else:
        counts = torch.bincount(lim.flatten(), minlength=graph.dim).numpy()
        assert stats.chisquare(counts).pvalue > 1e-3


@pytest.mark.parametrize("name", ["absorb", "uniform"])
def test_staggered_score_is_backward_heat_kernel(name):
    graph, _ = make(name)
    g = torch.Generator().manual_seed(1)
    score = torch.rand(3, 4, graph.dim, generator=g, dtype=D64) * 2
    dsigma = torch.tensor([0.01, 0.3, 1.2], dtype=D64)
    Q = q_matrix(graph)
    expected = torch.stack([score[b] @ torch.linalg.matrix_exp(-dsigma[b] * Q).T for b in range(3)])
    torch.testing.assert_close(graph.staggered_score(score, dsigma), expected, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("name", ["absorb", "uniform"])
def test_reverse_rate_reverses_the_forward_equation(name):
    """With the exact score, sum_x R(x -> y) p(x) = -(Q p)(y): the time reversal of dp/dsigma = Q p."""
    graph, _ = make(name)
    pi = _norm(torch.rand(1, graph.vocab_size, generator=torch.Generator().manual_seed(2), dtype=D64) + 0.1)
    sigma = torch.tensor([0.4], dtype=D64)
    p = exact_marginal(graph, pi, sigma)[0, 0]  # (dim,)
    states = torch.arange(graph.dim)
    score = p[None, :] / p[:, None]  # score[x, y] = p(y) / p(x)
    R = graph.reverse_rate(states, score)  # R[x, y] = rate x -> y
    torch.testing.assert_close(R.sum(-1), torch.zeros(graph.dim, dtype=D64), atol=1e-12, rtol=0)
    torch.testing.assert_close(R.T @ p, -(q_matrix(graph) @ p), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("name", ["absorb", "uniform"])
def test_analytic_step_is_exact_posterior(name):
    """Tweedie step with the exact score = p(x_s = y | x_t = x) by Bayes, for one token."""
    graph, _ = make(name)
    pi = _norm(torch.rand(1, graph.vocab_size, generator=torch.Generator().manual_seed(3), dtype=D64) + 0.1)
    s_t, s_s = 1.1, 0.4
    p_t = exact_marginal(graph, pi, [s_t])[0, 0]
    p_s = exact_marginal(graph, pi, [s_s])[0, 0]
    K = p_matrix(graph, s_t - s_s)  # K[x, y] = p(x_t = x | x_s = y)
    states = torch.arange(graph.dim)
    valid = p_t > 0
    score = p_t[None, :] / p_t[states, None]
    probs = analytic_probs(graph, states, score, torch.tensor(s_t - s_s, dtype=D64))
    posterior = K * p_s[None, :] / p_t[:, None]
    torch.testing.assert_close(probs[valid], posterior[valid], rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(probs[valid].sum(-1), torch.ones(int(valid.sum()), dtype=D64))


# -- score entropy ----------------------------------------------------------------------------------
def consistent_pairs(graph, B, L, sigma, seed):
    g = torch.Generator().manual_seed(seed)
    x0 = torch.randint(0, graph.vocab_size, (B, L), generator=g)
    return x0, graph.sample_transition(x0, sigma, generator=g)


@pytest.mark.parametrize("name", ["absorb", "uniform"])
def test_score_entropy_nonnegative_and_zero_at_exact_ratios(name):
    graph, _ = make(name, V=6)
    sigma = torch.tensor([0.05, 0.4, 1.0, 3.0], dtype=D64)
    x0, x = consistent_pairs(graph, 4, 64, sigma, 4)
    g = torch.Generator().manual_seed(5)
    random = torch.randn(4, 64, graph.dim, generator=g, dtype=D64) * 2
    se = graph.score_entropy(random, sigma, x, x0)
    assert se.shape == x.shape and bool((se >= 0).all())
    # the conditional ratios p(y | x0) / p(x | x0) give exactly 0
    P = graph.transition(x0, sigma)  # p(x_t = . | x0)
    exact = P.clamp_min(1e-300).log() - P.gather(-1, x[..., None]).log()
    torch.testing.assert_close(graph.score_entropy(exact, sigma, x, x0), torch.zeros_like(se), atol=1e-9, rtol=0)
    # ... and any perturbation of a relevant ratio makes it positive
    bumped = exact + 0.1 * torch.randn(exact.shape, generator=g, dtype=D64)
    pert = graph.score_entropy(bumped, sigma, x, x0)
    relevant = (x == graph.mask_id) if name == "absorb" else torch.ones_like(x, dtype=torch.bool)
    assert bool((pert[relevant] > 0).all())


@pytest.mark.parametrize("name", ["absorb", "uniform"])
def test_expected_score_entropy_is_bregman_to_marginal_score(name):
    """E_{x0 | x}[DSE(s; x, x0)] - E[DSE(r; x, x0)] = sum_y w_y (s_y - r_y log s_y - r_y + r_y log r_y),

    r the exact marginal ratios p_t(y) / p_t(x) of a factorised distribution (SEDD), w the
    score-entropy weights Q[x, y]. So the exact score minimises the loss and the excess is explicit."""
    graph, _ = make(name, V=4)
    L = 3
    pi = random_pi(L, graph.vocab_size, 6)
    sigma = 0.6
    p_t = exact_marginal(graph, pi, [sigma])[0]  # (L, dim)
    P = p_matrix(graph, sigma)  # P[x, a] = p(x_t = x | x0 = a)
    g = torch.Generator().manual_seed(7)
    clean = torch.arange(graph.vocab_size)

    def expected_dse(log_s, x, post):  # E_{x0 ~ post}[DSE(log_s; x, x0)]
        xs = torch.full_like(clean, x)
        return (graph.score_entropy(log_s.expand(len(clean), -1), sigma, xs, clean) * post).sum()

    for l in range(L):
        for x in range(graph.dim):
            post = P[x, : graph.vocab_size] * pi[l] / p_t[l, x]  # p(x0 = a | x_t = x)
            r = p_t[l] / p_t[l, x]
            log_r = r.clamp_min(1e-300).log()
            s = torch.randn(graph.dim, generator=g, dtype=D64)
            w = graph.transp_rate(torch.tensor(x), dtype=D64).clamp_min(0)  # Q[x, y] for y != x
            w[x] = 0
            bregman = (w * (s.exp() - r * s - r + r * log_r)).sum()
            excess = expected_dse(s, x, post) - expected_dse(log_r, x, post)
            torch.testing.assert_close(excess, bregman, rtol=1e-9, atol=1e-10)
            assert excess >= -1e-12


# -- RADD: the time-independent parameterisation and the cross-entropy bounds ----------------------------
def random_log_probs_fn(V, L, seed, consistent_joint=None):
    """A deterministic clean-token model: log-softmax of a table indexed by the whole (small) sequence."""
    if consistent_joint is not None:
        table = conditional_table(consistent_joint, V, L).log()
    else:
        g = torch.Generator().manual_seed(seed)
        table = torch.randn((V + 1) ** L, L, V, generator=g, dtype=D64).log_softmax(-1)
    codes = (V + 1) ** torch.arange(L)

    def log_probs_fn(x):
        return table[(x * codes).sum(-1)]

    return log_probs_fn


def conditional_table(joint, V, L):
    """cond[s, l, y] = p(x_l = y | x_j = s_j for the unmasked j != l) from a joint (V,)*L."""
    states = list(itertools.product(range(V + 1), repeat=L))
    out = torch.zeros(len(states), L, V, dtype=D64)
    for s in states:
        code = sum(v * (V + 1) ** k for k, v in enumerate(s))
        for l in range(L):
            sl = tuple(slice(None) if (j == l or s[j] == V) else s[j] for j in range(L))
            m = joint[sl]
            keep = [j for j in range(L) if j == l or s[j] == V]  # axes left in m, in order
            m = m.sum(dim=tuple(k for k, j in enumerate(keep) if j != l)) if len(keep) > 1 else m
            out[code, l] = m / m.sum()
    return out


def correlated_joint(V, L, seed):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn((V,) * L, generator=g, dtype=D64)
    grid = torch.stack(torch.meshgrid(*[torch.arange(V)] * L, indexing="ij"))
    logits = logits + 2.0 * sum((grid[j] == grid[j + 1]).double() for j in range(L - 1))
    return logits.exp() / logits.exp().sum()


def test_dce_equals_score_entropy_with_radd_score():
    """RADD: with normalised probs the SEDD loss of the converted score IS the t-DCE loss."""
    V, L, B = 5, 7, 64
    graph, noise = Absorbing(V), LogLinear(1e-3)
    g = torch.Generator().manual_seed(8)
    W = torch.randn(V + 1, V, generator=g, dtype=D64)

    def log_probs_fn(x):  # depends on the token and on the number of masks in the row
        return (W[x] + 0.3 * (x == V).sum(-1, keepdim=True)[..., None]).log_softmax(-1)

    x0 = torch.randint(0, V, (B, L), generator=g)
    sedd = score_entropy_loss(
        lambda x, s: absorbing_log_score(log_probs_fn(x), x, s, graph),
        graph,
        noise,
        x0,
        generator=torch.Generator().manual_seed(9),
    )
    dce = absorbing_dce_loss(log_probs_fn, graph, noise, x0, generator=torch.Generator().manual_seed(9))
    assert (dce > 0).any()
    torch.testing.assert_close(sedd, dce, rtol=1e-6, atol=0)  # t is drawn in float32, as the official code
    t = torch.rand(B, generator=g, dtype=D64) * 0.999 + 1e-3
    xt = Absorbing(V).sample_transition(x0, noise.sigma(t), generator=g)
    sedd = score_entropy_loss(lambda x, s: absorbing_log_score(log_probs_fn(x), x, s), graph, noise, x0, t=t, xt=xt)
    def dce_of(xt_):
        return absorbing_dce_loss(log_probs_fn, graph, noise, x0, t=t, xt=xt_)

    dce = dce_of(xt)
    torch.testing.assert_close(sedd, dce, rtol=1e-12, atol=1e-12)
    for loss in (lambda: dce_of(xt[:, :-1]), lambda: dce_of(xt[:1])):  # an xt of another shape is named
        with pytest.raises(ValueError, match="xt shape"):
            loss()
    # the score is the clean conditional over (e^sigma - 1), 1 at the current token
    x = torch.where(torch.rand(B, L, generator=g) < 0.5, V, x0)
    sigma = torch.full((B,), 0.7, dtype=D64)
    s = absorbing_score(log_probs_fn(x).exp(), x, sigma)
    torch.testing.assert_close(s, absorbing_log_score(log_probs_fn(x), x, sigma).exp())
    masked = x == V
    torch.testing.assert_close(s[masked][:, :V], log_probs_fn(x).exp()[masked] / math.expm1(0.7))
    assert bool((s.gather(-1, x[..., None]) == 1).all())


def exact_lambda_dce(log_probs_fn, x0, V):
    """E_{lambda ~ U(0,1]} E_{mask}[lambda-DCE] by enumerating masks: sum_M B(|M|, L-|M|+1) NLL(M)."""
    L = x0.shape[-1]
    total = 0.0
    for mask in itertools.product([False, True], repeat=L):
        k = sum(mask)
        if k == 0:
            continue
        m = torch.tensor(mask)
        xt = torch.where(m, V, x0)
        nll = -log_probs_fn(xt[None])[0].gather(-1, x0[:, None])[:, 0][m].sum()
        total += math.exp(special.betaln(k, L - k + 1)) * nll.item()
    return total


def ao_arm_logliks(log_probs_fn, x0, V):
    """log q_order(x0) for every order: the any-order autoregressive model RADD identifies."""
    L = x0.shape[-1]
    out = []
    for order in itertools.permutations(range(L)):
        xt = torch.full_like(x0, V)
        ll = 0.0
        for pos in order:
            ll += log_probs_fn(xt[None])[0, pos, x0[pos]].item()
            xt[pos] = x0[pos]
        out.append(ll)
    return torch.tensor(out, dtype=D64)


def test_lambda_dce_bounds_the_nll():
    V, L = 3, 3
    graph = Absorbing(V)
    joint = correlated_joint(V, L, 10)
    consistent = random_log_probs_fn(V, L, 0, consistent_joint=joint)
    inconsistent = random_log_probs_fn(V, L, 11)
    for x0 in ([0, 0, 0], [1, 2, 0], [2, 2, 1]):
        x0 = torch.tensor(x0)
        # the true conditionals of one joint: the bound is tight, = -log p(x0)
        bound = exact_lambda_dce(consistent, x0, V)
        assert bound == pytest.approx(-joint[tuple(x0)].log().item(), rel=1e-10)
        # arbitrary conditionals: bound = E_order[-log q_order] >= -log E_order[q_order] = -log p_theta
        bound = exact_lambda_dce(inconsistent, x0, V)
        lls = ao_arm_logliks(inconsistent, x0, V)
        assert bound == pytest.approx(-lls.mean().item(), rel=1e-10)
        nll_theta = -(torch.logsumexp(lls, 0) - math.log(len(lls))).item()
        assert bound > nll_theta + 1e-6
        # the Monte Carlo loss estimates that expectation
        n = 40000
        loss = lambda_dce_loss(inconsistent, graph, x0.expand(n, -1), generator=torch.Generator().manual_seed(12))
        mean, se = loss.mean().item(), loss.std().item() / math.sqrt(n)
        assert abs(mean - bound) < 4 * se, (mean, bound, se)


def test_t_dce_integrates_to_lambda_dce():
    """int_0^1 E[t-DCE] dt (log-linear, eps) = int_0^{1-eps} lambda^{k-1} (1-lambda)^{L-k} NLL(M) dlambda."""
    V, L, eps = 3, 3, 0.05
    graph, noise = Absorbing(V), LogLinear(eps)
    fn = random_log_probs_fn(V, L, 13)
    x0 = torch.tensor([2, 0, 1])
    masks = [torch.tensor(m) for m in itertools.product([False, True], repeat=L) if any(m)]
    nodes, weights = (torch.as_tensor(a, dtype=D64) for a in special.roots_legendre(8))
    t = 0.5 * (nodes + 1)
    lhs, rhs = 0.0, 0.0
    for m in masks:
        k = int(m.sum())
        xt = torch.where(m, V, x0).expand(len(t), -1)
        loss = absorbing_dce_loss(fn, graph, noise, x0.expand(len(t), -1), t=t, xt=xt)
        lam = noise.mask_prob(t)
        lhs += (0.5 * weights * lam**k * (1 - lam) ** (L - k) * loss).sum().item()
        nll = -fn(xt[:1])[0].gather(-1, x0[:, None])[:, 0][m].sum().item()
        rhs += nll * special.betainc(k, L - k + 1, 1 - eps) * math.exp(special.betaln(k, L - k + 1))
    assert lhs == pytest.approx(rhs, rel=1e-10)


# -- samplers with exact scores -------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["absorb", "uniform"])
@pytest.mark.parametrize("sampler,steps,tol", [(sample_analytic, 8, 0.02), (sample_euler, 32, 0.025)])
def test_samplers_reproduce_factorised_marginals(name, sampler, steps, tol):
    """Exact per-token score of a factorised law: the sample's per-position marginals match it.

    (n = 2 10^4 draws: Monte Carlo TV ~ 0.007. Euler on the uniform graph adds a first-order bias,
    ~0.013 at 32 steps, 0.005 at 128 measured with 10^5 draws; analytic is exact per token.)"""
    graph, noise = make(name, V=4)
    L, n = 3, 20000
    pi = random_pi(L, graph.vocab_size, 14)
    g = torch.Generator().manual_seed(15)
    x = graph.sample_limit(n, L, generator=g)
    out, nfe = sampler(exact_score_fn(graph, pi), graph, noise, x, steps, generator=g)
    assert out.shape == (n, L) and bool((out < graph.vocab_size).all())
    assert torch.equal(nfe, torch.full((n,), steps + 1))
    assert tv_marginals(out, pi) < tol
    # a wrong score (all ratios 1) is caught by the same check
    wrong, _ = sampler(lambda x, s: torch.ones(*x.shape, graph.dim), graph, noise, x, steps, generator=g)
    assert tv_marginals(wrong, pi) > 2 * tol


@pytest.mark.parametrize("method", ["analytic", "euler"])
def test_absorbing_sampler_marginals_and_agreement_with_sedd_score(method):
    graph, noise = make("absorb", V=4)
    L, n = 3, 20000
    pi = random_pi(L, graph.vocab_size, 16)
    x = graph.sample_limit(n, L)
    g = torch.Generator().manual_seed(17)
    out, nfe = sample_absorbing(
        lambda x: pi.expand(x.shape[0], -1, -1), graph, noise, x, 32, method=method, generator=g
    )
    assert tv_marginals(out, pi) < 0.02
    # cached: a sequence is evaluated at most once per unmasking step, never more than uncached
    assert bool((nfe <= L + 1).all()) and bool((nfe >= 1).all())
    # the same model through SEDD's samplers via the RADD score gives the same law
    sedd = sample_analytic if method == "analytic" else sample_euler

    def score_fn(x, sigma):
        return absorbing_score(pi.expand(x.shape[0], -1, -1), x, sigma.double(), graph)

    ref, _ = sedd(score_fn, graph, noise, x, 32, generator=g)
    assert tv_marginals(ref, pi) < 0.02


def test_absorbing_sampler_with_true_conditionals_samples_the_joint():
    """RADD: with the true clean conditionals and fine steps, the sampler draws the joint itself;
    infilling with a fixed token draws the exact conditional (no retraining)."""
    V, L, n = 3, 3, 20000
    graph, noise = Absorbing(V), LogLinear(1e-3)
    joint = correlated_joint(V, L, 18)
    table = conditional_table(joint, V, L)
    codes = (V + 1) ** torch.arange(L)

    def probs_fn(x):
        return table[(x * codes).sum(-1)]

    def tv_joint(out, target):
        idx = (out * (V ** torch.arange(out.shape[1]))).sum(-1)
        emp = torch.bincount(idx, minlength=target.numel()).double() / len(out)
        return 0.5 * (emp - target.flatten()).abs().sum().item()

    g = torch.Generator().manual_seed(19)
    x = graph.sample_limit(n, L)
    flat = joint.permute(*reversed(range(L))).reshape(-1)  # index x0 + V x1 + V^2 x2
    out, nfe = sample_absorbing(probs_fn, graph, noise, x, 256, generator=g)
    assert tv_joint(out, flat) < 0.03  # Monte Carlo alone: ~0.015
    assert nfe.double().mean() < L + 1.5  # ~one evaluation per unmasking event (+ the first)
    # one step unmasks the tokens independently: the product of marginals, far from the joint
    coarse, _ = sample_absorbing(probs_fn, graph, noise, x, 1, generator=g)
    assert tv_joint(coarse, flat) > 0.1

    # infill the middle token with 1: the others follow p(x0, x2 | x1 = 1)
    xc, fixed = infill_condition(x, [1], torch.tensor([1]))
    out, _ = sample_absorbing(probs_fn, graph, noise, xc, 256, fixed_mask=fixed, generator=g)
    assert bool((out[:, 1] == 1).all())
    cond = joint[:, 1, :] / joint[:, 1, :].sum()  # (x0, x2)
    idx = out[:, 0] + V * out[:, 2]
    emp = torch.bincount(idx, minlength=V * V).double() / n
    assert 0.5 * (emp - cond.T.reshape(-1)).abs().sum().item() < 0.03


# -- the cached sampler ---------------------------------------------------------------------------------
def mixing_probs_fn(V, D=6, seed=20):
    """Row-independent, sequence-dependent probabilities (a crude attention: mean embedding context)."""
    g = torch.Generator().manual_seed(seed)
    E = torch.randn(V + 1, D, generator=g, dtype=D64)
    W = torch.randn(D, V, generator=g, dtype=D64)
    U = torch.randn(V + 1, V, generator=g, dtype=D64)
    calls = []

    def probs_fn(x):
        calls.append(x.shape[0])
        ctx = E[x].mean(1, keepdim=True)  # (n, 1, D)
        logits = (ctx[..., :, None] * W).sum(-2) + U[x]
        return logits.softmax(-1)

    return probs_fn, calls


@pytest.mark.parametrize("method", ["analytic", "euler"])
@pytest.mark.parametrize("steps", [1, 7, 200])
def test_cached_sampler_is_identical_and_cheaper(method, steps):
    V, B, L = 6, 8, 16
    graph, noise = Absorbing(V), LogLinear(1e-3)
    probs_fn, calls = mixing_probs_fn(V)
    x = graph.sample_limit(B, L)
    outs = {}
    for cache in (False, True):
        g = torch.Generator().manual_seed(21)
        outs[cache] = sample_absorbing(probs_fn, graph, noise, x, steps, method=method, cache=cache, generator=g)
    (plain, nfe_plain), (cached, nfe_cached) = outs[False], outs[True]
    assert torch.equal(plain, cached)
    assert bool((plain != graph.mask_id).all())
    assert torch.equal(nfe_plain, torch.full((B,), steps + 1))
    assert bool((nfe_cached <= nfe_plain).all())
    if steps >= 100:
        assert nfe_cached.sum() < nfe_plain.sum() / 4  # at most L + 1 changes per sequence
    # the same seed reproduces; another seed changes the sample
    again, _ = sample_absorbing(
        probs_fn, graph, noise, x, steps, method=method, generator=torch.Generator().manual_seed(21)
    )
    assert torch.equal(again, cached)
    other, _ = sample_absorbing(
        probs_fn, graph, noise, x, steps, method=method, generator=torch.Generator().manual_seed(22)
    )
    assert not torch.equal(other, cached)


def test_denoise_false_leaves_masks_and_custom_grid():
    V = 5
    graph, noise = Absorbing(V), LogLinear(1e-3)
    probs_fn, _ = mixing_probs_fn(V)
    x = graph.sample_limit(4, 50)
    g = torch.Generator().manual_seed(23)
    out, nfe = sample_absorbing(
        probs_fn, graph, noise, x, torch.tensor([1.0, 0.5]), denoise=False, generator=g, cache=False
    )
    assert torch.equal(nfe, torch.ones(4, dtype=torch.int64))
    frac = (out == graph.mask_id).double().mean().item()
    assert 0.35 < frac < 0.65  # half the tokens unmasked on the way to t = 0.5
    torch.testing.assert_close(time_grid(3, 0.1), torch.tensor([1.0, 0.7, 0.4, 0.1], dtype=D64))
    # an int grid and the same explicit grid give the same sample
    a, _ = sample_analytic(
        exact_score_fn(graph, _norm(torch.ones(50, V, dtype=D64))),
        graph,
        noise,
        x,
        3,
        eps=0.1,
        generator=torch.Generator().manual_seed(1),
    )
    b, _ = sample_analytic(
        exact_score_fn(graph, _norm(torch.ones(50, V, dtype=D64))),
        graph,
        noise,
        x,
        time_grid(3, 0.1),
        generator=torch.Generator().manual_seed(1),
    )
    assert torch.equal(a, b)


# -- conditioning ----------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "name,sampler",
    [(n, s) for n in ("absorb", "uniform") for s in (sample_euler, sample_analytic)] + [("absorb", sample_absorbing)],
)
def test_prefix_and_infill_tokens_stay_fixed(name, sampler):
    graph, noise = make(name, V=6)
    B, L = 16, 12
    pi = random_pi(L, graph.vocab_size, 24)
    g = torch.Generator().manual_seed(25)
    x = graph.sample_limit(B, L, generator=g)
    xp, fixed_p = prefix_condition(x, torch.tensor([5, 0, 3]))
    xi, fixed_i = infill_condition(x, [0, 6, 11], torch.randint(0, 6, (B, 3), generator=g))
    for xc, fixed in ((xp, fixed_p), (xi, fixed_i)):
        model = (lambda x: pi.expand(x.shape[0], -1, -1)) if sampler is sample_absorbing else exact_score_fn(graph, pi)
        out, _ = sampler(model, graph, noise, xc, 8, fixed_mask=fixed, generator=g)
        assert torch.equal(out[fixed], xc[fixed])
        assert bool((out < graph.vocab_size).all())
        assert not torch.equal(out[~fixed], xc[~fixed])
    assert (
        torch.equal(xp[:, :3], torch.tensor([5, 0, 3]).expand(B, -1))
        and fixed_p[:, :3].all()
        and not fixed_p[:, 3:].any()
    )


# -- categorical draws ---------------------------------------------------------------------------------
def test_sample_categorical_frequencies_and_injection():
    probs = torch.tensor([0.1, 0.0, 0.6, 0.3, -0.05])  # unnormalised; negatives and zeros never drawn
    g = torch.Generator().manual_seed(26)
    draws = sample_categorical(probs.expand(40000, -1), g)
    counts = torch.bincount(draws, minlength=5)
    assert counts[1] == 0 and counts[4] == 0
    assert stats.chisquare(counts[[0, 2, 3]].numpy(), (torch.tensor([0.1, 0.6, 0.3]) * 40000).numpy()).pvalue > 1e-3
    u = torch.rand(3, 5, generator=g)
    assert torch.equal(
        sample_categorical(probs.expand(3, -1), uniforms=u), (probs / (1e-10 - (u + 1e-10).log())).argmax(-1)
    )


# -- bad input -------------------------------------------------------------------------------------------
def test_bad_input_raises_value_error():
    cases = [
        (lambda: Absorbing(0), "vocab_size"),
        (lambda: Uniform(1), "vocab_size"),
        (lambda: Uniform(2.5), "2.5"),
        (lambda: get_graph("circle", 4), "circle"),
        (lambda: LogLinear(0.0), "0.0"),
        (lambda: LogLinear(1.5), "1.5"),
        (lambda: Geometric(0.0, 1.0), "sigma_min"),
        (lambda: Geometric(2.0, 1.0), "sigma_min=2.0"),
        (lambda: Geometric(1e-3, float("inf")), "sigma_max"),
        (lambda: LogLinear()(torch.tensor([1.5])), "1.5"),
        (lambda: Absorbing(4).rate(torch.tensor([0, 5])), "5"),
        (lambda: Uniform(4).transition(torch.tensor([-1]), 0.1), "-1"),
        (lambda: Uniform(4).transition(torch.tensor([1]), -0.1), "-0.1"),
        (lambda: Uniform(4).sample_transition(torch.tensor([0.5]), 0.1), "integer"),
        (lambda: Absorbing(4).score_entropy(torch.zeros(1, 5), 0.1, torch.tensor([4]), torch.tensor([4])), "x0"),
        (lambda: score_entropy_loss(None, Absorbing(4), LogLinear(), torch.tensor([[4, 0]])), "4"),
        (lambda: lambda_dce_loss(None, Uniform(4), torch.tensor([[1, 0]])), "Absorbing"),
        (lambda: lambda_dce_loss(None, Absorbing(4), torch.tensor([[1, 0]]), lam=torch.tensor([0.0])), "lam"),
        (lambda: sample_euler(None, Uniform(4), Geometric(), torch.tensor([[7]]), 4), "7"),
        (lambda: sample_euler(None, Uniform(4), Geometric(), torch.tensor([[1]]), 0), "steps"),
        (lambda: sample_euler(None, Uniform(4), Geometric(), torch.tensor([[1]]), 4, eps=0.0), "eps"),
        (lambda: time_grid(torch.tensor([1.0, 0.5, 0.7])), "decreasing"),
        (lambda: time_grid(torch.tensor([1.0, 0.0])), "(0, 1]"),
        (lambda: sample_absorbing(None, Uniform(4), LogLinear(), torch.tensor([[1]]), 4), "Absorbing"),
        (lambda: sample_absorbing(None, Absorbing(4), LogLinear(), torch.tensor([[1]]), 4, method="rk4"), "rk4"),
        (
            lambda: sample_absorbing(lambda x: torch.ones(1, 1, 3), Absorbing(4), LogLinear(), torch.tensor([[4]]), 2),
            "probs_fn",
        ),
        (
            lambda: sample_analytic(
                lambda x, s: torch.ones(1, 1, 4), Absorbing(4), LogLinear(), torch.tensor([[4]]), 2
            ),
            "score_fn",
        ),
        (
            lambda: sample_absorbing(
                None, Absorbing(4), LogLinear(), torch.tensor([[4, 4]]), 2, fixed_mask=torch.tensor([True, False])
            ),
            "mask id",
        ),
        (lambda: infill_condition(torch.zeros(2, 5, dtype=torch.long), [5], [1]), "5"),
        (lambda: infill_condition(torch.zeros(2, 5, dtype=torch.long), [1, 1], [1, 2]), "distinct"),
    ]
    for fn, text in cases:
        with pytest.raises(ValueError) as info:
            fn()
        assert text in str(info.value), (text, str(info.value))


def test_uniform_staggered_score_survives_a_large_step_in_float32():
    """exp(-dsigma Q) s has rows summing to 1: a constant score stays constant for any dsigma. Written as
    s e^dsigma + (1 - e^dsigma) sum(s) / V the two terms cancelled to 0 in float32 past dsigma ~ 17 (the
    first step of Geometric(1e-4, 20) sampled in few steps), and the analytic sampler then put every
    token on id 0. Checked against the float64 matrix exponential."""
    V = 4
    g = Uniform(V)
    Q = torch.full((V, V), 1.0 / V, dtype=torch.float64) - torch.eye(V, dtype=torch.float64)  # rate matrix
    score = torch.tensor([[1.0, 1.0, 1.0, 1.0], [0.9, 1.1, 1.0, 1.0]])
    for dsigma in (0.5, 18.0, 20.0):
        exact = score.double() @ torch.linalg.matrix_exp(-dsigma * Q).T
        out = g.staggered_score(score, torch.tensor(dsigma))
        assert out.dtype == torch.float32
        torch.testing.assert_close(out.double(), exact, rtol=1e-4, atol=1e-4 * float(exact.abs().max()))
    torch.testing.assert_close(g.staggered_score(score[:1], torch.tensor(18.0)), torch.ones(1, V))
