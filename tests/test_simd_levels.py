"""The CPU kernels at every instruction-set level this machine runs (portable, AVX2, AVX-512; chosen
at run time, capped with FASTDIFF_CPU_SIMD) against each other. AVX2 and AVX-512 evaluate the same
float32 operations in the same order, so they must agree bit for bit; the portable loop uses Sleef's
log/sin/cos and agrees within the noise spec's tolerance."""

import pytest
import torch

import fastdiff
from fastdiff import ops

pytestmark = pytest.mark.skipif(not fastdiff.backends()["cpu"], reason="cpu backend unavailable")
LEVELS = ("portable", "avx2", "avx512")


def _at_levels(monkeypatch, fn):
    """{level: fn()} for every level the CPU and build support."""
    out = {}
    for level in LEVELS:
        monkeypatch.setenv("FASTDIFF_CPU_SIMD", level)
        if torch.ops.fastdiff.cpu_simd() == level:
            out[level] = fn()
    monkeypatch.delenv("FASTDIFF_CPU_SIMD")
    assert "portable" in out
    return out


def _compare(runs, atol):
    if len(runs) < 2:  # comparing the portable loop with itself would pass vacuously
        pytest.skip(f"only the portable level runs on this CPU and build ({torch.ops.fastdiff.cpu_simd()}): "
                    "no second level to compare with")
    for level, got in runs.items():
        if level == "portable":
            continue
        for g, want in zip(got, runs["portable"]):
            torch.testing.assert_close(g, want, atol=atol, rtol=atol, msg=lambda m: f"{level} vs portable: {m}")
    if "avx2" in runs and "avx512" in runs:
        for a, b in zip(runs["avx2"], runs["avx512"]):
            assert torch.equal(a, b), "avx2 and avx512 differ"


# n per sample: one partial 64-block, one full 128-block plus a partial one, several blocks + a tail
@pytest.mark.parametrize("n", [37, 200, 4099])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_guided_step_levels_agree(monkeypatch, n, dtype):
    g = torch.Generator().manual_seed(n)
    B = 3
    x = torch.randn(B, n, generator=g)
    cond, uncond = (torch.randn(B, n, generator=g).to(dtype) for _ in range(2))
    extra = torch.randn(B, n, generator=g)
    seeds = torch.tensor([7, 8, 9])

    def run():
        out, side = torch.empty_like(x), torch.empty_like(x)
        ops.guided_step(x, cond, uncond, extra=extra, seeds=seeds, stream=4, cfg=3.5, c_x=0.9, c_pred=0.1,
                        c_extra=-0.05, c_noise=0.3, s_x=1.0, s_pred=-0.5, out=out, side=side, backend="cpu")
        return out, side

    _compare(_at_levels(monkeypatch, run), atol=2e-6)


@pytest.mark.parametrize("n", [37, 200, 4099])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_loss_levels_agree(monkeypatch, n, dtype):
    g = torch.Generator().manual_seed(n)
    z = torch.randn(2, n, generator=g)
    pred = torch.randn(2, n, generator=g).to(dtype)
    t = torch.tensor([0.3, 0.8], dtype=torch.float64)
    seeds = torch.tensor([11, 12])

    def run():
        x_t = ops.add_noise(z, t, seeds, 5, "condot", backend="cpu")
        p = pred.clone().requires_grad_()
        loss = ops.diffusion_loss(p, z, t, seeds, 5, "condot", "velocity", reduction="none", backend="cpu")
        loss.sum().backward()
        return x_t, loss.detach(), p.grad

    _compare(_at_levels(monkeypatch, run), atol=1e-5)
