"""The Triton per-sample Gram sums (fastdiff/kernels/sample_gram.py) against the specification,
fastdiff.ops.sample_gram.run_reference (through sample_gram(..., backend="triton") and
sample_gram_reference): odd sizes, one sample and several, K = 1..3 terms, D = 0..2 draws, T = 8, every
dtype, non-contiguous terms, the chunk loop, batch chunking, batch independence, and an sm_90 compile.

Tolerance: 1e-12 of the sums of |products| (the reference on absolute values): the kernel and the
reference form each chunk's sums in float64 in different orders, and add the chunks in the same order.
The draws are the Triton normals (philox.normal4, the code of fastdiff.kernels.randn), which agree with
randn_reference only within float32 rounding; so with draws the kernel is compared at 1e-12 with the
reference run on those normals passed as terms, and with the reference's own draws at 1e-5.
"""

import pytest
import torch

from fastdiff.ops.sample_gram import run_reference, sample_gram, sample_gram_reference, unpack
from triton_testing import DEVICE, TRITON_MARKS, run_script

pytestmark = TRITON_MARKS
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
STREAMS = [7, 2**32 - 1, 2**31]  # ids >= 2^31 pass as int32 bit patterns


def _kernel():
    from fastdiff.kernels import sample_gram as module

    return module


def _terms(B, n, K, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    # mixed scales and signs, exactly representable in dtype
    return [(torch.randn(B, n, generator=g) * 3.0 ** k + k).to(dtype).to(DEVICE) for k in range(K)]


def _seeds(B):
    return torch.tensor([12345, -1, 2**40 + 3][:B] + list(range(B - 3)), dtype=torch.int64, device=DEVICE)


def _check(terms, seeds, streams):
    """sample_gram on the triton backend against the reference; returns the triton result."""
    got = sample_gram(terms, seeds=seeds, streams=streams, backend="triton")
    B = terms[0].shape[0]
    n, T = terms[0].numel() // B, len(terms) + len(streams)
    flat = [t.contiguous().reshape(B, n) for t in terms]
    draws = [_kernel_normals(seeds, s, n) for s in streams]
    want = unpack(run_reference(flat + draws, seeds, []), T, n)  # the reference's sums of the kernel's u
    scale = unpack(run_reference([u.abs() for u in flat + draws], seeds, []), T, n)
    assert got.dtype == torch.float64 and got.shape == (B, T + 1, T + 1)
    assert ((got - want).abs() <= 1e-12 * scale).all(), ((got - want).abs() / scale).max()
    spec = sample_gram_reference(terms, seeds=seeds, streams=streams)  # with randn_reference's normals
    assert ((got - spec).abs() <= (1e-12 if not streams else 1e-5) * scale).all(), ((got - spec).abs() / scale).max()
    return got


def _kernel_normals(seeds, stream, n):
    from fastdiff.kernels.randn import randn

    return randn(seeds, stream, (n,))


# (n, B, K, D, dtype)
CASES = [
    (1, 1, 1, 0, torch.float32),
    (1, 3, 2, 2, torch.bfloat16),
    (3, 3, 1, 1, torch.float16),
    (3, 1, 3, 2, torch.float32),
    (37, 3, 2, 1, torch.bfloat16),
    (4095, 1, 2, 0, torch.float16),
    (4095, 3, 1, 2, torch.float32),
    (4097, 3, 3, 1, torch.float32),
    (4097, 1, 1, 2, torch.bfloat16),
    (9000, 3, 2, 2, torch.float16),
]


@pytest.mark.parametrize("n,B,K,D,dtype", CASES,
                         ids=[f"n{c[0]}-B{c[1]}-K{c[2]}-D{c[3]}-{str(c[4])[6:]}" for c in CASES])
def test_matches_reference(n, B, K, D, dtype):
    _check(_terms(B, n, K, dtype, seed=n + K), _seeds(B), STREAMS[:D])


@pytest.mark.parametrize("K,D", [(8, 0), (4, 4), (6, 2)])
def test_eight_vectors(K, D):
    B, n = 3, 37
    _check(_terms(B, n, K, torch.float32, seed=K), _seeds(B), [3, 2**32 - 1, 0, 11][:D])


def test_non_contiguous_and_shapes():
    """A [B, 5, 7] view transposed (made contiguous by the op), terms of several dims."""
    x = _terms(3, 35, 2, torch.float16, seed=1)
    terms = [t.reshape(3, 5, 7).transpose(1, 2) for t in x]
    assert not terms[0].is_contiguous()
    got = _check(terms, _seeds(3), STREAMS[:1])
    assert torch.equal(got, sample_gram([t.contiguous() for t in terms], seeds=_seeds(3), streams=STREAMS[:1],
                                        backend="triton"))


def test_sample_does_not_depend_on_batch():
    """Row b of a batch is bit for bit the result of sample b alone."""
    B, n = 3, 4097
    terms, seeds = _terms(B, n, 2, torch.float32, seed=5), _seeds(B)
    batch = sample_gram(terms, seeds=seeds, streams=STREAMS[:2], backend="triton")
    for b in range(B):
        alone = sample_gram([t[b:b + 1] for t in terms], seeds=seeds[b:b + 1], streams=STREAMS[:2], backend="triton")
        assert torch.equal(batch[b], alone[0]), b


def test_many_chunks_are_added_by_tiles():
    """More than SERIAL_CHUNKS chunks (74 here): the finish adds tiles of 64 chunks, each as a tree; the result
    stays the reference's (within float64 rounding) and each sample's does not depend on the batch."""
    from fastdiff.kernels.sample_gram import SERIAL_CHUNKS

    B, n = 2, 74 * 4096 - 5
    assert -(-n // 4096) > SERIAL_CHUNKS
    terms, seeds = _terms(B, n, 1, torch.float32, seed=9), _seeds(B)
    batch = _check(terms, seeds, STREAMS[:1])
    for b in range(B):
        alone = sample_gram([t[b:b + 1] for t in terms], seeds=seeds[b:b + 1], streams=STREAMS[:1], backend="triton")
        assert torch.equal(batch[b], alone[0]), b


def test_blocked_chunks_and_grid_chunks(monkeypatch):
    """Several blocks per chunk (the GPU's walk, 256 groups a block here), and a batch launched in
    pieces of 2 samples (the grid-y limit): the same sums."""
    module = _kernel()
    B, n = 5, 5000
    terms, seeds = _terms(B, n, 2, torch.float32, seed=9), torch.arange(B, dtype=torch.int64, device=DEVICE)
    whole = _check(terms, seeds, STREAMS[:1])
    monkeypatch.setattr(module, "_block_max", lambda: 256)
    monkeypatch.setattr(module, "_MAX_GRID_Y", 2)
    pieces = _check(terms, seeds, STREAMS[:1])
    assert torch.equal(pieces[:2], sample_gram([t[:2] for t in terms], seeds=seeds[:2], streams=STREAMS[:1],
                                               backend="triton"))
    if DEVICE == "cpu":  # one block per chunk vs four: only the summation order inside a chunk differs
        scale = unpack(run_reference([t.abs() for t in terms] + [_kernel_normals(seeds, STREAMS[0], n).abs()],
                                     seeds, []), 3, n)
        assert ((whole - pieces).abs() <= 1e-12 * scale).all()


_SM90_SCRIPT = r'''
from fastdiff.kernels import sample_gram as module

kernels = {"chunk": module._chunk_kernel, "total": module._total_kernel}
module._chunk_kernel, module._total_kernel = Record("chunk"), Record("total")
for B, n, dtype, K, D in [(2, 4096, torch.float16, 2, 1), (3, 9000, torch.float32, 4, 4),
                          (3, 67, torch.bfloat16, 8, 0), (1, 65 * 4096, torch.float32, 1, 0)]:
    calls.clear()
    module.sample_gram([torch.randn(B, n).to(dtype) for _ in range(K)], torch.arange(B), [3, 2**32 - 1, 5, 6][:D])
    assert [c[0] for c in calls] == ["chunk", "total"], calls
    for name, args, kwargs in calls:
        print("compiled", name, (K, D, str(dtype)), len(compile_sm90(kernels[name], args, kwargs)))
        if name == "chunk":  # the step loop's body: from the scf.for to its scf.yield
            ttgir = compile_sm90(kernels[name], args, kwargs, "ttgir")
            loop = ttgir[ttgir.index("scf.for"):ttgir.index("scf.yield")]
            print("reductions", loop.count('"tt.reduce"'), ttgir.count('"tt.reduce"'))
'''


def test_compiles_for_sm90(tmp_path):
    """Both kernels of the launches the wrapper makes (a common case, T = 8 with 4 draws, 8 terms, 65 chunks) compile
    to sm_90 cubins through Triton's own argument binder, without a GPU (tests/triton_testing.py), and the
    chunk kernel reduces nothing inside its step loop (each of its P sums once, after it: it had 2 P
    reductions, with their shuffles and barriers, in every step)."""
    out = run_script(_SM90_SCRIPT, tmp_path)
    assert out.count("compiled") == 8  # the last launch's finish adds tiles of chunks
    reductions = [line.split()[1:] for line in out.splitlines() if line.startswith("reductions")]
    assert len(reductions) == 4 and all(inside == "0" and int(total) > 0 for inside, total in reductions), out


def test_chunk_and_limits_are_the_specifications():
    """The kernel module keeps its own copies (fastdiff.kernels imports nothing from fastdiff.ops)."""
    import importlib

    module = importlib.import_module("fastdiff.kernels.sample_gram")
    spec = importlib.import_module("fastdiff.ops.sample_gram")  # fastdiff.ops.sample_gram is also the function
    assert (module.CHUNK, module.MAX_TERMS, module.MAX_DRAWS) == (spec.CHUNK, spec.MAX_TERMS, spec.MAX_DRAWS)
