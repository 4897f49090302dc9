"""The general fused sampler step (docs/design.md §2): the one kernel every sampler method and
guidance rule runs through. Per sample b, with K1 = len(preds) branches, H = len(history) buffers and
D = len(streams) noise draws,

    g    = w_0 p_0 + Σ_{k≥1} w_k (p_k − p_0)                              (added left to right)
    out  = c_x x + c_g g + Σ_j c_h[j] h_j + Σ_d c_z[d] ξ_d
    side = s_x x + s_g g + Σ_j s_h[j] h_j + Σ_d s_z[d] ξ_d                 (when side is given)

every outs[i] receives out (the next model input's copies: the state and its K guidance twins),
and finite[b] is set to 0 when an element of any p_k of sample b is inf or NaN (it is never set
to 1: the caller initializes it). ξ_d is the spec-v1 normal of (seeds[b], streams[d], element i).

With ``clip = [c, d]`` (diffusers' ``clip_sample`` fused: c the clamp bound, d the coefficient of the clamped
value in out; host numbers rounded once to float32, c > 0), the side row s is computed even without a side
tensor, and then, per element in float32 in this order (three roundings, never one fused multiply-add):

    s_c  = -c where s < -c, c where s > c, else s        (a NaN stays NaN, as torch.clamp)
    t    = s_c − s;   u = d · t;   out = out + u
    side = s_c                                            (when side is given)

(With the side row the x0 estimate and d the coefficient of x0 in the step, this is the step from the clamped
x0 with the unclipped eps.) clip is refused with per-sample coefficient rows (``coeffs`` as a tensor).

Terms: x and g are always present; a history term is present when the buffer is given (0 · h is
added: history buffers must be initialized); a noise term is present only where its coefficient is
non-zero (a draw whose coefficients are all zero is not generated). Sums run in the order written,
every operation in float32, so K1 = 2 with w = (1, cfg) is the classic CFG blend p∅ + cfg (p − p∅)
bit for bit (1 · p∅ is exact).

Coefficients: ``weights`` (K1 numbers: w_0, w_1, …) and ``coeffs`` (2M numbers, M = 2 + H + D: the
out row c_x, c_g, c_h…, c_z… then the side row) are host numbers rounded once to float32, or float32
device tensors [B, K1] / [B, 2M] with one row per sample (per-sample times, guidance scales, churn;
computed on the device, e.g. from a reduction, with no host sync).

Tensors: x, history, outs, side float32 [B, *S]; preds [B, *S] float32, float16 or bfloat16 (one
dtype); seeds int64 [B]; finite int32 [B]; everything contiguous on x's device. An output may be
exactly an input (outs[0] = x, side = history[j]): each element reads its inputs before it writes.
Limits: K1 ≤ 8, H ≤ 4, D ≤ 4, len(outs) ≤ 8.

With ``stats`` (a :class:`fastdiff.ops.step_stats.StepStats`) the step also adds per-sample L1 statistics of
out and of one prediction (or g) over a subsample, and keeps those subsamples, from the values it holds (step
caching's decision, fastdiff.sampling.features.cached_stats; spec: fastdiff/ops/step_stats.py).

``sampler_step_reference`` is the specification. The kernels write in place and refuse inputs that
require grad (``fastdiff.ops.guided_step`` is the differentiable two-branch form).
"""

from __future__ import annotations

import math
import numbers
import struct

import torch

from fastdiff import _checks, _native
from fastdiff import dispatch as _dispatch
from fastdiff._backends import register_kernel
from fastdiff.ops.randn import randn_reference
from fastdiff.ops.step_stats import check_stats, reference_stats

PRED_DTYPES = _checks.PRED_DTYPES
MAX_BRANCHES, MAX_HISTORY, MAX_DRAWS, MAX_OUTS = 8, 4, 4, 8
# the kernels' positional arguments (fastdiff/_backends), the keys of prepare()'s result
KERNEL_ARGS = ("x", "preds", "history", "seeds", "streams", "weights", "coeffs", "sample_weights", "sample_coeffs",
               "outs", "side", "finite", "clip", "stats")
# what with_rows adds (with seeds)
ROW_ARGS = ("streams", "weights", "coeffs", "sample_weights", "sample_coeffs", "clip")


def _row_values(name, values, count, B, device):
    """(host floats or None, per-sample tensor or None) of a coefficient row argument."""
    if isinstance(values, torch.Tensor):
        if values.dtype != torch.float32:
            raise TypeError(f"{name} as a tensor must be float32 [B, {count}], got {values.dtype}")
        if values.shape != (B, count):
            raise ValueError(f"{name} as a tensor must be [B, {count}] = [{B}, {count}], got {tuple(values.shape)}")
        if values.device != device:
            raise ValueError(f"{name} is on {values.device} but x is on {device}")
        return None, values.contiguous()
    if isinstance(values, (str, bytes)) or not hasattr(values, "__len__"):
        raise TypeError(f"{name} must be a sequence of {count} numbers or a float32 tensor [B, {count}], "
                        f"got {type(values).__name__}")
    if len(values) != count:
        raise ValueError(f"{name} must hold {count} numbers, got {len(values)}")
    return [_checks.finite_real(f"{name}[{i}]", c) for i, c in enumerate(values)], None


def _tensor_list(name, values, limit):
    if isinstance(values, torch.Tensor):
        raise TypeError(f"{name} must be a list of tensors, got a tensor (write [{name}])")
    values = list(values)
    if len(values) > limit:
        raise ValueError(f"{name} holds {len(values)} tensors; at most {limit} are supported")
    for i, t in enumerate(values):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name}[{i}] must be a tensor, got {type(t).__name__}")
    return values


def check_like_x(name, t, x, dtypes):
    """``t`` has x's shape and device and one of ``dtypes`` (errors name the argument)."""
    if t.shape != x.shape:
        raise ValueError(f"{name} must have x's shape {tuple(x.shape)}, got {tuple(t.shape)}")
    if t.device != x.device:
        raise ValueError(f"{name} is on {t.device} but x is on {x.device}")
    if t.dtype not in dtypes:
        raise TypeError(f"{name} must be {' or '.join(str(d) for d in dtypes)}, got {t.dtype}")


def _check_outputs_apart(named) -> None:
    """Outputs must not share memory (each is written in full; an output may still be an input)."""
    spans = []
    for name, t in named:
        if t is None or t.numel() == 0:
            continue
        start = t.untyped_storage().data_ptr() + t.storage_offset() * t.element_size()
        span = (start, start + t.numel() * t.element_size(), name, t.device)
        for other in spans:
            if other[3] == span[3] and other[0] < span[1] and span[0] < other[1]:
                raise ValueError(f"{name} and {other[2]} must not overlap (each output is written in full)")
        spans.append(span)


def prepare(x, preds, weights, history, coeffs, seeds, streams, outs, side, finite, clip=None, stats=None):
    """Checks every argument once; returns the normalized call (a dict of the kernel's arguments)."""
    call = with_rows(prepare_tensors(x, preds, history, seeds, outs, side, finite), weights, coeffs, streams, clip)
    return with_stats(call, stats)


def with_stats(call: dict, stats) -> dict:
    """``call`` with ``stats`` (a fastdiff.ops.step_stats.StepStats or None) checked, in the kernels' form."""
    checked = check_stats(stats, call["x"], len(call["preds"]))
    if checked is not None:  # a keep buffer is written in full: apart from every output and every input
        _, x_ref, x_keep, q_ref, q_keep = checked[0]
        writes = [*((f"outs[{i}]", o) for i, o in enumerate(call["outs"])), ("side", call["side"]),
                  ("stats.x_keep", x_keep), ("stats.q_keep", q_keep)]
        _check_outputs_apart(writes)
        reads = [("x", call["x"]), *((f"preds[{i}]", p) for i, p in enumerate(call["preds"])),
                 *((f"history[{i}]", h) for i, h in enumerate(call["history"])),
                 ("stats.x_ref", x_ref), ("stats.q_ref", q_ref)]
        for keep in writes[-2:]:
            for other in reads:
                _check_outputs_apart([keep, other])
    return dict(call, stats=checked)


def round_f32(c) -> float:
    """float(c) rounded to the nearest float32, as a Python float (the kernels' rounding of a host number)."""
    try:
        return struct.unpack("f", struct.pack("f", float(c)))[0]
    except OverflowError:  # finite float64 beyond float32's range rounds to +-inf
        return math.copysign(math.inf, float(c))


def check_clip(clip, per_sample: bool):
    """clip = [c, d] checked (c finite and > 0 in float32, d finite within float32's range), as a list of two
    floats, or None."""
    if clip is None:
        return None
    if isinstance(clip, (str, bytes, torch.Tensor)) or not hasattr(clip, "__len__"):
        raise TypeError(f"clip must be a sequence of 2 numbers [c, d] (clamp the side row to [-c, c], out += "
                        f"d (clamped - unclamped)), got {type(clip).__name__}")
    if len(clip) != 2:
        raise ValueError(f"clip must hold 2 numbers [c, d], got {len(clip)}")
    c, d = _checks.finite_real("clip[0]", clip[0]), _checks.finite_real("clip[1]", clip[1])
    if not c > 0 or not round_f32(c) > 0:
        raise ValueError(f"clip[0] (the clamp bound c) must be a number > 0 (in float32), got {clip[0]!r}")
    if per_sample:
        raise ValueError("clip is not supported with per-sample coefficient rows (coeffs as a tensor): its d, the "
                         "step's x0 coefficient, is one host number for the batch, and a per-sample row has its own "
                         "per sample; pass host coefficients (fastdiff.sample clamps such stages in its prediction "
                         "hook, so clip_sample still composes with per-sample options there)")
    return [c, d]


def prepare_tensors(x, preds, history, seeds, outs, side, finite) -> dict:
    """The tensor half of :func:`prepare`, checked; :func:`with_rows` completes it. A loop whose stages
    share their buffers checks them once and pays only the rows' checks per stage."""
    if not isinstance(x, torch.Tensor) or x.dtype != torch.float32:
        raise TypeError(f"x must be a float32 tensor (the sampler state), got "
                        f"{x.dtype if isinstance(x, torch.Tensor) else type(x).__name__}")
    if x.dim() < 1:
        raise ValueError("x must have a batch dimension: [B, ...]")
    B, device = x.shape[0], x.device
    preds = _tensor_list("preds", preds, MAX_BRANCHES)
    if not preds:
        raise ValueError("preds must hold at least one prediction")
    for i, p in enumerate(preds):
        check_like_x(f"preds[{i}]", p, x, PRED_DTYPES)
        if p.dtype != preds[0].dtype:
            raise TypeError(f"preds[{i}] must have preds[0]'s dtype {preds[0].dtype}, got {p.dtype}")
    history = _tensor_list("history", history, MAX_HISTORY)
    for i, h in enumerate(history):
        check_like_x(f"history[{i}]", h, x, (torch.float32,))
    if outs is None:
        outs = [torch.empty_like(x)]
    outs = _tensor_list("outs", outs, MAX_OUTS)
    if not outs:
        raise ValueError("outs must hold at least one output tensor")
    for i, o in enumerate(outs):
        check_like_x(f"outs[{i}]", o, x, (torch.float32,))
    if side is not None:
        if not isinstance(side, torch.Tensor):
            raise TypeError(f"side must be a tensor, got {type(side).__name__}")
        check_like_x("side", side, x, (torch.float32,))
    _check_outputs_apart([*((f"outs[{i}]", o) for i, o in enumerate(outs)), ("side", side)])
    if finite is not None:
        if not isinstance(finite, torch.Tensor) or finite.dtype != torch.int32 or finite.shape != (B,):
            raise TypeError(f"finite must be an int32 tensor [B] = [{B}], got "
                            f"{tuple(finite.shape) if isinstance(finite, torch.Tensor) else type(finite).__name__}"
                            f"{' ' + str(finite.dtype) if isinstance(finite, torch.Tensor) else ''}")
        if finite.device != device:
            raise ValueError(f"finite is on {finite.device} but x is on {device}")
        if not finite.is_contiguous():
            raise ValueError("finite must be contiguous")
    if seeds is not None:  # None stays None until with_rows knows whether a draw needs them
        seeds = _checks.seeds_tensor(seeds, device)
        if seeds.shape != (B,):
            raise ValueError(f"seeds must hold one seed per sample ({B}), got shape {tuple(seeds.shape)}")
    return dict(x=x, preds=preds, history=history, seeds=seeds, outs=outs, side=side, finite=finite, stats=None)


def with_rows(tensors: dict, weights, coeffs, streams, clip=None) -> dict:
    """The call of :func:`prepare`: ``tensors`` (from :func:`prepare_tensors`, not modified) with the
    branch weights, the coefficient rows, the noise streams and the clip, checked."""
    x, side, seeds = tensors["x"], tensors["side"], tensors["seeds"]
    B, device = x.shape[0], x.device
    if isinstance(streams, numbers.Integral) or not hasattr(streams, "__len__"):
        raise TypeError(f"streams must be a sequence of stream ids, got {type(streams).__name__}")
    streams = [_checks.stream_id(s, f"streams[{i}]") for i, s in enumerate(streams)]
    if len(streams) > MAX_DRAWS:
        raise ValueError(f"streams holds {len(streams)} draws; at most {MAX_DRAWS} are supported")
    K1, H, D = len(tensors["preds"]), len(tensors["history"]), len(streams)
    M = 2 + H + D
    if weights is None:
        if K1 != 1:
            raise ValueError(f"weights are required with {K1} predictions (w_0, w_1, ...)")
        weights = (1.0,)
    host_weights, sample_weights = _row_values("weights", weights, K1, B, device)
    host_coeffs, sample_coeffs = _row_values("coeffs", coeffs, 2 * M, B, device)
    clip = check_clip(clip, sample_coeffs is not None)
    if seeds is None:
        side_row = side is not None or clip is not None  # the side row is computed (its draws too)
        needs_noise = D > 0 and (sample_coeffs is not None or any(
            host_coeffs[2 + H + d] != 0 or (side_row and host_coeffs[M + 2 + H + d] != 0) for d in range(D)))
        if needs_noise:
            raise ValueError("seeds are required when a noise coefficient is non-zero")
        seeds = torch.zeros(B, dtype=torch.int64, device=device)
    return dict(tensors, seeds=seeds, streams=streams, weights=host_weights or [0.0] * K1,
                coeffs=host_coeffs or [0.0] * (2 * M), sample_weights=sample_weights, sample_coeffs=sample_coeffs,
                clip=clip)


def _column(host, sample, j, B, nd):
    """Coefficient j as a Python float (host) or a [B, 1, ...] float32 tensor (per sample)."""
    if sample is None:
        return host[j]
    return sample[:, j].reshape((B,) + (1,) * (nd - 1))


@register_kernel("reference", "sampler_step")
def run_reference(x, preds, history, seeds, streams, weights, coeffs, sample_weights, sample_coeffs, outs, side,
                  finite, clip=None, stats=None):
    """The specification on prepared arguments (see :func:`prepare`)."""
    B, nd, f32 = x.shape[0], x.dim(), torch.float32
    H, D = len(history), len(streams)
    M = 2 + H + D

    def w(k):
        return _column(weights, sample_weights, k, B, nd)

    def c(row, j):
        return _column(coeffs, sample_coeffs, row * M + j, B, nd)

    p = [q.to(f32) for q in preds]
    # Python floats stay floats: float × float32 tensor rounds the float to float32 like the kernels,
    # and makes no device tensor from host data (no copy, no sync, capturable).
    g = w(0) * p[0]
    for k in range(1, len(p)):
        g = g + w(k) * (p[k] - p[0])
    noises = {}

    def noise(d):
        if d not in noises:
            noises[d] = randn_reference(seeds, streams[d], tuple(x.shape[1:]), device=x.device, dtype=f32)
        return noises[d]

    def row_value(row):
        v = c(row, 0) * x + c(row, 1) * g
        for j, h in enumerate(history):
            v = v + c(row, 2 + j) * h
        for d in range(D):
            cz = c(row, 2 + H + d)
            if sample_coeffs is None:
                if cz != 0:
                    v = v + cz * noise(d)
            else:  # omitted per sample where the coefficient is zero
                v = torch.where(cz != 0, v + cz * noise(d), v)
        return v

    result = row_value(0)
    side_value = row_value(1) if side is not None or clip is not None else None
    if clip is not None:  # clip_sample: three float32 roundings in this order (the kernels' too)
        c, d = round_f32(clip[0]), round_f32(clip[1])
        s_c = torch.where(side_value > c, c, torch.where(side_value < -c, -c, side_value))  # NaN stays
        t = s_c - side_value
        u = d * t
        result = result + u
        side_value = s_c
    if finite is not None:
        n = x.numel() // B if B else 0
        for q in p:
            finite.masked_fill_(~torch.isfinite(q).reshape(B, n).all(1), 0)
    if stats is not None:  # before the writes: a reference buffer may be read after an output aliasing x is written
        reference_stats(stats, result, p, g)
    if side is not None:
        side.copy_(side_value)
    for o in outs:
        o.copy_(result)
    return outs[0]


def sampler_step_reference(x, preds, *, weights=None, history=(), coeffs, seeds=None, streams=(), outs=None,
                           side=None, finite=None, clip=None, stats=None):
    """Pure-PyTorch specification of :func:`sampler_step`; returns ``outs[0]``."""
    return run_reference(**prepare(x, preds, weights, history, coeffs, seeds, streams, outs, side, finite, clip,
                                   stats))


def run_kernel(name, x, preds, history, seeds, streams, weights, coeffs, sample_weights, sample_coeffs, outs, side,
               finite, clip=None, stats=None):
    """Runs backend ``name``'s step kernel on prepared arguments (writes outs, side, finite)."""
    if name != "reference" and not all(t is None or t.is_contiguous() for t in (x, *preds, *history, *outs, side)):
        raise ValueError("sampler_step kernels need contiguous x, preds, history, outs and side "
                         "(the sampler passes contiguous buffers; call .contiguous() on custom inputs)")
    # clip and stats only when given: a kernel of the twelve arguments before them keeps working
    tail = () if clip is None and stats is None else (clip,) if stats is None else (clip, stats)
    _dispatch.kernel(name, "sampler_step")(x, preds, history, seeds, streams, weights, coeffs, sample_weights,
                                           sample_coeffs, outs, side, finite, *tail)
    return outs[0]


def sampler_step(x, preds, *, weights=None, history=(), coeffs, seeds=None, streams=(), outs=None, side=None,
                 finite=None, clip=None, stats=None, backend=None):
    """One general fused sampler step on the selected backend; see the module docstring. Returns
    ``outs[0]`` (a new tensor when ``outs`` is None)."""
    call = prepare(x, preds, weights, history, coeffs, seeds, streams, outs, side, finite, clip, stats)
    name = _dispatch.resolve(x.device, backend)
    if name != "reference" and torch.is_grad_enabled():
        named = [("x", x), *((f"preds[{i}]", p) for i, p in enumerate(call["preds"])),
                 *((f"history[{i}]", h) for i, h in enumerate(call["history"])),
                 ("weights", call["sample_weights"]), ("coeffs", call["sample_coeffs"]),
                 *((f"outs[{i}]", o) for i, o in enumerate(call["outs"])), ("side", call["side"])]
        for arg, t in named:
            if t is not None and t.requires_grad:
                raise RuntimeError(f"sampler_step: {arg} requires grad, but the {name} kernel writes its outputs in "
                                   "place; use fastdiff.ops.guided_step (differentiable), the reference backend, or "
                                   "torch.no_grad()")
    return run_kernel(name, **call)


if _native.status.loaded and hasattr(torch.ops.fastdiff, "sampler_step"):

    @torch.library.register_fake("fastdiff::sampler_step")
    def _sampler_step_fake(x, preds, history, seeds, streams, weights, coeffs, sample_weights, sample_coeffs, outs,
                           side, finite, clip=None, stats=None, stats_pick=None):
        return None  # writes outs, side, finite and the stats tensors in place
