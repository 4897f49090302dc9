"""Tests of fastdiff.demo.data (digits, mixture samples, digit classifier and its features) and fastdiff.demo.images."""

import pytest
import torch

from fastdiff.demo.data import DIGITS_NUM_CLASSES, digit_classifier, digits, digits_features, mixture_dataset, to_pixels
from fastdiff.mixtures import class_conditional_mixture, ring_mixture


@pytest.fixture(scope="module")
def digit_data():
    pytest.importorskip("sklearn")
    return digits()


def test_digits(digit_data):
    x, y = digit_data.tensors
    assert x.shape == (1797, 1, 8, 8) and x.dtype == torch.float32
    assert y.shape == (1797,) and y.dtype == torch.int64
    assert x.min() == -1 and x.max() == 1
    assert sorted(y.unique().tolist()) == list(range(DIGITS_NUM_CLASSES))
    raw = digits(scale=False).tensors[0]
    assert raw.min() == 0 and raw.max() == 16
    assert torch.allclose(to_pixels(x), raw)  # to_pixels inverts the scaling
    assert torch.equal(to_pixels(torch.tensor([-3.0, 5.0])), torch.tensor([0.0, 16.0]))  # clamped


def test_mixture_dataset():
    mix = class_conditional_mixture(num_classes=3)
    a, b = mixture_dataset(mix, 200, seed=5), mixture_dataset(mix, 200, seed=5)
    x, y = a.tensors
    assert x.shape == (200, 2) and x.dtype == torch.float32 and y.dtype == torch.int64
    assert torch.equal(x, b.tensors[0]) and torch.equal(y, b.tensors[1])  # same seed, same data
    assert not torch.equal(x, mixture_dataset(mix, 200, seed=6).tensors[0])
    assert set(y.tolist()) <= set(mix.classes.tolist())
    # Each label's samples lie near that class's modes.
    for c in mix.classes.tolist():
        near = mix.means[mix.labels == c].float()
        d = torch.cdist(x[y == c], near).min(dim=1).values
        assert d.max() < 2.0
    unl = mixture_dataset(ring_mixture(), 10)
    assert len(unl.tensors) == 1 and unl.tensors[0].shape == (10, 2)
    with pytest.raises(TypeError, match="GaussianMixture"):
        mixture_dataset("ring", 10)
    with pytest.raises(ValueError, match="n must be"):
        mixture_dataset(mix, 0)


def test_digit_classifier(digit_data):
    clf = digit_classifier()
    assert clf.score_real > 0.95
    x, y = digit_data.tensors
    pred = clf.predict(x[:200])
    assert pred.shape == (200,) and pred.dtype == torch.int64
    assert clf.accuracy(x[:200], y[:200]) > 0.95
    assert clf.predict(x[:5, 0]).tolist() == clf.predict(x[:5].reshape(5, 64)).tolist() == pred[:5].tolist()
    with pytest.raises(ValueError, match="8x8"):
        clf.predict(torch.zeros(3, 1, 4, 4))



def test_digits_features_tell_real_from_noise(digit_data):
    """The features `fastdiff evaluate --features digits` passes to fastdiff.evaluation (the demo brings them: the
    library does not import the demo)."""
    from fastdiff.evaluation import frechet_distance

    features = digits_features()
    real = digit_data.tensors[0]
    f = features(real)
    assert f.shape == (len(real), 10)
    floor = frechet_distance(f[::2], f[1::2])
    noise = frechet_distance(features(torch.rand(500, 1, 8, 8) * 2 - 1), f[1::2])
    assert floor < 0.1 * noise

def test_labelled_grid(tmp_path):
    PIL = pytest.importorskip("PIL.Image")
    from fastdiff.demo.images import labelled_grid

    g = torch.Generator().manual_seed(0)
    a, b = torch.rand(3, 4, 8, 8, generator=g) * 2 - 1, torch.rand(3, 2, 1, 8, 8, generator=g) * 2 - 1
    # Without text the size is exact: border max(2 pad, 4), panels max(6 pad, 12) apart.
    img = labelled_grid([("", a), ("", b)], scale=4, pad=2)
    assert img.size == (2 * 4 + (4 * 32 + 3 * 2) + 12 + (2 * 32 + 2), 2 * 4 + 3 * 32 + 2 * 2)
    assert img.getpixel((4, 4)) == round((a[0, 0, 0, 0].item() + 1) / 2 * 255)  # first pixel, upscaled
    assert img.getpixel((7, 7)) == img.getpixel((4, 4))
    inverted = labelled_grid([("", a), ("", b)], vmin=1.0, vmax=-1.0)  # dark ink on white
    assert inverted.getpixel((4, 4)) == 255 - img.getpixel((4, 4))
    path = tmp_path / "grid.png"
    titled = labelled_grid([("samples", a), ("cfg=3", b)], row_labels=["0", "1", "2"], path=path)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with PIL.open(path) as saved:
        assert saved.size == titled.size
    assert titled.size[0] > img.size[0] and titled.size[1] > img.size[1]  # room for labels and titles
    with pytest.raises(ValueError, match="row_labels"):
        labelled_grid([("x", a)], row_labels=["0"])
    with pytest.raises(ValueError, match="same rows"):
        labelled_grid([("x", a), ("y", torch.rand(2, 2, 8, 8))])
    with pytest.raises(ValueError, match=r"\[rows, cols, H, W\]"):
        labelled_grid([("x", torch.rand(8, 8))])
