"""Philox4x32-10 (Random123), the counter-based generator of the noise stream (docs/design.md §3).

``philox4x32_10`` runs on the selected backend; ``philox4x32_10_reference`` is the pure-PyTorch
specification: exact uint32 arithmetic carried in int64 tensors (any device, no NumPy).
"""

from __future__ import annotations

import torch

from fastdiff import _native
from fastdiff import dispatch as _dispatch
from fastdiff._backends import register_kernel

M32 = 0xFFFFFFFF
_M0, _M1 = 0xD2511F53, 0xCD9E8D57
_W0, _W1 = 0x9E3779B9, 0xBB67AE85


def _mulhilo(a: torch.Tensor, m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(hi, lo) 32-bit halves of a * m for uint32 a (int64 tensor) and constant m < 2^32.

    Splitting m in 16-bit halves keeps every partial product below 2^48, so int64 never overflows.
    """
    p_lo = a * (m & 0xFFFF)  # < 2^48
    p_hi = a * (m >> 16)  # < 2^48; a * m = p_lo + p_hi * 2^16
    low_sum = p_lo + ((p_hi & 0xFFFF) << 16)  # < 2^49
    lo = low_sum & M32
    hi = ((p_hi >> 16) + (low_sum >> 32)) & M32
    return hi, lo


def philox_rounds(c0, c1, c2, c3, k0, k1):
    """Ten Philox rounds on int64 tensors holding uint32 values (broadcasting); returns 4 words."""
    for _ in range(10):
        hi0, lo0 = _mulhilo(c0, _M0)
        hi1, lo1 = _mulhilo(c2, _M1)
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
        k0 = (k0 + _W0) & M32
        k1 = (k1 + _W1) & M32
    return c0, c1, c2, c3


def _check(counter: torch.Tensor, key: torch.Tensor) -> None:
    for name, t, width in (("counter", counter, 4), ("key", key, 2)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a tensor, got {type(t).__name__}")
        if t.dtype != torch.int64:
            raise TypeError(f"{name} must be int64 (holding uint32 values), got {t.dtype}")
        if t.dim() != 2 or t.shape[1] != width:
            raise ValueError(f"{name} must have shape [N, {width}], got {tuple(t.shape)}")
    if counter.shape[0] != key.shape[0]:
        raise ValueError(f"counter and key must have the same N, got {counter.shape[0]} and {key.shape[0]}")
    if counter.device != key.device:
        raise ValueError(f"counter and key must be on one device, got {counter.device} and {key.device}")
    if counter.device.type == "meta":
        return
    # words outside [0, 2^32) would be silently masked to 32 bits: another counter than the one asked for.
    # One read-back for both (a device sync on a GPU: this op is the generator's specification, not a hot path)
    bad = torch.stack([((t < 0) | (t > M32)).any() for t in (counter, key)]).tolist()
    for name, t, b in (("counter", counter, bad[0]), ("key", key, bad[1])):
        if b:
            i, j = ((t < 0) | (t > M32)).nonzero()[0].tolist()
            raise ValueError(f"{name} words must be uint32 values in [0, 2^32), got "
                             f"{name}[{i}, {j}] = {t[i, j].item()}")


def philox4x32_10_reference(counter: torch.Tensor, key: torch.Tensor) -> torch.Tensor:
    """Words of Philox4x32-10. counter: int64 [N, 4], key: int64 [N, 2] (uint32 values) → int64 [N, 4]."""
    _check(counter, key)
    return _philox_words(counter, key)


@register_kernel("reference", "philox4x32_10")
def _philox_words(counter: torch.Tensor, key: torch.Tensor) -> torch.Tensor:
    c = counter & M32
    k = key & M32
    return torch.stack(philox_rounds(c[:, 0], c[:, 1], c[:, 2], c[:, 3], k[:, 0], k[:, 1]), dim=1)


def philox4x32_10(counter: torch.Tensor, key: torch.Tensor, *, backend: str | None = None) -> torch.Tensor:
    """Philox4x32-10 words on the selected backend (see :func:`philox4x32_10_reference`)."""
    _check(counter, key)
    return _dispatch.kernel(_dispatch.resolve(counter.device, backend), "philox4x32_10")(counter, key)


if _native.status.loaded:

    @torch.library.register_fake("fastdiff::philox4x32_10")
    def _philox_fake(counter, key):
        # every backend returns a fresh contiguous [N, 4], whatever the strides of counter
        return counter.new_empty((counter.shape[0], 4))
