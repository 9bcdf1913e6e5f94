"""Tests for core/ddpm.py: analytic checks and the facebookresearch/DiT reference fixture."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from core.ddpm import (
    DiscreteDDPM,
    cosine_betas,
    discretized_gaussian_log_likelihood,
    linear_betas,
    normal_kl,
)
from tests.conftest import load_fixture

FIXTURE = "dit_reference.pt"


@pytest.fixture(scope="module")
def ref() -> dict:
    return load_fixture(FIXTURE)


@pytest.fixture(scope="module")
def ddpm() -> DiscreteDDPM:
    return DiscreteDDPM(linear_betas(1000))


# --------------------------------------------------------------------------- reference forward


def reference_dit_forward(sd: dict, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Reference forward for the fixture: the official DiT ``models.py`` ``DiT.forward``
    (eval mode) written out functionally on its state dict, independent of polydiff's DiT.

    Config of the fixture: patch 2, hidden 64, 4 heads, MLP ratio 4, learn_sigma (2C outputs).
    ``x``: ``(B, C, H, W)``; ``t``: ``(B,)`` steps; ``y``: ``(B,)`` labels. Returns ``(B, 2C, H, W)``.
    """
    heads, p = 4, 2
    B, _, H, W = x.shape

    def lin(h, name):
        return F.linear(h, sd[f"{name}.weight"], sd[f"{name}.bias"])

    def norm(h):  # LayerNorm without affine, eps 1e-6
        return F.layer_norm(h, h.shape[-1:], eps=1e-6)

    def modulate(h, shift, scale):
        return h * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)

    # Patch embedding (Conv2d kernel = stride = patch), tokens in row-major order, + sin-cos table.
    h = F.conv2d(x, sd["x_embedder.proj.weight"], sd["x_embedder.proj.bias"], stride=p)
    h = h.flatten(2).transpose(1, 2) + sd["pos_embed"]
    D = h.shape[-1]

    # Timestep embedding: [cos, sin] of 256 frequencies, then Linear-SiLU-Linear; label table.
    half = 128
    freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float32) / half)
    args = t[:, None].float() * freqs[None]
    temb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    temb = lin(F.silu(lin(temb, "t_embedder.mlp.0")), "t_embedder.mlp.2")
    c = temb + sd["y_embedder.embedding_table.weight"][y]

    n_blocks = len({k.split(".")[1] for k in sd if k.startswith("blocks.")})
    for i in range(n_blocks):
        b = f"blocks.{i}"
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = lin(
            F.silu(c), f"{b}.adaLN_modulation.1"
        ).chunk(6, dim=1)
        a = modulate(norm(h), shift_msa, scale_msa)
        N = a.shape[1]
        qkv = lin(a, f"{b}.attn.qkv").reshape(B, N, 3, heads, D // heads).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2])
        a = lin(a.transpose(1, 2).reshape(B, N, D), f"{b}.attn.proj")
        h = h + gate_msa.unsqueeze(1) * a
        m = modulate(norm(h), shift_mlp, scale_mlp)
        m = lin(F.gelu(lin(m, f"{b}.mlp.fc1"), approximate="tanh"), f"{b}.mlp.fc2")
        h = h + gate_mlp.unsqueeze(1) * m

    shift, scale = lin(F.silu(c), "final_layer.adaLN_modulation.1").chunk(2, dim=1)
    h = lin(modulate(norm(h), shift, scale), "final_layer.linear")

    # Unpatchify: features ordered (row-in-patch, col-in-patch, channel).
    c_out = h.shape[-1] // (p * p)
    h = h.reshape(B, H // p, W // p, p, p, c_out)
    h = torch.einsum("nhwpqc->nchpwq", h)
    return h.reshape(B, c_out, H, W)


# --------------------------------------------------------------------------- fixture


def test_schedule_arrays_match_reference(ref):
    betas = linear_betas(1000)
    assert betas.dtype == torch.float64
    torch.testing.assert_close(betas, ref["betas_linear_1000"], atol=1e-12, rtol=0)
    spaced = DiscreteDDPM(betas).respace(range(1000))
    torch.testing.assert_close(spaced.betas, ref["diffusion_betas"], atol=1e-12, rtol=0)
    torch.testing.assert_close(spaced.alphas_cumprod, ref["alphas_cumprod"], atol=1e-12, rtol=0)
    torch.testing.assert_close(
        spaced.posterior_log_variance_clipped, ref["posterior_log_variance_clipped"], atol=1e-12, rtol=0
    )
    assert torch.equal(spaced.timestep_map, torch.arange(1000))


def test_q_sample_matches_reference(ref):
    spaced = DiscreteDDPM(linear_betas(1000)).respace(range(1000))
    xt = spaced.q_sample(ref["diff_x_start"], ref["diff_t"], noise=ref["diff_noise"])
    assert xt.dtype == torch.float32
    torch.testing.assert_close(xt, ref["q_sample"], atol=1e-6, rtol=0)


def test_reference_forward_reproduces_dit_out(ref):
    with torch.no_grad():
        out = reference_dit_forward(ref["state_dict"], ref["x"], ref["t"], ref["y"])
    torch.testing.assert_close(out, ref["out"], atol=1e-5, rtol=1e-5)


def test_training_losses_match_reference(ref):
    spaced = DiscreteDDPM(linear_betas(1000)).respace(range(1000))
    sd = ref["state_dict"]

    def model_fn(x, t, y):
        return reference_dit_forward(sd, x, t, y)

    with torch.no_grad():
        terms = spaced.training_losses(
            model_fn,
            ref["diff_x_start"],
            ref["diff_t"],
            noise=ref["diff_noise"],
            model_kwargs={"y": ref["diff_y"]},
        )
    for key in ("mse", "vb", "loss"):
        torch.testing.assert_close(terms[key], ref[f"loss_{key}"], atol=1e-5, rtol=1e-5)


# --------------------------------------------------------------------------- analytic


def test_posterior_is_bayes_product_of_gaussians(ddpm):
    # q(x_{t-1} | x_0) = N(sqrt(ac_prev) x0, 1 - ac_prev), q(x_t | x_{t-1}) = N(sqrt(a_t) x_{t-1}, b_t):
    # the posterior precision is the sum of precisions, the mean the precision-weighted mean.
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(4, 3, 5, generator=g, dtype=torch.float64)
    xt = torch.randn(4, 3, 5, generator=g, dtype=torch.float64)
    t = torch.tensor([1, 17, 500, 999])
    betas = linear_betas(1000)
    ac = torch.cumprod(1 - betas, 0)
    b, a, ac_prev = betas[t], 1 - betas[t], ac[t - 1]
    var = 1.0 / (1.0 / (1 - ac_prev) + a / b)
    mean = var[:, None, None] * (
        ac_prev.sqrt()[:, None, None] * x0 / (1 - ac_prev)[:, None, None]
        + a.sqrt()[:, None, None] * xt / b[:, None, None]
    )
    m, v, logv = ddpm.q_posterior_mean_variance(x0, xt, t)
    torch.testing.assert_close(m, mean, atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(v.flatten(), var, atol=0, rtol=1e-10)
    torch.testing.assert_close(logv.flatten(), var.log(), atol=1e-10, rtol=0)
    # t = 0: x_{t-1} is x_0 itself, with zero variance (the log variance is clipped to entry 1).
    t0 = torch.zeros(4, dtype=torch.long)
    m0, v0, logv0 = ddpm.q_posterior_mean_variance(x0, xt, t0)
    torch.testing.assert_close(m0, x0, atol=1e-12, rtol=0)
    assert (v0 == 0).all()
    assert (logv0 == ddpm.posterior_log_variance_clipped[1]).all()


def test_learned_range_endpoints(ddpm):
    B, C = 3, 2
    xt = torch.randn(B, C, 4, dtype=torch.float64)
    t = torch.tensor([0, 10, 999])
    eps = torch.randn(B, C, 4, dtype=torch.float64)
    for v, arr in ((-1.0, ddpm.posterior_log_variance_clipped), (1.0, ddpm.betas.log())):
        out = ddpm.p_mean_variance(torch.cat([eps, torch.full_like(eps, v)], 1), xt, t)
        torch.testing.assert_close(
            out["log_variance"], arr[t].view(B, 1, 1).expand(B, C, 4), atol=1e-12, rtol=0
        )


def test_discretized_likelihood_sums_to_one():
    bins = torch.linspace(-1, 1, 256, dtype=torch.float64)  # uint8 values rescaled to [-1, 1]
    for mean, log_scale in ((0.1, math.log(0.3)), (-0.95, math.log(0.05)), (0.0, math.log(2.0))):
        lp = discretized_gaussian_log_likelihood(
            bins, torch.full_like(bins, mean), torch.full_like(bins, log_scale)
        )
        assert lp.exp().sum().item() == pytest.approx(1.0, abs=1e-9)


def test_normal_kl():
    m = torch.randn(10, dtype=torch.float64)
    lv = torch.randn(10, dtype=torch.float64)
    assert normal_kl(m, lv, m, lv).abs().max().item() <= 1e-15  # exact up to rounding of -1 + lv - lv + 1
    # KL(N(1, e^2) || N(0, 1)) = 0.5 (e^2 + 1 - 1 - 2) = 0.5 (e^2 - 2)
    one = torch.ones((), dtype=torch.float64)
    kl = normal_kl(one, 2 * one, 0 * one, 0 * one)
    assert kl.item() == pytest.approx(0.5 * (math.e**2 - 2), rel=1e-12)


def test_respace_keeps_alphas_cumprod_and_maps_steps(ddpm):
    kept = list(range(0, 1000, 40)) + [999]
    sp = ddpm.respace(kept)
    assert sp.num_timesteps == len(kept)
    torch.testing.assert_close(sp.alphas_cumprod, ddpm.alphas_cumprod[kept], atol=1e-12, rtol=0)
    assert sp.timestep_map.tolist() == kept
    # uneven spacing may give non-monotone betas; that is allowed for a respaced process
    sp2 = sp.respace([0, 1, 2, 20, 21])
    assert sp2.timestep_map.tolist() == [kept[i] for i in (0, 1, 2, 20, 21)]
    torch.testing.assert_close(sp2.alphas_cumprod, ddpm.alphas_cumprod[sp2.timestep_map], atol=1e-12, rtol=0)
    torch.testing.assert_close(
        sp.continuous_time(torch.tensor([0, len(kept) - 1])), torch.tensor([1e-3, 1.0], dtype=torch.float64)
    )


def test_continuous_time(ddpm):
    ct = ddpm.continuous_time(torch.tensor([0, 499, 999]))
    assert ct.dtype == torch.float64
    assert ct.tolist() == [0.001, 0.5, 1.0]


def test_cosine_betas_match_closed_form():
    N = 100
    betas = cosine_betas(N)

    def ab(u):
        return math.cos((u + 0.008) / 1.008 * math.pi / 2) ** 2

    expected = torch.tensor(
        [min(1 - ab((i + 1) / N) / ab(i / N), 0.999) for i in range(N)], dtype=torch.float64
    )
    torch.testing.assert_close(betas, expected, atol=1e-12, rtol=0)
    assert betas[-1].item() == 0.999


def test_linear_betas_rescale():
    b = linear_betas(250)
    assert b[0].item() == pytest.approx(4e-4) and b[-1].item() == pytest.approx(0.08)


def test_p_sample_reproducible(ddpm):
    x = torch.randn(2, 3, 4, 4)
    out = torch.randn(2, 6, 4, 4).clamp(-1, 1)
    t = torch.tensor([500, 0])
    s1 = ddpm.p_sample(out, x, t, generator=torch.Generator().manual_seed(7))["sample"]
    s2 = ddpm.p_sample(out, x, t, generator=torch.Generator().manual_seed(7))["sample"]
    s3 = ddpm.p_sample(out, x, t, generator=torch.Generator().manual_seed(8))["sample"]
    assert torch.equal(s1, s2)
    assert not torch.equal(s1[0], s3[0])
    assert torch.equal(s1[1], s3[1])  # no noise at t == 0
    mean = ddpm.p_mean_variance(out, x, t)["mean"]
    assert torch.equal(s1[1], mean[1])


def test_ddim_with_true_eps_follows_the_forward_path(ddpm):
    # An oracle eps makes pred_x0 exact, so a deterministic DDIM step lands on q_sample at t-1
    # with the same noise.
    x0 = torch.randn(3, 2, 4, dtype=torch.float64)
    eps = torch.randn(3, 2, 4, dtype=torch.float64)
    t = torch.tensor([1, 300, 999])
    xt = ddpm.q_sample(x0, t, noise=eps)
    out = torch.cat([eps, torch.zeros_like(eps)], 1)
    step = ddpm.ddim_step(out, xt, t, eta=0.0)
    torch.testing.assert_close(step["pred_x0"], x0, atol=1e-9, rtol=0)
    torch.testing.assert_close(step["sample"], ddpm.q_sample(x0, t - 1, noise=eps), atol=1e-9, rtol=0)


def test_vb_term_does_not_train_the_mean(ddpm):
    x0 = torch.randn(2, 2, 4, 4)
    w = torch.zeros(4, requires_grad=True)  # output = w_c everywhere; channels 0-1 eps, 2-3 v

    def model_fn(x, t):
        return x.new_zeros(x.shape[0], 4, *x.shape[2:]) + w.view(1, 4, 1, 1)

    terms = ddpm.training_losses(model_fn, x0, torch.tensor([0, 300]), noise=torch.randn_like(x0))
    (g,) = torch.autograd.grad(terms["vb"].sum(), w)
    assert (g[:2] == 0).all() and (g[2:] != 0).all()
    torch.testing.assert_close(terms["loss"], terms["mse"] + terms["vb"])


def test_bad_inputs_raise(ddpm):
    x = torch.zeros(2, 3, 4, 4)
    with pytest.raises(ValueError, match="1000"):
        ddpm.q_sample(x, torch.tensor([0, 1000]))
    with pytest.raises(ValueError, match="-1"):
        ddpm.q_sample(x, torch.tensor([-1, 3]))
    with pytest.raises(TypeError, match="dtype"):
        ddpm.q_sample(x, torch.tensor([0.5, 3.0]))
    with pytest.raises(ValueError, match="shape"):
        ddpm.p_mean_variance(torch.zeros(2, 3, 4, 4), x, torch.tensor([1, 2]))
    with pytest.raises(ValueError, match="non-decreasing"):
        DiscreteDDPM(torch.tensor([0.02, 0.01, 0.03], dtype=torch.float64))
    with pytest.raises(ValueError, match="1.5"):
        DiscreteDDPM(torch.tensor([0.01, 0.5, 1.5], dtype=torch.float64))
    with pytest.raises(ValueError, match="0.0"):
        DiscreteDDPM(torch.tensor([0.0, 0.5], dtype=torch.float64))
    with pytest.raises(ValueError, match="1000"):
        ddpm.respace([0, 1000])
    with pytest.raises(ValueError, match="num_steps"):
        linear_betas(1)
    with pytest.raises(ValueError, match="must lie in"):
        linear_betas(10)  # scaled beta_end = 2.0 > 1
