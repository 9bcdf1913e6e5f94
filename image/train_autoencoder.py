"""Train the small KL autoencoder of latent-space runs (``image.autoencoder.KLAutoencoder``).

    python -m image.train_autoencoder trainer.out_dir=outputs/image/ae
    python -m image.train_autoencoder ae.align_weight=0.5 trainer.out_dir=outputs/image/ae_va   # VA-VAE
    python -m image.train data.latent=outputs/image/ae model.patch_size=1 ...

Config ``configs/image/autoencoder.yaml``: groups ``ae`` (:class:`AutoencoderConfig`), ``data`` (as
``image.train``) and ``trainer``. At the end of the run ``codec.json`` records the autoencoder
config, the image and latent shapes, the latent scaling factor ``1 / std`` of the posterior means
over (up to 5,000) training images (Rombach et al. 2022, sec. 4.3.2) and the reconstruction MSE
on the test split; :func:`image.autoencoder.load_codec` reads it.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path

import torch
from omegaconf import DictConfig

from core.engine.checkpoint import atomic_write
from core.engine.config import register_schema
from core.engine.run import hydra_entry, prepare
from core.engine.trainer import Trainer

from .autoencoder import AutoencoderConfig, KLAutoencoder, make_autoencoder_loss, polydiff_codec
from .train import ImageDataConfig, default_encoder, encoder_dim, load_training_images

log = logging.getLogger("polydiff.image")

register_schema("ae", "image_ae_schema", AutoencoderConfig)


def train_autoencoder(cfg: DictConfig) -> dict:
    ctx = prepare(cfg, groups=("ae", "data"))
    ae_cfg: AutoencoderConfig = ctx.groups["ae"]
    data_cfg: ImageDataConfig = ctx.groups["data"]
    if data_cfg.latent is not None:
        from core.engine.config import ConfigError

        raise ConfigError("data.latent must be unset when training the autoencoder")
    from .data import to_model_range

    images = load_training_images(data_cfg)
    pixels = to_model_range(images.images)
    C, size = int(pixels.shape[1]), tuple(pixels.shape[-2:])
    encoder, enc_dim = None, 0
    if ae_cfg.align_weight > 0:
        encoder = default_encoder(data_cfg.name, data_cfg, ae_cfg.align_encoder)
        enc_dim = encoder_dim(encoder, C, size)
    model = KLAutoencoder(ae_cfg, C, enc_dim)
    out_dir = Path(ctx.trainer.out_dir).resolve()
    trainer = Trainer(model, make_autoencoder_loss(ae_cfg, encoder),
                      torch.utils.data.TensorDataset(pixels, images.labels), ctx.trainer, run_config=ctx.snapshot(),
                      model_groups=("ae",))
    result = trainer.fit()
    if trainer.is_main and trainer.step >= ctx.trainer.steps:
        model.eval()
        ema = trainer.ema
        ctx_swap = ema.swapped_in(model) if ema is not None else None
        with (ctx_swap if ctx_swap is not None else torch.no_grad()), torch.no_grad():
            ref = pixels[:5000]
            means = torch.cat([model.encode(ref[i:i + 500])[0] for i in range(0, len(ref), 500)])
            scale = float(1.0 / means.std())
            test = to_model_range(load_training_images(dataclasses.replace(data_cfg, limit=0), "test").images[:2000])
            rec = torch.cat([model.decode(model.encode(test[i:i + 500])[0], size) for i in range(0, len(test), 500)])
            mse = float((rec.clamp(-1, 1) - test).pow(2).mean())
        meta = {"ae": dataclasses.asdict(ae_cfg), "image_channels": C, "image_size": list(size),
                "latent_shape": list(means.shape[1:]), "scale": scale, "encoder_dim": enc_dim,
                "test_mse": mse, "dataset": data_cfg.name, "data": dataclasses.asdict(data_cfg),
                # configured order: the scale and test_mse above are those of the first decay's EMA,
                # which is what load_codec loads
                "ema_decays": [float(d) for d in ctx.trainer.ema_decays]}
        atomic_write(out_dir / "codec.json", lambda f: f.write(json.dumps(meta, indent=1).encode()))
        # the exported EMA weights are what load_codec reads: check that they round-trip
        codec = polydiff_codec(out_dir)
        check = float((codec.decode(codec.encode(test[:200])) - test[:200]).pow(2).mean())
        result.update(scale=scale, test_mse=mse, codec_check_mse=check)
        print(json.dumps({k: (str(v) if isinstance(v, Path) else v) for k, v in result.items()}), flush=True)
    return result


main = hydra_entry(train_autoencoder, Path(__file__).resolve().parents[1] / "configs" / "image", "autoencoder")

if __name__ == "__main__":
    main()
