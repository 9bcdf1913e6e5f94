"""The evaluation classifier of the image domain: a small CNN trained by polydiff, kept and reused.

    clf = load_or_train_classifier("fashion_mnist")   # trains once (tqdm), then loads from the cache
    logits = clf(x)                                   # x: (B, C, H, W) float in [-1, 1]
    f = clf.features(x)                               # (B, D) penultimate features (global average pool)
    fmap = clf.features(x, spatial=True)              # (B, D, h, w) the last conv map (REPA's encoder)

Its penultimate features are the space of the image metrics (``image.metrics``: a Frechet distance
as in FID, Heusel et al. 2017, and the precision/recall of Kynkaanniemi et al. 2019), and its
predictions give the class-consistency of conditional samples. The network is fully
convolutional (three conv-BN-ReLU stages with 2x max-pooling between them, global average pool,
linear head), so it takes any image size; it is trained on the *training* split only, with the
core engine (``core.engine.Trainer``: AdamW, warm-up + cosine decay, resumable run directory).

Cache (``cache_dir``, default ``outputs/classifiers``): ``<dataset>_<C>x<H>x<W>[_<data hash>]_v<VERSION>
.safetensors`` and a ``.json`` beside it with the version, the data set name, size, image shape,
a SHA-256 fingerprint of the training images and labels, the architecture and recipe, the test
accuracy and the training time. Both are written atomically, weights first; the JSON records
the weights' SHA-256. A saved classifier is reused only when the JSON matches the requested data,
architecture, recipe and version and the weights' hash checks; otherwise it is retrained and
overwritten (bump :data:`CLASSIFIER_VERSION` when the architecture or training code changes).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from core.engine.checkpoint import atomic_write_text

from .data import ImageSet, load_images

log = logging.getLogger("polydiff.image.classifier")

__all__ = ["CLASSIFIER_VERSION", "ClassifierRecipe", "ImageClassifier", "train_classifier", "save_classifier",
           "load_classifier", "load_or_train_classifier", "accuracy", "predict"]

CLASSIFIER_VERSION = "1"


class ImageClassifier(nn.Module):
    """Conv-BN-ReLU stages ``widths`` (2x max-pool between stages), global average pool, linear head.

    Input ``(B, in_channels, H, W)`` float in ``[-1, 1]``, any ``H, W >= 2 ** (len(widths) - 1)``.
    """

    def __init__(self, in_channels: int, num_classes: int, widths: tuple[int, ...] = (32, 64, 128),
                 convs_per_stage: int = 1):
        super().__init__()
        if in_channels < 1 or num_classes < 2 or not widths or convs_per_stage < 1:
            raise ValueError(f"bad classifier shape: in_channels={in_channels}, num_classes={num_classes}, "
                             f"widths={widths}, convs_per_stage={convs_per_stage}")
        self.in_channels, self.num_classes = in_channels, num_classes
        self.widths, self.convs_per_stage = tuple(int(w) for w in widths), convs_per_stage
        stages, c = [], in_channels
        for w in self.widths:
            layers = []
            for _ in range(convs_per_stage):
                layers += [nn.Conv2d(c, w, 3, padding=1, bias=False), nn.BatchNorm2d(w), nn.ReLU(inplace=True)]
                c = w
            stages.append(nn.Sequential(*layers))
        self.stages = nn.ModuleList(stages)
        self.head = nn.Linear(c, num_classes)
        self.meta: dict = {}

    @property
    def feature_dim(self) -> int:
        return self.widths[-1]

    def _check(self, x: Tensor) -> None:
        if not isinstance(x, Tensor) or not x.is_floating_point() or x.ndim != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"classifier input must be float (B, {self.in_channels}, H, W) in [-1, 1], got "
                             f"{getattr(x, 'dtype', type(x))} {tuple(getattr(x, 'shape', ()))}")

    def features(self, x: Tensor, spatial: bool = False) -> Tensor:
        """Penultimate features: ``(B, D)`` pooled, or the last conv map ``(B, D, h, w)`` if ``spatial``."""
        self._check(x)
        for i, stage in enumerate(self.stages):
            if i > 0 and min(x.shape[-2:]) >= 2:
                x = F.max_pool2d(x, 2)
            x = stage(x)
        return x if spatial else x.mean(dim=(2, 3))

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x))


@dataclass
class ClassifierRecipe:
    """How the classifier is trained (part of the cache key)."""

    widths: list[int] = field(default_factory=lambda: [32, 64, 128])
    convs_per_stage: int = 1
    epochs: int = 6
    min_steps: int = 1000  # small data sets train for at least this many steps
    batch_size: int = 128
    lr: float = 3e-3
    weight_decay: float = 1e-4
    warmup_steps: int = 50
    seed: int = 0

    def steps_for(self, n: int) -> int:
        per_epoch = math.ceil(n / self.batch_size)
        return max(self.epochs * per_epoch, self.min_steps)


def _classify_loss(model: nn.Module, batch, generator: torch.Generator) -> dict[str, Tensor]:
    x, y = batch
    logits = model(x)
    loss = F.cross_entropy(logits, y)
    return {"loss": loss, "acc": (logits.argmax(1) == y).float().mean().detach()}


@torch.no_grad()
def predict(clf: ImageClassifier, images: Tensor, batch_size: int = 500) -> Tensor:
    """Class predictions ``(N,)`` for uint8 images ``(N, C, H, W)`` (or floats in [-1, 1])."""
    from .data import to_model_range

    was = clf.training
    clf.eval()
    dev = next(clf.parameters()).device
    out = []
    for s in range(0, len(images), batch_size):
        x = images[s:s + batch_size]
        x = to_model_range(x) if x.dtype == torch.uint8 else x
        out.append(clf(x.to(dev)).argmax(1).cpu())
    clf.train(was)
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.long)


def accuracy(clf: ImageClassifier, data: ImageSet, batch_size: int = 500) -> float:
    """Top-1 accuracy of ``clf`` on ``data``."""
    return float((predict(clf, data.images, batch_size) == data.labels).float().mean())


def train_classifier(train: ImageSet, recipe: ClassifierRecipe | None = None, *, out_dir: str | Path,
                     device: str = "auto", progress: bool = True) -> ImageClassifier:
    """Train an :class:`ImageClassifier` on ``train`` with the core engine (run directory ``out_dir``, resumable)."""
    recipe = recipe or ClassifierRecipe()
    if len(train) < 2 or train.num_classes < 2:
        raise ValueError(f"the classifier needs at least 2 images and 2 classes, got {len(train)} and {train.num_classes}")
    # the Trainer (and the seeded initial weights) reseed the global RNG: fork it so that the caller's
    # next draws are the same whether or not an evaluation classifier had to be trained
    with torch.random.fork_rng():
        return _train_classifier(train, recipe, out_dir, device, progress)


def _train_classifier(train: ImageSet, recipe: ClassifierRecipe, out_dir, device: str, progress: bool) -> ImageClassifier:
    from core.engine.config import TrainerConfig, validate_trainer
    from core.engine.trainer import Trainer

    torch.manual_seed(recipe.seed)  # the initial weights
    clf = ImageClassifier(train.shape[0], train.num_classes, tuple(recipe.widths), recipe.convs_per_stage)
    steps = recipe.steps_for(len(train))
    cfg = TrainerConfig(seed=recipe.seed, steps=steps, batch_size=min(recipe.batch_size, len(train)),
                        optimizer="adamw", lr=recipe.lr, weight_decay=recipe.weight_decay, betas=[0.9, 0.999],
                        warmup_steps=min(recipe.warmup_steps, steps - 1), schedule="cosine", grad_clip=None,
                        ema_decays=[], device=device, ckpt_every=max(steps // 4, 1), keep_last=1,
                        log_every=max(min(50, steps // 10), 1), progress=progress, tensorboard=False,
                        out_dir=str(out_dir), resume="auto", export_ema=False)
    validate_trainer(cfg, world_size=1, prefix="classifier")
    trainer = Trainer(clf, _classify_loss, train.tensor_dataset(), cfg)
    trainer.fit()
    return trainer.raw_model.cpu().eval()


def _cache_stem(name: str, train: ImageSet, fingerprint: str) -> str:
    C, H, W = train.shape
    tag = f"_{fingerprint[:10]}" if name == "folder" else ""  # a user's folders differ by content, not name
    return f"{name}_{C}x{H}x{W}{tag}_v{CLASSIFIER_VERSION}"


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def save_classifier(clf: ImageClassifier, path: str | Path, meta: dict) -> Path:
    """Weights to ``path`` (.safetensors) and ``meta`` (+ architecture, version, weights hash) to ``.json``; atomic."""
    from safetensors.torch import save

    from core.engine.checkpoint import atomic_write

    path = Path(path)
    sd = {k: v.detach().cpu().contiguous() for k, v in clf.state_dict().items()}
    atomic_write(path, lambda f: f.write(save(sd)))
    meta = {**meta, "version": CLASSIFIER_VERSION, "in_channels": clf.in_channels, "num_classes": clf.num_classes,
            "widths": list(clf.widths), "convs_per_stage": clf.convs_per_stage, "weights_sha256": _sha256_file(path)}
    atomic_write(path.with_suffix(".json"), lambda f: f.write(json.dumps(meta, indent=1).encode()))
    clf.meta = meta
    return path


def load_classifier(path: str | Path, device: str | torch.device = "cpu") -> ImageClassifier:
    """A classifier saved by :func:`save_classifier` (the JSON beside it gives the architecture), in eval mode."""
    from safetensors.torch import load_file

    path = Path(path)
    meta_path = path.with_suffix(".json")
    if not path.is_file() or not meta_path.is_file():
        raise FileNotFoundError(f"classifier {path} or its metadata {meta_path.name} is missing")
    meta = json.loads(meta_path.read_text())
    if meta.get("weights_sha256") != _sha256_file(path):
        raise ValueError(f"classifier weights {path} do not match the hash recorded in {meta_path.name}")
    clf = ImageClassifier(meta["in_channels"], meta["num_classes"], tuple(meta["widths"]), meta["convs_per_stage"])
    clf.load_state_dict(load_file(str(path)))
    clf.meta = meta
    return clf.to(device).eval()


def load_or_train_classifier(dataset_name: str, cache_dir: str | Path = "outputs/classifiers", *,
                             root: str | None = None, image_size: int | None = None, channels: int | None = None,
                             recipe: ClassifierRecipe | None = None, retrain: bool = False, device: str = "auto",
                             progress: bool = True, on_error: str = "raise") -> ImageClassifier:
    """The evaluation classifier of a data set's training split: loaded from ``cache_dir`` when its
    metadata matches (version, data fingerprint, image shape, recipe), else trained, tested on the
    test split and saved. ``image_size`` / ``channels`` as in :func:`image.data.load_images`.
    ``on_error``: for a folder, ``"skip"`` leaves unreadable files out (as the training run did).
    Returns the classifier in eval mode on the CPU, its metadata in ``.meta``.
    """
    recipe = recipe or ClassifierRecipe()
    train = load_images(dataset_name, "train", root=root, image_size=image_size, channels=channels, on_error=on_error)
    fingerprint = train.fingerprint()
    want = {"version": CLASSIFIER_VERSION, "dataset": dataset_name, "train_images": len(train),
            "image_shape": list(train.shape), "class_names": list(train.class_names),
            "data_sha256": fingerprint, "recipe": asdict(recipe)}
    cache_dir = Path(cache_dir)
    path = cache_dir / f"{_cache_stem(dataset_name, train, fingerprint)}.safetensors"
    if not retrain and path.is_file() and path.with_suffix(".json").is_file():
        try:
            clf = load_classifier(path)
        except (ValueError, KeyError, RuntimeError, json.JSONDecodeError) as e:
            log.warning("cached classifier %s is unusable (%s): retraining", path, e)
        else:
            diff = [k for k, v in want.items() if clf.meta.get(k) != v]
            if not diff:
                log.info("using cached classifier %s (test accuracy %.4f)", path, clf.meta.get("test_accuracy", float("nan")))
                return clf
            log.warning("cached classifier %s does not match (%s differ): retraining", path, ", ".join(diff))
    run_dir = path.with_suffix(".run")
    # an interrupted training of the same data and recipe resumes; any other is started afresh
    stamp = run_dir / "classifier_request.json"
    if run_dir.exists() and (retrain or not stamp.is_file() or json.loads(stamp.read_text()) != want):
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(stamp, json.dumps(want))
    log.info("training the evaluation classifier on %s (%d images %s)", dataset_name, len(train), train.shape)
    t0 = time.perf_counter()
    clf = train_classifier(train, recipe, out_dir=run_dir, device=device, progress=progress)
    seconds = time.perf_counter() - t0
    test_acc = None
    if dataset_name != "folder":  # a folder has no held-out split
        test_acc = accuracy(clf, load_images(dataset_name, "test", root=root, image_size=image_size, channels=channels))
    meta = {**want, "train_accuracy": accuracy(clf, train), "test_accuracy": test_acc,
            "train_seconds": round(seconds, 1), "steps": recipe.steps_for(len(train)), "threads": torch.get_num_threads(),
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    save_classifier(clf, path, meta)
    shutil.rmtree(run_dir, ignore_errors=True)  # the weights are saved; the resumable run is no longer needed
    log.info("saved classifier %s: test accuracy %s, %.0f s", path, test_acc, seconds)
    return clf
