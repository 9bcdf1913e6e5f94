"""Time grids: step counts, ends and validation."""

import pytest
import torch

from core.grids import karras_grid, logsnr_grid, uniform_t_grid, validate_grid
from core.paths import get_path


@pytest.mark.parametrize("name", ["linear", "gvp", "vp", "edm", "ve"])
@pytest.mark.parametrize("final_zero", [False, True])
def test_uniform_grid_has_steps_plus_one_distinct_points(name, final_zero):
    path = get_path(name)
    g = uniform_t_grid(path, 7, final_zero=final_zero)
    assert len(g) == 8 and bool((g[1:] < g[:-1]).all())
    assert float(g[0]) == path.t_max


def test_karras_grid_matches_edm_formula_on_edm_path():
    path = get_path("edm")
    g = karras_grid(path, 5)
    ramp = torch.linspace(0, 1, 5, dtype=torch.float64)
    sig = (80 ** (1 / 7) + ramp * (0.002 ** (1 / 7) - 80 ** (1 / 7))) ** 7
    torch.testing.assert_close(path.sigma(g[:-1]), sig)
    assert float(g[-1]) == 0.0
    assert len(logsnr_grid(path, 5)) == 6


def test_validate_grid_names_the_bad_value():
    with pytest.raises(ValueError, match="strictly decreasing"):
        validate_grid([1.0, 0.5, 0.5])
    with pytest.raises(ValueError, match="1.5"):
        validate_grid([1.5, 0.0])
