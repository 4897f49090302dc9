"""sampler_step's clip = [c, d] (diffusers' clip_sample fused into the step; fastdiff/ops/sampler_step.py): the
side row s is computed (with or without a side output), s_c = s clamped to [-c, c], out += d (s_c - s) with three
float32 roundings (t = s_c - s, u = d t, out + u) and side = s_c.

* the reference against a plain torch formula (its own no-clip step and the clamp written out), and the step it
  stands for (x0 clamped first, then the update from it: the two passes the adapters ran before);
* every backend here (cpu, triton under the interpreter) equal to the reference bit for bit. The base step's
  arithmetic differs between the reference (products and sums rounded apart) and the kernels (fused
  multiply-adds), so these inputs make every product of the base step exact (coefficients and weights are powers
  of two; then fma(a, b, c) = a b + c rounded once = the reference's two roundings), and the reference draws the
  backend's own normals (the kernels' Sleef / Triton normals differ from libm's in the last bits); the clip's own
  c and d are arbitrary float64 numbers (their float32 rounding is part of the check);
* errors naming clip, the op's opcheck with clip, the prepared call with clip;
* the DDIM / DDPM adapters: a clip_sample-only step is one kernel call, and equals diffusers / the two passes.
"""

import importlib
import math

import pytest
import torch

import fastdiff
from fastdiff.ops.sampler_step import KERNEL_ARGS, prepare, run_reference, sampler_step, sampler_step_reference
from sampler_step_cases import run_step

step_module = importlib.import_module("fastdiff.ops.sampler_step")

HAVE_CPU = fastdiff.backends()["cpu"].available
HAVE_TRITON = fastdiff.backends()["triton"].available
needs_cpu = pytest.mark.skipif(not HAVE_CPU, reason=f"cpu: {fastdiff.backends()['cpu'].reason}")
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
SHAPES = [(1, (1,)), (3, (7,)), (1, (33,)), (3, (4097,)), (3, (3, 11))]
# (K1, H, D, side, alias): alias = outs[0] is x and side is history[0] (the op allows exactly these)
CONFIGS = [(1, 0, 0, False, False), (1, 0, 0, True, False), (2, 1, 1, True, False), (2, 0, 1, False, False),
           (1, 1, 0, True, True), (2, 1, 1, True, True), (1, 0, 1, True, False)]
CLIP = [0.8700000000000001, -0.6180339887498949]  # c, d: not float32 numbers


def _f32(v):
    return torch.tensor(v, dtype=torch.float32).item()


def _inputs(B, shape, dtype, K1, H, D, seed=0):
    """Arguments whose base step has only exact products: powers of two for weights and coefficients."""
    g = torch.Generator().manual_seed(seed)

    def r(*size):
        return torch.randn(*size, generator=g, dtype=torch.float64)

    def pow2(count):
        e = torch.randint(-3, 2, (count,), generator=g)
        s = torch.randint(0, 2, (count,), generator=g) * 2 - 1
        return [float(si) * 2.0 ** int(ei) for si, ei in zip(s, e)]

    x = (r(B, *shape) * 4).float()  # (a side row that the clamp at 0.87 cuts in places)
    preds = [r(B, *shape).to(dtype) for _ in range(K1)]
    history = [r(B, *shape).float() for _ in range(H)]
    M = 2 + H + D
    return dict(x=x, preds=preds, history=history, weights=[1.0] + pow2(K1 - 1), coeffs=pow2(2 * M),
                seeds=torch.tensor([5, 2**63 + 1 - 2**64, 7][:B], dtype=torch.int64), streams=[3, 2**32 - 1][:D])


def _run(kernel, kw, side, alias, clip=CLIP, nout=1):
    """(outs[0], side or None) of ``kernel`` (prepared arguments) on fresh copies of the mutable inputs."""
    outs, side_t, _ = run_step(kernel, kw, nout=nout, side=side, alias=alias, clip=clip)
    for o in outs[1:]:
        assert torch.equal(o.view(torch.int32), outs[0].view(torch.int32))
    return outs[0], side_t


def _bits(got, want, what):
    same = (got.view(torch.int32) == want.view(torch.int32)) | (torch.isnan(got) & torch.isnan(want))
    if not bool(same.all()):
        i = (~same).nonzero()[0].tolist()
        raise AssertionError(f"{what}: {int((~same).sum())} of {same.numel()} elements differ; first at {i}: got "
                             f"{got[tuple(i)].item()!r}, want {want[tuple(i)].item()!r}")


def _side_row(kw):
    """The unclamped side row (the reference without clip)."""
    _, s = _run(run_reference, kw, True, False, clip=None)
    return s


# ---- the reference ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("config", CONFIGS[:4])
@pytest.mark.parametrize("dtype", DTYPES)
def test_reference_is_the_clamp_written_out(config, dtype):
    K1, H, D, side, _ = config
    kw = _inputs(3, (33,), dtype, K1, H, D)
    out0, _ = _run(run_reference, kw, False, False, clip=None)
    s = _side_row(kw)
    c, d = _f32(CLIP[0]), _f32(CLIP[1])
    assert bool((s.abs() > c).any()) and bool((s.abs() < c).any())  # the clamp acts on some elements only
    s_c = s.clamp(-c, c)
    want = out0 + d * (s_c - s)
    got, got_side = _run(run_reference, kw, side, False)
    _bits(got, want, "out")
    if side:
        _bits(got_side, s_c, "side")
    # where the clamp does not act, out is the unclipped step's bit for bit
    inside = s.abs() <= c
    assert torch.equal(got[inside], out0[inside])


def test_reference_is_the_step_from_the_clamped_x0():
    """The DDPM-shaped use: side row x0 = a x + b g, out = c_x x + d x0 + std z; with clip, out is the step from
    the clamped x0 (the two passes: x0 first, clamped, then the update with x0 as history)."""
    g = torch.Generator().manual_seed(4)
    x, eps = torch.randn(3, 50, generator=g) * 3, torch.randn(3, 50, generator=g)
    a, b, cx, d, std = 1.7, -1.3, 0.4, 0.55, 0.2
    seeds = torch.tensor([1, 2, 3])
    x0 = torch.empty_like(x)
    one = sampler_step_reference(x, [eps], coeffs=[cx + d * a, d * b, std, a, b, 0.0], seeds=seeds, streams=[4],
                                 side=x0, clip=[1.0, d])
    x0_two = sampler_step_reference(x, [eps], coeffs=[a, b, 0.0, 0.0]).clamp(-1.0, 1.0)
    two = sampler_step_reference(x, [eps], history=[x0_two], coeffs=[cx, 0.0, d, std, 0.0, 0.0, 0.0, 0.0],
                                 seeds=seeds, streams=[4])
    assert bool((x0_two.abs() == 1.0).any())
    torch.testing.assert_close(x0, x0_two, rtol=0, atol=2e-6)
    torch.testing.assert_close(one, two, rtol=1e-6, atol=1e-5)


# ---- every backend against the reference, bit for bit ---------------------------------------------------------------

def _backend_kernel(name):
    if name == "cpu":
        from fastdiff.ops.sampler_step import run_kernel

        normals = lambda seeds, stream, shape: torch.ops.fastdiff.randn(seeds, stream, list(shape), 0,  # noqa: E731
                                                                        torch.float32)
        return (lambda **call: run_kernel("cpu", **call)), normals
    from fastdiff.kernels import sampler_step as module
    from fastdiff.kernels.randn import randn

    return (lambda **call: module.sampler_step(**call)), (lambda seeds, stream, shape: randn(seeds, stream, shape))


BACKEND_PARAMS = [pytest.param("cpu", marks=needs_cpu),
                  pytest.param("triton", marks=[pytest.mark.triton, pytest.mark.skipif(
                      not HAVE_TRITON, reason=f"triton: {fastdiff.backends()['triton'].reason}")])]


@pytest.mark.parametrize("backend", BACKEND_PARAMS)
@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: "K{}H{}D{}{}{}".format(*c[:3], "s" if c[3] else "",
                                                                                  "a" if c[4] else ""))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("B,shape", SHAPES, ids=lambda v: str(v))
def test_backend_equals_reference(monkeypatch, backend, config, dtype, B, shape):
    K1, H, D, side, alias = config
    if alias and H == 0:
        pytest.skip("alias needs a history buffer")
    kernel, normals = _backend_kernel(backend)
    # the reference with the backend's own normals (see the module docstring)
    monkeypatch.setattr(step_module, "randn_reference",
                        lambda seeds, stream, shape, device=None, dtype=None: normals(seeds, stream, shape))
    kw = _inputs(B, shape, dtype, K1, H, D, seed=B * 100 + len(shape))
    nout = 1 if alias else 2
    want, want_side = _run(run_reference, kw, side, alias, nout=nout)
    got, got_side = _run(kernel, kw, side, alias, nout=nout)
    _bits(got, want, f"{backend} out")
    if side:
        _bits(got_side, want_side, f"{backend} side")
    if math.prod(shape) * B >= 33:
        s = _side_row(kw)
        c = _f32(CLIP[0])
        assert bool((s.abs() > c).any()) and bool((s.abs() < c).any())  # the clamp acts on some elements only


@pytest.mark.parametrize("backend", BACKEND_PARAMS)
def test_backend_nan_and_inf_in_the_side_row(backend):
    kernel, _ = _backend_kernel(backend)
    kw = _inputs(2, (9,), torch.float32, 1, 0, 0)
    kw["x"][0, :3] = torch.tensor([math.nan, math.inf, -math.inf])
    want, want_side = _run(run_reference, kw, True, False)
    got, got_side = _run(kernel, kw, True, False)
    _bits(got, want, f"{backend} out")
    _bits(got_side, want_side, f"{backend} side")
    assert torch.isnan(got_side[0, 0]) and got_side[0, 1].abs() == _f32(CLIP[0])


# ---- errors, opcheck, the prepared call ------------------------------------------------------------------------------

def _small():
    x = torch.randn(2, 5)
    return x, [torch.randn(2, 5)], [1.0, 0.5, 0.25, 1.0]


@pytest.mark.parametrize("clip,error,match", [
    ([1.0], ValueError, r"clip must hold 2"), ([1.0, 2.0, 3.0], ValueError, r"clip must hold 2"),
    ([0.0, 1.0], ValueError, r"clip\[0\]"), ([-1.0, 1.0], ValueError, r"clip\[0\]"),
    ([1e-50, 1.0], ValueError, r"clip\[0\]"), ([math.inf, 1.0], ValueError, r"clip\[0\]"),
    ([math.nan, 1.0], ValueError, r"clip\[0\]"), ([1.0, math.nan], ValueError, r"clip\[1\]"),
    ([1.0, 1e300], ValueError, r"clip\[1\]"), ("ab", TypeError, r"clip"), (1.0, TypeError, r"clip"),
    ([1.0, "d"], TypeError, r"clip\[1\]")])
def test_errors_name_clip(clip, error, match):
    x, preds, coeffs = _small()
    with pytest.raises(error, match=match):
        sampler_step(x, preds, coeffs=coeffs, clip=clip, backend="reference")


def test_clip_refused_with_per_sample_rows():
    x, preds, _ = _small()
    with pytest.raises(ValueError, match=r"clip is not supported with per-sample"):
        sampler_step(x, preds, coeffs=torch.ones(2, 4), clip=[1.0, 1.0], backend="reference")


@needs_cpu
@pytest.mark.parametrize("clip,match", [([1.0], r"clip must hold 2"), ([0.0, 1.0], r"clip\[0\]"),
                                        ([math.inf, 1.0], r"clip\[0\]"), ([1.0, math.inf], r"clip\[1\]"),
                                        ([1e-50, 1.0], r"clip\[0\]")])
def test_op_errors_name_clip(clip, match):
    x, preds, coeffs = _small()
    with pytest.raises(RuntimeError, match=match):
        torch.ops.fastdiff.sampler_step(x, preds, [], torch.zeros(2, dtype=torch.int64), [], [1.0], coeffs, None, None,
                                        [torch.empty_like(x)], None, None, clip)


@needs_cpu
def test_op_refuses_clip_with_per_sample_rows():
    x, preds, coeffs = _small()
    with pytest.raises(RuntimeError, match=r"clip is not supported with per-sample"):
        torch.ops.fastdiff.sampler_step(x, preds, [], torch.zeros(2, dtype=torch.int64), [], [1.0], coeffs, None,
                                        torch.ones(2, 4), [torch.empty_like(x)], None, None, [1.0, 1.0])


@needs_cpu
@pytest.mark.parametrize("side", [False, True])
def test_opcheck_with_clip(side):
    g = torch.Generator().manual_seed(0)
    x, p, h = (torch.randn(3, 2, 5, generator=g) * 2 for _ in range(3))
    args = (x, [torch.randn_like(p), p], [h], torch.tensor([4, 5, 6]), [4], [1.0, 2.0],
            [0.9, 0.1, 0.2, 0.3, 1.0, 0.5, 0.25, 0.0], None, None, [torch.empty_like(x)],
            torch.empty_like(x) if side else None, None, [0.5, 0.7])
    torch.library.opcheck(torch.ops.fastdiff.sampler_step.default, args)


@pytest.mark.parametrize("backend", [pytest.param("cpu", marks=needs_cpu), "reference"])
@pytest.mark.parametrize("native", [True, False])
def test_prepared_call_with_clip(backend, native):
    from fastdiff.ops.step_call import replaced, step_call

    kw = _inputs(3, (33,), torch.float32, 2, 1, 1)
    x, side = kw["x"].clone(), torch.empty_like(kw["x"])
    out = torch.empty_like(x)
    call = prepare(x, kw["preds"], kw["weights"], kw["history"], kw["coeffs"], kw["seeds"], kw["streams"], [out],
                   side, None, CLIP)
    args = tuple(call[k] for k in KERNEL_ARGS)
    want_out, want_side = torch.empty_like(x), torch.empty_like(x)
    run_reference(**dict(call, outs=[want_out], side=want_side))  # the same normals for the reference backend only
    prepared = step_call(backend, args, None, native)
    prepared(kw["preds"])
    direct = torch.empty_like(x), torch.empty_like(x)
    step_module.run_kernel(backend, **dict(call, outs=[direct[0]], side=direct[1]))
    assert torch.equal(out, direct[0]) and torch.equal(side, direct[1])
    if backend == "reference":
        assert torch.equal(out, want_out) and torch.equal(side, want_side)
    # without clip (replaced): the unclipped step
    plain = replaced(prepared, clip=None)
    plain(kw["preds"])
    step_module.run_kernel(backend, **dict(call, outs=[direct[0]], side=direct[1], clip=None))
    assert torch.equal(out, direct[0]) and torch.equal(side, direct[1])
    assert not torch.equal(out, want_out)


# ---- the DDIM / DDPM adapters: clip_sample alone is one kernel call --------------------------------------------------

diffusers = pytest.importorskip("diffusers")


def _count_kernel_calls(monkeypatch):
    """Counts the step kernel's calls of the adapters (the direct call and the general path)."""
    from fastdiff.adapters.diffusers import _fused

    calls = []
    direct = _fused.direct_kernel

    def counting_direct(name, op):
        kernel = direct(name, op)

        def run(*args):
            calls.append(len(args))
            return kernel(*args)

        return run

    general = _fused.sampler_step

    def counting_general(*args, **kwargs):
        calls.append("general")
        return general(*args, **kwargs)

    monkeypatch.setattr(_fused, "direct_kernel", counting_direct)
    monkeypatch.setattr(_fused, "sampler_step", counting_general)
    return calls


def _two_pass(monkeypatch):
    """The adapters without the kernel's clip: x0 first, clamped, then the step (the path before it)."""
    from fastdiff.adapters.diffusers import ddim, ddpm

    monkeypatch.setattr(ddim, "clip_of", lambda config, d: None)
    monkeypatch.setattr(ddpm, "clip_of", lambda config, d: None)


def _lerobot_ddpm():
    from fastdiff.adapters.diffusers import FastDiffDDPMScheduler

    return FastDiffDDPMScheduler(num_train_timesteps=100, beta_schedule="squaredcos_cap_v2", clip_sample=True)


def _steps(sched, x, model, **kw):
    """(prev, x0) of every step of a fresh 10-step schedule, each from the same x (a loop would let the chaos of the
    toy model amplify float32 roundings across steps)."""
    sched.set_timesteps(10)
    return [(r.prev_sample, r.pred_original_sample) for r in (sched.step(model(x, t), t, x, **kw)
                                                                for t in sched.timesteps)]


def _model(x, t):
    return torch.sin(3.0 * x + 0.01 * float(t)) * 1.5


def _assert_steps(got, want, atol, x0_atol=1e-6):
    """prev within atol (the clip's out += d (x0c - x0) rounds on the scale of d x0, x0 the unclamped estimate:
    up to ~1e2 at the schedule's noisy end), x0 within x0_atol (diffusers computes x0 in another order)."""
    for (p, x0), (q, y0) in zip(got, want):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=atol)
        torch.testing.assert_close(x0, y0, rtol=1e-5, atol=x0_atol)


def test_ddpm_clip_sample_is_one_kernel_call(monkeypatch):
    sched = _lerobot_ddpm()
    x = torch.randn(2, 16, 2, generator=torch.Generator().manual_seed(1))
    calls = _count_kernel_calls(monkeypatch)
    sched.set_timesteps(100)
    res = sched.step(_model(x, 50), sched.timesteps[3], x)
    assert calls == [13]  # one direct call, with the clip argument
    assert res.pred_original_sample.abs().max() <= 1.0


def test_ddpm_clip_sample_equals_the_two_passes(monkeypatch):
    x = torch.randn(2, 16, 2, generator=torch.Generator().manual_seed(1)) * 2
    one = _lerobot_ddpm()
    one.set_seeds([3, 4])
    got = _steps(one, x, _model)
    _two_pass(monkeypatch)
    calls = _count_kernel_calls(monkeypatch)
    two = _lerobot_ddpm()
    two.set_seeds([3, 4])
    want = _steps(two, x, _model)
    assert len(calls) == 20  # the two passes
    assert all(bool((y0.abs() == 1.0).any()) for _, y0 in want)  # the clamp acted
    for (_, x0), (_, y0) in zip(got, want):
        assert torch.equal(x0, y0)  # x0: the same side row, clamped
    _assert_steps(got, want, 3e-5)


@pytest.mark.parametrize("use_clipped_model_output", [False, True])
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_ddim_clip_sample_is_one_kernel_call_and_diffusers(monkeypatch, use_clipped_model_output, prediction_type):
    from diffusers import DDIMScheduler

    from fastdiff.adapters.diffusers import FastDiffDDIMScheduler

    config = dict(prediction_type=prediction_type, clip_sample=True, clip_sample_range=1.0)
    x = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(5)) * 2
    calls = _count_kernel_calls(monkeypatch)
    got = _steps(FastDiffDDIMScheduler(**config), x, _model, use_clipped_model_output=use_clipped_model_output)
    assert calls == [13] * 10, calls  # one kernel call per step
    monkeypatch.undo()
    want = _steps(DDIMScheduler(**config), x, _model, use_clipped_model_output=use_clipped_model_output)
    assert any(bool((y0.abs() == 1.0).any()) for _, y0 in want)  # the clamp acted
    _assert_steps(got, want, 1e-4, 1e-4)


@pytest.mark.parametrize("use_clipped_model_output", [False, True])
def test_ddim_eta_clip_sample_equals_the_two_passes(monkeypatch, use_clipped_model_output):
    from fastdiff.adapters.diffusers import FastDiffDDIMScheduler

    x = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(6)) * 2

    def steps():
        sched = FastDiffDDIMScheduler(clip_sample=True)
        sched.set_seeds([7, 8])
        return _steps(sched, x, _model, eta=0.5, use_clipped_model_output=use_clipped_model_output)

    got = steps()
    _two_pass(monkeypatch)
    want = steps()
    _assert_steps(got, want, 1e-4)
