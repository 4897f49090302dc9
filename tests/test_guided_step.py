"""The fused step on every backend against its reference, on odd sizes, dtypes and options."""

import pytest
import torch
from conftest import BACKENDS, interpreted

import fastdiff
from fastdiff import ops

# prediction dtype -> absolute tolerance of the step output (math in float32 everywhere; low-precision
# predictions are converted once, identically, so only float32 rounding differs)
TOL = {torch.float32: 1e-5, torch.float16: 1e-5, torch.bfloat16: 1e-5}
COEFFS = dict(c_x=0.97, c_pred=-0.031, c_extra=0.25, c_noise=0.13, s_x=1.5, s_pred=0.7, s_extra=-0.5)


def _inputs(B, n, dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, n, generator=g)
    pred = torch.randn(2 * B, n, generator=g).to(dtype)
    extra = torch.randn(B, n, generator=g)
    return x.to(device), pred.to(device), extra.to(device)


@pytest.mark.parametrize("dtype", list(TOL))
@pytest.mark.parametrize("B,n", [(1, 1), (3, 3), (2, 1023), (1, (1 << 15) + 5), (1, (1 << 20) + 5)])
@pytest.mark.parametrize("backend", [b for b in BACKENDS if b.id != "reference"])
def test_matches_reference_full(backend, B, n, dtype):
    name, device = backend
    if interpreted(name) and n > 1 << 20:
        pytest.skip("the interpreter's multi-block case is 2^15 + 5 elements (conftest.interpreted)")
    x, pred2, extra = _inputs(B, n, dtype, device)
    cond, uncond = pred2[:B], pred2[B:]  # halves of one [2B] output: views, no copy
    seeds = torch.tensor([5, 2**63 + 1 - 2**64, 7][:B], dtype=torch.int64, device=device)
    kw = dict(cfg=4.0, extra=extra, seeds=seeds, stream=17, **COEFFS)
    side_ref = torch.empty_like(x)
    want = ops.guided_step_reference(x, cond, uncond, side=side_ref, **kw)
    side = torch.empty_like(x)
    got = ops.guided_step(x, cond, uncond, side=side, backend=name, **kw)
    torch.testing.assert_close(got, want, atol=TOL[dtype], rtol=0)
    torch.testing.assert_close(side, side_ref, atol=TOL[dtype], rtol=0)


@pytest.mark.parametrize("options", ["plain", "no_uncond", "no_noise", "no_extra", "side_only"])
@pytest.mark.parametrize("backend", [b for b in BACKENDS if b.id != "reference"])
def test_option_combinations(backend, options):
    name, device = backend
    B, n = 3, 37
    x, pred2, extra = _inputs(B, n, torch.float32, device, seed=1)
    cond, uncond = pred2[:B], pred2[B:]
    kw = dict(cfg=2.5, extra=extra, seeds=[1, 2, 3], stream=3, **COEFFS)
    if options == "no_uncond":
        uncond = None
    if options == "no_noise":
        kw["c_noise"] = 0.0
    if options == "no_extra":
        kw["extra"] = None
    side = torch.empty_like(x) if options in ("plain", "side_only") else None
    side_ref = torch.empty_like(x) if side is not None else None
    want = ops.guided_step_reference(x, cond, uncond, side=side_ref, **kw)
    got = ops.guided_step(x, cond, uncond, side=side, backend=name, **kw)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    if side is not None:
        torch.testing.assert_close(side, side_ref, atol=1e-5, rtol=0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_in_place_and_aliased_side(backend):
    name, device = backend
    B, n = 2, 101
    x, pred2, extra = _inputs(B, n, torch.float32, device, seed=2)
    kw = dict(cfg=3.0, seeds=[9, 10], stream=2, **COEFFS)
    want_side = torch.empty_like(x)
    want = ops.guided_step_reference(x, pred2[:B], pred2[B:], extra=extra, side=want_side, **kw)
    x_buf, extra_buf = x.clone(), extra.clone()
    out = ops.guided_step(x_buf, pred2[:B], pred2[B:], extra=extra_buf, out=x_buf, side=extra_buf, backend=name,
                          **kw)
    assert out.data_ptr() == x_buf.data_ptr()
    torch.testing.assert_close(x_buf, want, atol=1e-5, rtol=0)
    torch.testing.assert_close(extra_buf, want_side, atol=1e-5, rtol=0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_noise_is_the_stream(backend):
    """c_x = c_pred = 0, c_noise = 1: the step writes exactly the spec-v1 noise of (seed, stream)."""
    name, device = backend
    x = torch.zeros(3, 4, 9, device=device)
    got = ops.guided_step(x, x, seeds=[4, 5, 6], stream=12, c_x=0.0, c_pred=0.0, c_noise=1.0, backend=name)
    want = ops.randn_reference([4, 5, 6], 12, (4, 9))
    torch.testing.assert_close(got.cpu(), want, atol=1e-5, rtol=0)


def test_errors_name_the_argument():
    x = torch.zeros(2, 5)
    with pytest.raises(TypeError, match="x must be a float32"):
        ops.guided_step(x.double(), x)
    with pytest.raises(ValueError, match="pred must have x's shape"):
        ops.guided_step(x, torch.zeros(2, 4))
    with pytest.raises(TypeError, match="pred_uncond must have pred's dtype"):
        ops.guided_step(x, x, x.half())
    with pytest.raises(TypeError, match="extra must be"):
        ops.guided_step(x, x, extra=x.half())
    with pytest.raises(ValueError, match="seeds are required"):
        ops.guided_step(x, x, c_noise=1.0)
    with pytest.raises(ValueError, match="one seed per sample"):
        ops.guided_step(x, x, seeds=[1, 2, 3], c_noise=1.0)
    with pytest.raises(ValueError, match="stream"):
        ops.guided_step(x, x, seeds=[1, 2], stream=-1, c_noise=1.0)
    with pytest.raises(ValueError, match="contiguous"):
        ops.guided_step(torch.zeros(5, 2).t(), torch.zeros(5, 2).t(), backend="cpu")


def test_opcheck_cpu():
    # guided_step runs the sampler_step op (fastdiff.ops.sampler_step): opcheck it in guided_step's two forms
    if not fastdiff.backends()["cpu"]:
        pytest.skip("cpu backend unavailable")
    x, pred2, extra = _inputs(2, 13, torch.float32, "cpu", seed=3)
    seeds = torch.tensor([1, 2], dtype=torch.int64)
    out, side = torch.empty_like(x), torch.empty_like(x)
    args = (x, [pred2[2:].contiguous(), pred2[:2].contiguous()], [extra], seeds, [4], [1.0, 2.0],
            [0.9, 0.1, 0.2, 0.3, 1.0, 0.5, 0.25, 0.0], None, None, [out], side, None)
    torch.library.opcheck(torch.ops.fastdiff.sampler_step.default, args)
    args = (x, [pred2[:2].contiguous().half()], [], seeds, [], [1.0], [0.9, 0.1, 0.0, 0.0], None, None, [out], None,
            None)
    torch.library.opcheck(torch.ops.fastdiff.sampler_step.default, args)
