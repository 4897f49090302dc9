"""The per-sample reduction pass fastdiff.ops.sample_gram: the reference against direct float64 sums, the
CPU kernel against the reference (every SIMD level, odd sizes, 16-bit terms, noise draws), its
independence of batch and thread count, its errors, and a guidance rule built from it (CFG rescale:
one Gram pass + per-sample weights in sampler_step) against diffusers' rescale_noise_cfg."""

import pytest
import torch

import fastdiff
from fastdiff.ops.randn import randn, randn_reference
from fastdiff.ops.sample_gram import (CHUNK, MAX_TERMS, packed_size, run_reference, sample_gram,
                                      sample_gram_reference, unpack)
from fastdiff.ops.sampler_step import sampler_step, sampler_step_reference
from fastdiff.sampling.features.guidance import CFG, branch_weights

HAVE_CPU = fastdiff.backends()["cpu"].available
needs_cpu = pytest.mark.skipif(not HAVE_CPU, reason=f"cpu: {fastdiff.backends()['cpu'].reason}")
needs_cpu_op = pytest.mark.skipif(not (HAVE_CPU and hasattr(torch.ops.fastdiff, "sample_gram")),
                                  reason="the built extension has no fastdiff::sample_gram")
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
SIZES = [1, 3, 64, 129, CHUNK - 1, CHUNK, CHUNK + 1, 2 * CHUNK + 904]


def _terms(B, n, K, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    # offsets make the sums large against the spreads (the case where a float32 sum would lose digits)
    return [(torch.randn(B, n, generator=g) * (k + 1) + 3.0 * k).to(dtype) for k in range(K)]


def _scale(terms):
    """Sum of |products| and |values| per entry: the size that float64 summation rounding is relative to."""
    return sample_gram_reference([t.float().abs() for t in terms])


def test_reference_is_the_gram_matrix_of_one_terms_and_draws():
    B, n = 3, 37
    terms = _terms(B, n, 2, torch.float32)
    seeds = torch.tensor([5, 6, -7])  # -7: the seed 2^64 - 7 in two's complement
    G = sample_gram_reference(terms, seeds=seeds, streams=[9])
    z = randn_reference(seeds, 9, (n,))
    u = torch.stack([torch.ones(B, n, dtype=torch.float64), *(t.double() for t in terms), z.double()], 1)
    torch.testing.assert_close(G, u @ u.transpose(1, 2), rtol=1e-14, atol=1e-12)
    assert G.dtype == torch.float64 and G.shape == (B, 4, 4)
    assert torch.equal(G, G.transpose(1, 2))


def test_unpack_places_sums_and_products():
    T, n = 3, 10
    packed = torch.arange(1, packed_size(T) + 1, dtype=torch.float64)[None]
    G = unpack(packed, T, n)[0]
    assert G[0, 0] == n and G[0, 1:].tolist() == [1, 2, 3] and G[1:, 0].tolist() == [1, 2, 3]
    assert G[1, 1:].tolist() == [4, 5, 6] and G[2, 2:].tolist() == [7, 8] and G[3, 3] == 9
    assert torch.equal(G, G.T)


@needs_cpu_op
@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_cpu_kernel_equals_reference(n, dtype):
    B = 3
    terms = _terms(B, n, 3, dtype, seed=n)
    got = sample_gram(terms, backend="cpu")
    ref = sample_gram_reference(terms)
    assert (got - ref).abs().le(1e-13 * _scale(terms) + 1e-300).all()


@needs_cpu_op
@pytest.mark.parametrize("K,D", [(1, 1), (2, 2), (1, 4), (4, 4), (3, 0)])
@pytest.mark.parametrize("n", [5, 130, CHUNK + 3])
def test_cpu_kernel_draws_are_the_streams_normals(K, D, n):
    # the kernel's normals are the CPU randn's (Sleef), so the reference is fed those as terms
    B = 2
    seeds = torch.tensor([11, 2**40 + 3])
    streams = [1 + 7 * d for d in range(D)]
    terms = _terms(B, n, K, torch.float32, seed=D)
    got = sample_gram(terms, seeds=seeds, streams=streams, backend="cpu")
    normals = [randn(seeds, s, (n,), backend="cpu") for s in streams]
    ref = sample_gram_reference(terms + normals)
    assert (got - ref).abs().le(1e-13 * _scale(terms + normals)).all()
    # and against the spec's own normals (libm): float32 rounding of each normal
    spec = sample_gram_reference(terms, seeds=seeds, streams=streams)
    torch.testing.assert_close(got, spec, rtol=1e-5, atol=1e-3 * n**0.5)


@needs_cpu_op
def test_cpu_levels_agree_and_results_do_not_depend_on_batch_or_threads(monkeypatch):
    n, seeds = 2 * CHUNK + 77, torch.tensor([3, 4, 5])
    terms = _terms(3, n, 2, torch.bfloat16)
    runs = {}
    for level in ("portable", "avx2", "avx512"):
        monkeypatch.setenv("FASTDIFF_CPU_SIMD", level)
        if torch.ops.fastdiff.cpu_simd() != level:
            continue
        runs[level] = sample_gram(terms, seeds=seeds, streams=[2], backend="cpu")
        alone = torch.cat([sample_gram([t[b:b + 1] for t in terms], seeds=seeds[b:b + 1], streams=[2], backend="cpu")
                           for b in range(3)])
        assert torch.equal(alone, runs[level])
        threads = torch.get_num_threads()
        try:
            torch.set_num_threads(1)
            assert torch.equal(sample_gram(terms, seeds=seeds, streams=[2], backend="cpu"), runs[level])
        finally:
            torch.set_num_threads(threads)
    monkeypatch.delenv("FASTDIFF_CPU_SIMD")
    # the levels' normals agree to float32 rounding (their transcendental functions differ in the last bits)
    first = next(iter(runs.values()))
    for level, G in runs.items():
        torch.testing.assert_close(G, first, rtol=1e-6, atol=1e-3, msg=level)
        torch.testing.assert_close(G[:, :3, :3], first[:, :3, :3], rtol=1e-12, atol=1e-9, msg=level)  # the terms


@needs_cpu_op
def test_opcheck_and_noncontiguous_terms():
    terms = _terms(2, 40, 2, torch.float32)
    torch.library.opcheck(torch.ops.fastdiff.sample_gram.default, ([t for t in terms], torch.tensor([1, 2]), [3]))
    wide = torch.randn(2, 80)[:, ::2]  # not contiguous: the public op makes it so
    torch.testing.assert_close(sample_gram([wide], backend="cpu"), sample_gram_reference([wide.contiguous()]))


def test_empty_batches_and_samples():
    assert sample_gram([torch.empty(0, 5)]).shape == (0, 2, 2)
    G = sample_gram([torch.empty(2, 0), torch.empty(2, 0)])
    assert G.shape == (2, 3, 3) and not G.any()


@pytest.mark.parametrize("kwargs,exc,match", [
    (dict(terms=torch.zeros(2, 3)), TypeError, "terms must be a list"),
    (dict(terms=[]), ValueError, "at least one tensor"),
    (dict(terms=[torch.zeros(2, 3), torch.zeros(2, 4)]), ValueError, r"terms\[1\] must have terms\[0\]'s shape"),
    (dict(terms=[torch.zeros(2, 3), torch.zeros(2, 3, dtype=torch.float16)]), TypeError, r"terms\[1\] must have"),
    (dict(terms=[torch.zeros(2, 3, dtype=torch.float64)]), TypeError, r"terms\[0\] must be float32"),
    (dict(terms=[torch.zeros(2, 3)], streams=[1]), ValueError, "seeds are required"),
    (dict(terms=[torch.zeros(2, 3)], seeds=[1, 2, 3]), ValueError, "one seed per sample"),
    (dict(terms=[torch.zeros(2, 3)] * 5, seeds=[1, 2], streams=[1, 2, 3, 4]), ValueError, f"at most {MAX_TERMS}"),
    (dict(terms=[torch.zeros(2, 3)], seeds=[1, 2], streams=[1] * 5), ValueError, "at most 4"),
    (dict(terms=[torch.zeros(2, 3)], seeds=[1, 2], streams=[-1]), ValueError, r"streams\[0\]"),
    (dict(terms=[torch.zeros(())]), ValueError, "batch dimension"),
])
def test_bad_arguments_name_the_argument(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        sample_gram(**kwargs)
    with pytest.raises(exc, match=match):
        sample_gram_reference(**kwargs)


# ---- a rule on the pass: CFG rescale ("Common Diffusion Noise Schedules and Sample Steps are Flawed"), whose
# per-sample weights fastdiff.sampling.features.guidance.branch_weights makes from the Gram matrix ----

@pytest.mark.parametrize("backend", ["reference", pytest.param("cpu", marks=needs_cpu_op)])
def test_cfg_rescale_from_one_gram_pass_matches_diffusers(backend):
    guider_utils = pytest.importorskip("diffusers.guiders.guider_utils")
    g = torch.Generator().manual_seed(1)
    B, S, cfg, phi = 3, (4, 9, 7), 5.0, 0.7
    x = torch.randn(B, *S, generator=g)
    p_null = torch.randn(B, *S, generator=g)
    p_y = 0.6 * p_null + 0.8 * torch.randn(B, *S, generator=g) + 0.3
    G = sample_gram([p_null, p_y], backend=backend)
    weights = branch_weights(G, CFG(), cfg, phi, torch.empty(B, 2))
    h = 0.05  # an Euler step x + h g
    out = sampler_step(x, [p_null, p_y], weights=weights, coeffs=[1.0, h, 0.0, 0.0], backend=backend)
    g_cfg = p_null.double() + cfg * (p_y.double() - p_null.double())
    expected = x.double() + h * guider_utils.rescale_noise_cfg(g_cfg, p_y.double(), guidance_rescale=phi)
    torch.testing.assert_close(out.double(), expected, rtol=0, atol=2e-6)
    # the reference step on the same per-sample weights agrees with the kernel
    ref = sampler_step_reference(x, [p_null, p_y], weights=weights, coeffs=[1.0, h, 0.0, 0.0])
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-6)


def test_reference_kernel_registered_for_the_reference_backend():
    terms = _terms(2, 10, 2, torch.float32)
    packed = run_reference(terms, torch.zeros(2, dtype=torch.int64), [])
    torch.testing.assert_close(unpack(packed, 2, 10), sample_gram(terms, backend="reference"), rtol=0, atol=0)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", [1, 6, 512, 513, CHUNK + 1, 3 * CHUNK + 2])  # a warp per sample up to 512
def test_cuda_kernel_equals_reference_and_is_batch_independent(n, dtype):
    if not fastdiff.backends()["cuda"].available:
        pytest.skip(f"cuda: {fastdiff.backends()['cuda'].reason}")
    B, seeds, streams = 3, torch.tensor([7, 8, 9], device="cuda"), [4, 5]
    terms = [t.cuda() for t in _terms(B, n, 2, dtype, seed=n)]
    got = sample_gram(terms, seeds=seeds, streams=streams, backend="cuda")
    normals = [randn(seeds, s, (n,), backend="cuda") for s in streams]  # the kernel's own normals
    ref = sample_gram_reference(terms + normals)
    assert (got - ref).abs().le(1e-13 * _scale(terms + normals)).all()
    alone = torch.cat([sample_gram([t[b:b + 1] for t in terms], seeds=seeds[b:b + 1], streams=streams,
                                   backend="cuda") for b in range(B)])
    assert torch.equal(alone, got)
