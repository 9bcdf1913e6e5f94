"""polydiff's DiT against the official facebookresearch/DiT and willisma/SiT fixtures.

See ../shared/fixtures/README.md (DiT/SiT section). The tiny config is
DiT(input_size=8, patch_size=2, in_channels=4, hidden_size=64, depth=2, num_heads=4,
class_dropout_prob=0.1, num_classes=10, learn_sigma=True).
"""

from __future__ import annotations

import argparse

import pytest
import torch

from core.nn.embeddings import sincos_pos_embed_2d, timestep_embedding
from image.convert import convert_official_dit_state_dict, load_official_dit
from image.dit import DiT
from tests.conftest import load_fixture

TINY = dict(input_size=8, patch_size=2, in_channels=4, hidden_size=64, depth=2, num_heads=4,
            class_dropout_prob=0.1, num_classes=10, learn_sigma=True)
TOL = dict(atol=1e-5, rtol=1e-5)


def _model(state_dict) -> DiT:
    model = DiT(**TINY)
    model.load_state_dict(convert_official_dit_state_dict(state_dict))
    return model.eval()


@pytest.fixture(scope="module")
def dit_ref():
    return load_fixture("dit_reference.pt")


@pytest.fixture(scope="module")
def sit_ref():
    return load_fixture("sit_reference.pt")


def test_forward_matches_official(dit_ref):
    model = _model(dit_ref["state_dict"])
    with torch.no_grad():
        out = model(dit_ref["x"], dit_ref["t"], dit_ref["y"])
    torch.testing.assert_close(out, dit_ref["out"], **TOL)


def test_forward_with_cfg_matches_official(dit_ref):
    model = _model(dit_ref["state_dict"])
    with torch.no_grad():
        out = model.forward_with_cfg(dit_ref["x_cfg"], dit_ref["t_cfg"], dit_ref["y_cfg"], cfg_scale=4.0)
    torch.testing.assert_close(out, dit_ref["out_cfg"], **TOL)


def test_forward_with_cfg_all_channels_option(dit_ref):
    model = _model(dit_ref["state_dict"])
    x, t, y = dit_ref["x_cfg"], dit_ref["t_cfg"], dit_ref["y_cfg"]
    with torch.no_grad():
        quirk = model.forward_with_cfg(x, t, y, cfg_scale=4.0)
        full = model.forward_with_cfg(x, t, y, cfg_scale=4.0, guided_channels=None)
        raw = model(torch.cat([x[:3], x[:3]]), t, y)
    torch.testing.assert_close(full[:, :3], quirk[:, :3])
    cond, uncond = raw[:3, 3], raw[3:, 3]
    torch.testing.assert_close(full[:3, 3], uncond + 4.0 * (cond - uncond))
    torch.testing.assert_close(full[:, 4:], raw[:, 4:])  # variance channels never guided


def test_pos_embed_table(dit_ref):
    ref = dit_ref["pos_embed_64_4"]
    torch.testing.assert_close(sincos_pos_embed_2d(64, 4), ref.float(), atol=1e-6, rtol=0)
    torch.testing.assert_close(sincos_pos_embed_2d(64, 4, dtype=torch.float64), ref, atol=1e-12, rtol=0)
    torch.testing.assert_close(DiT(**TINY).pos_embed[0], ref.float(), atol=1e-6, rtol=0)


def test_timestep_embedding(dit_ref):
    torch.testing.assert_close(timestep_embedding(dit_ref["temb_t"], 256), dit_ref["temb_256"], atol=1e-6, rtol=0)


def test_sit_forward_and_cfg(sit_ref):
    # Same network; SiT returns the first in_channels outputs and feeds float t in [0, 1].
    model = _model(sit_ref["sit_state_dict"])
    x1, t, y = sit_ref["x1"], sit_ref["t"], sit_ref["sit_y"]
    null = torch.full_like(y, 10)
    with torch.no_grad():
        out = model(x1, t, y)[:, :4]
        out_cfg = model.forward_with_cfg(torch.cat([x1, x1]), torch.cat([t, t]), torch.cat([y, null]), 4.0)[:, :4]
    torch.testing.assert_close(out, sit_ref["sit_out"], **TOL)
    torch.testing.assert_close(out_cfg, sit_ref["sit_out_cfg"], **TOL)


@pytest.mark.parametrize("layout", ["raw", "train_checkpoint"])
def test_load_official_checkpoint_file(dit_ref, tmp_path, layout):
    sd = dit_ref["state_dict"]
    path = tmp_path / "dit.pt"
    if layout == "raw":
        torch.save(sd, path)
    else:  # official train.py layout: "model", "ema", "opt", "args" (an argparse Namespace)
        garbage = {k: torch.zeros_like(v) for k, v in sd.items()}
        torch.save({"model": garbage, "ema": sd, "opt": {}, "args": argparse.Namespace(model="DiT-S/2")}, path)
    model = load_official_dit(path, **TINY)
    with torch.no_grad():
        out = model(dit_ref["x"], dit_ref["t"], dit_ref["y"])
    torch.testing.assert_close(out, dit_ref["out"], **TOL)


def test_load_official_errors(dit_ref, tmp_path):
    sd = dict(dit_ref["state_dict"])
    path = tmp_path / "dit.pt"

    torch.save({k: v for k, v in sd.items() if k != "blocks.1.mlp.fc2.bias"}, path)
    with pytest.raises(ValueError, match="blocks.1.mlp.fc2.bias"):
        load_official_dit(path, **TINY)

    torch.save({**sd, "blocks.0.extra.weight": torch.zeros(1)}, path)
    with pytest.raises(ValueError, match="blocks.0.extra.weight"):
        load_official_dit(path, **TINY)

    torch.save(sd, path)
    with pytest.raises(ValueError, match="transformer.blocks.2"):  # depth too large: missing block 2
        load_official_dit(path, **{**TINY, "depth": 3})
    with pytest.raises(ValueError, match="pos_embed"):  # wrong input size
        load_official_dit(path, **{**TINY, "input_size": 16})
    with pytest.raises(ValueError, match="shapes"):
        load_official_dit(path, **{**TINY, "num_classes": 12})


def test_named_configs():
    model = DiT.from_name("DiT-S/2", input_size=32)
    n_params = sum(p.numel() for p in model.parameters())
    D, C, p = 384, 4, 2
    block = (D * 3 * D + 3 * D) + (D * D + D) + (D * 4 * D + 4 * D) + (4 * D * D + D) + (D * 6 * D + 6 * D)
    official = ((C * p * p * D + D) + (256 * D + D + D * D + D) + 1001 * D + 12 * block
                + (D * 2 * D + 2 * D) + (D * p * p * 2 * C + p * p * 2 * C))
    assert n_params == official  # official's "33M" also counts its frozen pos_embed (256 * D)
    assert abs((n_params + 256 * D) / 1e6 - 33.0) < 0.05
    assert model.config.depth == 12 and model.config.num_heads == 6 and model.patch_size == 2
    with pytest.raises(ValueError, match="DiT-M/2"):
        DiT.from_name("DiT-M/2")
