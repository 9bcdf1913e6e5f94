"""The SiT fixture (willisma/SiT, ``sit_reference.pt``): interpolant coefficients, ``x_t``, ``u_t`` and
the velocity training loss, reproduced with polydiff's paths and :func:`core.losses.denoising_loss`.

SiT's time ``tau`` has noise at 0 and data at 1, and names the noise ``x0`` and the data ``x1``.
With polydiff's ``t = 1 - tau``: ``alpha_sit(tau) = alpha(t)``, ``sigma_sit(tau) = sigma(t)``,
``d_alpha_sit = -alpha'(t)``, ``d_sigma_sit = -sigma'(t)`` and SiT's velocity ``u_sit = -u``.
A SiT velocity network ``v_sit(x, tau)`` therefore runs as ``u(x, t) = -v_sit(x, 1 - t)``.
"""

from __future__ import annotations

import pytest
import torch

from core.guidance import cfg_net
from core.losses import denoising_loss, flow_matching_loss
from core.paths import get_path
from tests.conftest import load_fixture
from tests.test_ddpm import reference_dit_forward

PATH_NAMES = {"Linear": "linear", "GVP": "gvp"}


@pytest.fixture(scope="module")
def ref() -> dict:
    return load_fixture("sit_reference.pt")


def to_polydiff_t(tau: torch.Tensor) -> torch.Tensor:
    return 1.0 - tau.to(torch.float64)


def wrap_sit(v_sit):
    """A SiT velocity model ``v_sit(x, tau, **kw)`` as a polydiff velocity model ``u(x, t, **kw)``."""

    def model(x, t, **kw):
        return -v_sit(x, 1.0 - t, **kw)

    return model


def linear_model(ref):
    W, b = ref["lin_W"], ref["lin_b"]
    return lambda x, tau: torch.einsum("oc,bchw->bohw", W, x) + tau[:, None, None, None] * b[None, :, None, None]


@pytest.mark.parametrize("kind", ["Linear", "GVP"])
def test_coefficients(ref, kind):
    path = get_path(PATH_NAMES[kind])
    t = to_polydiff_t(ref["t_grid"])
    tol = dict(atol=1e-6, rtol=0)
    torch.testing.assert_close(path.alpha(t).float(), ref[f"{kind}_alpha_t"], **tol)
    torch.testing.assert_close(path.sigma(t).float(), ref[f"{kind}_sigma_t"], **tol)
    torch.testing.assert_close(-path.d_alpha(t).float(), ref[f"{kind}_d_alpha_t"], **tol)
    torch.testing.assert_close(-path.d_sigma(t).float(), ref[f"{kind}_d_sigma_t"], **tol)


@pytest.mark.parametrize("kind", ["Linear", "GVP"])
def test_xt_and_ut(ref, kind):
    path = get_path(PATH_NAMES[kind])
    t = to_polydiff_t(ref["t"])
    data, noise = ref["x1"], ref["x0"]
    torch.testing.assert_close(path.marginal(data, t, noise), ref[f"{kind}_xt"], atol=1e-6, rtol=0)
    torch.testing.assert_close(-path.velocity(data, t, noise), ref[f"{kind}_ut"], atol=1e-6, rtol=0)


@pytest.mark.parametrize("kind", ["Linear", "GVP"])
def test_velocity_loss_with_fixed_linear_model(ref, kind):
    path = get_path(PATH_NAMES[kind])
    loss = denoising_loss(
        wrap_sit(linear_model(ref)),
        ref["x1"],
        path,
        prediction="velocity",
        weighting="velocity",
        t=to_polydiff_t(ref["t"]),
        noise=ref["x0"],
        reduction="none",
    )
    torch.testing.assert_close(loss, ref[f"{kind}_loss"], atol=1e-5, rtol=1e-5)
    # The alias takes the same defaults.
    alias = flow_matching_loss(
        wrap_sit(linear_model(ref)), ref["x1"], path, t=to_polydiff_t(ref["t"]), noise=ref["x0"], reduction="none"
    )
    torch.testing.assert_close(alias, loss, atol=0, rtol=0)


def test_sit_network_loss(ref):
    """``sit_Linear_loss``: the tiny official SiT (a DiT with float time; first 4 of its 8 output
    channels) trained with the Linear-path velocity loss, via the functional reference forward."""
    sd, y = ref["sit_state_dict"], ref["sit_y"]

    def v_sit(x, tau, y):
        return reference_dit_forward(sd, x, tau, y)[:, :4]

    # The reference forward reproduces the fixture's network output, so the loss tests only the loss.
    torch.testing.assert_close(v_sit(ref["x1"], ref["t"], y), ref["sit_out"], atol=1e-5, rtol=1e-5)
    with torch.no_grad():
        loss = flow_matching_loss(
            wrap_sit(v_sit),
            ref["x1"],
            get_path("linear"),
            t=to_polydiff_t(ref["t"]),
            noise=ref["x0"],
            model_kwargs={"y": y},
            reduction="none",
        )
    torch.testing.assert_close(loss, ref["sit_Linear_loss"], atol=1e-5, rtol=1e-5)


def test_batched_guidance_matches_sit_forward_with_cfg(ref):
    """``sit_out_cfg``: official ``forward_with_cfg`` at scale 4 guides channels 0-2 only (its
    "exact reproducibility" quirk); there :func:`core.guidance.cfg_net`, which batches ``[y, null]``
    the same way, must agree. Time passes through the wrapper untouched (SiT's tau here)."""
    sd = ref["sit_state_dict"]

    def net(x, tau, y):
        return reference_dit_forward(sd, x, tau, y)[:, :4]

    guided = cfg_net(net, ref["sit_y"], 10, 4.0)
    out = guided(ref["x1"], ref["t"])
    assert guided.nfe == 2 and guided.calls == 1
    want = ref["sit_out_cfg"][:3]
    torch.testing.assert_close(out[:, :3], want[:, :3], atol=1e-5, rtol=1e-5)
