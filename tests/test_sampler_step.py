"""The general fused sampler step fastdiff.ops.sampler_step: the CPU kernel (fastdiff::sampler_step)
against its specification sampler_step_reference, and the reference itself.

Three results are compared for each call:

* the reference (sampler_step_reference): float32 products and sums, each rounded;
* the CPU kernel;
* an exact float32 model of the kernel's arithmetic (csrc/include/fastdiff/sampler_step.h: every
  accumulation one fused multiply-add), with the fma emulated in float64 and rounded to odd before the
  final rounding to float32, which makes it exact (a plain float64 sum rounded to float32 can round
  twice; test_fma_model_is_exact shows such a case). Its normals come from the fastdiff::randn op at
  the same SIMD level.

At the FMA levels (avx2, avx512) the kernel equals the model bit for bit, with or without noise; it
differs from the reference by the fma's single rounding, a few ulps of the terms' magnitude
(_bound). With noise the reference's normals (pure PyTorch, libm) differ from the kernel's (Sleef)
in the last bits too: 1e-5 on top. The portable level on x86-64 (no FMA in the baseline
instruction set) rounds a * b + c twice (ATen's portable at::vec::fmadd), so it equals the reference
there, not the model (test_portable_level_rounds_like_the_reference).
"""

import functools
import math
import re

import pytest
import torch

import fastdiff
from fastdiff import ops
from fastdiff.ops.guided_step import stage_coefficients
from fastdiff.ops.sampler_step import (MAX_BRANCHES, MAX_DRAWS, MAX_HISTORY, MAX_OUTS, run_kernel,
                                       run_reference, sampler_step, sampler_step_reference)
from sampler_step_cases import FMA_A, FMA_B, FUSED, SEEDS, STREAMS, fma32, run_model as _run_model
from sampler_step_cases import is_noisy as _noisy, run_step as _run, step_inputs as _inputs

HAVE_CPU = fastdiff.backends()["cpu"].available
needs_cpu = pytest.mark.skipif(not HAVE_CPU, reason=f"cpu: {fastdiff.backends()['cpu'].reason}")

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
LEVELS = ("portable", "avx2", "avx512")
FMA_LEVELS = ("avx2", "avx512")
U32 = 2.0**-24  # float32 unit roundoff
BOUND_ULPS = 2  # _bound: this many roundings of the magnitude per term


# ---- inputs and runs ----------------------------------------------------------------------------------




def _cpu(**call):
    with torch.no_grad():
        run_kernel("cpu", **call)



# ---- the exact float32 model of the kernel ------------------------------------------------------------



def fma32_naive(a, b, c):
    """a * b + c in float64 rounded to float32: two roundings (wrong in rare cases)."""
    return (a.double() * b.double() + c.double()).float()


def run_model(fma=fma32, **call):
    """The kernel's arithmetic on prepared arguments (sampler_step_cases.run_model); the normals are the
    fastdiff::randn op's (the kernel's own noise)."""
    return _run_model(**call, fma=fma, normals=lambda seeds, s, shape: torch.ops.fastdiff.randn(
        seeds, s, list(shape), 0, torch.float32))


def _bound(kw, row):
    """A few float32 ulps of the magnitude of row ``row``'s terms (float64, per element): how far the
    kernel's single-rounding fmas may be from the reference's separate roundings."""
    x, preds, history = kw["x"].double(), [q.double() for q in kw["preds"]], [h.double() for h in kw["history"]]
    B, nd = x.shape[0], x.dim()
    K1, H, D = len(preds), len(history), len(kw["streams"])
    M = 2 + H + D

    def col(values, j):
        if isinstance(values, torch.Tensor):
            return values[:, j].double().abs().reshape((B,) + (1,) * (nd - 1))
        return abs(values[j])

    w, c = kw["weights"], kw["coeffs"]
    g = col(w, 0) * preds[0].abs()
    for k in range(1, K1):
        g = g + col(w, k) * (preds[k].abs() + preds[0].abs())
    mag = col(c, row * M) * x.abs() + col(c, row * M + 1) * g
    for j in range(H):
        mag = mag + col(c, row * M + 2 + j) * history[j].abs()
    for d in range(D):
        mag = mag + col(c, row * M + 2 + H + d) * 6.0  # |z| < 6
    return BOUND_ULPS * (K1 + H + D + 2) * U32 * mag


def _ulps(a, b):
    """|a - b| in float32 ulps (units in the last place, over the ordered bit patterns)."""
    def ordered(t):
        i = t.contiguous().view(torch.int32).long()
        return torch.where(i < 0, -(i & 0x7FFFFFFF), i)

    return (ordered(a) - ordered(b)).abs()


def _assert_within(got, want, bound, what):
    """got == want (inf and NaN where the other has them) or |got - want| <= bound, element by element."""
    same = (got == want) | (torch.isnan(got) & torch.isnan(want))
    ok = same | ((got.double() - want.double()).abs() <= bound)
    if not bool(ok.all()):
        i = (~ok).nonzero()[0].tolist()
        b = bound[tuple(i)].item() if isinstance(bound, torch.Tensor) and bound.dim() else float(bound)
        raise AssertionError(f"{what}: {int((~ok).sum())} of {ok.numel()} elements differ; first at {i}: got "
                             f"{got[tuple(i)].item()!r}, want {want[tuple(i)].item()!r}, bound {b:.3g}")


def _assert_bits(got, want, what):
    """Bit for bit (any NaN equals any NaN)."""
    same = (got.view(torch.int32) == want.view(torch.int32)) | (torch.isnan(got) & torch.isnan(want))
    if not bool(same.all()):
        i = (~same).nonzero()[0].tolist()
        raise AssertionError(f"{what}: {int((~same).sum())} of {same.numel()} elements differ (max "
                             f"{int(_ulps(got, want)[~same].max())} ulps); first at {i}: got "
                             f"{got[tuple(i)].item()!r}, want {want[tuple(i)].item()!r}")


def _level():
    return torch.ops.fastdiff.cpu_simd()


def _check(kw, *, nout=1, side=False, finite=None, alias=False):
    """The CPU kernel against the reference (within _bound, + 1e-5 with noise) and against the exact
    model (bit for bit at the FMA levels, within _bound at the portable one); returns the kernel's
    (outs, side, finite)."""
    opts = dict(nout=nout, side=side, finite=finite, alias=alias)
    want = _run(run_reference, kw, **opts)
    got = _run(_cpu, kw, **opts)
    model = _run(run_model, kw, **opts)
    noise_tol = 1e-5 if _noisy(kw) else 0.0
    exact = _level() in FMA_LEVELS
    for i, o in enumerate(got[0]):
        assert torch.equal(o.view(torch.int32), got[0][0].view(torch.int32)), f"outs[{i}] differs from outs[0]"
    results = [("out", got[0][0], want[0][0], model[0][0], 0)]
    if side:
        results.append(("side", got[1], want[1], model[1], 1))
    for name, g, w, m, row in results:
        bound = _bound(kw, row)
        _assert_within(g, w, bound + noise_tol, f"{name} vs reference")
        if exact:
            _assert_bits(g, m, f"{name} vs the fma model ({_level()})")
        else:
            _assert_within(g, m, bound, f"{name} vs the fma model ({_level()})")
    if finite is not None:
        assert torch.equal(got[2], want[2]) and torch.equal(got[2], model[2])
    return got, want


# ---- parity: the CPU kernel against the reference and the model ----------------------------------------

# (K1, H, D, nout, side): fixed-shape paths (K1 <= 2, H <= 1, D <= 1) and runtime-shape ones, the
# largest counts once (K1 = 8, H = 4, D = 4, 8 outs)
CONFIGS = [(1, 0, 0, 1, False), (2, 0, 0, 1, False), (2, 1, 1, 2, True), (2, 1, 0, 1, True), (1, 1, 1, 1, True),
           (3, 2, 2, 3, True), (4, 3, 1, 1, False), (1, 3, 2, 2, True), (4, 0, 2, 8, True), (5, 4, 0, 2, True),
           (8, 2, 4, 3, True), (6, 0, 1, 1, False), (7, 1, 2, 1, True)]
SHAPES = [(1,), (3,), (5,), (67,), (129,), (1000,), (2, 3, 5, 7)]


def _config_id(c):
    return "K{}H{}D{}o{}{}".format(*c[:4], "s" if c[4] else "")


@needs_cpu
@pytest.mark.parametrize("config", CONFIGS, ids=_config_id)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_host_coefficients(dtype, shape, config):
    K1, H, D, nout, side = config
    B = 1 + (math.prod(shape) + K1 + H) % 3
    kw = _inputs(B, shape, dtype, K1, H, D, seed=7 * math.prod(shape) + K1, w0=1.0 if K1 % 2 else 0.75)
    _check(kw, nout=nout, side=side)


@needs_cpu
@pytest.mark.parametrize("K1", [1, 2, 3, 4])
@pytest.mark.parametrize("H", [0, 1, 2, 3, 4])
@pytest.mark.parametrize("D", [0, 1, 2])
def test_counts(K1, H, D):
    """Every (K1, H, D) of K1 <= 4, H <= 4, D <= 2 on a multi-dimensional sample (105 elements), B = 1..3,
    1..3 outs, side on and off, each prediction dtype."""
    i = 16 * K1 + 4 * H + D
    kw = _inputs(1 + i % 3, (3, 5, 7), DTYPES[i % 3], K1, H, D, seed=100 + i)
    _check(kw, nout=1 + i % 3, side=i % 2 == 0)


@needs_cpu
@pytest.mark.parametrize("per", ["weights", "coeffs", "both"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("config", [(2, 1, 1), (3, 2, 2), (1, 0, 1), (5, 1, 4)], ids=lambda c: "K{}H{}D{}".format(*c))
@pytest.mark.parametrize("B,n", [(1, 5), (2, 67), (3, 1000)])
def test_per_sample_rows(B, n, config, dtype, per):
    """Rows [B, K1] / [B, 2M] per sample; some samples' noise coefficients are zero (out, side or both)."""
    K1, H, D = config
    if per == "weights":
        zero = [(1, None, D - 1)]
    else:
        zero = [(0, 0, 0), (1, 0, 0), (0, B - 1, D - 1), (1, 0, D - 1)]
    kw = _inputs(B, (n,), dtype, K1, H, D, per_w=per != "coeffs", per_c=per != "weights", zero_noise=zero, seed=B * n)
    _check(kw, nout=2, side=True)
    _check(kw, nout=1, side=False)


@needs_cpu
def test_per_sample_zero_noise_is_noiseless():
    """Per-sample rows with every noise coefficient zero: no noise, and within _bound of the reference
    (the noise tolerance is not used)."""
    B, H, D = 3, 1, 2
    zero = [(row, b, d) for row in (0, 1) for b in range(B) for d in range(D)]
    kw = _inputs(B, (37,), torch.float32, 2, H, D, per_c=True, zero_noise=zero, seed=4)
    assert not _noisy(kw)
    # the same call without the draws gives the same bits
    got, _ = _check(kw, nout=1, side=True)
    M = 2 + H + D
    keep = [j for j in range(2 * M) if j % M < 2 + H]
    kw2 = dict(kw, coeffs=kw["coeffs"][:, keep].contiguous(), streams=[])
    got2, _ = _check(kw2, nout=1, side=True)
    assert torch.equal(got[0][0], got2[0][0]) and torch.equal(got[1], got2[1])


@needs_cpu
def test_host_zero_noise_rows():
    """Host rows where a draw feeds only out, only side, or nothing."""
    for zero in ([(1, None, 0)], [(0, None, 0)], [(0, None, 0), (1, None, 0)], [(0, None, 1), (1, None, 0)]):
        kw = _inputs(2, (67,), torch.float32, 2, 1, 2, zero_noise=zero, seed=len(zero))
        _check(kw, nout=2, side=True)
        _check(kw, nout=1, side=False)


@needs_cpu
def test_noise_is_the_stream():
    """c_x = c_g = 0, c_z[d] = 1: out is exactly the spec-v1 noise of (seed, streams[d]) (the
    fastdiff::randn op's bits, the reference's within 1e-5)."""
    from fastdiff.ops.randn import randn_reference

    x = torch.zeros(3, 4, 33)
    seeds = torch.tensor(SEEDS[:3])
    for d, stream in enumerate(STREAMS[:2]):
        coeffs = [0.0] * 8
        coeffs[2 + d] = 1.0
        out = torch.empty_like(x)
        with torch.no_grad():
            sampler_step(x, [x], history=[], coeffs=coeffs, seeds=seeds, streams=STREAMS[:2], outs=[out],
                         backend="cpu")
        assert torch.equal(out, torch.ops.fastdiff.randn(seeds, stream, [4, 33], 0, torch.float32))
        torch.testing.assert_close(out, randn_reference(seeds, stream, (4, 33)), atol=1e-5, rtol=0)


@needs_cpu
@pytest.mark.filterwarnings("ignore:invalid value")
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("per_c", [False, True])
@pytest.mark.parametrize("K1", [1, 3])
def test_finite_flags(dtype, per_c, K1):
    """finite[b] = 0 where a p_k of sample b holds inf or NaN; set to 0 only, never to 1 (other values
    stay); inf in x or history does not count."""
    B, n = 4, 1000
    kw = _inputs(B, (n,), dtype, K1, 1, 1, per_c=per_c, seed=9)
    kw["preds"][0][1, 999] = float("inf")  # sample 1: the last element (the partial last block)
    kw["preds"][K1 - 1][2, 0] = float("nan")  # sample 2: another branch, the first element
    kw["preds"][K1 // 2][2, 500] = float("-inf")
    kw["x"][3, 10] = float("inf")  # sample 3: not a prediction
    kw["history"][0][0, 20] = float("nan")
    finite = torch.tensor([1, 1, 1, 1], dtype=torch.int32)
    got, _ = _check(kw, nout=2, side=True, finite=finite)
    assert got[2].tolist() == [1, 0, 0, 1]
    finite = torch.tensor([0, 1, 7, 7], dtype=torch.int32)  # a 0 stays 0, a 7 of a finite sample stays 7
    got, _ = _check(kw, nout=1, side=False, finite=finite)
    assert got[2].tolist() == [0, 0, 0, 7]
    kw = _inputs(B, (n,), dtype, K1, 0, 0, seed=10)  # all finite: nothing written
    finite = torch.tensor([1, 0, 1, 5], dtype=torch.int32)
    got, _ = _check(kw, finite=finite)
    assert got[2].tolist() == [1, 0, 1, 5]


@pytest.fixture
def four_threads():
    old = torch.get_num_threads()
    torch.set_num_threads(4)
    yield
    torch.set_num_threads(old)


@needs_cpu
@pytest.mark.filterwarnings("ignore:invalid value")
@pytest.mark.parametrize("noise", [False, True])
def test_large_split_over_tasks(four_threads, noise):
    """Samples larger than a parallel_for task (tasks start and end inside samples): values, and the
    finite flags of a bad value in the first, middle and last block of a sample."""
    B, n = 3, 3 * (1 << 14) + 77
    D = 1 if noise else 0
    kw = _inputs(B, (n,), torch.bfloat16, 2, 1, D, per_w=True, seed=21)
    kw["preds"][1][0, n - 1] = float("inf")
    kw["preds"][0][1, n // 2] = float("nan")
    kw["preds"][1][2, 0] = float("-inf")
    finite = torch.ones(B, dtype=torch.int32)
    got, _ = _check(kw, nout=2, side=True, finite=finite)
    assert got[2].tolist() == [0, 0, 0]
    for b, i in [(0, 1), (1, n // 3), (1, 2 * n // 3), (2, n - 1)]:
        kw = _inputs(B, (n,), torch.float32, 2, 1, D, seed=22)
        kw["preds"][b % 2][b, i] = float("nan")
        got, _ = _check(kw, nout=1, side=False, finite=finite)
        assert got[2].tolist() == [int(j != b) for j in range(B)], (b, i)


@needs_cpu
@pytest.mark.parametrize("D", [0, 1, 2])
@pytest.mark.parametrize("per_c", [False, True])
@pytest.mark.parametrize("shape", [(101,), (256,), (3, 43)], ids=lambda s: "x".join(map(str, s)))
def test_aliasing(shape, per_c, D):
    """outs[0] is x and side is history[0]: every input is read before it is written (full and partial
    blocks)."""
    kw = _inputs(2, shape, torch.float32, 2, 2, D, per_c=per_c, seed=11)
    _check(kw, nout=3, side=True, alias=True)
    _check(kw, nout=1, side=True, alias=True)


@needs_cpu
@pytest.mark.parametrize("n", [100, 256])
def test_output_may_be_a_float32_prediction(n):
    """outs[0] may be exactly preds[1] (float32), and side exactly x."""
    kw = _inputs(2, (n,), torch.float32, 2, 1, 1, seed=12)
    want, want_side = torch.empty_like(kw["x"]), torch.empty_like(kw["x"])
    sampler_step_reference(kw["x"], kw["preds"], weights=kw["weights"], history=kw["history"], coeffs=kw["coeffs"],
                           seeds=kw["seeds"], streams=kw["streams"], outs=[want], side=want_side)
    x, preds = kw["x"].clone(), [p.clone() for p in kw["preds"]]
    with torch.no_grad():
        got = sampler_step(x, preds, weights=kw["weights"], history=kw["history"], coeffs=kw["coeffs"],
                           seeds=kw["seeds"], streams=kw["streams"], outs=[preds[1]], side=x, backend="cpu")
    assert got is preds[1]
    _assert_within(preds[1], want, _bound(kw, 0) + 1e-5, "out = preds[1]")
    _assert_within(x, want_side, _bound(kw, 1) + 1e-5, "side = x")


# ---- the model, and fused means fused ------------------------------------------------------------------

# a * b + c with a * b = 2^-24 (1 + 2^-36): the exact sum 1 + 2^-24 + 2^-60 is just above the float32
# tie 1 + 2^-24; fused it rounds up to 1 + 2^-23, a float64 sum rounds to the tie and then to 1.0.


def test_fma_model_is_exact():
    a, b, c = (torch.tensor([v], dtype=torch.float32) for v in (FMA_A, FMA_B, 1.0))
    assert a.item() == FMA_A and b.item() == FMA_B  # float32 numbers
    assert fma32(a, b, c).item() == FUSED
    assert (a * b + c).item() == 1.0  # a rounded product, as the reference
    assert fma32_naive(a, b, c).item() == 1.0
    # on random inputs the two agree almost always (double rounding needs a float64 sum on a float32 tie)
    g = torch.Generator().manual_seed(0)
    a, b, c = (torch.randn(1 << 16, generator=g) * 4 for _ in range(3))
    exact, naive = fma32(a, b, c), fma32_naive(a, b, c)
    assert (exact == naive).float().mean() > 0.999
    # and fma32 is within half an ulp of the exact value (float64 sum error is far below a float32 ulp)
    assert (_ulps(exact, (a.double() * b.double() + c.double()).float()) <= 1).all()


def _fma_witness():
    """x = 1 and c_x = 1, c_g = FMA_A, p0 = FMA_B: the fused out = fma(FMA_A, FMA_B, 1 * 1) = 1 + 2^-23; a
    separately rounded product and sum (the reference) give 1.0."""
    x = torch.ones(1, 3)
    p = torch.full((1, 3), FMA_B)
    out = torch.empty_like(x)
    with torch.no_grad():
        sampler_step(x, [p], coeffs=[1.0, FMA_A, 0.0, 0.0], outs=[out], backend="cpu")
    return out, sampler_step_reference(x, [p], coeffs=[1.0, FMA_A, 0.0, 0.0])


def _at_level(monkeypatch, level):
    monkeypatch.setenv("FASTDIFF_CPU_SIMD", level)
    if torch.ops.fastdiff.cpu_simd() != level:
        pytest.skip(f"{level} is not supported by this CPU or build")


@needs_cpu
@pytest.mark.parametrize("level", FMA_LEVELS)
def test_fma_levels_are_fused(monkeypatch, level):
    _at_level(monkeypatch, level)
    out, ref = _fma_witness()
    assert (out == 1.0 + 2.0**-23).all()
    assert (ref == 1.0).all()


@needs_cpu
def test_portable_level_rounds_like_the_reference(monkeypatch):
    """The portable build targets the x86-64 baseline, which has no FMA instruction: there ATen's
    at::vec::fmadd is a * b + c, rounded twice, as the reference and as the kernels before sampler_step
    (the step's results at every level are unchanged by this op)."""
    import platform

    if platform.machine() not in ("x86_64", "AMD64"):
        pytest.skip("the portable level fuses where the baseline instruction set has FMA")
    _at_level(monkeypatch, "portable")
    out, ref = _fma_witness()
    assert (out == 1.0).all() and (ref == 1.0).all()


# ---- SIMD levels ---------------------------------------------------------------------------------------

LEVEL_CASES = [  # (B, shape, dtype, K1, H, D, per)
    (3, (37,), torch.float32, 2, 1, 1, False),
    (2, (200,), torch.float16, 3, 2, 2, True),
    (3, (4099,), torch.bfloat16, 1, 0, 1, False),
    (1, (3, 5, 7), torch.float32, 5, 4, 4, True),
    (2, (128,), torch.float16, 2, 0, 0, False),
]


@needs_cpu
@pytest.mark.parametrize("case", LEVEL_CASES, ids=lambda c: f"B{c[0]}n{math.prod(c[1])}-{c[2]}-K{c[3]}H{c[4]}D{c[5]}")
def test_levels_agree(monkeypatch, case):
    """avx2 and avx512 give the same bits (blocks of 64 and 128 elements); the portable level is within
    _bound (+ 1e-5 with noise) of them; every level passes _check at its own level."""
    B, shape, dtype, K1, H, D, per = case
    kw = _inputs(B, shape, dtype, K1, H, D, per_w=per, per_c=per, zero_noise=[(0, 0, 0)] if per and D else (),
                 seed=B + K1)
    finite = torch.ones(B, dtype=torch.int32)
    runs = {}
    for level in LEVELS:
        monkeypatch.setenv("FASTDIFF_CPU_SIMD", level)
        if torch.ops.fastdiff.cpu_simd() == level:
            got, _ = _check(kw, nout=2, side=True, finite=finite)
            runs[level] = got
    monkeypatch.delenv("FASTDIFF_CPU_SIMD")
    assert "portable" in runs
    if "avx2" in runs and "avx512" in runs:
        for a, b in ((runs["avx2"][0][0], runs["avx512"][0][0]), (runs["avx2"][1], runs["avx512"][1])):
            _assert_bits(a, b, "avx2 vs avx512")
    best = runs.get("avx512", runs.get("avx2"))
    if best is not None:
        tol = 1e-5 if _noisy(kw) else 0.0
        _assert_within(runs["portable"][0][0], best[0][0], _bound(kw, 0) + tol, "portable vs SIMD out")
        _assert_within(runs["portable"][1], best[1], _bound(kw, 1) + tol, "portable vs SIMD side")


# ---- guided_step is its two-branch form ----------------------------------------------------------------


@needs_cpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("uncond,extra,noise,side", [(True, True, True, True), (True, False, False, False),
                                                      (True, True, False, True), (False, True, True, False),
                                                      (False, False, False, True)])
def test_guided_step_is_the_two_branch_step(dtype, uncond, extra, noise, side):
    """K1 = 2 with w = (1, cfg), history [extra], one draw when c_noise != 0: guided_step's bits."""
    B, n = 3, 131
    kw = _inputs(B, (n,), dtype, 2, 1, 0, seed=13)
    x, (pu, pc), e = kw["x"], kw["preds"], kw["history"][0]
    k = dict(cfg=4.3, c_x=0.97, c_pred=-0.031, c_extra=0.25 if extra else 0.0, c_noise=0.13 if noise else 0.0,
             s_x=1.5, s_pred=0.7, s_extra=-0.5 if extra else 0.0)
    seeds = kw["seeds"]
    want_side = torch.empty_like(x) if side else None
    want = ops.guided_step(x, pc, pu if uncond else None, extra=e if extra else None, seeds=seeds, stream=17,
                           side=want_side, backend="cpu", **k)
    got_side = torch.empty_like(x) if side else None
    with torch.no_grad():
        got = sampler_step(x, [pu, pc] if uncond else [pc], weights=[1.0, k["cfg"]] if uncond else [1.0],
                           history=[e] if extra else [], coeffs=stage_coefficients(k, extra), seeds=seeds,
                           streams=[17] if noise else [], side=got_side, backend="cpu")
    assert torch.equal(got, want)
    if side:
        assert torch.equal(got_side, want_side)
    # the differentiable form (autograd.Function over the same kernel) gives the same bits
    if not side:
        p = pc.clone().requires_grad_()
        out = ops.guided_step(x, p, pu if uncond else None, extra=e if extra else None, seeds=seeds, stream=17,
                              backend="cpu", **k)
        assert out.requires_grad and torch.equal(out.detach(), want)
    # and the references are one
    ref = ops.guided_step_reference(x, pc, pu if uncond else None, extra=e if extra else None, seeds=seeds, stream=17,
                                    **k)
    ref2 = sampler_step_reference(x, [pu, pc] if uncond else [pc], weights=[1.0, k["cfg"]] if uncond else [1.0],
                                  history=[e] if extra else [], coeffs=stage_coefficients(k, extra), seeds=seeds,
                                  streams=[17] if noise else [])
    assert torch.equal(ref, ref2)


# ---- opcheck -------------------------------------------------------------------------------------------


def _op_args(B=2, n=13, dtype=torch.float32, K1=2, H=1, D=1, per=False, side=True, finite=True, nout=1, seed=3):
    kw = _inputs(B, (n,), dtype, K1, H, D, per_w=per, per_c=per, seed=seed)
    x = kw["x"]
    weights = [0.0] * K1 if per else kw["weights"]
    coeffs = [0.0] * (2 * (2 + H + D)) if per else kw["coeffs"]
    return (x, kw["preds"], kw["history"], kw["seeds"], kw["streams"], weights, coeffs,
            kw["weights"] if per else None, kw["coeffs"] if per else None,
            [torch.empty_like(x) for _ in range(nout)], torch.empty_like(x) if side else None,
            torch.ones(B, dtype=torch.int32) if finite else None)


@needs_cpu
@pytest.mark.parametrize("args", [
    dict(),
    dict(per=True, nout=2),
    dict(dtype=torch.float16, K1=3, H=2, D=2, per=True),
    dict(dtype=torch.bfloat16, K1=1, H=0, D=0, side=False, finite=False),
    dict(K1=8, H=4, D=4, nout=8, n=3),
], ids=["common", "per_sample", "fp16_per_sample", "bf16_plain", "largest"])
def test_opcheck(args):
    torch.library.opcheck(torch.ops.fastdiff.sampler_step.default, _op_args(**args))


# ---- argument errors -----------------------------------------------------------------------------------

STEPS = [pytest.param(sampler_step_reference, id="reference"),
         pytest.param(functools.partial(sampler_step, backend="reference"), id="sampler_step-reference"),
         pytest.param(functools.partial(sampler_step, backend="cpu"), id="sampler_step-cpu", marks=needs_cpu)]


def _bad_calls():
    """(id, call(step), exception, message pattern) of bad Python-level arguments."""
    x = torch.zeros(2, 5)
    h, p = torch.zeros(2, 5), torch.zeros(2, 5)
    meta = torch.zeros(2, 5, device="meta")
    c4 = [1.0, 0.5, 0.0, 0.0]
    cases = [
        ("x float64", lambda s: s(x.double(), [p], coeffs=c4), TypeError, "x must be a float32 tensor"),
        ("x not a tensor", lambda s: s([[0.0]], [p], coeffs=c4), TypeError, "x must be a float32 tensor"),
        ("x 0-d", lambda s: s(torch.zeros(()), [torch.zeros(())], coeffs=c4), ValueError, "batch dimension"),
        ("preds a tensor", lambda s: s(x, p, coeffs=c4), TypeError, r"preds must be a list of tensors"),
        ("preds empty", lambda s: s(x, [], coeffs=c4), ValueError, "preds must hold at least one"),
        ("preds 9", lambda s: s(x, [p] * 9, weights=[1.0] * 9, coeffs=c4), ValueError,
         "preds holds 9 tensors; at most 8"),
        ("preds entry not a tensor", lambda s: s(x, [p, 1.0], weights=[1, 2], coeffs=c4), TypeError,
         r"preds\[1\] must be a tensor, got float"),
        ("preds shape", lambda s: s(x, [p, torch.zeros(2, 4)], weights=[1, 2], coeffs=c4), ValueError,
         r"preds\[1\] must have x's shape \(2, 5\), got \(2, 4\)"),
        ("preds int dtype", lambda s: s(x, [p.int()], coeffs=c4), TypeError, r"preds\[0\] must be torch.float32"),
        ("preds float64", lambda s: s(x, [p.double()], coeffs=c4), TypeError, r"preds\[0\] must be torch.float32"),
        ("preds mixed dtypes", lambda s: s(x, [p, p.half()], weights=[1, 2], coeffs=c4), TypeError,
         r"preds\[1\] must have preds\[0\]'s dtype torch.float32, got torch.float16"),
        ("preds device", lambda s: s(x, [meta], coeffs=c4), ValueError, r"preds\[0\] is on meta but x is on cpu"),
        ("history a tensor", lambda s: s(x, [p], history=h, coeffs=c4 + [0, 0]), TypeError,
         "history must be a list of tensors"),
        ("history 5", lambda s: s(x, [p], history=[h] * 5, coeffs=[0.0] * 14), ValueError,
         "history holds 5 tensors; at most 4"),
        ("history dtype", lambda s: s(x, [p], history=[h.half()], coeffs=[0.0] * 6), TypeError,
         r"history\[0\] must be torch.float32, got torch.float16"),
        ("history shape", lambda s: s(x, [p], history=[h, torch.zeros(5, 2)], coeffs=[0.0] * 8), ValueError,
         r"history\[1\] must have x's shape"),
        ("history entry not a tensor", lambda s: s(x, [p], history=[None], coeffs=[0.0] * 6), TypeError,
         r"history\[0\] must be a tensor"),
        ("streams an int", lambda s: s(x, [p], coeffs=c4 + [0, 0], streams=3), TypeError,
         "streams must be a sequence of stream ids"),
        ("streams 5", lambda s: s(x, [p], coeffs=[0.0] * 14, streams=[1, 2, 3, 4, 5], seeds=[1, 2]), ValueError,
         "streams holds 5 draws; at most 4"),
        ("stream negative", lambda s: s(x, [p], coeffs=[0.0] * 6, streams=[-1], seeds=[1, 2]), ValueError,
         r"streams\[0\] = -1 is out of range"),
        ("stream 2^32", lambda s: s(x, [p], coeffs=[0.0] * 8, streams=[1, 2**32], seeds=[1, 2]), ValueError,
         r"streams\[1\] = 4294967296 is out of range"),
        ("stream float", lambda s: s(x, [p], coeffs=[0.0] * 6, streams=[1.0], seeds=[1, 2]), TypeError,
         r"streams\[0\] must be an int"),
        ("weights missing", lambda s: s(x, [p, p], coeffs=c4), ValueError, "weights are required with 2 predictions"),
        ("weights length", lambda s: s(x, [p, p], weights=[1.0], coeffs=c4), ValueError,
         "weights must hold 2 numbers, got 1"),
        ("weights str", lambda s: s(x, [p], weights="1", coeffs=c4), TypeError, "weights must be a sequence"),
        ("weights entry str", lambda s: s(x, [p, p], weights=[1.0, "2"], coeffs=c4), TypeError,
         r"weights\[1\] must be a real number"),
        ("weights entry bool", lambda s: s(x, [p], weights=[True], coeffs=c4), TypeError,
         r"weights\[0\] must be a real number"),
        ("weights entry 0-d tensor", lambda s: s(x, [p], weights=[torch.tensor(1.0)], coeffs=c4), TypeError,
         r"weights\[0\] must be a real number"),
        ("weights entry nan", lambda s: s(x, [p, p], weights=[1.0, math.nan], coeffs=c4), ValueError,
         r"weights\[1\] must be finite"),
        ("weights tensor dtype", lambda s: s(x, [p], weights=torch.ones(2, 1, dtype=torch.float64), coeffs=c4),
         TypeError, r"weights as a tensor must be float32 \[B, 1\]"),
        ("weights tensor shape", lambda s: s(x, [p, p], weights=torch.ones(2), coeffs=c4), ValueError,
         r"weights as a tensor must be \[B, 2\] = \[2, 2\], got \(2,\)"),
        ("weights tensor rows", lambda s: s(x, [p, p], weights=torch.ones(3, 2), coeffs=c4), ValueError,
         r"weights as a tensor must be \[B, 2\] = \[2, 2\], got \(3, 2\)"),
        ("weights tensor device", lambda s: s(x, [p], weights=torch.ones(2, 1, device="meta"), coeffs=c4),
         ValueError, "weights is on meta but x is on cpu"),
        ("coeffs missing", lambda s: s(x, [p]), TypeError, "coeffs"),
        ("coeffs length", lambda s: s(x, [p], history=[h], coeffs=c4), ValueError, "coeffs must hold 6 numbers, got 4"),
        ("coeffs length with draws", lambda s: s(x, [p], coeffs=c4, streams=[1], seeds=[1, 2]), ValueError,
         "coeffs must hold 6 numbers"),
        ("coeffs entry inf", lambda s: s(x, [p], coeffs=[1.0, math.inf, 0, 0]), ValueError,
         r"coeffs\[1\] must be finite"),
        ("coeffs entry None", lambda s: s(x, [p], coeffs=[1.0, None, 0, 0]), TypeError, r"coeffs\[1\] must be a real"),
        ("coeffs tensor shape", lambda s: s(x, [p], coeffs=torch.ones(2, 6)), ValueError,
         r"coeffs as a tensor must be \[B, 4\] = \[2, 4\], got \(2, 6\)"),
        ("coeffs tensor dtype", lambda s: s(x, [p], coeffs=torch.ones(2, 4, dtype=torch.float16)), TypeError,
         "coeffs as a tensor must be float32"),
        ("coeffs tensor device", lambda s: s(x, [p], coeffs=torch.ones(2, 4, device="meta")), ValueError,
         "coeffs is on meta but x is on cpu"),
        ("outs a tensor", lambda s: s(x, [p], coeffs=c4, outs=torch.empty_like(x)), TypeError,
         "outs must be a list of tensors"),
        ("outs empty", lambda s: s(x, [p], coeffs=c4, outs=[]), ValueError, "outs must hold at least one output"),
        ("outs 9", lambda s: s(x, [p], coeffs=c4, outs=[torch.empty_like(x) for _ in range(9)]), ValueError,
         "outs holds 9 tensors; at most 8"),
        ("outs dtype", lambda s: s(x, [p], coeffs=c4, outs=[torch.empty_like(x), x.half()]), TypeError,
         r"outs\[1\] must be torch.float32, got torch.float16"),
        ("outs shape", lambda s: s(x, [p], coeffs=c4, outs=[torch.empty(2, 6)]), ValueError,
         r"outs\[0\] must have x's shape"),
        ("outs device", lambda s: s(x, [p], coeffs=c4, outs=[torch.empty_like(meta)]), ValueError,
         r"outs\[0\] is on meta but x is on cpu"),
        ("outs entry not a tensor", lambda s: s(x, [p], coeffs=c4, outs=[None]), TypeError,
         r"outs\[0\] must be a tensor"),
        ("side not a tensor", lambda s: s(x, [p], coeffs=c4, side=[1.0]), TypeError, "side must be a tensor, got list"),
        ("side dtype", lambda s: s(x, [p], coeffs=c4, side=x.bfloat16()), TypeError,
         "side must be torch.float32, got torch.bfloat16"),
        ("side shape", lambda s: s(x, [p], coeffs=c4, side=torch.empty(1, 5)), ValueError, "side must have x's shape"),
        ("finite int64", lambda s: s(x, [p], coeffs=c4, finite=torch.ones(2, dtype=torch.int64)), TypeError,
         r"finite must be an int32 tensor \[B\] = \[2\], got \(2,\) torch.int64"),
        ("finite bool", lambda s: s(x, [p], coeffs=c4, finite=torch.ones(2, dtype=torch.bool)), TypeError,
         "finite must be an int32 tensor"),
        ("finite shape", lambda s: s(x, [p], coeffs=c4, finite=torch.ones(3, dtype=torch.int32)), TypeError,
         r"finite must be an int32 tensor \[B\] = \[2\], got \(3,\)"),
        ("finite a list", lambda s: s(x, [p], coeffs=c4, finite=[1, 1]), TypeError, "finite must be an int32 tensor"),
        ("finite device", lambda s: s(x, [p], coeffs=c4, finite=torch.ones(2, dtype=torch.int32, device="meta")),
         ValueError, "finite is on meta but x is on cpu"),
        ("seeds missing (host noise)", lambda s: s(x, [p], coeffs=[1.0, 0.5, 0.3, 0, 0, 0], streams=[1]), ValueError,
         "seeds are required when a noise coefficient is non-zero"),
        ("seeds missing (side noise)", lambda s: s(x, [p], coeffs=[1.0, 0.5, 0, 0, 0, 0.3], streams=[1],
                                                   side=torch.empty_like(x)), ValueError, "seeds are required"),
        ("seeds missing (per-sample)", lambda s: s(x, [p], coeffs=torch.zeros(2, 6), streams=[1]), ValueError,
         "seeds are required"),
        ("seeds length", lambda s: s(x, [p], coeffs=[1.0, 0.5, 0.3, 0, 0, 0], streams=[1], seeds=[1, 2, 3]),
         ValueError, r"seeds must hold one seed per sample \(2\)"),
        ("seeds an int", lambda s: s(x, [p], coeffs=[1.0, 0.5, 0.3, 0, 0, 0], streams=[1], seeds=4), TypeError,
         "seeds must be a sequence of ints"),
        ("seeds int32", lambda s: s(x, [p], coeffs=[1.0, 0.5, 0.3, 0, 0, 0], streams=[1],
                                    seeds=torch.ones(2, dtype=torch.int32)), TypeError, "seeds must be an int64"),
        ("seeds out of range", lambda s: s(x, [p], coeffs=[1.0, 0.5, 0.3, 0, 0, 0], streams=[1], seeds=[1, 2**64]),
         ValueError, r"seeds\[1\] = 18446744073709551616 is out of range"),
    ]
    return cases


BAD = _bad_calls()


@pytest.mark.parametrize("step", STEPS)
@pytest.mark.parametrize("case", BAD, ids=[c[0] for c in BAD])
def test_errors_name_the_argument(step, case):
    _, call, exc, pattern = case
    with torch.no_grad(), pytest.raises(exc, match=pattern):
        call(step)


@needs_cpu
def test_kernel_refuses_non_contiguous_inputs():
    x = torch.zeros(5, 2).t()
    with pytest.raises(ValueError, match="contiguous"):
        sampler_step(x, [x.contiguous()], coeffs=[1.0, 0.5, 0.0, 0.0], backend="cpu")
    # the reference takes any layout
    sampler_step_reference(x, [x.contiguous()], coeffs=[1.0, 0.5, 0.0, 0.0])


def _raw(**over):
    """Arguments of torch.ops.fastdiff.sampler_step (B = 2, n = 5, K1 = 2, H = 1, D = 1), with overrides."""
    x = torch.zeros(2, 5)
    a = dict(x=x, preds=[torch.zeros(2, 5), torch.zeros(2, 5)], history=[torch.zeros(2, 5)],
             seeds=torch.zeros(2, dtype=torch.int64), streams=[3], weights=[1.0, 2.0], coeffs=[0.5] * 8,
             sample_weights=None, sample_coeffs=None, outs=[torch.empty_like(x)], side=None, finite=None)
    a.update(over)
    return a


def _call_raw(a):
    torch.ops.fastdiff.sampler_step(a["x"], a["preds"], a["history"], a["seeds"], a["streams"], a["weights"],
                                    a["coeffs"], a["sample_weights"], a["sample_coeffs"], a["outs"], a["side"],
                                    a["finite"])


def _raw_bad():
    buf = torch.zeros(11)
    shifted = buf[1:].view(2, 5)
    base = buf[:10].view(2, 5)
    o = torch.empty(2, 5)
    z = torch.zeros(2, 5)
    words = torch.zeros(10)
    f16, f32 = words.view(torch.float16)[:10].view(2, 5), words.view(2, 5)  # f16: the first half of f32's bytes
    return [
        ("weights length", dict(weights=[1.0]), "weights must hold 2 numbers, got 1"),
        ("coeffs length", dict(coeffs=[0.5] * 6), r"coeffs must hold 2 \(2 \+ H \+ D\) = 8 numbers, got 6"),
        ("coeffs length, no draws", dict(streams=[]), r"coeffs must hold 2 \(2 \+ H \+ D\) = 6 numbers, got 8"),
        ("sample_weights shape", dict(sample_weights=torch.zeros(2, 3)), r"sample_weights must be \[B, 2\] = \[2, 2\]"),
        ("sample_weights dtype", dict(sample_weights=torch.zeros(2, 2, dtype=torch.float64)),
         "sample_weights must be float32"),
        ("sample_weights non-contiguous", dict(sample_weights=torch.zeros(2, 2).t()),
         "sample_weights must be contiguous"),
        ("sample_coeffs shape", dict(sample_coeffs=torch.zeros(3, 8)), r"sample_coeffs must be \[B, 8\] = \[2, 8\]"),
        ("preds empty", dict(preds=[]), "preds must hold 1 to 8 tensors, got 0"),
        ("preds 9", dict(preds=[z] * 9, weights=[1.0] * 9), "preds must hold 1 to 8 tensors, got 9"),
        ("history 5", dict(history=[z] * 5, coeffs=[0.5] * 18), "history holds at most 4 tensors, got 5"),
        ("streams 5", dict(streams=[1] * 5, coeffs=[0.5] * 16), "streams holds at most 4 draws, got 5"),
        ("stream negative", dict(streams=[-1]), r"streams must be in \[0, 2\^32\), got -1"),
        ("stream 2^32", dict(streams=[2**32]), r"streams must be in \[0, 2\^32\), got 4294967296"),
        ("outs empty", dict(outs=[]), "outs must hold 1 to 8 tensors, got 0"),
        ("outs 9", dict(outs=[torch.empty(2, 5) for _ in range(9)]), "outs must hold 1 to 8 tensors, got 9"),
        ("x float64", dict(x=torch.zeros(2, 5, dtype=torch.float64)), "x must be float32"),
        ("x 0-d", dict(x=torch.zeros(())), "x must have a batch dimension"),
        ("x non-contiguous", dict(x=torch.zeros(5, 2).t()), "x must be contiguous"),
        ("preds shape", dict(preds=[z, torch.zeros(2, 4)]), r"preds\[1\] must have x's shape"),
        ("preds dtype", dict(preds=[z.half(), z]), r"preds\[1\] must have preds\[0\]'s dtype Half"),
        ("preds int", dict(preds=[z.int(), z.int()]), r"preds\[0\] must be float32, float16 or bfloat16"),
        ("preds non-contiguous", dict(preds=[z, torch.zeros(5, 2).t()]), r"preds\[1\] must be contiguous"),
        ("history dtype", dict(history=[z.half()]), r"history\[0\] must be float32"),
        ("outs dtype", dict(outs=[o, z.half()]), r"outs\[1\] must be float32"),
        ("side dtype", dict(side=z.bfloat16()), "side must be float32"),
        ("side shape", dict(side=torch.zeros(2, 6)), "side must have x's shape"),
        ("seeds length", dict(seeds=torch.zeros(3, dtype=torch.int64)), r"seeds must be \[B\] = \[2\]"),
        ("seeds dtype", dict(seeds=torch.zeros(2, dtype=torch.int32)), "seeds must be int64"),
        ("finite dtype", dict(finite=torch.ones(2, dtype=torch.int64)), r"finite must be int32 \[B\] = \[2\]"),
        ("finite length", dict(finite=torch.ones(3, dtype=torch.int32)), r"finite must be int32 \[B\] = \[2\]"),
        ("finite non-contiguous", dict(finite=torch.ones(2, 2, dtype=torch.int32)[:, 0]), "finite must be contiguous"),
        ("outs partially overlaps x", dict(x=base, outs=[shifted]), r"outs\[0\] partially overlaps x"),
        ("outs partially overlaps preds", dict(preds=[z, base], outs=[shifted]),
         r"outs\[0\] partially overlaps preds\[1\]"),
        ("side partially overlaps history", dict(history=[base], side=shifted),
         r"side partially overlaps history\[0\]"),
        ("outs over fp16 preds", dict(preds=[f16, f16], outs=[f32]), r"outs\[0\] partially overlaps preds\[0\]"),
        ("outs overlap each other", dict(outs=[o, o]), r"outs\[1\] and outs\[0\] must not overlap"),
        ("side overlaps outs", dict(outs=[o], side=o), r"side and outs\[0\] must not overlap"),
        ("side partially overlaps outs", dict(outs=[base], side=shifted), r"side and outs\[0\] must not overlap"),
    ]


RAW_BAD = _raw_bad()


@needs_cpu
@pytest.mark.parametrize("case", RAW_BAD, ids=[c[0] for c in RAW_BAD])
def test_op_errors_name_the_argument(case):
    _, over, pattern = case
    with pytest.raises(RuntimeError, match="fastdiff::sampler_step: " + pattern):
        _call_raw(_raw(**over))


@needs_cpu
def test_op_accepts_exact_aliases():
    """outs[0] = x, side = history[0], outs[0] = preds[k] (float32) are allowed; values are the step's."""
    x, e, p = torch.ones(2, 5), torch.ones(2, 5), torch.full((2, 5), 2.0)
    # out = 2 x + 0 g + 1 h = 3; side = 0 x + 1 g + 1 h = 3
    _call_raw(_raw(x=x, preds=[p], history=[e], streams=[], weights=[1.0], coeffs=[2.0, 0.0, 1.0, 0.0, 1.0, 1.0],
                   outs=[x], side=e))
    assert torch.equal(x, torch.full((2, 5), 3.0)) and torch.equal(e, torch.full((2, 5), 3.0))
    q = torch.full((2, 5), 2.0)
    _call_raw(_raw(x=torch.ones(2, 5), preds=[q], history=[], streams=[], weights=[1.0], coeffs=[1.0, 1.0, 0.0, 0.0],
                   outs=[q]))
    assert torch.equal(q, torch.full((2, 5), 3.0))


# ---- autograd ------------------------------------------------------------------------------------------


@needs_cpu
@pytest.mark.parametrize("arg", ["x", "preds[0]", "preds[2]", "history[1]"])
def test_kernel_refuses_inputs_that_require_grad(arg):
    kw = _inputs(2, (7,), torch.float32, 3, 2, 1, seed=14)
    x, preds, history = kw["x"], list(kw["preds"]), list(kw["history"])
    if arg == "x":
        x = x.clone().requires_grad_()
    elif arg.startswith("preds"):
        i = int(arg[6])
        preds[i] = preds[i].clone().requires_grad_()
    else:
        i = int(arg[8])
        history[i] = history[i].clone().requires_grad_()
    call = dict(weights=kw["weights"], history=history, coeffs=kw["coeffs"], seeds=kw["seeds"], streams=kw["streams"])
    with pytest.raises(RuntimeError, match=f"sampler_step: {re.escape(arg)} requires grad, but the cpu kernel"):
        sampler_step(x, preds, backend="cpu", **call)
    with torch.no_grad():  # without grad mode it runs
        out = sampler_step(x, preds, backend="cpu", **call)
    assert not out.requires_grad


@needs_cpu
@pytest.mark.parametrize("arg", ["weights", "coeffs"])
def test_kernel_refuses_coefficient_rows_that_require_grad(arg):
    kw = _inputs(2, (7,), torch.float32, 2, 1, 1, per_w=True, per_c=True, seed=15)
    kw[arg] = kw[arg].clone().requires_grad_()
    with pytest.raises(RuntimeError, match=f"{arg} requires grad"):
        sampler_step(kw["x"], kw["preds"], weights=kw["weights"], history=kw["history"], coeffs=kw["coeffs"],
                     seeds=kw["seeds"], streams=kw["streams"], backend="cpu")


@pytest.mark.parametrize("per", [False, True])
def test_reference_differentiates(per):
    """The reference backend differentiates through x, preds, history and the per-sample rows: the
    gradients of the linear step are its coefficients."""
    B, n, K1, H = 2, 6, 3, 1
    kw = _inputs(B, (n,), torch.float32, K1, H, 1, per_w=per, per_c=per, seed=16)
    x = kw["x"].clone().requires_grad_()
    preds = [p.clone().requires_grad_() for p in kw["preds"]]
    history = [h.clone().requires_grad_() for h in kw["history"]]
    w, c = kw["weights"], kw["coeffs"]
    if per:
        w, c = w.clone().requires_grad_(), c.clone().requires_grad_()
    out = sampler_step(x, preds, weights=w, history=history, coeffs=c, seeds=kw["seeds"], streams=kw["streams"],
                       backend="reference")
    assert out.requires_grad
    out.sum().backward()
    M = 2 + H + 1

    def col(values, j):
        if isinstance(values, torch.Tensor):
            return values.detach()[:, j:j + 1].expand(B, n)
        return torch.full((B, n), values[j], dtype=torch.float32)

    cx, cg, ch = col(c, 0), col(c, 1), col(c, 2)
    torch.testing.assert_close(x.grad, cx)
    torch.testing.assert_close(history[0].grad, ch)
    wsum = sum(col(w, k) for k in range(1, K1))
    torch.testing.assert_close(preds[0].grad, cg * (col(w, 0) - wsum))
    for k in range(1, K1):
        torch.testing.assert_close(preds[k].grad, cg * col(w, k))
    if per:
        assert w.grad is not None and c.grad is not None
        g = sum(col(w, k) * (preds[k] - preds[0]).detach() for k in range(1, K1)) + col(w, 0) * preds[0].detach()
        torch.testing.assert_close(c.grad[:, 1], g.sum(1))
        torch.testing.assert_close(c.grad[:, M:], torch.zeros(B, M))  # no side: the side row has no effect


# ---- empty inputs --------------------------------------------------------------------------------------


@pytest.mark.parametrize("step", STEPS)
@pytest.mark.parametrize("shape", [(0, 5), (0,), (3, 0), (2, 3, 0)], ids=["B0", "B0_1d", "n0", "n0_3d"])
@pytest.mark.parametrize("per", [False, True])
def test_empty_does_nothing(step, shape, per):
    B = shape[0]
    x = torch.zeros(shape)
    preds = [torch.zeros(shape, dtype=torch.float16) for _ in range(2)]
    history = [torch.zeros(shape)]
    w = torch.ones(B, 2) if per else [1.0, 2.0]
    c = torch.ones(B, 10) if per else [0.5] * 10
    finite = torch.tensor([1, 0, 7][:B], dtype=torch.int32)
    outs, side = [torch.zeros(shape), torch.zeros(shape)], torch.zeros(shape)
    with torch.no_grad():
        got = step(x, preds, weights=w, history=history, coeffs=c, seeds=list(range(B)), streams=[4, 5], outs=outs,
                   side=side, finite=finite)
    assert got is outs[0] and got.shape == shape
    assert finite.tolist() == [1, 0, 7][:B]


@needs_cpu
@pytest.mark.parametrize("shape", [(0, 5), (3, 0)], ids=["B0", "n0"])
def test_empty_op_does_nothing(shape):
    B = shape[0]
    x = torch.zeros(shape)
    finite = torch.tensor([1, 0, 7][:B], dtype=torch.int32)
    _call_raw(_raw(x=x, preds=[x, x], history=[x], seeds=torch.zeros(B, dtype=torch.int64),
                   sample_weights=torch.ones(B, 2), outs=[torch.empty_like(x)], side=torch.empty_like(x),
                   finite=finite))
    assert finite.tolist() == [1, 0, 7][:B]


def test_module_limits():
    assert (MAX_BRANCHES, MAX_HISTORY, MAX_DRAWS, MAX_OUTS) == (8, 4, 4, 8)
