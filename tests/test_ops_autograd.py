"""Autograd of the ops on every backend that runs here, against the reference's gradients: add_noise
in z and t, diffusion_loss in pred, z and t and twice (a gradient penalty), guided_step in x, pred,
pred_uncond and extra. Where a kernel cannot differentiate (guided_step writing out=/side= in place)
it raises."""

import pytest
import torch
from conftest import BACKENDS

from fastdiff import ops

KERNELS = [b for b in BACKENDS if b.id != "reference"]


def _batch(B=3, n=37, seed=0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(B, n, generator=g)
    pred = torch.randn(B, n, generator=g)
    t = torch.rand(B, generator=g, dtype=torch.float64) * 0.9 + 0.05
    w = torch.rand(B, generator=g) + 0.5
    return z.to(device), pred.to(device), t.to(device), w.to(device)


def _close(got, want, atol):
    if want is None:  # e.g. t for prediction="eps": the target does not depend on t
        assert got is None
        return
    assert got is not None, "gradient missing"
    torch.testing.assert_close(got.cpu(), want.cpu(), atol=atol, rtol=1e-5)


# ---- add_noise -------------------------------------------------------------------------------------

@pytest.mark.parametrize("z_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("backend", KERNELS)
def test_add_noise_gradients_wrt_z_and_t(backend, z_dtype):
    name, device = backend
    z0, _, t0, _ = _batch(device=device)
    z0 = z0.to(z_dtype)
    weights = torch.linspace(-1, 2, 37, device=device)

    def grads(b):
        z, t = z0.clone().requires_grad_(), t0.clone().requires_grad_()
        (ops.add_noise(z, t, [1, 2, 3], 5, "vp", backend=b) * weights).sum().backward()
        return z.grad, t.grad

    (zg, tg), (zg_ref, tg_ref) = grads(name), grads("reference")
    assert zg is not None and zg.dtype == z_dtype
    assert torch.equal(zg, zg_ref)  # alpha[b] grad, rounded as the reference rounds it
    _close(tg, tg_ref, atol=1e-5)


@pytest.mark.parametrize("backend", KERNELS)
def test_add_noise_encoder_upstream_trains(backend):
    """An encoder in front of z gets its gradient (z.grad was None on the kernels)."""
    name, device = backend
    z0, _, t, _ = _batch(device=device)
    enc = torch.nn.Linear(37, 37).to(device)
    ops.add_noise(enc(z0), t, [1, 2, 3], 0, backend=name).square().sum().backward()
    assert enc.weight.grad is not None and float(enc.weight.grad.abs().sum()) > 0


# ---- diffusion_loss --------------------------------------------------------------------------------

def _loss_grads(b, z0, p0, t0, w, prediction, penalty):
    p, z, t = p0.clone().requires_grad_(), z0.clone().requires_grad_(), t0.clone().requires_grad_()
    loss = ops.diffusion_loss(p, z, t, [1, 2, 3], 5, "vp", prediction, weight=w, reduction="sum", backend=b)
    total = loss
    if penalty:  # a gradient penalty: needs the second-order term through the backward
        gp, = torch.autograd.grad(loss, p, create_graph=True)
        total = loss + 3.0 * gp.square().sum()
    total.backward()
    return loss.detach(), p.grad, z.grad, t.grad


@pytest.mark.parametrize("penalty", [False, True], ids=["first_order", "gradient_penalty"])
@pytest.mark.parametrize("prediction", ["velocity", "eps", "score"])
@pytest.mark.parametrize("backend", KERNELS)
def test_loss_gradients_wrt_pred_z_t_and_double_backward(backend, prediction, penalty):
    name, device = backend
    z0, p0, t0, w = _batch(seed=1, device=device)
    got = _loss_grads(name, z0, p0, t0, w, prediction, penalty)
    want = _loss_grads("reference", z0, p0, t0, w, prediction, penalty)
    for g, r in zip(got, want):
        _close(g, r, atol=1e-5)


@pytest.mark.parametrize("backend", KERNELS)
def test_loss_gradient_penalty_of_pred_only(backend):
    """pred alone requires grad (the CPU residual path, CUDA / Triton's fused backward): the double
    backward still gets the second-order term (it was silently dropped)."""
    name, device = backend
    z0, p0, t, w = _batch(seed=2, device=device)

    def run(b):
        p = p0.clone().requires_grad_()
        loss = ops.diffusion_loss(p, z0, t, [1, 2, 3], 5, weight=w, backend=b)
        gp, = torch.autograd.grad(loss, p, create_graph=True)
        gp.square().sum().backward()
        return p.grad

    _close(run(name), run("reference"), atol=1e-7)


def test_loss_gradgradcheck_reference_float64():
    z, p, t, w = _batch(B=2, n=5, seed=3)
    z, p, t = z.double(), p.double().requires_grad_(), t.requires_grad_()
    f = lambda p, z, t: ops.diffusion_loss(p, z, t, [5, 6], 1, "vp", "velocity", weight=w,
                                           reduction="none", backend="reference")
    assert torch.autograd.gradgradcheck(f, (p, z.requires_grad_(), t))


def test_loss_backward_formula_gradgradcheck_float64():
    """The differentiable backward the kernels use under create_graph, in float64 (the noise from the
    CPU randn): its own derivatives by finite differences."""
    from fastdiff.ops.loss_gradients import loss_grads as grads

    z, p, _, w = _batch(B=2, n=6, seed=4)
    cz = torch.tensor([0.7, -0.4], dtype=torch.float64, requires_grad=True)
    ce = torch.tensor([1.3, 0.2], dtype=torch.float64, requires_grad=True)
    seeds = torch.tensor([1, 2])

    def f(g, p, z, cz, ce):
        return grads((True, True, True, True), g, p, z, cz, ce, w.double(), seeds, 3, "reference")

    g = torch.tensor([1.0, -0.5], dtype=torch.float64, requires_grad=True)
    args = (g, p.double().requires_grad_(), z.double().requires_grad_(), cz, ce)
    with torch.enable_grad():
        assert torch.autograd.gradcheck(f, args)
        assert torch.autograd.gradgradcheck(f, args)


# ---- guided_step -----------------------------------------------------------------------------------

@pytest.mark.parametrize("uncond", [True, False], ids=["cfg", "no_uncond"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("backend", KERNELS)
def test_guided_step_gradients_equal_the_reference(backend, dtype, uncond):
    name, device = backend
    g = torch.Generator().manual_seed(5)
    base = [torch.randn(2, 29, generator=g).to(device) for _ in range(4)]
    base[1], base[2] = base[1].to(dtype), base[2].to(dtype)
    grad_out = torch.randn(2, 29, generator=g).to(device)
    kw = dict(cfg=3.5, seeds=[1, 2], stream=3, c_x=0.9, c_pred=-0.3, c_extra=0.2, c_noise=0.1)

    def run(b):
        x, p, u, e = (v.clone().requires_grad_() for v in base)
        out = ops.guided_step(x, p, u if uncond else None, extra=e, backend=b, **kw)
        out.backward(grad_out)
        return x.grad, p.grad, u.grad if uncond else torch.zeros(()), e.grad

    for got, want in zip(run(name), run("reference")):
        assert got is not None
        assert torch.equal(got, want)  # the reference's backward ops, bit for bit


@pytest.mark.parametrize("backend", KERNELS)
def test_guided_step_in_place_with_grad_raises(backend):
    name, device = backend
    x = torch.randn(2, 5, device=device)
    pred = torch.randn(2, 5, device=device, requires_grad=True)
    with pytest.raises(RuntimeError, match="pred requires grad"):
        ops.guided_step(x, pred, out=x, backend=name)
    with pytest.raises(RuntimeError, match="out=/side="):
        ops.guided_step(x, pred, s_x=1.0, side=torch.empty_like(x), backend=name)
    with torch.no_grad():  # fine without grad mode
        ops.guided_step(x, pred, out=x, backend=name)
