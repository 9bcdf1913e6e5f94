"""Load official facebookresearch/DiT checkpoints into polydiff's ``DiT``.

Official names (``models.py``) map onto polydiff's one to one:

    x_embedder.proj.*                 -> patch_embed.*
    t_embedder.mlp.{0,2}.*            -> transformer.t_embedder.mlp.{0,2}.*
    y_embedder.embedding_table.weight -> transformer.y_embedder.embedding_table.weight
    blocks.{i}.attn.{qkv,proj}.*      -> transformer.blocks.{i}.attn.{qkv,proj}.*
    blocks.{i}.mlp.{fc1,fc2}.*        -> transformer.blocks.{i}.mlp.{fc1,fc2}.*
    blocks.{i}.adaLN_modulation.1.*   -> transformer.blocks.{i}.modulation.*
    final_layer.linear.*              -> final_layer.linear.*
    final_layer.adaLN_modulation.1.*  -> final_layer.modulation.*
    pos_embed                         -> (not stored: polydiff rebuilds the fixed table; checked)

The layouts agree (fused qkv as q, k, v with heads contiguous; adaLN chunks in DiT's
order), so tensors are copied unchanged.
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import torch

from image.dit import DiT

_RULES = [
    (r"x_embedder\.proj\.(weight|bias)", r"patch_embed.\1"),
    (r"t_embedder\.mlp\.([02])\.(weight|bias)", r"transformer.t_embedder.mlp.\1.\2"),
    (r"y_embedder\.embedding_table\.weight", r"transformer.y_embedder.embedding_table.weight"),
    (r"blocks\.(\d+)\.attn\.(qkv|proj)\.(weight|bias)", r"transformer.blocks.\1.attn.\2.\3"),
    (r"blocks\.(\d+)\.mlp\.(fc1|fc2)\.(weight|bias)", r"transformer.blocks.\1.mlp.\2.\3"),
    (r"blocks\.(\d+)\.adaLN_modulation\.1\.(weight|bias)", r"transformer.blocks.\1.modulation.\2"),
    (r"final_layer\.linear\.(weight|bias)", r"final_layer.linear.\1"),
    (r"final_layer\.adaLN_modulation\.1\.(weight|bias)", r"final_layer.modulation.\1"),
]
_RULES = [(re.compile(pattern), repl) for pattern, repl in _RULES]


def convert_official_dit_state_dict(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename an official DiT (or SiT) state dict to polydiff's ``DiT`` names.

    ``pos_embed`` is dropped (polydiff keeps it as a non-persistent buffer; ``load_official_dit``
    checks it). A key that no rule maps raises ValueError naming it.
    """
    if sd and all(k.startswith("module.") for k in sd):  # saved from a DDP wrapper
        sd = {k.removeprefix("module."): v for k, v in sd.items()}
    out, unknown = {}, []
    for key, value in sd.items():
        if key == "pos_embed":
            continue
        for pattern, repl in _RULES:
            if pattern.fullmatch(key):
                out[pattern.sub(repl, key)] = value
                break
        else:
            unknown.append(key)
    if unknown:
        raise ValueError(f"unexpected keys in official DiT state dict: {sorted(unknown)}")
    return out


def _select_state_dict(ckpt: dict, use_ema: bool) -> dict[str, torch.Tensor]:
    """Official files are a raw state dict (released models) or a train.py checkpoint
    ``{"model", "ema", "opt", "args"}``; the official ``find_model`` prefers "ema"."""
    if not isinstance(ckpt, dict):
        raise ValueError(f"expected a dict in the checkpoint, got {type(ckpt).__name__}")
    order = ("ema", "model") if use_ema else ("model", "ema")
    for key in order:
        if key in ckpt and isinstance(ckpt[key], dict):
            return ckpt[key]
    return ckpt


def load_official_dit(path: str | Path, name: str | None = None, use_ema: bool = True, **config) -> DiT:
    """Build ``DiT`` from ``config`` (or ``DiT.from_name(name, **config)``) and load an official
    checkpoint file into it (``torch.load(..., weights_only=True)``, on CPU).

    ``config`` uses the official constructor names: input_size, patch_size, in_channels,
    hidden_size, depth, num_heads, class_dropout_prob, num_classes, learn_sigma.
    Raises ValueError naming missing, unexpected or wrongly shaped keys, or a ``pos_embed``
    that does not match the model's grid (wrong input_size).
    """
    # train.py checkpoints pickle their argparse Namespace next to the weights.
    with torch.serialization.safe_globals([argparse.Namespace]):
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    sd = _select_state_dict(ckpt, use_ema)
    model = DiT.from_name(name, **config) if name else DiT(**config)

    official_pos = sd.get("pos_embed")
    converted = convert_official_dit_state_dict(sd)
    expected = model.state_dict()
    missing = sorted(set(expected) - set(converted))
    unexpected = sorted(set(converted) - set(expected))
    if missing or unexpected:
        raise ValueError(f"checkpoint {path} does not fit this DiT config: missing keys {missing}, "
                         f"unexpected keys {unexpected}")
    wrong = [f"{k}: checkpoint {tuple(v.shape)} vs model {tuple(expected[k].shape)}"
             for k, v in converted.items() if v.shape != expected[k].shape]
    if wrong:
        raise ValueError(f"checkpoint {path} has shapes that do not fit this DiT config: {wrong}")
    if official_pos is not None:
        ours = model.pos_embed
        if official_pos.shape != ours.shape or not torch.allclose(official_pos.float(), ours, atol=1e-5):
            raise ValueError(f"pos_embed of shape {tuple(official_pos.shape)} in {path} differs from the "
                             f"2-D sin-cos table of this config {tuple(ours.shape)}: check input_size/patch_size")
    model.load_state_dict(converted, strict=True)
    return model.eval()
