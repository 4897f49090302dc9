"""add_noise and the fused diffusion loss (value and gradient) on every backend against the reference."""

import pytest
import torch
from conftest import BACKENDS, interpreted

import fastdiff
from fastdiff import ops
from fastdiff.paths import get_path

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# relative tolerance of the per-sample loss and absolute tolerance of the gradient / noised data, by
# prediction dtype (the kernels and the reference read the same rounded inputs; only float32
# summation order differs, and the low-precision gradient is rounded once on output)
LOSS_RTOL = {torch.float32: 1e-5, torch.float16: 1e-5, torch.bfloat16: 1e-5}
GRAD_ATOL = {torch.float32: 1e-6, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}
KERNEL_BACKENDS = [b for b in BACKENDS if b.id != "reference"]


def _batch(B, shape, pred_dtype, z_dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(B, *shape, generator=g).to(z_dtype)
    pred = torch.randn(B, *shape, generator=g).to(pred_dtype)
    t = torch.rand(B, generator=g, dtype=torch.float64) * 0.98 + 0.01
    w = torch.rand(B, generator=g) + 0.5
    return z.to(device), pred.to(device), t.to(device), w.to(device)


@pytest.mark.parametrize("z_dtype", DTYPES)
@pytest.mark.parametrize("B,shape", [(1, (1,)), (3, (3,)), (2, (3, 11, 31)), (1, ((1 << 15) + 5,)),
                                     (1, ((1 << 20) + 5,))])
@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_add_noise_matches_reference(backend, B, shape, z_dtype):
    name, device = backend
    if interpreted(name) and shape[0] > 1 << 20:
        pytest.skip("the interpreter's multi-block case is 2^15 + 5 elements (conftest.interpreted)")
    z, _, t, _ = _batch(B, shape, torch.float32, z_dtype, device)
    seeds = [3, 2**64 - 1, 5][:B]
    got = ops.add_noise(z, t, seeds, 9, "vp", backend=name)
    want = ops.add_noise(z.cpu(), t.cpu(), seeds, 9, "vp", backend="reference")
    assert got.dtype == torch.float32 and got.shape == z.shape
    torch.testing.assert_close(got.cpu(), want, atol=1e-5, rtol=0)


@pytest.mark.parametrize("prediction", ["velocity", "eps", "x0", "score"])
@pytest.mark.parametrize("pred_dtype,z_dtype", [(torch.float32, torch.float32), (torch.float16, torch.float32),
                                                (torch.bfloat16, torch.bfloat16), (torch.float32, torch.float16)])
@pytest.mark.parametrize("B,shape", [(1, (1,)), (3, (3,)), (3, (512,)), (2, (513,)), (3, (1023,)),
                                     (1, ((1 << 15) + 5,)), (1, ((1 << 20) + 5,))])  # CUDA: a warp per sample to 512
@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_loss_and_gradient_match_reference(backend, B, shape, pred_dtype, z_dtype, prediction):
    name, device = backend
    if interpreted(name) and shape[0] > 1 << 20:
        pytest.skip("the interpreter's multi-block case is 2^15 + 5 elements (conftest.interpreted)")
    if shape[0] > 1 << 15 and (prediction != "velocity" or pred_dtype != torch.float32) and interpreted(name):
        pytest.skip("large interpreted Triton runs once (time)")
    z, pred, t, w = _batch(B, shape, pred_dtype, z_dtype, device, seed=1)
    seeds = [11, 12, 13][:B]
    kw = dict(path="condot", prediction=prediction, weight=w, reduction="none")
    p = pred.clone().requires_grad_()
    loss = ops.diffusion_loss(p, z, t, seeds, 4, backend=name, **kw)
    grad_out = torch.linspace(0.5, 1.5, B, device=device)
    (loss * grad_out).sum().backward()
    p_ref = pred.cpu().clone().requires_grad_()
    loss_ref = ops.diffusion_loss(p_ref, z.cpu(), t.cpu(), seeds, 4, backend="reference",
                                  **{**kw, "weight": w.cpu()})
    (loss_ref * grad_out.cpu()).sum().backward()
    torch.testing.assert_close(loss.detach().cpu(), loss_ref.detach(), rtol=LOSS_RTOL[pred_dtype], atol=0)
    assert p.grad.dtype == pred_dtype
    torch.testing.assert_close(p.grad.cpu().float(), p_ref.grad.float(), atol=GRAD_ATOL[pred_dtype], rtol=0)


def test_true_target_gives_zero_loss_and_add_noise_uses_the_same_eps():
    B, n = 4, 50
    z = torch.randn(B, n)
    t = torch.tensor([0.1, 0.4, 0.7, 0.9], dtype=torch.float64)
    xt = ops.add_noise(z, t, [1, 2, 3, 4], 8, "condot")
    eps = ops.randn([1, 2, 3, 4], 8, (n,))
    torch.testing.assert_close(xt, t[:, None].float() * z + (1 - t[:, None].float()) * eps, atol=1e-6, rtol=0)
    for prediction, target in (("velocity", z - eps), ("eps", eps), ("x0", z),
                               ("score", -eps / (1 - t[:, None].float()))):
        loss = ops.diffusion_loss(target, z, t, [1, 2, 3, 4], 8, prediction=prediction, reduction="none")
        assert float(loss.abs().max()) < 1e-10, prediction


def test_gradcheck_reference_float64():
    B, n = 2, 7
    z = torch.randn(B, n, dtype=torch.float64)
    pred = torch.randn(B, n, dtype=torch.float64, requires_grad=True)
    t = torch.tensor([0.3, 0.8], dtype=torch.float64)
    w = torch.tensor([1.0, 2.0])
    for prediction in ("velocity", "eps", "score"):
        assert torch.autograd.gradcheck(
            lambda p: ops.diffusion_loss(p, z, t, [5, 6], 1, "vp", prediction, weight=w, reduction="none"), (pred,))


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_kernel_backward_is_the_reference_backward(backend):
    """The fused backward against the reference backward formula directly (not through autograd)."""
    name, device = backend
    z, pred, t, w = _batch(3, (37,), torch.float32, torch.float32, device, seed=2)
    p = pred.clone().requires_grad_()
    loss = ops.diffusion_loss(p, z, t, [1, 2, 3], 6, "vp", "eps", weight=w, reduction="sum", backend=name)
    loss.backward()
    cz, ce = (c.float() for c in ops.diffusion_loss.__globals__["target_coefficients"](get_path("vp"), t, "eps"))
    want = ops.diffusion_loss_backward_reference(torch.ones(3, device=device), pred, z, cz, ce, w,
                                                 torch.tensor([1, 2, 3], device=device), 6)
    torch.testing.assert_close(p.grad, want, atol=1e-6, rtol=0)


def test_loss_is_deterministic_across_thread_counts():
    if not fastdiff.backends()["cpu"]:
        pytest.skip("cpu backend unavailable")
    z, pred, t, w = _batch(2, (300_001,), torch.float32, torch.float32, "cpu", seed=3)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = ops.diffusion_loss(pred, z, t, [1, 2], 3, reduction="none", backend="cpu")
        torch.set_num_threads(max(2, threads))
        many = ops.diffusion_loss(pred, z, t, [1, 2], 3, reduction="none", backend="cpu")
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, many)


def test_opcheck_cpu():
    if not fastdiff.backends()["cpu"]:
        pytest.skip("cpu backend unavailable")
    z, pred, t, w = _batch(2, (3, 5), torch.float32, torch.float32, "cpu", seed=4)
    seeds = torch.tensor([1, 2])
    cz, ce = torch.tensor([1.0, -0.5]), torch.tensor([0.3, 2.0])
    torch.library.opcheck(torch.ops.fastdiff.add_noise.default, (z, cz, ce, seeds, 3))
    torch.library.opcheck(torch.ops.fastdiff.diffusion_loss.default,
                          (pred.requires_grad_(), z, cz, ce, w, seeds, 3))
    torch.library.opcheck(torch.ops.fastdiff.diffusion_loss_backward.default,
                          (torch.ones(2), pred.detach(), z, cz, ce, w, seeds, 3))
    torch.library.opcheck(torch.ops.fastdiff.diffusion_loss_residual.default, (pred.detach(), z, cz, ce, w, seeds, 3))


@pytest.mark.parametrize("pred_dtype", DTYPES)
def test_cpu_residual_path_equals_the_fused_backward(pred_dtype):
    """On the CPU a differentiable loss stores pred − target in the forward and scales it in the backward;
    that gives bit for bit what the fused backward kernel (ε regenerated) gives."""
    if not fastdiff.backends()["cpu"]:
        pytest.skip("cpu backend unavailable")
    z, pred, t, w = _batch(3, (5, 77), pred_dtype, torch.float32, "cpu", seed=5)
    seeds = torch.tensor([4, 5, 6])
    p = pred.clone().requires_grad_()
    loss = ops.diffusion_loss(p, z, t, seeds, 2, "vp", "velocity", weight=w, reduction="none", backend="cpu")
    g = torch.tensor([0.5, -2.0, 3.0])
    loss.backward(g)
    cz, ce = (c.float() for c in ops.diffusion_loss.__globals__["target_coefficients"](get_path("vp"), t, "velocity"))
    fused = torch.ops.fastdiff.diffusion_loss_backward(g, pred, z, cz, ce, w, seeds, 2)
    assert p.grad.dtype == pred_dtype
    assert torch.equal(p.grad, fused)
    # the forward's residual and loss against the reference
    got_loss, residual = torch.ops.fastdiff.diffusion_loss_residual(pred, z, cz, ce, w, seeds, 2)
    want_loss, want_res = ops.diffusion_loss_residual_reference(pred, z, cz, ce, w, seeds, 2)
    assert torch.equal(got_loss, loss.detach())
    torch.testing.assert_close(got_loss, want_loss, rtol=1e-5, atol=0)
    torch.testing.assert_close(residual, want_res, rtol=0, atol=1e-5)


@pytest.mark.parametrize("call,exc,match", [
    (lambda z, t: ops.diffusion_loss(z, z[:1], t, [1, 2], 0), ValueError, r"z must have as many samples as pred \(2\)"),
    (lambda z, t: ops.diffusion_loss(z, z, t[:1], [1, 2], 0), ValueError, "t must have shape"),
    (lambda z, t: ops.diffusion_loss(z, z, t, [1], 0), ValueError, "seeds must hold one seed per sample"),
    (lambda z, t: ops.diffusion_loss(z, z, t, [1, 2], -1), ValueError, "stream"),
    (lambda z, t: ops.diffusion_loss(z, z, t, [1, 2], 0, prediction="noise"), ValueError, "prediction"),
    (lambda z, t: ops.diffusion_loss(z, z, t, [1, 2], 0, reduction="max"), ValueError, "reduction"),
    (lambda z, t: ops.diffusion_loss(z.int(), z, t, [1, 2], 0), TypeError, "pred must be"),
    (lambda z, t: ops.diffusion_loss(z, z, t, [1, 2], 0, weight=torch.ones(3)), ValueError, "weight"),
    (lambda z, t: ops.add_noise(z, t, [1, 2], 0, path="edm"), ValueError, "path"),
])
def test_errors_name_the_argument(call, exc, match):
    with pytest.raises(exc, match=match):
        call(torch.randn(2, 4), torch.tensor([0.2, 0.5], dtype=torch.float64))
