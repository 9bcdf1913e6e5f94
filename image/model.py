"""Class-conditional image diffusion on the DiT network: the SiT and DiT training objectives.

- **SiT** (Ma et al. 2024, seed 2): velocity prediction on the linear (``alpha = 1 - t, sigma = t``)
  or GVP (``alpha = cos(pi t / 2), sigma = sin(pi t / 2)``) interpolant, trained with
  :func:`core.losses.denoising_loss` (flow matching, SiT eq. 6 in polydiff's time). The network is
  fed SiT's time ``1 - t`` (data at 1) and its output is negated, so that an official SiT
  checkpoint (``image.convert``) is a polydiff velocity model without retraining.
- **DiT** (Peebles & Xie 2023, seed 30): eps prediction with learned variance under the discrete
  DDPM of :mod:`core.ddpm` (IDDPM hybrid loss ``L_simple + L_vlb``, Nichol & Dhariwal 2021 eq. 16).
  For the core samplers the DDPM is read as a continuous VP path: at polydiff time ``t`` the
  network is evaluated at the fractional DDPM step whose log-SNR equals the path's
  (:meth:`ImageDiffusion.dit_steps`), so a sampler that puts ``x_t`` at the path's noise level asks
  the network at the same noise level it was trained on.

Training improvements, each behind a flag of :class:`ImageModelConfig` (all off by default):

- ``long_skip``: U-ViT long skips (Bao et al. 2023; seed 1 "Exploring Vision Transformers as
  Diffusion Learners"): shallow block ``i`` feeds deep block ``depth - 1 - i`` through concat + Linear.
- ``mask_ratio``: MDT (Gao et al. 2023, seed 94): the encoder blocks see a random ``1 - mask_ratio``
  of the patches, a side-interpolator fills the masked ones before the last ``mask_decoder_depth``
  blocks; the loss is taken on all pixels. ``mask_full_pass`` adds the unmasked loss of the same
  batch (MDTv2's two passes).
- ``repa_weight``: REPA (Yu et al. 2024, seed 53, eq. 8): ``-cos(h_phi(h_k), y)`` between an MLP
  projection of the tokens after block ``repa_block`` and a frozen encoder's features of the clean
  image (resampled to the token grid), averaged over tokens, added with weight ``lambda``.
- ``route_ratio``: TREAD (Krause et al. 2025, seed 33): in training a random ``route_ratio`` of the
  tokens bypasses blocks ``[route_start, route_end)`` and is re-inserted after them.
- ``weighting``: ``min_snr`` (Hang et al. 2023) or ``p2`` (Choi et al. 2022, seed 159, eq. 8) from
  :mod:`core.losses`; for DiT the same weights are put on the eps-MSE at the DDPM step's SNR.
- FasterDiT (Yao et al. 2024, seed 51): ``time_sampler=logit_normal`` (their SNR-PDF view: a
  lognormal PDF of the SNR, on the linear path a logit-normal ``t``), ``signal_scale`` (the data
  std they vary to move the SNR PDF: the model is trained on ``signal_scale * x0`` and samples are
  divided by it) and ``direction_loss`` (their velocity direction supervision, a cosine loss between
  predicted and target velocity added to the MSE). Their ImageNet-specific schedule of these knobs
  does not transfer as numbers; the knobs do.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from core.ddpm import DiscreteDDPM, cosine_betas, linear_betas
from core.losses import denoising_loss, get_time_sampler, get_weighting
from core.paths import CosinePath, GaussianPath, VPPath, get_path

from .dit import DiT

KINDS = ("sit", "dit")
SIT_PATHS = ("linear", "gvp")
WEIGHTINGS = (None, "min_snr", "p2")


@dataclass
class ImageModelConfig:
    """The network and its training objective (``configs/image/model/*.yaml``)."""

    kind: str = "sit"  # sit (velocity, linear/GVP interpolant) | dit (eps + learned variance, DDPM)
    patch_size: int = 4
    hidden_size: int = 192
    depth: int = 6
    num_heads: int = 3
    mlp_ratio: float = 4.0
    class_dropout_prob: float = 0.1
    qk_norm: str | None = None
    # SiT
    path: str = "linear"  # linear | gvp
    # DiT
    diffusion_steps: int = 1000
    beta_schedule: str = "linear"  # linear | cosine
    learn_sigma: bool = True
    # loss weighting and training times
    weighting: str | None = None  # None (the objective's own) | min_snr | p2
    min_snr_gamma: float = 5.0
    p2_k: float = 1.0
    p2_gamma: float = 1.0
    time_sampler: str = "uniform"  # uniform | logit_normal (SiT only)
    logit_mean: float = 0.0
    logit_std: float = 1.0
    # FasterDiT
    direction_loss: float = 0.0
    signal_scale: float = 1.0
    # U-ViT
    long_skip: bool = False
    # MDT
    mask_ratio: float = 0.0
    mask_decoder_depth: int = 2
    side_interpolator_depth: int = 1
    mask_full_pass: bool = True
    # REPA
    repa_weight: float = 0.0
    repa_block: int = 2
    repa_proj_dim: int = 256
    repa_encoder: str = "classifier"  # "classifier" (the evaluation classifier) | a TorchScript file
    # TREAD
    route_ratio: float = 0.0
    route_start: int = 1
    route_end: int = -1  # -1: depth - 1

    def validate(self) -> None:
        def bad(name, why):
            raise ValueError(f"model.{name}={getattr(self, name)!r}: {why}")

        if self.kind not in KINDS:
            bad("kind", f"must be one of {list(KINDS)}")
        if self.path not in SIT_PATHS:
            bad("path", f"must be one of {list(SIT_PATHS)}")
        if self.beta_schedule not in ("linear", "cosine"):
            bad("beta_schedule", "must be 'linear' or 'cosine'")
        for name in ("patch_size", "hidden_size", "depth", "num_heads", "repa_proj_dim"):
            if getattr(self, name) < 1:
                bad(name, "must be >= 1")
        if self.hidden_size % self.num_heads:
            bad("hidden_size", f"must be divisible by num_heads={self.num_heads}")
        if self.diffusion_steps < 2:
            bad("diffusion_steps", "must be >= 2")
        if self.weighting not in WEIGHTINGS:
            bad("weighting", f"must be one of {list(WEIGHTINGS)}")
        if self.time_sampler not in ("uniform", "logit_normal"):
            bad("time_sampler", "must be 'uniform' or 'logit_normal'")
        if self.kind == "dit" and self.time_sampler != "uniform":
            bad("time_sampler", "DiT trains on uniform integer DDPM steps; use kind=sit for logit_normal")
        if self.kind == "dit" and self.direction_loss > 0:
            bad("direction_loss", "is a velocity loss (FasterDiT); it needs kind=sit")
        for name in ("min_snr_gamma", "p2_k", "p2_gamma", "logit_std", "signal_scale"):
            if not (math.isfinite(getattr(self, name)) and getattr(self, name) > 0):
                bad(name, "must be a positive number")
        if not math.isfinite(self.logit_mean):  # checked whatever time_sampler is: a nan is a typo
            bad("logit_mean", "must be a finite number")
        for name in ("direction_loss", "repa_weight"):
            if not (math.isfinite(getattr(self, name)) and getattr(self, name) >= 0):
                bad(name, "must be >= 0")
        if self.repa_weight > 0:
            if not 1 <= self.repa_block <= self.depth:
                bad("repa_block", f"must be in [1, depth={self.depth}]")
            if self.route_ratio > 0 and self.route_start < self.repa_block <= self.route_end_index:
                bad("repa_block", f"lies in the TREAD route span [{self.route_start}, {self.route_end_index}); "
                                  "its tokens would be a subset")
        if self.mask_ratio > 0 and self.side_interpolator_depth < 0:
            bad("side_interpolator_depth", "must be >= 0")
        # the transformer checks its values (mlp_ratio, class_dropout_prob, mask/route/long-skip and their
        # combinations), named here by their model.* keys
        self.transformer_options()
        # the loss's own builders, as make_loss calls them (a rule of theirs this method lacks still fails here)
        try:
            if self.kind == "sit" and self.time_sampler == "logit_normal":
                get_time_sampler("logit_normal", m=self.logit_mean, s=self.logit_std)
            _core_weighting(self)
        except ValueError as e:
            raise ValueError(f"model (time_sampler={self.time_sampler!r}, weighting={self.weighting!r}): {e}") from None

    @property
    def route_end_index(self) -> int:
        return self.depth - 1 if self.route_end == -1 else self.route_end

    def transformer_options(self) -> dict:
        """Keyword arguments of :class:`image.dit.DiT` beyond the shapes and ``mlp_ratio`` /
        ``class_dropout_prob``; all of them are checked here by the TransformerConfig the DiT builds, whose
        errors name the ``model.*`` keys."""
        from core.nn.transformer import TransformerConfig

        opts = {"qk_norm": self.qk_norm, "long_skip": self.long_skip}
        if self.mask_ratio > 0:
            opts.update(mask_ratio=self.mask_ratio, mask_decoder_depth=self.mask_decoder_depth)
        if self.route_ratio > 0:
            opts.update(route_ratio=self.route_ratio, route_start=self.route_start, route_end=self.route_end_index)
        try:
            TransformerConfig(dim=self.hidden_size, depth=self.depth, num_heads=self.num_heads,
                              mlp_ratio=self.mlp_ratio, class_dropout_prob=self.class_dropout_prob, **opts)
        except ValueError as e:
            raise ValueError(_model_keys(str(e))) from None
        return opts


# TransformerConfig fields whose model.* key has another name (route_end: the index, -1 resolved)
_TRANSFORMER_KEYS = {"dim": "hidden_size"}


def _model_keys(message: str) -> str:
    """A TransformerConfig error with its field names as the ``model.*`` keys that set them."""
    return re.sub(r"TransformerConfig\.(\w+)", lambda m: f"model.{_TRANSFORMER_KEYS.get(m.group(1), m.group(1))}",
                  message)


def dit_process(cfg: ImageModelConfig) -> DiscreteDDPM:
    betas = linear_betas(cfg.diffusion_steps) if cfg.beta_schedule == "linear" else cosine_betas(cfg.diffusion_steps)
    return DiscreteDDPM(betas)


class ImageDiffusion(nn.Module):
    """DiT network + objective. ``forward(x, t, y)`` returns the model's prediction in polydiff time.

    ``prediction`` is ``"velocity"`` (SiT) or ``"eps"`` (DiT: the first ``C`` channels; the learned
    variance is read by the DDPM sampler through ``forward(..., raw=True)``). ``path`` is the Gaussian path the
    core samplers integrate. ``null_label`` is the class index of the unconditional model.
    """

    def __init__(self, cfg: ImageModelConfig, input_size: tuple[int, int], in_channels: int, num_classes: int,
                 encoder_dim: int = 0):
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        self.kind = cfg.kind
        self.num_classes = num_classes
        self.in_channels = in_channels
        self.input_size = tuple(input_size)
        self.net = DiT(input_size=self.input_size, patch_size=cfg.patch_size, in_channels=in_channels,
                       hidden_size=cfg.hidden_size, depth=cfg.depth, num_heads=cfg.num_heads, mlp_ratio=cfg.mlp_ratio,
                       class_dropout_prob=cfg.class_dropout_prob, num_classes=num_classes,
                       learn_sigma=cfg.kind == "dit" and cfg.learn_sigma,
                       side_interpolator_depth=cfg.side_interpolator_depth if cfg.mask_ratio > 0 else 0,
                       **cfg.transformer_options())
        # REPA projector h_phi: a 3-layer MLP with SiLU (Yu et al. 2024, sec. 3.2)
        self.projector = None
        if cfg.repa_weight > 0:
            if encoder_dim < 1:
                raise ValueError(f"model.repa_weight > 0 needs the encoder's feature dimension, got {encoder_dim}")
            D = cfg.hidden_size
            self.projector = nn.Sequential(nn.Linear(D, cfg.repa_proj_dim), nn.SiLU(),
                                           nn.Linear(cfg.repa_proj_dim, cfg.repa_proj_dim), nn.SiLU(),
                                           nn.Linear(cfg.repa_proj_dim, encoder_dim))
        if cfg.kind == "sit":
            self.prediction = "velocity"
            self.path: GaussianPath = get_path(cfg.path)
            self.ddpm = None
        else:
            self.prediction = "eps"
            self.ddpm = dit_process(cfg)
            # The continuous-time limit of the schedule (VP-SDE beta 0.1..20 is DDPM's linear
            # schedule as T -> inf; IDDPM's cosine schedule is the cosine path).
            self.path = VPPath() if cfg.beta_schedule == "linear" else CosinePath()
            ac = self.ddpm.alphas_cumprod
            self.register_buffer("_ddpm_log_snr", torch.log(ac / (1 - ac)), persistent=False)

    @property
    def null_label(self) -> int:
        return self.num_classes

    @property
    def has_null_class(self) -> bool:
        """Whether the label table has the null-class row of classifier-free guidance (it has one only
        when the model was trained with label dropout, ``class_dropout_prob > 0``)."""
        return self.cfg.class_dropout_prob > 0

    # ------------------------------------------------------------------ time maps
    def dit_steps(self, t: Tensor) -> Tensor:
        """Fractional DDPM steps (B,) whose log-SNR equals ``path.log_snr(t)`` (piecewise linear in the
        step between table entries, clamped to ``[0, T-1]``)."""
        lam = self.path.log_snr(t.double().clamp(self.path.t_min, self.path.t_max))
        table = self._ddpm_log_snr.double().cpu().numpy()[::-1]  # increasing for np.interp
        steps = np.arange(len(table), dtype=np.float64)[::-1]
        s = np.interp(lam.detach().cpu().numpy(), table, steps)
        return torch.as_tensor(s, dtype=torch.float32, device=t.device)

    def network_time(self, t: Tensor) -> Tensor:
        """polydiff t (data at 0) -> what the network's time embedder takes."""
        return 1 - t if self.kind == "sit" else self.dit_steps(t)

    # ------------------------------------------------------------------ outputs
    def forward(self, x: Tensor, t: Tensor, y: Tensor, *, raw: bool = False, **kw):
        """Prediction (velocity for SiT, eps for DiT) at polydiff times ``t`` (B,), labels ``y`` (B,).

        ``raw=True``: ``t`` goes to the network unchanged (DDPM steps for DiT) and the raw output
        (with DiT's variance channels) is returned. Other keywords go to :meth:`DiT.forward`; with
        ``return_hidden`` the result is ``(output, hidden tokens)``.
        """
        if not raw:
            t = t.to(x.dtype) if t.is_floating_point() else t.float()
            t = self.network_time(t)
        out = self.net(x, t, y, **kw)
        hidden = None
        if kw.get("return_hidden") is not None:
            out, hidden = out
        if not raw:
            out = self._head(out)
        return out if hidden is None else (out, hidden)

    def _head(self, out: Tensor) -> Tensor:
        if self.kind == "sit":
            return -out  # SiT's velocity points to data at t=1; polydiff's to noise at t=1
        return out[:, : self.in_channels]


# ---------------------------------------------------------------------------------------------- loss


def _dit_eps_weight(cfg: ImageModelConfig, log_snr: Tensor) -> Tensor | None:
    """Weight on DiT's eps-MSE for ``cfg.weighting`` at the DDPM step's SNR (None: unweighted).

    min-SNR is defined on the x0-MSE (= eps-MSE / SNR), so on eps it is ``min(SNR, gamma) / SNR``;
    P2 is defined on the eps-MSE (Choi et al. eq. 8). Parameters come from core.losses' weighting.
    """
    if cfg.weighting is None:
        return None
    snr = log_snr.exp()
    if cfg.weighting == "min_snr":
        gamma = get_weighting("min_snr", gamma=cfg.min_snr_gamma).params["gamma"]
        return snr.clamp(max=gamma) / snr
    w = get_weighting("p2", k=cfg.p2_k, gamma=cfg.p2_gamma)
    return (w.params["k"] + snr) ** (-w.params["gamma"])


def _core_weighting(cfg: ImageModelConfig):
    if cfg.weighting == "min_snr":
        return get_weighting("min_snr", gamma=cfg.min_snr_gamma)
    if cfg.weighting == "p2":
        return get_weighting("p2", k=cfg.p2_k, gamma=cfg.p2_gamma)
    return None


def repa_loss(projected: Tensor, target: Tensor) -> Tensor:
    """REPA (Yu et al. 2024, eq. 8): ``-mean_n cos(projected_n, target_n)`` per sample, (B,).

    projected, target: (B, N, D_e)."""
    return -F.cosine_similarity(projected, target, dim=-1).mean(dim=1)


def tokens_of_features(features: Tensor, grid: tuple[int, int]) -> Tensor:
    """Encoder features -> (B, N, D_e) on the model's token grid (row-major, as ``DiT.patchify``).

    (B, D_e, h, w) maps are resampled to the grid (area / bilinear); (B, N', D_e) tokens are taken as a
    square map; (B, D_e) global features are repeated over the tokens.
    """
    if features.ndim == 2:
        return features[:, None, :].expand(-1, grid[0] * grid[1], -1)
    if features.ndim == 3:
        n = features.shape[1]
        side = int(round(math.sqrt(n)))
        if side * side != n:
            raise ValueError(f"encoder tokens (B, {n}, D) do not form a square map")
        features = features.transpose(1, 2).reshape(features.shape[0], -1, side, side)
    if features.ndim != 4:
        raise ValueError(f"encoder features must be (B, D), (B, N, D) or (B, D, h, w), got {tuple(features.shape)}")
    if tuple(features.shape[-2:]) != tuple(grid):
        features = F.interpolate(features, size=grid, mode="bilinear", align_corners=False)
    return features.flatten(2).transpose(1, 2)


def make_loss(cfg: ImageModelConfig, encoder: Callable[[Tensor], Tensor] | None = None):
    """``loss_fn(model, batch, generator) -> {"loss", "mse", ...}`` for :class:`core.engine.Trainer`.

    ``batch`` is ``(x0, y)`` or ``(x0, y, pixels)``: ``x0`` (B, C, H, W) in the model's space (pixels
    in [-1, 1] or scaled latents), ``y`` (B,) labels; ``pixels`` (B, C', H', W') in [-1, 1] is what a
    REPA ``encoder`` sees when ``x0`` is latent (else it sees ``x0``). ``encoder(pixels)`` returns
    frozen features (see :func:`tokens_of_features`); it is called under ``no_grad``.
    """
    cfg.validate()
    if cfg.repa_weight > 0 and encoder is None:
        raise ValueError("model.repa_weight > 0 needs a frozen encoder")
    time_sampler = None
    if cfg.kind == "sit":
        params = {"m": cfg.logit_mean, "s": cfg.logit_std} if cfg.time_sampler == "logit_normal" else {}
        time_sampler = get_time_sampler(cfg.time_sampler, **params)
    weighting = _core_weighting(cfg)

    def loss_fn(model: nn.Module, batch, generator: torch.Generator | None = None) -> dict[str, Tensor]:
        m: ImageDiffusion = getattr(model, "module", model)
        x0, y = batch[0], batch[1]
        pixels = batch[2] if len(batch) > 2 else x0
        x0 = x0.float() * cfg.signal_scale
        B = x0.shape[0]
        device = x0.device
        target_tokens = None
        if cfg.repa_weight > 0:
            with torch.no_grad():
                target_tokens = tokens_of_features(encoder(pixels.float()).float(), m.net.grid)

        def forward_pass(masked: bool) -> dict[str, Tensor]:
            captured: dict[str, Tensor] = {}
            kw: dict = {"generator": generator}
            keep_idx = None
            if masked:
                keep_idx = m.net.sample_keep_idx(B, generator, device)
                kw["keep_idx"] = keep_idx
            if cfg.repa_weight > 0:
                kw["return_hidden"] = cfg.repa_block

            def call(x_t, t_in, y):
                out = model(x_t, t_in, y, raw=m.kind == "dit", **kw)
                if isinstance(out, tuple):
                    out, captured["hidden"] = out
                captured["out"] = out
                return out

            terms: dict[str, Tensor] = {}
            if m.kind == "sit":
                t = time_sampler(m.path, B, generator, device)
                noise = torch.randn(x0.shape, generator=generator, device=device, dtype=x0.dtype)
                per = denoising_loss(call, x0, m.path, prediction="velocity", weighting=weighting, t=t, noise=noise,
                                     model_kwargs={"y": y}, reduction="none")
                terms["mse"] = per
                if cfg.direction_loss > 0:
                    target = m.path.velocity(x0, t, noise)
                    cos = F.cosine_similarity(captured["out"].flatten(1), target.flatten(1), dim=1)
                    terms["direction"] = 1 - cos
                    per = per + cfg.direction_loss * terms["direction"]
            else:
                steps = torch.randint(0, m.ddpm.num_timesteps, (B,), generator=generator, device=device)
                noise = torch.randn(x0.shape, generator=generator, device=device, dtype=x0.dtype)
                out = m.ddpm.training_losses(call, x0, steps, noise=noise, model_kwargs={"y": y},
                                             learn_sigma=cfg.learn_sigma)
                mse = out["mse"]
                w = _dit_eps_weight(cfg, m._ddpm_log_snr.to(device)[steps])
                if w is not None:
                    mse = w.to(mse.dtype) * mse
                terms["mse"] = mse
                per = mse + out["vb"] if "vb" in out else mse
                if "vb" in out:
                    terms["vb"] = out["vb"]
            if cfg.repa_weight > 0:
                h = captured["hidden"]
                tgt = target_tokens
                if keep_idx is not None and h.shape[1] != tgt.shape[1]:
                    tgt = tgt.gather(1, keep_idx[..., None].expand(-1, -1, tgt.shape[-1]))
                terms["repa"] = repa_loss(m.projector(h), tgt)
                per = per + cfg.repa_weight * terms["repa"]
            terms["loss"] = per
            return terms

        passes = [forward_pass(masked=cfg.mask_ratio > 0)]
        if cfg.mask_ratio > 0 and cfg.mask_full_pass:
            passes.append(forward_pass(masked=False))
        result = {}
        for key in passes[0]:
            result[key] = sum(p[key] for p in passes).mean()
        return result

    return loss_fn


def config_from_dict(d: dict) -> ImageModelConfig:
    """Rebuild a config saved with ``dataclasses.asdict`` (unknown keys raise ValueError)."""
    names = {f.name for f in dataclasses.fields(ImageModelConfig)}
    unknown = set(d) - names
    if unknown:
        raise ValueError(f"unknown model config keys {sorted(unknown)}")
    return ImageModelConfig(**d)
