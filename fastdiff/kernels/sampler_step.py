"""Triton implementation of the general fused sampler step (docs/design.md §2), ``run_reference`` in
fastdiff/ops/sampler_step.py being the specification. Per sample b and element i (flattened C order
within the sample), float32 math in this order, fma(a, b, c) = a b + c rounded once (tl.fma):

    g    = w_0 p_0;  g = fma(w_k, p_k - p_0, g)                                  k = 1 .. K1-1
    out  = fma(c_g, g, c_x x);  out = fma(c_h[j], h_j, out);  out = fma(c_z[d], z_d, out)
                                                                   (z_d only where c_z[d] != 0)
    side = the same with the side row (s_x, s_g, s_h, s_z)
    outs[0..NOUT) = out;  finite[b] = 0 if an element of any p_k of sample b is inf or NaN

With clip = [c, d] (CLIP, a constexpr: the no-clip binary is unchanged) the side row is computed even without a
side output, then s_c = where(s > c, c, where(s < -c, -c, s)), t = s_c - s, u = d t, out = out + u (three
roundings: on a GPU the product is PTX mul.rn.f32, which is never contracted into an fma) and side = s_c.

With stats (PICK, a constexpr: the binary without is unchanged) each program adds its picked elements' L1 sums
(fastdiff/ops/step_stats.py: out as stored, q prediction QB as read or the blend g) to sums[b] by a float64
atomic add, and writes the keep buffers at the picked lanes only.

z_d the spec-v1 normal of (seeds[b], streams[d], element i, offset 0) (docs/design.md §3). The fmas are
the arithmetic of the C++ kernels (blend / combine, csrc/include/fastdiff/sampler_step.h): explicit, so
no contraction choice of the compiler enters (no separate multiply feeds an add), and on a GPU a step
gives the CUDA backend's bits except for the normals' transcendental functions. The reference rounds
each product and sum separately: within a few ulps of the terms.

Triton cannot index a list of pointers at run time, so the kernel takes fixed pointer parameters
(p0..p7, h0..h3, o0..o7) and unrolls over the constexpr counts K1, H, D, NOUT; absent tensors and
unused scalars are passed as None (a constexpr: no kernel argument, no recompilation as values
change). Host coefficients are float32 scalar arguments (not specialized: a new value reuses the
binary); which host draws are generated is the constexpr bit masks ZOUT / ZSIDE (bit d set when
c_z[d] / s_z[d] != 0), so a draw whose coefficients are both zero costs nothing. Per-sample rows
(SAMPLE_W / SAMPLE_C) are read by each program from row b of the [B, K1] / [B, 2M] tensors, and
a draw is then generated only by the programs of samples whose c_z[d] or s_z[d] is non-zero.

Runs on CUDA tensors, or on CPU tensors under TRITON_INTERPRET=1.
"""

import math
import os
import struct

import triton
import triton.language as tl

from . import _launch as _device
from .philox import normal_tile, sample_tile, seed_key

_MAX_GRID_Y = 65535  # CUDA limit on grid dimension 1; larger batches are launched in chunks
MAX_BRANCHES, MAX_HISTORY, MAX_DRAWS, MAX_OUTS = 8, 4, 4, 8

_W = [f"w{k}" for k in range(MAX_BRANCHES)]
_STREAMS = [f"stream{d}" for d in range(MAX_DRAWS)]
_ROW = ["x", "g"] + [f"h{j}" for j in range(MAX_HISTORY)] + [f"z{d}" for d in range(MAX_DRAWS)]
_C = [f"c_{t}" for t in _ROW]  # out row
_S = [f"s_{t}" for t in _ROW]  # side row


@triton.jit
def _coef(host, row_ptr, j, PER_SAMPLE: tl.constexpr):
    """Coefficient j: the host scalar, or element j of this sample's row (row_ptr = base + b * width)."""
    if PER_SAMPLE:
        c = tl.load(row_ptr + j)
    else:
        c = host
    return c


@triton.jit
def _nonfinite(v):
    """inf or NaN, elementwise (float32 v): exponent bits all ones. A bit test, immune to fast-math."""
    return (v.to(tl.uint32, bitcast=True) & 0x7F800000) == 0x7F800000


@triton.jit
def _branch(g, bad, q, p0, p_ptr, offs, mask, w, HAS_FINITE: tl.constexpr, IS_Q: tl.constexpr):
    """fma(w, p_k - p0, g) for one more prediction p_k; bad |= p_k non-finite (when tracked); q = p_k when IS_Q
    (the statistics' prediction: from the registers, an output may be p_k)."""
    p = tl.load(p_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    if HAS_FINITE:
        bad = bad | _nonfinite(p)
    if IS_Q:
        q = p
    return tl.fma(w, p - p0, g), bad, q


@triton.jit
def _history(res, sv, h_ptr, offs, mask, c, s, HAS_SIDE: tl.constexpr):
    """fma(c, h_j, out) (and fma(s, h_j, side))."""
    h = tl.load(h_ptr + offs, mask=mask, other=0.0)
    res = tl.fma(c, h, res)
    if HAS_SIDE:
        sv = tl.fma(s, h, sv)
    return res, sv


@triton.jit
def _draw(res, sv, k0, k1, q, stream, c, s, USE_OUT: tl.constexpr, USE_SIDE: tl.constexpr, HAS_SIDE: tl.constexpr,
          PER_SAMPLE: tl.constexpr):
    """fma(c, z, out) (and fma(s, z, side)) for one noise draw z of ``stream``, each only where its
    coefficient is non-zero.

    Host coefficients: USE_OUT / USE_SIDE say which (the draw is not generated when neither).
    Per-sample coefficients (scalars of this sample): decided at run time, per program.
    """
    if PER_SAMPLE:
        if HAS_SIDE:
            use = (c != 0.0) | (s != 0.0)
        else:
            use = c != 0.0
        if use:
            z = normal_tile(k0, k1, q, stream)
            res = tl.where(c != 0.0, tl.fma(c, z, res), res)
            if HAS_SIDE:
                sv = tl.where(s != 0.0, tl.fma(s, z, sv), sv)
    else:
        if USE_OUT or USE_SIDE:
            z = normal_tile(k0, k1, q, stream)
            if USE_OUT:
                res = tl.fma(c, z, res)
            if USE_SIDE:
                sv = tl.fma(s, z, sv)
    return res, sv


@triton.jit
def _clip(res, sv, c, d, INTERPRETED: tl.constexpr):
    """clip_sample: (out + d (s_c - s), s_c) with s_c = s clamped to [-c, c] (a NaN stays), three roundings."""
    sc = tl.where(sv > c, c, tl.where(sv < -c, -c, sv))
    t = sc - sv
    if INTERPRETED:  # numpy: a product is always rounded on its own
        u = d * t
    else:  # mul.rn: never contracted with the add below into an fma (fp fusion would), no flush to zero (libdevice's
        # mul_rn is mul.rn.ftz here)
        u = tl.inline_asm_elementwise("mul.rn.f32 $0, $1, $2;", "=f,f,f", [tl.zeros_like(t) + d, t], dtype=tl.float32,
                                      is_pure=True, pack=1)
    return res + u, sc


@triton.jit
def _picked(q, m, pick_h, pick_w, pick_f, pick_ws, pick_hsws, PICK: tl.constexpr):
    """(taken, k): which elements 4 q + lane of the tile the pick takes, and their subsample indices."""
    i = q[:, None] * 4 + tl.arange(0, 4)[None, :].to(tl.int64)
    taken = i < m
    if PICK == 1:  # a prefix: k = i
        k = i
    else:
        if PICK == 32:  # the divisions by run-time values in int32: several times cheaper than in int64
            i = i.to(tl.int32)
        r = i // pick_w
        c = i - r * pick_w
        h = r % pick_h
        cf = c // pick_f
        hf = h // pick_f
        taken = taken & (c == cf * pick_f) & (h == hf * pick_f)
        k = (r // pick_h) * pick_hsws + hf * pick_ws + cf
    return taken, k


@triton.jit
def _l1(v, taken):
    """Σ |v| over the taken lanes, in float64."""
    return tl.sum(tl.sum(tl.where(taken, tl.abs(v.to(tl.float64)), 0.0), axis=1), axis=0)


@triton.jit
def _stat(sum_ptr, v, taken, ref_ptr, keep_ptr, srow, k, any_taken):
    """sum += Σ |v - ref[k]| (with ref); keep[k] = v (with keep)."""
    if ref_ptr is not None:
        ref = tl.load(ref_ptr + srow + k, mask=taken, other=0.0)
        tl.atomic_add(sum_ptr, _l1(v - ref, taken), mask=any_taken, sem="relaxed")
    if keep_ptr is not None:
        tl.store(keep_ptr + srow + k, v, mask=taken)


@triton.jit(do_not_specialize=_STREAMS + _W + _C + _S + ["clip_c", "clip_d", "pick_m", "pick_h", "pick_w", "pick_f",
                                                        "pick_ws", "pick_hsws", "pick_s"])
def _sampler_step_kernel(
    x_ptr,  # [B, n] float32
    p0, p1, p2, p3, p4, p5, p6, p7,  # [B, n] float32 | float16 | bfloat16 (one dtype); p_k None for k >= K1
    h0, h1, h2, h3,  # [B, n] float32; None for j >= H
    seeds_ptr,  # [B] int64; None when no draw is generated
    sw_ptr,  # [B, K1] float32 per-sample weights (SAMPLE_W) or None
    sc_ptr,  # [B, 2M] float32 per-sample coefficients (SAMPLE_C) or None
    o0, o1, o2, o3, o4, o5, o6, o7,  # [B, n] float32 outputs (o0 may be x); None for i >= NOUT
    side_ptr,  # [B, n] float32 (may be a history buffer) or None
    finite_ptr,  # [B] int32 or None
    n,  # elements per sample; may be specialized (== 1 -> constexpr, % 16 -> alignment): no .to() on it
    stream0, stream1, stream2, stream3,  # stream ids as int32 bit patterns (None when not drawn)
    w0, w1, w2, w3, w4, w5, w6, w7,  # host weights, float32 (None unless used)
    c_x, c_g, c_h0, c_h1, c_h2, c_h3, c_z0, c_z1, c_z2, c_z3,  # host out row, float32 (None unless used)
    s_x, s_g, s_h0, s_h1, s_h2, s_h3, s_z0, s_z1, s_z2, s_z3,  # host side row, float32 (None unless used)
    clip_c, clip_d,  # clip = [c, d], float32 (None without CLIP)
    sums_ptr,  # [B, 3] float64 statistics' sums (None without PICK)
    x_ref, x_keep, q_ref, q_keep,  # [B, S] float32 or None
    pick_m, pick_h, pick_w, pick_f, pick_ws, pick_hsws,  # the pick (m, H, W, f), Ws, Hs Ws (None without PICK)
    pick_s,  # S (None without PICK)
    K1: tl.constexpr, H: tl.constexpr, D: tl.constexpr, NOUT: tl.constexpr,
    ZOUT: tl.constexpr, ZSIDE: tl.constexpr,  # host draws used by out / side: bit d (ignored with SAMPLE_C)
    HAS_SIDE: tl.constexpr,  # the side row is computed (a side output, or CLIP)
    HAS_FINITE: tl.constexpr, SAMPLE_W: tl.constexpr, SAMPLE_C: tl.constexpr,
    STORE_SIDE: tl.constexpr,  # a side output is given
    CLIP: tl.constexpr, INTERPRETED: tl.constexpr,
    PICK: tl.constexpr,  # statistics: 0 none, 1 a prefix pick, 32 / 64 a strided pick in int32 / int64 indices
    QB: tl.constexpr,  # q: prediction QB, the blend g (-1), none (-2)
    BLOCK: tl.constexpr,  # groups (of 4 elements) per program
):
    b, q, offs, mask = sample_tile(n, BLOCK)  # [BLOCK, 4] tile of sample b: row = group q, column = lane
    M: tl.constexpr = 2 + H + D
    if SAMPLE_W:
        wrow = sw_ptr + b * K1
    else:
        wrow = sw_ptr
    if SAMPLE_C:
        crow = sc_ptr + b * (2 * M)
    else:
        crow = sc_ptr

    # Every input is loaded before anything is stored (o0 may be x, side may be a history buffer).
    x = tl.load(x_ptr + offs, mask=mask, other=0.0)
    pz = tl.load(p0 + offs, mask=mask, other=0.0).to(tl.float32)
    bad = tl.zeros([BLOCK, 4], dtype=tl.int1)
    if HAS_FINITE:
        bad = _nonfinite(pz)
    g = _coef(w0, wrow, 0, SAMPLE_W) * pz
    qv = pz  # q of the statistics (QB = 0, or replaced below)
    if K1 > 1:
        g, bad, qv = _branch(g, bad, qv, pz, p1, offs, mask, _coef(w1, wrow, 1, SAMPLE_W), HAS_FINITE,
                             QB == 1)
    if K1 > 2:
        g, bad, qv = _branch(g, bad, qv, pz, p2, offs, mask, _coef(w2, wrow, 2, SAMPLE_W), HAS_FINITE,
                             QB == 2)
    if K1 > 3:
        g, bad, qv = _branch(g, bad, qv, pz, p3, offs, mask, _coef(w3, wrow, 3, SAMPLE_W), HAS_FINITE,
                             QB == 3)
    if K1 > 4:
        g, bad, qv = _branch(g, bad, qv, pz, p4, offs, mask, _coef(w4, wrow, 4, SAMPLE_W), HAS_FINITE,
                             QB == 4)
    if K1 > 5:
        g, bad, qv = _branch(g, bad, qv, pz, p5, offs, mask, _coef(w5, wrow, 5, SAMPLE_W), HAS_FINITE,
                             QB == 5)
    if K1 > 6:
        g, bad, qv = _branch(g, bad, qv, pz, p6, offs, mask, _coef(w6, wrow, 6, SAMPLE_W), HAS_FINITE,
                             QB == 6)
    if K1 > 7:
        g, bad, qv = _branch(g, bad, qv, pz, p7, offs, mask, _coef(w7, wrow, 7, SAMPLE_W), HAS_FINITE,
                             QB == 7)
    if QB == -1:
        qv = g

    res = tl.fma(_coef(c_g, crow, 1, SAMPLE_C), g, _coef(c_x, crow, 0, SAMPLE_C) * x)
    sv = res  # placeholder when there is no side row
    if HAS_SIDE:
        sv = tl.fma(_coef(s_g, crow, M + 1, SAMPLE_C), g, _coef(s_x, crow, M, SAMPLE_C) * x)
    # side coefficients below are read only when HAS_SIDE (the helpers ignore them otherwise)
    if H > 0:
        res, sv = _history(res, sv, h0, offs, mask, _coef(c_h0, crow, 2, SAMPLE_C),
                           _coef(s_h0, crow, M + 2, SAMPLE_C and HAS_SIDE), HAS_SIDE)
    if H > 1:
        res, sv = _history(res, sv, h1, offs, mask, _coef(c_h1, crow, 3, SAMPLE_C),
                           _coef(s_h1, crow, M + 3, SAMPLE_C and HAS_SIDE), HAS_SIDE)
    if H > 2:
        res, sv = _history(res, sv, h2, offs, mask, _coef(c_h2, crow, 4, SAMPLE_C),
                           _coef(s_h2, crow, M + 4, SAMPLE_C and HAS_SIDE), HAS_SIDE)
    if H > 3:
        res, sv = _history(res, sv, h3, offs, mask, _coef(c_h3, crow, 5, SAMPLE_C),
                           _coef(s_h3, crow, M + 5, SAMPLE_C and HAS_SIDE), HAS_SIDE)

    if D > 0 and (SAMPLE_C or (ZOUT | ZSIDE) != 0):
        k0, k1 = seed_key(tl.load(seeds_ptr + b))
        Z: tl.constexpr = 2 + H  # column of c_z[0] in a row
        if D > 0:
            res, sv = _draw(res, sv, k0, k1, q, stream0, _coef(c_z0, crow, Z, SAMPLE_C),
                            _coef(s_z0, crow, M + Z, SAMPLE_C and HAS_SIDE), (ZOUT & 1) != 0, (ZSIDE & 1) != 0,
                            HAS_SIDE, SAMPLE_C)
        if D > 1:
            res, sv = _draw(res, sv, k0, k1, q, stream1, _coef(c_z1, crow, Z + 1, SAMPLE_C),
                            _coef(s_z1, crow, M + Z + 1, SAMPLE_C and HAS_SIDE), (ZOUT & 2) != 0, (ZSIDE & 2) != 0,
                            HAS_SIDE, SAMPLE_C)
        if D > 2:
            res, sv = _draw(res, sv, k0, k1, q, stream2, _coef(c_z2, crow, Z + 2, SAMPLE_C),
                            _coef(s_z2, crow, M + Z + 2, SAMPLE_C and HAS_SIDE), (ZOUT & 4) != 0, (ZSIDE & 4) != 0,
                            HAS_SIDE, SAMPLE_C)
        if D > 3:
            res, sv = _draw(res, sv, k0, k1, q, stream3, _coef(c_z3, crow, Z + 3, SAMPLE_C),
                            _coef(s_z3, crow, M + Z + 3, SAMPLE_C and HAS_SIDE), (ZOUT & 8) != 0, (ZSIDE & 8) != 0,
                            HAS_SIDE, SAMPLE_C)

    if CLIP:
        res, sv = _clip(res, sv, clip_c, clip_d, INTERPRETED)

    tl.store(o0 + offs, res, mask=mask)
    if NOUT > 1:
        tl.store(o1 + offs, res, mask=mask)
    if NOUT > 2:
        tl.store(o2 + offs, res, mask=mask)
    if NOUT > 3:
        tl.store(o3 + offs, res, mask=mask)
    if NOUT > 4:
        tl.store(o4 + offs, res, mask=mask)
    if NOUT > 5:
        tl.store(o5 + offs, res, mask=mask)
    if NOUT > 6:
        tl.store(o6 + offs, res, mask=mask)
    if NOUT > 7:
        tl.store(o7 + offs, res, mask=mask)
    if STORE_SIDE:
        tl.store(side_ptr + offs, sv, mask=mask)
    if HAS_FINITE:
        # only zeros are stored, by the programs that saw a non-finite prediction (a benign race)
        any_bad = tl.max(tl.max((bad & mask).to(tl.int32), axis=1), axis=0)
        tl.store(finite_ptr + b, any_bad * 0, mask=any_bad != 0)
    if PICK != 0:
        if tl.program_id(0).to(tl.int64) * (4 * BLOCK) < pick_m:  # a program past m has nothing picked
            taken, k = _picked(q, pick_m, pick_h, pick_w, pick_f, pick_ws, pick_hsws, PICK)
            any_taken = tl.max(tl.max(taken.to(tl.int32), axis=1), axis=0) != 0
            srow = b * pick_s
            _stat(sums_ptr + b * 3, res, taken, x_ref, x_keep, srow, k, any_taken)
            if QB >= -1:
                _stat(sums_ptr + b * 3 + 1, qv, taken, q_ref, q_keep, srow, k, any_taken)
                tl.atomic_add(sums_ptr + b * 3 + 2, _l1(qv, taken), mask=any_taken, sem="relaxed")


def _f32(c) -> float:
    """float(c) rounded to the nearest float32 (as torch.tensor(c, dtype=float32) does), as a Python float."""
    c = float(c)
    try:
        return struct.unpack("f", struct.pack("f", c))[0]
    except OverflowError:  # finite float64 beyond float32's range rounds to +-inf
        return math.copysign(math.inf, c)


def _i32(stream: int) -> int:
    """A stream id in [0, 2^32) as the int32 with its bits: always an i32 kernel argument (one binary for
    every stream; the kernel uses the low 32 bits)."""
    stream = int(stream)
    return stream - (1 << 32) if stream >= (1 << 31) else stream


def _padded(values, count):
    values = list(values)
    return values + [None] * (count - len(values))


def sampler_step(x, preds, history, seeds, streams, weights, coeffs, sample_weights, sample_coeffs, outs, side,
                 finite, clip=None, stats=None) -> None:
    """Writes ``outs`` (and ``side``, ``finite`` when given) in place; see the module docstring.

    Arguments as normalized by fastdiff.ops.sampler_step.prepare (the checks are the caller's): x float32
    [B, *S]; preds 1..8 tensors like x (float32/float16/bfloat16, one dtype); history 0..4 float32
    tensors; seeds int64 [B]; streams 0..4 ints in [0, 2^32); weights K1 numbers and coeffs 2M numbers
    (M = 2 + H + D: out row c_x, c_g, c_h.., c_z.., then the side row), or placeholders when
    sample_weights [B, K1] / sample_coeffs [B, 2M] (float32) are given; outs 1..8 float32 tensors;
    side float32 or None; finite int32 [B] or None; clip [c, d] host numbers or None (checked: not with
    sample_coeffs); stats ([sums, x_ref, x_keep, q_ref, q_keep], [m, H, W, f, branch]) or None (empty tensors
    where not given: fastdiff/ops/step_stats.py). Everything contiguous on x's device; outs[0] may be x and side
    may be a history buffer.
    """
    K1, H, D, NOUT = len(preds), len(history), len(streams), len(outs)
    assert 1 <= K1 <= MAX_BRANCHES and H <= MAX_HISTORY and D <= MAX_DRAWS and 1 <= NOUT <= MAX_OUTS
    M = 2 + H + D
    B = x.shape[0]
    n = x.numel() // B if B else 0
    if n == 0 or B == 0:
        return
    store_side = side is not None
    has_side = store_side or clip is not None  # the side row is computed
    sample_w = sample_weights is not None
    sample_c = sample_coeffs is not None

    # host scalars (None where unused: a constexpr, no argument)
    w = [None] * MAX_BRANCHES if sample_w else _padded((_f32(v) for v in weights), MAX_BRANCHES)
    zout = zside = 0
    if sample_c:
        c_row = [None] * len(_ROW)
        s_row = [None] * len(_ROW)
        use_draw = [True] * D
    else:
        for d in range(D):  # on the host values, as the reference tests them (1e-50 is drawn, adding 0 z)
            zout |= (float(coeffs[2 + H + d]) != 0) << d
            zside |= (has_side and float(coeffs[M + 2 + H + d]) != 0) << d
        coeffs = [_f32(v) for v in coeffs]
        out_c, side_c = coeffs[:M], coeffs[M:]
        use_draw = [bool((zout | zside) >> d & 1) for d in range(D)]

        def row(r, use_side):
            if not use_side:
                return [None] * len(_ROW)
            draws = [r[2 + H + d] if use_draw[d] else None for d in range(D)]
            return r[:2] + _padded(r[2:2 + H], MAX_HISTORY) + _padded(draws, MAX_DRAWS)

        c_row, s_row = row(out_c, True), row(side_c, has_side)
    stream_args = _padded((_i32(s) if use_draw[d] else None for d, s in enumerate(streams)), MAX_DRAWS)
    needs_seeds = sample_c and D > 0 or any(use_draw)

    # 256 groups (1024 elements) per program as guided_step for the common steps (K1 = 2, H <= 1, D <= 1,
    # NOUT <= 2: ~90 registers on sm_90); 128 for the heavy ones (two or more draws, many tensors), which
    # would need 110-250 registers per thread (or spill) at 256.
    heavy = D > 1 or K1 + H + NOUT > 10
    BLOCK_MAX = 8192 if os.environ.get("TRITON_INTERPRET") == "1" else (128 if heavy else 256)
    n_groups = triton.cdiv(n, 4)
    BLOCK = min(BLOCK_MAX, max(16, triton.next_power_of_2(n_groups)))

    def flat(t):
        return t.view(B, n)

    x2 = flat(x)
    p2 = [flat(p) for p in preds]
    h2 = [flat(h) for h in history]
    o2 = [flat(o) for o in outs]
    s2 = flat(side) if store_side else None
    clip_args = [None, None] if clip is None else [_f32(clip[0]), _f32(clip[1])]
    interpreted = os.environ.get("TRITON_INTERPRET") == "1"
    # statistics: None everywhere without them (no arguments: the plain binary)
    stat_bufs, pick_args, PICK, QB = [None] * 5, [None] * 7, 0, -2
    if stats is not None:
        (sums, *bufs), (m, pH, pW, f, branch) = stats
        bufs = [t if t.numel() else None for t in bufs]
        if m > 0 and (branch >= -1 or bufs[0] is not None or bufs[1] is not None):  # else nothing to add or write
            Ws, Hs = -(-pW // f), -(-pH // f)
            stat_bufs, QB = [sums, *bufs], branch
            pick_args = [m, pH, pW, f, Ws, Hs * Ws, m if pH * pW == 1 else n // (pH * pW) * Hs * Ws]
            PICK = 1 if pH * pW == 1 else 32 if n + 4 * BLOCK < 2**31 else 64  # a tile's i < n + 4 BLOCK
    with _device.on_device(x.device):  # Triton launches on the current device and stream
        for start in range(0, B, _MAX_GRID_Y):
            stop = min(B, start + _MAX_GRID_Y)

            def chunk(t, start=start, stop=stop):
                return t[start:stop] if t is not None else None

            grid = (triton.cdiv(n_groups, BLOCK), stop - start)
            _sampler_step_kernel[grid](
                chunk(x2),
                *_padded(map(chunk, p2), MAX_BRANCHES),
                *_padded(map(chunk, h2), MAX_HISTORY),
                chunk(seeds) if needs_seeds else None,
                chunk(sample_weights) if sample_w else None,
                chunk(sample_coeffs) if sample_c else None,
                *_padded(map(chunk, o2), MAX_OUTS),
                chunk(s2),
                chunk(finite),
                n,
                *stream_args,
                *w,
                *c_row,
                *s_row,
                *clip_args,
                *map(chunk, stat_bufs),
                *pick_args,
                K1=K1, H=H, D=D, NOUT=NOUT, ZOUT=zout, ZSIDE=zside,
                HAS_SIDE=has_side, HAS_FINITE=finite is not None, SAMPLE_W=sample_w, SAMPLE_C=sample_c,
                STORE_SIDE=store_side, CLIP=clip is not None, INTERPRETED=interpreted and clip is not None,
                PICK=PICK, QB=QB,
                BLOCK=BLOCK,
            )
