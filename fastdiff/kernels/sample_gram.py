"""Triton implementation of the per-sample Gram sums (docs/design.md §2), ``run_reference`` in
fastdiff/ops/sample_gram.py being the specification. With u = (terms[0..K), z_0..z_{D-1}), T = K + D,
z_d the spec-v1 normal of (seeds[b], streams[d], element e, offset 0), every value in float64:

    out[b] = (Σ_e u_i for i < T,  then Σ_e u_i u_j for i <= j, row-major)     float64 [B, T + T(T+1)/2]

(a product of two float32 values is exact in float64). Two kernels, no atomics, deterministic:

    _chunk_kernel  one program per (chunk, sample), a chunk being CHUNK (4096) elements: walks its
                   chunk in blocks of BLOCK groups of 4 elements (ascending, up to the sample's last
                   element), adding each block's P float64 tiles of values and products element by
                   element, then sums each tile once (lanes, then groups); writes partial[b, c, :]
    _total_kernel  one program per sample: total = partial[b, 0] + partial[b, 1] + … in index order (more
                   than SERIAL_CHUNKS chunks: tiles of 64 chunks, each summed as a tree, in index order)

The chunk sums depend only on n and on the backend (the interpreter takes a chunk in one block), never
on the batch. Triton cannot index a list of pointers at run time, so the terms come as fixed pointer
parameters t0..t7 and the kernel unrolls over the constexpr counts K, D (one binary per (K, D, dtype));
absent terms and streams are None (constexprs, no argument). The normals are philox.normal_tile's, as
the sampler step and the loss draw them; elements past n contribute nothing (masked to 0).

Runs on CUDA tensors, or on CPU tensors under TRITON_INTERPRET=1.
"""

import os

import torch
import triton
import triton.language as tl

from . import _launch as _device
from .philox import normal_tile, seed_key

CHUNK = 4096  # elements per chunk: fastdiff.ops.sample_gram.CHUNK
_CHUNK_GROUPS = tl.constexpr(CHUNK // 4)  # groups (of 4 elements) per chunk, for the kernel
_MAX_GRID_Y = 65535  # CUDA limit on grid dimension 1; larger batches are launched in chunks
MAX_TERMS, MAX_DRAWS = 8, 4


@triton.jit
def _pick(i: tl.constexpr, K: tl.constexpr, a0, a1, a2, a3, a4, a5, a6, a7, z0, z1, z2, z3):
    """u_i: term i for i < K, else draw i - K (i, K constexpr: resolved at compile time)."""
    if i < K:
        if i == 0:
            r = a0
        elif i == 1:
            r = a1
        elif i == 2:
            r = a2
        elif i == 3:
            r = a3
        elif i == 4:
            r = a4
        elif i == 5:
            r = a5
        elif i == 6:
            r = a6
        else:
            r = a7
    else:
        if i - K == 0:
            r = z0
        elif i - K == 1:
            r = z1
        elif i - K == 2:
            r = z2
        else:
            r = z3
    return r




@triton.jit
def _term(t_ptr, offs, mask):
    return tl.load(t_ptr + offs, mask=mask, other=0.0).to(tl.float32).to(tl.float64)


@triton.jit
def _draw(k0, k1, q, mask, stream):
    return tl.where(mask, normal_tile(k0, k1, q, stream), 0.0).to(tl.float64)


@triton.jit(do_not_specialize=["stream0", "stream1", "stream2", "stream3"])
def _chunk_kernel(
    t0, t1, t2, t3, t4, t5, t6, t7,  # [B, n] float32 | float16 | bfloat16 (one dtype); t_k None for k >= K
    seeds_ptr,  # [B] int64; None when D == 0
    partial_ptr,  # [B, C, P] float64 chunk sums, C = programs along axis 0
    n,  # elements per sample; may be specialized (== 1 -> constexpr, % 16 -> alignment): no .to() on it
    stream0, stream1, stream2, stream3,  # stream ids as int32 bit patterns; None for d >= D
    K: tl.constexpr, D: tl.constexpr,
    PP: tl.constexpr,  # next power of two >= P
    BLOCK: tl.constexpr,  # groups (of 4 elements) per step; divides _CHUNK_GROUPS
):
    T: tl.constexpr = K + D
    P: tl.constexpr = T + T * (T + 1) // 2
    G: tl.constexpr = _CHUNK_GROUPS
    c = tl.program_id(0).to(tl.int64)
    b = tl.program_id(1).to(tl.int64)
    if D > 0:
        k0, k1 = seed_key(tl.load(seeds_ptr + b))
    slot = tl.arange(0, PP)
    # One [BLOCK, 4] float64 accumulator per sum (a tuple carried through the loop): each step adds its tile
    # element by element, and each sum is reduced once, after the loop (lanes, then groups: for one step the
    # order the kernel always had). Reducing in every step put 2 P reductions, with their shuffles and
    # barriers, inside the loop (sm_90, T = 8: 88 reductions per step).
    accs = ()
    for p in tl.static_range(P):
        accs = accs + (tl.zeros([BLOCK, 4], dtype=tl.float64),)
    steps = tl.cdiv(tl.minimum(n - c * (4 * G), 4 * G), 4 * BLOCK)  # blocks of this chunk holding elements
    for step in range(steps):  # in ascending element order
        q = c * G + step * BLOCK + tl.arange(0, BLOCK).to(tl.int64)
        idx = q[:, None] * 4 + tl.arange(0, 4)[None, :].to(tl.int64)  # element 4 q + lane
        mask = idx < n
        offs = b * n + idx
        a0 = _term(t0, offs, mask)
        a1 = a0  # placeholders for absent terms / draws (never picked)
        a2, a3, a4, a5, a6, a7, z0, z1, z2, z3 = a0, a0, a0, a0, a0, a0, a0, a0, a0, a0
        if K > 1:
            a1 = _term(t1, offs, mask)
        if K > 2:
            a2 = _term(t2, offs, mask)
        if K > 3:
            a3 = _term(t3, offs, mask)
        if K > 4:
            a4 = _term(t4, offs, mask)
        if K > 5:
            a5 = _term(t5, offs, mask)
        if K > 6:
            a6 = _term(t6, offs, mask)
        if K > 7:
            a7 = _term(t7, offs, mask)
        if D > 0:
            z0 = _draw(k0, k1, q, mask, stream0)
        if D > 1:
            z1 = _draw(k0, k1, q, mask, stream1)
        if D > 2:
            z2 = _draw(k0, k1, q, mask, stream2)
        if D > 3:
            z3 = _draw(k0, k1, q, mask, stream3)
        new = ()  # slot order: the T sums, then the products row-major (i <= j)
        for i in tl.static_range(T):
            ui = _pick(i, K, a0, a1, a2, a3, a4, a5, a6, a7, z0, z1, z2, z3)
            new = new + (accs[i] + ui,)
        for i in tl.static_range(T):
            ui = _pick(i, K, a0, a1, a2, a3, a4, a5, a6, a7, z0, z1, z2, z3)
            for j in tl.static_range(i, T):
                uj = _pick(j, K, a0, a1, a2, a3, a4, a5, a6, a7, z0, z1, z2, z3)
                new = new + (accs[len(new)] + ui * uj,)
        accs = new
    acc = tl.zeros([PP], dtype=tl.float64)
    for p in tl.static_range(P):
        acc = tl.where(slot == p, tl.sum(tl.sum(accs[p], axis=1), axis=0), acc)
    tl.store(partial_ptr + (b * tl.num_programs(0) + c) * P + slot, acc, mask=slot < P)


SERIAL_CHUNKS = 64  # up to this many chunks a sample's are added in index order; beyond, by tiles (TILE_CHUNKS)


@triton.jit
def _total_kernel(
    partial_ptr,  # [B, C, P] float64
    out_ptr,  # [B, P] float64
    C,  # chunks per sample
    P: tl.constexpr, PP: tl.constexpr,
    TILED: tl.constexpr,  # C > SERIAL_CHUNKS: a function of n, never of B
):
    b = tl.program_id(0).to(tl.int64)
    slot = tl.arange(0, PP)
    m = slot < P
    row = partial_ptr + b * C * P
    if TILED:  # tiles of 64 chunks, each summed by tl.sum (a fixed tree), the tiles in index order: C / 64
        # dependent steps where adding one chunk at a time took C (~1000 at n = 2^24 on a GPU)
        chunk = tl.arange(0, 64)
        total = tl.zeros([PP], dtype=tl.float64)
        for first in range(0, C, 64):
            tile = tl.load(row + (first + chunk)[:, None] * P + slot[None, :],
                           mask=((first + chunk)[:, None] < C) & m[None, :], other=0.0)
            total += tl.sum(tile, axis=0)
    else:
        total = tl.load(row + slot, mask=m, other=0.0)
        for _ in range(1, C):  # chunk 1, 2, … in index order
            row += P
            total += tl.load(row + slot, mask=m, other=0.0)
    tl.store(out_ptr + b * P + slot, total, mask=m)


def _i32(stream: int) -> int:
    """A stream id in [0, 2^32) as the int32 with its bits (one binary for every stream)."""
    stream = int(stream)
    return stream - (1 << 32) if stream >= (1 << 31) else stream


def _block_max() -> int:
    # The CPU interpreter pays per operation, not per element: a whole chunk (1024 groups) per step.
    # On a GPU, 32 groups: one element a thread (4 warps) in each of the P float64 accumulators (T = 8: 44).
    return CHUNK // 4 if os.environ.get("TRITON_INTERPRET") == "1" else 32


def sample_gram(terms, seeds, streams) -> torch.Tensor:
    """The packed sums [B, T + T(T+1)/2] float64 (see the module docstring), on checked arguments: terms
    1..8 contiguous tensors [B, ...] of one dtype (float32/float16/bfloat16) on one device, seeds int64
    [B] there, streams 0..4 ints in [0, 2^32), K + D <= 8."""
    K, D = len(terms), len(streams)
    assert 1 <= K and D <= MAX_DRAWS and K + D <= MAX_TERMS
    T = K + D
    P = T + T * (T + 1) // 2
    PP = triton.next_power_of_2(P)
    B, device = terms[0].shape[0], terms[0].device
    n = terms[0].numel() // B if B else 0
    out = torch.zeros((B, P), dtype=torch.float64, device=device)
    if B == 0 or n == 0:
        return out
    C = triton.cdiv(n, CHUNK)
    BLOCK = min(_block_max(), max(16, triton.next_power_of_2(triton.cdiv(n, 4))))  # a function of n only
    assert (CHUNK // 4) % BLOCK == 0
    partial = torch.empty((B, C, P), dtype=torch.float64, device=device)
    flat = [t.view(B, n) for t in terms] + [None] * (MAX_TERMS - K)
    stream_args = [_i32(s) for s in streams] + [None] * (MAX_DRAWS - D)
    seeds = seeds.contiguous() if D else None
    with _device.on_device(device):  # Triton launches on the current device and stream
        for start in range(0, B, _MAX_GRID_Y):
            stop = min(B, start + _MAX_GRID_Y)
            _chunk_kernel[(C, stop - start)](
                *(t[start:stop] if t is not None else None for t in flat),
                seeds[start:stop] if seeds is not None else None,
                partial[start:stop], n, *stream_args,
                K=K, D=D, PP=PP, BLOCK=BLOCK,
            )
        _total_kernel[(B,)](partial, out, C, P=P, PP=PP, TILED=C > SERIAL_CHUNKS)
    return out
