"""Shared by the tests of the tensor rules (fastdiff.sampling.features.tensor_rules: cfg_norm, mahiro, fdg, mimic): a
model of 4-D predictions whose guidance update varies over channels and positions, predictions to guide, and
hand-written Euler (CondOT, velocity) and DDIM (VP, eps) loops in float64 that take the guided prediction from a
float64 function of the branches (the peer's formula, written in the test)."""

import torch

import fastdiff
from fastdiff.paths import get_path

SHAPE, B, NULL = (3, 5, 7), 2, 3  # odd sizes (FDG pads 5 x 7 to 8 x 8, as kornia does)
Y, Y2 = torch.tensor([0, 2]), torch.tensor([1, 0])
_g = torch.Generator().manual_seed(34)
MIX = (torch.eye(3) + 0.3 * torch.randn(3, 3, generator=_g)).to(torch.float32)
EMB = torch.randn(4, *SHAPE, generator=_g)


def model(x, t, y):
    """A linear map of the channels, growing with t, plus a label's field (per channel and position)."""
    return torch.einsum("ij,bjhw->bihw", MIX, x) * (0.5 + t).view(-1, 1, 1, 1) + EMB[y] * (1.0 + t).view(-1, 1, 1, 1)


def preds(shape, dtype=torch.float32, batch=3, seed=0):
    """(u, c): unconditional and conditional tensors with a per-sample spread of their difference."""
    g = torch.Generator().manual_seed(seed)
    u = torch.randn(batch, *shape, generator=g) * 0.8 + 0.1
    c = u + torch.randn(batch, *shape, generator=g) * torch.linspace(0.2, 1.5, batch).view(-1, *([1] * len(shape)))
    return u.to(dtype), c.to(dtype)


def tol(spec, rel=1e-6):
    return dict(rtol=0, atol=rel * spec.abs().max().item())


def branches(x, t, conditions=None, weights=None):
    """(p_null, p_c) in float64 at x, t: p_c the weighted mean of the conditions (one: y = Y)."""
    n = x.shape[0]
    tt = torch.full((n,), t, dtype=torch.float32)
    p_null = model(x.float(), tt, torch.full((n,), NULL)).double()
    conditions = [Y] if conditions is None else conditions
    weights = [1.0] if weights is None else [w / sum(weights) for w in weights]
    p_c = sum(a * model(x.float(), tt, yk).double() for a, yk in zip(weights, conditions))
    return p_null, p_c


def initial(seed, grid, path):
    return fastdiff.ops.randn(torch.arange(seed, seed + B), 0, SHAPE).double() * get_path(path).coefficients(grid[0])[1]


def hand_euler(guide, steps, seed=3, space="x0", **branch_kw):
    """Euler on CondOT (velocity model, t from 0 to 1): guide(u, c, t, step) -> the guided tensor in ``space``
    ("x0": the clean estimates x0 = x + (1 - t) v, back as v = (x0 - x) / (1 - t))."""
    grid = [i / steps for i in range(steps + 1)]
    x = initial(seed, grid, "condot")
    for i, (t, t1) in enumerate(zip(grid, grid[1:])):
        u, c = branches(x, t, **branch_kw)
        if space == "x0":
            v = (guide(x + (1 - t) * u, x + (1 - t) * c, t, i) - x) / (1 - t)
        else:
            v = guide(u, c, t, i)
        x = x + (t1 - t) * v
    return x


def hand_ddim(guide, grid, seed=3, space="x0", **branch_kw):
    """DDIM (eta 0) on VP with an eps model: x0 = (x - sigma eps) / alpha, x' = alpha' x0 + sigma' eps."""
    path = get_path("vp")
    x = initial(seed, grid, "vp")
    for i, (t, t1) in enumerate(zip(grid, grid[1:])):
        (al, be), (al1, be1) = path.coefficients(t)[:2], path.coefficients(t1)[:2]
        u, c = branches(x, t, **branch_kw)
        if space == "x0":
            d = guide((x - be * u) / al, (x - be * c) / al, t, i)
        else:
            d = (x - be * guide(u, c, t, i)) / al
        x = al1 * d + be1 * (x - al * d) / be
    return x


DDIM_GRID = [0.05 + 0.9 * i / 4 for i in range(5)]


def sample(backend, guidance, cfg, method="euler", steps=4, **kw):
    name, device = backend
    args = dict(shape=SHAPE, seed=3, backend=name, device=device, guidance=guidance, null_y=NULL)
    if "conditions" not in kw:
        args["y"] = Y.to(device)
    if method == "ddim":
        args.update(method="ddim", path="vp", prediction="eps", timesteps=DDIM_GRID)
        steps = None
    args.update(kw)
    m = model if device == "cpu" else (lambda x, t, y: model(x.cpu(), t.cpu(), y.cpu()).to(device))
    return fastdiff.sample(m, steps, cfg, **args).cpu().double()


def hand(method, guide, space="x0", steps=4, **branch_kw):
    if method == "ddim":
        return hand_ddim(guide, DDIM_GRID, space=space, **branch_kw)
    return hand_euler(guide, steps, space=space, **branch_kw)


def close(ours, spec, rel=2e-5):
    torch.testing.assert_close(ours, spec, rtol=0, atol=rel * spec.abs().max().item())
