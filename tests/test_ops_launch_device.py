"""Every Triton launcher launches under its tensors' device (fastdiff.kernels._launch.on_device): Triton
launches on the *current* CUDA device and its current stream, so without it tensors on cuda:1 while
cuda:0 is current would be read on the wrong device (a fault) or race on the wrong stream."""

import contextlib

import pytest
import torch
from conftest import BACKENDS

import fastdiff
from fastdiff import ops

TRITON = next(b for b in BACKENDS if b.id == "triton")


def test_on_device_is_torch_cuda_device_for_cuda_and_a_no_op_otherwise():
    from fastdiff.kernels import _launch

    ctx = _launch.on_device(torch.device("cuda", 1))  # constructing it touches no GPU
    assert isinstance(ctx, torch.cuda.device) and ctx.idx == 1
    with _launch.on_device(torch.device("cpu")):
        pass


class _Spy:
    """Replaces on_device (records each device) and each @triton.jit kernel of the launchers (records
    whether it was launched inside an on_device block, and under which device)."""

    def __init__(self, monkeypatch):
        from fastdiff.kernels import _launch, loss, randn, sampler_step

        self.entered, self.launches, self.active = [], [], []
        real = _launch.on_device

        @contextlib.contextmanager
        def on_device(device):
            self.entered.append(torch.device(device))
            self.active.append(torch.device(device))
            try:
                with real(device):
                    yield
            finally:
                self.active.pop()

        monkeypatch.setattr(_launch, "on_device", on_device)
        for module, name in ((sampler_step, "_sampler_step_kernel"), (loss, "_loss_kernel"), (randn, "_randn_kernel"),
                             (randn, "_philox_kernel")):
            monkeypatch.setattr(module, name, self._wrap(name, getattr(module, name)))

    def _wrap(self, name, kernel):
        spy = self

        class Launch:
            def __getitem__(self, grid):
                spy.launches.append((name, spy.active[-1] if spy.active else None))
                return kernel[grid]

        return Launch()

    def check(self, device, kernel):
        """Every launch since the last check was of ``kernel`` under ``device``."""
        assert self.entered and all(d == torch.device(device) for d in self.entered), self.entered
        assert self.launches and all(k == kernel for k, _ in self.launches), self.launches
        assert all(d == torch.device(device) for _, d in self.launches), f"launched outside on_device: {self.launches}"
        self.entered.clear()
        self.launches.clear()


@pytest.mark.parametrize("backend", [TRITON])
def test_every_triton_launcher_enters_its_tensors_device(backend, monkeypatch):
    from fastdiff.kernels import loss as tl

    _, device = backend
    spy = _Spy(monkeypatch)
    B, n = 2, 10
    x = torch.randn(B, n, device=device)
    device = x.device  # "cuda" is entered as cuda:<current>: compare with the tensors' own device
    seeds = torch.tensor([1, 2], device=device)
    ops.guided_step(x, x, seeds=seeds, stream=1, c_noise=0.5, backend="triton")
    spy.check(device, "_sampler_step_kernel")
    ops.randn(seeds, 3, (n,), backend="triton")
    spy.check(device, "_randn_kernel")
    counter = torch.zeros(4, 4, dtype=torch.int64, device=device)
    ops.philox4x32_10(counter, torch.zeros(4, 2, dtype=torch.int64, device=device), backend="triton")
    spy.check(device, "_philox_kernel")
    c = torch.full((B,), 0.5, device=device)
    tl.add_noise(x, c, c, seeds, 1)
    spy.check(device, "_loss_kernel")
    tl.diffusion_loss(x, x, c, c, c, seeds, 1)
    spy.check(device, "_loss_kernel")
    tl.diffusion_loss_backward(c, x, x, c, c, c, seeds, 1)
    spy.check(device, "_loss_kernel")
    # through the public ops and autograd (the backward draws ε with the Triton randn)
    p = x.clone().requires_grad_()
    t = torch.full((B,), 0.3, dtype=torch.float64, device=device, requires_grad=True)
    ops.diffusion_loss(p, ops.add_noise(x, t, seeds, 1, backend="triton"), t, seeds, 1, backend="triton").backward()
    assert spy.entered and all(d == torch.device(device) for d in spy.entered)
    assert {k for k, _ in spy.launches} == {"_loss_kernel", "_randn_kernel"}
    assert all(d == torch.device(device) for _, d in spy.launches), spy.launches


@pytest.mark.cuda
@pytest.mark.triton
@pytest.mark.skipif(torch.cuda.device_count() < 2 or not fastdiff.backends()["triton"],
                    reason="needs 2 CUDA GPUs and Triton")
def test_triton_on_a_non_current_gpu_equals_the_reference():
    dev = torch.device("cuda", 1)
    with torch.cuda.device(0):
        assert torch.cuda.current_device() == 0
        B, n = 3, 1001
        g = torch.Generator().manual_seed(0)
        x, pred, uncond, extra = (torch.randn(B, n, generator=g) for _ in range(4))
        seeds = [5, 6, 7]
        kw = dict(cfg=2.0, extra=extra, seeds=seeds, stream=4, c_x=0.9, c_pred=0.2, c_extra=0.1, c_noise=0.3)
        want = ops.guided_step_reference(x, pred, uncond, **kw)
        got = ops.guided_step(x.to(dev), pred.to(dev), uncond.to(dev), backend="triton",
                              **{**kw, "extra": extra.to(dev)})
        torch.testing.assert_close(got.cpu(), want, atol=1e-5, rtol=0)
        torch.testing.assert_close(ops.randn(torch.tensor(seeds, device=dev), 9, (n,), backend="triton").cpu(),
                                   ops.randn_reference(seeds, 9, (n,)), atol=1e-5, rtol=0)
        ctr = torch.randint(0, 2**32, (64, 4), generator=g)
        key = torch.randint(0, 2**32, (64, 2), generator=g)
        assert torch.equal(ops.philox4x32_10(ctr.to(dev), key.to(dev), backend="triton").cpu(),
                           ops.philox4x32_10_reference(ctr, key))
        t = torch.rand(B, generator=g, dtype=torch.float64) * 0.9 + 0.05
        torch.testing.assert_close(ops.add_noise(x.to(dev), t.to(dev), seeds, 2, backend="triton").cpu(),
                                   ops.add_noise(x, t, seeds, 2, backend="reference"), atol=1e-5, rtol=0)
        p = pred.to(dev).requires_grad_()
        loss = ops.diffusion_loss(p, x.to(dev), t.to(dev), seeds, 2, reduction="sum", backend="triton")
        loss.backward()
        p_ref = pred.clone().requires_grad_()
        loss_ref = ops.diffusion_loss(p_ref, x, t, seeds, 2, reduction="sum", backend="reference")
        loss_ref.backward()
        torch.cuda.synchronize(dev)
        torch.testing.assert_close(loss.detach().cpu(), loss_ref.detach(), rtol=1e-5, atol=0)
        torch.testing.assert_close(p.grad.cpu(), p_ref.grad, atol=1e-6, rtol=0)
