"""Official GDSS checkpoints (Jo et al. 2022, seed 184; harryjo97/GDSS ``checkpoints/<data>/gdss_<data>.pth``)
as :class:`graph.train.GDSSModel` instances, so that they sample through polydiff's pipeline
(``python -m graph.sample --official CKPT --data NAME``, ``benchmarks.graph_community_small``).

The checkpoint is read with :func:`graph.model.load_gdss_checkpoint` (``weights_only``: its EasyDict config
is read as plain dicts, nothing pickled is executed); the architecture and the two SDEs come from the
checkpoint's own ``model_config`` (its ``model``, ``sde`` and ``train`` sections), the graph sizes must be
those of the data the model is sampled for.
"""

from __future__ import annotations

import pickle
from pathlib import Path

from core.engine.config import to_schema

from .train import GDSSModel, GraphModelConfig

__all__ = ["load_official", "official_model"]


def load_official(path: str | Path, max_node_num: int | None, max_feat_num: int | None,
                  ema: bool = False) -> tuple[GDSSModel, GraphModelConfig]:
    """``(model, model config)`` of an official GDSS checkpoint: the model in eval mode with the raw weights
    (``x_state_dict`` / ``adj_state_dict``) or, with ``ema=True``, GDSS's EMA shadows (``ema_x`` / ``ema_adj``),
    loaded ``strict=True``; the config is the checkpoint's ``model`` / ``sde`` / ``train`` sections as a
    :class:`graph.train.GraphModelConfig` (``sde_adj.num_scales`` is GDSS's number of solver steps).

    Raises ``ValueError`` when the file does not exist, holds no GDSS ``model_config``, or was trained for
    other graph sizes than ``max_node_num`` / ``max_feat_num`` (the data's; None takes the checkpoint's)."""
    from .model import load_gdss_checkpoint

    path = Path(path)
    if not path.is_file():
        raise ValueError(f"--official {str(path)!r} does not exist")
    try:
        ckpt = load_gdss_checkpoint(path, ema=ema)
    except KeyError as e:  # a torch file of another kind: name what is missing rather than a bare KeyError
        raise ValueError(f"{path} is not an official GDSS checkpoint: it holds no {e.args[0]!r}") from None
    except pickle.UnpicklingError as e:  # not a torch file, or one needing code beyond weights_only
        raise ValueError(f"{path} cannot be read as an official GDSS checkpoint (weights_only): {e}") from None
    cfg = ckpt["config"]
    if not {"model", "sde", "data"} <= set(cfg):
        raise ValueError(f"{path} holds no GDSS model_config with 'model', 'sde' and 'data' sections")
    sizes = (cfg["data"].get("max_node_num"), cfg["data"].get("max_feat_num"))
    max_node_num = sizes[0] if max_node_num is None else max_node_num
    max_feat_num = sizes[1] if max_feat_num is None else max_feat_num
    if sizes != (max_node_num, max_feat_num):
        raise ValueError(f"{path} was trained with max_node_num / max_feat_num = {sizes}, the data has "
                         f"{(max_node_num, max_feat_num)}")
    train = cfg.get("train", {})
    node = {**cfg["model"], "sde_x": cfg["sde"]["x"], "sde_adj": cfg["sde"]["adj"]}
    node.update({k: train[k] for k in ("eps", "reduce_mean") if k in train})
    model_cfg = to_schema(node, GraphModelConfig, "official model")
    model_cfg.validate()
    model = GDSSModel(model_cfg, max_node_num, max_feat_num)
    # The networks load_gdss_checkpoint built from params_x / params_adj hold the weights; GDSSModel's
    # modules keep the official parameter names, so a strict load also checks the two architectures agree.
    model.model_x.load_state_dict(ckpt["model_x"].state_dict(), strict=True)
    model.model_adj.load_state_dict(ckpt["model_adj"].state_dict(), strict=True)
    return model.eval(), model_cfg


def official_model(path: str | Path, max_node_num: int, max_feat_num: int, ema: bool = False) -> GDSSModel:
    """The official GDSS checkpoint as a :class:`graph.train.GDSSModel`: its architecture and SDEs from the
    checkpoint's own config, its raw weights (or EMA shadows with ``ema=True``) loaded ``strict=True``.
    Raises ``ValueError`` when the checkpoint was trained for other graph sizes than the run's data
    (see :func:`load_official`)."""
    return load_official(path, max_node_num, max_feat_num, ema=ema)[0]
