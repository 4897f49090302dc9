"""Small calls of every native and Triton kernel, each checked against its reference: what bench/gpu_check.sh runs
under compute-sanitizer (memcheck, racecheck) on a GPU, and as a plain check in its dry run on the CPU. Odd sizes
(partial blocks and vectors), the largest counts (K1 = 8, H = 4, D = 4; a Gram of T = 8), per-sample rows, a
prepared call on a batched output, an offset draw, a batch of one large sample and many tiny ones.

    python bench/sanitizer_calls.py --device cuda
"""

from __future__ import annotations

import argparse
import sys

import torch

import fastdiff
from fastdiff.ops.diffusion_loss import add_noise, diffusion_loss
from fastdiff.ops.randn import randn
from fastdiff.ops.sample_gram import sample_gram
from fastdiff.ops.sampler_step import KERNEL_ARGS, prepare, sampler_step
from fastdiff.ops.step_call import step_call


def _close(name: str, got, want, tol: float) -> bool:
    err = (got.double() - want.double()).abs().max().item() if got.numel() else 0.0
    ok = err <= tol and torch.isfinite(got).all().item()
    print(f"{'ok  ' if ok else 'FAIL'} {name}: max |err| {err:.3g}", flush=True)
    return ok


def run(device: str) -> bool:
    ok = True
    dev = torch.device(device)
    backends = [b for b in ("cpu", "cuda", "triton") if fastdiff.backends()[b].available
                and (b == "triton" or (b == "cuda") == (dev.type == "cuda"))]
    g = torch.Generator().manual_seed(0)
    for backend in backends:
        for B, n, K1, H, D, per in ((3, 1027, 8, 4, 4, True), (1, 9, 2, 1, 1, False), (257, 3, 3, 0, 2, True)):
            x = torch.randn(B, n, generator=g).to(dev)
            preds = [torch.randn(B, n, generator=g).to(dev) for _ in range(K1)]
            history = [torch.randn(B, n, generator=g).to(dev) for _ in range(H)]
            M = 2 + H + D
            weights = torch.rand(B, K1, generator=g).to(dev) if per else [1.0] * K1
            coeffs = torch.randn(B, 2 * M, generator=g).to(dev) if per else torch.randn(2 * M, generator=g).tolist()
            seeds = torch.arange(B, device=dev) * 7 + 1
            kw = dict(weights=weights, history=history, coeffs=coeffs, seeds=seeds, streams=list(range(3, 3 + D)))
            want = sampler_step(x, preds, backend="reference", side=torch.empty_like(x), **kw)
            got = sampler_step(x, preds, backend=backend, side=torch.empty_like(x), **kw)
            ok &= _close(f"{backend} sampler_step B={B} n={n} K1={K1} H={H} D={D}", got, want, 1e-4)
            if K1 == 2 and D == 1:  # a prepared call on one batched output [p_1, p_0]
                outs = [torch.empty_like(x)]
                call = prepare(x, preds, kw["weights"], history, coeffs, seeds, kw["streams"], outs, None, None)
                step_call(backend, tuple(call[k] for k in KERNEL_ARGS), [1, 0])(torch.cat([preds[1], preds[0]]))
                ok &= _close(f"{backend} prepared call B={B} n={n}", outs[0], got, 1e-4)
        for B, shape, offset in ((5, (1031,), 3), (1, (2**20 + 7,), 1)):
            seeds = torch.arange(B, device=dev) + 11
            got = randn(seeds, 9, shape, offset=offset, device=dev, backend=backend)
            want = randn(seeds.cpu(), 9, shape, offset=offset, backend="reference")
            ok &= _close(f"{backend} randn B={B} n={shape[0]} offset={offset}", got.cpu(), want, 1e-5)
        for B, n, K, D in ((2, 5000, 4, 4), (1, 70001, 8, 0), (300, 2, 2, 1), (1, 65 * 4096 + 3, 2, 1)):
            terms = [torch.randn(B, n, generator=g).to(dev) for _ in range(K)]
            seeds = torch.arange(B, device=dev)
            got = sample_gram(terms, seeds=seeds, streams=list(range(D)), backend=backend)
            want = sample_gram([t.cpu() for t in terms], seeds=seeds.cpu(), streams=list(range(D)),
                               backend="reference")
            # sums of n products of normals that agree to ~1e-6 relative
            ok &= _close(f"{backend} sample_gram B={B} n={n} K={K} D={D}", got.cpu(), want, 2e-5 * n)
        # the loss at times (coefficients in the kernels): blocks per chunk, and a warp per sample up to 512
        for B, n, path in ((4, 3001, "condot"), (37, 6, "vp"), (3, 512, "vp-cosine")):
            z = torch.randn(B, n, generator=g).to(dev)
            t = torch.rand(B, generator=g).to(dev)
            seeds = torch.arange(B, device=dev)
            pred = torch.randn(B, n, generator=g).to(dev)

            def loss_outputs(be):
                p = pred.clone().requires_grad_()
                loss = diffusion_loss(p, z, t, seeds, 5, path, backend=be)
                loss.backward()
                return {"xt": add_noise(z, t, seeds, 5, path, backend=be), "loss": loss.detach(), "grad": p.grad}

            mine, ref = loss_outputs(backend), loss_outputs("reference")
            for key in ("xt", "loss", "grad"):
                ok &= _close(f"{backend} loss {key} B={B} n={n} {path}", mine[key], ref[key], 1e-5)
    if dev.type == "cuda":
        torch.cuda.synchronize()
    return ok


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ok = run(p.parse_args().device)
    print("all calls match their references" if ok else "SOME CALLS DIFFER FROM THEIR REFERENCES", flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
