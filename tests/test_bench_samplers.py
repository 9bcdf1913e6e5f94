"""Sampler benchmark: the peer adapters and a smoke run of ``python -m benchmarks.samplers --quick``.

The adapters are checked against polydiff's own samplers where both implement the same method on
the same Karras grid: k-diffusion's Euler, Heun and DPM-Solver++(2M) and diffusers' Euler and
DPMSolverMultistep(2M) must land where polydiff's euler/heun/dpmpp_2m land from the same noise,
which only happens if the noise, the sigma schedule and the denoiser are mapped correctly.
"""

import re

import pytest
import torch

pytest.importorskip("diffusers")

from benchmarks import peers  # noqa: E402
from benchmarks import samplers as bench  # noqa: E402
from core.grids import karras_grid  # noqa: E402
from core.mixture import GaussianMixture  # noqa: E402
from core.paths import EDMPath  # noqa: E402
from core.samplers import SAMPLERS  # noqa: E402

needs_kd = pytest.mark.skipif(not peers.k_diffusion_available(), reason="k-diffusion is not installed")
PATH = EDMPath()


@pytest.fixture(scope="module")
def setup():
    mix = GaussianMixture.random(dim=3, n_components=4, seed=11)
    D = bench.fast_mixture_denoiser(mix, PATH)
    x = 80.0 * torch.randn(64, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    return mix, D, x


def test_fast_denoiser_is_the_mixture_denoiser(setup):
    mix, D, x = setup
    for t in (1.0, 0.02, 1e-5, 0.0):
        tt = torch.full((x.shape[0],), t, dtype=torch.float64)
        torch.testing.assert_close(D(x / 80 * (80 * t + 1), tt), mix.denoise(x / 80 * (80 * t + 1), tt, PATH))


@needs_kd
@pytest.mark.parametrize("name", ["euler", "heun", "dpmpp_2m"])
def test_k_diffusion_adapter_matches_polydiff(setup, name):
    _, D, x = setup
    steps = 12
    theirs, nfe = peers.run_k_diffusion(name, lambda y, s: D(y, s / 80.0), x, steps)
    ours, our_nfe = SAMPLERS[name].fn(D, PATH, x, karras_grid(PATH, steps))
    assert nfe == our_nfe
    torch.testing.assert_close(theirs, ours, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("name", ["euler", "dpmpp_2m"])
def test_diffusers_adapter_matches_polydiff(setup, name):
    _, D, x = setup
    steps = 12
    theirs, nfe = peers.run_diffusers(name, lambda y, s: D(y, s / 80.0), x, steps)
    ours, our_nfe = SAMPLERS[name].fn(D, PATH, x, karras_grid(PATH, steps))
    assert nfe == our_nfe == steps
    # diffusers keeps sigmas (and DPMSolverMultistep its state) in float32; sigma_min is ~0.1 % off 0.002
    torch.testing.assert_close(theirs, ours, rtol=0, atol=2e-4)


def test_trained_betas_span_edm_sigmas():
    lo, hi = peers.scheduler_sigma_range("dpmpp_2m")
    assert hi == pytest.approx(80.0, rel=1e-6)
    assert lo == pytest.approx(0.002, rel=2e-2)


@needs_kd
def test_quick_benchmark_runs_and_prints_the_ratio_line(capsys):
    assert bench.main(["--quick", "--dims", "2", "--n", "64", "--nfe", "5,10,20"]) == 0
    out = capsys.readouterr().out
    lines = out.strip().splitlines()
    assert re.fullmatch(
        r"ratio polydiff_best/peer_best endpoint error: NFE5 \d+\.\d\d  NFE10 \d+\.\d\d  NFE20 \d+\.\d\d", lines[-1]
    ), lines[-1]
    for row in ("polydiff unipc", "polydiff optimised grid", "k-diffusion lms", "diffusers dpmpp_3m"):
        assert any(line.startswith(row) for line in lines), row
    assert "endpoint error" in out and "SW2" in out
