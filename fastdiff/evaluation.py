"""Evaluation of a generated set against a reference set over features of a pluggable extractor
(docs/generation.md): the Fréchet distance (FID's formula; Heusel et al. 2017) and precision / recall of
Kynkäänniemi et al. (2019).

- Fréchet distance between Gaussians fitted to the two feature sets:
  ‖μ_g − μ_r‖² + tr(Σ_g + Σ_r − 2 (Σ_g Σ_r)^{1/2}), with tr (Σ_g Σ_r)^{1/2} = Σ sqrt(eig(Σ_r^{1/2} Σ_g Σ_r^{1/2}))
  (a symmetric eigenproblem, float64).
- Precision: the fraction of generated features inside the reference manifold, the union of balls around each
  reference feature with the radius of its k-th nearest reference neighbour; recall: the fraction of
  reference features inside the generated manifold.

Features: any callable ``images [B, ...] → [B, F]``, passed in by the caller. For images the standard choice is
Inception-v3's 2048 pool features (:func:`inception_features`, through torch-fidelity, whose weights download
on first use); the digits demo passes its classifier's decision values (``fastdiff.demo.data.digits_features``:
the demo's, not the library's, which never imports the demo).
"""

from __future__ import annotations

import numbers
from pathlib import Path

import torch


def frechet_distance(a: torch.Tensor, b: torch.Tensor) -> float:
    """The Fréchet distance between Gaussians fitted to feature sets a [N, F] and b [M, F] (N, M >= 2)."""
    a, b = _features_pair(a, b)
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = torch.cov(a.T).reshape(a.shape[1], a.shape[1]), torch.cov(b.T).reshape(b.shape[1], b.shape[1])
    lam, q = torch.linalg.eigh(cov_b)
    root_b = (q * lam.clamp(min=0).sqrt()) @ q.T
    cross = torch.linalg.eigvalsh(root_b @ cov_a @ root_b).clamp(min=0).sqrt().sum()
    return float((mu_a - mu_b).square().sum() + torch.trace(cov_a) + torch.trace(cov_b) - 2 * cross)


def _features_pair(a, b):
    a, b = torch.as_tensor(a).double(), torch.as_tensor(b).double()
    if a.dim() != 2 or b.dim() != 2 or a.shape[1] != b.shape[1]:
        raise ValueError(f"features must be [N, F] and [M, F], got {tuple(a.shape)} and {tuple(b.shape)}")
    if a.shape[0] < 2 or b.shape[0] < 2:
        raise ValueError(f"each feature set needs at least 2 rows, got {a.shape[0]} and {b.shape[0]}")
    if not (torch.isfinite(a).all() and torch.isfinite(b).all()):
        raise ValueError("features must be finite")
    return a, b


def _kth_radius(x: torch.Tensor, k: int, chunk: int) -> torch.Tensor:
    """Distance of each row of x to its k-th nearest other row."""
    out = []
    for i in range(0, x.shape[0], chunk):
        d = torch.cdist(x[i:i + chunk], x)
        out.append(d.kthvalue(k + 1, dim=1).values)  # the 1st is the row itself (distance 0)
    return torch.cat(out)


def _inside(points: torch.Tensor, centres: torch.Tensor, radii: torch.Tensor, chunk: int) -> torch.Tensor:
    out = []
    for i in range(0, points.shape[0], chunk):
        d = torch.cdist(points[i:i + chunk], centres)
        out.append((d <= radii[None]).any(1))
    return torch.cat(out)


def precision_recall(generated: torch.Tensor, reference: torch.Tensor, k: int = 3, chunk: int = 1024) -> tuple:
    """(precision, recall) of Kynkäänniemi et al. with k nearest neighbours (their default 3)."""
    g, r = _features_pair(generated, reference)
    if not isinstance(k, numbers.Integral) or isinstance(k, bool) or not 1 <= k < min(len(g), len(r)):
        raise ValueError(f"k must be an int in [1, {min(len(g), len(r)) - 1}], got {k!r}")
    precision = _inside(g, r, _kth_radius(r, k, chunk), chunk).double().mean()
    recall = _inside(r, g, _kth_radius(g, k, chunk), chunk).double().mean()
    return float(precision), float(recall)


def _images(source, what: str) -> torch.Tensor:
    if isinstance(source, torch.Tensor):
        return source
    if isinstance(source, (str, Path)):
        from fastdiff.generation import load_generated

        return load_generated(source)["x"]
    raise TypeError(f"{what} must be a tensor [N, ...] or a folder written by fastdiff.generate, "
                    f"got {type(source).__name__}")


def extract(features, images: torch.Tensor, batch_size: int = 512) -> torch.Tensor:
    """``features`` applied to ``images`` in batches, as float64 [N, F]."""
    out = []
    with torch.no_grad():
        for i in range(0, images.shape[0], batch_size):
            f = torch.as_tensor(features(images[i:i + batch_size]))
            out.append(f.reshape(f.shape[0], -1).double().cpu())
    return torch.cat(out)


def evaluate(generated, reference, *, features=None, k: int = 3, batch_size: int = 512) -> dict:
    """Fréchet distance and precision / recall between ``generated`` and ``reference`` (tensors [N, ...] or
    folders written by fastdiff.generate) over ``features`` (a callable images → [B, F]; default: the flattened
    samples themselves)."""
    g_images, r_images = _images(generated, "generated"), _images(reference, "reference")
    features = features if features is not None else (lambda x: x.reshape(x.shape[0], -1))
    g, r = extract(features, g_images, batch_size), extract(features, r_images, batch_size)
    precision, recall = precision_recall(g, r, k)
    return {"frechet_distance": frechet_distance(g, r), "precision": precision, "recall": recall, "k": k,
            "n_generated": len(g), "n_reference": len(r), "feature_dim": g.shape[1]}


def inception_features(device="cpu"):
    """Inception-v3's 2048 pool features as FID computes them, through torch-fidelity (``pip install
    torch-fidelity``; its weights download on first use). Images [N, 3, H, W] in [−1, 1] (grayscale repeated
    to 3 channels), resized by the extractor to 299 × 299."""
    try:
        from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3
    except ImportError as e:
        raise ImportError("inception_features needs torch-fidelity: pip install torch-fidelity (the eval extra)") from e
    net = FeatureExtractorInceptionV3("inception-v3-compat", ["2048"]).to(device).eval()

    def features(x: torch.Tensor) -> torch.Tensor:
        x = x.to(device)
        if x.dim() != 4 or x.shape[1] not in (1, 3):
            raise ValueError(f"inception_features takes images [N, 1 or 3, H, W], got {tuple(x.shape)}")
        if x.shape[1] == 1:
            x = x.repeat(1, 3, 1, 1)
        pixels = ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)  # the uint8 images FID is defined on
        (f,) = net(pixels)
        return f

    return features
