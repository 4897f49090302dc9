"""Small datasets for the demos and tests: scikit-learn's 8x8 digits and Gaussian-mixture samples.

The digits ship with scikit-learn (no download); scikit-learn is imported only when needed
(``pip install scikit-learn`` or ``pip install fastdiff[demo]``).
"""

from __future__ import annotations

import numbers

import numpy as np
import torch
from torch.utils.data import TensorDataset

__all__ = ["DIGITS_NUM_CLASSES", "digits", "to_pixels", "mixture_dataset", "digit_classifier",
           "DigitClassifier", "digits_features"]

DIGITS_NUM_CLASSES = 10
_DIGITS_MAX = 16.0  # load_digits pixels are integers 0..16


def _sklearn():
    try:
        import sklearn  # noqa: F401
    except ImportError as exc:
        raise ImportError("the digits data set needs scikit-learn: pip install scikit-learn "
                          "(or pip install 'fastdiff[demo]')") from exc


def _load_digits():
    _sklearn()
    from sklearn.datasets import load_digits
    d = load_digits()
    return d.images, d.target


def digits(scale: bool = True) -> TensorDataset:
    """The 1797 scikit-learn digits as ``(x float32 [1797, 1, 8, 8], y int64 [1797])``.

    With ``scale=True`` pixels 0..16 map to [-1, 1] (``x / 8 - 1``); otherwise they stay 0..16.
    """
    images, target = _load_digits()
    x = torch.as_tensor(images, dtype=torch.float32)[:, None]
    if scale:
        x = x / (_DIGITS_MAX / 2) - 1.0
    return TensorDataset(x, torch.as_tensor(target, dtype=torch.int64))


def to_pixels(x: torch.Tensor) -> torch.Tensor:
    """Inverse of the ``digits(scale=True)`` mapping: [-1, 1] back to pixels 0..16 (clamped)."""
    x = torch.as_tensor(x)
    return ((x.float() + 1.0) * (_DIGITS_MAX / 2)).clamp(0.0, _DIGITS_MAX)


def mixture_dataset(mixture, n: int, seed: int = 0) -> TensorDataset:
    """``n`` samples of a :class:`~fastdiff.mixtures.GaussianMixture` as a TensorDataset.

    Items are ``(x float32 [D], y int64)`` for a labelled mixture (y is the component's class
    label) and ``(x,)`` otherwise. The same ``seed`` gives the same data.
    """
    from fastdiff.mixtures import GaussianMixture

    if not isinstance(mixture, GaussianMixture):
        raise TypeError(f"mixture must be a fastdiff.mixtures.GaussianMixture, got {type(mixture).__name__}")
    if not isinstance(n, numbers.Integral) or isinstance(n, bool) or n < 1:
        raise ValueError(f"n must be a positive int, got {n!r}")
    gen = torch.Generator().manual_seed(int(seed))
    z, comp = mixture.sample(int(n), generator=gen)
    x = z.to(torch.float32)
    if mixture.labels is None:
        return TensorDataset(x)
    return TensorDataset(x, mixture.labels[comp].to(torch.int64))


def _pixels(x):
    """Digits [N, 1, 8, 8], [N, 8, 8] or [N, 64] in [-1, 1] as the classifier's float64 pixel rows (0..16)."""
    x = torch.as_tensor(x).detach().cpu()
    if x.dim() < 2 or x[0].numel() != 64:
        raise ValueError(f"x must hold 8x8 digits ([N, 1, 8, 8], [N, 8, 8] or [N, 64]), got {tuple(x.shape)}")
    return to_pixels(x.reshape(x.shape[0], 64)).double().numpy()


class DigitClassifier:
    """An SVC on real digit pixels (0..16); :meth:`predict` takes images in the [-1, 1] scale.

    ``score_real`` is its accuracy on a held-out quarter of the real digits (the yardstick for
    the accuracy of generated digits).
    """

    def __init__(self, seed: int = 0):
        _sklearn()
        from sklearn.model_selection import train_test_split
        from sklearn.svm import SVC

        images, target = _load_digits()
        flat = images.reshape(len(images), -1)
        x_tr, x_te, y_tr, y_te = train_test_split(flat, target, test_size=0.25, random_state=seed,
                                                  stratify=target)
        self.model = SVC(gamma=0.001).fit(x_tr, y_tr)  # deterministic (no probability calibration)
        self.score_real = float(self.model.score(x_te, y_te))

    def predict(self, x) -> torch.Tensor:
        """Class labels (int64 [N]) of images [N, 1, 8, 8], [N, 8, 8] or [N, 64] in [-1, 1]."""
        return torch.as_tensor(self.model.predict(_pixels(x)).astype(np.int64))

    def features(self, x) -> torch.Tensor:
        """The classifier's one-vs-rest decision values, float64 [N, 10]: the features the demo's Fréchet
        distance is computed on (:func:`digits_features`, for fastdiff.evaluation)."""
        return torch.as_tensor(self.model.decision_function(_pixels(x)))

    def accuracy(self, x, y) -> float:
        """Fraction of images ``x`` classified as their labels ``y`` (e.g. the labels they were generated for)."""
        y = torch.as_tensor(y).detach().cpu().long().reshape(-1)
        return float((self.predict(x) == y).float().mean())


def digit_classifier(seed: int = 0) -> DigitClassifier:
    """A :class:`DigitClassifier` trained on 3/4 of the real digits (split by ``seed``)."""
    return DigitClassifier(seed)


def digits_features(seed: int = 0):
    """The features ``fastdiff evaluate --features digits`` passes to :func:`fastdiff.evaluation.evaluate`: the
    decision values of a :func:`digit_classifier` (10 per image; images [N, 1, 8, 8] in [−1, 1])."""
    return digit_classifier(seed).features
