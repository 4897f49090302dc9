"""Per-sample statistics that the fused sampler step (fastdiff.ops.sampler_step) computes on the elements it already
holds: its output as it writes it and a prediction (or the blend g) as it reads it, over a subsample of each
sample. Step caching (fastdiff.sampling.features.caching) decides from them with no read of its own.

``stats = StepStats(sums, pick, x_ref=, x_keep=, q_ref=, q_keep=)``; ``pick = (m, H, W, f, branch)`` names the
subsample: element i of a sample (n elements) is picked iff

    i < m   and   (i mod W) mod f = 0   and   (⌊i / W⌋ mod H) mod f = 0

and is the subsample's element k(i) = ⌊i / (H W)⌋ Hs Ws + ⌊(⌊i / W⌋ mod H) / f⌋ Ws + ⌊(i mod W) / f⌋, with
Hs = ⌈H / f⌉, Ws = ⌈W / f⌉: either a prefix (H = W = 1: the first m elements, k = i) or, with m = n and
n a multiple of H W, ``x[..., ::f, ::f]`` of samples whose last two dimensions are H × W (step caching's
``_subsample``). S, the picked elements per sample: m, or (n / (H W)) Hs Ws. Per sample b, over picked i:

    sums[b, 0] += Σ |out_i − x_ref[b, k(i)]|        (when x_ref is given)
    sums[b, 1] += Σ |q_i − q_ref[b, k(i)]|          (when q_ref is given)
    sums[b, 2] += Σ |q_i|                           (when branch ≥ −1)
    x_keep[b, k(i)] = out_i,   q_keep[b, k(i)] = q_i   (when given)

out is the value the step writes (after the clip); q is prediction ``branch`` as float32, or the blend g for
branch = −1, or nothing for branch = −2. Each difference is a float32 operation; |·| and the sums are float64,
added in an order the backend picks (its blocks' partial sums land by atomic adds: the last bits may vary between
runs; a cache decision flips only on a tie within ~1e-15 of its threshold). sums is float64 [B, 3] (the kernel adds
to it: the caller zeroes it); x_ref, x_keep, q_ref, q_keep float32 [B, S], contiguous, on x's device; a keep
buffer shares memory with nothing else. Only a few elements in f² are touched, out of the cache lines the step has
just read or written: no pass of its own.

The kernels take ``stats`` as ``(tensors, pick)``: tensors = [sums, x_ref, x_keep, q_ref, q_keep] with an empty
tensor (numel 0) where one is not given, pick = [m, H, W, f, branch].
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

NO_Q, BLEND = -2, -1  # branch: no q statistics; q = the blend g


@dataclass(frozen=True)
class StepStats:
    sums: torch.Tensor
    pick: tuple
    x_ref: torch.Tensor | None = None
    x_keep: torch.Tensor | None = None
    q_ref: torch.Tensor | None = None
    q_keep: torch.Tensor | None = None


def subsample_pick(shape, f: int, branch: int = NO_Q) -> tuple:
    """The pick (m, H, W, f, branch) of step caching's subsample of samples of ``shape`` ([B, ...]): every f-th element
    of the last two dimensions of samples with at least two, of a larger flat sample (>= 4096 elements) its first
    1/f² (fastdiff.sampling.features.caching._subsample), else every element."""
    n = math.prod(shape[1:])
    if f <= 1 or (len(shape) < 3 and n < 4096):
        return (n, 1, 1, 1, branch)
    if len(shape) >= 3:
        return (n, shape[-2], shape[-1], f, branch)
    return (n // (f * f), 1, 1, 1, branch)


def picked(n: int, pick) -> int:
    """S: the picked elements per sample."""
    m, H, W, f = pick[:4]
    if H * W == 1:
        return m
    return (n // (H * W)) * (-(-H // f)) * (-(-W // f))


def picked_indices(n: int, pick, device=None) -> torch.Tensor:
    """The picked elements' indices i within a sample, in the order of k(i) (int64 [S])."""
    m, H, W, f = pick[:4]
    i = torch.arange(min(m, n), device=device)
    keep = ((i % W) % f == 0) & (((i // W) % H) % f == 0)
    return i[keep]


def check_stats(stats, x: torch.Tensor, K1: int):
    """``stats`` (a StepStats, or None) checked against x [B, ...] and K1 predictions; the kernels' form
    ``([sums, x_ref, x_keep, q_ref, q_keep], [m, H, W, f, branch])`` (empty tensors where not given), or None."""
    if stats is None:
        return None
    if not isinstance(stats, StepStats):
        raise TypeError(f"stats must be a fastdiff.ops.step_stats.StepStats, got {type(stats).__name__}")
    B = x.shape[0]
    n = x.numel() // B if B else 0
    pick = stats.pick
    if isinstance(pick, (str, bytes, torch.Tensor)) or not hasattr(pick, "__len__") or len(pick) != 5 or \
            not all(isinstance(v, int) and not isinstance(v, bool) for v in pick):
        raise TypeError(f"stats.pick must be 5 ints (m, H, W, f, branch), got {pick!r}")
    m, H, W, f, branch = pick
    if f < 1 or H < 1 or W < 1:
        raise ValueError(f"stats.pick's H, W and f must be >= 1, got {pick!r}")
    if H * W == 1:
        if not 0 <= m <= n:
            raise ValueError(f"stats.pick's m must be in [0, {n}] (the elements per sample), got {m}")
    elif m != n or n % (H * W) != 0:
        raise ValueError(f"stats.pick with H x W = {H} x {W} picks from whole samples: m must be n = {n} and n a "
                         f"multiple of H W, got m = {m}")
    if not NO_Q <= branch < K1:
        raise ValueError(f"stats.pick's branch must be -2 (no q), -1 (the blend g) or a prediction's index < {K1}, "
                         f"got {branch}")
    S = picked(n, pick)
    sums = stats.sums
    if not isinstance(sums, torch.Tensor) or sums.dtype != torch.float64 or sums.shape != (B, 3) or \
            sums.device != x.device or not sums.is_contiguous():
        raise TypeError(f"stats.sums must be a contiguous float64 tensor [B, 3] = [{B}, 3] on {x.device}, got "
                        f"{_describe(sums)}")
    tensors = [sums]
    for name in ("x_ref", "x_keep", "q_ref", "q_keep"):
        t = getattr(stats, name)
        if t is not None:
            if not isinstance(t, torch.Tensor) or t.dtype != torch.float32 or t.shape != (B, S) or \
                    t.device != x.device or not t.is_contiguous():
                raise TypeError(f"stats.{name} must be a contiguous float32 tensor [B, S] = [{B}, {S}] on "
                                f"{x.device}, got {_describe(t)}")
            if name.startswith("q") and branch == NO_Q:
                raise ValueError(f"stats.{name} needs q: stats.pick's branch must be -1 (g) or a prediction's index")
        tensors.append(t if t is not None else sums.new_empty(0, dtype=torch.float32))
    return tensors, [m, H, W, f, branch]


def _describe(t) -> str:
    if not isinstance(t, torch.Tensor):
        return type(t).__name__
    return f"{t.dtype} {tuple(t.shape)} on {t.device}{'' if t.is_contiguous() else ' (not contiguous)'}"


def reference_stats(stats, out: torch.Tensor, preds: list, g: torch.Tensor) -> None:
    """The specification on the kernels' form: adds to sums and writes the keep buffers (module docstring)."""
    (sums, x_ref, x_keep, q_ref, q_keep), pick = stats
    B = out.shape[0]
    n = out.numel() // B if B else 0
    if B == 0 or n == 0:
        return
    idx = picked_indices(n, pick, out.device)
    o = out.reshape(B, n)[:, idx]
    if x_ref.numel():
        sums[:, 0] += (o - x_ref).double().abs().sum(1)
    if x_keep.numel():
        x_keep.copy_(o)
    branch = pick[4]
    if branch == NO_Q:
        return
    q = (g if branch == BLEND else preds[branch].float()).reshape(B, n)[:, idx]
    if q_ref.numel():
        sums[:, 1] += (q - q_ref).double().abs().sum(1)
    sums[:, 2] += q.double().abs().sum(1)
    if q_keep.numel():
        q_keep.copy_(q)
