"""image.train / image.train_autoencoder / image.sample / image.demo end to end on tiny runs (8x8 digits)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
TINY = ("data=digits", "model.patch_size=2", "model.hidden_size=16", "model.depth=2", "model.num_heads=2",
        "trainer=smoke", "trainer.progress=false", "sampler.eval_per_class=0", "sampler.nfe=4",
        "sampler.per_class=2", "sampler.sampler=euler")


def compose(config="config", *overrides):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    import image.train  # noqa: F401  (registers the schemas)
    import image.train_autoencoder  # noqa: F401

    with initialize_config_dir(config_dir=str(REPO / "configs" / "image"), version_base="1.3"):
        return hydra_compose(config, overrides=list(overrides))


def run(out, *overrides):
    from image.train import train

    return train(compose("config", f"trainer.out_dir={out}", *TINY, *overrides))


def weights(out, step=6):
    from core.engine.checkpoint import load_checkpoint

    return load_checkpoint(Path(out) / "checkpoints" / f"ckpt_{step:08d}.pt")["model"]


@pytest.fixture(scope="module")
def sit_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("sit")
    return out, run(out)


def test_train_writes_run_info_grid_and_exports(sit_run):
    from PIL import Image

    out, result = sit_run
    assert result["step"] == 6 and torch.isfinite(torch.tensor(result["loss"]))
    info = json.loads((out / "run.json").read_text())
    assert info["model"]["kind"] == "sit" and info["input_size"] == [8, 8] and info["num_classes"] == 10
    assert info["latent"] is None and info["in_channels"] == 1
    grid = Image.open(out / "samples" / "step_00000006.png")
    assert grid.size == (2 * 10 + 2, 10 * 10 + 2)  # 2 columns, 10 class rows of 8x8 with 2-pixel gaps
    assert (out / "ema_0.999.safetensors").is_file()


def test_resume_gives_the_weights_of_an_uninterrupted_run(tmp_path, sit_run):
    full_dir, _ = sit_run
    part = tmp_path / "part"
    run(part, "trainer.stop_at=3")
    assert not (part / "checkpoints" / "ckpt_00000006.pt").exists()
    run(part)  # resume=auto continues from step 3
    a, b = weights(full_dir), weights(part)
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0)


def test_generate_and_sample_cli_from_a_run(sit_run, tmp_path):
    from image.sample import generate

    out, _ = sit_run
    imgs, labels = generate(out, 3, "heun", 6, 2.0, seed=0)
    assert imgs.shape == (30, 1, 8, 8) and imgs.dtype == torch.uint8
    assert labels.tolist() == [c for c in range(10) for _ in range(3)]
    png = tmp_path / "g.png"
    proc = subprocess.run([sys.executable, "-m", "image.sample", "--run", str(out / "checkpoints" / "ckpt_00000006.pt"),
                           "--sampler", "dpmpp_2m", "--nfe", "5", "--per-class", "2", "--interval", "0.2", "0.9",
                           "--out", str(png)], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["rows"] == 10 and png.is_file()


def test_dit_run_samples_with_ddpm(tmp_path):
    from image.sample import generate

    out = tmp_path / "dit"
    result = run(out, "model=dit", "sampler.sampler=ddpm")
    assert result["vb"] > 0
    imgs, _ = generate(out, 1, "ddpm", 4, 2.0)
    assert imgs.shape == (10, 1, 8, 8)


def test_training_flags_reach_the_model(tmp_path):
    from image.sample import load_run

    out = tmp_path / "flags"
    result = run(out, "model.depth=4", "model.route_ratio=0.5", "model.route_start=1", "model.route_end=3",
                 "model.weighting=min_snr", "model.direction_loss=0.1", "model.time_sampler=logit_normal")
    assert "direction" in result
    model, info, _ = load_run(out)
    assert model.net.config.route_ratio == 0.5 and info["model"]["weighting"] == "min_snr"


def test_repa_with_a_user_torchscript_encoder(tmp_path):
    enc = torch.jit.script(torch.nn.Sequential(torch.nn.Conv2d(1, 5, 2, stride=2), torch.nn.Tanh()))
    path = tmp_path / "enc.pt"
    enc.save(str(path))
    out = tmp_path / "repa"
    result = run(out, "model.repa_weight=0.5", "model.repa_block=1", f"model.repa_encoder={path}")
    assert -1 <= result["repa"] <= 1
    assert json.loads((out / "run.json").read_text())["encoder_dim"] == 5


def _text_like_run(tmp_path):
    """A folder that is some other training run's output (run.json, no codec.json / config.json)."""
    d = tmp_path / "text_run"
    d.mkdir()
    (d / "run.json").write_text(json.dumps({"model": {"kind": "ar"}, "tokenizer": {}}))
    return d


def _unusable_codecs(tmp_path):
    no_weights = tmp_path / "no_weights"
    no_weights.mkdir()
    (no_weights / "codec.json").write_text(json.dumps({"ae": {}, "image_channels": 1, "image_size": [8, 8],
                                                        "latent_shape": [4, 2, 2], "scale": 1.0}))
    rgb = tmp_path / "rgb"
    rgb.mkdir()
    (rgb / "codec.json").write_text(json.dumps({"ae": {}, "image_channels": 3, "image_size": [8, 8],
                                                 "latent_shape": [4, 2, 2], "scale": 1.0}))
    (rgb / "ema_0.999.safetensors").write_bytes(b"")
    unet = tmp_path / "unet"
    unet.mkdir()
    (unet / "config.json").write_text(json.dumps({"_class_name": "UNet2DModel"}))
    return no_weights, rgb, unet


@pytest.mark.parametrize("overrides, match", [
    (("model.kind=edm",), "model.kind"),
    (("sampler.sampler=ddpm",), "ddpm"),
    (("data=folder",), "data"),
    (("sampler.sampler=nope",), "sampler.sampler"),
    # checked at start, before the data load, under their config keys (they were tracebacks after it)
    (("model.patch_size=3",), r"model.patch_size=3 does not divide the model's 8x8 input \(the digits images are "
                              r"8x8\): set model.patch_size to one of \[1, 2, 4, 8\]"),
    (("data.image_size=9",), r"model.patch_size=2 does not divide the model's 9x9 input \(data.image_size=9\)"),
    (("model.class_dropout_prob=1.5",), r"model.class_dropout_prob=1.5: must be in \[0, 1\)"),
    (("model.mlp_ratio=0",), r"model.mlp_ratio=0.0: must be a positive finite number"),
    (("model.logit_mean=nan",), r"model.logit_mean=nan: must be a finite number"),
    (("model.logit_mean=nan", "model.time_sampler=uniform"), r"model.logit_mean=nan"),
    (("data.latent={text_run}",), r"data.latent=.*text_run.* is neither a finished image.train_autoencoder run "
                                  r"\(no codec.json\) nor a diffusers AutoencoderKL folder"),
    (("data.latent={text_run}", "data.latent_kind=diffusers"), r"text_run.* holds no config.json"),
    (("data.latent={no_weights}",), r"no_weights.* has a codec.json but no exported weights and no checkpoint"),
    (("data.latent={rgb}",), r"rgb.* encodes 3-channel images, but the digits images are 1-channel"),
    (("data.latent={unet}",), r"unet.* holds a config.json of a 'UNet2DModel', not of a diffusers AutoencoderKL"),
])
def test_bad_configs_fail_at_start(tmp_path, monkeypatch, overrides, match):
    import image.train
    import image.train_autoencoder  # noqa: F401  (imports the real loader before it is replaced here)
    from core.engine.config import ConfigError

    def no_data(*a, **k):
        raise AssertionError("the data were loaded before the config was checked")

    monkeypatch.setattr(image.train, "load_training_images", no_data)
    no_weights, rgb, unet = _unusable_codecs(tmp_path)
    paths = {"text_run": _text_like_run(tmp_path), "no_weights": no_weights, "rgb": rgb, "unet": unet}
    with pytest.raises(ConfigError, match=match):
        run(tmp_path / "bad", *(o.format(**paths) for o in overrides))
    assert not (tmp_path / "bad" / "checkpoints").exists() or not any((tmp_path / "bad" / "checkpoints").iterdir())


def test_a_bad_model_setting_exits_2_naming_its_key(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "image.train", *TINY, f"trainer.out_dir={tmp_path / 'o'}",
                           f"hydra.run.dir={tmp_path / 'h'}", "model.class_dropout_prob=1.5"],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "config error: model.class_dropout_prob=1.5: must be in [0, 1)" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_folder_images_a_patch_size_does_not_divide_is_a_config_error(tmp_path):
    from PIL import Image

    from core.engine.config import ConfigError

    for c in ("a", "b"):
        (tmp_path / "imgs" / c).mkdir(parents=True)
        for i in range(2):
            Image.new("L", (6, 6), color=40 * i).save(tmp_path / "imgs" / c / f"{i}.png")
    with pytest.raises(ConfigError, match=r"model.patch_size=4 does not divide the model's 6x6 input \(the images "
                                          r"of data.root=.* are 6x6\)"):
        run(tmp_path / "bad", "data=folder", f"data.root={tmp_path / 'imgs'}", "data.image_size=null",
            "model.patch_size=4")


def test_unknown_key_is_rejected_by_the_schema():
    with pytest.raises(Exception, match="nope"):
        compose("config", "model.nope=1", *TINY)


def test_latent_run_on_the_polydiff_autoencoder(tmp_path):
    from image.sample import generate
    from image.train_autoencoder import train_autoencoder

    ae = tmp_path / "ae"
    res = train_autoencoder(compose("autoencoder", "data=digits", "ae.channels=8", "ae.latent_channels=2",
                                    "trainer=smoke", "trainer.progress=false", f"trainer.out_dir={ae}"))
    meta = json.loads((ae / "codec.json").read_text())
    assert meta["latent_shape"] == [2, 2, 2] and meta["scale"] > 0
    assert res["codec_check_mse"] == pytest.approx(res["test_mse"], rel=0.5)
    out = tmp_path / "lat"
    run(out, f"data.latent={ae}", "model.patch_size=1")
    info = json.loads((out / "run.json").read_text())
    assert info["latent"]["kind"] == "polydiff" and info["input_size"] == [2, 2] and info["in_channels"] == 2
    imgs, _ = generate(out, 1, "euler", 3, 1.5)
    assert imgs.shape == (10, 1, 8, 8) and imgs.dtype == torch.uint8


def test_latent_run_on_a_local_diffusers_vae(tmp_path):
    from diffusers import AutoencoderKL

    from image.sample import generate

    torch.manual_seed(0)
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), layers_per_block=1,
                        latent_channels=4, norm_num_groups=4, sample_size=8, scaling_factor=0.5)
    folder = tmp_path / "vae"
    vae.save_pretrained(folder)
    out = tmp_path / "lat"
    run(out, f"data.latent={folder}", "model.patch_size=2")
    info = json.loads((out / "run.json").read_text())
    assert info["latent"]["kind"] == "diffusers" and info["input_size"] == [4, 4] and info["latent"]["scale"] == 0.5
    imgs, _ = generate(out, 1, "euler", 3, 1.5)
    assert imgs.shape == (10, 1, 8, 8)


def test_demo_runs_resumes_and_writes_grid(tmp_path):
    from image.demo import main

    out = tmp_path / "demo"
    args = ["--steps", "4", "--data", "digits", "--no-eval", "--out", str(out)]
    first = main(args)
    assert (out / "grid.png").is_file() and first["steps"] == 4
    again = main(args)  # a finished run is only re-sampled
    assert again["steps"] == 4 and json.loads((out / "metrics.json").read_text())["nfe"] == 20


@pytest.mark.slow
def test_final_evaluation_writes_eval_json(tmp_path):
    out = tmp_path / "eval"
    result = run(out, "sampler.eval_per_class=5")
    ev = json.loads((out / "eval.json").read_text())
    assert ev == result["eval"] and ev["per_class"] == 5


def test_folder_data_reports_a_corrupt_file_or_skips_it(tmp_path):
    import numpy as np
    from PIL import Image

    root = tmp_path / "imgs"
    rng = np.random.default_rng(0)
    for c in ("cat", "dog"):
        (root / c).mkdir(parents=True)
        for i in range(5):
            Image.fromarray(rng.integers(0, 255, (12, 10, 3), dtype=np.uint8)).save(root / c / f"{i}.png")
    (root / "dog" / "broken.png").write_bytes(b"not a png")
    common = ("data=folder", f"data.root={root}", "data.image_size=8", "trainer.batch_size=4")
    with pytest.raises(ValueError, match="broken.png"):
        run(tmp_path / "strict", *common)
    out = tmp_path / "skip"
    # the final evaluation (classifier and reference images from the same folder) skips the file too
    result = run(out, *common, "data.on_error=skip", "sampler.eval_per_class=2", "sampler.eval_batch=4")
    info = json.loads((out / "run.json").read_text())
    assert info["train_images"] == 10 and info["class_names"] == ["cat", "dog"] and info["in_channels"] == 3
    assert result["eval"]["n_test"] == 10 and result["eval"]["n_samples"] == 4
    from image.evaluate import main as evaluate_main

    ev = evaluate_main(["--run", str(out), "--per-class", "2", "--nfe", "2", "--sampler", "euler",
                        "--out", str(tmp_path / "m.json")])  # on_error read from the run
    assert ev["n_test"] == 10


def test_folder_run_is_evaluated_against_its_own_folder(tmp_path):
    # The final evaluation must find a folder data set through the run's data.root.
    import numpy as np
    from PIL import Image

    root = tmp_path / "imgs"
    rng = np.random.default_rng(1)
    for c, level in (("dark", 40), ("light", 210)):
        (root / c).mkdir(parents=True)
        for i in range(6):
            img = np.clip(rng.normal(level, 10, (8, 8)), 0, 255).astype(np.uint8)
            Image.fromarray(img).save(root / c / f"{i}.png")
    out = tmp_path / "run"
    result = run(out, "data=folder", f"data.root={root}", "data.image_size=8", "data.channels=1",
                 "trainer.batch_size=4", "sampler.eval_per_class=2", "sampler.eval_batch=4", "model.patch_size=2")
    ev = json.loads((out / "eval.json").read_text())
    assert ev == result["eval"] and ev["n_samples"] == 4 and 0.0 <= ev["class_consistency"] <= 1.0
    assert ev["n_test"] == 12 and ev["image_shape"] == [1, 8, 8]  # compared with the 12 folder images, not digits


def test_limit_keeps_folder_files_aligned_with_images(tmp_path):
    import numpy as np
    from PIL import Image

    from image.data import load_images
    from image.train import ImageDataConfig, load_training_images

    root = tmp_path / "imgs"
    for c, level in (("a", 30), ("b", 220)):
        (root / c).mkdir(parents=True)
        for i in range(3):
            Image.fromarray(np.full((8, 8), level + i, dtype=np.uint8)).save(root / c / f"{i}.png")
    full = load_images("folder", root=str(root))
    cut = load_training_images(ImageDataConfig(name="folder", root=str(root), limit=4))
    assert len(cut) == 4 and cut.files == full.files[:4] and torch.equal(cut.images, full.images[:4])
    assert cut.files[3].endswith("b/0.png") and int(cut.images[3].max()) == 220  # file i is image i
    assert load_training_images(ImageDataConfig(name="digits", limit=5)).files == []


# ------------------------------------------------------------------ EMA choice, latent scale, sampler settings


def _equal_weights(model, sd):
    own = model.state_dict()
    return all(torch.equal(own[k], v) for k, v in sd.items() if k in own)


def test_runs_load_the_first_configured_ema_decay_not_the_first_by_name(tmp_path):
    # ema_decays=[0.9, 0.5]: the trainer's own EMA (its sample grids) is 0.9, while "ema_0.5" sorts first
    from safetensors.torch import load_file

    from core.engine.checkpoint import load_checkpoint
    from image.sample import load_run

    out = tmp_path / "two"
    run(out, "trainer.ema_decays=[0.9,0.5]", "trainer.ema_warmup=false")  # warm-up would make them equal
    info = json.loads((out / "run.json").read_text())
    assert info["ema_decays"] == [0.9, 0.5]
    first, second = (load_file(str(out / f"ema_{d}.safetensors")) for d in ("0.9", "0.5"))
    assert not all(torch.equal(first[k], second[k]) for k in first)  # the two EMAs differ
    assert _equal_weights(load_run(out)[0], first)
    ckpt = out / "checkpoints" / "ckpt_00000006.pt"
    assert _equal_weights(load_run(ckpt)[0], load_checkpoint(ckpt)["ema"]["shadows"]["0.9"])
    # a run.json from before the decays were recorded: the checkpoint's shadow order decides
    del info["ema_decays"]
    (out / "run.json").write_text(json.dumps(info))
    assert _equal_weights(load_run(out)[0], first)


@pytest.fixture(scope="module")
def ae_two_emas(tmp_path_factory):
    from image.train_autoencoder import train_autoencoder

    ae = tmp_path_factory.mktemp("ae2")
    train_autoencoder(compose("autoencoder", "data=digits", "ae.channels=8", "ae.latent_channels=2", "trainer=smoke",
                              "trainer.progress=false", "trainer.ema_decays=[0.9,0.5]", "trainer.ema_warmup=false",
                              f"trainer.out_dir={ae}"))
    return ae


def test_autoencoder_codec_loads_the_ema_its_scale_was_measured_on(ae_two_emas):
    from image.autoencoder import load_codec
    from image.data import load_images, to_model_range

    meta = json.loads((ae_two_emas / "codec.json").read_text())
    assert meta["ema_decays"] == [0.9, 0.5]
    codec = load_codec({"kind": "polydiff", "path": str(ae_two_emas)})
    pixels = to_model_range(load_images("digits", "train").images)
    # codec.json's scale is 1 / std of the training posterior means under the first EMA (0.9)
    assert float(codec.encode(pixels).std()) == pytest.approx(1.0, rel=1e-4)


def test_latent_scale_overrides_the_polydiff_codec_scale(ae_two_emas):
    from image.autoencoder import load_codec
    from image.train import ImageDataConfig, prepare_data

    recorded = json.loads((ae_two_emas / "codec.json").read_text())["scale"]
    assert load_codec({"kind": "polydiff", "path": str(ae_two_emas), "scale": None}).scale == recorded
    assert load_codec({"kind": "polydiff", "path": str(ae_two_emas), "scale": 0.25}).scale == 0.25
    stds = {}
    for scale in (None, 0.25):
        cfg = ImageDataConfig(name="digits", latent=str(ae_two_emas), latent_scale=scale)
        cfg.validate()
        (x, _), info = prepare_data(cfg)
        assert info["latent"]["scale"] == (recorded if scale is None else 0.25)
        stds[scale] = float(x.std())
    assert stds[0.25] == pytest.approx(stds[None] * 0.25 / recorded, rel=1e-4)


@pytest.mark.parametrize("overrides, match", [
    (("model.class_dropout_prob=0", "sampler.cfg_scale=3"), "sampler.cfg_scale=3.0.*model.class_dropout_prob=0"),
    (("sampler.sampler=dopri5",), "dopri5.*adaptive.*sampler.nfe"),
    (("sampler.sampler=euler", "sampler.nfe=null"), "sampler.nfe must be a positive integer"),
    (("sampler.sampler=dopri5", "sampler.nfe=null", "+sampler.options.eps_rel=0.1"), "eps_rel.*rtol"),
])
def test_sampler_settings_the_model_cannot_run_fail_at_start(tmp_path, overrides, match):
    from core.engine.config import ConfigError

    with pytest.raises((ConfigError, ValueError), match=match):
        run(tmp_path / "bad", *overrides)
    assert not (tmp_path / "bad" / "checkpoints").exists()


def test_unguided_run_without_label_dropout_trains_and_samples(tmp_path):
    from image.sample import generate

    out = tmp_path / "nodrop"
    run(out, "model.class_dropout_prob=0", "sampler.cfg_scale=1")
    assert (out / "samples" / "step_00000006.png").is_file()
    with pytest.raises(ValueError, match="cfg_scale=2.0.*class_dropout_prob=0.0"):
        generate(out, 1, "euler", 3, 2.0)


@pytest.mark.parametrize("sampler, option", [("dopri5", "rtol=0.01"), ("adaptive_sde", "eps_rel=0.5")])
def test_adaptive_samplers_write_training_grids(tmp_path, sampler, option):
    from image.sample import main as sample_main

    out = tmp_path / sampler
    run(out, f"sampler.sampler={sampler}", "sampler.nfe=null", f"+sampler.options.{option}", "sampler.per_class=1")
    assert (out / "samples" / "step_00000006.png").is_file()
    png = sample_main(["--run", str(out), "--sampler", sampler, "--option", option, "--per-class", "1"])
    assert png.name == f"sample_{sampler}_nfeadaptive_cfg3.png" and png.is_file()


@pytest.mark.slow
def test_two_ranks_train_and_evaluate_with_a_classifier_not_yet_cached(tmp_path):
    """Rank 0 trains the evaluation classifier after the run on its own (core.engine.distributed.local):
    its nested Trainer used to make collective calls rank 1 never answered (gloo: connection closed)."""
    import os
    import subprocess
    import sys

    repo = Path(__file__).resolve().parents[1]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "image.train",
           "data=digits", "model.patch_size=2", "model.hidden_size=16", "model.depth=2", "model.num_heads=2",
           "trainer=smoke", "trainer.progress=false", "sampler.eval_per_class=2", "sampler.eval_batch=20",
           "sampler.nfe=4", "sampler.per_class=2", f"trainer.out_dir={tmp_path / 'run'}"]
    env = {**os.environ, "PYTHONPATH": str(repo), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)  # fresh cache
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "training the evaluation classifier" in proc.stdout + proc.stderr
    assert (tmp_path / "run" / "eval.json").is_file()
