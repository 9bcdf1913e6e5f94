"""Sample-quality metrics of the image domain, on feature vectors ``(N, D)`` of any extractor.

- :func:`frechet_distance`: the Frechet (2-Wasserstein) distance between Gaussians fitted to two
  feature sets, ``||mu1 - mu2||^2 + Tr(S1 + S2 - 2 (S1 S2)^{1/2})`` (Dowson & Landau 1982; as FID,
  Heusel et al. 2017, eq. 6). The trace of the matrix square root is computed from the
  eigenvalues of the symmetric PSD matrix ``S1^{1/2} S2 S1^{1/2}``, which has the same spectrum
  as ``S1 S2`` but no complex round-off.
- :func:`precision_recall`: improved precision and recall (Kynkaanniemi et al. 2019, eq. 1-2):
  each set's manifold is the union of balls around its points with radius the distance to the
  k-th nearest neighbour in the same set; precision is the fraction of generated samples inside
  the real manifold, recall the fraction of real samples inside the generated one.
- :func:`class_consistency`: the fraction of class-conditional samples that a classifier assigns
  to the class they were conditioned on (and per class).
- :func:`torchmetrics_fid`: FID computed by torchmetrics' ``FrechetInceptionDistance`` with a
  feature extractor given as a module or a local file (a TorchScript Inception, or torchmetrics'
  own Inception weights when torch-fidelity is installed). Nothing is downloaded.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

__all__ = ["gaussian_stats", "frechet_distance", "frechet_distance_from_stats", "kth_nn_radii",
           "precision_recall", "class_consistency", "torchmetrics_fid", "load_feature_extractor"]


def _as_features(x, name: str) -> np.ndarray:
    a = x.detach().cpu().double().numpy() if isinstance(x, Tensor) else np.asarray(x, dtype=np.float64)
    if a.ndim != 2 or a.shape[0] < 2:
        raise ValueError(f"{name} must be a (N, D) feature matrix with N >= 2, got shape {a.shape}")
    if not np.isfinite(a).all():
        raise ValueError(f"{name} holds {int((~np.isfinite(a)).sum())} non-finite values")
    return a


def gaussian_stats(features) -> tuple[np.ndarray, np.ndarray]:
    """Mean ``(D,)`` and unbiased covariance ``(D, D)`` (float64) of ``features (N, D)``."""
    a = _as_features(features, "features")
    return a.mean(0), np.cov(a, rowvar=False).reshape(a.shape[1], a.shape[1])


def _sqrtm_psd(s: np.ndarray) -> np.ndarray:
    w, v = np.linalg.eigh((s + s.T) / 2)
    return (v * np.sqrt(np.clip(w, 0, None))) @ v.T


def frechet_distance_from_stats(mu1, s1, mu2, s2) -> float:
    """``||mu1 - mu2||^2 + Tr(S1) + Tr(S2) - 2 Tr((S1 S2)^{1/2})`` for PSD covariances ``S1, S2``."""
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    s1, s2 = np.atleast_2d(np.asarray(s1, np.float64)), np.atleast_2d(np.asarray(s2, np.float64))
    if mu1.shape != mu2.shape or s1.shape != s2.shape or s1.shape != (mu1.size, mu1.size):
        raise ValueError(f"frechet_distance: mismatched shapes mu {mu1.shape}, {mu2.shape}, cov {s1.shape}, {s2.shape}")
    r1 = _sqrtm_psd(s1)
    m = r1 @ s2 @ r1  # similar to S1 S2 (same eigenvalues), but symmetric PSD
    tr_sqrt = np.sqrt(np.clip(np.linalg.eigvalsh((m + m.T) / 2), 0, None)).sum()
    d = float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * tr_sqrt)
    return max(d, 0.0)  # round-off can give -1e-12 for identical sets


def frechet_distance(features_a, features_b) -> float:
    """Frechet distance between Gaussians fitted to two feature sets ``(N, D)``, ``(M, D)`` (FID's formula)."""
    a, b = _as_features(features_a, "features_a"), _as_features(features_b, "features_b")
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"feature dimensions differ: {a.shape[1]} vs {b.shape[1]}")
    return frechet_distance_from_stats(*gaussian_stats(a), *gaussian_stats(b))


def _as_tensor(x, name: str) -> Tensor:
    t = torch.as_tensor(x).detach().cpu().double() if not isinstance(x, Tensor) else x.detach().cpu().double()
    if t.ndim != 2 or len(t) < 1:
        raise ValueError(f"{name} must be a non-empty (N, D) feature matrix, got shape {tuple(t.shape)}")
    if not torch.isfinite(t).all():
        raise ValueError(f"{name} holds non-finite values")
    return t


def kth_nn_radii(features: Tensor, k: int = 3, batch_size: int = 1024) -> Tensor:
    """Distance of each row to its ``k``-th nearest *other* row of the same set ``(N,)``."""
    f = _as_tensor(features, "features")
    if not 1 <= k < len(f):
        raise ValueError(f"k must be in [1, {len(f) - 1}] for {len(f)} points, got {k}")
    radii = []
    for s in range(0, len(f), batch_size):
        d = torch.cdist(f[s:s + batch_size], f)
        # the k+1 smallest include the point itself (distance 0); duplicates also count as neighbours
        radii.append(d.topk(k + 1, dim=1, largest=False).values[:, k])
    return torch.cat(radii)


def _inside(query: Tensor, ref: Tensor, radii: Tensor, batch_size: int) -> Tensor:
    """For each query row: is it within ``radii[j]`` of some reference row ``j``? ``(N_query,)`` bool."""
    out = []
    for s in range(0, len(query), batch_size):
        d = torch.cdist(query[s:s + batch_size], ref)
        out.append((d <= radii[None, :]).any(dim=1))
    return torch.cat(out)


def precision_recall(real_features, fake_features, k: int = 3, batch_size: int = 1024) -> dict[str, float]:
    """Improved precision and recall (Kynkaanniemi et al. 2019) of ``fake`` against ``real`` features.

    precision = mean over fake samples of [fake in manifold(real)], recall = mean over real samples
    of [real in manifold(fake)], where manifold(S) = union over s in S of the ball around s of radius
    its distance to its k-th nearest neighbour in S.
    """
    real, fake = _as_tensor(real_features, "real_features"), _as_tensor(fake_features, "fake_features")
    if real.shape[1] != fake.shape[1]:
        raise ValueError(f"feature dimensions differ: {real.shape[1]} vs {fake.shape[1]}")
    r_real, r_fake = kth_nn_radii(real, k, batch_size), kth_nn_radii(fake, k, batch_size)
    precision = _inside(fake, real, r_real, batch_size).double().mean().item()
    recall = _inside(real, fake, r_fake, batch_size).double().mean().item()
    return {"precision": precision, "recall": recall}


def class_consistency(predicted: Tensor, labels: Tensor, num_classes: int | None = None) -> dict:
    """Fraction of samples whose predicted class equals the class they were conditioned on.

    Returns ``{"class_consistency": float, "per_class": [float | None, ...]}`` (None for a class with
    no samples).
    """
    predicted, labels = torch.as_tensor(predicted).long().flatten(), torch.as_tensor(labels).long().flatten()
    if predicted.shape != labels.shape or len(labels) == 0:
        raise ValueError(f"predicted and labels must be non-empty and of equal length, got "
                         f"{tuple(predicted.shape)} and {tuple(labels.shape)}")
    n = num_classes if num_classes is not None else int(max(labels.max(), predicted.max())) + 1
    hit = (predicted == labels).double()
    per = [hit[labels == c].mean().item() if (labels == c).any() else None for c in range(n)]
    return {"class_consistency": hit.mean().item(), "per_class": per}


# ----------------------------------------------------------------------------- Inception FID (torchmetrics)


class _UInt8RGB(nn.Module):
    """Feeds a feature extractor uint8 RGB images (gray ones repeated to 3 channels); features ``(N, D)``."""

    def __init__(self, extractor: nn.Module):
        super().__init__()
        self.extractor = extractor

    def forward(self, x: Tensor) -> Tensor:
        if x.shape[1] == 1:
            x = x.repeat(1, 3, 1, 1)
        f = self.extractor(x)
        if isinstance(f, (tuple, list)):
            f = f[0]
        return f.flatten(1)


def load_feature_extractor(path: str | Path) -> nn.Module:
    """A local TorchScript feature extractor (uint8 ``(N, 3, H, W)`` -> features), e.g. an Inception-v3 export."""
    p = Path(path)
    if not p.is_file():
        raise ValueError(f"feature extractor file does not exist: {str(path)!r}")
    try:
        return torch.jit.load(str(p), map_location="cpu").eval()
    except RuntimeError as e:
        raise ValueError(f"{p} is not a TorchScript module ({e}); give a TorchScript Inception feature extractor, "
                         "or install torch-fidelity to use its Inception weights file") from e


@torch.no_grad()
def torchmetrics_fid(real: Tensor, fake: Tensor, feature: nn.Module | str | Path, batch_size: int = 200) -> float:
    """FID by torchmetrics' ``FrechetInceptionDistance`` between uint8 image sets ``(N, C, H, W)``.

    ``feature``: an ``nn.Module`` taking uint8 RGB batches and returning ``(N, D)`` features; or a local
    file: a TorchScript extractor, else (when torch-fidelity is installed) torchmetrics' own
    ``inception-v3-compat`` network with ``feature_extractor_weights_path`` = that file (2048-d pool
    features, the standard FID network). Gray images are repeated to 3 channels. ``real`` and ``fake``
    must have the same ``(C, H, W)`` (a ValueError names both shapes otherwise).
    """
    from torchmetrics.image.fid import FrechetInceptionDistance

    for name, x in (("real", real), ("fake", fake)):
        if not isinstance(x, Tensor) or x.dtype != torch.uint8 or x.ndim != 4 or x.shape[1] not in (1, 3):
            raise ValueError(f"{name} images must be uint8 (N, 1|3, H, W), got {getattr(x, 'dtype', type(x))} "
                             f"{tuple(getattr(x, 'shape', ()))}")
    if real.shape[1:] != fake.shape[1:]:
        # an extractor that pools would silently compare images of two sizes (or gray with colour), one of
        # fixed input size fails deep inside torchmetrics: both sets must be at one (C, H, W)
        raise ValueError(f"real and fake images must have the same (C, H, W), got real {tuple(real.shape)} and "
                         f"fake {tuple(fake.shape)}: resize or pad one set (image.data.load_images(image_size=..., "
                         "channels=...)) first")
    if isinstance(feature, (str, Path)):
        p = Path(feature)
        try:
            module: nn.Module = _UInt8RGB(load_feature_extractor(p))
            metric = FrechetInceptionDistance(feature=module, input_img_size=(3, *real.shape[-2:]))
        except ValueError:
            import importlib.util

            if importlib.util.find_spec("torch_fidelity") is None:
                raise
            metric = FrechetInceptionDistance(feature=2048, feature_extractor_weights_path=str(p))
    elif isinstance(feature, nn.Module):
        metric = FrechetInceptionDistance(feature=_UInt8RGB(feature.eval()), input_img_size=(3, *real.shape[-2:]))
    else:
        raise TypeError(f"feature must be an nn.Module or a file path, got {type(feature).__name__}")
    for images, is_real in ((real, True), (fake, False)):
        for s in range(0, len(images), batch_size):
            x = images[s:s + batch_size]
            metric.update(x.repeat(1, 3, 1, 1) if x.shape[1] == 1 else x, real=is_real)
    return float(metric.compute())
