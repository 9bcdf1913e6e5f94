"""Latent space for image diffusion: a small KL autoencoder trained by polydiff, and diffusers' AutoencoderKL.

- :class:`KLAutoencoder`: the KL-regularised autoencoder of latent diffusion (Rombach et al. 2022,
  sec. 3 and appendix G), scaled down: two stride-2 stages (28x28 -> 7x7, 32x32 -> 8x8), a diagonal
  Gaussian posterior ``q(z | x)``, loss ``||x - D(z)||^2 + beta KL(q(z|x) || N(0, I))``.
  Optional VA-VAE latent alignment (Yao et al. 2025, seed 188, "Reconstruction vs. Generation",
  eq. 2-4): a 1x1 projection of the latent is aligned to a frozen encoder's features with the
  marginal cosine-similarity loss ``relu(1 - m1 - cos(z'_ij, f_ij))`` and the marginal
  distance-matrix loss ``relu(|cos(z'_i, z'_j) - cos(f_i, f_j)| - m2)`` averaged over positions.
- :class:`LatentCodec`: what the diffusion model sees: ``encode(x in [-1, 1]) -> (z - shift) * scale``
  and ``decode``. ``scale`` is the latent scaling factor (LDM: ``1 / std`` of the latents, so the
  diffusion runs on unit-variance data); for the polydiff autoencoder it is measured on the
  training data at the end of ``image.train_autoencoder``; for diffusers it is the model config's
  ``scaling_factor`` (and ``shift_factor`` where set).
- :func:`load_diffusers_vae`: a diffusers ``AutoencoderKL`` from a local folder (``save_pretrained``
  layout; never the network). One-channel images are repeated to the VAE's input channels and
  decoded images averaged back.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["AutoencoderConfig", "KLAutoencoder", "LatentCodec", "inspect_codec", "load_codec", "load_diffusers_vae",
           "alignment_loss", "make_autoencoder_loss"]


@dataclass
class AutoencoderConfig:
    """``configs/image/ae/*.yaml``."""

    latent_channels: int = 4
    channels: int = 32  # width of the first stage; the second has twice as many
    kl_weight: float = 1e-4
    sample_posterior: bool = True  # train the decoder on z ~ q(z|x) (else on its mean)
    align_weight: float = 0.0  # VA-VAE alignment to a frozen encoder (0 = off)
    align_margin_cos: float = 0.5  # m1
    align_margin_dist: float = 0.25  # m2
    align_encoder: str = "classifier"  # "classifier" | a TorchScript file

    def validate(self) -> None:
        for name in ("latent_channels", "channels"):
            if getattr(self, name) < 1:
                raise ValueError(f"ae.{name} must be >= 1, got {getattr(self, name)!r}")
        for name in ("kl_weight", "align_weight", "align_margin_cos", "align_margin_dist"):
            v = getattr(self, name)
            if not (math.isfinite(v) and v >= 0):
                raise ValueError(f"ae.{name} must be >= 0, got {v!r}")


def _norm(c: int) -> nn.GroupNorm:
    return nn.GroupNorm(min(8, c), c)


class ResBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int):
        super().__init__()
        self.n1, self.c1 = _norm(c_in), nn.Conv2d(c_in, c_out, 3, padding=1)
        self.n2, self.c2 = _norm(c_out), nn.Conv2d(c_out, c_out, 3, padding=1)
        self.skip = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else nn.Identity()

    def forward(self, x):
        h = self.c1(F.silu(self.n1(x)))
        return self.skip(x) + self.c2(F.silu(self.n2(h)))


class KLAutoencoder(nn.Module):
    """x (B, C, H, W) in [-1, 1] <-> z (B, latent_channels, ceil(H/4), ceil(W/4)); see module docstring."""

    def __init__(self, cfg: AutoencoderConfig, in_channels: int, encoder_dim: int = 0):
        super().__init__()
        cfg.validate()
        self.cfg, self.in_channels = cfg, in_channels
        c, z = cfg.channels, cfg.latent_channels
        self.encoder = nn.Sequential(
            nn.Conv2d(in_channels, c, 3, padding=1), ResBlock(c, c),
            nn.Conv2d(c, c, 3, stride=2, padding=1), ResBlock(c, 2 * c),
            nn.Conv2d(2 * c, 2 * c, 3, stride=2, padding=1), ResBlock(2 * c, 2 * c),
            _norm(2 * c), nn.SiLU(), nn.Conv2d(2 * c, 2 * z, 3, padding=1),
        )
        self.decoder_in = nn.Sequential(nn.Conv2d(z, 2 * c, 3, padding=1), ResBlock(2 * c, 2 * c))
        self.up1 = nn.Sequential(nn.Conv2d(2 * c, 2 * c, 3, padding=1), ResBlock(2 * c, c))
        self.up2 = nn.Sequential(nn.Conv2d(c, c, 3, padding=1), ResBlock(c, c))
        self.decoder_out = nn.Sequential(_norm(c), nn.SiLU(), nn.Conv2d(c, in_channels, 3, padding=1))
        self.align_proj = nn.Conv2d(z, encoder_dim, 1) if cfg.align_weight > 0 and encoder_dim > 0 else None
        if cfg.align_weight > 0 and encoder_dim < 1:
            raise ValueError("ae.align_weight > 0 needs the frozen encoder's feature dimension")

    def encode(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Posterior mean and log-variance, each (B, z, h, w); log-variance clamped as in LDM."""
        mean, logvar = self.encoder(x).chunk(2, dim=1)
        return mean, logvar.clamp(-30.0, 20.0)

    def decode(self, z: Tensor, size: tuple[int, int]) -> Tensor:
        """z (B, z, h, w) -> (B, C, *size); nearest upsampling to the stage sizes of ``size``."""
        H, W = size
        mid = ((H + 1) // 2, (W + 1) // 2)
        h = self.decoder_in(z)
        h = self.up1(F.interpolate(h, size=mid, mode="nearest"))
        h = self.up2(F.interpolate(h, size=(H, W), mode="nearest"))
        return self.decoder_out(h)

    def forward(self, x: Tensor, generator: torch.Generator | None = None):
        mean, logvar = self.encode(x)
        z = mean
        if self.cfg.sample_posterior and self.training:
            z = mean + torch.exp(0.5 * logvar) * torch.randn(mean.shape, generator=generator, device=mean.device)
        return self.decode(z, tuple(x.shape[-2:])), mean, logvar, z


def alignment_loss(z_proj: Tensor, features: Tensor, m1: float, m2: float) -> tuple[Tensor, Tensor]:
    """VA-VAE's marginal cosine-similarity and distance-matrix losses (Yao et al. 2025, eq. 2-3), (B,) each.

    z_proj, features: (B, N, D) on the same token grid.
    """
    cos = F.cosine_similarity(z_proj, features, dim=-1)  # (B, N)
    l_mcos = F.relu(1 - m1 - cos).mean(dim=1)
    zn, fn = F.normalize(z_proj, dim=-1), F.normalize(features, dim=-1)
    dz, df = zn @ zn.transpose(1, 2), fn @ fn.transpose(1, 2)  # (B, N, N)
    l_mdms = F.relu((dz - df).abs() - m2).mean(dim=(1, 2))
    return l_mcos, l_mdms


def make_autoencoder_loss(cfg: AutoencoderConfig, encoder=None):
    """``loss_fn(model, batch, generator) -> {"loss", "rec", "kl", ["align"]}``; batch ``(x, y)`` in [-1, 1]."""
    if cfg.align_weight > 0 and encoder is None:
        raise ValueError("ae.align_weight > 0 needs a frozen encoder")

    def loss_fn(model, batch, generator=None):
        from .model import tokens_of_features

        x = batch[0].float()
        rec, mean, logvar, z = model(x, generator)
        m: KLAutoencoder = getattr(model, "module", model)
        l_rec = (rec - x).pow(2).flatten(1).mean(1)
        # KL(N(mean, var) || N(0, 1)) per latent element, averaged
        kl = 0.5 * (mean.pow(2) + logvar.exp() - 1.0 - logvar).flatten(1).mean(1)
        out = {"rec": l_rec.mean(), "kl": kl.mean()}
        loss = l_rec + cfg.kl_weight * kl
        if cfg.align_weight > 0:
            with torch.no_grad():
                feats = tokens_of_features(encoder(x).float(), tuple(z.shape[-2:]))
            zp = m.align_proj(z).flatten(2).transpose(1, 2)
            l_mcos, l_mdms = alignment_loss(zp, feats, cfg.align_margin_cos, cfg.align_margin_dist)
            out["align"] = (l_mcos + l_mdms).mean()
            loss = loss + cfg.align_weight * (l_mcos + l_mdms)
        out["loss"] = loss.mean()
        return out

    return loss_fn


class LatentCodec(nn.Module):
    """Images in [-1, 1] <-> scaled latents: ``encode`` returns ``(z - shift) * scale``."""

    def __init__(self, encode_fn, decode_fn, scale: float, shift: float = 0.0, latent_shape=None, modules=()):
        super().__init__()
        if not (math.isfinite(scale) and scale > 0):
            raise ValueError(f"latent scaling factor must be a positive number, got {scale!r}")
        self._encode, self._decode = encode_fn, decode_fn
        self.scale, self.shift = float(scale), float(shift)
        self.latent_shape = latent_shape
        self.parts = nn.ModuleList(modules)

    @torch.no_grad()
    def encode(self, x: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """x (B, C, H, W) in [-1, 1] -> scaled latents; the posterior mean unless a generator is given."""
        return (self._encode(x, generator) - self.shift) * self.scale

    @torch.no_grad()
    def decode(self, z: Tensor) -> Tensor:
        return self._decode(z / self.scale + self.shift)


def polydiff_codec(run_dir: str | Path, device="cpu", use_ema: bool = True, scale: float | None = None) -> LatentCodec:
    """The autoencoder of an ``image.train_autoencoder`` run (its ``codec.json`` holds the scale).

    The weights are the EMA of the first of the run's ``trainer.ema_decays`` (the one the recorded
    scale was measured on). ``scale`` overrides the recorded scaling factor.
    """
    from .sample import _weights

    run = Path(run_dir)
    meta_path = run / "codec.json"
    if not meta_path.is_file():
        raise ValueError(f"{run} has no codec.json: not a finished image.train_autoencoder run")
    meta = json.loads(meta_path.read_text())
    cfg = AutoencoderConfig(**meta["ae"])
    ae = KLAutoencoder(cfg, meta["image_channels"], meta.get("encoder_dim", 0))
    ae.load_state_dict(_weights(run, None, use_ema, meta.get("ema_decays")))
    ae.to(device).eval()
    size = tuple(meta["image_size"])

    def enc(x, generator=None):
        mean, logvar = ae.encode(x)
        if generator is None:
            return mean
        return mean + torch.exp(0.5 * logvar) * torch.randn(mean.shape, generator=generator, device=mean.device)

    def dec(z):
        return ae.decode(z, size).clamp(-1, 1)

    s = float(meta["scale"] if scale is None else scale)
    return LatentCodec(enc, dec, s, 0.0, tuple(meta["latent_shape"]), [ae])


def load_diffusers_vae(folder: str | Path, image_channels: int | None = None, device="cpu",
                       scale: float | None = None) -> LatentCodec:
    """A diffusers ``AutoencoderKL`` saved with ``save_pretrained`` in ``folder`` (read locally only).

    ``scale`` overrides the config's ``scaling_factor``. With ``image_channels=1`` and a 3-channel VAE
    the gray image is repeated to RGB and decoded images averaged over channels.
    """
    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise ValueError(f"{folder} holds no config.json: not a diffusers model folder")
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(str(folder), local_files_only=True).to(device).eval()
    vae_channels = vae.config.in_channels
    ch = vae_channels if image_channels is None else image_channels
    if ch not in (vae_channels, 1):
        raise ValueError(f"images with {ch} channels cannot feed a VAE with {vae_channels} input channels")
    s = float(vae.config.scaling_factor if scale is None else scale)
    shift = float(getattr(vae.config, "shift_factor", None) or 0.0)

    def enc(x, generator=None):
        if x.shape[1] != vae_channels:
            x = x.expand(-1, vae_channels, -1, -1)
        dist = vae.encode(x).latent_dist
        return dist.mode() if generator is None else dist.sample(generator)

    def dec(z):
        out = vae.decode(z).sample.clamp(-1, 1)
        return out.mean(dim=1, keepdim=True) if ch == 1 and vae_channels != 1 else out

    return LatentCodec(enc, dec, s, shift, None, [vae])


def inspect_codec(path: str | Path, kind: str = "auto") -> dict:
    """What the codec folder ``path`` holds, read from its JSON alone (no weights loaded, nothing imported):
    ``{"kind": "polydiff" | "diffusers", "image_channels": what it encodes (a diffusers VAE also takes gray
    images), "latent_side": fn(image side) -> latent side}``. ``kind="auto"``: polydiff where there is a
    ``codec.json``, else diffusers. Raises ValueError saying why the folder is not a usable codec (the
    sentence follows its path)."""
    import importlib.util

    from core.engine.checkpoint import first_ema_export, list_checkpoints

    folder = Path(path)
    if not folder.is_dir():
        raise ValueError("is not a directory")
    codec_json, config_json = folder / "codec.json", folder / "config.json"
    if kind == "auto":
        if not codec_json.is_file() and not config_json.is_file():
            run = " (its run.json is a diffusion training run's)" if (folder / "run.json").is_file() else ""
            raise ValueError(f"is neither a finished image.train_autoencoder run (no codec.json) nor a diffusers "
                             f"AutoencoderKL folder (no config.json){run}")
        kind = "polydiff" if codec_json.is_file() else "diffusers"
    meta_path = codec_json if kind == "polydiff" else config_json
    if not meta_path.is_file():
        raise ValueError("has no codec.json: not a finished image.train_autoencoder run" if kind == "polydiff" else
                         "holds no config.json: not a diffusers model folder")
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"has an unreadable {meta_path.name}: {e}") from None
    if not isinstance(meta, dict):
        raise ValueError(f"has a {meta_path.name} that holds no settings (a JSON object)")
    if kind == "polydiff":
        missing = [k for k in ("ae", "image_channels", "image_size", "latent_shape", "scale") if k not in meta]
        if missing:
            raise ValueError(f"has a codec.json without {missing}: not written by image.train_autoencoder")
        try:
            AutoencoderConfig(**meta["ae"]).validate()
        except (TypeError, ValueError) as e:
            raise ValueError(f"has a codec.json whose autoencoder settings do not build: {e}") from None
        if first_ema_export(folder, meta.get("ema_decays")) is None and not list_checkpoints(folder / "checkpoints"):
            raise ValueError("has a codec.json but no exported weights and no checkpoint")
        return {"kind": kind, "image_channels": int(meta["image_channels"]),
                "latent_side": lambda side: -(-side // 4)}  # two stride-2 stages of KLAutoencoder
    if meta.get("_class_name", "AutoencoderKL") != "AutoencoderKL":
        raise ValueError(f"holds a config.json of a {meta['_class_name']!r}, not of a diffusers AutoencoderKL")
    if importlib.util.find_spec("diffusers") is None:
        raise ValueError("is a diffusers AutoencoderKL folder, but the diffusers package is not installed")
    stages = len(meta.get("block_out_channels") or (64,))  # AutoencoderKL's default: one block, no downsampling
    return {"kind": kind, "image_channels": int(meta.get("in_channels", 3)),
            "latent_side": lambda side: side // 2 ** (stages - 1)}  # each Downsample2D halves, rounding down


def load_codec(spec: dict, device="cpu") -> LatentCodec:
    """A codec from a run's ``latent`` entry: ``{"kind": "polydiff" | "diffusers", "path": ..., ...}``.

    ``spec["scale"]`` (``data.latent_scale``, or the scale a run recorded) overrides the codec's own
    scaling factor for both kinds; None keeps it.
    """
    kind, path = spec.get("kind"), spec.get("path")
    if kind == "polydiff":
        return polydiff_codec(path, device, scale=spec.get("scale"))
    if kind == "diffusers":
        return load_diffusers_vae(path, spec.get("image_channels"), device, spec.get("scale"))
    raise ValueError(f"unknown latent codec kind {kind!r}; expected 'polydiff' or 'diffusers'")
