"""Noise stream spec v1 (docs/design.md §3) as @triton.jit helpers, a mirror of
csrc/include/fastdiff/philox.h. Only long-standing triton.language features are used (no tl.randn /
tl.philox, whose streams differ between Triton versions), so Triton 3.x builds and the CPU
interpreter (TRITON_INTERPRET=1) give the same words; the normals agree within float32 rounding.

    element e of sample b, stream k:  key = (s_b mod 2^32, s_b >> 32),
                                      counter = (q mod 2^32, q >> 32, k, 0), q = e >> 2
    lanes 0,1 use words (w0, w1); lanes 2,3 use (w2, w3); u(w) = ((w >> 8) + 0.5) 2^-24
    r = sqrt(-2 ln u(first)), theta = 2 pi u(second); lanes 0,2 -> r cos theta, 1,3 -> r sin theta

Typical use inside a kernel (one program per sample, a block of groups q):

    k0, k1 = seed_key(tl.load(seeds_ptr + b))          # seeds int64 [B]
    z0, z1, z2, z3 = normal4(k0, k1, q, stream)        # q int64 [BLOCK], stream uint32
    z = select_lane(z0, z1, z2, z3, lane)              # or lay the four out as a [BLOCK, 4] tile

or, per element (recomputes the group's words for each of its four elements):

    z = normal_at(k0, k1, e, stream)                   # e int64 element index
"""

import triton
import triton.language as tl


@triton.jit
def philox4x32_10(c0, c1, c2, c3, k0, k1):
    """Philox4x32-10 (Random123). All arguments uint32 (tensors or scalars); returns 4 uint32 words."""
    for _ in tl.static_range(10):
        # hi:lo = M * c with M0 = 0xD2511F53, M1 = 0xCD9E8D57 (uint32 arithmetic wraps mod 2^32).
        hi0 = tl.umulhi(c0, 0xD2511F53)
        lo0 = c0 * 0xD2511F53
        hi1 = tl.umulhi(c2, 0xCD9E8D57)
        lo1 = c2 * 0xCD9E8D57
        n0 = hi1 ^ c1 ^ k0
        n2 = hi0 ^ c3 ^ k1
        c0 = n0
        c1 = lo1
        c2 = n2
        c3 = lo0
        k0 = k0 + 0x9E3779B9  # golden ratio
        k1 = k1 + 0xBB67AE85  # sqrt(3) - 1
    return c0, c1, c2, c3


@triton.jit
def seed_key(seed):
    """Philox key (s mod 2^32, s >> 32) of an int64 seed (seeds >= 2^63 stored in two's complement)."""
    seed = seed.to(tl.int64)
    k0 = seed.to(tl.uint32)  # truncation: low 32 bits
    k1 = (seed >> 32).to(tl.uint32)  # bits 32..63 (the arithmetic shift's sign bits are truncated away)
    return k0, k1


@triton.jit
def noise_words(k0, k1, q, stream):
    """The words of group q (elements 4q .. 4q+3): q int64 (>= 0), stream uint32, key (k0, k1)."""
    q = q.to(tl.int64)
    c0 = q.to(tl.uint32)
    c1 = (q >> 32).to(tl.uint32)
    c2 = (tl.zeros_like(c0).to(tl.int64) + stream).to(tl.uint32)  # any integer stream, even a constexpr
    c3 = tl.zeros_like(c0)
    return philox4x32_10(c0, c1, c2, c3, k0, k1)


@triton.jit
def _log1p(x):
    # log1p without a portable tl.log1p (Goldberg / HP-15C trick): with y = fl(1 + x),
    # log1p(x) = log(y) * x / (y - 1), accurate to a few ulp; x itself where 1 + x rounds to 1.
    y = 1.0 + x
    d = y - 1.0
    safe_d = tl.where(d == 0.0, 1.0, d)
    return tl.where(d == 0.0, x, tl.log(y) * (x / safe_d))


@triton.jit
def log_uniform(w):
    """ln u(w), u(w) = ((w >> 8) + 0.5) 2^-24, in float32 (w uint32). Both arguments are exact in float32."""
    m = w >> 8  # 24 bits
    lo = tl.log((2 * m + 1).to(tl.float32) * 2.98023223876953125e-08)  # m < 2^23: (2m + 1) 2^-25
    # u >= 1/2: ln u = log1p(-(1 - u)), 1 - u = (2 (2^24 - 1 - m) + 1) 2^-25.
    # Clamped where this branch is not taken (2t + 1 would reach 2^25 - 1, round to 2^25 and give log(0)).
    t = tl.where(m < 8388608, 0, 16777215 - m)
    hi = _log1p(-((2 * t + 1).to(tl.float32) * 2.98023223876953125e-08))
    return tl.where(m < 8388608, lo, hi)


@triton.jit
def centered_uniform(w):
    """u(w) - 1/2 = (2m + 1 - 2^24) 2^-25 in float32, exact (w uint32)."""
    m = (w >> 8).to(tl.int32)
    return (2 * m + 1 - 16777216).to(tl.float32) * 2.98023223876953125e-08


@triton.jit
def box_muller(a, b):
    """One Box-Muller pair from words (a, b): (r cos theta, r sin theta) in float32.

    With v = u(b) - 1/2, theta = 2 pi u(b) = 2 pi v + pi, so cos theta = -cos(2 pi v) and
    sin theta = -sin(2 pi v), with 2 pi v in (-pi, pi).
    """
    r = tl.sqrt(-2.0 * log_uniform(a))
    theta = 6.283185307179586 * centered_uniform(b)
    return -r * tl.cos(theta), -r * tl.sin(theta)


@triton.jit
def normal4(k0, k1, q, stream):
    """The four float32 normals of group q (elements 4q .. 4q+3) for key (k0, k1) and stream (uint32)."""
    w0, w1, w2, w3 = noise_words(k0, k1, q, stream)
    z0, z1 = box_muller(w0, w1)
    z2, z3 = box_muller(w2, w3)
    return z0, z1, z2, z3


@triton.jit
def select_lane(z0, z1, z2, z3, lane):
    """z_lane elementwise (lane in 0..3, broadcast against the z's)."""
    return tl.where(lane == 0, z0, tl.where(lane == 1, z1, tl.where(lane == 2, z2, z3)))


@triton.jit
def normal_tile(k0, k1, q, stream):
    """[BLOCK, 4] normals of the groups q [BLOCK]: row = group, column = lane (element 4 q + lane)."""
    z0, z1, z2, z3 = normal4(k0, k1, q, stream)  # one Philox call per group feeds its 4 lanes
    return select_lane(z0[:, None], z1[:, None], z2[:, None], z3[:, None], tl.arange(0, 4)[None, :])


@triton.jit
def sample_tile(n, BLOCK: tl.constexpr):
    """This program's [BLOCK, 4] tile of sample b = program_id(1): (b, groups q [BLOCK], offsets into
    the [B, n] tensors, mask). Element index 4 q + lane; 64-bit offsets. No .to() on n: it may be
    specialized to a constexpr."""
    pid = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    q = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK).to(tl.int64)
    idx = q[:, None] * 4 + tl.arange(0, 4)[None, :].to(tl.int64)
    return b, q, b * n + idx, idx < n


@triton.jit
def normal_at(k0, k1, e, stream):
    """The float32 normal of element e (int64, >= 0) of the stream: elementwise, one group per element."""
    e = e.to(tl.int64)
    z0, z1, z2, z3 = normal4(k0, k1, e >> 2, stream)
    return select_lane(z0, z1, z2, z3, (e & 3).to(tl.int32))


@triton.jit
def store_cast(x, dtype: tl.constexpr):
    """float32 x -> dtype, rounding to nearest even (as torch's .to(dtype) does) on every backend.

    Triton's fp32 -> bf16 cast is round-to-nearest-even on GPUs but truncates in the CPU interpreter
    (Triton 3.9), so bf16 is rounded here by hand (finite x): the rounded float32 is exact in bf16.
    """
    if dtype == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        bits = (bits + (0x7FFF + ((bits >> 16) & 1))) & 0xFFFF0000
        x = bits.to(tl.float32, bitcast=True)
    return x.to(dtype)
