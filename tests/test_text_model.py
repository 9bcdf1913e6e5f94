"""Text models and metrics: equal sizes, causality, exact AR perplexity, the diffusion ELBO bound
against exact enumeration, SEDD/RADD consistency with core.discrete, conditioning, errors."""

import itertools
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from core.discrete import Absorbing, LogLinear, absorbing_dce_loss, score_entropy_loss, stratified_uniform
from text.metrics import ar_nll, ar_perplexity, diffusion_nll_bound, sampling_speed, unigram_entropy
from text.model import KINDS, TextModel, TextModelConfig, make_loss, sedd_log_score
from text.sample import sample_ar, sample_diffusion


def test_difformer_rounding_and_denoiser():
    m = tiny("difformer", vocab=7)
    e = m.embeddings()
    assert e.shape == (7, 16) and torch.allclose(e.norm(dim=-1), torch.full((7,), 0.5 * 4.0), atol=1e-3)
    ids = torch.randint(0, 7, (2, 5))
    assert torch.equal(m.round(e[ids] + 0.01 * torch.randn(2, 5, 16)), ids)  # nearest embedding
    x0 = m.denoise(torch.randn(2, 5, 16), torch.full((2,), 0.5))
    assert x0.shape == (2, 5, 16)


def tiny(kind, vocab=5, seed=0, scale=0.3):
    torch.manual_seed(seed)
    m = TextModel(TextModelConfig(kind=kind, dim=16, depth=2, num_heads=2), vocab)
    with torch.no_grad():  # open the zero-initialised gates and head: a non-trivial random model
        for p in m.parameters():
            p.add_(scale * torch.randn_like(p))
    return m.eval()


def test_same_parameter_count_and_losses_run():
    counts = {k: sum(p.numel() for p in TextModel(TextModelConfig(kind=k, dim=32, depth=2, num_heads=2), 50)
                     .parameters()) for k in KINDS}
    assert len(set(counts.values())) == 1, counts
    x = torch.randint(0, 50, (4, 12))
    for k in KINDS:
        m = TextModel(TextModelConfig(kind=k, dim=32, depth=2, num_heads=2), 50)
        out = make_loss(m.cfg)(m, x, torch.Generator().manual_seed(0))
        # at init the head is zero: AR predicts uniformly, the diffusion losses are ~log V per token
        assert torch.isfinite(out["loss"])
        if k == "ar":
            assert out["loss"].item() == pytest.approx(math.log(50), abs=1e-5)
        if k == "difformer":
            assert out["anchor"].item() == pytest.approx(math.log(50), abs=1e-5)


def test_ar_is_causal_and_its_perplexity_is_exact():
    m = tiny("ar", vocab=7)
    x = torch.randint(0, 7, (2, 10), generator=torch.Generator().manual_seed(1))
    lp = m.ar_log_probs(x)
    y = x.clone()
    y[:, 6] = (y[:, 6] + 1) % 7
    lp2 = m.ar_log_probs(y)
    assert torch.allclose(lp[:, :7], lp2[:, :7], atol=1e-6)  # position l sees x_<l only
    assert not torch.allclose(lp[:, 7:], lp2[:, 7:])
    # by hand: one forward per prefix [BOS, x_<l], read the last position
    total = 0.0
    with torch.no_grad():
        for row in x:
            for i in range(len(row)):
                inp = torch.cat([torch.tensor([7]), row[:i]])[None]
                total -= F.log_softmax(m(inp)[0, -1].double(), -1)[row[i]].item()
    nll, n = ar_nll(m, x, batch_size=2)
    assert n == x.numel()
    assert nll == pytest.approx(total, rel=1e-5)
    assert ar_perplexity(m, x) == pytest.approx(math.exp(total / n), rel=1e-5)


def _enumerate_bound(m, x, table):
    """Exact E_lambda of the lambda-DCE, and the any-order mixture probability, by enumeration."""
    L, V = x.numel(), m.vocab_size

    def cond(masked):  # log p(x0 | x with `masked` positions masked), (L, V)
        z = x.clone()
        z[list(masked)] = V
        return table[tuple(z.tolist())]

    bound = 0.0
    for k in range(1, L + 1):
        w = math.factorial(k - 1) * math.factorial(L - k) / math.factorial(L)  # int lambda^(k-1) (1-lambda)^(L-k)
        for masked in itertools.combinations(range(L), k):
            lp = cond(masked)
            bound -= w * sum(lp[l, x[l]].item() for l in masked)
    orders = list(itertools.permutations(range(L)))
    log_q = []
    for order in orders:  # decode in `order`: position order[i] given order[:i]
        s = 0.0
        for i, pos in enumerate(order):
            s += cond(order[i:])[pos, x[pos]].item()
        log_q.append(s)
    mix = sum(math.exp(v) for v in log_q) / len(orders)
    any_order_nll = -sum(log_q) / len(orders)
    return bound, mix, any_order_nll


@torch.no_grad()
def test_lambda_dce_bound_against_exact_enumeration():
    m = tiny("radd", vocab=3, scale=0.5)
    L = 3
    # every partially masked input in one batch: (V + 1)^L rows
    inputs = torch.tensor(list(itertools.product(range(4), repeat=L)))
    table = dict(zip(map(tuple, inputs.tolist()), m.log_probs(inputs).double()))
    total_mass = 0.0
    for seq in itertools.product(range(3), repeat=L):
        x = torch.tensor(seq)
        bound, mix, any_order = _enumerate_bound(m, x, table)
        total_mass += mix
        assert bound == pytest.approx(any_order, rel=1e-9, abs=1e-9)  # RADD: E[lambda-DCE] = any-order AR NLL
        assert bound >= -math.log(mix) - 1e-9  # ... which upper-bounds the NLL of the any-order mixture
    assert total_mass == pytest.approx(1.0, abs=1e-6)  # the mixture is a distribution
    # the Monte-Carlo estimator of text.metrics is unbiased for it
    x = torch.tensor([[2, 0, 1]])
    exact = _enumerate_bound(m, x[0], table)[0] / L
    est = diffusion_nll_bound(m, x.expand(256, -1).contiguous(), samples=8, batch_size=256,
                              generator=torch.Generator().manual_seed(0))
    assert abs(est["nll"] - exact) < 4 * est["stderr"] + 1e-9, (est, exact)
    assert est["stderr"] < 0.05 * exact


def test_stratified_uniform_strata_and_bad_n():
    u = stratified_uniform(64, torch.Generator().manual_seed(0))
    assert u.shape == (64,) and u.dtype == torch.float32
    assert torch.equal(torch.floor(u * 64).long(), torch.arange(64))  # the i-th lies in [i/64, (i+1)/64)
    assert float(u.max()) < 1.0
    for bad in (0, -3, 2.0, True):
        with pytest.raises(ValueError, match="n must be a positive int"):
            stratified_uniform(bad)


def _batch_losses(model, x0, loss, mode, draws, seed=1):
    fn = make_loss(TextModelConfig(kind="radd", dim=16, depth=2, num_heads=2, loss=loss, time_sampling=mode))
    g = torch.Generator().manual_seed(seed)
    vals = torch.tensor([float(fn(model, x0, g)["loss"]) for _ in range(draws)], dtype=torch.float64)
    return vals.mean().item(), vals.std().item() / math.sqrt(draws), vals.var().item()


@torch.no_grad()
def test_stratified_training_times_keep_the_expected_loss():
    # lambda-DCE's expectation is the exact any-order bound (enumerated); the stratified batch mean hits it,
    # and t-DCE agrees between iid and stratified times.
    m = tiny("radd", vocab=3, scale=0.5)
    x = torch.tensor([2, 0, 1])
    x0 = x.expand(16, -1).contiguous()
    inputs = torch.tensor(list(itertools.product(range(4), repeat=3)))
    table = dict(zip(map(tuple, inputs.tolist()), m.log_probs(inputs).double()))
    exact = _enumerate_bound(m, x, table)[0] / 3
    mean, se, _ = _batch_losses(m, x0, "lambda", "stratified", 400)
    assert abs(mean - exact) < 4 * se, (mean, se, exact)
    (mi, si, _), (ms, ss, _) = (_batch_losses(m, x0, "tdce", mode, 400) for mode in ("iid", "stratified"))
    assert abs(mi - ms) < 4 * math.hypot(si, ss), (mi, si, ms, ss)


class _ContextOracle(nn.Module):
    """p(x0 token) = 1 - 0.9 * (masked fraction of the row), the rest spread evenly: like a trained model,
    the loss per masked token grows with the masking rate, which is the variance stratification removes."""

    def __init__(self, x0, vocab):
        super().__init__()
        self.x0, self.vocab_size, self.graph, self.noise = x0, vocab, Absorbing(vocab), LogLinear(1e-3)

    def forward(self, xt):
        frac = (xt == self.vocab_size).double().mean(1, keepdim=True)[..., None]  # (B, 1, 1)
        right = 1.0 - 0.9 * frac
        probs = ((1.0 - right) / (self.vocab_size - 1)).expand(*xt.shape, self.vocab_size).clone()
        probs.scatter_(-1, self.x0[..., None], right.expand(*xt.shape, 1))
        return probs.log()


@torch.no_grad()
@pytest.mark.parametrize("loss", ["lambda", "tdce"])
def test_stratified_training_times_cut_the_loss_variance(loss):
    g = torch.Generator().manual_seed(0)
    x0 = torch.randint(0, 5, (16, 64), generator=g)
    oracle = _ContextOracle(x0, 5)
    (mi, si, vi), (ms, ss, vs) = (_batch_losses(oracle, x0, loss, mode, 300) for mode in ("iid", "stratified"))
    assert abs(mi - ms) < 4 * math.hypot(si, ss), (mi, si, ms, ss)
    assert vs < 0.25 * vi, (vs, vi)


class _RecordTimes(nn.Module):
    """A DDP-like wrapper (``.module``) that records the time argument each forward receives."""

    def __init__(self, module):
        super().__init__()
        self.module, self.seen = module, []

    def forward(self, x, time=None):
        self.seen.append(time.detach().double().clone())
        return self.module(x, time)


@torch.no_grad()
@pytest.mark.parametrize("kind", ["sedd", "difformer"])
def test_stratified_times_reach_the_time_conditioned_models(kind):
    # SEDD gets sigma(t) and Difformer gets t: with time_sampling=stratified the times map back to one per
    # stratum of the batch; with iid they do not (16 iid draws fall one per stratum with probability ~1e-6).
    B = 16
    x0 = torch.randint(0, 5, (B, 6), generator=torch.Generator().manual_seed(0))
    for mode in ("stratified", "iid"):
        cfg = TextModelConfig(kind=kind, dim=16, depth=2, num_heads=2, time_sampling=mode)
        torch.manual_seed(0)
        rec = _RecordTimes(TextModel(cfg, 5))
        make_loss(cfg)(rec, x0, torch.Generator().manual_seed(3))
        (time,) = rec.seen
        if kind == "sedd":  # sigma = -log(1 - (1 - eps) t), t = (1 - s_eps) u + s_eps
            t = -torch.expm1(-time) / (1.0 - cfg.noise_eps)
            u = (t - cfg.sampling_eps) / (1.0 - cfg.sampling_eps)
        else:
            from core.paths import get_path

            path = get_path(cfg.path)
            u = (time - path.t_min) / (path.t_max - path.t_min)
        in_own_stratum = bool(((u * B >= torch.arange(B) - 1e-4) & (u * B < torch.arange(B) + 1 + 1e-4)).all())
        assert in_own_stratum == (mode == "stratified"), (mode, u)


def test_sedd_with_normalised_scores_matches_radd_tdce():
    """SEDD's score entropy of the RADD score (normalised probabilities) equals t-DCE term by term."""
    V, B, L = 6, 4, 9
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(B, L, V, generator=g)
    x0 = torch.randint(0, V, (B, L), generator=g)
    t = torch.rand(B, generator=g) * 0.9 + 0.05
    m = tiny("sedd", vocab=V)
    xt = m.graph.sample_transition(x0, m.noise.sigma(t), g)

    def log_score_fn(z, sigma):  # sedd_log_score subtracts log V: add it back to get p / (e^sigma - 1)
        return sedd_log_score(F.log_softmax(logits, -1) + math.log(V), z, sigma)

    se = score_entropy_loss(log_score_fn, m.graph, m.noise, x0, t=t, xt=xt)
    dce = absorbing_dce_loss(lambda z: F.log_softmax(logits, -1), m.graph, m.noise, x0, t=t, xt=xt)
    assert torch.allclose(se, dce, rtol=1e-4, atol=1e-4)


@torch.no_grad()
def test_sedd_bound_is_finite_and_decreases_with_training_signal():
    m = tiny("sedd", vocab=4)
    x = torch.randint(0, 4, (8, 6), generator=torch.Generator().manual_seed(0))
    r = diffusion_nll_bound(m, x, samples=4, generator=torch.Generator().manual_seed(0))
    assert r["method"] == "tdce" and r["prior"] == pytest.approx(1e-3 * math.log(4))
    assert math.isfinite(r["nll"]) and r["nll"] > 0


@torch.no_grad()
def test_infill_prefix_and_cached_sampler():
    for kind in ("radd", "sedd", "difformer"):
        m = tiny(kind, vocab=6)
        pos = torch.tensor([0, 1, 7])
        tok = torch.tensor([5, 4, 3])
        x, nfe = sample_diffusion(m, 3, 8, 10, generator=torch.Generator().manual_seed(0), positions=pos, tokens=tok)
        assert x.shape == (3, 8) and int(x.max()) < 6 and int(x.min()) >= 0  # no mask left
        assert (x[:, pos] == tok).all()
    m = tiny("radd", vocab=6)
    a, nfe_a = sample_diffusion(m, 1, 12, 32, generator=torch.Generator().manual_seed(3), cache=True)
    b, nfe_b = sample_diffusion(m, 1, 12, 32, generator=torch.Generator().manual_seed(3), cache=False)
    assert torch.equal(a, b)  # same draws, same sample
    assert nfe_a.item() <= 13 < nfe_b.item() == 33  # at most one call per unmasking step (+ denoise)
    ar = tiny("ar", vocab=6)
    y, _ = sample_ar(ar, 2, 8, generator=torch.Generator().manual_seed(0), prefix=torch.tensor([1, 2]))
    assert (y[:, :2] == torch.tensor([1, 2])).all()
    speeds = sampling_speed(lambda s, g: sample_diffusion(m, 2, 8, s, generator=g), [4, 8], num=2)
    assert [r["steps"] for r in speeds] == [4, 8] and all(r["samples_per_s"] > 0 for r in speeds)


def test_unigram_entropy():
    assert unigram_entropy(torch.arange(8).repeat(3), 8) == pytest.approx(math.log(8))
    assert unigram_entropy(torch.zeros(10, dtype=torch.long), 8) == 0.0
    with pytest.raises(ValueError, match="token ids"):
        unigram_entropy(torch.tensor([9]), 8)


def test_bad_inputs_raise():
    radd, ar = tiny("radd"), tiny("ar")
    with pytest.raises(ValueError, match="model.kind"):
        TextModelConfig(kind="gpt").validate()
    with pytest.raises(ValueError, match="num_heads"):
        TextModelConfig(dim=30, num_heads=4).validate()
    with pytest.raises(ValueError, match=r"model: TransformerConfig.dropout=1.5"):
        TextModelConfig(dropout=1.5).validate()
    assert TextModelConfig(dropout=0.1).transformer().dropout == 0.1
    with pytest.raises(ValueError, match="no sigma"):
        radd(torch.zeros(1, 4, dtype=torch.long), torch.ones(1))
    with pytest.raises(ValueError, match="int64"):
        radd(torch.zeros(1, 4))
    with pytest.raises(ValueError, match="'ar' model"):
        sample_ar(radd, 1, 4)
    with pytest.raises(ValueError, match="'sedd', 'radd' or 'difformer'"):
        sample_diffusion(ar, 1, 4, 4)
    with pytest.raises(ValueError, match="noisy embeddings"):
        tiny("difformer")(torch.zeros(1, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="temperature"):
        sample_ar(ar, 1, 4, temperature=0.0)
    with pytest.raises(ValueError, match="fixed tokens"):
        sample_diffusion(radd, 1, 4, 4, positions=torch.tensor([0]), tokens=torch.tensor([5]))
    with pytest.raises(ValueError, match="'ar' model"):
        ar_nll(radd, torch.zeros(1, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="not available"):
        diffusion_nll_bound(tiny("sedd"), torch.zeros(1, 4, dtype=torch.long), method="lambda")


def test_difformer_bound_terms_and_kind():
    from text.metrics import difformer_nll_bound

    m = tiny("difformer", vocab=7).eval()
    chunks = torch.randint(0, 7, (6, 8), generator=torch.Generator().manual_seed(0))
    b = difformer_nll_bound(m, chunks, samples=2, batch_size=4, generator=torch.Generator().manual_seed(1))
    assert math.isfinite(b["nll"]) and b["nll"] > 0 and b["tokens"] == 48
    assert b["nll"] == pytest.approx(b["recon"] + b["prior"] + b["diffusion"], rel=1e-9)
    again = difformer_nll_bound(m, chunks, samples=2, batch_size=4, generator=torch.Generator().manual_seed(1))
    assert again["nll"] == b["nll"]  # the generator fixes every draw
    with pytest.raises(ValueError, match="'difformer' model"):
        difformer_nll_bound(tiny("radd", vocab=7), chunks)


def test_sampling_eps_zero_is_refused_naming_the_value():
    """t = 0 exactly gives RADD's t-DCE an infinite weight dsigma / expm1(sigma(0)); the config that
    allows such a draw (sampling_eps = 0) is refused up front, naming the value."""
    from pathlib import Path

    from omegaconf import OmegaConf

    for bad in (0.0, -0.1, 1.0):
        with pytest.raises(ValueError, match=rf"model\.sampling_eps must be in \(0, 1\), got {bad!r}"):
            TextModelConfig(kind="radd", dim=16, depth=1, num_heads=2, sampling_eps=bad).validate()
    TextModelConfig(kind="radd", dim=16, depth=1, num_heads=2, sampling_eps=1e-6).validate()
    configs = sorted((Path(__file__).resolve().parents[1] / "configs" / "text" / "model").glob("*.yaml"))
    assert configs
    for path in configs:  # the shipped defaults are valid (> 0)
        eps = OmegaConf.load(path).get("sampling_eps", TextModelConfig.sampling_eps)
        assert 0.0 < eps < 1.0, path.name
