"""The noise stream (spec v1) on every backend: golden vectors, parity with the reference, batch and
offset invariance, statistics, and argument errors."""

import math
import os

import numpy as np
import pytest
import torch
from conftest import BACKENDS

import fastdiff
from fastdiff import ops

# Every backend computes in float32 and matches the float64 spec within 1e-5 (docs/design.md §3); the
# low-precision outputs are that value rounded once.
TOL = {torch.float32: 1e-5, torch.float64: 1e-5, torch.float16: 2e-3 * 6, torch.bfloat16: 1.6e-2 * 6}
U64 = 1 << 64


@pytest.mark.parametrize("backend", BACKENDS)
def test_philox_known_answers(backend, spec):
    name, device = backend
    cases = spec["philox4x32_10_known_answers"]
    counter = torch.tensor([c["counter"] for c in cases], dtype=torch.int64, device=device)
    key = torch.tensor([c["key"] for c in cases], dtype=torch.int64, device=device)
    words = ops.philox4x32_10(counter, key, backend=name)
    assert words.tolist() == [c["output"] for c in cases]


@pytest.mark.parametrize("backend", BACKENDS)
def test_philox_matches_reference_on_random_inputs(backend):
    name, device = backend
    g = torch.Generator().manual_seed(0)
    counter = torch.randint(0, 1 << 32, (1001, 4), generator=g, dtype=torch.int64)
    key = torch.randint(0, 1 << 32, (1001, 2), generator=g, dtype=torch.int64)
    want = ops.philox4x32_10_reference(counter, key)
    got = ops.philox4x32_10(counter.to(device), key.to(device), backend=name).cpu()
    assert torch.equal(got, want)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("backend", BACKENDS)
def test_golden_normals(backend, dtype, spec):
    name, device = backend
    if name == "triton" and dtype == torch.float64:  # 26 s in the interpreter, for a cast that test_matches_reference checks
        pytest.skip("the Triton kernel computes float64 output in float32, as for float32")
    by_place = {}  # (stream, element) -> {seed: normal}: one launch per place covers every seed
    for case in spec["normals"]:
        by_place.setdefault((case["stream"], case["element"]), {})[case["seed"]] = case["normal"]
    runs = {}  # elements 0..3 share the run at offset 0: one launch (the interpreter pays per launch)
    for (stream, e), normals in by_place.items():
        # Each golden element alone (offset = element) and inside a short run around it.
        seeds, want = list(normals), torch.tensor(list(normals.values()), dtype=torch.float64)
        alone = ops.randn(seeds, stream, (1,), offset=e, device=device, dtype=dtype, backend=name)[:, 0].cpu().double()
        start = max(0, e - 3)
        if (stream, start, tuple(seeds)) not in runs:
            runs[stream, start, tuple(seeds)] = ops.randn(seeds, stream, (9,), offset=start, device=device, dtype=dtype,
                                                          backend=name)
        run = runs[stream, start, tuple(seeds)][:, e - start]
        assert (alone - want).abs().max().item() <= 1e-5, (stream, e, alone, want)
        assert (run.cpu().double() - want).abs().max().item() <= 1e-5, (stream, e, run, want)
        if dtype == torch.float64 and name in ("reference", "cpu"):  # these evaluate the spec in float64
            assert (alone - want).abs().max().item() <= 1e-12, (stream, e)


@pytest.mark.parametrize("dtype", list(TOL))
# 2^15 + 5 at offset 7: a full block of the interpreter's 2^15 elements and a partial one (its multi-block case)
@pytest.mark.parametrize("n,offset", [(1, 0), (3, 0), (1023, 0), (37, 5), (6, (1 << 34) + 2), ((1 << 15) + 5, 7),
                                      ((1 << 20) + 5, 7)])
@pytest.mark.parametrize("backend", [b for b in BACKENDS if b.id != "reference"])
def test_matches_reference(backend, n, offset, dtype):
    name, device = backend
    if name == "triton" and n > 1 << 20 and os.environ.get("TRITON_INTERPRET") == "1":  # 132 programs, ~15 s
        pytest.skip("the Triton interpreter's multi-block case is n = 2^15 + 5 (its blocks are 2^15 elements)")
    if name == "triton" and n > 1 << 15 and dtype != torch.float32:  # seconds each in the interpreter
        pytest.skip("the Triton interpreter runs the multi-block cases in float32; the casts are the small cases'")
    seeds = [0, 7, (1 << 63) + 5, U64 - 1]
    want = ops.randn_reference(seeds, 11, (n,), offset=offset, dtype=torch.float64)
    got = ops.randn(seeds, 11, (n,), offset=offset, device=device, dtype=dtype, backend=name)
    assert got.dtype == dtype and got.shape == (4, n) and got.device.type == device
    err = (got.cpu().double() - want).abs()
    tol = TOL[dtype] * (1 if dtype in (torch.float32, torch.float64) else want.abs().clamp(min=1))
    assert bool((err <= tol).all()), f"max error {err.max().item():.3g}"


@pytest.mark.parametrize("backend", BACKENDS)
def test_multidim_shape_is_flattened_c_order(backend):
    name, device = backend
    a = ops.randn([3, 4], 2, (5, 3, 7), device=device, backend=name)
    b = ops.randn([3, 4], 2, (105,), device=device, backend=name)
    assert a.shape == (2, 5, 3, 7)
    assert torch.equal(a.reshape(2, -1), b)


@pytest.mark.parametrize("backend", BACKENDS)
def test_sample_of_batch_equals_seed_alone(backend):
    name, device = backend
    seeds = list(range(100, 116))
    batch = ops.randn(seeds, 3, (4, 33), device=device, backend=name)
    for b in (0, 5, 15):
        alone = ops.randn([seeds[b]], 3, (4, 33), device=device, backend=name)
        assert torch.equal(batch[b], alone[0])


@pytest.mark.parametrize("backend", BACKENDS)
def test_offset_windows_tile_the_stream(backend):
    name, device = backend
    whole = ops.randn([9], 4, (103,), device=device, backend=name)
    parts = [ops.randn([9], 4, (m - s,), offset=s, device=device, backend=name) for s, m in ((0, 5), (5, 50), (50, 103))]
    assert torch.equal(torch.cat(parts, dim=1), whole)


def test_large_seeds_as_ints_or_twos_complement():
    big = [(1 << 63), U64 - 1, (1 << 63) + 12345]
    as_tensor = torch.tensor([s - U64 for s in big], dtype=torch.int64)
    assert torch.equal(ops.randn(big, 0, (17,)), ops.randn(as_tensor, 0, (17,)))
    # and the key halves are really the unsigned seed's: 2^64 - 1 -> key (2^32 - 1, 2^32 - 1)
    w = ops.philox4x32_10_reference(torch.tensor([[0, 0, 0, 0]]), torch.tensor([[M := (1 << 32) - 1, M]]))
    n = ops.randn_reference([U64 - 1], 0, (2,), dtype=torch.float64)[0]
    u = ((w[0, :2] >> 8).double() + 0.5) * 2.0**-24
    r = math.sqrt(-2 * math.log(u[0]))
    assert n[0].item() == pytest.approx(r * math.cos(2 * math.pi * u[1]), abs=1e-12)


def test_cpu_simd_and_portable_loops_agree(monkeypatch):
    """Every SIMD level this machine runs against the portable loop; AVX2 and AVX-512 evaluate the same
    float32 operations in the same order, so they agree bit for bit."""
    if not fastdiff.backends()["cpu"]:
        pytest.skip("cpu backend unavailable")
    best = torch.ops.fastdiff.cpu_simd()
    runs = {}
    for level in ("portable", "avx2", "avx512"):
        monkeypatch.setenv("FASTDIFF_CPU_SIMD", level)
        got = torch.ops.fastdiff.cpu_simd()
        if got != level:  # this CPU (or build) lacks the level: capped to the best it has
            continue
        runs[level] = ops.randn(list(range(5)), 9, (1000, 3), offset=3, backend="cpu")
    monkeypatch.delenv("FASTDIFF_CPU_SIMD")
    assert torch.ops.fastdiff.cpu_simd() == best
    assert best in runs
    for level, out in runs.items():
        torch.testing.assert_close(out, runs["portable"], atol=2e-6, rtol=0, msg=lambda m: f"{level}: {m}")
    if "avx2" in runs and "avx512" in runs:
        assert torch.equal(runs["avx2"], runs["avx512"])


# ---- statistics -------------------------------------------------------------------------------------

N_STAT = 1_000_000


@pytest.fixture(scope="module")
def draws():
    be = "cpu" if fastdiff.backends()["cpu"] else "reference"
    return ops.randn([2024], 0, (N_STAT,), backend=be)[0].double().numpy()


def test_mean_and_variance(draws):
    # 5 sigma bounds: sd(mean) = 1/sqrt(N), sd(var) = sqrt(2/N)
    assert abs(draws.mean()) < 5 / math.sqrt(N_STAT)
    assert abs(draws.var() - 1) < 5 * math.sqrt(2 / N_STAT)
    # higher moments of a standard normal: skewness 0, kurtosis 3 (sd sqrt(6/N), sqrt(24/N))
    assert abs((draws**3).mean()) < 5 * math.sqrt(15 / N_STAT)
    assert abs((draws**4).mean() - 3) < 5 * math.sqrt(96 / N_STAT)


def test_kolmogorov_smirnov(draws):
    from scipy import stats

    result = stats.kstest(draws, "norm")
    assert result.pvalue > 1e-3, result
    # each lane of the groups of 4 on its own (lanes come from different words and cos/sin)
    for lane in range(4):
        assert stats.kstest(draws[lane::4], "norm").pvalue > 1e-4, lane


def test_tails(draws):
    # P(|Z| > 4) = 6.3e-5: expect 63 of 1e6; Poisson sd 8
    count = int((np.abs(draws) > 4).sum())
    assert 25 < count < 110, count
    assert np.abs(draws).max() < 6.0  # the stream's largest radius is sqrt(-2 ln 2^-25) = 5.89


def test_streams_and_seeds_uncorrelated():
    be = "cpu" if fastdiff.backends()["cpu"] else "reference"
    n = 200_000
    x = ops.randn([5, 6], 0, (n,), backend=be).double()
    y = ops.randn([5], 1, (n,), backend=be).double()[0]
    bound = 5 / math.sqrt(n)
    for a, b in ((x[0], y), (x[0], x[1]), (x[0, :-1], x[0, 1:]), (x[0, :-4], x[0, 4:])):
        r = torch.corrcoef(torch.stack([a, b]))[0, 1].item()
        assert abs(r) < bound, r
    # the Box–Muller partners (lanes 0/1) are uncorrelated, also in their squares
    lanes = x[0].reshape(-1, 4)
    assert abs(torch.corrcoef(lanes[:, :2].T)[0, 1].item()) < bound
    assert abs(torch.corrcoef((lanes[:, :2] ** 2).T)[0, 1].item()) < 2 * bound


# ---- errors -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("seeds,exc,word", [
    ([-1], ValueError, "seeds[0]"),
    ([0, U64], ValueError, "seeds[1]"),
    ([1.5], TypeError, "seeds[0]"),
    ([True], TypeError, "seeds[0]"),
    (torch.tensor([1.0]), TypeError, "seeds"),
    (torch.tensor([1], dtype=torch.int32), TypeError, "seeds"),
    (torch.tensor([[1]]), ValueError, "seeds"),
    (3, TypeError, "seeds"),
    ("abc", TypeError, "seeds"),
])
def test_bad_seeds(seeds, exc, word):
    with pytest.raises(exc, match=word.replace("[", r"\[").replace("]", r"\]")):
        ops.randn(seeds, 0, (4,))


@pytest.mark.parametrize("kwargs,exc,word", [
    (dict(stream=-1), ValueError, "stream"),
    (dict(stream=1 << 32), ValueError, "stream"),
    (dict(stream=1.0), TypeError, "stream"),
    (dict(shape=(2, -1)), ValueError, "shape"),
    (dict(shape=(2.0,)), TypeError, "shape"),
    (dict(dtype=torch.int32), TypeError, "dtype"),
    (dict(dtype="float32"), TypeError, "dtype"),
    (dict(offset=-3), ValueError, "offset"),
    (dict(backend="fast"), ValueError, "backend"),
    (dict(backend=3), TypeError, "backend"),
])
def test_bad_arguments(kwargs, exc, word):
    args = dict(seeds=[0], stream=0, shape=(4,))
    args.update(kwargs)
    with pytest.raises(exc, match=word):
        ops.randn(args.pop("seeds"), args.pop("stream"), args.pop("shape"), **args)


def test_empty_outputs():
    for be in ("reference", "cpu"):
        if not fastdiff.backends()[be]:
            continue
        assert ops.randn([], 0, (3,), backend=be).shape == (0, 3)
        assert ops.randn([1, 2], 0, (0, 5), backend=be).shape == (2, 0, 5)


# ---- torch.library integration ---------------------------------------------------------------------

def test_opcheck_cpu():
    if not fastdiff.backends()["cpu"]:
        pytest.skip("cpu backend unavailable")
    seeds = torch.tensor([0, 3, -1], dtype=torch.int64)
    for dtype in (torch.float32, torch.float16, torch.float64):
        torch.library.opcheck(torch.ops.fastdiff.randn.default, (seeds, 5, [7, 3], 2, dtype))
    counter = torch.tensor([[1, 2, 3, 4], [0, 0, 0, 0]], dtype=torch.int64)
    key = torch.tensor([[5, 6], [0, 0]], dtype=torch.int64)
    torch.library.opcheck(torch.ops.fastdiff.philox4x32_10.default, (counter, key))


def test_torch_compile_traces_randn():
    if not fastdiff.backends()["cpu"]:
        pytest.skip("cpu backend unavailable")
    seeds = torch.tensor([1, 2], dtype=torch.int64)

    def f(s):
        return torch.ops.fastdiff.randn(s, 3, [10], 0, torch.float32) * 2 + 1

    compiled = torch.compile(f, backend="eager", fullgraph=True)
    assert torch.equal(compiled(seeds), f(seeds))


@pytest.mark.cuda
def test_cuda_graph_replay_with_new_seeds():
    if not fastdiff.backends()["cuda"]:
        pytest.skip("cuda backend unavailable")
    seeds = torch.tensor([1, 2, 3], dtype=torch.int64, device="cuda")
    torch.ops.fastdiff.randn(seeds, 5, [1000], 0, torch.float32)  # warm up outside capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = torch.ops.fastdiff.randn(seeds, 5, [1000], 0, torch.float32)
    seeds.copy_(torch.tensor([7, 8, 9], device="cuda"))
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(out.cpu(), ops.randn([7, 8, 9], 5, (1000,), backend="cpu" if fastdiff.backends()["cpu"] else "reference")) or \
        torch.allclose(out.cpu(), ops.randn_reference([7, 8, 9], 5, (1000,)), atol=1e-5, rtol=0)


_RANDN_SM90 = r'''
import re
from fastdiff.kernels import randn as module

kernel = module._randn_kernel
module._randn_kernel = Record("randn")
for B, n, offset, dtype in [(3, 1024, 0, torch.float32), (2, 1, 1, torch.float32), (2, 67, 3, torch.bfloat16),
                            (1, 4096, 2, torch.float16)]:
    calls.clear()
    module.randn(torch.arange(B), 7, (n,), offset, dtype)
    ptx = compile_sm90(kernel, calls[0][1], calls[0][2], "ptx")
    print(n, offset, str(dtype), len(re.findall(r"st\.global\.v4", ptx)), len(re.findall(r"bar\.sync", ptx)))
'''


def test_triton_randn_stores_vectors_on_sm90(tmp_path):
    """lane0 and n are specialized, so the aligned fp32 draw (offset 0, n % 16 == 0) stores 16-byte vectors with
    no shared-memory shuffle in the sm_90 PTX (unspecialized: 8 scalar stores and 15 bar.sync per thread); the
    other launches (n = 1 and lane0 = 1 become constexprs; odd n and offsets; 16-bit outputs) compile."""
    from triton_testing import run_script

    lines = [line.split() for line in run_script(_RANDN_SM90, tmp_path).splitlines() if line[:1].isdigit()]
    assert len(lines) == 4
    n, offset, dtype, vectors, barriers = lines[0]
    assert int(vectors) >= 1 and int(barriers) == 0, lines[0]
