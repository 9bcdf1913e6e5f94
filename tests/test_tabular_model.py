"""CDTD: the learned schedule and its sampling path, training, save/load, conditioning, imputation."""

import numpy as np
import pandas as pd
import pytest
import torch

from tabular.api import TabularDiffusion
from tabular.data import load_german
from tabular.model import CDTD, CDTDConfig, LogisticTimewarp

TINY = dict(hidden=64, mlp_layers=2, emb_dim=8, batch_size=128, progress=False, sample_steps=12)


def _warp():
    w = LogisticTimewarp(torch.tensor([0, 0, 1, 1, 1]), torch.tensor([100.0, 100.0, 80.0, 80.0, 80.0]))
    with torch.no_grad():  # two different schedules
        w.logit_mu.copy_(torch.tensor([-1.0, 0.5]))
        w.logit_v.copy_(torch.tensor([0.3, 1.2]))
    return w


def test_sampler_time_maps_to_the_uniform_schedule_time():
    m = CDTD(2, [3], CDTDConfig(hidden=16, mlp_layers=1))
    with torch.no_grad():
        m.timewarp.logit_mu.copy_(torch.tensor([-1.0, 0.4]))
        m.timewarp.logit_v.copy_(torch.tensor([0.3, 1.5]))
    grid = m.u_grid(20)
    assert grid[0] == 1.0 and grid[-1] == 0.0 and bool((grid[1:] < grid[:-1]).all())
    u = [m.u_of_t(float(t)) for t in grid]
    np.testing.assert_allclose(u, np.linspace(1, 0, 21), atol=1e-9)  # equal steps in u
    # t is sigma_ref / sigma_max of the reference (largest v) schedule
    _, _, smax = m.timewarp.reference()
    ref = int(torch.argmax(m.timewarp.params()[1]))
    feat = int((m.timewarp.groups == ref).nonzero()[0])
    sig = m.timewarp.sigma(torch.tensor(u[5:6], dtype=torch.float64))[0, feat]
    assert abs(float(sig) / smax - float(grid[5])) < 1e-9
    assert m.path().sigma_max == smax


def test_schedule_ratio_is_dlog_sigma_ratio():
    w = _warp()
    m, v, _ = w.params()
    ref = int(torch.argmax(v))
    for u in (0.05, 0.3, 0.7, 0.95):
        h = 1e-6
        lo = w.sigma(torch.tensor([u - h], dtype=torch.float64))[0].log()
        hi = w.sigma(torch.tensor([u + h], dtype=torch.float64))[0].log()
        dlog = (hi - lo) / (2 * h)  # d log sigma_f / du per feature
        ref_feat = int((w.groups == ref).nonzero()[0])
        torch.testing.assert_close(w.ratio(u), (dlog / dlog[ref_feat]).clamp(0, 10), rtol=1e-4, atol=1e-6)
        assert torch.allclose(w.ratio(u)[w.groups == ref], torch.ones(1, dtype=torch.float64))


def test_categorical_embeddings_have_norm_sqrt_d():
    m = CDTD(2, [3, 4], CDTDConfig(emb_dim=8, hidden=32, mlp_layers=1))
    e = m.cat_emb(torch.tensor([[0, 3], [2, 1]]))
    torch.testing.assert_close(e.norm(dim=-1), torch.full((2, 2), 8**0.5))
    with pytest.raises(ValueError, match="categories"):
        CDTD(1, [1, 3])


@pytest.fixture(scope="module")
def german_model():
    torch.manual_seed(0)
    df = load_german().iloc[:400].reset_index(drop=True)
    m = TabularDiffusion(steps=150, warmup_steps=10, **TINY).fit(df)
    return m, df


def test_short_fit_lowers_the_loss(german_model):
    m, df = german_model
    assert len(m.history) == 150
    torch.manual_seed(0)
    start = TabularDiffusion(steps=1, warmup_steps=1, **TINY).fit(df)  # the same initialisation, one step
    x_num, x_cat = (torch.from_numpy(a) for a in m.encoder.encode(df))
    for sigma in (0.3, 1.0):
        before = start.model.denoising_error(x_num, x_cat, sigma, generator=torch.Generator().manual_seed(0))
        after = m.model.denoising_error(x_num, x_cat, sigma, generator=torch.Generator().manual_seed(0))
        assert after < 0.95 * before, (sigma, before, after)
    with pytest.raises(ValueError, match="-1.0"):
        m.model.denoising_error(x_num, x_cat, -1.0)


def test_samples_have_schema_and_valid_values(german_model):
    m, df = german_model
    s = m.sample(64, seed=1)
    assert list(s.columns) == list(df.columns) and len(s) == 64
    for c in m.schema.categorical:
        assert set(s[c.name]) <= set(df[c.name])
    for c in m.schema.numerical:
        assert s[c.name].between(c.lo, c.hi).all()
    assert s["duration"].dtype == np.int64  # integer columns stay integers
    s2 = m.sample(64, seed=1, sampler="heun", steps=6)
    assert s2.shape == s.shape
    for bad in (0, 2.5, True):  # named, not replaced by the default number of steps
        with pytest.raises(ValueError, match=f"steps.*{bad}"):
            m.sample(4, steps=bad)
        with pytest.raises(ValueError, match=f"steps.*{bad}"):
            m.impute(df.iloc[:2].mask(np.eye(2, df.shape[1], dtype=bool)), steps=bad)


def test_save_load_round_trip_gives_identical_samples(german_model, tmp_path):
    m, _ = german_model
    a = m.sample(50, seed=3)
    m.save(tmp_path / "model")
    assert (tmp_path / "model" / "model.safetensors").is_file() and (tmp_path / "model" / "tabular.json").is_file()
    m2 = TabularDiffusion.load(tmp_path / "model")
    pd.testing.assert_frame_equal(a, m2.sample(50, seed=3))
    with pytest.raises(ValueError, match="missing"):
        TabularDiffusion.load(tmp_path)


def test_imputation_keeps_observed_cells(german_model):
    m, df = german_model
    holes = df.iloc[:40].copy()
    rng = np.random.default_rng(0)
    mask = rng.random(holes.shape) < 0.3
    holes = holes.mask(mask)
    filled = m.impute(holes, seed=0)
    assert not filled.isna().any().any()
    obs = ~mask
    for j, c in enumerate(df.columns):
        assert (filled[c].to_numpy()[obs[:, j]] == holes[c].to_numpy()[obs[:, j]]).all(), c
    for c in m.schema.categorical:
        assert set(filled[c.name]) <= set(df[c.name])


def test_conditional_sampling_honours_conditions(german_model):
    m, _ = german_model
    s = m.sample(30, conditions={"purpose": "radio/television", "age": 30}, seed=0)
    assert (s["purpose"] == "radio/television").all() and (s["age"] == 30).all()
    rows = m.sample(3, conditions={"housing": ["own", "rent", "for free"]}, seed=0)
    assert rows["housing"].tolist() == ["own", "rent", "for free"]
    with pytest.raises(ValueError, match="'nope'"):
        m.sample(3, conditions={"nope": 1})
    with pytest.raises(ValueError, match="'purpose'.*'spaceship'"):
        m.sample(3, conditions={"purpose": "spaceship"})


def test_conditioning_moves_the_dependent_column():
    """x = +3 for group 'a' and -3 for 'b': conditioning on the group must select the sign."""
    rng = np.random.default_rng(0)
    g = rng.choice(["a", "b"], 1500)
    df = pd.DataFrame({"g": g, "x": np.where(g == "a", 3.0, -3.0) + 0.3 * rng.normal(size=1500),
                       "z": rng.normal(size=1500)})
    torch.manual_seed(0)
    m = TabularDiffusion(steps=600, warmup_steps=20, cond_prob=0.5, **TINY).fit(df)
    sa = m.sample(200, conditions={"g": "a"}, seed=0)
    sb = m.sample(200, conditions={"g": "b"}, seed=0)
    assert (sa["x"] > 0).mean() > 0.9 and (sb["x"] < 0).mean() > 0.9
    imp = m.impute(pd.DataFrame({"g": [None] * 100, "x": [3.0] * 100, "z": [0.0] * 100}), seed=0)
    assert (imp["g"] == "a").mean() > 0.85


@pytest.mark.slow
def test_replacement_conditioning_without_conditioning_training():
    """With cond_prob = 0 the model conditions by replacement: weaker, still the right sign."""
    rng = np.random.default_rng(0)
    g = rng.choice(["a", "b"], 1500)
    df = pd.DataFrame({"g": g, "x": np.where(g == "a", 3.0, -3.0) + 0.3 * rng.normal(size=1500)})
    torch.manual_seed(0)
    m0 = TabularDiffusion(steps=300, warmup_steps=20, cond_prob=0.0, **TINY).fit(df)
    assert (m0.sample(200, conditions={"g": "b"}, seed=0)["x"] < 0).mean() > 0.7


def test_missing_values_and_constants_are_generated():
    rng = np.random.default_rng(1)
    n = 600
    df = pd.DataFrame({"v": rng.normal(size=n), "c": rng.choice(["p", "q", None], n, p=[0.5, 0.3, 0.2]),
                       "k": 5})
    df.loc[rng.random(n) < 0.3, "v"] = np.nan
    torch.manual_seed(0)
    with pytest.warns(UserWarning, match="'k'"):
        m = TabularDiffusion(steps=200, warmup_steps=20, **TINY).fit(df)
    s = m.sample(600, seed=0)
    assert (s["k"] == 5).all()
    assert 0.1 < s["v"].isna().mean() < 0.5  # missingness is learned (30% in the data)
    assert 0.05 < s["c"].isna().mean() < 0.4
    with pytest.raises(ValueError, match="'k'.*constant"):
        m.sample(2, conditions={"k": 6})


def test_transformer_denoiser_fits_and_samples():
    df = load_german().iloc[:200].reset_index(drop=True)
    torch.manual_seed(0)
    m = TabularDiffusion(denoiser="transformer", token_dim=32, depth=1, num_heads=2, steps=20, warmup_steps=2,
                         batch_size=64, progress=False, sample_steps=4).fit(df)
    s = m.sample(16, seed=0)
    assert s.shape == (16, df.shape[1])


def test_bad_arguments():
    with pytest.raises(TypeError, match="'hiden'"):
        TabularDiffusion(hiden=3)
    with pytest.raises(ValueError, match="timewarp"):
        TabularDiffusion(timewarp="weird")
    with pytest.raises(ValueError, match="sampler"):
        TabularDiffusion(sampler="nope")
    with pytest.raises(RuntimeError, match="not fitted"):
        TabularDiffusion().sample(3)
    for name in ("time_limit_s", "cpu_time_limit_s"):
        with pytest.raises(ValueError, match=f"{name}=0"):
            TabularDiffusion(**{name: 0})


def test_cpu_time_limit_stops_the_fit():
    df = pd.DataFrame({"a": np.random.default_rng(0).normal(size=200)})
    m = TabularDiffusion(steps=100_000, warmup_steps=1, cpu_time_limit_s=0.3, **TINY).fit(df)
    assert 0 < m.fit_steps < 100_000 and len(m.history) == m.fit_steps
    assert m.fit_cpu_seconds >= 0.3  # it stops at the first step past the limit


@pytest.mark.parametrize("kind", ["numerical", "categorical"])
def test_single_type_tables(kind):
    rng = np.random.default_rng(0)
    if kind == "numerical":
        df = pd.DataFrame({"a": rng.normal(size=200), "b": rng.exponential(size=200)})
    else:
        df = pd.DataFrame({"a": rng.choice(list("xyz"), 200), "b": rng.choice(list("uv"), 200)})
    for den in ("mlp", "transformer"):
        m = TabularDiffusion(denoiser=den, token_dim=16, num_heads=2, depth=1, steps=10, warmup_steps=2,
                             **{**TINY, "batch_size": 64}).fit(df)
        s = m.sample(20, seed=0)
        assert s.shape == (20, 2) and all(m.schema[c].kind == kind for c in df.columns)
        assert not m.impute(df.iloc[:5].mask(np.eye(5, 2, dtype=bool))).isna().any().any()


def test_secant_ratio_makes_euler_the_per_feature_euler_step_in_sigma():
    """With the sampler's grid, one Euler step on EDM's path (t -> t') moves every feature ``f`` as the
    official per-feature Euler step in its own sigma: ``x_f + (sigma_f' - sigma_f) (x_f - D_f) / sigma_f``."""
    torch.manual_seed(0)
    m = CDTD(2, [3, 4], CDTDConfig(hidden=16, mlp_layers=1, emb_dim=4))
    with torch.no_grad():
        m.timewarp.logit_mu.copy_(torch.tensor([-0.5, 0.3]))
        m.timewarp.logit_v.copy_(torch.tensor([0.4, 1.0]))
        for name, p in m.named_parameters():  # a network whose D is not trivial
            if not name.startswith("timewarp"):
                p.add_(0.1 * torch.randn_like(p))
    m.eval()
    grid = m.u_grid(6)
    x = torch.randn(5, sum(m._sizes), generator=torch.Generator().manual_seed(1)) * 3
    d_secant = m.make_denoiser(grid=grid)
    ratio = m.timewarp.ratio
    m.timewarp.ratio = lambda u: torch.ones_like(ratio(u))  # r = 1: the plain denoiser's D
    d_plain = m.make_denoiser()
    for i in (0, 2, 4):
        t, t_next = float(grid[i]), float(grid[i + 1])
        tv = torch.full((5,), t)
        with torch.no_grad():
            euler = x + (t_next - t) * (x - d_secant(x, tv)) / t  # Euler on sigma = sigma_max t, alpha = 1
            D = d_plain(x, tv)
        s = m.timewarp.sigma(torch.tensor([m.u_of_t(t), m.u_of_t(t_next)], dtype=torch.float64))
        s_now, s_next = (m._expand(v).float() for v in s)
        torch.testing.assert_close(euler, x + (s_next - s_now) * (x - D) / s_now, rtol=1e-4, atol=1e-4)
