"""The reference step creates no tensor from host data per call: torch.tensor(c, device=...) per
coefficient was a host-to-device copy per coefficient per step (a sync in eager mode, an error inside
CUDA-graph capture). Python float coefficients give the same float32 math bit for bit."""

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from fastdiff import ops
from fastdiff.ops.guided_step import _coefficient


class _HostData(TorchDispatchMode):
    """Records ops that make a tensor from host data or read one back: torch.tensor / as_tensor
    dispatch lift_fresh (CPU) then a copy to the device; scalar_tensor; a copy from a CPU tensor to
    another device; .item() / bool(tensor) (_local_scalar_dense)."""

    CREATE = frozenset({"aten.lift_fresh.default", "aten.lift.default", "aten.lift_fresh_copy.default",
                        "aten.scalar_tensor.default", "aten._local_scalar_dense.default"})

    def __init__(self):
        super().__init__()
        self.seen = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = str(func)
        if name in self.CREATE:
            self.seen.append(name)
        elif name in ("aten._to_copy.default", "aten.copy_.default", "aten.to.device"):
            src = args[1] if name == "aten.copy_.default" else args[0]
            dst = args[0].device if name == "aten.copy_.default" else kwargs.get("device", src.device)
            if src.device.type == "cpu" and torch.device(dst).type != "cpu":
                self.seen.append(f"{name} cpu -> {dst}")
        return func(*args, **kwargs)


def _step_inputs():
    g = torch.Generator().manual_seed(0)
    x, pred, uncond, extra = (torch.randn(2, 33, generator=g) for _ in range(4))
    return x, pred, uncond, extra, torch.tensor([3, 4])


def test_reference_step_creates_no_tensor_from_host_data():
    x, pred, uncond, extra, seeds = _step_inputs()
    side, out = torch.empty_like(x), torch.empty_like(x)
    kw = dict(cfg=3.0, extra=extra, seeds=seeds, stream=5, c_x=0.9, c_pred=-0.2, c_extra=0.3, c_noise=0.1,
              s_x=1.5, s_pred=0.5, s_extra=-0.25)
    with _HostData() as mode:
        ops.guided_step_reference(x, pred, uncond, side=side, out=out, **kw)
        ops.guided_step(x, pred, uncond, backend="reference", **kw)
        ops.guided_step_reference(x, pred.half(), None, c_x=0.5, c_pred=0.5)
    assert mode.seen == []


def test_reference_step_math_is_float32_coefficients():
    """c * t for a Python float c and a float32 tensor t rounds c to float32 first: the old
    torch.tensor(c, dtype=float32) scalars, bit for bit."""
    x, pred, uncond, extra, seeds = _step_inputs()
    k = dict(cfg=3.3, c_x=0.1 + 1e-9, c_pred=-1 / 3, c_extra=2 / 7, c_noise=0.123456789)
    f32 = {c: torch.tensor(_coefficient(c, v), dtype=torch.float32) for c, v in k.items()}
    g = uncond + f32["cfg"] * (pred - uncond)
    want = f32["c_x"] * x + f32["c_pred"] * g + f32["c_extra"] * extra
    want = want + f32["c_noise"] * ops.randn_reference(seeds, 2, (33,))
    got = ops.guided_step_reference(x, pred, uncond, extra=extra, seeds=seeds, stream=2, **k)
    assert torch.equal(got, want)


def test_loss_and_noise_references_create_no_tensor_from_host_data():
    _, pred, _, z, seeds = _step_inputs()
    c = torch.tensor([0.3, -1.2])
    w = torch.tensor([1.0, 2.0])
    with _HostData() as mode:
        ops.add_noise_reference(z, c, c, seeds, 1)
        ops.diffusion_loss_reference(pred, z, c, c, w, seeds, 1)
        ops.diffusion_loss_residual_reference(pred, z, c, c, w, seeds, 1)
        ops.diffusion_loss_backward_reference(w, pred, z, c, c, w, seeds, 1)
    assert mode.seen == []
