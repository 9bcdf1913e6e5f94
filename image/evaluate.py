"""Evaluation of class-conditional image samples, and ``python -m image.evaluate`` for a checkpoint.

    python -m image.evaluate --run outputs/image/sit --per-class 100 --sampler euler --nfe 20 --cfg-scale 3
    python -m image.evaluate --run outputs/image/sit/checkpoints/ckpt_00002000.pt --out m.json \
        --inception /path/to/inception.pt       # + Inception FID (torchmetrics) from a local TorchScript file

:func:`evaluate_samples` (generated uint8 images and the labels they were conditioned on) measures,
in the space of the data set's evaluation classifier (``image.classifier``, trained on the
training split, cached and reused):

- ``class_consistency``: the classifier's accuracy on the samples w.r.t. their conditioning
  labels (and ``class_consistency_per_class``); compare with ``classifier_test_accuracy``, the
  same number on real test images.
- ``frechet_distance``: Frechet distance between Gaussians fitted to the penultimate features of
  the samples and of the real **test** split (FID's formula in classifier features; it grows as
  the number of samples shrinks, so compare runs at equal ``n_samples``).
- ``precision`` / ``recall`` (Kynkaanniemi et al. 2019, ``k`` = 3) against the test features.
- ``reference_frechet_distance`` / ``reference_precision`` / ``reference_recall``: the same
  numbers for as many real *training* images (drawn with ``seed``, the classes in the proportions
  of ``labels``) against the test split: what a perfect generator would score at this sample size.
- ``inception_fid`` (when ``inception=`` names a local extractor): torchmetrics' FID on the raw
  images against the test split.

Generated images of another size or channel count than the data set's are compared with the test
split (and a classifier) at their own size and channels (``image.data.load_images(image_size=...,
channels=...)``, e.g. Fashion-MNIST padded to 32 x 32). A ``folder`` data set has no test split:
its samples are compared with the folder's images (pass ``root=``).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import time
from pathlib import Path

import torch
from torch import Tensor

from .classifier import ImageClassifier, load_or_train_classifier
from .data import ImageSet, load_images, to_model_range
from .metrics import class_consistency, frechet_distance, precision_recall, torchmetrics_fid

log = logging.getLogger("polydiff.image.evaluate")

__all__ = ["evaluate_samples", "classifier_features", "classifier_outputs", "main"]

_REFERENCE_CACHE: dict = {}  # (dataset, root, size, channels, cache_dir, classifier kwargs) -> (classifier, test set, test features)


@contextlib.contextmanager
def _eval_mode(module: torch.nn.Module):
    """Eval mode inside the block; the module's own train/eval flags (every submodule's) afterwards."""
    flags = [m.training for m in module.modules()]
    module.eval()
    try:
        yield
    finally:
        for m, f in zip(module.modules(), flags):
            m.training = f


@torch.no_grad()
def classifier_features(clf: ImageClassifier, images: Tensor, batch_size: int = 500) -> Tensor:
    """Penultimate features ``(N, D)`` of uint8 images ``(N, C, H, W)``; ``clf`` keeps its train/eval mode."""
    dev = next(clf.parameters()).device
    with _eval_mode(clf):
        out = [clf.features(to_model_range(images[s:s + batch_size]).to(dev)).cpu()
               for s in range(0, len(images), batch_size)]
    return torch.cat(out).double()


@torch.no_grad()
def classifier_outputs(clf: ImageClassifier, images: Tensor, batch_size: int = 500) -> tuple[Tensor, Tensor]:
    """Penultimate features ``(N, D)`` float64 and predicted classes ``(N,)`` of uint8 images ``(N, C, H, W)``.

    One pass through the network: the classifier's logits are its linear head on the pooled
    features (``ImageClassifier.forward``), so the head is applied to the features already
    computed. Bitwise the same as :func:`classifier_features` followed by
    :func:`image.classifier.predict` (same batches, same operations), at about half the cost.
    """
    dev = next(clf.parameters()).device
    feats, preds = [], []
    with _eval_mode(clf):
        for s in range(0, len(images), batch_size):
            f = clf.features(to_model_range(images[s:s + batch_size]).to(dev))
            preds.append(clf.head(f).argmax(1).cpu())
            feats.append(f.cpu())
    if not feats:
        return torch.zeros(0, clf.feature_dim, dtype=torch.float64), torch.zeros(0, dtype=torch.long)
    return torch.cat(feats).double(), torch.cat(preds)


def _check(images: Tensor, labels: Tensor) -> Tensor:
    if not isinstance(images, Tensor) or images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"images must be uint8 (N, 1|3, H, W), got {getattr(images, 'dtype', type(images))} "
                         f"{tuple(getattr(images, 'shape', ()))}")
    labels = torch.as_tensor(labels).long().flatten()
    if len(labels) != len(images):
        raise ValueError(f"labels must have one entry per image ({len(images)}), got {len(labels)}")
    if len(images) < 4:
        raise ValueError(f"need at least 4 images to evaluate (k-NN radii, covariances), got {len(images)}")
    return labels


def _reference(dataset_name: str, root: str | None, shape: tuple[int, int, int], cache_dir: str,
               on_error: str = "raise", classifier: ImageClassifier | None = None, **clf_kwargs):
    """(classifier, test ImageSet, test features, size/channel arguments) for images of ``shape``.

    ``classifier``: use it (nothing cached is loaded or trained); else the cached evaluation classifier.
    """
    C, H, W = shape
    if dataset_name == "folder":  # no split and no native size: the folder's images at the samples' size
        split, native, size, channels = "train", None, H, C
        if H != W:
            raise ValueError(f"generated images are {H}x{W}: folder images are compared at a square size")
    else:
        split = "test"
        native = load_images(dataset_name, split, root=root)
        size = None if native.shape[1:] == (H, W) else H
        if H != W and size is not None:
            raise ValueError(f"generated images are {H}x{W}, the data set's {native.shape[1:]}: cannot match non-square")
        channels = None if native.shape[0] == C else C

    def test_images() -> ImageSet:
        test = native if size is None and channels is None else load_images(dataset_name, split, root=root,
                                                                            image_size=size, channels=channels,
                                                                            on_error=on_error)
        if test.shape != shape:
            raise ValueError(f"the {dataset_name} test images are {test.shape}, the generated ones {shape}")
        return test

    if classifier is not None:
        test = test_images()
        return classifier, test, classifier_features(classifier, test.images), size, channels
    key = (dataset_name, root, size, channels, str(cache_dir), on_error, repr(sorted(clf_kwargs.items())))
    if key not in _REFERENCE_CACHE:
        clf = load_or_train_classifier(dataset_name, cache_dir, root=root, image_size=size, channels=channels,
                                       on_error=on_error, **clf_kwargs)
        test = test_images()
        _REFERENCE_CACHE.clear()  # keep one data set's features in memory
        _REFERENCE_CACHE[key] = (clf, test, classifier_features(clf, test.images), size, channels)
    return _REFERENCE_CACHE[key]


def _draw_like(train: ImageSet, labels: Tensor, generator: torch.Generator) -> Tensor:
    """Indices of training images with the class counts of ``labels`` (drawn without replacement when possible).

    Every class in ``labels`` must have an image in ``train``: a reference set that left a class
    out would not have the samples' class proportions, so the missing classes are named instead.
    """
    classes, counts = labels.unique(return_counts=True)
    present = train.labels.unique()
    missing = [int(c) for c in classes if not bool((present == c).any())]
    if missing:
        names = train.class_names

        def named(cs):
            return ", ".join(f"{c} ({names[c]!r})" if 0 <= c < len(names) else str(c) for c in cs)

        raise ValueError(f"reference images: class label(s) {missing} have no image in the "
                         f"{train.name or 'given'} training set: labels [{named(missing)}] requested, "
                         f"classes available [{named(present.tolist())}]")
    idx = []
    for c, n in zip(classes, counts):
        pool = torch.nonzero(train.labels == c).flatten()
        pick = torch.randperm(len(pool), generator=generator)[: int(n)]
        if len(pick) < n:
            pick = torch.randint(len(pool), (int(n),), generator=generator)
        idx.append(pool[pick])
    return torch.cat(idx)


def evaluate_samples(images: Tensor, labels: Tensor, dataset_name: str, *, root: str | None = None,
                     cache_dir: str | Path = "outputs/classifiers", k: int = 3, reference: bool = True,
                     seed: int = 0, inception: str | Path | torch.nn.Module | None = None,
                     classifier: ImageClassifier | None = None, on_error: str = "raise",
                     **classifier_kwargs) -> dict:
    """Metrics of generated ``images`` (uint8 ``(N, C, H, W)``) conditioned on ``labels`` ``(N,)`` (module docstring).

    ``classifier``: use this classifier instead of the cached evaluation classifier (its features
    and predictions). ``on_error``: for a folder, ``"skip"`` leaves its unreadable files out of the
    reference images and the classifier's training set, as ``data.on_error=skip`` did for the run.
    ``classifier_kwargs`` go to :func:`image.classifier.load_or_train_classifier`.
    """
    labels = _check(images, labels)
    t0 = time.perf_counter()
    clf, test, test_feats, size, channels = _reference(dataset_name, root, tuple(images.shape[1:]), str(cache_dir),
                                                       on_error, classifier, **classifier_kwargs)
    if int(labels.max()) >= test.num_classes or int(labels.min()) < 0:
        raise ValueError(f"labels must lie in [0, {test.num_classes}) for {dataset_name}, got "
                         f"[{int(labels.min())}, {int(labels.max())}]")
    if reference:  # before any network pass: a class without training images fails here, not after them
        train = load_images(dataset_name, "train", root=root, image_size=size, channels=channels, on_error=on_error)
        idx = _draw_like(train, labels, torch.Generator().manual_seed(seed))
    feats, predicted = classifier_outputs(clf, images)  # one pass gives both (half the network evaluations)
    cc = class_consistency(predicted, labels, test.num_classes)
    pr = precision_recall(test_feats, feats, k=k)
    result = {
        "dataset": dataset_name, "n_samples": len(images), "n_test": len(test), "image_shape": list(images.shape[1:]),
        "class_consistency": cc["class_consistency"], "class_consistency_per_class": cc["per_class"],
        "frechet_distance": frechet_distance(feats, test_feats), "precision": pr["precision"], "recall": pr["recall"],
        "k": k, "classifier_test_accuracy": clf.meta.get("test_accuracy"),
        "classifier_version": clf.meta.get("version"), "classifier_data_sha256": clf.meta.get("data_sha256"),
    }
    if reference:
        ref_feats = classifier_features(clf, train.images[idx])
        ref_pr = precision_recall(test_feats, ref_feats, k=k)
        result.update({"reference_frechet_distance": frechet_distance(ref_feats, test_feats),
                       "reference_precision": ref_pr["precision"], "reference_recall": ref_pr["recall"]})
    if inception is not None:
        result["inception_fid"] = torchmetrics_fid(test.images, images, inception)
    result["seconds"] = round(time.perf_counter() - t0, 2)
    return result


def _default_out(run: Path, sampler: str, nfe: int | None, cfg_scale: float) -> Path:
    name = f"metrics_{sampler}_nfe{'adaptive' if nfe is None else nfe}_cfg{cfg_scale:g}.json"
    return run / name if run.is_dir() else run.with_name(f"{run.stem}_{name}")


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(prog="python -m image.evaluate", description=__doc__.split("\n\n")[0])
    p.add_argument("--run", required=True, help="image.train run directory, checkpoint or ema_*.safetensors file")
    p.add_argument("--per-class", type=int, default=100, help="samples per class")
    p.add_argument("--sampler", default="euler")
    p.add_argument("--nfe", type=int, default=None,
                   help="NFE budget (default 20); leave it out for the adaptive samplers dopri5 and adaptive_sde, "
                        "whose cost follows their tolerances (--option)")
    p.add_argument("--cfg-scale", type=float, default=3.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=250)
    p.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                   help="a keyword option of the core sampler, e.g. rtol=1e-3 (dopri5)")
    p.add_argument("--data-root", default=None, help="data directory (needed for data sets of name 'folder')")
    p.add_argument("--on-error", choices=("raise", "skip"), default=None,
                   help="unreadable files of a folder data set (default: as the run was trained, data.on_error)")
    p.add_argument("--cache-dir", default="outputs/classifiers", help="where evaluation classifiers are kept")
    p.add_argument("--inception", default=None, help="local Inception feature extractor (TorchScript) for FID")
    p.add_argument("--out", default=None, help="metrics JSON (default: beside the checkpoint)")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    from .sample import default_nfe, generate, parse_options

    a.nfe = default_nfe(a.sampler, a.nfe)
    t0 = time.perf_counter()
    images, labels, info = generate(a.run, a.per_class, a.sampler, a.nfe, a.cfg_scale, a.seed,
                                    batch_size=a.batch_size, return_info=True, **parse_options(a.option))
    sampling_seconds = time.perf_counter() - t0
    dataset = info["run"]["dataset"]
    root = a.data_root or (info["run"].get("data") or {}).get("root")
    if dataset == "folder" and root is None:
        raise SystemExit("this run trained on a folder of images: give it with --data-root")
    on_error = a.on_error or (info["run"].get("data") or {}).get("on_error", "raise")
    metrics = evaluate_samples(images, labels, dataset, root=root, cache_dir=a.cache_dir, seed=a.seed,
                               inception=a.inception, on_error=on_error)
    result = {"run": str(Path(a.run).resolve()), "sampler": a.sampler, "nfe": info.get("nfe"),
              "network_evals_per_sample": info.get("network_evals_per_sample"), "cfg_scale": a.cfg_scale,
              "per_class": a.per_class, "seed": a.seed, "sampling_seconds": round(sampling_seconds, 2), **metrics}
    out = Path(a.out) if a.out else _default_out(Path(a.run), a.sampler, a.nfe, a.cfg_scale)
    from core.engine.checkpoint import atomic_write

    atomic_write(out, lambda f: f.write(json.dumps(result, indent=1).encode()))
    keys = ("class_consistency", "frechet_distance", "precision", "recall", "reference_frechet_distance",
            "classifier_test_accuracy", "inception_fid")
    for key in keys:
        if result.get(key) is not None:
            print(f"{key:28s} {result[key]:.4f}")
    print(f"metrics written to {out}")
    return result


if __name__ == "__main__":
    main()
