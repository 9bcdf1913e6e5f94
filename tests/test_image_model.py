"""image.model / image.dit / image.sample / image.autoencoder: objectives, training flags, samplers, codecs.

Every training flag has a test that fails when the flag is a no-op; objectives are checked against
the loss recomputed by hand from the same random draws (replayed from the generator's seed).
"""

import math

import pytest
import torch
import torch.nn.functional as F

from core.losses import loss_weight
from image.model import ImageDiffusion, ImageModelConfig, make_loss, repa_loss, tokens_of_features

B, C, S, K = 4, 1, 8, 3


def small(**kw):
    # no label dropout by default: replayed losses must see the same labels
    base = dict(patch_size=2, hidden_size=32, depth=4, num_heads=2, class_dropout_prob=0.0)
    base.update(kw)
    return ImageModelConfig(**base)


def randomize(model, seed=0):
    """Random weights everywhere (adaLN-Zero starts every block as the identity, which would hide
    the effect of architectural flags)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(0.2 * torch.randn(p.shape, generator=g))
    return model


def batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, C, S, S, generator=g).clamp(-1, 1), torch.tensor([0, 1, 2, 1])


def build(cfg, encoder_dim=0):
    return randomize(ImageDiffusion(cfg, (S, S), C, K, encoder_dim=encoder_dim))


def replay(seed):
    return torch.Generator().manual_seed(seed)


# ------------------------------------------------------------------ objectives


@pytest.mark.parametrize("path", ["linear", "gvp"])
def test_sit_loss_is_velocity_mse_with_sit_time_and_sign(path):
    cfg = small(path=path)
    m = build(cfg)
    x0, y = batch()
    loss = make_loss(cfg)(m, (x0, y), replay(3))["loss"]
    g = replay(3)
    t = torch.rand(B, generator=g, dtype=torch.float64)
    eps = torch.randn(x0.shape, generator=g)
    if path == "linear":
        a, s, da, ds = 1 - t, t, -torch.ones_like(t), torch.ones_like(t)
    else:
        a, s = torch.cos(math.pi * t / 2), torch.sin(math.pi * t / 2)
        da, ds = -math.pi / 2 * s, math.pi / 2 * a
    e = lambda c: c.float().view(-1, 1, 1, 1)  # noqa: E731
    xt = e(a) * x0 + e(s) * eps
    # SiT's own network: time 1 - t (data at 1), velocity towards data
    v_sit = m.net(xt, (1 - t).float(), y)
    target = e(da) * x0 + e(ds) * eps
    want = ((-v_sit - target) ** 2).flatten(1).mean(1).mean()
    torch.testing.assert_close(loss, want, rtol=1e-4, atol=1e-5)


def test_dit_loss_is_eps_mse_plus_vb():
    cfg = small(kind="dit")
    m = build(cfg)
    x0, y = batch()
    out = make_loss(cfg)(m, (x0, y), replay(5))
    g = replay(5)
    steps = torch.randint(0, 1000, (B,), generator=g)
    eps = torch.randn(x0.shape, generator=g)
    xt = m.ddpm.q_sample(x0, steps, eps)
    raw = m.net(xt, steps, y)
    mse = ((raw[:, :C] - eps) ** 2).flatten(1).mean(1)
    torch.testing.assert_close(out["mse"], mse.mean(), rtol=1e-4, atol=1e-5)
    assert out["vb"] > 0 and torch.isclose(out["loss"], out["mse"] + out["vb"])


@pytest.mark.parametrize("weighting", ["min_snr", "p2"])
def test_sit_weighting_matches_core_weights(weighting):
    from image.model import _core_weighting

    x0, y = batch()
    base, weighted = small(), small(weighting=weighting, min_snr_gamma=2.0, p2_gamma=0.5)
    m = build(base)
    g = replay(7)
    t = torch.rand(B, generator=g, dtype=torch.float64)
    eps = torch.randn(x0.shape, generator=g)
    v = m(m.path.marginal(x0, t, eps), t.float(), y)
    per = ((v - m.path.velocity(x0, t, eps)) ** 2).flatten(1).mean(1)
    w = loss_weight(_core_weighting(weighted), m.path, t, "velocity")
    got = make_loss(weighted)(m, (x0, y), replay(7))["loss"]
    torch.testing.assert_close(got, (w.float() * per).mean(), rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(make_loss(base)(m, (x0, y), replay(7))["loss"], per.mean(), rtol=1e-4, atol=1e-6)
    assert not torch.isclose(got, per.mean())


@pytest.mark.parametrize("weighting", ["min_snr", "p2"])
def test_dit_weighting_on_eps_mse(weighting):
    x0, y = batch()
    cfg = small(kind="dit", weighting=weighting, min_snr_gamma=5.0)
    m = build(cfg)
    got = make_loss(cfg)(m, (x0, y), replay(1))["mse"]
    g = replay(1)
    steps = torch.randint(0, 1000, (B,), generator=g)
    eps = torch.randn(x0.shape, generator=g)
    ac = m.ddpm.alphas_cumprod[steps]
    snr = ac / (1 - ac)
    w = snr.clamp(max=5.0) / snr if weighting == "min_snr" else 1.0 / (1.0 + snr)
    raw = m.net(m.ddpm.q_sample(x0, steps, eps), steps, y)
    mse = ((raw[:, :C] - eps) ** 2).flatten(1).mean(1)
    torch.testing.assert_close(got, (w.float() * mse).mean(), rtol=1e-4, atol=1e-6)


def test_dit_steps_match_the_path_log_snr():
    m = ImageDiffusion(small(kind="dit"), (S, S), C, K)
    lam = m._ddpm_log_snr.double()
    for i in (10, 250, 500, 900):  # inside the path's [t_min, t_max] = [1e-3, 1]
        t = m.path.t_from_log_snr(lam[i:i + 1])
        assert abs(float(m.dit_steps(t)) - i) < 1e-3
    # the VP path (0.1, 20) is the limit of DDPM's linear schedule: the step is close to t * 1000 - 1
    assert abs(float(m.dit_steps(torch.tensor([0.5]))) - 499) < 5


# ------------------------------------------------------------------ training flags


def _tokens_seen(model, cfg, x0, y, blocks):
    seen = {}
    hooks = [model.net.transformer.blocks[i].register_forward_pre_hook(
        lambda mod, args, i=i: seen.setdefault(i, args[0].shape[1]) and None) for i in blocks]
    make_loss(cfg)(model, (x0, y), replay(0))
    for h in hooks:
        h.remove()
    return seen


def test_long_skip_adds_skip_connections_that_change_the_output():
    x0, y = batch()
    t = torch.full((B,), 0.4)
    plain = build(small())
    skip = ImageDiffusion(small(long_skip=True), (S, S), C, K)
    skip.load_state_dict(plain.state_dict(), strict=False)
    assert skip.net.transformer.skip_linears is not None and len(skip.net.transformer.skip_linears) == 2
    with torch.no_grad():
        for lin in skip.net.transformer.skip_linears:  # cat(x, skip) -> x: identity on x, + 0.5 skip
            lin.weight.copy_(torch.cat([torch.eye(32), 0.5 * torch.eye(32)], dim=1))
            lin.bias.zero_()
    plain.eval(), skip.eval()
    out_plain, out_skip = plain(x0, t, y), skip(x0, t, y)
    assert not torch.allclose(out_plain, out_skip, atol=1e-4)
    with torch.no_grad():  # with the skip half of the Linear zeroed the network is the plain one
        for lin in skip.net.transformer.skip_linears:
            lin.weight[:, 32:] = 0
    torch.testing.assert_close(skip(x0, t, y), out_plain)


def test_mdt_masking_encoder_sees_kept_tokens_and_side_interpolator_fills_masked():
    x0, y = batch()
    cfg = small(mask_ratio=0.5, mask_decoder_depth=2, side_interpolator_depth=1, mask_full_pass=False)
    m = build(cfg)
    m.train()
    n = (S // 2) ** 2
    seen = _tokens_seen(m, cfg, x0, y, [0, 1, 2, 3])
    assert seen == {0: n // 2, 1: n // 2, 2: n, 3: n}
    m.eval()
    assert _tokens_seen(m, small(), x0, y, [0])[0] == n  # unmasked forward: all tokens
    # the side-interpolator output replaces only the masked tokens at the decoder entry
    m.train()
    keep = m.net.sample_keep_idx(B, replay(2))
    entry = {}
    h = m.net.transformer.blocks[2].register_forward_pre_hook(lambda mod, args: (entry.setdefault("x", args[0]), None)[1])
    m.net(x0, torch.full((B,), 0.3), y, keep_idx=keep)
    h.remove()
    side_in = {}
    h = m.net.side_interpolator[0].register_forward_pre_hook(lambda mod, args: (side_in.setdefault("x", args[0]), None)[1])
    m.net(x0, torch.full((B,), 0.3), y, keep_idx=keep)
    h.remove()
    visible = torch.zeros(B, n, dtype=torch.bool).scatter_(1, keep, True)
    assert torch.equal(entry["x"][visible], side_in["x"][visible])
    assert not torch.allclose(entry["x"][~visible], side_in["x"][~visible])
    # the flag changes the loss at the same weights and draws
    plain = ImageDiffusion(small(), (S, S), C, K)
    plain.load_state_dict(m.state_dict(), strict=False)
    assert not torch.isclose(make_loss(cfg)(m, (x0, y), replay(0))["loss"],
                             make_loss(small())(plain, (x0, y), replay(0))["loss"])


def test_mdt_full_pass_adds_the_unmasked_loss():
    x0, y = batch()
    one = small(mask_ratio=0.5, mask_full_pass=False)
    two = small(mask_ratio=0.5, mask_full_pass=True)
    m = build(two)
    m.train()
    l1 = make_loss(one)(m, (x0, y), replay(0))["loss"]
    l2 = make_loss(two)(m, (x0, y), replay(0))["loss"]
    assert l2 > l1 > 0


def test_tread_routes_tokens_around_the_middle_blocks_in_training_only():
    x0, y = batch()
    cfg = small(route_ratio=0.5, route_start=1, route_end=3)
    m = build(cfg)
    n = (S // 2) ** 2
    m.train()
    assert _tokens_seen(m, cfg, x0, y, [0, 1, 2, 3]) == {0: n, 1: n // 2, 2: n // 2, 3: n}
    m.eval()
    assert _tokens_seen(m, cfg, x0, y, [1]) == {1: n}
    m.train()
    plain = ImageDiffusion(small(), (S, S), C, K)
    plain.load_state_dict(m.state_dict())
    assert not torch.isclose(make_loss(cfg)(m, (x0, y), replay(0))["loss"],
                             make_loss(small())(plain, (x0, y), replay(0))["loss"])


def test_repa_aligns_projected_hidden_tokens_to_frozen_features():
    x0, y = batch()
    enc_net = torch.nn.Conv2d(1, 6, 2, stride=2)  # (B, 6, 4, 4) spatial features
    for p in enc_net.parameters():
        p.requires_grad_(False)
    cfg = small(repa_weight=0.7, repa_block=2)
    m = build(cfg, encoder_dim=6)
    out = make_loss(cfg, enc_net)(m, (x0, y), replay(4))
    # recompute: hidden tokens after block 2 at the same (t, noise), projector, cosine to features
    g = replay(4)
    t = torch.rand(B, generator=g, dtype=torch.float64)
    eps = torch.randn(x0.shape, generator=g)
    _, hidden = m(m.path.marginal(x0, t, eps), t.float(), y, return_hidden=2)
    feats = enc_net(x0).flatten(2).transpose(1, 2)
    want = -F.cosine_similarity(m.projector(hidden), feats, dim=-1).mean()
    torch.testing.assert_close(out["repa"], want, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(out["loss"], out["mse"] + 0.7 * out["repa"], rtol=1e-5, atol=1e-6)
    # only blocks up to repa_block (and the projector) receive gradient from the REPA term
    m.zero_grad()
    out["repa"].backward()
    blocks = m.net.transformer.blocks
    assert blocks[1].mlp.fc2.weight.grad.abs().sum() > 0 and m.projector[0].weight.grad.abs().sum() > 0
    assert blocks[2].mlp.fc2.weight.grad is None or blocks[2].mlp.fc2.weight.grad.abs().sum() == 0
    assert all(p.grad is None for p in enc_net.parameters())


def test_repa_under_mdt_takes_the_features_of_kept_tokens():
    x0, y = batch()
    enc = torch.nn.Conv2d(1, 6, 2, stride=2).requires_grad_(False)
    cfg = small(repa_weight=1.0, repa_block=1, mask_ratio=0.5, mask_full_pass=False)
    m = build(cfg, encoder_dim=6)
    m.train()
    out = make_loss(cfg, enc)(m, (x0, y), replay(0))
    assert torch.isfinite(out["repa"]) and -1 <= out["repa"] <= 1


def test_repa_loss_and_feature_tokens():
    a = torch.randn(2, 5, 3)
    torch.testing.assert_close(repa_loss(a, 2 * a), -torch.ones(2))
    torch.testing.assert_close(repa_loss(a, -a), torch.ones(2))
    fmap = torch.arange(2 * 3 * 4 * 4, dtype=torch.float32).view(2, 3, 4, 4)
    tok = tokens_of_features(fmap, (4, 4))
    assert torch.equal(tok[:, 5], fmap[:, :, 1, 1])  # row-major, as DiT.patchify
    assert tokens_of_features(fmap, (2, 2)).shape == (2, 4, 3)
    assert tokens_of_features(torch.randn(2, 3), (2, 2)).shape == (2, 4, 3)
    with pytest.raises(ValueError, match="square"):
        tokens_of_features(torch.randn(2, 5, 3), (2, 2))


def test_fasterdit_logit_normal_times_signal_scale_and_direction_loss():
    x0, y = batch()
    cfg = small(time_sampler="logit_normal", logit_mean=0.5, logit_std=0.8, signal_scale=0.5, direction_loss=0.3)
    m = build(cfg)
    seen = {}
    h1 = m.net.transformer.t_embedder.register_forward_pre_hook(lambda mod, a: (seen.setdefault("t_sit", a[0]), None)[1])
    h2 = m.net.patch_embed.register_forward_pre_hook(lambda mod, a: (seen.setdefault("x_t", a[0]), None)[1])
    out = make_loss(cfg)(m, (x0, y), replay(9))
    h1.remove(), h2.remove()
    g = replay(9)
    t = torch.sigmoid(0.5 + 0.8 * torch.randn(B, generator=g, dtype=torch.float64))
    eps = torch.randn(x0.shape, generator=g)
    torch.testing.assert_close(seen["t_sit"].double(), 1 - t, rtol=1e-6, atol=1e-6)
    xt = m.path.marginal(0.5 * x0, t, eps)  # trained on signal_scale * x0
    torch.testing.assert_close(seen["x_t"], xt)
    v = m(xt, t.float(), y)
    cos = F.cosine_similarity(v.flatten(1), m.path.velocity(0.5 * x0, t, eps).flatten(1), dim=1)
    torch.testing.assert_close(out["direction"], (1 - cos).mean(), rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(out["loss"], out["mse"] + 0.3 * out["direction"], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("bad, match", [
    (dict(kind="edm"), "kind"), (dict(path="vp"), "path"), (dict(weighting="snr"), "weighting"),
    (dict(kind="dit", time_sampler="logit_normal"), "time_sampler"), (dict(kind="dit", direction_loss=1.0), "direction"),
    (dict(long_skip=True, mask_ratio=0.5), "long_skip"), (dict(repa_weight=1.0, repa_block=9), "repa_block"),
    (dict(repa_weight=1.0, repa_block=2, route_ratio=0.5, route_start=1, route_end=3), "route span"),
    (dict(hidden_size=33), "divisible"), (dict(signal_scale=0.0), "signal_scale"),
])
def test_bad_model_configs_are_rejected(bad, match):
    with pytest.raises(ValueError, match=match):
        small(**bad).validate()


@pytest.mark.parametrize("bad, match", [
    # the network's settings, named by their model.* keys (they failed in image/dit.py after the data loaded,
    # as TransformerConfig.class_dropout_prob / mlp_ratio, or trained silently with zero-width MLPs)
    (dict(class_dropout_prob=1.5), r"^model\.class_dropout_prob=1\.5: must be in \[0, 1\)"),
    (dict(mlp_ratio=0.0), r"^model\.mlp_ratio=0\.0: must be a positive finite number"),
    (dict(mlp_ratio=-1.0), r"^model\.mlp_ratio=-1\.0"),
    (dict(mask_ratio=1.0), r"^model\.mask_ratio=1\.0: must be in \[0, 1\)"),
    (dict(route_ratio=0.5, route_start=1, route_end=9), r"^model\.route_end=9"),
    # the loss's settings (they failed in make_loss as "m must be a finite number, got nan")
    (dict(logit_mean=float("nan")), r"^model\.logit_mean=nan: must be a finite number"),
    (dict(logit_mean=float("nan"), time_sampler="uniform"), r"^model\.logit_mean=nan"),
    (dict(logit_std=float("inf")), r"^model\.logit_std=inf"),
])
def test_network_and_loss_settings_are_checked_under_their_keys(bad, match):
    with pytest.raises(ValueError, match=match):
        small(**bad).validate()


def test_repa_needs_an_encoder():
    with pytest.raises(ValueError, match="encoder"):
        make_loss(small(repa_weight=1.0))


# ------------------------------------------------------------------ sampling


def _run(tmp_path, cfg, name="run"):
    """A run directory as image.train writes it, with random weights."""
    import json

    from safetensors.torch import save_file

    m = build(cfg)
    d = tmp_path / name
    d.mkdir()
    info = {"model": cfg.__dict__, "input_size": [S, S], "in_channels": C, "num_classes": K, "latent": None,
            "dataset": "digits", "encoder_dim": 0}
    (d / "run.json").write_text(json.dumps(info))
    save_file({k: v.contiguous() for k, v in m.state_dict().items()}, str(d / "ema_0.999.safetensors"))
    return d, m


def test_generate_is_deterministic_ordered_and_uint8(tmp_path):
    from image.sample import generate

    d, _ = _run(tmp_path, small(class_dropout_prob=0.1))
    imgs, labels, info = generate(d, 2, "euler", 4, 2.0, seed=1, return_info=True)
    assert imgs.dtype == torch.uint8 and imgs.shape == (2 * K, C, S, S)
    assert labels.tolist() == [0, 0, 1, 1, 2, 2]
    assert info["nfe"] == 4 and info["network_evals_per_sample"] == 8  # CFG: two passes per evaluation
    again, _ = generate(d, 2, "euler", 4, 2.0, seed=1)
    assert torch.equal(imgs, again)
    other, _ = generate(d, 2, "euler", 4, 2.0, seed=2)
    assert not torch.equal(imgs, other)
    # batches draw from one stream: batch size does not change the samples
    small_batches, _ = generate(d, 2, "euler", 4, 2.0, seed=1, batch_size=2)
    assert torch.equal(imgs, small_batches)


def test_cfg_scale_one_is_the_conditional_model_and_interval_saves_evaluations(tmp_path):
    from image.sample import load_run, sample_latents

    d, _ = _run(tmp_path, small(class_dropout_prob=0.1))
    model, _, _ = load_run(d)
    y = torch.tensor([0, 1, 2])
    a, sa = sample_latents(model, y, sampler="heun", nfe=6, cfg_scale=1.0, generator=replay(0))
    b, sb = sample_latents(model, y, sampler="heun", nfe=6, cfg_scale=1.0, interval=(0.0, 1.0), generator=replay(0))
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)  # scale 1 guided == conditional
    assert sb["network_evals"] == 2 * sa["network_evals"]
    c, sc = sample_latents(model, y, sampler="heun", nfe=6, cfg_scale=3.0, interval=(0.5, 0.9), generator=replay(0))
    assert sa["network_evals"] < sc["network_evals"] < 2 * sa["network_evals"]
    full, _ = sample_latents(model, y, sampler="heun", nfe=6, cfg_scale=3.0, generator=replay(0))
    assert not torch.allclose(c, full)


def test_ddpm_sampler_for_dit_and_refusals(tmp_path):
    from image.sample import generate

    d, _ = _run(tmp_path, small(kind="dit", class_dropout_prob=0.1), "dit")
    imgs, labels, info = generate(d, 1, "ddpm", 5, 2.0, seed=0, return_info=True)
    assert imgs.shape == (K, C, S, S) and info["nfe"] == 5 and info["network_evals_per_sample"] == 10
    imgs2, _ = generate(d, 1, "dpmpp_2m", 5, 2.0, seed=0)  # a core sampler on the DiT's VP path
    assert imgs2.shape == imgs.shape
    s, _ = _run(tmp_path, small(class_dropout_prob=0.1), "sit")
    with pytest.raises(ValueError, match="ddpm"):
        generate(s, 1, "ddpm", 5)
    with pytest.raises(ValueError, match="unknown sampler"):
        generate(s, 1, "nope", 5)
    with pytest.raises(ValueError, match="n_per_class"):
        generate(s, 0)
    with pytest.raises(ValueError, match="does not exist"):
        generate(tmp_path / "missing", 1)


def test_sampler_table_rows(tmp_path, monkeypatch):
    import csv
    import sys
    import types

    from image.sample import generate, sampler_table

    calls = []

    def fake_evaluate(images, labels, dataset_name, root=None, on_error=None):  # stands in for image.evaluate
        calls.append((images.clone(), dataset_name, root, on_error))
        return {"mean": float(images.float().mean()), "note": "not a number: left out"}

    monkeypatch.setitem(sys.modules, "image.evaluate", types.SimpleNamespace(evaluate_samples=fake_evaluate))
    d, _ = _run(tmp_path, small(class_dropout_prob=0.1))
    rows = sampler_table(d, ["euler", "heun"], [3, 6], 2, 2.0, seed=5, out=tmp_path / "t.csv")
    assert [(r["sampler"], r["nfe_budget"]) for r in rows] == [("euler", 3), ("euler", 6), ("heun", 3), ("heun", 6)]
    assert rows[0]["nfe"] == 3 and rows[0]["network_evals_per_sample"] == 6 and "note" not in rows[0]
    imgs, _ = generate(d, 2, "heun", 6, 2.0, seed=5)
    assert torch.equal(calls[3][0], imgs) and calls[3][1] == "digits"
    assert calls[3][2:] == (None, "raise")  # the run's data.root and data.on_error reach the evaluation
    assert rows[3]["mean"] == pytest.approx(float(imgs.float().mean()))
    with open(tmp_path / "t.csv") as f:
        assert len(list(csv.DictReader(f))) == 4


def test_guidance_of_a_model_without_a_null_class_is_refused(tmp_path):
    # class_dropout_prob=0: the label table has no null row, so guided sampling cannot run
    from image.sample import generate, load_run, sample_latents

    d, _ = _run(tmp_path, small(class_dropout_prob=0.0))
    model, _, _ = load_run(d)
    y = torch.tensor([0, 1])
    for kw in ({"cfg_scale": 3.0}, {"interval": (0.2, 0.8)}, {"adaptive_gamma": 0.99}):
        with pytest.raises(ValueError, match="class_dropout_prob=0.0 and has no null class"):
            sample_latents(model, y, sampler="euler", nfe=3, **kw)
    with pytest.raises(ValueError, match=r"cfg_scale=2\.0.*class_dropout_prob=0\.0"):
        generate(d, 1, "euler", 3, 2.0)
    imgs, _ = generate(d, 1, "euler", 3, 1.0)  # unguided sampling still works
    assert imgs.shape == (K, C, S, S)
    dit, _ = _run(tmp_path, small(kind="dit", class_dropout_prob=0.0), "dit")
    with pytest.raises(ValueError, match="no null class"):
        generate(dit, 1, "ddpm", 3, 2.0)


def test_adaptive_samplers_take_tolerances_instead_of_a_budget(tmp_path):
    from image.sample import generate, load_run, sample_latents

    d, _ = _run(tmp_path, small(class_dropout_prob=0.1))
    model, _, _ = load_run(d)
    y = torch.tensor([0, 1, 2])
    for name in ("dopri5", "adaptive_sde"):
        with pytest.raises(ValueError, match=f"{name}.*adaptive.*nfe"):
            sample_latents(model, y, sampler=name, nfe=20)
    loose, s_loose = sample_latents(model, y, sampler="dopri5", nfe=None, cfg_scale=2.0, rtol=1e-1, atol=1e-1,
                                    generator=replay(0))
    tight, s_tight = sample_latents(model, y, sampler="dopri5", nfe=None, cfg_scale=2.0, rtol=1e-4, atol=1e-4,
                                    generator=replay(0))
    assert loose.shape == (3, C, S, S) and torch.isfinite(loose).all()
    assert s_loose["nfe"] < s_tight["nfe"] and s_tight["network_evals"] == 2 * s_tight["nfe"]  # options reach it
    # adaptive_sde steps every sample on its own: each keeps its own label (and guidance state)
    out, stats = sample_latents(model, y, sampler="adaptive_sde", nfe=None, cfg_scale=2.0, adaptive_gamma=0.999,
                                eps_rel=0.2, eps_abs=0.2, generator=replay(1))
    assert out.shape == (3, C, S, S) and torch.isfinite(out).all() and stats["nfe"] > 0
    imgs, labels, info = generate(d, 1, "adaptive_sde", None, 2.0, return_info=True, eps_rel=0.2, eps_abs=0.2)
    assert imgs.shape == (K, C, S, S) and info["nfe"] > 0


def test_save_grid_layout(tmp_path):
    from PIL import Image

    from image.sample import save_grid

    imgs = torch.zeros(6, 1, 4, 4, dtype=torch.uint8)
    imgs[4] = 200  # row 1, column 1
    p = save_grid(imgs, 2, tmp_path / "g.png")
    arr = torch.from_numpy(__import__("numpy").array(Image.open(p)))
    assert arr.shape == (2 * 6 + 2, 3 * 6 + 2)
    assert (arr[8:12, 8:12] == 200).all() and arr[2:6, 2:6].max() == 0
    with pytest.raises(ValueError, match="uint8"):
        save_grid(imgs.float(), 2, tmp_path / "x.png")


def test_save_grid_is_atomic_and_names_a_bad_extension(tmp_path, monkeypatch):
    from PIL import Image

    from image.sample import save_grid

    imgs = torch.full((4, 1, 4, 4), 100, dtype=torch.uint8)
    p = save_grid(imgs, 2, tmp_path / "g.png")
    before = p.read_bytes()

    def torn(self, fp, format=None, **kw):  # a failure half-way through the PNG
        fp.write(b"\x89PNG half")
        raise OSError("disk full")

    monkeypatch.setattr(Image.Image, "save", torn)
    with pytest.raises(OSError, match="disk full"):
        save_grid(imgs, 2, p)
    assert p.read_bytes() == before and [f.name for f in tmp_path.iterdir()] == ["g.png"]
    monkeypatch.undo()
    with pytest.raises(ValueError, match=r"'\.bogus'\); use \.png"):
        save_grid(imgs, 2, tmp_path / "g.bogus")
    assert not (tmp_path / "g.bogus").exists()


def _cli_error(capsys, argv):
    from image.sample import main

    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    return capsys.readouterr().err.strip().splitlines()[-1]


def test_sample_cli_refuses_bad_flags_before_loading_or_sampling(tmp_path, capsys, monkeypatch):
    import json

    import image.sample

    d, _ = _run(tmp_path, small(class_dropout_prob=0.1))
    monkeypatch.setattr(image.sample, "generate", lambda *a, **k: pytest.fail("sampled despite a bad flag"))
    cases = [
        (["--per-class", "0"], "--per-class must be >= 1, got 0"),
        (["--nfe", "0"], "--nfe must be >= 1, got 0"),
        (["--cfg-scale", "-1"], "--cfg-scale must be a finite number >= 0 (1: no guidance), got -1.0"),
        (["--interval", "0.9", "0.1"], "--interval T_LO T_HI must satisfy 0 <= T_LO < T_HI <= 1, got 0.9 0.1"),
        (["--adaptive-gamma", "0"], "--adaptive-gamma must be a finite number > 0, got 0.0"),
        (["--sampler", "bogus"], "--sampler: 'bogus' is not a sampler"),
        (["--sampler", "dopri5", "--nfe", "5"], "--sampler dopri5 is adaptive: it takes no --nfe"),
        (["--sampler", "ddpm"], "--sampler ddpm needs a DiT run (model.kind=dit)"),
        (["--option", "rtol=1e-3"], "--option ['rtol'] are not options of sampler 'euler'"),
        (["--grid-kind", "cosine"], "--grid-kind 'cosine' is not a grid"),
        (["--out", str(tmp_path)], f"--out {str(tmp_path)!r} is a directory"),
        (["--out", str(tmp_path / "grid.bogus")], "'.bogus'); use .png"),
        (["--table", "euler,bogus"], "--table: 'bogus' is not a sampler"),
        (["--table", "euler", "--nfe-list", "4,0"], "--nfe-list budgets must be >= 1"),
        # below a sampler's smallest cost: failed mid-table, after the rows before it were evaluated
        (["--sampler", "heun", "--nfe", "2"], "--sampler heun: --nfe=2: an NFE budget of 2 is below what sampler "
                                              "'heun' needs (3)"),
        (["--table", "euler,heun", "--nfe-list", "2"], "--table heun: --nfe-list budget=2"),
    ]
    for flags, message in cases:
        assert message in _cli_error(capsys, ["--run", str(d), *flags]), flags
    # another entry point's run (text.train: run.json with a model of other keys) is named as such
    text = tmp_path / "text_run"
    text.mkdir()
    (text / "run.json").write_text(json.dumps({"model": {"kind": "mdlm", "dim": 64}, "tokenizer": {}}))
    assert f"{text} is not an image.train run: its run.json has no ['input_size', 'in_channels', 'num_classes']" \
        in _cli_error(capsys, ["--run", str(text)])
    (text / "run.json").write_text(json.dumps({"model": {"kind": "mdlm", "dim": 64}, "input_size": [8, 8],
                                               "in_channels": 1, "num_classes": 3}))
    assert "is not an image.train run: its run.json's model settings are not an image model's" \
        in _cli_error(capsys, ["--run", str(text)])
    # weights of another shape under the run's names (load_state_dict's RuntimeError before)
    other, _ = _run(tmp_path, small(class_dropout_prob=0.1, hidden_size=16), "other")
    (other / "run.json").write_text((d / "run.json").read_text())
    assert "do not fit the model of" in _cli_error(capsys, ["--run", str(other)])
    unguided, _ = _run(tmp_path, small(), "unguided")
    assert "no null class" in _cli_error(capsys, ["--run", str(unguided)])


def test_sampler_table_checks_every_name_first_and_keeps_finished_rows(tmp_path, monkeypatch):
    import csv
    import sys
    import types

    from image.sample import sampler_table

    calls = []

    def fake_evaluate(images, labels, dataset_name, root=None, on_error=None):  # stands in for image.evaluate
        calls.append(len(images))
        if len(calls) == 3:
            raise RuntimeError("the classifier failed")
        return {"mean": float(images.float().mean())}

    monkeypatch.setitem(sys.modules, "image.evaluate", types.SimpleNamespace(evaluate_samples=fake_evaluate))
    d, _ = _run(tmp_path, small(class_dropout_prob=0.1))
    with pytest.raises(ValueError, match="unknown sampler 'bogus'"):
        sampler_table(d, ["euler", "bogus"], [3], 1, 2.0, out=tmp_path / "t.csv")
    assert calls == [] and not (tmp_path / "t.csv").exists()  # euler was not evaluated first
    with pytest.raises(RuntimeError, match="classifier failed"):
        sampler_table(d, ["euler", "heun"], [3, 4], 1, 2.0, out=tmp_path / "t.csv")
    with open(tmp_path / "t.csv") as f:  # the two rows finished before the failure are saved
        assert [(r["sampler"], r["nfe_budget"]) for r in csv.DictReader(f)] == [("euler", "3"), ("euler", "4")]
    assert [f.name for f in tmp_path.iterdir() if f.name.startswith("t.csv")] == ["t.csv"]


# ------------------------------------------------------------------ autoencoders


def test_kl_autoencoder_shapes_kl_and_alignment():
    from image.autoencoder import AutoencoderConfig, KLAutoencoder, alignment_loss, make_autoencoder_loss

    cfg = AutoencoderConfig(latent_channels=3, channels=8)
    ae = KLAutoencoder(cfg, 1)
    x = torch.rand(2, 1, 28, 28) * 2 - 1
    rec, mean, logvar, z = ae(x, replay(0))
    assert rec.shape == x.shape and mean.shape == (2, 3, 7, 7)
    out = make_autoencoder_loss(cfg)(ae, (x, torch.zeros(2)), replay(0))
    ae.train()
    rec, mean, logvar, _ = ae(x, replay(0))
    q = torch.distributions.Normal(mean, (0.5 * logvar).exp())
    kl = torch.distributions.kl_divergence(q, torch.distributions.Normal(0.0, 1.0)).mean()
    torch.testing.assert_close(out["kl"], kl, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(out["rec"], (rec - x).pow(2).mean(), rtol=1e-4, atol=1e-6)
    # VA-VAE: zero when the projected latents equal the features; the flag adds the term
    f = torch.randn(2, 9, 5)
    lc, ld = alignment_loss(f, 3 * f, 0.5, 0.25)
    assert torch.equal(lc, torch.zeros(2)) and torch.equal(ld, torch.zeros(2))
    lc, ld = alignment_loss(f, -f, 0.5, 0.0)
    torch.testing.assert_close(lc, torch.full((2,), 1.5))
    enc = torch.nn.Conv2d(1, 5, 4, stride=4).requires_grad_(False)
    va = AutoencoderConfig(latent_channels=3, channels=8, align_weight=0.5)
    ae2 = KLAutoencoder(va, 1, encoder_dim=5)
    ae2.load_state_dict(ae.state_dict(), strict=False)
    out2 = make_autoencoder_loss(va, enc)(ae2, (x, torch.zeros(2)), replay(0))
    assert out2["align"] > 0
    torch.testing.assert_close(out2["loss"], out["loss"] + 0.5 * out2["align"], rtol=1e-4, atol=1e-6)
    out2["loss"].backward()
    assert ae2.align_proj.weight.grad.abs().sum() > 0


def test_latent_codec_scale_round_trip():
    from image.autoencoder import LatentCodec

    codec = LatentCodec(lambda x, g=None: 2 * x, lambda z: z / 2, scale=0.25, shift=1.0)
    x = torch.randn(3, 2)
    torch.testing.assert_close(codec.encode(x), (2 * x - 1.0) * 0.25)
    torch.testing.assert_close(codec.decode(codec.encode(x)), x)
    with pytest.raises(ValueError, match="scaling factor"):
        LatentCodec(None, None, scale=0.0)


@pytest.fixture(scope="module")
def tiny_diffusers_vae(tmp_path_factory):
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), layers_per_block=1,
                        latent_channels=4, norm_num_groups=4, sample_size=16, scaling_factor=0.37)
    d = tmp_path_factory.mktemp("vae")
    vae.save_pretrained(d)
    return d, vae.eval()


def test_diffusers_vae_loader_scales_and_adapts_gray_images(tiny_diffusers_vae):
    from image.autoencoder import load_diffusers_vae

    folder, vae = tiny_diffusers_vae
    codec = load_diffusers_vae(folder, image_channels=1)
    assert codec.scale == pytest.approx(0.37)
    x = torch.rand(2, 1, 16, 16) * 2 - 1
    z = codec.encode(x)
    with torch.no_grad():
        want = vae.encode(x.repeat(1, 3, 1, 1)).latent_dist.mode() * 0.37
        dec = vae.decode(z / 0.37).sample.clamp(-1, 1).mean(1, keepdim=True)
    assert z.shape == (2, 4, 8, 8)
    torch.testing.assert_close(z, want, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(codec.decode(z), dec, rtol=1e-4, atol=1e-5)
    assert load_diffusers_vae(folder, scale=2.0).scale == 2.0
    with pytest.raises(ValueError, match="config.json"):
        load_diffusers_vae(folder / "nothing")
