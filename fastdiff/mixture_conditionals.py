"""Exact conditionals of a Gaussian mixture: the oracles of classifier guidance and inpainting.

- :class:`MixtureClassifier`: the noise-aware classifier ``log p_t(c | x_t)`` of a labelled mixture (the class
  posterior of the noised data, a ``classifier(x, t)`` for ``fastdiff.sample(classifier=...)``), and its exact
  gradient ``grad log p_t(c | x) = s_c(x) - s(x)``: the class-conditional score minus the marginal one. So an
  unconditional model guided by it at scale 1 has exactly the class-conditional field.
- :func:`known_conditional`: the distribution of the unknown coordinates given the known ones, again a
  Gaussian mixture (Gaussian conditioning per component, weights reweighted by each component's likelihood of
  the known values): what inpainting should sample.
"""

from __future__ import annotations

import torch
from torch import nn

from fastdiff.mixtures import F64, GaussianMixture, PathLike, Time, get_path

__all__ = ["MixtureClassifier", "known_conditional"]


class MixtureClassifier(nn.Module):
    """``classifier(x, t)`` → class log-posteriors ``log p_t(c | x_t = x)`` [B, C] (float32, differentiable in
    x) of a labelled :class:`GaussianMixture` under ``path``; column c is class ``mixture.classes[c]``."""

    def __init__(self, mixture: GaussianMixture, path: PathLike = "condot"):
        super().__init__()
        if not isinstance(mixture, GaussianMixture) or mixture.labels is None:
            raise ValueError("MixtureClassifier needs a GaussianMixture with labels")
        self.mixture, self.path = mixture, get_path(path)
        classes = mixture.classes
        # member[c, k]: component k belongs to class c
        self.register_buffer("member", mixture.labels[None, :] == classes[:, None], persistent=False)
        self.calls = 0

    def forward(self, x: torch.Tensor, t: Time) -> torch.Tensor:
        self.calls += 1
        core = self.mixture._core(x, t, self.path)
        logits = core["logits"]  # [B, K]: log w_k + log N(x; alpha mu_k, C_k)
        member = self.member.to(logits.device)
        per_class = torch.logsumexp(torch.where(member[None], logits[:, None, :], -torch.inf), dim=-1)  # [B, C]
        return (per_class - core["logp"][:, None]).to(x.dtype)

    def gradient(self, x: torch.Tensor, t: Time, y) -> torch.Tensor:
        """The exact ``grad_x log p_t(y_b | x_b)`` [B, *S] (float64): the class-conditional score of y_b minus
        the marginal score (closed forms, no autograd)."""
        mix = self.mixture
        y = torch.as_tensor(y).reshape(-1).cpu().long()
        classes = mix.classes
        match = mix.labels[None, :] == classes[y][:, None]  # [B, K]
        logw = torch.where(match, mix.log_weights[None, :], torch.tensor(-torch.inf, dtype=F64))
        logw = logw - torch.logsumexp(logw, dim=-1, keepdim=True)
        cond = mix._fields(mix._core(x, t, self.path, logw), "score")
        marginal = mix._fields(mix._core(x, t, self.path), "score")
        return (cond - marginal).reshape(x.shape)


def known_conditional(mixture: GaussianMixture, known: torch.Tensor, values: torch.Tensor) -> GaussianMixture:
    """The mixture of the coordinates where ``known`` [D] (bool) is False, given the known coordinates equal
    ``values`` [number of known coordinates]: per component N(mu_u + S_uk S_kk^-1 (v - mu_k), S_uu - S_uk S_kk^-1 S_ku)
    with weight proportional to w_k N(v; mu_k, S_kk)."""
    known = torch.as_tensor(known, dtype=torch.bool).reshape(-1)
    if known.shape[0] != mixture.dim or bool(known.all()) or not bool(known.any()):
        raise ValueError(f"known must be a bool mask of the {mixture.dim} coordinates with some known and some not")
    v = torch.as_tensor(values, dtype=F64).reshape(-1)
    k_idx, u_idx = known.nonzero().reshape(-1), (~known).nonzero().reshape(-1)
    if v.shape[0] != k_idx.shape[0]:
        raise ValueError(f"values must hold the {k_idx.shape[0]} known coordinates, got {v.shape[0]}")
    means, covs, logw = [], [], []
    for mu, cov, lw in zip(mixture.means, mixture.covs, mixture.log_weights):
        s_kk, s_uk, s_uu = cov[k_idx][:, k_idx], cov[u_idx][:, k_idx], cov[u_idx][:, u_idx]
        gain = torch.linalg.solve(s_kk, s_uk.T).T  # S_uk S_kk^-1
        diff = v - mu[k_idx]
        means.append(mu[u_idx] + gain @ diff)
        covs.append(s_uu - gain @ s_uk.T)
        logw.append(lw + torch.distributions.MultivariateNormal(mu[k_idx], s_kk).log_prob(v))
    weights = torch.softmax(torch.stack(logw), dim=0)
    return GaussianMixture(torch.stack(means), torch.stack(covs), weights, mixture.labels)
