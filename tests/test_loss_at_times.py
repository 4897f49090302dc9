"""Noising and the loss at flow times (fastdiff/ops/loss_at_times.py): one op per direction computing the path's
coefficients from t in the op. Against the coefficient ops bit for bit, its errors, its autograd, and the
number of ATen ops a training step dispatches (issue 31: ≤ 8, no host read)."""

import collections
import math

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import fastdiff
from fastdiff import ops
from fastdiff.gaussian_paths import VE, VP, CondOT, VPCosine, path_from_kernel
from fastdiff.ops import loss_at_times
from fastdiff.ops.diffusion_loss import _loss_on_coefficients, target_coefficients
from fastdiff.paths import DiscreteVP, get_path

pytestmark = pytest.mark.skipif(not (fastdiff.backends()["cpu"].available and loss_at_times.available("cpu")),
                                reason="native cpu backend unavailable")

PATHS = [CondOT(), VP(), VP(beta_min=0.5, beta_max=10.0), VPCosine(), VPCosine(s=0.1), VE(), VE(sigma_max=2.5)]
PREDICTIONS = ["velocity", "eps", "x0", "score", "v"]


def _times(B, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(B, generator=g, dtype=torch.float64) * 0.98 + 0.01).to(dtype)


def _coefficients(path, t, pair):
    t = t.to(torch.float64)
    c0, c1 = path.coefficients(t)[:2] if pair == "noising" else target_coefficients(path, t, pair)
    return (c0 + t * 0.0).float(), (c1 + t * 0.0).float()


@pytest.mark.parametrize("path", PATHS, ids=repr)
def test_kernel_coefficients_equal_the_python_paths(path):
    """On 4097 times in [0, 1] (ends included), every pair the kernel computes rounds to the float32 of the
    Python path's float64 coefficients: x_t of one element with z = 1 and the loss against pred = 0 are the
    coefficient ops' results bit for bit."""
    t = torch.linspace(0.0, 1.0, 4097, dtype=torch.float64)
    B, seeds = t.numel(), torch.arange(t.numel())
    z = torch.full((B, 1), 1.0)
    alpha, beta = _coefficients(path, t, "noising")
    got = torch.ops.fastdiff.add_noise_at(z, t, seeds, 3, *path.kernel_path())
    assert torch.equal(got, torch.ops.fastdiff.add_noise(z, alpha, beta, seeds, 3))
    inner = t[1:-1]  # velocity on VP / VPCosine and the score are infinite at an end
    for pair in PREDICTIONS:
        cz, ce = _coefficients(path, inner, pair)
        n = inner.numel()
        pred, zz, w = torch.zeros(n, 3), torch.randn(n, 3, generator=torch.Generator().manual_seed(1)), torch.ones(n)
        code = loss_at_times.PREDICTION_CODES[pair]
        got = torch.ops.fastdiff.diffusion_loss_at(pred, zz, inner, None, seeds[:n], 5, *path.kernel_path(), code)
        want = torch.ops.fastdiff.diffusion_loss(pred, zz, cz, ce, w, seeds[:n], 5)
        assert torch.equal(got, want), pair


@pytest.mark.parametrize("t_dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("pred_dtype,z_dtype", [(torch.float32, torch.float32), (torch.bfloat16, torch.float16),
                                                (torch.float16, torch.float32)])
@pytest.mark.parametrize("prediction", PREDICTIONS)
@pytest.mark.parametrize("path", ["condot", "vp", "vp-cosine", "ve"])
def test_ops_equal_the_coefficient_path(path, prediction, pred_dtype, z_dtype, t_dtype):
    """fastdiff.ops.add_noise / diffusion_loss (loss and gradient) by the ops at times equal the coefficient
    path's (coefficients computed in Python, the same kernels) bit for bit, on odd shapes, with weights."""
    B, shape = 3, (5, 77)
    g = torch.Generator().manual_seed(2)
    z = torch.randn(B, *shape, generator=g).to(z_dtype)
    pred = torch.randn(B, *shape, generator=g).to(pred_dtype)
    w = torch.rand(B, generator=g) + 0.5
    t, seeds = _times(B, 3, t_dtype), torch.tensor([7, 8, 2**63 + 5 - 2**64])
    alpha, beta = _coefficients(get_path(path), t, "noising")
    assert torch.equal(ops.add_noise(z, t, seeds, 4, path, backend="cpu"),
                       torch.ops.fastdiff.add_noise(z, alpha, beta, seeds, 4))
    losses, grads = [], []
    for loss_fn in (ops.diffusion_loss, _loss_on_coefficients):
        p = pred.clone().requires_grad_()
        loss = loss_fn(p, z, t, seeds, 4, path, prediction, w, **({"reduction": "none"} if loss_fn is
                                                                    ops.diffusion_loss else {}), backend="cpu")
        loss.backward(torch.tensor([0.5, -2.0, 3.0]))
        losses.append(loss.detach())
        grads.append(p.grad)
    assert torch.equal(losses[0], losses[1])
    assert grads[0].dtype == pred_dtype and torch.equal(grads[0], grads[1])


def test_fused_backward_op_equals_the_residual_backward():
    """The fused backward at times (the GPU's route: ε regenerated, coefficients from t) and the CPU's residual
    backward give the same gradient, also from a strided (expanded) grad_loss."""
    B = 4
    g = torch.Generator().manual_seed(5)
    pred, z = torch.randn(B, 3, 33, generator=g), torch.randn(B, 3, 33, generator=g)
    t, seeds, w = _times(B, 6), torch.arange(B), torch.rand(B, generator=g)
    args = (t, w, seeds, 2, *VP().kernel_path(), loss_at_times.PREDICTION_CODES["velocity"])
    grad = torch.tensor(0.25).expand(B)  # the gradient of a mean: stride 0
    fused = torch.ops.fastdiff.diffusion_loss_at_backward(grad, pred, z, *args)
    loss, residual = torch.ops.fastdiff.diffusion_loss_at_residual(pred, z, *args)
    from_residual = torch.ops.fastdiff.diffusion_loss_residual_backward(grad, residual, w, pred.dtype)
    assert torch.equal(fused, from_residual)
    assert torch.equal(loss, torch.ops.fastdiff.diffusion_loss_at(pred, z, *args))
    cz, ce = _coefficients(VP(), t, "velocity")
    assert torch.equal(fused, torch.ops.fastdiff.diffusion_loss_backward(grad.contiguous(), pred, z, cz, ce, w, seeds,
                                                                         2))


class _Ops(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.seen = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.seen.append(str(func))
        return func(*args, **(kwargs or {}))


def _training_step(pred, z, t, seeds, path, weight=None):
    x_t = ops.add_noise(z, t, seeds, 1, path)
    loss = ops.diffusion_loss(pred, z, t, seeds, 1, path, weight=weight)
    loss.backward()
    return x_t


@pytest.mark.parametrize("path", ["condot", "vp", "vp-cosine", VE(sigma_max=3.0)], ids=str)
@pytest.mark.parametrize("t_kind", ["float32", "float64", "float"])
def test_a_training_step_dispatches_at_most_8_ops_and_no_host_read(path, t_kind):
    """add_noise + loss forward + backward: the two ops at times, the mean and its backward (85 ATen ops with
    3 host reads on VP before)."""
    B = 4
    pred = torch.randn(B, 3, 8, 8, requires_grad=True)
    z, seeds = torch.randn(B, 3, 8, 8), torch.arange(B)
    t = 0.3 if t_kind == "float" else _times(B, 1, getattr(torch, t_kind))
    weight = torch.rand(B)
    with _Ops() as mode:
        _training_step(pred, z, t, seeds, path, weight=weight)
    counts = collections.Counter(mode.seen)
    assert "aten._local_scalar_dense.default" not in counts
    limit = 10 if t_kind == "float" else 8  # a float t becomes a tensor in each call: torch.full
    assert len(mode.seen) <= limit, counts
    assert counts["fastdiff.add_noise_at.default"] == 1


def test_gpu_route_dispatches_at_most_8_ops_and_reads_nothing_back(monkeypatch):
    """The route a CUDA tensor takes (no residual: the forward and the fused backward at times, the mean and its
    backward), run on meta tensors with the backend resolved as "cuda": the ops' fake kernels stand in for the
    GPU's, and any host read of a meta tensor raises."""
    from fastdiff import dispatch

    monkeypatch.setattr(dispatch, "resolve", lambda device, backend=None: "cuda")
    B = 3
    pred = torch.empty(B, 4, 9, device="meta", requires_grad=True)
    z, t = torch.empty(B, 4, 9, device="meta"), torch.empty(B, device="meta")
    seeds = torch.empty(B, dtype=torch.int64, device="meta")
    with _Ops() as mode:
        x_t = _training_step(pred, z, t, seeds, "vp")
    assert x_t.device.type == "meta" and pred.grad.shape == pred.shape
    counts = collections.Counter(mode.seen)
    assert counts["fastdiff.diffusion_loss_at.default"] == 1
    assert counts["fastdiff.diffusion_loss_at_backward.default"] == 1
    assert len(mode.seen) <= 8, counts


def test_coefficient_paths_stay_for_other_paths_and_gradients_in_t_and_z():
    """A path the kernels do not know (DiscreteVP, a user path, a subclass), a t or z that needs a gradient:
    the coefficient path, differentiable in t and z, as before."""
    B = 3
    g = torch.Generator().manual_seed(9)
    pred, z = torch.randn(B, 10, generator=g, requires_grad=True), torch.randn(B, 10, generator=g)
    seeds = torch.arange(B)

    class MyCondOT(CondOT):
        pass

    assert MyCondOT().kernel_path() is None
    assert DiscreteVP(torch.linspace(0.99, 0.01, 50)).kernel_path() is None
    t = _times(B, 4).requires_grad_()
    zz = z.clone().requires_grad_()
    with _Ops() as mode:
        loss = ops.diffusion_loss(pred, zz, t, seeds, 1, "vp")
    assert not any("_at" in name for name in mode.seen)
    gp, gz, gt = torch.autograd.grad(loss, (pred, zz, t))
    want = ops.diffusion_loss(pred, zz, t, seeds, 1, "vp", backend="reference")
    wp, wz, wt = torch.autograd.grad(want, (pred, zz, t))
    for got, ref in ((gp, wp), (gz, wz), (gt, wt)):
        torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-6)


def test_double_backward_through_the_ops_at_times():
    """A gradient penalty (create_graph) differentiates the fused loss's gradient: the same as the reference."""
    B = 2
    g = torch.Generator().manual_seed(11)
    pred0, z = torch.randn(B, 17, generator=g), torch.randn(B, 17, generator=g)
    t, seeds = _times(B, 12), torch.tensor([3, 4])
    results = []
    for backend in ("cpu", "reference"):
        pred = pred0.clone().requires_grad_()
        loss = ops.diffusion_loss(pred, z, t, seeds, 1, "vp-cosine", backend=backend)
        (grad,) = torch.autograd.grad(loss, pred, create_graph=True)
        (penalty,) = torch.autograd.grad(grad.square().sum(), pred)
        results.append((grad.detach(), penalty))
    for got, ref in zip(*results):
        torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-7)


def test_add_noise_at_gives_z_its_gradient():
    """An encoder upstream of z gets alpha · grad through the op at times (torch.ops directly)."""
    t, seeds = _times(2, 13), torch.tensor([1, 2])
    z = torch.randn(2, 6, requires_grad=True)
    x = torch.ops.fastdiff.add_noise_at(z, t, seeds, 0, *VP().kernel_path())
    (gz,) = torch.autograd.grad(x.sum(), z)
    alpha = VP().alpha(t).float()
    assert torch.equal(gz, alpha[:, None].expand(2, 6))
    with pytest.raises(RuntimeError, match="not differentiable in t"):
        tt = t.clone().requires_grad_()
        torch.autograd.grad(torch.ops.fastdiff.add_noise_at(z, tt, seeds, 0, *VP().kernel_path()).sum(), tt)


@pytest.mark.parametrize("t,match", [
    (torch.tensor([0.2, 1.5]), r"t must hold flow times in \[0, 1\] \(finite\), got t\[1\] = 1\.5"),
    (torch.tensor([math.nan, 0.5]), r"got t\[0\] = nan"),
    (torch.tensor([-0.25, 0.5], dtype=torch.float64), r"got t\[0\] = -0\.25"),
])
def test_cpu_refuses_a_bad_time_before_any_work(t, match):
    z = torch.randn(2, 5)
    with pytest.raises(ValueError, match=match):
        ops.add_noise(z, t, [1, 2], 0, "vp")
    with pytest.raises(ValueError, match=match):
        ops.diffusion_loss(z, z, t, [1, 2], 0, "vp")


@pytest.mark.parametrize("path,prediction,t,match", [
    ("condot", "score", 1.0, r"'score' target is singular at t = 1\.0 \(t\[1\]\) on path CondOT\(\)"),
    ("vp", "velocity", 1.0, r"'velocity' target is singular at t = 1\.0 \(t\[1\]\) on path VP\(beta_min=0\.1, "
                            r"beta_max=20\.0\)"),
    (VE(sigma_max=2.5), "score", 1.0, r"on path VE\(sigma_max=2\.5\)"),
])
def test_cpu_refuses_a_singular_target_with_the_python_message(path, prediction, t, match):
    z = torch.randn(2, 5)
    times = torch.tensor([0.5, t], dtype=torch.float64)
    with pytest.raises(ValueError, match=match):
        ops.diffusion_loss(z, z, times, [1, 2], 0, path, prediction)
    with pytest.raises(ValueError, match="singular"):  # a float t: checked on the host, before the op
        ops.diffusion_loss(z, z, t, [1, 2], 0, path, prediction)


@pytest.mark.parametrize("args,match", [
    (lambda z, t, s: (z, t.int(), s, 0, 0, []), "t must be float32 or float64"),
    (lambda z, t, s: (z, t[:1], s, 0, 0, []), r"t must be \[B\] = \[2\]"),
    (lambda z, t, s: (z, t, s, 0, 7, []), "path must be a path code"),
    (lambda z, t, s: (z, t, s, 0, 1, [0.1]), r"path 1 takes 2 parameters \(path_params\), got 1"),
    (lambda z, t, s: (z, t, s[:1], 0, 0, []), "seeds must be"),
])
def test_op_errors_name_the_argument(args, match):
    z, t, seeds = torch.randn(2, 5), torch.tensor([0.2, 0.4]), torch.tensor([1, 2])
    with pytest.raises(RuntimeError, match=match):
        torch.ops.fastdiff.add_noise_at(*args(z, t, seeds))
    with pytest.raises(RuntimeError, match="prediction must be a target code"):
        torch.ops.fastdiff.diffusion_loss_at(z, z, t, None, seeds, 0, 0, [], 0)


def test_opcheck_cpu():
    g = torch.Generator().manual_seed(14)
    pred, z = torch.randn(2, 3, 5, generator=g), torch.randn(2, 3, 5, generator=g)
    t, seeds, w = _times(2, 15, torch.float32), torch.tensor([1, 2]), torch.rand(2, generator=g)
    vp = VP().kernel_path()
    torch.library.opcheck(torch.ops.fastdiff.add_noise_at.default, (z, t, seeds, 3, *vp))
    torch.library.opcheck(torch.ops.fastdiff.diffusion_loss_at.default,
                          (pred.clone().requires_grad_(), z, t, w, seeds, 3, *vp, 1))
    torch.library.opcheck(torch.ops.fastdiff.diffusion_loss_at.default, (pred, z, t, None, seeds, 3, *vp, 4))
    torch.library.opcheck(torch.ops.fastdiff.diffusion_loss_at_residual.default, (pred, z, t, w, seeds, 3, *vp, 2))
    torch.library.opcheck(torch.ops.fastdiff.diffusion_loss_at_backward.default,
                          (torch.ones(2), pred, z, t, w, seeds, 3, *vp, 3))
    torch.library.opcheck(torch.ops.fastdiff.diffusion_loss_residual_backward.default,
                          (torch.ones(2), pred, None, torch.bfloat16))


def test_kernel_paths_round_trip():
    for path in PATHS:
        code, params = path.kernel_path()
        assert repr(path_from_kernel(code, params)) == repr(path)
    assert get_path("vp").kernel_path() == (1, (0.1, 20.0))


def test_the_training_objective_takes_the_ops_at_times():
    """DiffusionObjective (the Trainer's loss) noises and scores through the ops at times on the CPU."""
    from fastdiff.training.objective import DiffusionObjective

    objective = DiffusionObjective("vp", "velocity")
    model = torch.nn.Linear(4, 4)
    with _Ops() as mode:
        loss = objective(lambda x, t, y: model(x), torch.randn(3, 4), None, torch.arange(3))
        loss.backward()
    assert mode.seen.count("fastdiff.add_noise_at.default") == 1
    assert mode.seen.count("fastdiff.diffusion_loss_at_residual.default") == 1
    assert model.weight.grad is not None and bool(torch.isfinite(model.weight.grad).all())


_CUDA = pytest.mark.skipif(not (torch.cuda.is_available() and loss_at_times.available("cuda")),
                           reason="needs a CUDA GPU and the CUDA build")


@pytest.mark.cuda
@_CUDA
@pytest.mark.parametrize("path", PATHS, ids=repr)
def test_cuda_kernel_coefficients_equal_the_python_paths(path):
    """The CUDA kernels' float64 path maths (libdevice; VPCosine by sinpi) against the Python path's: within an
    ulp of float32 of the coefficient ops' results on the GPU, and a time outside [0, 1] is NaN for its sample."""
    t = torch.linspace(0.0, 1.0, 4097, dtype=torch.float64, device="cuda")
    B, seeds = t.numel(), torch.arange(t.numel(), device="cuda")
    z = torch.ones(B, 1, device="cuda")
    alpha, beta = _coefficients(path, t, "noising")
    got = torch.ops.fastdiff.add_noise_at(z, t, seeds, 3, *path.kernel_path())
    torch.testing.assert_close(got, torch.ops.fastdiff.add_noise(z, alpha, beta, seeds, 3), rtol=2.4e-7, atol=0)
    inner = t[1:-1]
    n = inner.numel()
    zz, pred = torch.randn(n, 3, device="cuda"), torch.zeros(n, 3, device="cuda")
    for pair in PREDICTIONS:
        cz, ce = _coefficients(path, inner, pair)
        code = loss_at_times.PREDICTION_CODES[pair]
        got = torch.ops.fastdiff.diffusion_loss_at(pred, zz, inner, None, seeds[:n], 5, *path.kernel_path(), code)
        want = torch.ops.fastdiff.diffusion_loss(pred, zz, cz, ce, torch.ones_like(cz), seeds[:n], 5)
        torch.testing.assert_close(got, want, rtol=1e-6, atol=0)
    bad = torch.tensor([0.5, 1.5, -0.1, math.nan], device="cuda")
    x = torch.ops.fastdiff.add_noise_at(torch.ones(4, 8, device="cuda"), bad, seeds[:4], 0, *path.kernel_path())
    assert x[0].isfinite().all() and x[1:].isnan().all()


@pytest.mark.cuda
@_CUDA
@pytest.mark.parametrize("n", [2, 511, 512, 513, 5000])
def test_cuda_training_step_matches_the_cpu_and_does_not_depend_on_the_batch(n):
    """Forward and fused backward at times on the GPU against the CPU ops at times, and each sample's loss the
    same alone as in a batch (a warp per sample up to 512 elements, blocks per chunk beyond)."""
    B = 5
    g = torch.Generator().manual_seed(n)
    pred, z = torch.randn(B, n, generator=g), torch.randn(B, n, generator=g)
    t, seeds = _times(B, 17, torch.float32), torch.arange(B) * 3 + 1
    results = []
    for device in ("cpu", "cuda"):
        p = pred.to(device).requires_grad_()
        loss = ops.diffusion_loss(p, z.to(device), t.to(device), seeds.to(device), 2, "vp", reduction="none")
        loss.sum().backward()
        results.append((loss.detach().cpu(), p.grad.cpu()))
    torch.testing.assert_close(results[1][0], results[0][0], rtol=1e-5, atol=0)
    torch.testing.assert_close(results[1][1], results[0][1], rtol=0, atol=1e-6)
    zc, pc, tc, sc = z.cuda(), pred.cuda(), t.cuda(), seeds.cuda()
    batch = ops.diffusion_loss(pc, zc, tc, sc, 2, "vp", reduction="none")
    alone = torch.cat([ops.diffusion_loss(pc[b:b + 1], zc[b:b + 1], tc[b:b + 1], sc[b:b + 1], 2, "vp",
                                          reduction="none") for b in range(B)])
    assert torch.equal(alone, batch)
