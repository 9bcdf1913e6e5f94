"""image.metrics / image.classifier / image.evaluate: closed forms, constructed cases, cache behaviour."""

import json
import logging

import numpy as np
import pytest
import scipy.linalg
import torch
from torch import nn

from image.classifier import ClassifierRecipe, ImageClassifier, load_classifier, load_or_train_classifier
from image.data import load_images, to_model_range
from image.metrics import (
    class_consistency,
    frechet_distance,
    frechet_distance_from_stats,
    kth_nn_radii,
    precision_recall,
    torchmetrics_fid,
)

TINY = ClassifierRecipe(widths=[8, 16], epochs=1, min_steps=100, batch_size=64, lr=1e-2, warmup_steps=5)
FASTEST = ClassifierRecipe(widths=[4, 8], epochs=1, min_steps=5, batch_size=32, warmup_steps=1)  # cache logic only


def random_spd(d, rng):
    a = rng.standard_normal((d, d))
    return a @ a.T / d + 0.1 * np.eye(d)


# ----------------------------------------------------------------------------- Frechet distance


def test_frechet_distance_closed_forms():
    rng = np.random.default_rng(0)
    # diagonal covariances: sum (mu1 - mu2)^2 + sum (sqrt(a) - sqrt(b))^2
    mu1, mu2 = rng.standard_normal(5), rng.standard_normal(5)
    a, b = rng.uniform(0.1, 3, 5), rng.uniform(0.1, 3, 5)
    expect = ((mu1 - mu2) ** 2).sum() + ((np.sqrt(a) - np.sqrt(b)) ** 2).sum()
    assert frechet_distance_from_stats(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(expect, rel=1e-10)
    # general SPD matrices: against scipy's matrix square root of S1 S2
    s1, s2 = random_spd(6, rng), random_spd(6, rng)
    mu1, mu2 = rng.standard_normal(6), rng.standard_normal(6)
    ref = ((mu1 - mu2) ** 2).sum() + np.trace(s1 + s2 - 2 * scipy.linalg.sqrtm(s1 @ s2).real)
    assert frechet_distance_from_stats(mu1, s1, mu2, s2) == pytest.approx(ref, rel=1e-8)
    assert frechet_distance_from_stats(mu1, s1, mu1, s1) == pytest.approx(0, abs=1e-9)


def test_frechet_distance_of_samples_approaches_the_gaussians():
    g = torch.Generator().manual_seed(0)
    rng = np.random.default_rng(1)
    s1, s2 = random_spd(3, rng), random_spd(3, rng)
    mu1, mu2 = np.array([0.0, 1.0, -1.0]), np.array([1.0, 0.0, 0.5])
    n = 200_000
    x = torch.randn(n, 3, generator=g, dtype=torch.float64) @ torch.from_numpy(np.linalg.cholesky(s1)).T + torch.from_numpy(mu1)
    y = torch.randn(n, 3, generator=g, dtype=torch.float64) @ torch.from_numpy(np.linalg.cholesky(s2)).T + torch.from_numpy(mu2)
    expect = frechet_distance_from_stats(mu1, s1, mu2, s2)
    assert frechet_distance(x, y) == pytest.approx(expect, rel=0.02)
    # 1-D: (m1 - m2)^2 + (sd1 - sd2)^2
    u = 2.0 + 3.0 * torch.randn(n, 1, generator=g, dtype=torch.float64)
    v = -1.0 + 0.5 * torch.randn(n, 1, generator=g, dtype=torch.float64)
    assert frechet_distance(u, v) == pytest.approx(9.0 + 6.25, rel=0.01)
    with pytest.raises(ValueError, match="feature dimensions"):
        frechet_distance(x, u)
    with pytest.raises(ValueError, match="non-finite"):
        frechet_distance(torch.tensor([[0.0], [float("nan")]]), u)


# ----------------------------------------------------------------------------- precision / recall


def test_precision_recall_constructed_cases():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(300, 4, generator=g)
    assert precision_recall(a, a) == {"precision": 1.0, "recall": 1.0}
    far = a + 100.0
    assert precision_recall(a, far) == {"precision": 0.0, "recall": 0.0}
    # mode dropping: real has two far-apart clusters, the generator covers one of them
    two = torch.cat([torch.randn(200, 4, generator=g), torch.randn(200, 4, generator=g) + 50.0])
    one = torch.randn(200, 4, generator=g) + 50.0
    pr = precision_recall(two, one)
    assert pr["precision"] > 0.9 and 0.45 < pr["recall"] <= 0.5
    pr = precision_recall(one, two)  # the generator also makes a cluster the data lacks
    assert 0.45 < pr["precision"] <= 0.5 and pr["recall"] > 0.9
    # an exact subset: every sample is a real point (precision 1); it covers exactly one cluster
    assert precision_recall(two, two[200:]) == {"precision": 1.0, "recall": 0.5}


def test_precision_recall_matches_brute_force():
    g = torch.Generator().manual_seed(1)
    real, fake = torch.randn(40, 3, generator=g), 0.5 * torch.randn(30, 3, generator=g) + 1.5
    k = 3

    def radii(s):
        return [sorted(float((p - q).norm()) for j, q in enumerate(s) if j != i)[k - 1] for i, p in enumerate(s)]

    rr, rf = radii(real), radii(fake)
    prec = np.mean([any(float((f - r).norm()) <= rr[j] for j, r in enumerate(real)) for f in fake])
    rec = np.mean([any(float((r - f).norm()) <= rf[j] for j, f in enumerate(fake)) for r in real])
    torch.testing.assert_close(kth_nn_radii(real, k), torch.tensor(rr, dtype=torch.float64))
    pr = precision_recall(real, fake, k=k, batch_size=7)
    assert pr["precision"] == pytest.approx(prec) and pr["recall"] == pytest.approx(rec)
    assert 0 < prec < 1 and 0 < rec < 1  # a non-trivial case
    with pytest.raises(ValueError, match="k must be"):
        precision_recall(real[:3], fake, k=3)


def test_class_consistency():
    labels = torch.tensor([0, 0, 1, 1, 2, 2])
    assert class_consistency(labels, labels)["class_consistency"] == 1.0
    out = class_consistency(torch.tensor([0, 1, 1, 1, 0, 0]), labels, num_classes=4)
    assert out["class_consistency"] == pytest.approx(0.5) and out["per_class"] == [0.5, 1.0, 0.0, None]
    with pytest.raises(ValueError, match="equal length"):
        class_consistency(labels[:2], labels)


# ----------------------------------------------------------------------------- torchmetrics FID


class TinyExtractor(nn.Module):
    """A random conv feature extractor standing in for Inception (uint8 RGB in, (N, 16) out)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 16, 3, padding=1)

    def forward(self, x):
        return torch.tanh(self.conv(x.float() / 127.5 - 1)).mean(dim=(2, 3))


def test_torchmetrics_fid_with_a_substituted_extractor(tmp_path):
    test = load_images("digits", "test")
    other = load_images("digits", "train").images[:300] // 2  # a darker image distribution
    ext = TinyExtractor()
    assert torchmetrics_fid(test.images, test.images, ext) == pytest.approx(0, abs=1e-6)
    fid = torchmetrics_fid(test.images, other, ext, batch_size=100)
    with torch.no_grad():
        f_test, f_other = ext(test.images.repeat(1, 3, 1, 1)), ext(other.repeat(1, 3, 1, 1))
    assert fid > 1e-2 and fid == pytest.approx(frechet_distance(f_test, f_other), rel=1e-3)
    path = tmp_path / "extractor.pt"
    torch.jit.script(ext).save(str(path))
    assert torchmetrics_fid(test.images, other, str(path)) == pytest.approx(fid, rel=1e-5)
    with pytest.raises(ValueError, match="does not exist"):
        torchmetrics_fid(test.images, other, str(tmp_path / "missing.pt"))


# ----------------------------------------------------------------------------- classifier


@pytest.fixture(scope="module")
def tiny_classifier(tmp_path_factory):
    cache = tmp_path_factory.mktemp("classifiers")
    return cache, load_or_train_classifier("digits", cache, recipe=TINY, progress=False, device="cpu")


def test_classifier_save_load_round_trip_and_reuse(tiny_classifier, caplog):
    cache, clf = tiny_classifier
    files = sorted(p.name for p in cache.iterdir())
    assert files == ["digits_1x8x8_v1.json", "digits_1x8x8_v1.safetensors"]  # the resumable run was removed
    meta = json.loads((cache / "digits_1x8x8_v1.json").read_text())
    assert meta["dataset"] == "digits" and meta["train_images"] == 1438 and meta["image_shape"] == [1, 8, 8]
    assert meta["version"] == "1" and meta["test_accuracy"] > 0.5  # 100 steps of a tiny net: far above chance
    x = to_model_range(load_images("digits", "test").images[:50])
    loaded = load_classifier(cache / "digits_1x8x8_v1.safetensors")
    torch.testing.assert_close(loaded(x), clf(x), rtol=0, atol=0)
    with caplog.at_level(logging.INFO, logger="polydiff.image.classifier"):
        again = load_or_train_classifier("digits", cache, recipe=TINY, progress=False)
    assert "using cached classifier" in caplog.text
    torch.testing.assert_close(again(x), clf(x), rtol=0, atol=0)
    assert clf.features(x).shape == (50, 16) and clf.features(x, spatial=True).shape == (50, 16, 4, 4)
    assert clf.features(torch.zeros(2, 1, 28, 28), spatial=True).shape == (2, 16, 14, 14)  # any size
    with pytest.raises(ValueError, match="classifier input"):
        clf(torch.zeros(2, 3, 8, 8))


def test_classifier_retrains_when_metadata_or_weights_do_not_match(tmp_path, caplog):
    stale = tmp_path / "digits_1x8x8_v1.run" / "checkpoints" / "ckpt_00000003.pt"
    stale.parent.mkdir(parents=True)
    stale.write_bytes(b"left by a run of other data")  # not resumed from: no matching request stamp
    load_or_train_classifier("digits", tmp_path, recipe=FASTEST, progress=False, device="cpu")
    assert not stale.parent.exists()
    path = tmp_path / "digits_1x8x8_v1.safetensors"
    first = path.read_bytes()
    other = ClassifierRecipe(**{**FASTEST.__dict__, "seed": 1})
    with caplog.at_level(logging.WARNING, logger="polydiff.image.classifier"):
        clf = load_or_train_classifier("digits", tmp_path, recipe=other, progress=False, device="cpu")
    assert "does not match (recipe differ)" in caplog.text
    assert clf.meta["recipe"]["seed"] == 1 and path.read_bytes() != first
    meta = json.loads(path.with_suffix(".json").read_text())
    meta["data_sha256"] = "0" * 64  # as if the data set had changed
    path.with_suffix(".json").write_text(json.dumps(meta))
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="polydiff.image.classifier"):
        load_or_train_classifier("digits", tmp_path, recipe=other, progress=False, device="cpu")
    assert "data_sha256 differ" in caplog.text
    path.write_bytes(path.read_bytes()[:-8] + b"\0" * 8)  # damaged weights
    with pytest.raises(ValueError, match="do not match the hash"):
        load_classifier(path)


# ----------------------------------------------------------------------------- evaluate_samples


def test_evaluate_samples_on_real_and_wrong_labels(tiny_classifier):
    from image.evaluate import evaluate_samples

    cache, clf = tiny_classifier
    test = load_images("digits", "test")
    m = evaluate_samples(test.images, test.labels, "digits", cache_dir=cache, recipe=TINY, progress=False)
    assert m["class_consistency"] == pytest.approx(clf.meta["test_accuracy"])  # real test images = test accuracy
    assert m["frechet_distance"] == pytest.approx(0, abs=1e-8) and m["precision"] == 1.0 and m["recall"] == 1.0
    assert m["n_test"] == 359 and m["reference_frechet_distance"] > 0
    wrong = (test.labels + 1) % 10
    assert evaluate_samples(test.images, wrong, "digits", cache_dir=cache, recipe=TINY,
                            reference=False)["class_consistency"] < 0.5
    noise = torch.randint(0, 256, test.images.shape, generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    bad = evaluate_samples(noise, test.labels, "digits", cache_dir=cache, recipe=TINY, reference=False)
    assert bad["frechet_distance"] > 10 * m["reference_frechet_distance"] and bad["precision"] < 0.2
    with pytest.raises(ValueError, match="uint8"):
        evaluate_samples(to_model_range(test.images), test.labels, "digits", cache_dir=cache, recipe=TINY)
    with pytest.raises(ValueError, match="labels must lie"):
        evaluate_samples(test.images, test.labels + 10, "digits", cache_dir=cache, recipe=TINY)


def test_evaluate_samples_with_a_given_classifier_trains_none(tiny_classifier, tmp_path):
    from image.classifier import accuracy
    from image.evaluate import evaluate_samples

    _, clf = tiny_classifier
    test = load_images("digits", "test")
    empty = tmp_path / "no_classifiers"
    m = evaluate_samples(test.images, test.labels, "digits", cache_dir=empty, classifier=clf, reference=False)
    assert not empty.exists()  # no evaluation classifier was trained or cached
    assert m["class_consistency"] == pytest.approx(accuracy(clf, test)) and m["frechet_distance"] == pytest.approx(0, abs=1e-8)
    assert m["classifier_test_accuracy"] == clf.meta["test_accuracy"]


def test_evaluate_samples_at_a_padded_size(tmp_path):
    from image.evaluate import evaluate_samples

    test = load_images("digits", "test", image_size=12)
    m = evaluate_samples(test.images[:100], test.labels[:100], "digits", cache_dir=tmp_path, recipe=TINY,
                         progress=False, reference=False)
    assert m["image_shape"] == [1, 12, 12] and m["precision"] == 1.0
    assert (tmp_path / "digits_1x12x12_v1.safetensors").is_file()


def test_train_classifier_is_seeded_and_leaves_the_global_rng_alone(tmp_path):
    from image.classifier import train_classifier

    data = load_images("digits", "train")
    torch.manual_seed(123)
    before = torch.get_rng_state()
    a = train_classifier(data, FASTEST, out_dir=tmp_path / "a", device="cpu", progress=False)
    assert torch.equal(torch.get_rng_state(), before)  # the caller's next draws are unchanged
    torch.manual_seed(7)  # another global state: the recipe's seed alone fixes the weights
    b = train_classifier(data, FASTEST, out_dir=tmp_path / "b", device="cpu", progress=False)
    for (k, va), vb in zip(a.state_dict().items(), b.state_dict().values()):
        torch.testing.assert_close(va, vb, rtol=0, atol=0, msg=k)


def test_classifier_rejects_bad_shapes():
    with pytest.raises(ValueError, match="bad classifier shape"):
        ImageClassifier(1, 1)


def test_evaluate_samples_on_a_folder(tmp_path):
    from PIL import Image

    from image.evaluate import evaluate_samples

    rng = np.random.default_rng(0)
    for c, (lo, hi) in enumerate([(0, 80), (170, 256)]):  # a dark class and a bright class, mixed sizes
        (tmp_path / "data" / f"k{c}").mkdir(parents=True)
        for i in range(12):
            size = (10 + i % 3, 12)
            Image.fromarray(rng.integers(lo, hi, size, dtype=np.uint8)).save(tmp_path / "data" / f"k{c}" / f"{i}.png")
    real = load_images("folder", root=str(tmp_path / "data"), image_size=8)
    m = evaluate_samples(real.images, real.labels, "folder", root=str(tmp_path / "data"), cache_dir=tmp_path / "c",
                         recipe=FASTEST, progress=False, reference=False)
    assert m["n_test"] == 24 and m["precision"] == 1.0 and m["recall"] == 1.0
    assert m["frechet_distance"] == pytest.approx(0, abs=1e-8) and m["classifier_test_accuracy"] is None
    with pytest.raises(ValueError, match="needs root"):
        evaluate_samples(real.images, real.labels, "folder", cache_dir=tmp_path / "c", recipe=FASTEST)


def test_evaluate_cli_writes_metrics_beside_the_checkpoint(tmp_path, monkeypatch, tiny_classifier, capsys):
    import image.evaluate as ev
    import image.sample

    cache, _ = tiny_classifier
    test = load_images("digits", "test")
    calls = []

    def fake_generate(run, n_per_class, sampler, nfe, cfg_scale, seed, **kw):  # stands in for a trained model
        calls.append((run, n_per_class, sampler, nfe, cfg_scale, seed))
        return test.images, test.labels, {"nfe": nfe, "network_evals_per_sample": 2 * nfe, "run": {"dataset": "digits"}}

    monkeypatch.setattr(image.sample, "generate", fake_generate)
    real_evaluate = ev.evaluate_samples
    monkeypatch.setattr(ev, "evaluate_samples", lambda *a, **k: real_evaluate(*a, recipe=TINY, **k))
    ckpt = tmp_path / "ckpt_00000010.pt"
    ckpt.write_bytes(b"")
    result = ev.main(["--run", str(ckpt), "--per-class", "7", "--sampler", "euler", "--nfe", "5", "--cfg-scale", "2",
                      "--cache-dir", str(cache)])
    assert calls == [(str(ckpt), 7, "euler", 5, 2.0, 0)]
    written = json.loads((tmp_path / "ckpt_00000010_metrics_euler_nfe5_cfg2.json").read_text())
    assert written["precision"] == 1.0 and written["sampler"] == "euler" and written == json.loads(json.dumps(result))
    assert "class_consistency" in capsys.readouterr().out


# ----------------------------------------------------------------------------- one classifier pass, clear errors


def test_evaluate_samples_one_pass_equals_the_two_pass_computation():
    """Features and predictions from one pass: every number equals the separate features + predict passes."""
    from image.classifier import predict
    from image.evaluate import _draw_like, classifier_features, evaluate_samples

    train, test = load_images("digits", "train"), load_images("digits", "test")
    torch.manual_seed(1)  # a tiny, randomly initialised classifier
    clf = ImageClassifier(1, 10, widths=(4, 8))
    for m in clf.modules():  # BatchNorm statistics of one batch, so that the random network predicts several classes
        if isinstance(m, nn.BatchNorm2d):
            m.momentum = 1.0
    with torch.no_grad():
        clf(to_model_range(train.images[700:]))
    clf.eval()
    clf.meta = {"test_accuracy": None, "version": "test"}
    images, labels = train.images[:700], train.labels[:700]  # two batches of 500 (the last one partial)
    seen = []
    hook = clf.stages[0].register_forward_hook(lambda m, i, o: seen.append(len(o)))
    try:
        m = evaluate_samples(images, labels, "digits", classifier=clf, seed=5)
    finally:
        hook.remove()
    # each image enters the network once: the test split, the samples, the reference images
    assert sum(seen) == len(test) + 2 * len(images)

    # the direct two-pass computation (the classifier's own forward for the predictions)
    test_feats, feats = classifier_features(clf, test.images), classifier_features(clf, images)
    predicted = predict(clf, images)
    assert len(predicted.unique()) > 1  # a non-trivial case: the random classifier does not predict one class
    cc = class_consistency(predicted, labels, 10)
    pr = precision_recall(test_feats, feats, k=3)
    ref_feats = classifier_features(clf, train.images[_draw_like(train, labels, torch.Generator().manual_seed(5))])
    ref_pr = precision_recall(test_feats, ref_feats, k=3)
    expect = {"class_consistency": cc["class_consistency"], "class_consistency_per_class": cc["per_class"],
              "frechet_distance": frechet_distance(feats, test_feats), "precision": pr["precision"],
              "recall": pr["recall"], "reference_frechet_distance": frechet_distance(ref_feats, test_feats),
              "reference_precision": ref_pr["precision"], "reference_recall": ref_pr["recall"]}
    for key, value in expect.items():
        assert m[key] == value, key  # bitwise: exact equality, no tolerance


def test_draw_like_names_a_class_without_training_images():
    from image.data import ImageSet
    from image.evaluate import _draw_like

    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (6, 1, 4, 4), generator=g, dtype=torch.uint8)
    train = ImageSet(images, torch.tensor([0, 0, 2, 2, 2, 0]), ["cat", "dog", "fox", "owl"], name="toy")
    idx = _draw_like(train, torch.tensor([2, 0, 2]), torch.Generator().manual_seed(0))
    assert sorted(train.labels[idx].tolist()) == [0, 2, 2]  # the requested class counts
    with pytest.raises(ValueError, match=r"class label\(s\) \[1, 3\] have no image in the toy training set") as e:
        _draw_like(train, torch.tensor([0, 1, 3, 1]), torch.Generator().manual_seed(0))
    assert "1 ('dog'), 3 ('owl')" in str(e.value) and "available [0 ('cat'), 2 ('fox')]" in str(e.value)


def test_evaluate_samples_names_a_missing_class_before_any_network_pass(monkeypatch):
    import image.evaluate as ev

    def without_class_3(name, split="train", **kw):  # a training split that lacks class 3
        data = load_images(name, split, **kw)
        if split == "train":
            keep = data.labels != 3
            data.images, data.labels = data.images[keep], data.labels[keep]
        return data

    monkeypatch.setattr(ev, "load_images", without_class_3)
    torch.manual_seed(0)
    clf = ImageClassifier(1, 10, widths=(4,)).eval()
    clf.meta = {}
    test = load_images("digits", "test")
    seen = []
    clf.stages[0].register_forward_hook(lambda m, i, o: seen.append(len(o)))
    with pytest.raises(ValueError, match=r"class label\(s\) \[3\] have no image in the digits training set"):
        ev.evaluate_samples(test.images, test.labels, "digits", classifier=clf)
    assert sum(seen) == len(test)  # only the test split's features: the samples were not run
    m = ev.evaluate_samples(test.images[test.labels != 3], test.labels[test.labels != 3], "digits", classifier=clf)
    assert m["reference_frechet_distance"] > 0


def test_torchmetrics_fid_names_both_shapes_when_they_differ():
    g = torch.Generator().manual_seed(0)
    a = torch.randint(0, 256, (8, 1, 8, 8), generator=g, dtype=torch.uint8)
    ext = TinyExtractor()  # a substituted extractor: no Inception backbone is needed for the check
    for other in (torch.randint(0, 256, (8, 1, 12, 12), generator=g, dtype=torch.uint8),
                  torch.randint(0, 256, (8, 3, 8, 8), generator=g, dtype=torch.uint8)):
        for real, fake in ((a, other), (other, a)):
            with pytest.raises(ValueError, match="same") as e:
                torchmetrics_fid(real, fake, ext)
            assert f"real {tuple(real.shape)}" in str(e.value) and f"fake {tuple(fake.shape)}" in str(e.value)
    assert torchmetrics_fid(a, a[:6], ext) >= 0  # equal (C, H, W), different counts: accepted


def test_classifier_passes_restore_the_callers_train_mode():
    """The feature passes run in eval mode (BatchNorm running statistics, equal features for equal images)
    and hand the classifier back in the mode it came in, submodule by submodule."""
    from image.evaluate import classifier_features, classifier_outputs

    torch.manual_seed(0)
    clf = ImageClassifier(1, 10, widths=(4,))
    clf.stages[0].eval()  # a mixed state the caller chose
    before = [m.training for m in clf.modules()]
    images = load_images("digits", "test").images[:6]
    f1 = classifier_features(clf, images)
    assert [m.training for m in clf.modules()] == before
    f2, _ = classifier_outputs(clf, images)
    assert [m.training for m in clf.modules()] == before and clf.training
    # eval-mode features do not depend on the batch they sit in (train-mode BatchNorm would)
    torch.testing.assert_close(classifier_features(clf, images[:3]), f1[:3])
    torch.testing.assert_close(f1, f2)
