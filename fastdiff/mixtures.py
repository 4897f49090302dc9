"""Gaussian mixtures with exact fields under Gaussian paths: the oracles of the sampler and training
tests, and the toy data of `fastdiff train --data ring` and the demo (docs/design.md §6).

The data distribution is a Gaussian mixture ``z ~ sum_k w_k N(mu_k, Sigma_k)``. Under a Gaussian
path ``x_t = alpha_t z + beta_t eps`` (flow time, t = 0 noise, t = 1 data) the marginal ``p_t`` is
the mixture of ``N(alpha mu_k, C_k)`` with ``C_k = alpha^2 Sigma_k + beta^2 I``, and every
prediction a model may return has a closed form: a posterior-weighted sum over the components of
the per-component conditional expectation.

Everything is computed in float64 in the eigenbasis of each covariance,
``Sigma_k = Q_k diag(lambda_k) Q_k^T``, where ``C_k = Q_k diag(c_k) Q_k^T`` with
``c_k = alpha^2 lambda_k + beta^2 > 0`` for every t (covariances must be positive definite and
``alpha^2 + beta^2 > 0`` on every path). With ``y_k = Q_k^T (x - alpha mu_k)`` and posterior
responsibilities ``r_k(x) = softmax_k(log w_k + log N(x; alpha mu_k, C_k))`` (log-sum-exp):

* score      ``s = -sum_k r_k Q_k (y_k / c_k)``                       (= grad log p_t)
* x0         ``E[z | x]   = sum_k r_k (mu_k + alpha Q_k (lambda_k y_k / c_k))``
* eps        ``E[eps | x] = beta sum_k r_k Q_k (y_k / c_k)``           (= -beta s)
* velocity   ``u = d_alpha E[z|x] + d_beta E[eps|x]
              = sum_k r_k (d_alpha mu_k + Q_k ((alpha d_alpha lambda_k + beta d_beta) y_k / c_k))``

None of these divides by alpha or beta, so all four are finite on the whole of [0, 1]:

* alpha = 0 (t = 0 for condot / vp-cosine): ``p_0 = N(0, beta^2 I)``, ``E[z|x]`` is the prior mean
  ``sum_k w_k mu_k``, ``s = -x / beta^2``, ``E[eps|x] = x / beta``.
* beta = 0 (t = 1): ``x = z`` exactly, so ``E[z|x] = x`` and ``E[eps|x] = 0`` (the noise is not
  identified by x; its conditional mean is the prior mean 0, which is also the limit t -> 1 of
  ``beta C^-1 (x - alpha mu)``; this is why eps is computed as ``beta * C^-1 (...)``, i.e. as
  ``-beta s``, never as ``(x - alpha E[z|x]) / beta``). The score is the data score.
  The velocity limit is finite because only the product ``beta * d_beta = d(beta^2)/dt / 2``
  enters: for condot it is 0 at t = 1 and ``u(x, 1) = x``. For VP paths d_beta = -inf at
  t = 1, so ``beta * d_beta`` is evaluated as ``-alpha d_alpha`` (exact, since
  ``beta^2 = 1 - alpha^2``) wherever the product is not finite; for other user paths it is
  estimated there by a one-sided finite difference of ``beta^2`` with step 1e-6. The result is
  the exact limit of the velocity as t -> 1 (no evaluation at 1 - 1e-9).

Helpers: :func:`ring_mixture` and :func:`class_conditional_mixture` build test distributions,
:class:`MixtureModel` wraps a mixture as a ``model(x, t, y)`` returning the exact prediction, and
:func:`assign_modes`, :func:`mode_statistics`, :func:`mode_standard_errors` and
:func:`mode_zscores` compare samples with the mixture in units of standard errors.
"""

from __future__ import annotations

import math
import numbers
from typing import Dict, NamedTuple, Optional, Union

import torch
from torch import nn

from fastdiff import _checks
from fastdiff.paths import VP, GaussianPath, VPCosine, check_prediction, get_path

__all__ = [
    "GaussianMixture",
    "MixtureModel",
    "ModeStatistics",
    "ring_mixture",
    "class_conditional_mixture",
    "assign_modes",
    "mode_statistics",
    "mode_standard_errors",
    "mode_zscores",
]

F64 = torch.float64
_LOG_2PI = math.log(2.0 * math.pi)
PathLike = Union[str, GaussianPath]
Time = Union[float, torch.Tensor]


def _as_f64(value, name: str) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        return value.detach().to(device="cpu", dtype=F64)
    try:
        return torch.as_tensor(value, dtype=F64)
    except (TypeError, ValueError) as exc:
        raise TypeError(f"{name} must be a tensor or a nested sequence of numbers") from exc


def _times(t: Time, batch: int, device) -> torch.Tensor:
    """``t`` as a float64 tensor [batch] on ``device`` (a float, a 0-dim, [B] or [B, 1...] tensor)."""
    if isinstance(t, torch.Tensor):
        tt = t.to(device=device, dtype=F64)
        if tt.dim() == 0:
            tt = tt.expand(batch)
        elif tt.numel() == batch and tt.shape[0] == batch:
            tt = tt.reshape(batch)
        else:
            raise ValueError(f"t of shape {tuple(t.shape)} does not match a batch of {batch}: pass a "
                             f"float, a 0-dim tensor or a [B] tensor")
        bad = (tt < 0) | (tt > 1) | torch.isnan(tt)
        if bool(bad.any()):
            raise ValueError(f"t must be flow times in [0, 1], got {tt[bad][0].item()!r}")
        return tt
    if isinstance(t, numbers.Real) and not isinstance(t, bool):
        tf = float(t)
        if not 0.0 <= tf <= 1.0:
            raise ValueError(f"t must be a flow time in [0, 1], got t={t!r}")
        return torch.full((batch,), tf, dtype=F64, device=device)
    raise TypeError(f"t must be a float or a torch.Tensor, got {type(t).__name__}")


def _beta_d_beta(path: GaussianPath, t, alpha, beta, d_alpha, d_beta) -> torch.Tensor:
    """``beta * d_beta`` (= d(beta^2)/dt / 2), finite where beta = 0 and d_beta = -inf."""
    prod = beta * d_beta
    bad = ~torch.isfinite(prod)
    if not bool(bad.any()):
        return prod
    if isinstance(path, (VP, VPCosine)):  # variance preserving: beta^2 = 1 - alpha^2
        fix = -alpha * d_alpha
    else:  # one-sided finite difference of beta^2 (user paths)
        h = 1e-6
        t2 = torch.where(t >= h, t - h, t + h)
        beta2 = path.coefficients(t2)[1]
        fix = (beta * beta - beta2 * beta2) / (2.0 * (t - t2))
    return torch.where(bad, fix, prod)


class GaussianMixture:
    """A Gaussian mixture ``sum_k w_k N(mu_k, Sigma_k)`` in float64, with its exact fields.

    Args:
        means: [K, D] component means.
        covs: [K, D, D] symmetric positive definite covariances (or give ``stds``).
        weights: [K] non-negative weights (normalized here); default uniform.
        labels: optional [K] integer class label of each component, for class-conditional models.
        stds: instead of ``covs``: a scalar (``std^2 I`` for all), [K] (isotropic per component)
            or [K, D] (diagonal per component).

    Inputs ``x`` of the field methods have shape [B, D] or [B, *S] with prod(S) = D; ``t`` is a
    float, a 0-dim tensor or a [B] tensor of flow times in [0, 1]; ``path`` is a name or a
    :class:`~fastdiff.paths.GaussianPath`. Results have ``x``'s shape, dtype and device (the math
    is float64). See the module docstring for the formulas and the behaviour at t = 0 and t = 1.
    """

    def __init__(self, means, covs=None, weights=None, labels=None, *, stds=None):
        mu = _as_f64(means, "means")
        if mu.dim() != 2 or mu.shape[0] < 1 or mu.shape[1] < 1:
            raise ValueError(f"means must have shape [K, D], got {tuple(mu.shape)}")
        k, d = mu.shape
        if (covs is None) == (stds is None):
            raise ValueError("give exactly one of covs and stds")
        if covs is not None:
            cov = _as_f64(covs, "covs")
            if cov.shape != (k, d, d):
                raise ValueError(f"covs must have shape [K, D, D] = {(k, d, d)}, got {tuple(cov.shape)}")
            if not torch.allclose(cov, cov.transpose(-1, -2), rtol=1e-10, atol=1e-12):
                raise ValueError("covs must be symmetric")
            cov = 0.5 * (cov + cov.transpose(-1, -2))
        else:
            s = _as_f64(stds, "stds")
            if s.dim() == 0:
                s = s.expand(k, d)
            elif s.shape == (k,):
                s = s[:, None].expand(k, d)
            elif s.shape != (k, d):
                raise ValueError(f"stds must be a scalar, [K] or [K, D] = {(k, d)}, got {tuple(s.shape)}")
            cov = torch.diag_embed(s * s)
        lam, q = torch.linalg.eigh(cov)
        if not bool(torch.isfinite(lam).all()) or not bool((lam > 0).all()):
            raise ValueError("covariances must be positive definite (every eigenvalue > 0); "
                             f"smallest eigenvalue {lam.min().item():.3g}")
        if weights is None:
            w = torch.full((k,), 1.0 / k, dtype=F64)
        else:
            w = _as_f64(weights, "weights")
            if w.shape != (k,):
                raise ValueError(f"weights must have shape [K] = ({k},), got {tuple(w.shape)}")
            if bool((w < 0).any()) or not bool(torch.isfinite(w).all()) or w.sum() <= 0:
                raise ValueError("weights must be finite, non-negative and not all zero")
            w = w / w.sum()
        if labels is not None:
            lab = torch.as_tensor(labels)
            if lab.shape != (k,) or lab.is_floating_point() or lab.is_complex() or lab.dtype == torch.bool:
                raise ValueError(f"labels must be an integer tensor of shape [K] = ({k},)")
            lab = lab.to(device="cpu", dtype=torch.long)
        else:
            lab = None
        self.means, self.covs, self.weights, self.labels = mu, cov, w, lab
        self.eigvals, self.eigvecs = lam, q  # Sigma_k = Q_k diag(lam_k) Q_k^T, Q's columns
        self.log_weights = torch.log(w)
        self._device_cache: Dict[str, tuple] = {}

    # ------------------------------------------------------------------ basic properties
    @property
    def num_components(self) -> int:
        return self.means.shape[0]

    @property
    def dim(self) -> int:
        return self.means.shape[1]

    @property
    def classes(self) -> Optional[torch.Tensor]:
        """Sorted distinct class labels, or None for an unlabelled mixture."""
        return None if self.labels is None else torch.unique(self.labels)

    @property
    def mean(self) -> torch.Tensor:
        """The mixture mean ``sum_k w_k mu_k`` [D]."""
        return self.weights @ self.means

    @property
    def covariance(self) -> torch.Tensor:
        """The mixture covariance [D, D]."""
        diff = self.means - self.mean
        return (torch.einsum("k,kij->ij", self.weights, self.covs)
                + torch.einsum("k,ki,kj->ij", self.weights, diff, diff))

    def __repr__(self) -> str:
        lab = "" if self.labels is None else f", classes={self.classes.tolist()}"
        return f"GaussianMixture(K={self.num_components}, D={self.dim}{lab})"

    def _params(self, device):
        key = str(device)
        if key not in self._device_cache:
            self._device_cache[key] = tuple(
                p.to(device) for p in (self.means, self.eigvals, self.eigvecs, self.log_weights))
        return self._device_cache[key]

    def _flat(self, x: torch.Tensor) -> torch.Tensor:
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
        if x.dim() < 1 or (x.dim() == 1 and self.dim != 1):
            raise ValueError(f"x must have shape [B, D] or [B, *S] with prod(S) = D = {self.dim}, "
                             f"got {tuple(x.shape)}")
        flat = x.reshape(x.shape[0], -1) if x.dim() > 1 else x.reshape(-1, 1)
        if flat.shape[1] != self.dim:
            raise ValueError(f"x of shape {tuple(x.shape)} does not have D = {self.dim} features per sample")
        return flat.to(F64)

    # ------------------------------------------------------------------ sub-mixtures
    def subset(self, index) -> "GaussianMixture":
        """The mixture of the components ``index`` (bool mask or indices), weights renormalized."""
        idx = torch.as_tensor(index)
        if idx.dtype == torch.bool:
            idx = idx.nonzero().reshape(-1)
        idx = idx.to(torch.long).reshape(-1)
        if idx.numel() == 0 or float(self.weights[idx].sum()) <= 0:
            raise ValueError("the selected components are empty or have zero total weight")
        return GaussianMixture(self.means[idx], self.covs[idx], self.weights[idx],
                               None if self.labels is None else self.labels[idx])

    def conditional(self, label: int) -> "GaussianMixture":
        """The class-conditional mixture: components with ``labels == label``, weights renormalized."""
        if self.labels is None:
            raise ValueError("this mixture has no labels")
        mask = self.labels == int(label)
        if not bool(mask.any()):
            raise ValueError(f"no component has label {label}; labels: {self.classes.tolist()}")
        return self.subset(mask)

    def class_weights(self) -> torch.Tensor:
        """Total weight of each class in :attr:`classes` order."""
        if self.labels is None:
            raise ValueError("this mixture has no labels")
        return torch.stack([self.weights[self.labels == c].sum() for c in self.classes])

    def marginal(self, t: float, path: PathLike = "condot") -> "GaussianMixture":
        """The marginal p_t as a mixture: components ``N(alpha mu_k, alpha^2 Sigma_k + beta^2 I)``."""
        t = float(_times(t, 1, "cpu")[0])
        alpha, beta = get_path(path).coefficients(t)[:2]
        eye = torch.eye(self.dim, dtype=F64)
        return GaussianMixture(alpha * self.means, alpha ** 2 * self.covs + beta ** 2 * eye,
                               self.weights, self.labels)

    # ------------------------------------------------------------------ sampling and densities
    def sample(self, n: int, generator: Optional[torch.Generator] = None):
        """``(z [n, D] float64, component [n] long)`` drawn on the CPU with ``generator``."""
        comp = torch.multinomial(self.weights, int(n), replacement=True, generator=generator)
        eps = torch.randn(int(n), self.dim, generator=generator, dtype=F64)
        scale = self.eigvecs * self.eigvals.sqrt()[:, None, :]  # Q_k diag(sqrt(lam_k))
        z = self.means[comp] + torch.einsum("nij,nj->ni", scale[comp], eps)
        return z, comp

    def _core(self, x: torch.Tensor, t: Time, path: PathLike, log_weights=None):
        """float64 intermediates for x [B, D] at time t: coefficients, y, c, logits, log p."""
        path = get_path(path)
        xf = self._flat(x)
        b = xf.shape[0]
        mu, lam, q, logw = self._params(xf.device)
        tt = _times(t, b, xf.device)
        if b > 1 and bool((tt == tt[0]).all()):  # one time for the batch: broadcast [1]
            tt = tt[:1]
        alpha, beta, d_alpha, d_beta = path.coefficients(tt)
        if log_weights is not None:
            logw = log_weights.to(device=xf.device, dtype=F64)
        a = alpha[:, None, None]
        diff = xf[:, None, :] - a * mu[None]  # [B, K, D]
        y = torch.einsum("kde,bkd->bke", q, diff)  # Q_k^T (x - alpha mu_k)
        c = a * a * lam[None] + (beta * beta)[:, None, None]  # eigenvalues of C_k
        yc = y / c
        logn = -0.5 * ((y * yc).sum(-1) + (torch.log(c).sum(-1) + self.dim * _LOG_2PI))
        logits = logw + logn  # [B, K]
        top = logits.amax(dim=-1, keepdim=True)  # log-sum-exp (finite: some w_k > 0)
        resp = torch.exp(logits - top)
        total = resp.sum(dim=-1, keepdim=True)
        resp = resp / total
        logp = (top + torch.log(total)).squeeze(-1)
        return dict(path=path, t=tt, alpha=alpha, beta=beta, d_alpha=d_alpha, d_beta=d_beta, x=xf,
                    mu=mu, lam=lam, q=q, y=y, c=c, yc=yc, logp=logp, resp=resp, logits=logits)

    @staticmethod
    def _rotate(q, v, resp):
        """``sum_k r_k Q_k v_k`` for v [B, K, D]."""
        return torch.einsum("kde,bke,bk->bd", q, v, resp)

    def _fields(self, core, kind: str) -> torch.Tensor:
        q, yc, resp = core["q"], core["yc"], core["resp"]
        if kind == "score":
            return -self._rotate(q, yc, resp)
        if kind == "eps":
            return core["beta"][:, None] * self._rotate(q, yc, resp)
        mean = resp @ core["mu"]  # sum_k r_k mu_k
        lam = core["lam"][None]
        if kind == "x0":
            return mean + core["alpha"][:, None] * self._rotate(q, lam * yc, resp)
        if kind == "v":  # alpha eps - beta x0
            return core["alpha"][:, None] * self._fields(core, "eps") - core["beta"][:, None] * self._fields(core, "x0")
        if kind == "velocity":
            alpha, d_alpha = core["alpha"], core["d_alpha"]
            bdb = _beta_d_beta(core["path"], core["t"], alpha, core["beta"], d_alpha, core["d_beta"])
            coef = (alpha * d_alpha)[:, None, None] * lam + bdb[:, None, None]
            return d_alpha[:, None] * mean + self._rotate(q, coef * yc, resp)
        raise ValueError(kind)

    def _predict(self, x, t, path, prediction, log_weights=None) -> torch.Tensor:
        kind = check_prediction(prediction)
        out = self._fields(self._core(x, t, path, log_weights), kind)
        return out.to(x.dtype).reshape(x.shape)

    def log_prob(self, z: torch.Tensor) -> torch.Tensor:
        """Data log-density ``log sum_k w_k N(z; mu_k, Sigma_k)`` [B] (float64)."""
        return self._core(z, 1.0, "condot")["logp"]

    def marginal_log_prob(self, x: torch.Tensor, t: Time, path: PathLike = "condot") -> torch.Tensor:
        """``log p_t(x)`` of the marginal mixture [B] (float64, differentiable in x)."""
        return self._core(x, t, path)["logp"]

    def posterior(self, x: torch.Tensor, t: Time, path: PathLike = "condot") -> torch.Tensor:
        """Component responsibilities ``P(k | x_t = x)`` [B, K] (float64)."""
        return self._core(x, t, path)["resp"]

    def score(self, x: torch.Tensor, t: Time, path: PathLike = "condot") -> torch.Tensor:
        """``grad_x log p_t(x)``."""
        return self._predict(x, t, path, "score")

    def x0(self, x: torch.Tensor, t: Time, path: PathLike = "condot") -> torch.Tensor:
        """Posterior mean ``E[z | x_t = x]`` (the prior mean where alpha = 0, x where beta = 0)."""
        return self._predict(x, t, path, "x0")

    def eps(self, x: torch.Tensor, t: Time, path: PathLike = "condot") -> torch.Tensor:
        """``E[eps | x_t = x] = -beta * score`` (0 where beta = 0)."""
        return self._predict(x, t, path, "eps")

    def velocity(self, x: torch.Tensor, t: Time, path: PathLike = "condot") -> torch.Tensor:
        """Marginal velocity ``d_alpha E[z|x] + d_beta E[eps|x]`` (its finite limit at t = 1)."""
        return self._predict(x, t, path, "velocity")

    def prediction(self, x: torch.Tensor, t: Time, path: PathLike = "condot",
                   prediction: str = "velocity") -> torch.Tensor:
        """The exact prediction of type ``prediction`` ("velocity", "eps", "score", "x0")."""
        return self._predict(x, t, path, prediction)

    def flow_map(self, x: torch.Tensor, t0: Time, t1: Time, path: PathLike = "condot") -> torch.Tensor:
        """Exact solution at t1 of the probability-flow ODE ``dx/dt = u(x, t)`` started at x (t0).

        Only for a single Gaussian (K = 1), where the flow is linear:
        ``x(t1) = alpha_1 mu + Q diag(sqrt(c_1 / c_0)) Q^T (x - alpha_0 mu)``. Useful as the
        reference trajectory of convergence-order tests.
        """
        if self.num_components != 1:
            raise ValueError("flow_map has a closed form only for a single Gaussian (K = 1)")
        path = get_path(path)
        xf = self._flat(x)
        b = xf.shape[0]
        mu, lam, q, _ = self._params(xf.device)
        ratio = []
        for t in (t0, t1):
            alpha, beta = path.coefficients(_times(t, b, xf.device))[:2]
            ratio.append((alpha, alpha[:, None] ** 2 * lam + beta[:, None] ** 2))
        (a0, c0), (a1, c1) = ratio
        y = (xf - a0[:, None] * mu) @ q[0]  # [B, D] in the eigenbasis
        out = a1[:, None] * mu + (torch.sqrt(c1 / c0) * y) @ q[0].T
        return out.to(x.dtype).reshape(x.shape)


class MixtureModel(nn.Module):
    """``model(x, t, y)`` returning the exact prediction of a :class:`GaussianMixture`.

    Args:
        mixture: the data distribution.
        path: the Gaussian path (name or object) the prediction refers to.
        prediction: "velocity", "eps", "score" or "x0".
        null_label: the label of the unconditional branch (CFG's empty label).

    ``t`` is a float or a [B] tensor of flow times; ``y`` is None (unconditional), an int or an
    integer tensor [B]. For a mixture with ``labels``, ``y_b`` selects the class-conditional
    mixture (components with that label, weights renormalized) and ``y_b == null_label`` the full
    mixture; any other label raises. For an unlabelled mixture ``y`` is ignored. The output has
    ``x``'s shape, dtype and device. ``nfe`` counts forward calls and ``batch_sizes`` records the
    batch of each (so tests can check that CFG runs one batch of 2B); :meth:`reset` clears both.
    """

    def __init__(self, mixture: GaussianMixture, path: PathLike = "condot",
                 prediction: str = "velocity", null_label: int = -1):
        super().__init__()
        if not isinstance(mixture, GaussianMixture):
            raise TypeError(f"mixture must be a GaussianMixture, got {type(mixture).__name__}")
        self.mixture = mixture
        self.path = get_path(path)
        self.prediction = check_prediction(prediction)
        self.null_label = int(null_label)
        if mixture.labels is not None and bool((mixture.labels == self.null_label).any()):
            raise ValueError(f"null_label={null_label} is also the label of a component")
        self.nfe = 0
        self.batch_sizes = []

    def reset(self) -> None:
        self.nfe = 0
        self.batch_sizes = []

    def extra_repr(self) -> str:
        return (f"{self.mixture!r}, path={self.path!r}, prediction={self.prediction!r}, "
                f"null_label={self.null_label}")

    def log_weights(self, y, batch: int) -> Optional[torch.Tensor]:
        """Per-sample component log-weights [B, K] for labels y (None: the mixture's own)."""
        mix = self.mixture
        if y is None or mix.labels is None:
            return None
        yt = torch.as_tensor(y).detach().cpu()
        if yt.is_floating_point():
            if not bool((yt == yt.round()).all()):
                raise ValueError("y must hold integer class labels")
        yt = yt.to(torch.long)
        if yt.dim() == 0:
            yt = yt.expand(batch)
        yt = yt.reshape(-1)
        if yt.shape[0] != batch:
            raise ValueError(f"y has {yt.shape[0]} labels for a batch of {batch}")
        known = torch.cat([mix.classes, torch.tensor([self.null_label])])
        bad = ~torch.isin(yt, known)
        if bool(bad.any()):
            raise ValueError(f"unknown label {yt[bad][0].item()}; classes: {mix.classes.tolist()}, "
                             f"null_label: {self.null_label}")
        match = (mix.labels[None, :] == yt[:, None]) | (yt[:, None] == self.null_label)
        logw = torch.where(match, mix.log_weights[None, :], torch.tensor(-math.inf, dtype=F64))
        return logw - torch.logsumexp(logw, dim=-1, keepdim=True)

    def forward(self, x: torch.Tensor, t: Time, y=None) -> torch.Tensor:
        self.nfe += 1
        self.batch_sizes.append(int(x.shape[0]))
        return self.mixture._predict(x, t, self.path, self.prediction,
                                     self.log_weights(y, x.shape[0]))

    def guided(self, x: torch.Tensor, t: Time, y, cfg: float) -> torch.Tensor:
        """The classifier-free guided prediction ``p_null + cfg (p_y - p_null)`` (not counted in nfe)."""
        b = x.shape[0]
        p_y = self.mixture._predict(x, t, self.path, self.prediction, self.log_weights(y, b))
        p_null = self.mixture._predict(x, t, self.path, self.prediction,
                                       self.log_weights(self.null_label, b))
        return p_null + cfg * (p_y - p_null)


# ---------------------------------------------------------------------- factories

def ring_mixture(k: int = 8, radius: float = 4.0, std=0.3, weights=None, labels=None,
                 heterogeneous: bool = False) -> GaussianMixture:
    """A 2-D mixture of ``k`` modes equally spaced on a circle (mode i at angle 2 pi i / k).

    ``std`` is a scalar, a length-k sequence (isotropic per mode) or a [k, 2] array of
    (radial, tangential) standard deviations per mode, giving covariances aligned with the
    circle. ``heterogeneous=True`` (with ``weights``/``std`` left at their defaults) gives unequal
    weights ``proportional to 1 + (i mod 4)`` and anisotropic modes with radial/tangential stds
    ``std * (1.0, 1.6, 0.7, 1.3)[i % 4]`` / ``std * (1.0, 0.6, 0.8, 0.9)[i % 4]``, so that tests
    of weights and covariances are meaningful. With the defaults (radius 4, std 0.3) neighbouring
    modes are more than 10 standard deviations apart.
    """
    k = _checks.count("k", k, least=1)
    heterogeneous = _checks.flag("heterogeneous", heterogeneous)  # bool('no') is True
    angles = 2.0 * math.pi * torch.arange(k, dtype=F64) / k
    cos, sin = torch.cos(angles), torch.sin(angles)
    means = radius * torch.stack([cos, sin], dim=-1)
    s = _as_f64(std, "std")
    if heterogeneous and s.dim() == 0:
        idx = torch.arange(k) % 4
        s = torch.stack([s * torch.tensor([1.0, 1.6, 0.7, 1.3], dtype=F64)[idx],
                         s * torch.tensor([1.0, 0.6, 0.8, 0.9], dtype=F64)[idx]], dim=-1)
    if heterogeneous and weights is None:
        weights = 1.0 + (torch.arange(k) % 4).to(F64)
    if s.dim() == 0:
        s = s.expand(k, 2)
    elif s.shape == (k,):
        s = s[:, None].expand(k, 2)
    elif s.shape != (k, 2):
        raise ValueError(f"std must be a scalar, [k] or [k, 2] (radial, tangential), got {tuple(s.shape)}")
    rot = torch.stack([torch.stack([cos, -sin], -1), torch.stack([sin, cos], -1)], -2)  # [k, 2, 2]
    covs = rot @ torch.diag_embed(s * s) @ rot.transpose(-1, -2)
    return GaussianMixture(means, covs, weights, labels)


def class_conditional_mixture(num_classes: int = 4, modes_per_class: int = 2, radius: float = 4.0,
                              std=0.3, weights=None, heterogeneous: bool = False) -> GaussianMixture:
    """A labelled ring of ``num_classes * modes_per_class`` modes; class c owns the adjacent modes
    ``c * modes_per_class ... (c + 1) * modes_per_class - 1`` (labels 0 .. num_classes - 1).
    ``std``, ``weights`` and ``heterogeneous`` are as in :func:`ring_mixture`."""
    k = num_classes * modes_per_class
    labels = torch.arange(k) // modes_per_class
    return ring_mixture(k, radius, std, weights, labels, heterogeneous)


# ---------------------------------------------------------------------- sample statistics

class ModeStatistics(NamedTuple):
    """Per-mode statistics (or their standard errors, or z-scores)."""
    counts: torch.Tensor   # [K] samples per mode (expected counts for standard errors)
    weights: torch.Tensor  # [K]
    means: torch.Tensor    # [K, D]
    covs: torch.Tensor     # [K, D, D]


def assign_modes(samples: torch.Tensor, mixture: GaussianMixture) -> torch.Tensor:
    """The most probable component of each sample under the data distribution [n] (long)."""
    return mixture._core(samples, 1.0, "condot")["resp"].argmax(dim=-1).cpu()


def mode_statistics(samples: torch.Tensor, mixture: GaussianMixture,
                    assignment: Optional[torch.Tensor] = None) -> ModeStatistics:
    """Fraction, mean and (unbiased) covariance of the samples assigned to each mode (float64).

    Modes with fewer than 2 samples get NaN means/covariances. Non-finite samples are assigned to
    no mode (they count in n, so they lower the weights)."""
    z = mixture._flat(samples).cpu()
    n = z.shape[0]
    finite = torch.isfinite(z).all(dim=-1)
    comp = assign_modes(torch.where(finite[:, None], z, torch.zeros_like(z)), mixture) \
        if assignment is None else torch.as_tensor(assignment).cpu().to(torch.long)
    k, d = mixture.num_components, mixture.dim
    counts = torch.zeros(k, dtype=torch.long)
    means = torch.full((k, d), math.nan, dtype=F64)
    covs = torch.full((k, d, d), math.nan, dtype=F64)
    for j in range(k):
        zj = z[(comp == j) & finite]
        counts[j] = zj.shape[0]
        if zj.shape[0] >= 2:
            means[j] = zj.mean(0)
            dz = zj - means[j]
            covs[j] = dz.T @ dz / (zj.shape[0] - 1)
    return ModeStatistics(counts, counts.to(F64) / max(n, 1), means, covs)


def mode_standard_errors(mixture: GaussianMixture, n: int, counts=None) -> ModeStatistics:
    """Standard errors of :func:`mode_statistics` for ``n`` samples of ``mixture``.

    weights: ``sqrt(w (1 - w) / n)``; means: ``sqrt(diag Sigma_k / n_k)``; covariance entries:
    ``sqrt((S_ii S_jj + S_ij^2) / n_k)`` (Gaussian data), with the true parameters and
    ``n_k = counts`` (default: the expected counts ``n w_k``)."""
    w = mixture.weights
    nk = n * w if counts is None else torch.as_tensor(counts, dtype=F64)
    nk = nk.clamp_min(1.0)
    cov = mixture.covs
    var = torch.diagonal(cov, dim1=-2, dim2=-1)  # [K, D]
    se_w = torch.sqrt(w * (1 - w) / n)
    se_mu = torch.sqrt(var / nk[:, None])
    se_cov = torch.sqrt((var[:, :, None] * var[:, None, :] + cov * cov) / nk[:, None, None])
    return ModeStatistics(nk, se_w, se_mu, se_cov)


def mode_zscores(samples: torch.Tensor, mixture: GaussianMixture) -> ModeStatistics:
    """``(estimate - truth) / standard error`` of each mode's weight, mean and covariance entry.

    ``counts`` holds the observed counts. A test states ``z.weights.abs().max() < 4`` etc. (NaN
    where a mode got fewer than 2 samples, which such a comparison rejects)."""
    stats = mode_statistics(samples, mixture)
    se = mode_standard_errors(mixture, int(samples.shape[0]))
    return ModeStatistics(stats.counts,
                          (stats.weights - mixture.weights) / se.weights,
                          (stats.means - mixture.means) / se.means,
                          (stats.covs - mixture.covs) / se.covs)
