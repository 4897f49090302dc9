"""torch.library.opcheck of every fastdiff op on non-contiguous inputs wherever the op accepts them:
the fake kernels must give the real kernels' shapes and strides (a fresh contiguous output whatever the
input strides), and the autograd registrations must hold up."""

import pytest
import torch

import fastdiff

pytestmark = pytest.mark.skipif(not fastdiff.backends()["cpu"], reason="cpu backend (fastdiff._C) unavailable")


def _strided(v):
    """v [B] as a non-contiguous view (every other element of a [2B] tensor)."""
    return torch.stack((v, torch.full_like(v, 7.0 if v.is_floating_point() else 7)), dim=1)[:, 0]


def test_philox_transposed_counter_and_key():
    g = torch.Generator().manual_seed(0)
    counter = torch.randint(0, 2**32, (4, 9), generator=g).t()  # [9, 4], strides (1, 9)
    key = torch.randint(0, 2**32, (2, 9), generator=g).t()
    assert not counter.is_contiguous() and not key.is_contiguous()
    torch.library.opcheck(torch.ops.fastdiff.philox4x32_10.default, (counter, key))
    out = torch.ops.fastdiff.philox4x32_10(counter, key)
    assert out.is_contiguous()
    assert torch.equal(out, fastdiff.ops.philox4x32_10_reference(counter, key))


def test_randn_strided_seeds():
    seeds = _strided(torch.tensor([1, 2**40, 3]))
    assert not seeds.is_contiguous()
    for dtype in (torch.float32, torch.bfloat16):
        torch.library.opcheck(torch.ops.fastdiff.randn.default, (seeds, 5, [3, 4], 6, dtype))


def _data(B=3, shape=(2, 5), seed=1):
    g = torch.Generator().manual_seed(seed)
    pred = torch.randn(B, *shape, generator=g)
    z = torch.randn(B, *shape, generator=g)
    return pred, z, _strided(torch.rand(B, generator=g)), _strided(torch.rand(B, generator=g) - 0.5), \
        _strided(torch.rand(B, generator=g) + 0.5), _strided(torch.tensor([4, 5, 6]))


def test_sampler_step_strided_seeds():
    pred, z, *_, seeds = _data()
    x, extra = z.clone(), torch.randn_like(z)
    args = (x, [torch.randn_like(pred), pred], [extra], seeds, [4], [1.0, 2.0], [0.9, 0.1, 0.2, 0.3, 1.0, 0.5, 0.25, 0.0],
            None, None, [torch.empty_like(x)], torch.empty_like(x), None)
    torch.library.opcheck(torch.ops.fastdiff.sampler_step.default, args)
    # with the step statistics (fastdiff/ops/step_stats.py): sums added to, the keep buffers written
    sums, keep = torch.zeros(3, 3, dtype=torch.float64), torch.zeros(3, 4)
    stats = [sums, torch.randn(3, 4), keep, torch.randn(3, 4), torch.zeros(3, 4)]
    torch.library.opcheck(torch.ops.fastdiff.sampler_step.default, args + (None, stats, [4, 1, 1, 1, 1]))


def test_add_noise_strided_coefficients_and_seeds():
    _, z, alpha, beta, _, seeds = _data()
    torch.library.opcheck(torch.ops.fastdiff.add_noise.default, (z, alpha, beta, seeds, 3))
    # with autograd (registered: grad wrt z, alpha and beta)
    torch.library.opcheck(torch.ops.fastdiff.add_noise.default,
                          (z.clone().requires_grad_(), alpha.clone().requires_grad_(), beta, seeds, 3))


def test_loss_ops_strided_coefficients_and_seeds():
    pred, z, cz, ce, w, seeds = _data()
    p = pred.clone().requires_grad_()
    torch.library.opcheck(torch.ops.fastdiff.diffusion_loss.default, (p, z, cz, ce, w, seeds, 3))
    torch.library.opcheck(torch.ops.fastdiff.diffusion_loss.default,
                          (p, z.clone().requires_grad_(), cz.clone().requires_grad_(), ce, w, seeds, 3))
    torch.library.opcheck(torch.ops.fastdiff.diffusion_loss_backward.default,
                          (_strided(torch.tensor([1.0, -2.0, 0.5])), pred, z, cz, ce, w, seeds, 3))
    torch.library.opcheck(torch.ops.fastdiff.diffusion_loss_residual.default, (pred, z, cz, ce, w, seeds, 3))
