"""CDTD: the learned schedule and its sampling path, training, save/load, conditioning, imputation."""

import json

import numpy as np
import pandas as pd
import pytest
import torch

from tabular.api import TabularDiffusion
from tabular.data import load_german
from tabular.metrics import ks_statistic
from tabular.model import CDTD, CDTDConfig, LogisticTimewarp
from tabular.schema import TabularInputError

TINY = dict(hidden=64, mlp_layers=2, emb_dim=8, batch_size=128, progress=False, sample_steps=12, calibration_rows=2000)


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
                         batch_size=64, progress=False, sample_steps=4, calibration_rows=500).fit(df)
    s = m.sample(16, seed=0)
    assert s.shape == (16, df.shape[1])


def test_bad_arguments():
    with pytest.raises(TypeError, match="'hiden'"):
        TabularDiffusion(hiden=3)
    with pytest.raises(ValueError, match="timewarp"):
        TabularDiffusion(timewarp="weird")
    with pytest.raises(ValueError, match="sampler"):
        TabularDiffusion(sampler="nope")
    with pytest.raises(ValueError, match="'euler_maruyama' is stochastic.*'heun'"):
        TabularDiffusion(sampler="euler_maruyama")
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


# -- parameters without gradient, and the logged loss ------------------------------------------------


def _batch(n_num, cards, n=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    x_num = torch.randn(n, n_num, generator=g)
    x_cat = (torch.stack([torch.randint(0, k, (n,), generator=g) for k in cards], 1) if cards
             else torch.zeros(n, 0, dtype=torch.long))
    return x_num, x_cat


SMALL_NET = dict(token_dim=16, depth=1, num_heads=2, hidden=32, mlp_layers=1, emb_dim=4)


@pytest.mark.parametrize("denoiser", ["mlp", "transformer"])
@pytest.mark.parametrize("cond_prob", [0.0, 0.25])
@pytest.mark.parametrize("table", [(3, [2, 4]), (3, []), (0, [3, 2])], ids=["mixed", "numerical", "categorical"])
def test_every_parameter_gets_a_gradient(denoiser, cond_prob, table):
    """DDP without ``find_unused_parameters``: one backward of the loss reaches every parameter."""
    n_num, cards = table
    torch.manual_seed(0)
    m = CDTD(n_num, cards, CDTDConfig(denoiser=denoiser, cond_prob=cond_prob, **SMALL_NET))
    x_num, x_cat = _batch(n_num, cards)
    loss, _ = m.loss(x_num, x_cat, generator=torch.Generator().manual_seed(1))
    loss.backward()
    assert [n for n, p in m.named_parameters() if p.grad is None] == []


def _old_layout(model: CDTD) -> CDTD:
    """A copy of ``model`` laid out as before: the unused buffers (known_embed at cond_prob = 0, the input
    maps of an absent feature type) were parameters."""
    import copy

    old = copy.deepcopy(model)
    params = {n for n, _ in model.named_parameters()}
    for name in [n for n, b in model.named_buffers() if b.is_floating_point() and n.startswith(("net.", "cat_emb."))
                 and n.rsplit(".", 1)[-1] in ("known_embed", "weight", "bias")]:
        owner, _, leaf = name.rpartition(".")
        mod = old.get_submodule(owner)
        t = mod._buffers.pop(leaf)
        mod.register_parameter(leaf, torch.nn.Parameter(t))
        assert name not in params
    return old


def test_cond_prob_0_transformer_is_the_model_it_was():
    """known_embed of a cond_prob = 0 transformer is a buffer now: against the old layout (a parameter,
    constructed explicitly) the state dict, the training steps, conditional sampling and imputation are
    bitwise the same, files load both ways, and the old layout shows the parameter that got no gradient."""
    rng = np.random.default_rng(0)
    n = 200
    df = pd.DataFrame({"x": rng.normal(size=n), "c": rng.choice(list("abc"), n), "d": rng.choice(["u", "v"], n)})
    df["z"] = df["x"] + 0.3 * rng.normal(size=n)
    torch.manual_seed(0)
    m = TabularDiffusion(denoiser="transformer", cond_prob=0.0, steps=10, warmup_steps=2, batch_size=64, calibration_rows=500,
                         progress=False, sample_steps=4, **{k: v for k, v in SMALL_NET.items() if k not in
                                                          ("hidden", "mlp_layers")}).fit(df)
    new = m.model
    assert "net.known_embed" in dict(new.named_buffers())
    old = _old_layout(new)
    assert "net.known_embed" in dict(old.named_parameters())
    # the same state dict, loadable strictly both ways
    s_new, s_old = new.state_dict(), old.state_dict()
    assert s_new.keys() == s_old.keys() and all(torch.equal(s_new[k], s_old[k]) for k in s_new)
    old.load_state_dict(s_new)
    new.load_state_dict(s_old)
    # conditional sampling (replacement) and imputation: bitwise the same through the old layout
    holes = df.iloc[:24].copy()
    holes.loc[::3, "z"] = np.nan
    holes.loc[1::4, "c"] = None
    outs = []
    for net in (new, old):
        m.model = net
        outs.append((m.sample(30, conditions={"c": "b", "x": 0.5}, seed=1), m.impute(holes, seed=2)))
    m.model = new
    for a, b in zip(*outs):
        pd.testing.assert_frame_equal(a, b, check_exact=True)
    # known_embed is never read when sampling such a model: garbage in it changes nothing
    with torch.no_grad():
        new.net.known_embed.normal_(0.0, 100.0)
    pd.testing.assert_frame_equal(m.sample(30, conditions={"c": "b", "x": 0.5}, seed=1), outs[0][0],
                                  check_exact=True)
    new.load_state_dict(old.state_dict())
    # training steps: bitwise the same weights (the optimiser never saw a gradient of the old parameter)
    x_num, x_cat = _batch(new.n_num, new.cards, seed=3)
    for net in (new, old):
        net.train()
        opt = torch.optim.AdamW(net.parameters(), lr=1e-3, betas=(0.9, 0.99))
        g = torch.Generator().manual_seed(4)
        for _ in range(3):
            loss, _ = net.loss(x_num, x_cat, generator=g)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(net.parameters(), 10.0)
            opt.step()
    assert old.net.known_embed.grad is None  # the old layout: a parameter DDP would wait for
    s_new, s_old = new.state_dict(), old.state_dict()
    assert all(torch.equal(s_new[k], s_old[k]) for k in s_new)


def test_saved_files_load_across_the_layouts(tmp_path):
    """A file written with the old layout (known_embed a parameter) loads into the new model and samples
    the same; a file written now loads strictly into the old layout."""
    from safetensors.torch import load_file

    df = pd.DataFrame({"a": np.random.default_rng(0).normal(size=120), "b": ["p", "q", "r"] * 40})
    torch.manual_seed(0)
    m = TabularDiffusion(denoiser="transformer", cond_prob=0.0, steps=5, warmup_steps=1, batch_size=64, calibration_rows=500,
                         progress=False, sample_steps=3, token_dim=16, depth=1, num_heads=2, emb_dim=4).fit(df)
    ref = m.sample(20, conditions={"b": "q"}, seed=0)
    m.save(tmp_path / "new")
    old = _old_layout(m.model)
    old.load_state_dict(load_file(str(tmp_path / "new" / "model.safetensors")))  # strict
    m.model = old  # what the old code would have saved
    m.save(tmp_path / "old")
    assert load_file(str(tmp_path / "old" / "model.safetensors")).keys() == \
        load_file(str(tmp_path / "new" / "model.safetensors")).keys()
    back = TabularDiffusion.load(tmp_path / "old")
    assert "net.known_embed" not in dict(back.model.named_parameters())
    pd.testing.assert_frame_equal(back.sample(20, conditions={"b": "q"}, seed=0), ref, check_exact=True)
    # why the buffer keeps its name: the old layout's strict load needs it in the file
    state = load_file(str(tmp_path / "new" / "model.safetensors"))
    with pytest.raises(RuntimeError, match=r'Missing key\(s\).*"net.known_embed"'):
        old.load_state_dict({k: v for k, v in state.items() if k != "net.known_embed"})


def test_logged_loss_is_over_the_noised_features_and_known_ones_get_no_gradient(monkeypatch):
    """cond_prob > 0: the logged mean leaves out the known (clean) features, and the loss that is minimised
    gives their outputs exactly zero gradient (they carry no learning signal)."""
    torch.manual_seed(0)
    m = CDTD(3, [2, 4], CDTDConfig(cond_prob=0.9, **SMALL_NET))
    seen = {}
    stats_fn, precondition = CDTD._loss_stats, m.precondition

    def spy_stats(ce, mse, known):
        seen.update(ce=ce.detach(), mse=mse.detach(), known=known)
        return stats_fn(ce, mse, known)

    def spy_precondition(*args, **kwargs):
        logits, d_num = precondition(*args, **kwargs)
        for t in [*logits, d_num]:
            t.retain_grad()
        seen["out"] = (logits, d_num)
        return logits, d_num

    monkeypatch.setattr(CDTD, "_loss_stats", staticmethod(spy_stats))
    monkeypatch.setattr(m, "precondition", spy_precondition)
    x_num, x_cat = _batch(3, [2, 4], n=256)
    loss, stats = m.loss(x_num, x_cat, generator=torch.Generator().manual_seed(2))
    known, ce, mse = seen["known"], seen["ce"], seen["mse"]
    assert known.any() and (~known).any(1).all()
    # brute force over the entries
    kept = [float(ce[b, j]) for b in range(256) for j in range(2) if not known[b, j]]
    kept += [float(mse[b, i]) for b in range(256) for i in range(3) if not known[b, 2 + i]]
    assert stats["loss"] == pytest.approx(np.mean(kept), rel=1e-5)
    assert stats["ce"] == pytest.approx(float(ce[~known[:, :2]].mean()), rel=1e-6)
    assert stats["mse"] == pytest.approx(float(mse[~known[:, 2:]].mean()), rel=1e-6)
    everything = float(torch.cat([ce, mse], 1).mean())
    assert abs(stats["loss"] - everything) > 1e-3 * everything  # the old mean was another number
    loss.backward()
    logits, d_num = seen["out"]
    for j, lg in enumerate(logits):
        assert (lg.grad[known[:, j]] == 0).all() and (lg.grad[~known[:, j]] != 0).any()
    assert (d_num.grad[known[:, 2:]] == 0).all() and (d_num.grad[~known[:, 2:]] != 0).any()
    # without known features the logged numbers are the plain means, as before
    m0 = CDTD(3, [2, 4], CDTDConfig(cond_prob=0.0, **SMALL_NET))
    _, s0 = m0.loss(x_num, x_cat, generator=torch.Generator().manual_seed(2))
    assert seen["known"] is None
    assert s0 == {"loss": float(torch.cat([seen["ce"], seen["mse"]], 1).mean()), "ce": float(seen["ce"].mean()),
                  "mse": float(seen["mse"].mean())}


@pytest.mark.filterwarnings("ignore:Grad strides do not match")  # NLinear's (n, 1, D) weight: a size-1 dim
def test_ddp_without_find_unused_parameters_runs(tmp_path):
    """What the core Trainer's DDP wrap needs: two steps under DistributedDataParallel (one gloo process,
    ``find_unused_parameters`` left False). A parameter without gradient fails the second step
    ("Expected to have finished reduction in the prior iteration")."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    if not dist.is_available() or dist.is_initialized():
        pytest.skip("needs torch.distributed and no process group of another test")

    class Loss(torch.nn.Module):  # DDP hooks forward(): route CDTD.loss through it
        def __init__(self, model):
            super().__init__()
            self.model = model

        def forward(self, x_num, x_cat, generator):
            return self.model.loss(x_num, x_cat, generator=generator)[0]

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        for denoiser in ("mlp", "transformer"):
            for cond_prob in (0.0, 0.25):
                for n_num, cards in ((3, [2, 4]), (3, []), (0, [3, 2])):
                    torch.manual_seed(0)
                    m = CDTD(n_num, cards, CDTDConfig(denoiser=denoiser, cond_prob=cond_prob, **SMALL_NET))
                    ddp = DistributedDataParallel(Loss(m))
                    x_num, x_cat = _batch(n_num, cards, n=32)
                    g = torch.Generator().manual_seed(0)
                    for _ in range(2):
                        ddp(x_num, x_cat, g).backward()
    finally:
        dist.destroy_process_group()


def test_dequantize_draws_fresh_scores_inside_each_tied_range(monkeypatch):
    """dequantize=True: every batch sees new scores for tied values, each inside the value's range of
    quantile levels (so it decodes to the value itself); a missing cell keeps the score 0 and untied
    values their fixed score. dequantize=False trains on the fixed middle-of-range scores."""
    rng = np.random.default_rng(0)
    n = 300
    df = pd.DataFrame({"h": np.where(rng.random(n) < 0.5, 40.0, rng.integers(1, 99, n).astype(float)),
                       "w": rng.normal(size=n), "c": rng.choice(["a", "b"], n)})
    df.loc[:9, "h"] = np.nan
    seen = []

    def spy(self, x_num, x_cat, num_observed=None, generator=None):
        seen.append((x_num.clone(), num_observed.clone()))
        return orig(self, x_num, x_cat, num_observed, generator)

    orig = CDTD.loss
    monkeypatch.setattr(CDTD, "loss", spy)
    kw = dict(TINY, steps=2, batch_size=n, warmup_steps=1)
    m = TabularDiffusion(dequantize=True, **kw).fit(df, categorical=["c"])
    (a, obs), (b, _) = seen  # one batch = the whole (permuted) table, twice
    enc = m.encoder
    h, w = enc.transforms["h"], enc.transforms["w"]
    for x, o in ((a, obs), (b, _)):
        zh = x[:, 0].double().numpy()
        back = np.round(h.inverse(zh))
        assert (zh[~o[:, 0].numpy()] == 0).all()
        decoded = np.sort(back[o[:, 0].numpy()])
        np.testing.assert_array_equal(decoded, np.sort(df["h"].dropna().to_numpy()))
    tied = (np.round(h.inverse(a[:, 0].double().numpy())) == 40) & obs[:, 0].numpy()
    assert tied.sum() > 100 and len(np.unique(a[tied, 0].numpy())) == tied.sum()  # spread, not one point
    assert not torch.equal(torch.sort(a[:, 0]).values, torch.sort(b[:, 0]).values)  # redrawn per batch
    np.testing.assert_allclose(np.sort(a[:, 1].numpy()), np.sort(w.forward(df["w"].to_numpy())), rtol=1e-5)
    seen.clear()
    TabularDiffusion(dequantize=False, **kw).fit(df, categorical=["c"])
    (a0, _), (b0, _) = seen
    assert len(np.unique(a0[:, 0].numpy())) == df["h"].nunique() + 1  # one score per value, plus NaN's 0
    assert torch.equal(torch.sort(a0[:, 0]).values, torch.sort(b0[:, 0]).values)


def test_ode_samplers_agree_with_euler_and_sde_samplers_are_refused(monkeypatch):
    """Euler runs on the uniform-u grid with the secant ratio; the other ODE samplers on their own
    default grid (with the derivative ratio the coarse uniform-u steps at the ends break them:
    Adult mean KS 0.2 with heun / ddim there). All reproduce the table's marginals."""
    import tabular.model as tm

    rng = np.random.default_rng(0)
    n = 2000
    c = rng.choice(["a", "b", "c"], n, p=[0.5, 0.3, 0.2])
    df = pd.DataFrame({"c": c, "x": rng.normal(np.select([c == "a", c == "b"], [-2.0, 0.0], 2.0), 0.5),
                       "y": rng.exponential(1.0, n)})
    torch.manual_seed(0)
    m = TabularDiffusion(steps=1500, warmup_steps=20, **TINY).fit(df)
    grids = {}
    core_sample = tm.core_sample

    def spy(name, *args, grid=None, **kwargs):
        grids[name] = grid
        return core_sample(name, *args, grid=grid, **kwargs)

    monkeypatch.setattr(tm, "core_sample", spy)
    for name in ("euler", "heun", "dpmpp_2m"):
        out = m.sample(3000, seed=1, sampler=name, steps=30)
        if name == "euler":
            assert torch.equal(grids[name], m.model.u_grid(30))
        else:
            assert grids[name] == 30
        p, q = df["c"].value_counts(normalize=True), out["c"].value_counts(normalize=True)
        assert 0.5 * p.sub(q, fill_value=0).abs().sum() < 0.1, (name, q)  # 0.065-0.083 measured
        for col in ("x", "y"):
            assert ks_statistic(df[col], out[col]) < 0.09, (name, col)  # 0.034-0.072
        means = out.groupby("c")["x"].mean()  # the dependence, not only the marginals
        np.testing.assert_allclose(means[["a", "b", "c"]], [-2.0, 0.0, 2.0], atol=0.4, err_msg=name)
    with pytest.raises(ValueError, match="'pc' is stochastic"):
        m.sample(10, sampler="pc")


def _three_groups(n=2000, seed=0):
    rng = np.random.default_rng(seed)
    c = rng.choice(["a", "b", "c"], n, p=[0.5, 0.3, 0.2])
    return pd.DataFrame({"c": c, "x": rng.normal(np.select([c == "a", c == "b"], [-2.0, 0.0], 2.0), 0.5),
                         "y": rng.exponential(1.0, n)})


def test_marginal_calibration_brings_the_marginals_to_the_data():
    from tabular.metrics import total_variation

    df = _three_groups()
    torch.manual_seed(0)
    # 2,500 steps: the dependence checked at the end must first be learned (with the default cond_prob
    # 0.5, half the rows train the conditional, and 1,500 steps left x's mean given c = "c" at 1.70)
    m = TabularDiffusion(steps=2500, warmup_steps=20, **{**TINY, "calibration_rows": 0}).fit(df)
    assert m.calibration is None
    raw = m.sample(20_000, seed=5)
    m.calibrate(rows=10_000, rounds=5)
    cal = m.sample(20_000, seed=5)
    tv0, tv1 = total_variation(df["c"], raw["c"]), total_variation(df["c"], cal["c"])
    assert tv1 < 0.025 and tv1 < tv0 / 2, (tv0, tv1)
    for col in ("x", "y"):
        ks0, ks1 = ks_statistic(df[col], raw[col]), ks_statistic(df[col], cal[col])
        assert ks1 < 0.03 and ks1 < ks0, (col, ks0, ks1)
    assert max(m.calibration["residual_tv"]) < 0.025
    # the dependence survives: x's mean per category
    np.testing.assert_allclose(cal.groupby("c")["x"].mean()[["a", "b", "c"]], [-2.0, 0.0, 2.0], atol=0.3)
    pd.testing.assert_frame_equal(raw, m.sample(20_000, seed=5, calibrated=False))


def test_numerical_calibration_is_a_monotone_map_per_column():
    rng = np.random.default_rng(1)
    df = pd.DataFrame({"x": rng.gamma(2.0, size=2000), "y": rng.normal(size=2000)})
    torch.manual_seed(0)
    m = TabularDiffusion(steps=30, warmup_steps=5, **TINY).fit(df)  # no categories: the same trajectories
    raw, cal = m.sample(5000, seed=2, calibrated=False), m.sample(5000, seed=2)
    for c in ("x", "y"):
        r, k = raw[c].to_numpy(), cal[c].to_numpy()
        assert (np.diff(k[np.lexsort((k, r))]) >= 0).all()  # ordered by the raw value, never decreasing
        assert not np.array_equal(r, k)
        assert ks_statistic(df[c], cal[c]) <= ks_statistic(df[c], raw[c]) + 0.005


def test_calibrate_scores_inverts_a_known_marginal_and_keeps_known_cells():
    from scipy.special import ndtri

    from tabular.api import calibrate_scores

    levels = np.clip(np.linspace(0.0, 1.0, 1001), 1e-6, 1 - 1e-6)
    q = 1.0 + 2.0 * ndtri(levels)  # the model's scores ~ N(1, 2^2): the calibrated score is (z - 1) / 2
    z = np.linspace(-3.0, 5.0, 41)[:, None].repeat(2, 1).astype(np.float32)
    known = np.zeros_like(z, bool)
    known[::3, 1] = True
    out = calibrate_scores(z, [q.tolist(), q.tolist()], known)
    np.testing.assert_allclose(out[:, 0], (z[:, 0] - 1.0) / 2.0, atol=2e-3)
    np.testing.assert_array_equal(out[known], z[known])
    np.testing.assert_allclose(out[~known[:, 1], 1], (z[~known[:, 1], 1] - 1.0) / 2.0, atol=2e-3)
    np.testing.assert_array_equal(calibrate_scores(z, [None, q.tolist()])[:, 0], z[:, 0])


def test_calibration_is_tied_to_its_sampler_and_steps_and_saved(tmp_path):
    df = _three_groups(800)
    torch.manual_seed(0)
    m = TabularDiffusion(steps=20, warmup_steps=2, **TINY).fit(df)
    assert m.calibration["steps"] == 12 and m.calibration["sampler"] == "euler"
    with pytest.warns(UserWarning, match="fitted for sampler='euler' steps=12.*steps=5\\) are uncalibrated"):
        a = m.sample(300, seed=1, steps=5)
    pd.testing.assert_frame_equal(a, m.sample(300, seed=1, steps=5, calibrated=False))
    m.calibrate(rows=1000, steps=5)
    assert m.calibration["steps"] == 5
    b = m.sample(300, seed=1, steps=5)
    assert not b.equals(a)
    m.save(tmp_path / "m")
    back = TabularDiffusion.load(tmp_path / "m")
    assert back.calibration == m.calibration
    pd.testing.assert_frame_equal(back.sample(300, seed=1, steps=5), b)
    # a file written before calibration existed loads uncalibrated
    meta = json.loads((tmp_path / "m" / "tabular.json").read_text())
    del meta["calibration"]
    (tmp_path / "m" / "tabular.json").write_text(json.dumps(meta))
    old = TabularDiffusion.load(tmp_path / "m")
    assert old.calibration is None
    pd.testing.assert_frame_equal(old.sample(300, seed=1, steps=5), m.sample(300, seed=1, steps=5, calibrated=False))
    for kw, what in ((dict(rows=0), "rows"), (dict(rounds=2.5), "rounds"), (dict(steps=0), "steps")):
        with pytest.raises(ValueError, match=f"calibrate: {what} must be a positive integer"):
            m.calibrate(**kw)
    with pytest.raises(ValueError, match="stochastic"):
        m.calibrate(sampler="euler_maruyama")
    with pytest.raises(ValueError, match="calibration_rows=-1"):
        TabularDiffusion(calibration_rows=-1)
    # refused when the model is made, not when fit() reaches the calibration after training
    for kw, what in ((dict(calibration_rows=2.5), "calibration_rows=2.5"), (dict(calibration_rounds=2.5), "calibration_rounds=2.5"),
                     (dict(calibration_rounds=True), "calibration_rounds=True")):
        with pytest.raises(ValueError, match=what):
            TabularDiffusion(**kw)
    with pytest.raises(ValueError, match="n must be a positive integer, got True"):
        m.sample(True)


def test_calibration_draws_default_to_four_times_the_rows_within_bounds(tmp_path):
    df = _three_groups(300)
    torch.manual_seed(0)
    m = TabularDiffusion(steps=5, warmup_steps=1, **{**TINY, "calibration_rows": None}).fit(df)
    assert m.calibration["rows"] == 10_000  # 4 x 300 is below the floor
    for n, rows in ((300, 10_000), (5_000, 20_000), (32_561, 30_000)):
        m.train_rows = n
        assert m.auto_calibration_rows() == rows
    m.save(tmp_path / "m")
    assert TabularDiffusion.load(tmp_path / "m").train_rows == 32_561


@pytest.mark.parametrize("denoiser", ["mlp", "transformer"])
def test_dropout_acts_in_training_only(denoiser):
    """``dropout`` makes the denoiser's training outputs random; in eval mode (sampling) it is
    deterministic, and with dropout 0 training and eval agree."""
    with pytest.raises(ValueError, match=r"dropout=1\.0"):
        CDTDConfig(dropout=1.0)
    with pytest.raises(ValueError, match=r"dropout=-0\.1"):
        TabularDiffusion(dropout=-0.1)
    torch.manual_seed(0)
    outs = {}
    for p in (0.0, 0.3):
        torch.manual_seed(0)
        m = CDTD(3, [2, 4], CDTDConfig(denoiser=denoiser, dropout=p, **SMALL_NET))
        for prm in m.net.parameters():  # the zero-initialised output layers would hide everything
            if prm.dim() > 1 and float(prm.detach().abs().sum()) == 0:
                torch.nn.init.normal_(prm, std=0.1)
        x_num, x_cat = torch.randn(16, 3), torch.randn(16, 2, 4)
        c = torch.full((16,), 0.3)
        m.train()
        a, b = m.net(x_num, x_cat, c), m.net(x_num, x_cat, c)
        m.eval()
        e1, e2 = m.net(x_num, x_cat, c), m.net(x_num, x_cat, c)
        assert torch.equal(e1, e2)
        outs[p] = (a, b, e1)
    a, b, e = outs[0.0]
    assert torch.allclose(a, e) and torch.allclose(b, e)
    a, b, e = outs[0.3]
    assert not torch.allclose(a, b) and not torch.allclose(a, e)


def test_ema_decay_0_keeps_the_last_weights():
    """ema_decay=0 passes FitConfig's check, so it must train: no averaging, the last weights kept
    (the same run with an EMA ends on other weights)."""
    df = _three_groups(300)
    fits = {}
    for decay in (0.0, 0.9):
        torch.manual_seed(0)
        fits[decay] = TabularDiffusion(steps=20, warmup_steps=2, ema_decay=decay, **{**TINY, "calibration_rows": 0}).fit(df)
    a, b = (dict(fits[d].model.state_dict()) for d in (0.0, 0.9))
    assert any(not torch.equal(a[k], b[k]) for k in a if a[k].is_floating_point())
    assert fits[0.0].sample(50, seed=0).notna().all().all()


def test_loss_ignores_a_nan_placeholder_and_empty_known_arguments_may_be_left_out():
    """A missing number's placeholder is not counted: NaN there gave a NaN loss (NaN * 0), 0 and 5 the
    same finite loss. And a model without categories (or numbers) samples conditionally without the
    empty known_cat (known_num) argument (it crashed on None)."""
    m = CDTD(2, [3], CDTDConfig(**SMALL_NET))
    x_num, x_cat = torch.randn(8, 2), torch.randint(0, 3, (8, 1))
    observed = torch.ones(8, 2, dtype=torch.bool)
    observed[::2, 1] = False
    losses = []
    for fill in (float("nan"), 0.0, 5.0):
        xn = x_num.clone()
        xn[~observed] = fill
        losses.append(m.loss(xn, x_cat, observed, generator=torch.Generator().manual_seed(0))[0])
    assert torch.isfinite(losses[0]) and losses[0] == losses[1] == losses[2]
    m_num = CDTD(2, [], CDTDConfig(**SMALL_NET)).eval()
    km = torch.zeros(4, 2, dtype=torch.bool)
    km[:, 0] = True
    xn, _ = m_num.sample_encoded(4, steps=3, known_mask=km, known_num=torch.full((4, 2), 0.7))
    assert torch.equal(xn[:, 0], torch.full((4,), 0.7))
    m_cat = CDTD(0, [3, 2], CDTDConfig(**SMALL_NET)).eval()
    _, xc = m_cat.sample_encoded(4, steps=3, known_mask=km, known_cat=torch.tensor([[2, 1]] * 4))
    assert torch.equal(xc[:, 0], torch.full((4,), 2))
    with pytest.raises(ValueError, match="give known_num"):
        m.sample_encoded(4, steps=3, known_mask=torch.ones(4, 3, dtype=torch.bool), known_num=torch.zeros(4, 2))


def test_a_save_interrupted_between_its_two_files_is_refused_on_load(german_model, tmp_path, monkeypatch):
    """Weights of one save beside the tabular.json of another (a save over a model killed between its
    two renames) must not load as a model with a mismatched encoder."""
    import os

    from tabular.api import SavedModelError

    m, df = german_model
    m.save(tmp_path / "model")
    other = TabularDiffusion(steps=3, warmup_steps=1, **TINY).fit(df)  # same shapes, other weights
    real_replace = os.replace

    def killed_before_json(src, dst):
        if str(dst).endswith("tabular.json"):
            raise KeyboardInterrupt  # the process dies after the weights' rename
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", killed_before_json)
    with pytest.raises(KeyboardInterrupt):
        other.save(tmp_path / "model")
    monkeypatch.setattr(os, "replace", real_replace)
    with pytest.raises(SavedModelError, match="model.safetensors is not the weights file tabular.json was saved with"):
        TabularDiffusion.load(tmp_path / "model")
    other.save(tmp_path / "model")  # a complete save loads again
    pd.testing.assert_frame_equal(TabularDiffusion.load(tmp_path / "model").sample(5, seed=0), other.sample(5, seed=0))


def test_impute_checks_every_row_not_only_rows_with_a_hole():
    df = pd.DataFrame({"a": np.linspace(0.0, 1.0, 60), "b": ["x", "y", "z"] * 20, "k": np.arange(60) % 7,
                       "c": 5})
    with pytest.warns(UserWarning, match="constant"):
        m = TabularDiffusion(steps=2, warmup_steps=1, **{**TINY, "calibration_rows": 0}).fit(df)
    for holes, msg in (({"a": [None, "oops", 0.5], "b": ["x", "y", "y"]}, "column 'a': value 'oops' is not a number"),
                       ({"a": [None, 0.2, 0.5], "b": ["x", "y", "unseen"]}, "column 'b': category 'unseen' not seen"),
                       ({"a": [None, np.inf, 0.5], "b": ["x", "y", "y"]}, "column 'a': value inf is infinite"),
                       ({"a": [None, 0.2, 0.5], "b": ["x", "y", "y"], "c": [5, 5, 6]},
                        "column 'c': value 6 differs from the constant 5")):
        frame = pd.DataFrame({"k": [1, 2, 3], "c": 5, **holes}, dtype=object)[["a", "b", "k", "c"]]
        with pytest.raises(TabularInputError, match=msg):
            m.impute(frame)
    ok = pd.DataFrame({"a": [None, 0.2, 0.5], "b": ["x", None, "z"], "k": [1, 2, 3], "c": [5, 5, None]})
    filled = m.impute(ok)
    assert filled.notna().all().all() and filled.loc[2, "b"] == "z" and (filled["c"] == 5).all()


def test_sample_conditions_that_fit_would_refuse_are_refused():
    df = pd.DataFrame({"a": np.linspace(0.0, 1.0, 60), "k": np.arange(60) % 7, "b": ["x", "y"] * 30})
    m = TabularDiffusion(steps=2, warmup_steps=1, **{**TINY, "calibration_rows": 0}).fit(df)
    for cond, msg in (({"a": float("inf")}, "column 'a': value inf is infinite"),
                      ({"a": [0.5, -np.inf, 0.1]}, "column 'a': value -inf is infinite"),
                      ({"k": 1.5}, "condition 'k': value 1.5 is not an integer"),
                      ({"k": [1, 2, 2.5]}, "condition 'k': value 2.5 is not an integer")):
        with pytest.raises(TabularInputError, match=msg):
            m.sample(3, conditions=cond)
    s = m.sample(3, conditions={"k": 2.0, "a": 0.5})  # an integral float is an integer
    assert (s["k"] == 2).all() and (s["a"] == 0.5).all()


def test_the_package_exports_the_api_as_the_readme_imports_it():
    import tabular
    from tabular.api import TabularDiffusion
    from tabular.baseline import GaussianCopula

    assert tabular.TabularDiffusion is TabularDiffusion and tabular.GaussianCopula is GaussianCopula
