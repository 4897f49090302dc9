"""The loss's documented precision (csrc/include/fastdiff/loss.h): r² in float32, summed in float32
only over short fixed runs (≤ 16 squares), float64 beyond, and loss = float32(weight · (sum / n))
rounded once — on every kernel backend (CPU loops, CUDA, Triton)."""

import pytest
import torch
from conftest import BACKENDS

KERNELS = [b for b in BACKENDS if b.id in ("cpu", "triton", "cuda")]


def _loss_kernel(name):
    if name == "triton":
        from fastdiff.kernels.loss import diffusion_loss

        return diffusion_loss
    return torch.ops.fastdiff.diffusion_loss


@pytest.mark.parametrize("backend", KERNELS)
def test_loss_sums_in_float64(backend):
    name, device = backend
    B, n = 8, 1 << 16
    g = torch.Generator().manual_seed(0)
    # residual r = pred (coef_z = coef_eps = 0): integers below 64, so every r² and every run of ≤ 16 of
    # them is exact in float32, while the total (~2^26.4) needs more than float32's 24 bits
    pred = torch.randint(0, 64, (B, n), generator=g).float()
    z = torch.randn(B, n, generator=g)
    w = torch.rand(B, generator=g) + 0.5
    zero = torch.zeros(B)
    sq = pred * pred
    total = sq.double().sum(dim=1)  # exact
    want = (w.double() * (total / n)).float()
    # the data tells float32 accumulation from float64: a float32 pairwise sum rounds
    f32 = sq
    while f32.shape[1] > 1:
        f32 = f32[:, 0::2] + f32[:, 1::2]
    assert not torch.equal((w.double() * (f32[:, 0].double() / n)).float(), want)

    args = [t.to(device) for t in (pred, z, zero, zero, w, torch.arange(B))]
    got = _loss_kernel(name)(*args, 3)
    assert got.dtype == torch.float32
    assert torch.equal(got.cpu(), want)
    # deterministic: the same bits again
    assert torch.equal(_loss_kernel(name)(*args, 3), got)
