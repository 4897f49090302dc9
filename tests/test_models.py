"""Tests of the small denoisers in fastdiff.demo.models (MLP, UNet, build)."""

import json

import pytest
import torch

import fastdiff
from fastdiff.demo.models import MLP, UNet, build


def small_unet(**kw):
    kw = {"base": 8, "mults": (1, 2), "time_features": 16, "groups": 4, **kw}
    return UNet(**kw)


def perturb(model, seed=0, std=0.1):
    """Random non-zero weights everywhere (zero-init layers would hide the conditioning)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(std * torch.randn(p.shape, generator=g))
    return model


@pytest.mark.parametrize("batch,dim", [(1, 1), (3, 2), (5, 7)])
def test_mlp_shapes(batch, dim):
    m = MLP(dim, num_classes=3, hidden=16, depth=2, time_features=8)
    out = m(torch.randn(batch, dim), torch.rand(batch), torch.randint(0, 4, (batch,)))
    assert out.shape == (batch, dim) and out.dtype == torch.float32
    assert torch.all(out == 0)  # zero-init output: an untrained model predicts 0
    assert m(torch.randn(batch, dim), torch.rand(batch)).shape == (batch, dim)  # y=None: null label


@pytest.mark.parametrize("shape,mults", [((2, 1, 8, 8), (1, 2)), ((3, 2, 12, 4), (1, 2)),
                                         ((1, 1, 8, 16), (1, 2, 2)), ((2, 3, 5, 7), (1,))])
def test_unet_shapes(shape, mults):
    m = perturb(small_unet(channels=shape[1], num_classes=2, mults=mults))
    out = m(torch.randn(shape), torch.rand(shape[0]), torch.randint(0, 3, (shape[0],)))
    assert out.shape == shape and torch.isfinite(out).all()


def test_unet_attention_and_scalar_time():
    m = perturb(small_unet(attention=True))
    x = torch.randn(2, 1, 8, 8)
    assert m(x, 0.5).shape == x.shape
    assert torch.allclose(m(x, torch.tensor(0.5)), m(x, torch.full((2,), 0.5)))


@pytest.mark.parametrize("make,x", [(lambda: MLP(2, num_classes=3, hidden=16, depth=2), torch.randn(4, 2)),
                                    (lambda: small_unet(num_classes=3), torch.randn(4, 1, 8, 8))])
def test_gradients_flow(make, x):
    m = make()
    loss = (m(x, torch.rand(4), torch.tensor([0, 1, 2, 3])) - x).pow(2).mean()
    loss.backward()
    # At zero init only the (zero) output layer gets a gradient; with non-zero weights everything does.
    assert m.out.weight.grad.abs().sum() > 0
    perturb(m)
    m.zero_grad()
    (m(x, torch.rand(4), torch.tensor([0, 1, 2, 3])) - x).pow(2).mean().backward()
    grads = {n: p.grad for n, p in m.named_parameters()}
    missing = [n for n, g in grads.items() if g is None or not torch.isfinite(g).all()]
    assert not missing
    assert grads["cond.label.weight"][:4].abs().sum(dim=1).gt(0).all()  # labels 0..2 and null used


@pytest.mark.parametrize("make,x", [(lambda: MLP(2, num_classes=4, hidden=16, depth=2), torch.randn(6, 2)),
                                    (lambda: small_unet(num_classes=4), torch.randn(6, 1, 8, 8))])
def test_label_embedding(make, x):
    m = perturb(make())
    assert m.null_label == 4
    t = torch.rand(6)
    null = m(x, t, None)
    assert torch.equal(null, m(x, t, torch.full((6,), 4)))  # None means the null label
    for c in range(4):
        assert not torch.allclose(m(x, t, torch.full((6,), c)), null)
    assert not torch.allclose(m(x, t, torch.zeros(6, dtype=torch.long)), m(x, t, torch.ones(6, dtype=torch.long)))
    # Time matters too.
    assert not torch.allclose(m(x, torch.zeros(6), None), m(x, torch.full((6,), 0.01), None))


@pytest.mark.parametrize("make,x", [(lambda: MLP(3, num_classes=2, hidden=16, depth=2, time_features=8),
                                     torch.randn(5, 3)),
                                    (lambda: small_unet(num_classes=2, attention=True), torch.randn(5, 1, 8, 8))])
def test_build_round_trip(make, x):
    m = perturb(make())
    cfg = json.loads(json.dumps(m.config))  # JSON-serializable
    assert cfg["type"] == type(m).__name__
    m2 = build(cfg)
    m2.load_state_dict(m.state_dict())
    t, y = torch.rand(5), torch.tensor([0, 1, 2, 0, 1])
    assert torch.equal(m(x, t, y), m2(x, t, y))
    assert m2.config == m.config


def test_build_errors():
    with pytest.raises(ValueError, match="type"):
        build({"type": "Transformer"})
    with pytest.raises(TypeError, match="config must be a dict"):
        build("MLP")
    with pytest.raises(TypeError, match="bad config for MLP"):
        build({"type": "MLP", "dim": 2, "width": 3})


def test_constructor_errors():
    with pytest.raises(ValueError, match="dim"):
        MLP(0)
    with pytest.raises(TypeError, match="dim"):
        MLP(2.0)
    with pytest.raises(ValueError, match="num_classes"):
        MLP(2, num_classes=-1)
    with pytest.raises(ValueError, match="depth"):
        MLP(2, depth=0)
    with pytest.raises(ValueError, match="time_features"):
        MLP(2, time_features=7)
    with pytest.raises(ValueError, match="groups"):
        UNet(base=12, groups=8)
    with pytest.raises(TypeError, match="mults"):
        UNet(mults=())
    with pytest.raises(ValueError, match="mults"):
        UNet(mults=(1, 0))
    with pytest.raises(ValueError, match="channels"):
        UNet(channels=0)


def test_input_errors():
    m = MLP(2, num_classes=3, hidden=16, depth=1)
    x, t = torch.randn(4, 2), torch.rand(4)
    with pytest.raises(ValueError, match=r"x must have shape \[B, dim\]"):
        m(torch.randn(4, 3), t)
    with pytest.raises(ValueError, match=r"x must have shape"):
        m(torch.randn(4, 2, 1), t)
    with pytest.raises(TypeError, match="x must be a floating-point"):
        m(torch.ones(4, 2, dtype=torch.long), t)
    with pytest.raises(ValueError, match=r"t must have shape \[B\]"):
        m(x, torch.rand(3))
    with pytest.raises(ValueError, match=r"t must have shape \[B\]"):
        m(x, torch.rand(4, 1))
    with pytest.raises(TypeError, match="t must be a floating-point"):
        m(x, torch.arange(4))
    with pytest.raises(ValueError, match=r"y must hold labels in \[0, 3\)"):
        m(x, t, torch.tensor([0, 1, 2, 4]))
    with pytest.raises(ValueError, match="y must hold labels"):
        m(x, t, torch.tensor([-1, 0, 0, 0]))
    with pytest.raises(ValueError, match=r"y must have shape \[B\]"):
        m(x, t, torch.tensor([0, 1]))
    with pytest.raises(TypeError, match="y must hold integer"):
        m(x, t, torch.zeros(4))
    u = small_unet()
    with pytest.raises(ValueError, match="divisible by 2"):
        u(torch.randn(2, 1, 6, 7), torch.rand(2))
    with pytest.raises(ValueError, match=r"C = 1"):
        u(torch.randn(2, 3, 8, 8), torch.rand(2))
    with pytest.raises(ValueError, match=r"\[B, C, H, W\]"):
        u(torch.randn(2, 8, 8), torch.rand(2))
    # Unconditional: only the null label (0) is allowed.
    uc = MLP(2, hidden=8, depth=1)
    assert uc.null_label == 0
    uc(x, t, torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match="unconditional"):
        uc(x, t, torch.ones(4, dtype=torch.long))


def test_models_sample_with_cfg():
    """The models plug into fastdiff.sample, including the batched conditional/null CFG pass."""
    m = perturb(MLP(2, num_classes=3, hidden=16, depth=1))
    out = fastdiff.sample(m, steps=3, cfg=2.0, shape=(2,), y=torch.tensor([0, 1, 2]),
                          null_y=m.null_label, backend="reference")
    assert out.shape == (3, 2) and torch.isfinite(out).all()
    u = perturb(small_unet(num_classes=10))
    out = fastdiff.sample(u, steps=2, shape=(1, 8, 8), y=torch.arange(4), backend="reference")
    assert out.shape == (4, 1, 8, 8) and torch.isfinite(out).all()
