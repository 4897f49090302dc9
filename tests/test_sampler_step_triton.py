"""The Triton general fused sampler step (fastdiff/kernels/sampler_step.py) against its specification,
fastdiff.ops.sampler_step.sampler_step_reference: odd sizes, every prediction dtype, K1 = 1..4
branches, H = 0..3 history buffers, D = 0..2 draws, several outputs, side on/off, per-sample rows
(with per-sample zero noise coefficients), the finite flags, aliasing and batch chunking.

The kernel accumulates with fused multiply-adds (tl.fma, one rounding), as the C++ kernels do
(csrc/include/fastdiff/sampler_step.h); the reference rounds each product and sum separately. So every
result is compared twice: within tolerance (1e-6 relative, 1e-5 absolute) of the reference, and against
_model, the kernel's arithmetic in float32 with exactly rounded fmas (fma32) and the Triton randn
kernel's normals: bit for bit without noise, on the CPU (the interpreter's tl.fma is a true fma, checked
below) as on a GPU (tl.fma is an FFMA, and no separate multiply feeds an add, so the compiler has nothing
to contract); with noise bit for bit on the CPU and within the tolerance on a GPU (two kernels' normals:
same code, compiled separately). The normals' transcendental functions may differ from the reference's
in the last bits.
"""


import pytest
import torch

from fastdiff.ops.sampler_step import prepare, sampler_step_reference
from sampler_step_cases import (FMA_A, FMA_B, FUSED, STREAMS, is_noisy as _noisy, run_model,
                                run_step as _run, step_inputs)
from triton_testing import DEVICE, TRITON_MARKS, run_script

pytestmark = TRITON_MARKS
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _kernel():
    from fastdiff.kernels import sampler_step as module

    return module


def _inputs(*args, **kw):
    return step_inputs(*args, device=DEVICE, **kw)



def _reference(**call):
    from fastdiff.ops.sampler_step import run_reference

    run_reference(**call)



def _model(**call):
    """The kernel's arithmetic on prepared arguments (sampler_step_cases.run_model). The normals are the
    Triton randn kernel's (the same normal4 code as this kernel's; test_noise_is_the_stream ties them to
    the reference's)."""
    from fastdiff.kernels.randn import randn

    return run_model(**call, normals=randn)


def _triton(**call):
    _kernel().sampler_step(**call)



def _compare(kw, got, want, exact):
    """exact: bit for bit (NaN where NaN); else within 1e-6 relative (1e-5 absolute near 0)."""
    tol = {"rtol": 0, "atol": 0} if exact else {"rtol": 1e-6, "atol": 1e-5}
    (go, gs, gf), (wo, ws, wf) = got, want
    for o in go:
        torch.testing.assert_close(o.cpu(), wo[0].cpu(), equal_nan=True, **tol)
    if ws is not None:
        torch.testing.assert_close(gs.cpu(), ws.cpu(), equal_nan=True, **tol)
    if wf is not None:
        assert torch.equal(gf.cpu(), wf.cpu())


def _check(kw, **opts):
    """The kernel bit for bit as _model (on a GPU: within tolerance with noise), and within tolerance of
    the reference; returns (got, the reference's)."""
    want = _run(_reference, kw, **opts)
    got = _run(_triton, kw, **opts)
    _compare(kw, got, _run(_model, kw, **opts), exact=DEVICE == "cpu" or not _noisy(kw))
    _compare(kw, got, want, exact=False)
    return got, want


# (preds, weights, history, coefficient row): one fma site each, where one rounding gives FUSED and the
# reference's separate roundings 1.0
FMA_SITES = {
    # blend: g = fma(w_1, p_1 - p_0, w_0 p_0) with w_0 p_0 = 1, p_1 - p_0 = FMA_B (exact); out = fma(1, g, 0 x)
    "blend": ([-2.0**-30, FMA_B - 2.0**-30], [-2.0**30, FMA_A], [], [0.0, 1.0]),
    # the row's first term: fma(c_g, g, c_x x) with g = FMA_B, c_x x = 1
    "row": ([FMA_B], [1.0], [], [1.0, FMA_A]),
    # a history term: fma(c_h, h, fma(0, g, 1 x)) with h = FMA_B
    "history": ([1.0], [1.0], [FMA_B], [1.0, 0.0, FMA_A]),
}


@pytest.mark.parametrize("per", [False, True], ids=["host", "per_sample"])
@pytest.mark.parametrize("site", sorted(FMA_SITES))
def test_fma_is_fused(site, per):
    """Each fma of the kernel (blend, the row's first term, a history term; out and side rows; host or
    per-sample coefficients) rounds once, here and on a GPU: the reference gives 1.0 on these inputs."""
    values, weights, history, row = FMA_SITES[site]
    B, n = 2, 6
    x = torch.ones(B, n, device=DEVICE)
    preds = [torch.full_like(x, v) for v in values]
    hist = [torch.full_like(x, v) for v in history]
    coeffs = row + row  # the side row is the out row
    if per:
        weights = torch.tensor([weights] * B, dtype=torch.float32, device=DEVICE)
        coeffs = torch.tensor([coeffs] * B, dtype=torch.float32, device=DEVICE)
    outs = []
    for step in (_triton, _reference):
        out, side = torch.empty_like(x), torch.empty_like(x)
        step(**prepare(x, preds, weights, hist, coeffs, None, [], [out], side, None))
        outs.append((out.cpu(), side.cpu()))
    (out, side), (ref_out, ref_side) = outs
    assert (ref_out == 1.0).all() and (ref_side == 1.0).all()  # the inputs discriminate
    assert (out == FUSED).all() and (side == FUSED).all(), (out, side)


# (K1, H, D, nout, side)
CONFIGS = [(1, 0, 0, 1, False), (2, 0, 0, 1, False), (2, 1, 1, 2, True), (2, 1, 0, 1, True), (3, 2, 2, 3, True),
           (4, 3, 1, 1, False), (1, 3, 2, 2, True), (4, 0, 2, 8, True)]


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: "K{}H{}D{}o{}{}".format(*c[:4], "s" if c[4] else ""))
@pytest.mark.parametrize("n", [1, 3, 5, 67, 1000])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_host_coefficients(dtype, n, config):
    K1, H, D, nout, side = config
    B = 1 + (n + K1 + H) % 3
    kw = _inputs(B, (n,), dtype, K1, H, D, seed=n * 7 + K1)
    _check(kw, nout=nout, side=side)


@pytest.mark.parametrize("K1", [1, 2, 3, 4])
@pytest.mark.parametrize("H", [0, 1, 2, 3])
@pytest.mark.parametrize("D", [0, 1, 2])
def test_counts(K1, H, D):
    """Every (K1, H, D) on a multi-dimensional sample (n = 3 * 5 * 7 = 105), B = 3, side on."""
    kw = _inputs(3, (3, 5, 7), torch.float16, K1, H, D, seed=100 + 16 * K1 + 4 * H + D)
    _check(kw, nout=2, side=True)


@pytest.mark.parametrize("per", ["weights", "coeffs", "both"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("B,n", [(1, 5), (2, 67), (3, 1000)])
def test_per_sample_rows(B, n, dtype, per):
    """Rows [B, K1] / [B, 2M] per sample; some samples have zero noise coefficients (out, side or both)."""
    K1, H, D = 3, 2, 2
    zero = [(0, 0, 0), (1, 0, 0), (0, B - 1, 1), (1, 0, 1)] if per != "weights" else [(1, None, 1)]
    kw = _inputs(B, (n,), dtype, K1, H, D, per_w=per != "coeffs", per_c=per != "weights", zero_noise=zero,
                 seed=B * n)
    _check(kw, nout=2, side=True)
    _check(kw, nout=1, side=False)


def test_per_sample_zero_noise_is_exact():
    """Per-sample coefficients with every noise coefficient zero: no noise added, bit-identical on CPU."""
    B, H, D = 3, 1, 2
    zero = [(row, b, d) for row in (0, 1) for b in range(B) for d in range(D)]
    kw = _inputs(B, (37,), torch.float32, 2, H, D, per_c=True, zero_noise=zero, seed=4)
    assert not _noisy(kw)
    _check(kw, nout=1, side=True)


def test_host_zero_noise_rows():
    """Host rows where a draw feeds only out, only side, or nothing."""
    for zero in ([(1, None, 0)], [(0, None, 0)], [(0, None, 0), (1, None, 0)], [(0, None, 1), (1, None, 0)]):
        kw = _inputs(2, (67,), torch.float32, 2, 1, 2, zero_noise=zero, seed=len(zero))
        _check(kw, nout=2, side=True)
        _check(kw, nout=1, side=False)


@pytest.mark.filterwarnings("ignore:invalid value:RuntimeWarning")  # the interpreter's numpy on inf - inf
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("per_c", [False, True])
def test_finite_flags(dtype, per_c):
    """finite[b] = 0 where a p_k of sample b holds inf or NaN; set to 0 only, never to 1."""
    B, n, K1 = 3, 1000, 3
    kw = _inputs(B, (n,), dtype, K1, 1, 1, per_c=per_c, seed=9)
    kw["preds"][0][1, 999] = float("inf")  # sample 1: the last element (the tail tile)
    kw["preds"][2][2, 0] = float("nan")  # sample 2: another branch
    kw["preds"][1][2, 500] = float("-inf")
    finite = torch.tensor([1, 1, 1], dtype=torch.int32, device=DEVICE)
    (_, _, got), _ = _check(kw, nout=2, side=True, finite=finite)
    assert got.tolist() == [1, 0, 0]
    finite = torch.tensor([0, 1, 1], dtype=torch.int32, device=DEVICE)  # a 0 stays 0
    (_, _, got), _ = _check(kw, nout=1, side=False, finite=finite)
    assert got.tolist() == [0, 0, 0]
    kw = _inputs(B, (n,), dtype, K1, 0, 0, seed=10)  # all finite: nothing written
    finite = torch.tensor([1, 0, 1], dtype=torch.int32, device=DEVICE)
    (_, _, got), _ = _check(kw, finite=finite)
    assert got.tolist() == [1, 0, 1]


@pytest.mark.parametrize("D", [0, 1])
@pytest.mark.parametrize("per_c", [False, True])
def test_aliasing(per_c, D):
    """outs[0] is x and side is history[0]: every input is read before it is written."""
    kw = _inputs(2, (101,), torch.float32, 2, 2, D, per_c=per_c, seed=11)
    _check(kw, nout=3, side=True, alias=True)


@pytest.mark.filterwarnings("ignore:invalid value:RuntimeWarning")
def test_batch_chunks(monkeypatch):
    """Batches beyond the grid's dimension 1 run in chunks (here chunks of 2), every per-sample
    tensor (seeds, rows, finite) sliced with them."""
    monkeypatch.setattr(_kernel(), "_MAX_GRID_Y", 2)
    B = 5
    kw = _inputs(B, (13,), torch.bfloat16, 2, 1, 1, per_w=True, per_c=True, zero_noise=[(0, 3, 0)], seed=12)
    kw["preds"][1][3, 4] = float("nan")
    finite = torch.ones(B, dtype=torch.int32, device=DEVICE)
    (_, _, got), _ = _check(kw, nout=2, side=True, finite=finite)
    assert got.tolist() == [1, 1, 1, 0, 1]


def test_noise_is_the_stream():
    """c_x = c_g = 0, c_z = 1: out is the spec-v1 noise of (seed, stream) for each draw."""
    from fastdiff.ops.randn import randn_reference

    x = torch.zeros(3, 4, 9, device=DEVICE)
    for d, stream in enumerate(STREAMS[:2]):
        coeffs = [0.0, 0.0, 0.0, 0.0] * 2
        coeffs[2 + d] = 1.0
        out = torch.empty_like(x)
        call = prepare(x, [x], None, [], coeffs, [4, 5, 6], STREAMS[:2], [out], None, None)
        _triton(**call)
        want = randn_reference(torch.tensor([4, 5, 6]), stream, (4, 9))
        torch.testing.assert_close(out.cpu(), want, atol=1e-5, rtol=0)


@pytest.mark.skipif(DEVICE != "cpu", reason="counts calls in the interpreter")
def test_draws_not_generated(monkeypatch):
    """A host draw whose coefficients are all zero is not generated; a per-sample draw is generated only
    by the programs of samples with a non-zero coefficient (counted under the interpreter)."""
    module = _kernel()
    calls = []
    real = module.normal_tile

    def counting(k0, k1, q, stream):
        calls.append(int(stream))
        return real(k0, k1, q, stream)

    monkeypatch.setattr(module, "normal_tile", counting)
    B, H, D = 3, 1, 2
    kw = _inputs(B, (5,), torch.float32, 2, H, D, zero_noise=[(0, None, 0), (1, None, 0)], seed=13)
    _check(kw, nout=1, side=True)
    assert calls == [_i32(STREAMS[1])] * B  # draw 0 never, draw 1 once per program
    calls.clear()
    zero = [(0, None, 0), (1, None, 0), (0, None, 1), (1, None, 1)]
    kw = _inputs(B, (5,), torch.float32, 2, H, D, zero_noise=zero, seed=14)
    _check(kw, nout=1, side=True)
    assert calls == []
    kw = _inputs(B, (5,), torch.float32, 2, H, D, per_c=True, seed=15,
                 zero_noise=[(0, 1, 0), (1, 1, 0), (0, 1, 1), (1, 1, 1), (0, 2, 1)])
    _check(kw, nout=1, side=True)
    # sample 0: both draws; sample 1: none; sample 2: draw 0, and draw 1 for its side row only
    assert sorted(calls) == sorted([_i32(STREAMS[0])] * 2 + [_i32(STREAMS[1])] * 2)


def _i32(stream):
    return _kernel()._i32(stream)


def test_public_op_backend():
    """fastdiff.ops.sampler_step.sampler_step(..., backend="triton") runs this kernel."""
    from fastdiff.ops.sampler_step import sampler_step

    kw = _inputs(2, (67,), torch.float16, 2, 1, 1, seed=16)
    want = sampler_step_reference(kw["x"], kw["preds"], weights=kw["weights"], history=kw["history"],
                                  coeffs=kw["coeffs"], seeds=kw["seeds"], streams=kw["streams"])
    with torch.no_grad():
        got = sampler_step(kw["x"], kw["preds"], weights=kw["weights"], history=kw["history"], coeffs=kw["coeffs"],
                           seeds=kw["seeds"], streams=kw["streams"], backend="triton")
    torch.testing.assert_close(got.cpu(), want.cpu(), rtol=1e-6, atol=1e-5)


def test_empty(monkeypatch):
    """n = 0 or B = 0: nothing to do, no launch (a recorder stands in for the kernel), finite untouched."""
    launches = []

    class Record:
        def __getitem__(self, grid):
            return lambda *args, **kwargs: launches.append(grid)

    monkeypatch.setattr(_kernel(), "_sampler_step_kernel", Record())

    def step(shape):
        x = torch.zeros(shape, device=DEVICE)
        out, side = torch.empty_like(x), torch.empty_like(x)
        finite = torch.tensor([1, 0, 1][:shape[0]], dtype=torch.int32, device=DEVICE)
        _triton(**prepare(x, [x], None, [], [1.0, 1.0, 0.5, 0.5], None, [], [out], side, finite))
        return finite

    step((3, 4))
    assert len(launches) == 1  # the recorder sees a launch where there is work
    launches.clear()
    for shape in ((0, 4), (3, 0)):
        assert step(shape).tolist() == [1, 0, 1][:shape[0]]
    assert launches == []


_SM90_SCRIPT = r'''
from fastdiff.kernels import sampler_step as module
from fastdiff.ops.sampler_step import prepare

kernel = module._sampler_step_kernel
module._sampler_step_kernel = Record()
for B, n, dtype, K1, H, D, nout, side, per in [(2, 4096, torch.float16, 2, 1, 1, 2, True, False),
                                               (3, 1000, torch.float32, 8, 4, 4, 8, True, False),
                                               (3, 67, torch.bfloat16, 3, 2, 2, 2, True, True)]:
    x = torch.randn(B, n)
    M = 2 + H + D
    calls.clear()
    module.sampler_step(**prepare(
        x, [torch.randn(B, n).to(dtype) for _ in range(K1)], torch.randn(B, K1) if per else [1.0] + [2.0] * (K1 - 1),
        [torch.randn(B, n) for _ in range(H)], torch.randn(B, 2 * M) if per else [0.5] * (2 * M), list(range(B)),
        [3, 2**32 - 1, 5, 6][:D], [torch.empty_like(x) for _ in range(nout)], torch.empty_like(x) if side else None,
        torch.ones(B, dtype=torch.int32)))
    _, args, kwargs = calls[0]
    print("compiled", (K1, H, D, nout, side, per), len(compile_sm90(kernel, args, kwargs)))
'''


def test_compiles_for_sm90(tmp_path):
    """The launches the wrapper makes (common step, the largest counts, per-sample rows) compile to sm_90
    cubins through Triton's own argument binder, without a GPU (tests/triton_testing.py)."""
    assert run_script(_SM90_SCRIPT, tmp_path).count("compiled") == 3


_SM90_CLIP_SCRIPT = r'''
import re

from fastdiff.kernels import sampler_step as module
from fastdiff.ops.sampler_step import prepare

kernel = module._sampler_step_kernel
module._sampler_step_kernel = Record()
for side in (False, True):
    x = torch.randn(2, 4096)
    calls.clear()
    module.sampler_step(**prepare(x, [torch.randn(2, 4096)], None, [], [0.5, 0.25, 1.0, -2.0], None, [],
                                  [torch.empty_like(x)], torch.empty_like(x) if side else None, None, [0.87, -0.61]))
    _, args, kwargs = calls[0]
    ptx = compile_sm90(kernel, args, kwargs, "ptx")
    arith = sorted(set(re.findall(r"\b(?:mul|fma|add)\.[a-z0-9.]+", ptx)))
    print(f"compiled side={side} mul_rn={'mul.rn.f32' in ptx}", arith)
'''


def test_clip_compiles_for_sm90_with_a_rounded_product(tmp_path):
    """clip's launches (with and without a side output) compile to sm_90, their product d (s_c - s) a mul.rn.f32
    (never contracted with the add into an fma, no flush to zero: as the interpreter and the reference round)."""
    out = run_script(_SM90_CLIP_SCRIPT, tmp_path)
    assert out.count("compiled") == 2 and "mul_rn=False" not in out and ".ftz" not in out, out


_SM90_STATS_SCRIPT = r'''
from fastdiff.kernels import sampler_step as module
from fastdiff.ops.sampler_step import prepare
from fastdiff.ops.step_stats import StepStats, picked, subsample_pick

kernel = module._sampler_step_kernel
module._sampler_step_kernel = Record()
for shape, f, branch, dtype in [((2, 8192), 8, 1, torch.float32), ((2, 3, 40, 41), 4, -1, torch.bfloat16),
                                ((2, 3, 40, 41), 2, -2, torch.float32)]:
    x = torch.randn(shape)
    pick = subsample_pick(shape, f, branch)
    S = picked(x[0].numel(), pick)
    q = branch != -2
    stats = StepStats(torch.zeros(2, 3, dtype=torch.float64), pick, torch.zeros(2, S), torch.zeros(2, S),
                      torch.zeros(2, S) if q else None, torch.zeros(2, S) if q else None)
    calls.clear()
    module.sampler_step(**prepare(x, [torch.randn(shape).to(dtype) for _ in range(2)], [1.0, 3.0], [],
                                  [1.0, -0.5, 0.0, 0.0], None, [], [x], None, None, None, stats))
    _, args, kwargs = calls[0]
    ptx = compile_sm90(kernel, args, kwargs, "ptx")
    print(f"compiled {shape} f={f} branch={branch} f64_atomics={'add.f64' in ptx}")
'''


def test_stats_compile_for_sm90(tmp_path):
    """The step statistics' launches (tests/test_step_stats.py: a prefix pick, strided picks, q a prediction, the
    blend or none) compile to sm_90, their float64 sums as float64 atomic adds."""
    out = run_script(_SM90_STATS_SCRIPT, tmp_path)
    assert out.count("compiled") == 3 and "f64_atomics=False" not in out, out
