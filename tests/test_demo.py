"""The README's main job: the 2D demo runs end to end and writes what it promises."""

import json
import math

import pytest

from core.demo import checkerboard, main


def test_checkerboard_is_uniform_on_eight_unit_squares():
    import torch

    x = checkerboard(20000, torch.Generator().manual_seed(0))
    assert float(x.abs().max()) <= 2.0
    cells = (x.floor() + 2).long()
    # occupied cells are exactly those with (row + col) odd-even pattern of the board, 1/8 each
    idx = cells[:, 1] * 4 + cells[:, 0]
    counts = torch.bincount(idx, minlength=16).float() / len(x)
    assert int((counts > 0).sum()) == 8
    assert float((counts[counts > 0] - 0.125).abs().max()) < 0.01
    for r in range(4):
        for c in range(4):
            assert (counts[r * 4 + c] > 0) == ((r + c) % 2 == 0)


def test_demo_runs_and_writes_outputs(tmp_path):
    m = main(["--steps", "40", "--n-samples", "300", "--n-nll", "30", "--out", str(tmp_path)])
    assert (tmp_path / "samples.png").stat().st_size > 10_000
    saved = json.loads((tmp_path / "metrics.json").read_text())
    assert saved["samplers"].keys() == {"dpmpp_2m", "heun", "euler_maruyama"}
    assert saved["samplers"]["dpmpp_2m"]["nfe"] == 10 and saved["samplers"]["heun"]["nfe"] == 35
    assert math.isfinite(m["test_nll_nats"])


def test_demo_rejects_bad_arguments(tmp_path):
    with pytest.raises(SystemExit, match="--steps must be positive, got 0"):
        main(["--steps", "0", "--out", str(tmp_path)])
