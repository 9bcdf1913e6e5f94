"""Class-conditional sampling from ``image.train`` runs, and the ``python -m image.sample`` command.

    python -m image.sample --run outputs/image/sit --sampler euler --nfe 20 --cfg-scale 3 --out grid.png
    python -m image.sample --run outputs/image/dit --sampler ddpm --nfe 50 --cfg-scale 2 --interval 0.1 0.8

- :func:`generate` (also used by ``python -m image.evaluate``): ``n_per_class`` samples of every
  class as uint8 images ``(N, C, H, W)`` and their labels, decoded from latents when the run is
  latent.
- Any core sampler by name (``core.samplers.SAMPLERS``: euler, heun, ddim, dpmpp_2m, dpmpp_3m,
  unipc, dopri5, euler_maruyama, ancestral, pc, adaptive_sde) on the model's path, plus ``ddpm``:
  DiT's own ancestral sampler with its learned variance on a respaced DDPM (DiT models only).
- ``nfe`` is the sampler's budget of denoiser evaluations; with classifier-free guidance a guided
  evaluation costs two network passes over the batch (``network_evals`` in :func:`generate`'s
  info). The adaptive samplers ``dopri5`` and ``adaptive_sde`` take no budget (``nfe=None``;
  command line: leave out ``--nfe``): they run from the start to the end of the path and their
  cost follows their error tolerances, given as sampler options (``rtol``/``atol`` of dopri5,
  ``eps_abs``/``eps_rel`` of adaptive_sde; ``--option rtol=1e-3``); ``nfe`` in the info is what
  they spent. Guidance (``core.guidance``): ``cfg_scale`` (1 = conditional model), ``interval``
  (guide only for polydiff times ``t`` in ``[t_lo, t_hi]``, Kynkaanniemi et al. 2024),
  ``adaptive_gamma`` (Adaptive Guidance, Castillo et al. 2023: stop guiding a sample once its
  conditional and unconditional predictions have cosine similarity above gamma). Guidance needs
  the null class of a model trained with label dropout (``model.class_dropout_prob > 0``); a
  model without one samples with ``cfg_scale=1`` and no interval / adaptive_gamma only.
- :func:`save_grid`: a PNG grid, one row per class.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from core.engine.checkpoint import atomic_write, read_run_json
from core.guidance import GuidedDenoiser, cfg_net
from core.predictions import as_denoiser
from core.samplers import SAMPLERS, sample
from core.samplers.registry import steps_for_nfe

from .model import ImageDiffusion, config_from_dict

__all__ = ["load_run", "generate", "sample_latents", "save_grid", "main"]


def _run_dir(checkpoint_path: str | Path) -> tuple[Path, Path | None]:
    """(run directory holding run.json, weights file or None for 'newest in the run')."""
    p = Path(checkpoint_path)
    if not p.exists():
        raise ValueError(f"checkpoint_path does not exist: {str(p)!r}")
    if p.is_dir():
        if not (p / "run.json").is_file():
            raise ValueError(f"{p} holds no run.json: not an image.train run directory")
        return p, None
    for d in (p.parent, p.parent.parent):
        if (d / "run.json").is_file():
            return d, p
    raise ValueError(f"no run.json beside {p} or its parent: not an image.train checkpoint")


def _weights(run: Path, file: Path | None, use_ema: bool, decays=None) -> dict[str, Tensor]:
    """The weights to load: ``file`` if given (a checkpoint's EMA of the first configured decay when
    ``use_ema``), else the run's EMA export of the first configured decay, else the newest checkpoint.
    ``decays``: the run's ``ema_decays`` as recorded in its JSON (None for older runs)."""
    from safetensors.torch import load_file

    from core.engine.checkpoint import ema_order, first_ema_export, first_ema_shadow, list_checkpoints, load_checkpoint

    if file is None:
        export = first_ema_export(run, decays) if use_ema else None
        if export is not None:
            return load_file(str(export))
        ckpts = list_checkpoints(run / "checkpoints")
        if not ckpts:
            raise ValueError(f"run {run} has no exported weights and no checkpoint")
        file = ckpts[-1][1]
    if file.suffix == ".safetensors":
        return load_file(str(file))
    state = load_checkpoint(file)
    if use_ema:
        order = [] if not decays else ema_order(run, decays)
        shadow = first_ema_shadow(state, order)
        if shadow is not None:
            return shadow
    return state["model"]


RUN_KEYS = ("model", "input_size", "in_channels", "num_classes")


def read_run_info(run: Path) -> dict:
    """``run.json`` of an ``image.train`` run directory; ValueError saying so when it is another entry
    point's run (text.train, graph.train, ...: other keys, other model settings)."""
    info = read_run_json(run, "image.train", RUN_KEYS)
    try:
        config_from_dict(info["model"])
    except (TypeError, ValueError) as e:
        raise ValueError(f"{run} is not an image.train run: its run.json's model settings are not an image "
                         f"model's ({e})") from None
    return info


def load_run(checkpoint_path: str | Path, use_ema: bool = True, device: str | torch.device = "cpu"):
    """``(model, info, codec)`` of a run: the :class:`ImageDiffusion` in eval mode, ``run.json`` and the
    latent codec (``None`` for a pixel-space run; else an object with ``decode(z) -> [-1, 1] images``).

    ``checkpoint_path``: the run directory (EMA export if any, else the newest checkpoint), a
    ``checkpoints/ckpt_*.pt`` file or an ``ema_*.safetensors`` file of the run. With several EMA
    decays the run directory and a checkpoint load the first of the run's ``trainer.ema_decays``
    (recorded in run.json; the trainer's own default EMA), not the first export by file name.
    """
    run, file = _run_dir(checkpoint_path)
    info = read_run_info(run)
    cfg = config_from_dict(info["model"])
    model = ImageDiffusion(cfg, tuple(info["input_size"]), info["in_channels"], info["num_classes"],
                           encoder_dim=info.get("encoder_dim", 0))
    sd = _weights(run, file, use_ema, info.get("ema_decays"))
    # EMA exports carry non-persistent buffers too (rebuilt tables): drop those
    persistent = set(model.state_dict())
    sd = {k: v for k, v in sd.items() if k in persistent or k not in dict(model.named_buffers())}
    try:
        missing, unexpected = model.load_state_dict(sd, strict=False)
    except RuntimeError as e:  # same names, other shapes: the weights of another model
        raise ValueError(f"weights {str(file or run)!r} do not fit the model of {run}'s run.json: "
                         f"{' '.join(str(e).split())}") from None
    if missing or unexpected:
        raise ValueError(f"weights of {run} do not fit its run.json: missing {missing}, unexpected {unexpected}")
    model.to(device).eval()
    codec = None
    if info.get("latent"):
        from .autoencoder import load_codec

        codec = load_codec(info["latent"], device=device)
    return model, info, codec


# Steps of the grid given to an adaptive sampler: only its ends matter (its first time and its last
# positive-sigma time, plus the final denoising step onto t = 0 where the path lands on data).
ADAPTIVE_GRID_STEPS = 2
# Samplers that take finished samples out of the batch they pass the denoiser (adaptive_sde steps every
# sample on its own): the class labels and guidance state follow the whole batch, so they run one
# sample at a time.
PER_SAMPLE_SAMPLERS = ("adaptive_sde",)


def is_adaptive(sampler: str) -> bool:
    """Whether a core sampler picks its own steps (dopri5, adaptive_sde): it takes no NFE budget."""
    return sampler in SAMPLERS and SAMPLERS[sampler].nfe is None


def check_nfe(sampler: str, nfe, what: str = "nfe") -> None:
    """ValueError unless ``nfe`` fits ``sampler``: None for an adaptive sampler, a budget >= 1 otherwise."""
    if is_adaptive(sampler):
        if nfe is not None:
            raise ValueError(f"sampler {sampler!r} is adaptive: its cost follows its error tolerances (sampler "
                             f"options: rtol/atol for dopri5, eps_abs/eps_rel for adaptive_sde), not an NFE budget; "
                             f"set {what} to None (null in a config) instead of {nfe!r}")
    elif isinstance(nfe, bool) or not isinstance(nfe, int) or nfe < 1:
        raise ValueError(f"sampler {sampler!r} needs an NFE budget: {what} must be a positive integer, got {nfe!r}")


def check_budget(model: ImageDiffusion, sampler: str, nfe: int | None, what: str = "nfe") -> None:
    """ValueError unless ``sampler`` can run on ``model`` within ``nfe`` (:func:`check_nfe`, then the
    sampler's smallest cost on the model's path, or the DDPM's step count for ``ddpm``)."""
    check_nfe(sampler, nfe, what)
    if sampler == "ddpm":
        if model.kind != "dit":
            raise ValueError("sampler 'ddpm' needs a DiT model (kind=dit); use a core sampler for SiT")
        if nfe > model.ddpm.num_timesteps:
            raise ValueError(f"{what}={nfe} exceeds the {model.ddpm.num_timesteps} steps of the model's DDPM "
                             "(sampler 'ddpm')")
    elif nfe is not None:
        from core.grids import lands_on_data

        try:
            steps_for_nfe(sampler, nfe, final_zero=lands_on_data(model.path, True))
        except ValueError as e:
            raise ValueError(f"{what}={nfe}: {e}") from None


def check_options(sampler: str, options: dict, what: str = "sampler.options") -> None:
    """ValueError naming the keys of ``options`` that ``sampler`` does not take (the keyword-only options of a
    core sampler; ``ddpm`` takes none). ``what`` names them as the user gave them."""
    if not options:
        return
    import inspect

    params = {} if sampler == "ddpm" else inspect.signature(SAMPLERS[sampler].fn).parameters
    allowed = sorted(n for n, q in params.items() if q.kind == q.KEYWORD_ONLY and n not in ("generator", "callback"))
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise ValueError(f"{what} {unknown} are not options of sampler {sampler!r} (it takes {allowed or 'none'})")


def guides(cfg_scale: float, interval=None, adaptive_gamma: float | None = None) -> bool:
    """Whether these settings evaluate the unconditional model (classifier-free guidance)."""
    return not (cfg_scale == 1.0 and interval is None and adaptive_gamma is None)


def check_guidance(model: ImageDiffusion, cfg_scale: float, interval=None, adaptive_gamma: float | None = None) -> None:
    """ValueError when guidance is asked of a model without a null class (trained with no label dropout)."""
    if guides(cfg_scale, interval, adaptive_gamma) and not model.has_null_class:
        raise ValueError(
            f"classifier-free guidance (cfg_scale={cfg_scale!r}, interval={interval!r}, "
            f"adaptive_gamma={adaptive_gamma!r}) needs the unconditional model, but this model was trained with "
            f"model.class_dropout_prob={model.cfg.class_dropout_prob!r} and has no null class: sample it with "
            "cfg_scale=1 and no interval / adaptive_gamma, or train with model.class_dropout_prob > 0")


def _start_noise(model: ImageDiffusion, shape, grid: Tensor, generator, device) -> Tensor:
    return model.path.prior_sample(shape, t=float(grid[0]), generator=generator, device=device)


@torch.no_grad()
def sample_latents(model: ImageDiffusion, labels: Tensor, *, sampler: str = "euler", nfe: int | None = 20,
                   cfg_scale: float = 1.0, interval=None, adaptive_gamma: float | None = None,
                   grid_kind: str | None = None, generator: torch.Generator | None = None,
                   **sampler_options) -> tuple[Tensor, dict]:
    """Samples ``(B, C, H, W)`` in the model's space (before ``signal_scale`` is undone) for ``labels``.

    ``nfe``: the budget of a fixed-step sampler; None for an adaptive one (dopri5, adaptive_sde), whose
    tolerances come in ``sampler_options`` (adaptive_sde runs one sample at a time: it steps each sample
    on its own). Returns the samples and ``{"nfe": sampler evaluations, "network_evals": network
    passes over the batch}`` (per-sample means for adaptive_sde).
    """
    if sampler != "ddpm" and sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler {sampler!r}; choose 'ddpm' or one of {sorted(SAMPLERS)}")
    check_nfe(sampler, nfe)
    check_guidance(model, cfg_scale, interval, adaptive_gamma)
    device = next(model.parameters()).device
    labels = labels.to(device)
    B = labels.shape[0]
    shape = (B, model.in_channels, *model.input_size)
    if sampler in PER_SAMPLE_SAMPLERS and B > 1:
        outs, nfes, evals = [], [], []
        for i in range(B):
            out, stats = sample_latents(model, labels[i:i + 1], sampler=sampler, nfe=nfe, cfg_scale=cfg_scale,
                                        interval=interval, adaptive_gamma=adaptive_gamma, grid_kind=grid_kind,
                                        generator=generator, **sampler_options)
            outs.append(out)
            nfes.append(stats["nfe"])
            evals.append(stats["network_evals"])
        # per-sample averages: each sample spent its own number of evaluations
        return torch.cat(outs), {"nfe": round(sum(nfes) / B), "network_evals": sum(evals) / B}
    if sampler == "ddpm":
        if sampler_options:
            raise ValueError(f"sampler 'ddpm' takes no sampler options, got {sorted(sampler_options)}")
        return _sample_ddpm(model, labels, nfe, cfg_scale, interval, adaptive_gamma, generator, shape)
    if not guides(cfg_scale, interval, adaptive_gamma):
        guided = None
        def net(x, t):
            return model(x, t, labels)
    else:
        guided = cfg_net(model, labels, model.null_label, cfg_scale, interval, gamma=adaptive_gamma)
        net = guided
    den = as_denoiser(net, model.path, model.prediction)
    from core.grids import lands_on_data, make_grid

    spec = SAMPLERS[sampler]
    final_zero = lands_on_data(model.path, True)
    steps = ADAPTIVE_GRID_STEPS if nfe is None else steps_for_nfe(sampler, nfe, final_zero=final_zero)
    grid = make_grid(grid_kind or spec.default_grid, model.path, steps, final_zero=final_zero)
    x = _start_noise(model, shape, grid, generator, device)
    out, used = sample(sampler, den, model.path, x, grid, generator=generator, **sampler_options)
    evals = guided.nfe if guided is not None else used
    return out, {"nfe": int(used), "network_evals": int(evals)}


def _sample_ddpm(model, labels, nfe, cfg_scale, interval, gamma, generator, shape):
    """DiT's sampler: ancestral steps of a DDPM respaced to ``nfe`` evenly spaced steps, with the learned
    variance; guidance mixes the eps channels only (the conditional variance is kept, as in DiT)."""
    if model.kind != "dit":
        raise ValueError("sampler 'ddpm' needs a DiT model (kind=dit); use a core sampler for SiT")
    T = model.ddpm.num_timesteps
    if not 1 <= nfe <= T:
        raise ValueError(f"nfe must be in [1, {T}] for the ddpm sampler, got {nfe}")
    kept = np.round(np.linspace(0, T - 1, nfe)).astype(int).tolist()
    proc = model.ddpm.respace(kept)
    C = model.in_channels
    learn_sigma = model.cfg.learn_sigma

    def raw(x, t, y):  # t: continuous times of the original steps; back to steps exactly
        steps = (t.double() * T).round().long() - 1
        return model(x, steps, y, raw=True)

    def cond(x, t):
        return raw(x, t, labels)

    def pair(x, t, mask):
        xs, ts = x[mask], t[mask]
        out = raw(torch.cat([x, xs]), torch.cat([t, ts]), torch.cat([labels, torch.full_like(labels[mask], model.null_label)]))
        c, u = out[: x.shape[0]], out[x.shape[0]:]
        if learn_sigma:  # guidance of eps only: give the uncond half the cond variance channels
            u = torch.cat([u[:, :C], c[mask][:, C:]], dim=1)
        return c, u

    guided = GuidedDenoiser(cond, pair, cfg_scale, interval, gamma, pair_calls=1)
    device = labels.device
    x = torch.randn(shape, generator=generator, device=device)
    for i in reversed(range(proc.num_timesteps)):
        step = torch.full((shape[0],), i, dtype=torch.long, device=device)
        t_cont = proc.continuous_time(step).to(device)
        out = guided(x, t_cont) if (cfg_scale != 1.0 or interval or gamma) else cond(x, t_cont)
        x = proc.p_sample(out, x, step, generator=generator, learn_sigma=learn_sigma)["sample"]
    evals = guided.nfe if (cfg_scale != 1.0 or interval or gamma) else proc.num_timesteps
    return x, {"nfe": proc.num_timesteps, "network_evals": int(evals)}


def to_uint8(x: Tensor) -> Tensor:
    """[-1, 1] images -> uint8 (:func:`image.data.from_model_range`: clamped, non-finite values rejected)."""
    from .data import from_model_range

    return from_model_range(x)


@torch.no_grad()
def generate(checkpoint_path, n_per_class: int, sampler: str = "euler", nfe: int | None = 20, cfg_scale: float = 1.0,
             seed: int = 0, *, interval=None, adaptive_gamma: float | None = None, classes=None,
             batch_size: int = 250, device: str | torch.device = "cpu", use_ema: bool = True,
             grid_kind: str | None = None, return_info: bool = False, model=None, **sampler_options):
    """``n_per_class`` samples of each class: ``(images uint8 (N, C, H, W), labels int64 (N,))``.

    Labels are ``repeat_interleave`` of the classes (all of the run's by default), so row ``k`` of
    a grid with ``n_per_class`` columns is class ``classes[k]``. Deterministic for a ``seed``
    (batches draw from one generator in order). ``return_info=True`` adds a dict with the sampler
    NFE, network evaluations and the run info. ``model``: an already loaded ``(model, info, codec)``.
    ``nfe=None`` for the adaptive samplers (dopri5, adaptive_sde; tolerances in ``sampler_options``).
    """
    if sampler != "ddpm" and sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler {sampler!r}; choose 'ddpm' or one of {sorted(SAMPLERS)}")
    check_nfe(sampler, nfe)
    if isinstance(n_per_class, bool) or not isinstance(n_per_class, int) or n_per_class < 1:
        raise ValueError(f"n_per_class must be a positive integer, got {n_per_class!r}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    net, info, codec = model if model is not None else load_run(checkpoint_path, use_ema, device)
    dev = next(net.parameters()).device
    classes = list(range(info["num_classes"])) if classes is None else [int(c) for c in classes]
    for c in classes:
        if not 0 <= c < info["num_classes"]:
            raise ValueError(f"class {c} is not in [0, {info['num_classes']})")
    labels = torch.tensor(classes, dtype=torch.long).repeat_interleave(n_per_class)
    g = torch.Generator(device=dev).manual_seed(int(seed))
    images, nfe_used, evals = [], 0, 0
    for start in range(0, len(labels), batch_size):
        y = labels[start:start + batch_size]
        z, stats = sample_latents(net, y, sampler=sampler, nfe=nfe, cfg_scale=cfg_scale, interval=interval,
                                  adaptive_gamma=adaptive_gamma, grid_kind=grid_kind, generator=g, **sampler_options)
        z = z / net.cfg.signal_scale
        x = codec.decode(z) if codec is not None else z
        images.append(to_uint8(x.float().cpu()))
        nfe_used, evals = stats["nfe"], evals + stats["network_evals"] * len(y)
    out = torch.cat(images), labels
    if return_info:
        return (*out, {"nfe": nfe_used, "network_evals_per_sample": evals / len(labels), "run": info})
    return out


def save_grid(images: Tensor, n_rows: int, path: str | Path) -> Path:
    """Write uint8 images ``(N, C, H, W)`` (C = 1 or 3) as a PNG grid of ``n_rows`` rows, 2-pixel gaps."""
    from PIL import Image

    if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"save_grid needs uint8 images (N, 1|3, H, W), got {images.dtype} {tuple(images.shape)}")
    N, C, H, W = images.shape
    cols = math.ceil(N / n_rows)
    pad = 2
    canvas = np.full((n_rows * (H + pad) + pad, cols * (W + pad) + pad, C), 255, dtype=np.uint8)
    arr = images.permute(0, 2, 3, 1).numpy()
    for i in range(N):
        r, c = divmod(i, cols)
        canvas[pad + r * (H + pad): pad + r * (H + pad) + H, pad + c * (W + pad): pad + c * (W + pad) + W] = arr[i]
    path = Path(path)
    fmt = image_format(path)
    img = Image.fromarray(canvas[..., 0] if C == 1 else canvas)
    atomic_write(path, lambda f: img.save(f, format=fmt))  # a kill mid-write leaves the old grid, not half a PNG
    return path


def image_format(path: str | Path) -> str:
    """PIL's format for ``path``'s extension (``PNG`` for ``.png``); ValueError naming an unknown one."""
    from PIL import Image

    path = Path(path)
    fmt = Image.registered_extensions().get(path.suffix.lower())
    if fmt is None:
        raise ValueError(f"{str(path)!r} has no image file extension PIL writes ({path.suffix!r}); use .png")
    return fmt


def sampler_table(checkpoint_path, samplers: list[str], nfes: list[int], n_per_class: int, cfg_scale: float,
                  seed: int = 0, out: str | Path | None = None, *, model=None, **kwargs) -> list[dict]:
    """Distance vs NFE: ``image.evaluate.evaluate_samples`` of ``n_per_class`` samples per class for every
    sampler and NFE budget (same seed, so the same starting noise); an adaptive sampler (dopri5,
    adaptive_sde) runs once, at its tolerances (``nfe_budget`` None). Sampler names and budgets are checked
    before the first evaluation. Rows go to ``out`` (CSV, rewritten atomically after every row) if given.
    ``model``: an already loaded ``(model, info, codec)``."""
    import time

    from .evaluate import evaluate_samples

    for name in samplers:  # every name before the first (long) evaluation
        if name != "ddpm" and name not in SAMPLERS:
            raise ValueError(f"unknown sampler {name!r}; choose 'ddpm' or one of {sorted(SAMPLERS)}")
        for nfe in [None] if is_adaptive(name) else nfes:
            check_nfe(name, nfe)
    loaded = model if model is not None else load_run(checkpoint_path, kwargs.pop("use_ema", True))
    kwargs.pop("use_ema", None)
    for name in samplers:  # budgets the model's path cannot run (e.g. heun below 3 NFE), also before any evaluation
        for nfe in [None] if is_adaptive(name) else nfes:
            check_budget(loaded[0], name, nfe)
    rows = []
    for name in samplers:
        for nfe in [None] if is_adaptive(name) else nfes:
            t0 = time.perf_counter()
            images, labels, info = generate(checkpoint_path, n_per_class, name, nfe, cfg_scale, seed, model=loaded,
                                            return_info=True, **kwargs)
            seconds = time.perf_counter() - t0
            data = loaded[1].get("data") or {}  # a folder run: its root, and its unreadable files skipped as in training
            metrics = evaluate_samples(images, labels, loaded[1]["dataset"], root=data.get("root"),
                                       on_error=data.get("on_error", "raise"))
            row = {"sampler": name, "nfe_budget": nfe, "nfe": info["nfe"],
                   "network_evals_per_sample": info["network_evals_per_sample"], "cfg_scale": cfg_scale,
                   "seconds": round(seconds, 2),
                   **{k: v for k, v in metrics.items() if isinstance(v, (int, float))}}
            rows.append(row)
            print(json.dumps(row), flush=True)
            if out is not None:  # after every row: the finished ones survive a later failure or a kill
                write_csv(rows, out)
    return rows


def write_csv(rows: list[dict], path: str | Path) -> Path:
    """``rows`` as a CSV (the union of their keys as the header), written atomically."""
    import csv
    import io

    buf = io.StringIO(newline="")
    w = csv.DictWriter(buf, fieldnames=list(dict.fromkeys(k for r in rows for k in r)))
    w.writeheader()
    w.writerows(rows)
    return atomic_write(path, lambda f: f.write(buf.getvalue().encode()))


def default_nfe(sampler: str, nfe: int | None) -> int | None:
    """The command lines' ``--nfe``: 20 when left out, except for an adaptive sampler (which takes none)."""
    return nfe if nfe is not None or is_adaptive(sampler) else 20


def parse_options(items: list[str]) -> dict:
    """``["rtol=1e-3", "w=g2"]`` -> ``{"rtol": 0.001, "w": "g2"}`` (values read as JSON, else kept as text)."""
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"--option takes KEY=VALUE, got {item!r}")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


def main(argv: list[str] | None = None) -> Path:
    p = argparse.ArgumentParser(prog="python -m image.sample", description=__doc__.split("\n\n")[0])
    p.add_argument("--run", required=True, help="run directory, checkpoint or ema_*.safetensors file")
    p.add_argument("--sampler", default="euler", help=f"'ddpm' (DiT) or a core sampler: {sorted(SAMPLERS)}")
    p.add_argument("--nfe", type=int, default=None,
                   help="NFE budget (default 20); leave it out for the adaptive samplers dopri5 and adaptive_sde, "
                        "whose cost follows their tolerances (--option)")
    p.add_argument("--cfg-scale", type=float, default=3.0)
    p.add_argument("--interval", type=float, nargs=2, default=None, metavar=("T_LO", "T_HI"))
    p.add_argument("--adaptive-gamma", type=float, default=None)
    p.add_argument("--per-class", type=int, default=8)
    p.add_argument("--grid-kind", default=None, help="time grid of core samplers (karras, uniform, logsnr)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-ema", action="store_true")
    p.add_argument("--out", default=None, help="PNG path (default <run>/samples/sample_<sampler>_<nfe>.png)")
    p.add_argument("--table", default=None, metavar="SAMPLERS",
                   help="comma-separated samplers: evaluate each at every --nfe-list budget (image.evaluate "
                        "metrics of --per-class samples per class) and write a CSV to --out")
    p.add_argument("--nfe-list", default="5,10,20,50")
    p.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                   help="a keyword option of the core sampler, e.g. rtol=1e-3 (dopri5), eps_rel=0.1 (adaptive_sde)")
    a = p.parse_args(argv)
    # Every flag is checked here, before the run loads and long before sampling, and named as typed.
    try:
        options = parse_options(a.option)
    except ValueError as e:
        p.error(str(e))
    flag = "--table" if a.table else "--sampler"
    names = [n.strip() for n in a.table.split(",")] if a.table else [a.sampler]
    for name in names:
        if name != "ddpm" and name not in SAMPLERS:
            p.error(f"{flag}: {name!r} is not a sampler; choose 'ddpm' or one of {sorted(SAMPLERS)}")
    if a.table:
        if a.nfe is not None:
            p.error("--nfe does not apply with --table: give the budgets as --nfe-list")
        try:
            nfes = [int(n) for n in a.nfe_list.split(",")]
        except ValueError:
            p.error(f"--nfe-list must be comma-separated integers, got {a.nfe_list!r}")
        if any(n < 1 for n in nfes):
            p.error(f"--nfe-list budgets must be >= 1, got {a.nfe_list!r}")
    else:
        a.nfe = default_nfe(a.sampler, a.nfe)
        if is_adaptive(a.sampler) and a.nfe is not None:
            p.error(f"--sampler {a.sampler} is adaptive: it takes no --nfe (its cost follows its tolerances, "
                    "e.g. --option rtol=1e-3 for dopri5, --option eps_rel=0.1 for adaptive_sde)")
        if a.nfe is not None and a.nfe < 1:
            p.error(f"--nfe must be >= 1, got {a.nfe}")
    if a.per_class < 1:
        p.error(f"--per-class must be >= 1, got {a.per_class}")
    if not (math.isfinite(a.cfg_scale) and a.cfg_scale >= 0):
        p.error(f"--cfg-scale must be a finite number >= 0 (1: no guidance), got {a.cfg_scale}")
    if a.interval is not None:
        lo, hi = a.interval
        if not (math.isfinite(lo) and math.isfinite(hi) and 0 <= lo < hi <= 1):
            p.error(f"--interval T_LO T_HI must satisfy 0 <= T_LO < T_HI <= 1, got {lo:g} {hi:g}")
    if a.adaptive_gamma is not None and not (math.isfinite(a.adaptive_gamma) and a.adaptive_gamma > 0):
        p.error(f"--adaptive-gamma must be a finite number > 0, got {a.adaptive_gamma}")
    from core.grids import GRIDS

    if a.grid_kind is not None and a.grid_kind not in GRIDS:
        p.error(f"--grid-kind {a.grid_kind!r} is not a grid; choose one of {sorted(GRIDS)}")
    for name in names:
        try:
            check_options(name, options, "--option")
        except ValueError as e:
            p.error(str(e))
    if a.out is not None:
        if Path(a.out).is_dir():
            p.error(f"--out {a.out!r} is a directory; give the path of the {'CSV' if a.table else 'PNG'} file to write")
        if not a.table:
            try:
                image_format(a.out)
            except ValueError as e:
                p.error(f"--out {e}")
    try:
        loaded = load_run(a.run, not a.no_ema)
    except ValueError as e:  # not an image.train run, weights that do not fit it, an unreadable checkpoint
        p.error(f"--run {a.run!r}: {e}")
    model = loaded[0]
    if "ddpm" in names and model.kind != "dit":
        p.error(f"{flag} ddpm needs a DiT run (model.kind=dit); {a.run!r} is a {model.kind!r} run: use a core sampler")
    for name in names:
        for nfe in [None] if is_adaptive(name) else (nfes if a.table else [a.nfe]):
            try:
                check_budget(model, name, nfe, "--nfe-list budget" if a.table else "--nfe")
            except ValueError as e:
                p.error(f"{flag} {name}: {e}")
    try:
        check_guidance(model, a.cfg_scale, a.interval, a.adaptive_gamma)
    except ValueError as e:
        p.error(f"--cfg-scale {a.cfg_scale:g} / --interval / --adaptive-gamma: {e}")
    run, _ = _run_dir(a.run)
    if a.table:
        out = Path(a.out) if a.out else run / "sampler_table.csv"
        sampler_table(a.run, names, nfes, a.per_class, a.cfg_scale, a.seed, out, model=loaded, interval=a.interval,
                      adaptive_gamma=a.adaptive_gamma, grid_kind=a.grid_kind, **options)
        return out
    images, labels, info = generate(a.run, a.per_class, a.sampler, a.nfe, a.cfg_scale, a.seed, model=loaded,
                                    interval=a.interval, adaptive_gamma=a.adaptive_gamma,
                                    grid_kind=a.grid_kind, return_info=True, **options)
    budget = "adaptive" if a.nfe is None else a.nfe
    out = Path(a.out) if a.out else run / "samples" / f"sample_{a.sampler}_nfe{budget}_cfg{a.cfg_scale:g}.png"
    n_rows = len(labels) // a.per_class
    save_grid(images, n_rows, out)
    print(json.dumps({"grid": str(out), "rows": n_rows, "sampler": a.sampler, "nfe": info["nfe"],
                      "network_evals_per_sample": info["network_evals_per_sample"], "cfg_scale": a.cfg_scale}))
    return out


if __name__ == "__main__":
    main()
