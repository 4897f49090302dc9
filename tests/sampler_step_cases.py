"""Shared by the sampler_step tests (tests/test_sampler_step.py: the CPU kernel; test_sampler_step_triton.py:
the Triton kernel): the inputs of one call, a run on fresh copies of the mutable inputs, the exact
float32 fused multiply-add and the model of the kernels' arithmetic built on it."""

import math

import torch

from fastdiff.ops.sampler_step import prepare

SEEDS = [5, 2**63 + 1 - 2**64, 7, 0, 123456789]  # as int64: the second is the seed 2^63 + 1
STREAMS = [3, 2**32 - 1, 2**31, 17]  # ids >= 2^31 travel to Triton as int32 bit patterns


def step_inputs(B, shape, dtype, K1, H, D, *, per_w=False, per_c=False, zero_noise=(), seed=0, w0=1.0,
                device="cpu"):
    """sampler_step's keyword arguments (less outs / side / finite) of one call.

    zero_noise: (row, sample, draw) triples whose noise coefficient is set to 0 (sample None: the host
    row, else that sample's per-sample row). Host coefficients are float64 values that are not float32
    numbers: their rounding to float32 is part of the check.
    """
    g = torch.Generator().manual_seed(seed)

    def r(*size):
        return torch.randn(*size, generator=g, dtype=torch.float64)

    x = r(B, *shape).float()
    preds = [r(B, *shape).to(dtype) for _ in range(K1)]
    history = [r(B, *shape).float() for _ in range(H)]
    M = 2 + H + D
    weights = [w0] + (r(K1 - 1) * 3).tolist()
    coeffs = r(2 * M).tolist()
    if per_w:
        weights = (r(B, K1) * 2).float()
    if per_c:
        coeffs = r(B, 2 * M).float()
    for row, b, d in zero_noise:
        if b is None:
            coeffs[row * M + 2 + H + d] = 0.0
        else:
            coeffs[b, row * M + 2 + H + d] = 0.0
    seeds = torch.tensor((SEEDS + [11 * b for b in range(len(SEEDS), B)])[:B], dtype=torch.int64)
    put = lambda v: v.to(device) if isinstance(v, torch.Tensor) else v  # noqa: E731
    return {"x": put(x), "preds": [put(p) for p in preds], "history": [put(h) for h in history],
            "weights": put(weights), "coeffs": put(coeffs), "seeds": put(seeds), "streams": STREAMS[:D]}


def run_step(step, kw, *, nout=1, side=False, finite=None, alias=False, clip=None):
    """Runs ``step`` (a function of prepare's normalized arguments) on fresh copies of the mutable
    inputs; returns (outs, side, finite). alias: outs[0] is x and side is history[0]; clip: sampler_step's."""
    x = kw["x"].clone()
    history = [h.clone() for h in kw["history"]]
    outs = [torch.full_like(x, 9.0) for _ in range(nout)]
    side_t = torch.full_like(x, 9.0) if side else None
    if alias:
        outs[0] = x
        if side:
            side_t = history[0]
    fin = finite.clone() if finite is not None else None
    call = prepare(x, kw["preds"], kw["weights"], history, kw["coeffs"], kw["seeds"], kw["streams"], outs, side_t,
                   fin, clip)
    step(**call)
    return outs, side_t, fin


def is_noisy(kw):
    H, D = len(kw["history"]), len(kw["streams"])
    M, c = 2 + H + D, kw["coeffs"]
    if D == 0:
        return False
    if isinstance(c, torch.Tensor):
        return bool((c[:, 2 + H:M] != 0).any() or (c[:, M + 2 + H:] != 0).any())
    return any(c[2 + H + d] != 0 or c[M + 2 + H + d] != 0 for d in range(D))


def fma32(a, b, c):
    """float32 fma(a, b, c) = a * b + c rounded once, exactly: a * b is exact in float64, the float64
    sum is made round-to-odd with its error (TwoSum), and round-to-odd to 53 bits followed by rounding
    to 24 bits is the correctly rounded result (53 >= 24 + 2)."""
    a, b, c = a.double(), b.double(), c.double()
    p = a * b
    s = p + c
    bb = s - p
    err = (p - (s - bb)) + (c - bb)
    even = (s.view(torch.int64) & 1) == 0
    toward = torch.where(err > 0, math.inf, -math.inf).to(torch.float64)
    s = torch.where(torch.isfinite(s) & (err != 0) & even, torch.nextafter(s, toward), s)
    return s.float()


# a * b + c with a * b = 2^-24 (1 + 2^-36): the exact sum 1 + 2^-24 + 2^-60 is just above the float32 tie
# 1 + 2^-24; rounded once it is 1 + 2^-23 (FUSED), while a rounded product (the reference) or a float64
# sum rounds to the tie and then to 1.0.
FMA_A, FMA_B, FUSED = 1.0 + 2.0**-12, (2.0**24 - 4095) * 2.0**-48, 1.0 + 2.0**-23


def run_model(x, preds, history, seeds, streams, weights, coeffs, sample_weights, sample_coeffs, outs, side, finite,
              clip=None, stats=None, *, normals, fma=fma32):
    """The kernels' arithmetic (blend / combine of csrc/include/fastdiff/sampler_step.h, which the Triton
    kernel mirrors) on prepared arguments: float32, each accumulation one exactly rounded ``fma``.
    ``normals(seeds, stream, shape)`` gives the kernel's own noise (its backend's randn). (stats: the step's
    statistics, tests/test_step_stats.py; none here.)"""
    assert stats is None
    B, nd, f32 = x.shape[0], x.dim(), torch.float32
    H, D = len(history), len(streams)
    M = 2 + H + D

    def column(host, sample, j):
        if sample is None:
            return torch.tensor(host[j], dtype=f32, device=x.device)  # rounded once to float32, as the kernels
        return sample[:, j].reshape((B,) + (1,) * (nd - 1))

    def w(k):
        return column(weights, sample_weights, k)

    def c(row, j):
        return column(coeffs, sample_coeffs, row * M + j)

    p = [q.to(f32) for q in preds]
    g = w(0) * p[0]
    for k in range(1, len(p)):
        g = fma(w(k), p[k] - p[0], g)
    z = {}

    def noise(d):
        if d not in z:
            z[d] = normals(seeds, streams[d], tuple(x.shape[1:]))
        return z[d]

    def row_value(row):
        v = fma(c(row, 1), g, c(row, 0) * x)
        for j, h in enumerate(history):
            v = fma(c(row, 2 + j), h, v)
        for d in range(D):
            cz = c(row, 2 + H + d)
            if sample_coeffs is None:
                if cz != 0:
                    v = fma(cz, noise(d), v)
            else:  # omitted per sample where the coefficient is zero
                v = torch.where(cz != 0, fma(cz, noise(d), v), v)
        return v

    result, side_value = row_value(0), row_value(1) if side is not None or clip is not None else None
    if clip is not None:  # clip_sample: s_c, then t = s_c - s, u = d t, out + u, each rounded (no fma)
        c, d = (torch.tensor(v, dtype=f32).item() for v in clip)
        s_c = torch.where(side_value > c, c, torch.where(side_value < -c, -c, side_value))
        result, side_value = result + d * (s_c - side_value), s_c
    if finite is not None:
        for q in p:
            finite.masked_fill_(~torch.isfinite(q).reshape(B, -1).all(1), 0)
    if side is not None:
        side.copy_(side_value)
    for o in outs:
        o.copy_(result)
