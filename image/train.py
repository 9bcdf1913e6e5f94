"""Training entry point of the image domain: class-conditional SiT and DiT, on pixels or latents.

    python -m image.train                                   # default: small SiT on Fashion-MNIST pixels
    python -m image.train model=dit trainer.out_dir=outputs/image/dit
    python -m image.train model.repa_weight=0.5 model.mask_ratio=0.5 ...       # training flags
    python -m image.train data.latent=outputs/image/ae model.patch_size=1      # on autoencoder latents
    python -m image.train data=folder data.root=my/images data.image_size=32  # your own images

Config groups (``configs/image/``): ``model`` (``sit`` | ``dit``: :class:`image.model.ImageModelConfig`),
``data`` (``fashion_mnist`` | ``mnist5k`` | ``digits`` | ``folder``: :class:`ImageDataConfig`),
``sampler`` (grids written during training and the final evaluation: :class:`ImageSamplerConfig`),
``trainer`` (``core.engine`` :class:`TrainerConfig`: EMA, checkpoints, resume).

The run directory gets ``run.json`` (everything :func:`image.sample.load_run` needs to rebuild the
model), ``samples/step_<step>.png`` grids (rows = classes, EMA weights) and, at the end of a run
with ``sampler.eval_per_class > 0``, ``eval.json`` from ``image.evaluate.evaluate_samples``
(class-consistency, Frechet distance, precision/recall in the evaluation classifier's features).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig

from core.engine.checkpoint import atomic_write
from core.engine.config import register_schema
from core.engine.run import hydra_entry, prepare
from core.engine.trainer import Trainer, seed_from

from .data import DATASET_NAMES as DATASETS
from .data import NATIVE_SHAPES
from .model import ImageDiffusion, ImageModelConfig, make_loss

log = logging.getLogger("polydiff.image")

@dataclass
class ImageDataConfig:
    name: str = "fashion_mnist"
    root: str | None = None  # folder of class sub-folders (name=folder) or a data directory
    image_size: int | None = None  # None: the data set's own size
    channels: int | None = None  # None: the data set's own (1 gray, 3 RGB)
    limit: int = 0  # > 0: use only the first `limit` training images (tests, quick runs)
    latent: str | None = None  # an image.train_autoencoder run or a diffusers AutoencoderKL folder
    latent_kind: str = "auto"  # auto | polydiff | diffusers
    latent_scale: float | None = None  # override the codec's scaling factor
    on_error: str = "raise"  # name=folder: raise on unreadable files (listing them) or skip them with a warning

    def validate(self) -> None:
        if self.name not in DATASETS:
            raise ValueError(f"data.name must be one of {list(DATASETS)}, got {self.name!r}")
        if self.name == "folder" and not self.root:
            raise ValueError("data.name=folder needs data.root (a folder with one sub-folder per class)")
        if self.root is not None and not Path(self.root).exists():
            raise ValueError(f"data.root does not exist: {self.root!r}")
        if self.image_size is not None and self.image_size < 4:
            raise ValueError(f"data.image_size must be >= 4, got {self.image_size!r}")
        if self.channels not in (None, 1, 3):
            raise ValueError(f"data.channels must be 1, 3 or null, got {self.channels!r}")
        if self.limit < 0:
            raise ValueError(f"data.limit must be >= 0, got {self.limit!r}")
        if self.on_error not in ("raise", "skip"):
            raise ValueError(f"data.on_error must be 'raise' or 'skip', got {self.on_error!r}")
        if self.latent_kind not in ("auto", "polydiff", "diffusers"):
            raise ValueError(f"data.latent_kind must be auto, polydiff or diffusers, got {self.latent_kind!r}")
        if self.latent is not None and not Path(self.latent).is_dir():
            raise ValueError(f"data.latent is not a directory: {self.latent!r}")
        if self.latent_scale is not None and not (math.isfinite(self.latent_scale) and self.latent_scale > 0):
            raise ValueError(f"data.latent_scale must be > 0, got {self.latent_scale!r}")
        codec = self.codec()
        channels = self.image_shape()[0]
        if codec is not None and channels is not None and channels != codec["image_channels"] \
                and not (codec["kind"] == "diffusers" and channels == 1):  # a diffusers VAE takes gray images too
            raise ValueError(f"data.latent={self.latent!r} encodes {codec['image_channels']}-channel images, but the "
                             f"{self.name} images are {channels}-channel (data.channels={self.channels!r})")

    def codec(self) -> dict | None:
        """``image.autoencoder.inspect_codec`` of ``data.latent`` (None without one): ValueError naming
        data.latent when it is not a usable codec (checked at start, before the images load)."""
        if self.latent is None:
            return None
        from .autoencoder import inspect_codec

        try:
            return inspect_codec(self.latent, self.latent_kind)
        except ValueError as e:
            raise ValueError(f"data.latent={self.latent!r} (data.latent_kind={self.latent_kind}) {e}") from None

    def image_shape(self) -> tuple[int | None, int | None]:
        """``(channels, side)`` of the images as loaded, from the config alone (None: known once a folder is read)."""
        native = NATIVE_SHAPES.get(self.name, (None, None))
        return self.channels or native[0], self.image_size or native[1]

    def input_side(self) -> tuple[int | None, str]:
        """Side of the model's input (pixels, or the codec's latents) from the config alone, and where it
        comes from, for messages; ``(None, ...)`` when only the loaded data tell (a folder without image_size)."""
        side = self.image_shape()[1]
        if side is None:
            return None, f"the images of data.root={self.root!r}"
        what = f"data.image_size={side}" if self.image_size is not None else f"the {self.name} images are {side}x{side}"
        codec = self.codec()
        if codec is None:
            return side, what
        lat = codec["latent_side"](side)
        return lat, f"{what}, whose latents under data.latent are {lat}x{lat}"

    def latent_spec(self) -> dict | None:
        if self.latent is None:
            return None
        kind = self.latent_kind
        if kind == "auto":
            kind = "polydiff" if (Path(self.latent) / "codec.json").is_file() else "diffusers"
        return {"kind": kind, "path": str(Path(self.latent).resolve()), "scale": self.latent_scale,
                "image_channels": self.channels}


@dataclass
class ImageSamplerConfig:
    sampler: str = "euler"  # a core sampler name (euler measured best at 5-20 NFE), or ddpm (DiT)
    nfe: int | None = 20  # NFE budget; null for the adaptive samplers (dopri5, adaptive_sde)
    cfg_scale: float = 3.0  # 1: no guidance (required for a model trained with class_dropout_prob=0)
    # keyword options of the core sampler, e.g. +sampler.options.rtol=1e-3 for dopri5 or
    # +sampler.options.eps_rel=0.1 for adaptive_sde (their cost follows these tolerances)
    options: dict[str, Any] = field(default_factory=dict)
    per_class: int = 8  # columns of the grids written every trainer.sample_every steps
    seed: int = 0
    eval_per_class: int = 100  # samples per class for the final evaluation (0: none)
    eval_batch: int = 250

    def validate(self) -> None:
        from core.samplers import SAMPLERS

        from .sample import check_nfe, check_options

        if self.sampler != "ddpm" and self.sampler not in SAMPLERS:
            raise ValueError(f"sampler.sampler must be 'ddpm' or one of {sorted(SAMPLERS)}, got {self.sampler!r}")
        check_nfe(self.sampler, self.nfe, what="sampler.nfe")
        if self.per_class < 1 or self.eval_per_class < 0 or self.eval_batch < 1:
            raise ValueError(f"sampler.per_class, eval_batch must be >= 1 and eval_per_class >= 0, got "
                             f"{self.per_class}, {self.eval_batch}, {self.eval_per_class}")
        check_options(self.sampler, dict(self.options), "sampler.options")
        if not self.cfg_scale >= 0:
            raise ValueError(f"sampler.cfg_scale must be >= 0, got {self.cfg_scale!r}")


register_schema("model", "image_model_schema", ImageModelConfig)
register_schema("data", "image_data_schema", ImageDataConfig)
register_schema("sampler", "image_sampler_schema", ImageSamplerConfig)


def load_training_images(cfg: ImageDataConfig, split: str = "train"):
    """``image.data.load_images`` of the data config, cut to ``limit``: an ImageSet (uint8 images)."""
    from .data import load_images

    kwargs = {"split": split, "root": cfg.root, "image_size": cfg.image_size, "channels": cfg.channels}
    if cfg.name == "folder":
        kwargs["on_error"] = cfg.on_error
    images = load_images(cfg.name, **kwargs)
    if cfg.limit and cfg.limit < len(images.labels):
        images = dataclasses.replace(images, images=images.images[: cfg.limit], labels=images.labels[: cfg.limit],
                                     files=images.files[: cfg.limit])  # empty for the fixed sets
    return images


def default_encoder(dataset_name: str, data_cfg: ImageDataConfig | None = None, spec: str = "classifier"):
    """The frozen encoder of REPA / VA-VAE: ``(fn(pixels in [-1, 1]) -> features, feature dim)``.

    ``spec="classifier"``: the evaluation classifier's spatial features
    (``image.classifier.load_or_train_classifier``); otherwise a TorchScript file taking [-1, 1] images.
    """
    if spec == "classifier":
        from .classifier import load_or_train_classifier

        kw = {}
        if data_cfg is not None:
            kw = {"root": data_cfg.root, "image_size": data_cfg.image_size, "channels": data_cfg.channels,
                  "on_error": data_cfg.on_error}
        clf = load_or_train_classifier(dataset_name, **kw)
        clf.eval()
        for p in clf.parameters():
            p.requires_grad_(False)

        def fn(x):
            return clf.features(x, spatial=True)
    else:
        if not Path(spec).is_file():
            raise ValueError(f"encoder {spec!r} is neither 'classifier' nor an existing TorchScript file")
        module = torch.jit.load(spec, map_location="cpu").eval()
        for p in module.parameters():
            p.requires_grad_(False)

        def fn(x):
            return module(x)
    return fn


def encoder_dim(fn, channels: int, size: tuple[int, int]) -> int:
    """Feature dimension of an encoder, read off one forward of a zero image."""
    with torch.no_grad():
        f = fn(torch.zeros(1, channels, *size))
    return int(f.shape[1] if f.ndim in (2, 4) else f.shape[-1])


def prepare_data(cfg: ImageDataConfig, need_pixels: bool = False):
    """``(tensors for the Trainer, info)``: (x, y) or (x, y, pixels), x in [-1, 1] pixels or scaled latents."""
    from .data import to_model_range

    images = load_training_images(cfg)
    pixels = to_model_range(images.images)
    info = {"dataset": cfg.name, "class_names": list(images.class_names), "num_classes": len(images.class_names),
            "image_channels": int(pixels.shape[1]), "image_size": list(pixels.shape[-2:]), "train_images": len(pixels)}
    spec = cfg.latent_spec()
    if spec is None:
        x = pixels
    else:
        from .autoencoder import load_codec

        codec = load_codec(spec)
        chunks = [codec.encode(pixels[i:i + 500]) for i in range(0, len(pixels), 500)]
        x = torch.cat(chunks).float()
        spec = {**spec, "scale": codec.scale, "image_channels": info["image_channels"]}
        log.info("encoded %d images to latents %s (scale %.4g, latent std after scaling %.3f)",
                 len(x), tuple(x.shape[1:]), codec.scale, float(x.std()))
    info["latent"] = spec
    info["input_size"] = list(x.shape[-2:])
    info["in_channels"] = int(x.shape[1])
    tensors = (x, images.labels.long())
    if need_pixels and spec is not None:
        tensors = (*tensors, pixels)
    return tensors, info


def make_sample_fn(sampler_cfg: ImageSamplerConfig, info: dict):
    """Write ``samples/step_<step>.png`` (rows = classes) with the EMA weights on rank 0."""
    from .sample import generate, save_grid

    def sample_fn(model: torch.nn.Module, step: int, out_dir: Path) -> None:
        net = getattr(model, "module", model)
        codec = None
        if info.get("latent"):
            from .autoencoder import load_codec

            codec = load_codec(info["latent"], device=next(net.parameters()).device)
        images, labels = generate(None, sampler_cfg.per_class, sampler_cfg.sampler, sampler_cfg.nfe,
                                  sampler_cfg.cfg_scale, seed_from(sampler_cfg.seed, step),
                                  model=(net, info, codec), batch_size=sampler_cfg.eval_batch,
                                  **dict(sampler_cfg.options))
        save_grid(images, info["num_classes"], Path(out_dir) / "samples" / f"step_{step:08d}.png")

    return sample_fn


def evaluate_run(out_dir: Path, sampler_cfg: ImageSamplerConfig, info: dict) -> dict | None:
    """Final evaluation of the run's EMA weights with ``image.evaluate.evaluate_samples`` -> ``eval.json``."""
    if sampler_cfg.eval_per_class <= 0:
        return None
    try:
        from .evaluate import evaluate_samples
    except ImportError as e:
        log.warning("image.evaluate is not available (%s): no final evaluation", e)
        return None
    from .sample import generate, save_grid

    t0 = time.perf_counter()
    images, labels, ginfo = generate(out_dir, sampler_cfg.eval_per_class, sampler_cfg.sampler, sampler_cfg.nfe,
                                     sampler_cfg.cfg_scale, sampler_cfg.seed, batch_size=sampler_cfg.eval_batch,
                                     return_info=True, **dict(sampler_cfg.options))
    seconds = time.perf_counter() - t0
    data = info.get("data") or {}
    metrics = evaluate_samples(images, labels, info["dataset"], root=data.get("root"),
                               on_error=data.get("on_error", "raise"))
    result = {"sampler": sampler_cfg.sampler, "nfe": ginfo["nfe"],
              "network_evals_per_sample": ginfo["network_evals_per_sample"], "cfg_scale": sampler_cfg.cfg_scale,
              "per_class": sampler_cfg.eval_per_class, "sampling_seconds": seconds,
              **{k: v for k, v in metrics.items() if isinstance(v, (int, float, str, list, dict))}}
    atomic_write(out_dir / "eval.json", lambda f: f.write(json.dumps(result, indent=1).encode()))
    save_grid(_first_per_class(images, labels, 10), info["num_classes"],
              out_dir / "samples" / "final.png")
    return result


def _first_per_class(images, labels, k):
    idx = torch.cat([torch.nonzero(labels == c).flatten()[:k] for c in labels.unique(sorted=True)])
    return images[idx]


def check_patch_size(model_cfg: ImageModelConfig, input_size: tuple[int, int], where: str) -> None:
    """ConfigError unless ``model.patch_size`` divides the model's input ``input_size`` (``where`` says whence)."""
    if any(n % model_cfg.patch_size for n in input_size):
        from core.engine.config import ConfigError

        divisors = [p for p in range(1, min(input_size) + 1) if all(n % p == 0 for n in input_size)]
        raise ConfigError(f"model.patch_size={model_cfg.patch_size} does not divide the model's "
                          f"{input_size[0]}x{input_size[1]} input ({where}): set model.patch_size to one of "
                          f"{divisors} or change data.image_size")


def train(cfg: DictConfig) -> dict:
    """Check ``cfg``, build data, model and loss, train with the engine, evaluate; returns the last metrics."""
    t_start = time.perf_counter()
    ctx = prepare(cfg, groups=("model", "data", "sampler"))
    model_cfg: ImageModelConfig = ctx.groups["model"]
    data_cfg: ImageDataConfig = ctx.groups["data"]
    sampler_cfg: ImageSamplerConfig = ctx.groups["sampler"]
    if sampler_cfg.sampler == "ddpm" and model_cfg.kind != "dit":
        from core.engine.config import ConfigError

        raise ConfigError("sampler.sampler=ddpm needs model.kind=dit")
    if sampler_cfg.cfg_scale != 1.0 and not model_cfg.class_dropout_prob > 0:
        from core.engine.config import ConfigError

        raise ConfigError(f"sampler.cfg_scale={sampler_cfg.cfg_scale} (classifier-free guidance) needs the null class "
                          f"that label dropout trains, but model.class_dropout_prob={model_cfg.class_dropout_prob}: "
                          "set sampler.cfg_scale=1 or model.class_dropout_prob > 0")
    side, where = data_cfg.input_side()
    if side is not None:
        check_patch_size(model_cfg, (side, side), where)
    out_dir = Path(ctx.trainer.out_dir).resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    tensors, info = prepare_data(data_cfg, need_pixels=model_cfg.repa_weight > 0)
    if side is None:  # a folder's images at their own size: known only now
        (h, w), (hi, wi) = info["input_size"], info["image_size"]
        where = f"the images of data.root={data_cfg.root!r} are {hi}x{wi}" + (f", their latents {h}x{w}"
                                                                                if info["latent"] else "")
        check_patch_size(model_cfg, (h, w), where)
    encoder, enc_dim = None, 0
    if model_cfg.repa_weight > 0:
        encoder = default_encoder(data_cfg.name, data_cfg, model_cfg.repa_encoder)
        pix = tensors[2] if len(tensors) > 2 else tensors[0]
        enc_dim = encoder_dim(encoder, pix.shape[1], tuple(pix.shape[-2:]))
    info["encoder_dim"] = enc_dim
    model = ImageDiffusion(model_cfg, tuple(info["input_size"]), info["in_channels"], info["num_classes"],
                           encoder_dim=enc_dim)
    # ema_decays in configured order: load_run picks the first (the trainer's own EMA), not the first by name
    info.update(model=dataclasses.asdict(model_cfg), data=dataclasses.asdict(data_cfg),
                parameters=sum(p.numel() for p in model.net.parameters()),
                ema_decays=[float(d) for d in ctx.trainer.ema_decays])
    trainer = Trainer(model, make_loss(model_cfg, encoder), torch.utils.data.TensorDataset(*tensors), ctx.trainer,
                      sample_fn=make_sample_fn(sampler_cfg, info), run_config=ctx.snapshot())
    trainer.resume()  # a refused resume (another model's checkpoint) stops before run.json is rewritten
    if trainer.is_main:
        atomic_write(out_dir / "run.json", lambda f: f.write(json.dumps(info, indent=1).encode()))
    result = trainer.fit()
    train_seconds = time.perf_counter() - t_start
    if trainer.is_main and trainer.step >= ctx.trainer.steps:
        from core.engine import distributed as D

        with D.local():  # rank 0 alone: training the evaluation classifier here must not wait for other ranks
            metrics = evaluate_run(out_dir, sampler_cfg, info)
        if metrics is not None:
            result["eval"] = metrics
    result["seconds"] = train_seconds
    if trainer.is_main:
        print(json.dumps({k: (str(v) if isinstance(v, Path) else v) for k, v in result.items()}), flush=True)
    return result


main = hydra_entry(train, Path(__file__).resolve().parents[1] / "configs" / "image")

if __name__ == "__main__":
    main()
