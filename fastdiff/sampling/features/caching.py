"""Step caching: reuse a model output when the model's input has barely changed (docs/guidance.md, "Step caching").

``sample(..., cache=...)`` takes a rule by name ("easycache", "lazycache", "adaptive") or a rule object:

- :class:`EasyCache` (Zhou et al. 2025, "EasyCache"; ComfyUI's EasyCache node): at each evaluation the input's
  change since the last computed evaluation, ``mean |x - x_c|``, times the last measured transformation rate
  ``k = mean |o_c - o_c'| / mean |x_c - x_c'|`` over the output's scale ``mean |o_c|``, adds to a running sum; while
  the sum stays under ``reuse_threshold`` the evaluation reuses the cache, else the model runs and the sum restarts.
  Statistics on the first condition's branch, subsampled by ``subsample_factor`` in the last two dimensions.
- :class:`LazyCache` (ComfyUI's LazyCache node): the same decision on the guided prediction (the CFG blend at the
  stage's scale) instead of the first condition's.
- :class:`AdaptiveCache` (Ye et al. 2024, "Training-Free Adaptive Diffusion with Bounded Difference Approximation
  Strategy"): with d_j = mean |x_j - x_{j-1}| over the evaluations' inputs, evaluation j reuses the output when the
  third-order difference of the inputs is small, |(d_j + d_{j-2}) / 2 - d_{j-1}| <= threshold d_{j-1}, after
  ``warmup`` computed evaluations and at most ``max_skips`` in a row.
- :class:`CacheIndicator`: the caller's indicator (TeaCache / MagCache style, from the model's own first block):
  ``indicator(x, t)`` returns a change estimate, summed while under ``threshold``.

What a skipped evaluation returns (``reuse``): ``"output"``, the last computed output itself (the prediction;
AdaptiveDiffusion's choice; no pass at all: the step reads the kept tensor), or ``"residual"``, the input plus the
last output change ``o_c - x_c`` (EasyCache's transformation vector; one pass to make it and one to apply it);
``order=1`` / ``2`` extrapolates either in t through the last two / three computed evaluations (TaylorSeer's
orders at the output; one pass, or none where the step's own call reads the kept outputs). ``order=None`` (the
default): 2 for a deterministic method, 0 for a stochastic one (on a noisy trajectory the extrapolation amplifies the
noise: dpmpp_2m_sde on the digits model, 20 steps, AdaptiveCache(0.3, max_skips=2) at order 2 gave a Fréchet
distance of 13.5 against 0.21 uncached). Every branch of a guided evaluation is cached alike, so every method,
guidance rule, editing mode and feature downstream of the model call sees predictions as usual.

The decision is batch-wide (one model call or none) and costs one small host read per evaluation: the statistics
(means over a subsample) come out of the fused step's own pass where the plan allows (the kernel that writes the
state measures it, the one that reads a computed output measures that: fastdiff.sampling.features.cached_stats),
else the decider reads the subsamples (the functions below). In a captured loop (cuda_graph=True) it is made on the
device instead and each evaluation's computed and reused branches are CUDA graph conditional nodes
(fastdiff.sampling.features.cached_graph): no host read.

The window ``start_percent`` / ``end_percent`` is in flow time t (0 = noise, 1 = data; ComfyUI's percent of its
model's timesteps, the same on a flow model with shift 1): before it every evaluation runs and feeds the statistics
(warm-up), from ``end_percent`` on every evaluation runs.
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass
from typing import Callable, ClassVar

import torch
import torch.nn.functional as F

from fastdiff.sampling.core.arguments import is_number

_REUSES = ("output", "residual")


def _check_common(rule) -> None:
    for name in ("start_percent", "end_percent"):
        v = getattr(rule, name)
        if not is_number(v) or not 0.0 <= v <= 1.0:
            raise ValueError(f"{name} must be a number in [0, 1], got {v!r}")
    if rule.max_skips is not None and (not isinstance(rule.max_skips, int) or isinstance(rule.max_skips, bool)
                                       or rule.max_skips < 1):
        raise ValueError(f"max_skips must be None or an int >= 1, got {rule.max_skips!r}")
    if rule.reuse not in _REUSES:
        raise ValueError(f"reuse must be one of {', '.join(map(repr, _REUSES))}, got {rule.reuse!r}")
    if rule.order is not None and (rule.order not in (0, 1, 2) or isinstance(rule.order, bool)):
        raise ValueError(f"order must be None (2 for a deterministic method, 0 for a stochastic one), 0 (reuse), 1 "
                         f"or 2 (extrapolation in t), got {rule.order!r}")
    if not isinstance(rule.subsample_factor, int) or isinstance(rule.subsample_factor, bool) or \
            rule.subsample_factor < 1:
        raise ValueError(f"subsample_factor must be an int >= 1, got {rule.subsample_factor!r}")


def _threshold(name: str, v) -> None:
    if not is_number(v) or not 0.0 <= v < math.inf:
        raise ValueError(f"{name} must be a finite number >= 0, got {v!r}")


@dataclass(frozen=True)
class EasyCache:
    """EasyCache's decision (module docstring); ComfyUI's options and defaults."""

    reuse_threshold: float = 0.2
    start_percent: float = 0.15
    end_percent: float = 0.95
    max_skips: int | None = None
    reuse: str = "output"
    order: int | None = None
    subsample_factor: int = 8
    verbose: bool = False

    name: ClassVar[str] = "easycache"
    on_guided: ClassVar[bool] = False  # the statistics on the first condition's branch

    def __post_init__(self):
        _threshold("reuse_threshold", self.reuse_threshold)
        _check_common(self)

    def decider(self):
        return _ChangeRate(self)


@dataclass(frozen=True)
class LazyCache(EasyCache):
    """LazyCache: EasyCache's decision on the guided prediction (module docstring)."""

    name: ClassVar[str] = "lazycache"
    on_guided: ClassVar[bool] = True


@dataclass(frozen=True)
class AdaptiveCache:
    """AdaptiveDiffusion's third-order criterion (module docstring); its options and defaults (SDXL's)."""

    threshold: float = 0.01
    max_skips: int | None = 4
    warmup: int = 4
    start_percent: float = 0.0
    end_percent: float = 1.0
    reuse: str = "output"
    order: int | None = None
    subsample_factor: int = 1
    verbose: bool = False

    name: ClassVar[str] = "adaptive"
    on_guided: ClassVar[bool] = False

    def __post_init__(self):
        _threshold("threshold", self.threshold)
        if not isinstance(self.warmup, int) or isinstance(self.warmup, bool) or self.warmup < 3:
            raise ValueError(f"warmup must be an int >= 3 (the criterion needs three input changes), got "
                             f"{self.warmup!r}")
        _check_common(self)

    def decider(self):
        return _ThirdDifference(self)


@dataclass(frozen=True)
class CacheIndicator:
    """The caller's indicator: ``indicator(x, t)`` -> a non-negative change estimate (a number or 0-d tensor) for
    the input x (the first condition's branch, [B, ...]) at flow times t ([B]); summed over the evaluations since
    the last computed one, the evaluation reuses while the sum is under ``threshold``."""

    indicator: Callable
    threshold: float = 0.1
    start_percent: float = 0.0
    end_percent: float = 1.0
    max_skips: int | None = None
    reuse: str = "output"
    order: int | None = None
    subsample_factor: int = 1
    verbose: bool = False

    name: ClassVar[str] = "indicator"
    on_guided: ClassVar[bool] = False

    def __post_init__(self):
        if not callable(self.indicator):
            raise TypeError(f"indicator must be a callable indicator(x, t) -> change, got "
                            f"{type(self.indicator).__name__}")
        _threshold("threshold", self.threshold)
        _check_common(self)

    def decider(self):
        return _Indicator(self)


CACHE_RULES = {rule.name: rule for rule in (EasyCache, LazyCache, AdaptiveCache)}


def get_cache(cache):
    """sample()'s ``cache``: None, a rule's name (its defaults) or a rule object."""
    if cache is None:
        return None
    if isinstance(cache, str):
        if cache not in CACHE_RULES:
            raise ValueError(f"cache must be one of {', '.join(map(repr, CACHE_RULES))}, a rule object "
                             f"(fastdiff.sampling.EasyCache, ...) or None, got {cache!r}")
        return CACHE_RULES[cache]()
    if not isinstance(cache, (EasyCache, AdaptiveCache, CacheIndicator)):
        raise TypeError(f"cache must be a rule name or object (EasyCache, LazyCache, AdaptiveCache, CacheIndicator), "
                        f"got {type(cache).__name__}")
    return cache


_NATIVE = []


def _native_mean_abs():
    """fastdiff._C.mean_abs, or None without the native module (looked up once)."""
    if not _NATIVE:
        _NATIVE.append(getattr(sys.modules.get("fastdiff._C"), "mean_abs", None))
    return _NATIVE[0]


def _native_for(a: torch.Tensor, b: torch.Tensor | None):
    """fastdiff._C.mean_abs where it reads a (and b): float32 CPU tensors; else None (torch ops)."""
    native = _NATIVE[0] if _NATIVE else _native_mean_abs()
    if native is not None and a.dtype is torch.float32 and a.is_cpu and \
            (b is None or (b.dtype is torch.float32 and b.is_cpu)):
        return native
    return None


def l1_tensor(a: torch.Tensor, b: torch.Tensor | None = None) -> torch.Tensor:
    """mean |a - b| (mean |a| without b) as a 0-d float32 tensor: torch ops, no host read (a half-precision model's
    outputs: the means in float32). The statistics off the native path, eager and captured (cached_graph)."""
    a = a if a.dtype is torch.float32 else a.float()
    return a.abs().mean() if b is None else F.l1_loss(a, b if b.dtype is torch.float32 else b.float())


def _mean_abs(a: torch.Tensor, b: torch.Tensor | None = None, norm: bool = False, keep: bool = False):
    """mean |a - b| (mean |a| without b); with ``norm`` the pair (that, mean |a|); with ``keep`` a is copied into b
    after. fastdiff._C.mean_abs for float32 CPU tensors: one read, host floats (12 us on 65536 subsampled elements
    against F.l1_loss's 57 us, three passes: on the CPU these reads were most of a cached step's own time); else
    torch ops and 0-d tensors (on a GPU: no host read here)."""
    native = _native_for(a, b)
    if native is not None:
        return native(a, b, norm, keep)
    a32 = a if a.dtype is torch.float32 else a.float()  # widened once for both means
    d = l1_tensor(a32, b)
    out = (d, l1_tensor(a32)) if norm else d
    if keep:
        b.copy_(a)
    return out


def _div(a, b):
    """a / b with IEEE semantics for host floats too (x / 0 = ±inf, 0 / 0 = nan), as on tensors."""
    try:
        return a / b
    except ZeroDivisionError:
        return math.nan if a == 0 or a != a else math.copysign(math.inf, a)


def _copy_into(src: torch.Tensor, dst: torch.Tensor) -> None:
    """dst = src: natively on float32 CPU tensors (1.3 us, a read included, against copy_'s 3.8 us of dispatch)."""
    native = _native_for(src, dst)
    if native is not None:
        native(src, dst, False, True)
    else:
        dst.copy_(src)


def _subsample(x: torch.Tensor, f: int) -> torch.Tensor:
    """Every f-th element of the last two dimensions of samples with at least two (ComfyUI's spatial subsample);
    of a larger flat sample (>= 4096 elements), its first 1/f² (a strided pick would touch most cache lines)."""
    if f <= 1:
        return x
    if x.dim() >= 3:
        return x[..., ::f, ::f]
    n = x.numel() // x.shape[0] if x.shape[0] else 0
    if n < 4096:
        return x
    if x.dim() == 2 and x.stride(1) == 1:  # one view op (flatten and slice: two, ~0.8 us more a computed step)
        return x.as_strided((x.shape[0], n // (f * f)), (x.stride(0), 1))
    return x.flatten(1)[:, :n // (f * f)]  # a contiguous slice: 1/f² of the reads


def _input_view(views: dict, x: torch.Tensor, f: int) -> torch.Tensor:
    """x's subsample, made once per input tensor (the plan's inputs are kept buffers: one view per stage, ~3 us of
    view ops saved per evaluation)."""
    kept = views.get(id(x))
    if kept is None or kept[0] is not x:
        kept = views[id(x)] = (x, _subsample(x, f))
    return kept[1]


class _ChangeRate:
    """EasyCache's running sum of estimated relative output changes."""

    stats = None  # the statistics from the fused step's pass (cached_stats.InStepStats), where the plan allows

    def __init__(self, rule):
        self.rule = rule
        self.rate = self.x_prev = self.o_prev = self.o_norm = self.input_change = None
        self.total = 0.0
        self.views: dict = {}

    def skip(self, t: float, x: torch.Tensor, t_rows) -> bool:
        xs = self._input_view(x)
        if self.stats is not None:
            self.input_change = self.stats.input_change(xs)
        else:
            self.input_change = None if self.x_prev is None else _mean_abs(xs, self.x_prev)
        if self.o_norm is None or self.rate is None or self.input_change is None:
            return False
        self.total += float(_div(self.rate * self.input_change, self.o_norm))  # the evaluation's one host read
        if self.total < self.rule.reuse_threshold:
            return True
        self.total = 0.0
        return False

    def forced(self) -> None:
        self.total = 0.0

    def _input_view(self, x: torch.Tensor) -> torch.Tensor:
        return _input_view(self.views, x, self.rule.subsample_factor)

    def computed(self, x: torch.Tensor, o: torch.Tensor | None) -> None:
        """A computed evaluation at x with output o (None: the step's kernel measures it, record_output after)."""
        if self.stats is not None:
            self.stats.rebase(self._input_view(x))
            if o is not None:
                self.record_output(*self.stats.read_output(_subsample(o, self.rule.subsample_factor)))
            return
        xs, os_ = self._input_view(x), _subsample(o, self.rule.subsample_factor)
        fresh = self.x_prev is None or self.x_prev.shape != xs.shape or self.o_prev.shape != os_.shape
        if fresh:
            self.x_prev, self.o_prev = torch.empty_like(xs), torch.empty_like(os_)
        # the output's change since the last computed evaluation and its scale, its subsample kept: one read
        change, norm = _mean_abs(os_, self.o_prev, norm=True, keep=True)
        _copy_into(xs, self.x_prev)
        self.record_output(None if fresh else change, norm)

    def record_output(self, change, norm) -> None:
        """A computed output's change since the last one (None for the first) and its scale."""
        self.o_norm = norm
        if change is not None and self.input_change is not None:
            self.rate = _div(change, self.input_change)
        self.input_change = None

    def seen(self, x: torch.Tensor) -> None:
        """An evaluation outside the window that still runs: its statistics."""


class _ThirdDifference:
    """AdaptiveDiffusion's criterion on the evaluations' inputs."""

    stats = None  # as _ChangeRate's

    def __init__(self, rule):
        self.rule = rule
        self.x_last = None
        self.views: dict = {}
        self.diffs: list[float] = []
        self.count = 0  # evaluations seen

    def _observe(self, x: torch.Tensor) -> None:
        xs = _input_view(self.views, x, self.rule.subsample_factor)
        if self.stats is not None:
            d = self.stats.input_change(xs)
            if d is not None:
                self.diffs.append(float(d))
            self.stats.rebase(xs)
        elif self.x_last is None or self.x_last.shape != xs.shape or self.x_last.dtype != xs.dtype:
            self.x_last = xs.clone(memory_format=torch.contiguous_format)
        else:  # the change and the copy in one read; the evaluation's one host read
            self.diffs.append(float(_mean_abs(xs, self.x_last, keep=True)))
        self.count += 1

    def skip(self, t: float, x: torch.Tensor, t_rows) -> bool:
        self._observe(x)
        if self.count <= self.rule.warmup or len(self.diffs) < 3:
            return False
        cur, prev, prevprev = self.diffs[-1], self.diffs[-2], self.diffs[-3]
        return abs(0.5 * (cur + prevprev) - prev) <= self.rule.threshold * prev

    def forced(self) -> None:
        pass

    def computed(self, x: torch.Tensor, o: torch.Tensor) -> None:
        pass

    def seen(self, x: torch.Tensor) -> None:
        self._observe(x)


class _Indicator:
    stats = None  # the caller's indicator: no statistics of the step's

    def __init__(self, rule):
        self.rule = rule
        self.total = 0.0
        self.primed = False

    def skip(self, t: float, x: torch.Tensor, t_rows) -> bool:
        change = self.rule.indicator(x, t_rows)
        if not self.primed:
            return False
        change = float(change)
        if not change >= 0.0:  # NaN too
            raise ValueError(f"cache indicator returned {change!r} at t={t:.6g}: it must be a finite number >= 0")
        self.total += change
        if self.total < self.rule.threshold:
            return True
        self.total = 0.0
        return False

    def forced(self) -> None:
        self.total = 0.0

    def computed(self, x: torch.Tensor, o: torch.Tensor) -> None:
        self.primed = True

    def seen(self, x: torch.Tensor) -> None:
        pass
