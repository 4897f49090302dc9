"""Tests of fastdiff.paths: Gaussian paths and prediction conversions (docs/design.md §1)."""

import itertools
import math

import pytest
import torch

import fastdiff.paths as fp
from fastdiff.paths import (
    PATH_NAMES,
    PREDICTIONS,
    CondOT,
    GaussianPath,
    UserPath,
    VE,
    DiscreteVP,
    VP,
    VPCosine,
    affine_coefficients,
    check_prediction,
    convert,
    get_path,
)

F64 = torch.float64
INTERIOR = [0.05, 0.3, 0.5, 0.77, 0.95]


# ----------------------------------------------------------------------------- helpers

def vp_alpha_torch(t, beta_min=0.1, beta_max=20.0):
    s = 1 - t
    return torch.exp(-0.5 * (beta_min * s + 0.5 * (beta_max - beta_min) * s ** 2))


def vp_beta_torch(t):
    return torch.sqrt(1 - vp_alpha_torch(t) ** 2)


def user_condot(explicit):
    if explicit:
        return UserPath(lambda t: t, lambda t: 1 - t, lambda t: 1.0, lambda t: -1.0)
    return UserPath(lambda t: t, lambda t: 1 - t)


def user_vp(explicit):
    if not explicit:
        return UserPath(vp_alpha_torch, vp_beta_torch)
    ref = VP()
    return UserPath(vp_alpha_torch, vp_beta_torch, ref.d_alpha, ref.d_beta)


def all_paths():
    return [CondOT(), VP(), VPCosine(), VP(beta_min=0.5, beta_max=10.0), VPCosine(s=0.02),
            user_condot(False), user_vp(False),
            UserPath(lambda t: torch.sin(0.5 * math.pi * t), lambda t: torch.cos(0.5 * math.pi * t),
                     name="trig")]


PATHS = all_paths()
PATH_IDS = [repr(p) if not isinstance(p, UserPath) else f"user-{i}" for i, p in enumerate(PATHS)]


def targets(path, t, z, eps):
    """The five predictions of a noiseless model for data z and noise eps."""
    al, be, dal, dbe = path.coefficients(t)
    x = al * z + be * eps
    return x, {"x0": z, "eps": eps, "velocity": dal * z + dbe * eps, "score": -eps / be, "v": al * eps - be * z}


def randn(*shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=F64)


# ----------------------------------------------------------------------------- boundary values

def test_condot_boundaries_exact():
    p = CondOT()
    assert p.coefficients(0.0) == (0.0, 1.0, 1.0, -1.0)
    assert p.coefficients(1.0) == (1.0, 0.0, 1.0, -1.0)
    assert p.coefficients(0.25) == (0.25, 0.75, 1.0, -1.0)


def test_vp_boundaries():
    p = VP()
    a0, b0, _, _ = p.coefficients(0.0)
    assert a0 == pytest.approx(math.exp(-(0.1 + 20.0) / 4), rel=1e-14)  # ~6.57e-3
    assert 0 < a0 < 1e-2 and b0 == pytest.approx(1.0, abs=3e-5)
    a1, b1, da1, db1 = p.coefficients(1.0)
    assert (a1, b1) == (1.0, 0.0)
    assert da1 == pytest.approx(0.05)  # beta_min / 2
    assert db1 == -math.inf


def test_vp_cosine_boundaries_exact():
    p = VPCosine()
    a0, b0, da0, _ = p.coefficients(0.0)
    a1, b1, _, db1 = p.coefficients(1.0)
    assert (a0, b0, a1, b1) == (0.0, 1.0, 1.0, 0.0)
    assert db1 == -math.inf
    assert da0 > 0


def test_vp_boundaries_tensor():
    for p in (VP(), VPCosine()):
        a, b, _, db = p.coefficients(torch.tensor([1.0], dtype=F64))
        assert a.item() == 1.0 and b.item() == 0.0 and db.item() == -math.inf


@pytest.mark.parametrize("t", [0.0, 0.01, 0.3, 0.5, 0.9, 0.999, 1.0])
def test_vp_cosine_matches_nichol_dhariwal(t):
    s = 0.008
    ref = math.cos(math.pi / 2 * ((1 - t) + s) / (1 + s)) / math.cos(math.pi / 2 * s / (1 + s))
    p = VPCosine()
    assert p.alpha(t) == pytest.approx(ref, abs=1e-15)
    assert p.beta(t) == pytest.approx(math.sqrt(max(0.0, 1 - ref * ref)), abs=1e-7)


@pytest.mark.parametrize("t", [0.0, 0.2, 0.6, 0.99, 1.0])
def test_vp_matches_definition(t):
    s = 1 - t
    big_b = 0.1 * s + 19.9 * s * s / 2
    p = VP()
    assert p.alpha(t) == pytest.approx(math.exp(-big_b / 2), rel=1e-15)
    assert p.beta(t) == pytest.approx(math.sqrt(1 - math.exp(-big_b)), rel=1e-12, abs=1e-300)


@pytest.mark.parametrize("path", [VP(), VPCosine(), VP(1.0, 5.0), VPCosine(0.1)], ids=repr)
def test_variance_preserving(path):
    t = torch.linspace(0, 1, 101, dtype=F64)
    a, b, _, _ = path.coefficients(t)
    torch.testing.assert_close(a ** 2 + b ** 2, torch.ones_like(t), atol=1e-14, rtol=0)


# ----------------------------------------------------------------------------- derivatives

@pytest.mark.parametrize("path", PATHS, ids=PATH_IDS)
@pytest.mark.parametrize("t", INTERIOR)
def test_derivatives_vs_central_differences(path, t):
    h = 1e-6
    fd_alpha = (path.alpha(t + h) - path.alpha(t - h)) / (2 * h)
    fd_beta = (path.beta(t + h) - path.beta(t - h)) / (2 * h)
    assert path.d_alpha(t) == pytest.approx(fd_alpha, rel=1e-7, abs=1e-8)
    assert path.d_beta(t) == pytest.approx(fd_beta, rel=1e-7, abs=1e-8)


@pytest.mark.parametrize("path", PATHS, ids=PATH_IDS)
def test_derivatives_vs_central_differences_tensor(path):
    t = torch.tensor(INTERIOR, dtype=F64)
    h = 1e-6
    _, _, da, db = path.coefficients(t)
    torch.testing.assert_close(da, (path.alpha(t + h) - path.alpha(t - h)) / (2 * h), rtol=1e-7, atol=1e-8)
    torch.testing.assert_close(db, (path.beta(t + h) - path.beta(t - h)) / (2 * h), rtol=1e-7, atol=1e-8)


# ----------------------------------------------------------------------------- UserPath

@pytest.mark.parametrize("explicit", [True, False], ids=["explicit", "autograd"])
@pytest.mark.parametrize("make,ref", [(user_condot, CondOT()), (user_vp, VP())], ids=["condot", "vp"])
def test_user_path_matches_builtin(make, ref, explicit):
    user = make(explicit)
    for t in INTERIOR + [0.0]:
        got, want = user.coefficients(t), ref.coefficients(t)
        assert all(isinstance(v, float) for v in got)
        assert got == pytest.approx(want, rel=1e-12, abs=1e-14)
    t = torch.tensor(INTERIOR, dtype=F64)
    for got, want in zip(user.coefficients(t), ref.coefficients(t)):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-14)


def test_user_path_autograd_keeps_dtype_and_works_in_inference_mode():
    user = user_vp(False)
    t = torch.tensor([0.2, 0.7], dtype=torch.float32)
    with torch.inference_mode():
        coeffs = user.coefficients(t)
    assert all(c.dtype == torch.float32 and c.shape == t.shape for c in coeffs)
    for got, want in zip(coeffs, VP().coefficients(t.double())):
        torch.testing.assert_close(got.double(), want, rtol=1e-6, atol=1e-6)


def test_user_path_math_callables_for_float_t():
    user = UserPath(lambda t: math.sin(t), lambda t: math.cos(t), lambda t: math.cos(t),
                    lambda t: -math.sin(t))
    assert user.coefficients(0.4) == pytest.approx(
        (math.sin(0.4), math.cos(0.4), math.cos(0.4), -math.sin(0.4)), rel=1e-15)
    no_grad = UserPath(lambda t: math.sin(t), lambda t: math.cos(t))
    with pytest.raises(TypeError, match="d_alpha"):
        no_grad.d_alpha(0.4)


def test_user_path_constant_and_repr():
    user = UserPath(lambda t: t, lambda t: 0.5 + 0 * t)
    assert user.d_beta(0.3) == 0.0
    assert torch.equal(user.d_beta(torch.tensor([0.1, 0.2])), torch.zeros(2))
    assert user.name == "user"
    assert "autograd" in repr(user) and "UserPath" in repr(user)
    with pytest.raises(TypeError, match="beta"):
        UserPath(lambda t: t, 3.0)


# ----------------------------------------------------------------------------- tensor vs float, t validation

@pytest.mark.parametrize("path", PATHS, ids=PATH_IDS)
def test_tensor_matches_float(path):
    ts = [0.0, 0.1, 0.5, 0.9, 1.0]
    got = path.coefficients(torch.tensor(ts, dtype=F64))
    for i, t in enumerate(ts):
        want = path.coefficients(t)
        for g, w in zip(got, want):
            assert isinstance(w, float)
            if not math.isfinite(w):  # -inf d_beta at t = 1 (NaN from autograd there)
                assert g[i].item() == w or (math.isnan(w) and math.isnan(g[i].item()))
            else:
                assert g[i].item() == pytest.approx(w, rel=1e-13, abs=1e-15)


@pytest.mark.parametrize("path", [CondOT(), VP(), VPCosine()], ids=repr)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_tensor_dtype_and_shape(path, dtype):
    t = torch.rand(3, 1, dtype=torch.float32).to(dtype)
    for c in path.coefficients(t):
        assert c.dtype == dtype and c.shape == t.shape and c.device == t.device
    assert path.alpha(torch.tensor([0, 1])).dtype == torch.get_default_dtype()


@pytest.mark.parametrize("bad", [-0.1, 1.0 + 1e-12, math.nan, math.inf])
@pytest.mark.parametrize("method", ["alpha", "beta", "d_alpha", "d_beta", "coefficients"])
def test_float_t_out_of_range(bad, method):
    with pytest.raises(ValueError, match=r"\bt\b"):
        getattr(VP(), method)(bad)


def test_t_type_errors_and_int_ok():
    with pytest.raises(TypeError, match="t must be"):
        CondOT().alpha("0.5")
    assert CondOT().coefficients(1) == (1.0, 0.0, 1.0, -1.0)


# ----------------------------------------------------------------------------- registry

@pytest.mark.parametrize("name,cls", [("condot", CondOT), ("vp", VP), ("vp-cosine", VPCosine),
                                      ("VP_Cosine", VPCosine), ("CondOT", CondOT), ("ve", VE)])
def test_get_path_by_name(name, cls):
    p = get_path(name)
    assert type(p) is cls and p.name in PATH_NAMES and isinstance(p, GaussianPath)
    assert type(p).__name__ in repr(p)


def test_get_path_instance_and_unknown():
    p = VP(beta_min=0.2)
    assert get_path(p) is p
    assert repr(p) == "VP(beta_min=0.2, beta_max=20.0)"
    assert repr(VPCosine()) == "VPCosine(s=0.008)" and repr(CondOT()) == "CondOT()"
    for bad in ("edm", "", None, 3):
        with pytest.raises(ValueError, match="name_or_path") as exc:
            get_path(bad)
        for name in PATH_NAMES:
            assert name in str(exc.value)


def test_path_parameter_validation():
    with pytest.raises(ValueError, match="beta_min"):
        VP(beta_min=-1.0)
    with pytest.raises(ValueError, match="s="):
        VPCosine(s=0.0)


def test_prediction_names():
    assert set(PREDICTIONS) == {"velocity", "eps", "score", "x0", "v"}
    assert check_prediction("epsilon") == "eps" and check_prediction("X0") == "x0"
    # diffusers' prediction_type names
    assert check_prediction("v_prediction") == "v" and check_prediction("sample") == "x0"
    x = torch.zeros(2)
    for call in (lambda: check_prediction("flow"),
                 lambda: affine_coefficients("condot", 0.5, "noise", "eps"),
                 lambda: convert(x, x, 0.5, "condot", "velocity", "noise")):
        with pytest.raises(ValueError) as exc:
            call()
        assert all(name in str(exc.value) for name in PREDICTIONS)
    with pytest.raises(ValueError, match="to_type"):
        affine_coefficients("condot", 0.5, "eps", "v_pred")


@pytest.mark.parametrize("path", ["vp", "vp_cosine", "condot", "ve"])
def test_v_prediction_is_salimans_and_ho(path):
    """v = alpha eps - beta x0 (diffusers' v_prediction on VP paths), and x0 = alpha x - beta v where
    alpha^2 + beta^2 = 1."""
    torch.manual_seed(0)
    z, eps, t = torch.randn(4, 3, dtype=torch.float64), torch.randn(4, 3, dtype=torch.float64), 0.37
    al, be = get_path(path).coefficients(t)[:2]
    x, v = al * z + be * eps, al * eps - be * z
    torch.testing.assert_close(convert(v, x, t, path, "v", "x0"), z, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(convert(v, x, t, path, "v", "eps"), eps, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(convert(eps, x, t, path, "eps", "v"), v, rtol=1e-12, atol=1e-12)
    if path.startswith("vp"):
        torch.testing.assert_close(convert(v, x, t, path, "v", "x0"), al * x - be * v, rtol=1e-12, atol=1e-12)


# ----------------------------------------------------------------------------- conversions

PAIRS = list(itertools.permutations(PREDICTIONS, 2))


@pytest.mark.parametrize("path", PATHS, ids=PATH_IDS)
@pytest.mark.parametrize("t", INTERIOR)
def test_consistency_with_definitions(path, t):
    z, eps = randn(4, 3, seed=1), randn(4, 3, seed=2)
    x, preds = targets(path, t, z, eps)
    for src, dst in itertools.product(PREDICTIONS, PREDICTIONS):
        got = convert(preds[src], x, t, path, src, dst)
        torch.testing.assert_close(got, preds[dst], rtol=1e-10, atol=1e-10, msg=f"{src}->{dst}")


@pytest.mark.parametrize("path", PATHS, ids=PATH_IDS)
def test_consistency_with_per_sample_tensor_t(path):
    t = torch.tensor([0.1, 0.4, 0.6, 0.93], dtype=F64)
    z, eps = randn(4, 2, 3, seed=3), randn(4, 2, 3, seed=4)
    tb = t.view(-1, 1, 1)
    x, preds = targets(path, tb, z, eps)
    for src, dst in PAIRS:
        got = convert(preds[src], x, t, path, src, dst)
        assert got.shape == x.shape and got.dtype == F64
        torch.testing.assert_close(got, preds[dst], rtol=1e-10, atol=1e-10, msg=f"{src}->{dst}")
        # a per-sample float call gives the same rows
        for i in range(4):
            row = convert(preds[src][i], x[i], t[i].item(), path, src, dst)
            torch.testing.assert_close(got[i], row, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("path", PATHS, ids=PATH_IDS)
@pytest.mark.parametrize("t", INTERIOR)
@pytest.mark.parametrize("src,dst", PAIRS)
def test_round_trip(path, t, src, dst):
    x, pred = randn(5, 4, seed=5), randn(5, 4, seed=6)
    back = convert(convert(pred, x, t, path, src, dst), x, t, path, dst, src)
    torch.testing.assert_close(back, pred, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("path", PATHS, ids=PATH_IDS)
@pytest.mark.parametrize("cycle", [("x0", "velocity", "eps", "score"), ("velocity", "score", "x0", "eps"),
                                   ("eps", "x0", "score", "velocity")])
def test_round_trip_cycles(path, cycle):
    t = 0.42
    x, pred = randn(3, 7, seed=7), randn(3, 7, seed=8)
    cur = pred
    for src, dst in zip(cycle, cycle[1:] + cycle[:1]):
        cur = convert(cur, x, t, path, src, dst)
    torch.testing.assert_close(cur, pred, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("path", PATHS, ids=PATH_IDS)
@pytest.mark.parametrize("src,dst", PAIRS)
def test_affine_coefficients_float_and_tensor(path, src, dst):
    ts = [0.2, 0.5, 0.8]
    a_t, b_t = affine_coefficients(path, torch.tensor(ts, dtype=F64), src, dst)
    assert a_t.shape == (3,) and b_t.dtype == F64
    for i, t in enumerate(ts):
        a, b = affine_coefficients(path, t, src, dst)
        assert type(a) is float and type(b) is float
        assert a_t[i].item() == pytest.approx(a, rel=1e-13, abs=1e-15)
        assert b_t[i].item() == pytest.approx(b, rel=1e-13, abs=1e-15)


@pytest.mark.parametrize("path", PATHS, ids=PATH_IDS)
@pytest.mark.parametrize("t", INTERIOR)
def test_proposition_1_score_to_velocity(path, t):
    """u = a_t s + b_t x with a_t = beta^2 d_alpha/alpha - d_beta beta, b_t = d_alpha/alpha."""
    al, be, dal, dbe = path.coefficients(t)
    a, b = affine_coefficients(path, t, "score", "velocity")
    assert a == pytest.approx(dal / al, rel=1e-12)
    assert b == pytest.approx(be * be * dal / al - dbe * be, rel=1e-12)


def test_identity_and_string_path():
    assert affine_coefficients("vp-cosine", 0.0, "eps", "eps") == (0.0, 1.0)
    assert affine_coefficients("condot", 1.0, "score", "score") == (0.0, 1.0)
    x, p = randn(2, 3), randn(2, 3, seed=9)
    out = convert(p, x, 0.0, "condot", "eps", "eps")
    assert torch.equal(out, p) and out is not p


def test_condot_velocity_closed_forms():
    for t in [0.0, 0.3, 0.9]:
        assert affine_coefficients("condot", t, "velocity", "score") == pytest.approx(
            (-1 / (1 - t), t / (1 - t)))  # s = (t u - x) / (1 - t)
        assert affine_coefficients("condot", t, "velocity", "x0") == pytest.approx((1.0, 1 - t))
        assert affine_coefficients("condot", t, "velocity", "eps") == pytest.approx((1.0, -t))


def test_condot_t0_velocity_model_is_finite():
    x, u = randn(4, 5, seed=10), randn(4, 5, seed=11)
    for t in (0.0, torch.zeros(4, dtype=F64)):
        s = convert(u, x, t, "condot", "velocity", "score")
        assert torch.isfinite(s).all()
        torch.testing.assert_close(s, -x)  # score of N(0, I)
        torch.testing.assert_close(convert(u, x, t, "condot", "velocity", "x0"), x + u)
        torch.testing.assert_close(convert(u, x, t, "condot", "velocity", "eps"), x)
    # velocity models at t = 0 of the VP paths are finite too
    for name in ("vp", "vp-cosine"):
        for dst in ("score", "x0", "eps"):
            assert all(math.isfinite(c) for c in affine_coefficients(name, 0.0, "velocity", dst))


SINGULAR = [
    ("condot", 0.0, "eps", "x0", "alpha_t = 0"),
    ("condot", 0.0, "eps", "velocity", "alpha_t = 0"),
    ("condot", 0.0, "score", "x0", "alpha_t = 0"),
    ("condot", 0.0, "score", "velocity", "alpha_t = 0"),
    ("vp-cosine", 0.0, "eps", "x0", "alpha_t = 0"),
    ("condot", 1.0, "eps", "score", "beta_t = 0"),
    ("condot", 1.0, "x0", "score", "beta_t = 0"),
    ("condot", 1.0, "velocity", "score", "beta_t = 0"),
    ("condot", 1.0, "x0", "eps", "beta_t = 0"),
    ("condot", 1.0, "x0", "velocity", "beta_t = 0"),
    ("vp", 1.0, "x0", "score", "not finite"),
    ("vp", 1.0, "velocity", "x0", "not finite"),
    ("vp-cosine", 1.0, "eps", "velocity", "not finite"),
]


@pytest.mark.parametrize("path,t,src,dst,why", SINGULAR)
def test_singular_conversions_raise(path, t, src, dst, why):
    with pytest.raises(ValueError) as exc:
        affine_coefficients(path, t, src, dst)
    msg = str(exc.value)
    assert f"t={t!r}" in msg and repr(src) in msg and repr(dst) in msg and why in msg
    x = torch.ones(3, 2, dtype=F64)
    with pytest.raises(ValueError, match=f"t={t!r}"):
        convert(x, x, t, path, src, dst)
    tt = torch.tensor([0.5, t, 0.5], dtype=F64)
    with pytest.raises(ValueError, match=why):
        convert(x, x, tt, path, src, dst)
    assert not torch.isfinite(convert(x, x, tt, path, src, dst, check=False)).all()


def test_nonsingular_neighbours_at_the_ends():
    x = torch.ones(2, dtype=F64)
    # eps -> score needs only beta != 0, so it works at t = 0 where alpha = 0
    torch.testing.assert_close(convert(x, x, 0.0, "condot", "eps", "score"), -x)
    # x0 / eps / score models give finite velocities and x0 just before the ends
    for src in ("eps", "score", "x0"):
        assert torch.isfinite(convert(x, x, 1e-3, "vp-cosine", src, "velocity")).all()
        assert torch.isfinite(convert(x, x, 0.999, "vp", src, "x0")).all()


def test_convert_broadcasting_and_dtypes():
    x = torch.randn(3, 2, 4)
    pred = torch.randn(3, 2, 4).to(torch.bfloat16)
    t = torch.tensor([0.2, 0.5, 0.7])
    out = convert(pred, x, t, "vp", "eps", "velocity")
    assert out.dtype == torch.float32 and out.shape == x.shape
    ref = convert(pred.double(), x.double(), t.double(), "vp", "eps", "velocity")
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)
    # 0-dim and fully broadcast t
    out0 = convert(pred.float(), x, torch.tensor(0.5), "condot", "x0", "eps")
    torch.testing.assert_close(out0, convert(pred.float(), x, 0.5, "condot", "x0", "eps"))
    outb = convert(pred.float(), x, t.view(3, 1, 1), "condot", "x0", "eps")
    torch.testing.assert_close(outb, convert(pred.float(), x, t, "condot", "x0", "eps"))
    with pytest.raises(ValueError, match="shape"):
        convert(pred, x, torch.rand(3, 2), "condot", "x0", "eps")


def test_convert_is_differentiable_in_pred():
    x = randn(2, 3)
    pred = randn(2, 3, seed=12).requires_grad_(True)
    convert(pred, x, 0.3, "condot", "velocity", "score").sum().backward()
    torch.testing.assert_close(pred.grad, torch.full_like(x, 0.3 / 0.7))


# ----------------------------------------------------------------------------- worked examples (seeds)

def test_worked_example_condot_four_representations():
    """CondOT, z = 5, eps = -1, t = 0.6: x = 2.6, u = 6.0, s = 2.5, eps = -1, x0 = 5 (and v = alpha eps - beta x0
    = -0.6 - 0.4 * 5 = -2.6).

    (The notes' shortcut "velocity = beta^2 score / t + x / t = 5.0" is a slip; Proposition 1
    with a_t = (1 - t)/t, b_t = 1/t gives 6.0.)"""
    p, t = CondOT(), 0.6
    x = torch.tensor([2.6], dtype=F64)
    assert p.alpha(t) * 5 + p.beta(t) * -1 == pytest.approx(2.6)
    preds = {"velocity": 6.0, "score": 2.5, "eps": -1.0, "x0": 5.0, "v": -2.6}
    for src, dst in PAIRS:
        got = convert(torch.tensor([preds[src]], dtype=F64), x, t, p, src, dst)
        assert got.item() == pytest.approx(preds[dst], rel=1e-12), (src, dst)
    a_t, b_t = (1 - t) / t, 1 / t
    assert a_t * 2.5 + b_t * 2.6 == pytest.approx(6.0)


def test_worked_example_condot_score_and_velocity():
    """z = 5, eps = -1.2, t = 0.6: x = 2.52, score = 3.0, velocity = 6.2."""
    x = torch.tensor([2.52], dtype=F64)
    z = torch.tensor([5.0], dtype=F64)
    assert convert(z, x, 0.6, "condot", "x0", "score").item() == pytest.approx(3.0)
    assert convert(z, x, 0.6, "condot", "x0", "velocity").item() == pytest.approx(6.2)


def test_worked_example_sde_step_score_from_velocity():
    """t = 0.3, x = (1.2, -0.5), u = (2.1, 1.3): score ~ (-0.82, 1.27), drift ~ (2.0, 1.46)."""
    x = torch.tensor([1.2, -0.5], dtype=F64)
    u = torch.tensor([2.1, 1.3], dtype=F64)
    s = convert(u, x, 0.3, "condot", "velocity", "score")
    torch.testing.assert_close(s, (0.3 * u - x) / 0.7)
    torch.testing.assert_close(s, torch.tensor([-0.82, 1.27], dtype=F64), atol=0.01, rtol=0)
    drift = u + 0.5 ** 2 / 2 * s  # sigma = 0.5, factor sigma^2 / 2
    torch.testing.assert_close(drift, torch.tensor([2.0, 1.46], dtype=F64), atol=0.01, rtol=0)


def test_worked_example_conditional_score():
    """alpha = 0.7, beta = 0.3 (CondOT t = 0.7), z = (3, -1), x = (2.5, 0): score = (-4.44, -7.78)."""
    x = torch.tensor([2.5, 0.0], dtype=F64)
    z = torch.tensor([3.0, -1.0], dtype=F64)
    s = convert(z, x, 0.7, "condot", "x0", "score")
    torch.testing.assert_close(s, -(x - 0.7 * z) / 0.09)
    torch.testing.assert_close(s, torch.tensor([-4.44, -7.78], dtype=F64), atol=0.005, rtol=0)


def test_worked_example_denoising_score_matching():
    """z = (4, 2), alpha = 0.7, beta = 0.3, eps = (0.5, -1.2): x = (2.95, 1.04), score = (-1.67, 4.0)."""
    p, t = CondOT(), 0.7
    z = torch.tensor([4.0, 2.0], dtype=F64)
    eps = torch.tensor([0.5, -1.2], dtype=F64)
    x = p.alpha(t) * z + p.beta(t) * eps
    torch.testing.assert_close(x, torch.tensor([2.95, 1.04], dtype=F64))
    want = torch.tensor([-5 / 3, 4.0], dtype=F64)
    torch.testing.assert_close(convert(eps, x, t, p, "eps", "score"), want)
    torch.testing.assert_close(convert(z, x, t, p, "x0", "score"), want)


def test_worked_example_ddpm_step():
    """t = 0.4, z = (3, -1), eps = (0.8, -0.5): x = (1.68, -0.7); x0 from eps recovers z."""
    p, t = CondOT(), 0.4
    z = torch.tensor([3.0, -1.0], dtype=F64)
    eps = torch.tensor([0.8, -0.5], dtype=F64)
    x = p.alpha(t) * z + p.beta(t) * eps
    torch.testing.assert_close(x, torch.tensor([1.68, -0.7], dtype=F64))
    torch.testing.assert_close(convert(eps, x, t, p, "eps", "x0"), z)


@pytest.mark.parametrize("t,score", [(0.1, -1.11), (0.5, -2.0), (0.9, -10.0), (0.99, -100.0)])
def test_worked_example_score_magnitude_table(t, score):
    """CondOT, eps = 1: score = -eps / beta_t = -1 / (1 - t)."""
    one = torch.ones(1, dtype=F64)
    got = convert(one, one, t, "condot", "eps", "score").item()
    assert got == pytest.approx(score, abs=0.005)


def test_module_exports():
    for name in fp.__all__:
        assert hasattr(fp, name)


def test_discrete_vp_knots_interpolation_and_derivatives():
    betas = torch.linspace(1e-4, 0.02, 100, dtype=torch.float64)
    abar = torch.cumprod(1 - betas, 0)
    p = DiscreteVP(abar)
    # knots: tau = T (1 - t) - 1 hits the trained alpha_bar exactly; tau = -1 (t = 1) is alpha_bar = 1
    for tau in (99, 50, 0):
        al, be = p.coefficients(p.time(tau))[:2]
        assert al == pytest.approx(abar[tau].sqrt().item(), rel=1e-12)
        assert al * al + be * be == pytest.approx(1.0, rel=1e-12)
    assert p.coefficients(1.0)[:2] == (1.0, 0.0) and p.coefficients(0.0)[0] == pytest.approx(abar[-1].sqrt().item())
    # float and tensor evaluation agree; derivatives match finite differences inside a segment
    t = torch.tensor([0.0, 0.123, 0.5, 0.987], dtype=torch.float64)
    for got, want in zip(p.coefficients(t), zip(*[p.coefficients(float(v)) for v in t])):
        torch.testing.assert_close(got, torch.tensor(want, dtype=torch.float64), rtol=1e-12, atol=1e-15)
    h, t0 = 1e-7, 0.1234
    for k in (0, 1):
        fd = (p.coefficients(t0 + h)[k] - p.coefficients(t0 - h)[k]) / (2 * h)
        assert p.coefficients(t0)[2 + k] == pytest.approx(fd, rel=1e-5)
    with pytest.raises(ValueError, match="alphas_cumprod"):
        DiscreteVP([0.5, 0.9])


def test_get_path_reads_a_built_in_paths_repr():
    """Checkpoints record a named path with other parameters by its repr; get_path reads it back."""
    for path in (VE(2.5), VP(0.2, 10.0), VPCosine(0.01), get_path("condot")):
        again = get_path(repr(path))
        assert type(again) is type(path) and repr(again) == repr(path)
    for bad in ("VE(sigma_max=oops)", "Nope(x=1)", "VE(rho=2)"):
        with pytest.raises(ValueError, match="unknown path"):
            get_path(bad)
