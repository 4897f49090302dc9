"""The per-sample reduction pass (docs/design.md §2): for each sample b, the Gram matrix of the vector
u = (1, terms[0], …, terms[K-1], ξ_0, …, ξ_{D-1}) over the sample's elements,

    G[b, i, j] = Σ_e u_i[b, e] u_j[b, e]        (float64, [B, T + 1, T + 1], T = K + D)

so G[b, 0, 0] is the number of elements n, G[b, 0, i] the sum of term i, G[b, i, j] the dot product of
terms i and j. Every norm, mean, variance and dot product of any linear combination of the terms is a
quadratic form of G: a guidance rule (CFG rescale's standard deviations, APG's projection, CFG-Zero*'s
optimal scale) or a Langevin step size (‖score‖, ‖ξ‖) is this one read of its inputs, a few [B]-sized
ops on the device, and a :func:`fastdiff.ops.sampler_step` with per-sample coefficient rows — no host
synchronization anywhere. ξ_d is the spec-v1 normal of (seeds[b], streams[d], element e): the same
numbers a sampler_step draw with that stream adds.

Arithmetic: each product of two float32 values is exact in float64. A sample's elements are cut into
chunks of CHUNK (4096) elements; a chunk's sums are accumulated in float64 (in an order each backend
fixes), and the chunks' sums are added in index order (the GPU backends, past 64 chunks a sample: by tiles
or blocks of chunks, each summed as a fixed tree, in index order). The result does not depend on the batch
size or the thread count; backends agree to float64 rounding (~1e-15 relative to the sums of |products|).

Tensors: terms [B, *S] float32, float16 or bfloat16 (one dtype), contiguous, on one device; seeds
int64 [B] (required when streams are given). Limits: T = K + D ≤ MAX_TERMS (8), D ≤ 4.

``sample_gram_reference`` is the specification; the kernels return the packed sums (:func:`unpack`).
"""

from __future__ import annotations

import numbers

import torch

from fastdiff import _checks, _native
from fastdiff import dispatch as _dispatch
from fastdiff._backends import register_kernel
from fastdiff.ops.randn import randn_reference

CHUNK = 4096  # elements per chunk of a sample (the partial sums added in index order)
MAX_TERMS, MAX_DRAWS = 8, 4


def packed_size(T: int) -> int:
    """Length of the kernels' packed row: T sums, then the T (T + 1) / 2 products i <= j (row-major)."""
    return T + T * (T + 1) // 2


def _check(terms, seeds, streams):
    if isinstance(terms, torch.Tensor):
        raise TypeError("terms must be a list of tensors, got a tensor (write [terms])")
    terms = list(terms)
    for i, t in enumerate(terms):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"terms[{i}] must be a tensor, got {type(t).__name__}")
    if isinstance(streams, numbers.Integral) or not hasattr(streams, "__len__"):
        raise TypeError(f"streams must be a sequence of stream ids, got {type(streams).__name__}")
    streams = [_checks.stream_id(s, f"streams[{i}]") for i, s in enumerate(streams)]
    if len(streams) > MAX_DRAWS:
        raise ValueError(f"streams holds {len(streams)} draws; at most {MAX_DRAWS} are supported")
    if not terms:
        raise ValueError("terms must hold at least one tensor (the samples' shape and device are its own)")
    T = len(terms) + len(streams)
    if T > MAX_TERMS:
        raise ValueError(f"terms and streams hold {T} vectors; at most {MAX_TERMS} are supported")
    first = terms[0]
    if first.dim() < 1:
        raise ValueError("terms[0] must have a batch dimension: [B, ...]")
    for i, t in enumerate(terms):
        if t.shape != first.shape:
            raise ValueError(f"terms[{i}] must have terms[0]'s shape {tuple(first.shape)}, got {tuple(t.shape)}")
        if t.device != first.device:
            raise ValueError(f"terms[{i}] is on {t.device} but terms[0] is on {first.device}")
        if t.dtype not in _checks.PRED_DTYPES:
            raise TypeError(f"terms[{i}] must be float32, float16 or bfloat16, got {t.dtype}")
        if t.dtype != first.dtype:
            raise TypeError(f"terms[{i}] must have terms[0]'s dtype {first.dtype}, got {t.dtype}")
    B, device, shape = first.shape[0], first.device, tuple(first.shape[1:])
    if seeds is None:
        if streams:
            raise ValueError("seeds are required when streams are given")
        seeds = torch.zeros(B, dtype=torch.int64, device=device)
    else:
        seeds = _checks.seeds_tensor(seeds, device)
        if seeds.shape != (B,):
            raise ValueError(f"seeds must hold one seed per sample ({B}), got shape {tuple(seeds.shape)}")
    return [t.contiguous() for t in terms], seeds, streams, shape


def unpack(packed: torch.Tensor, T: int, n: int) -> torch.Tensor:
    """The Gram matrices [B, T + 1, T + 1] of the kernels' packed rows [B, packed_size(T)]."""
    B = packed.shape[0]
    G = packed.new_empty((B, T + 1, T + 1))
    G[:, 0, 0].fill_(float(n))  # a fill, not a tensor made from host data (capturable)
    G[:, 0, 1:] = packed[:, :T]
    G[:, 1:, 0] = packed[:, :T]
    rows, cols = torch.triu_indices(T, T, device=packed.device)
    G[:, 1 + rows, 1 + cols] = packed[:, T:]
    G[:, 1 + cols, 1 + rows] = packed[:, T:]
    return G


@register_kernel("reference", "sample_gram")
def run_reference(terms, seeds, streams):
    """The packed sums on checked arguments: [B, packed_size(T)] float64 (see the module docstring)."""
    B, shape = terms[0].shape[0], tuple(terms[0].shape[1:])
    n = terms[0].numel() // B if B else 0
    device = terms[0].device
    u = [t.reshape(B, n).to(torch.float64) for t in terms]
    u += [randn_reference(seeds, s, shape, device=device, dtype=torch.float32).reshape(B, n).to(torch.float64)
          for s in streams]
    T = len(u)
    values = list(u) + [u[i] * u[j] for i in range(T) for j in range(i, T)]
    chunks = max(1, -(-n // CHUNK))
    stacked = torch.stack(values, dim=-1)  # [B, n, P]
    stacked = torch.nn.functional.pad(stacked, (0, 0, 0, chunks * CHUNK - n))
    partial = stacked.reshape(B, chunks, CHUNK, len(values)).sum(dim=2)  # [B, chunks, P]
    total = partial[:, 0]
    for c in range(1, chunks):  # in index order
        total = total + partial[:, c]
    return total


def sample_gram(terms, *, seeds=None, streams=(), backend=None) -> torch.Tensor:
    """Per-sample Gram matrices [B, T + 1, T + 1] (float64) of (1, terms…, noise draws…); see the
    module docstring. ``backend`` overrides fastdiff.use_backend for this call."""
    terms, seeds, streams, shape = _check(terms, seeds, streams)
    B, device = terms[0].shape[0], terms[0].device
    n = terms[0].numel() // B if B else 0
    T = len(terms) + len(streams)
    if B == 0 or n == 0:
        return unpack(torch.zeros((B, packed_size(T)), dtype=torch.float64, device=device), T, n)
    name = _dispatch.resolve(device, backend)
    return unpack(_dispatch.kernel(name, "sample_gram")(terms, seeds, streams), T, n)


def sample_gram_reference(terms, *, seeds=None, streams=()) -> torch.Tensor:
    """Pure-PyTorch specification of :func:`sample_gram`."""
    terms, seeds, streams, shape = _check(terms, seeds, streams)
    B = terms[0].shape[0]
    n = terms[0].numel() // B if B else 0
    T = len(terms) + len(streams)
    if B == 0 or n == 0:
        return unpack(torch.zeros((B, packed_size(T)), dtype=torch.float64, device=terms[0].device), T, n)
    return unpack(run_reference(terms, seeds, streams), T, n)


if _native.status.loaded and hasattr(torch.ops.fastdiff, "sample_gram"):

    @torch.library.register_fake("fastdiff::sample_gram")
    def _sample_gram_fake(terms, seeds, streams):
        T = len(terms) + len(streams)
        return terms[0].new_empty((terms[0].shape[0], packed_size(T)), dtype=torch.float64)
