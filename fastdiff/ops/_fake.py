"""Fake (meta) kernels of the torch.ops.fastdiff ops, so torch.compile can trace them."""

from __future__ import annotations

import torch

from fastdiff import _native

if _native.status.loaded:

    @torch.library.register_fake("fastdiff::randn")
    def _randn_fake(seeds, stream, shape, offset, dtype):
        return seeds.new_empty((seeds.shape[0], *shape), dtype=dtype)

    @torch.library.register_fake("fastdiff::philox4x32_10")
    def _philox_fake(counter, key):
        return torch.empty_like(counter)
