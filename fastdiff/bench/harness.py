"""Benchmark cases: each fused op next to the same work written in eager PyTorch the way users write
it, torch.compile of that, and fastdiff's reference op. One definition feeds the pytest-benchmark
suites (bench/) and the interleaved report (``fastdiff bench``, ``python bench/report.py``).

Cases (N elements of fp32 state; the guided cases take one [2B] prediction, cfg = 4, CondOT velocity):

- ``step_sde``: Euler–Maruyama with σ = 1 (SDE extension trick, score from velocity), noise inside
  the kernel vs ``torch.randn_like`` in eager;
- ``step_ode``: the Euler ODE step with guidance;
- ``loss``: noising + loss forward + backward (eager stores ε from ``torch.randn_like`` and the target);
- ``rescale``, ``apg``: one Euler step with CFG rescale / adaptive projected guidance, fused (reduction
  pass + per-sample weights + step) vs diffusers' formula in eager (fastdiff.bench.guidance);
- ``randn``: ``fastdiff.ops.randn`` vs ``torch.randn``;
- ``copy``: a device-to-device copy of N fp32 elements, the bandwidth yardstick;
- ``loop``: whole sampling loops against the peers' (fastdiff.bench.loops);
- ``methods``: each registered method's fused step per model evaluation against Euler's
  (fastdiff.bench.methods);
- ``langevin``: Langevin / MALA chains against the lectures' loop (fastdiff.bench.langevin);
- ``latency``: sampling loops' per-call and per-step overhead on a free model, small batches, fastdiff and
  its adapters against the peers' loops (fastdiff.bench.latency; its cases do not depend on N).
"""

from __future__ import annotations

import math

import torch

from fastdiff.bench.case import BATCH, CFG, DT, SIGMA, T, Case, _dtype, _sde_coefficients  # noqa: F401 (tests)
from fastdiff.bench.loops import (LOOP_PARTS, LOOP_SHAPE, LOOP_STEPS, PEERS, CheapModel,  # noqa: F401
                                  condot_denoiser, loop_cases, loop_split_rows)
from fastdiff.bench.guidance import rescale_cases
from fastdiff.bench.langevin import langevin_cases
from fastdiff.bench.methods import method_cases
from fastdiff.bench.timing import _sync, device_name, peak_memory, time_interleaved  # noqa: F401

__all__ = ["OPS", "BASELINES", "Case", "CheapModel", "LOOP_SHAPE", "LOOP_STEPS", "PEERS", "cases", "condot_denoiser",
           "copy_case", "device_name", "eager_loss", "eager_ode_step", "eager_sde_step", "gram_cases", "loop_cases",
           "loss_cases", "method_cases", "randn_cases", "report", "rescale_cases", "step_cases", "time_interleaved"]

OPS = ("step_sde", "step_ode", "gram", "rescale", "apg", "loss", "randn", "loop", "methods", "langevin", "latency")


def eager_sde_step(x, out2b, *, cfg=CFG, t=T, dt=DT, sigma=SIGMA, noise_like=torch.randn_like):
    """The SDE step as users write it: split, guide, convert, update, draw noise."""
    cond, uncond = out2b.float().chunk(2)
    u = uncond + cfg * (cond - uncond)
    score = (t * u - x) / (1.0 - t)
    drift = u + 0.5 * sigma**2 * score
    return x + dt * drift + sigma * math.sqrt(dt) * noise_like(x)


def eager_ode_step(x, out2b, *, cfg=CFG, dt=DT):
    cond, uncond = out2b.float().chunk(2)
    return x + dt * (uncond + cfg * (cond - uncond))


def eager_loss(pred, z, t, *, noise_like=torch.randn_like):
    """Noising, velocity target and MSE as users write it (ε and the target are stored)."""
    eps = noise_like(z)
    tt = t.view(-1, *([1] * (z.dim() - 1)))
    x_t = tt * z + (1 - tt) * eps
    target = z - eps
    return x_t, ((pred.float() - target) ** 2).mean()


def _inputs(n: int, dtype: torch.dtype, device):
    g = torch.Generator(device="cpu").manual_seed(0)
    shape = (BATCH, n // BATCH)
    x = torch.randn(shape, generator=g).to(device)
    out2b = torch.randn((2 * BATCH, n // BATCH), generator=g).to(device=device, dtype=dtype)
    seeds = torch.arange(BATCH, dtype=torch.int64, device=device)
    return x, out2b, seeds


def _compiled(fn):
    return torch.compile(fn, dynamic=False)


def step_cases(op: str, n: int, dtype: str = "fp32", device="cpu", impls=None, inplace: bool = True) -> list[Case]:
    """``inplace``: the fused step updates x in place, as fastdiff's sampler calls it (the eager
    side allocates its result, as users' ``x = x + …`` does)."""
    import fastdiff

    dt_ = _dtype(dtype)
    x, out2b, seeds = _inputs(n, dt_, device)
    cond, uncond = out2b.chunk(2)
    out = x if inplace else torch.empty_like(x)
    pb = dt_.itemsize
    nbytes = n * (4 + 4 + 2 * pb)  # read x and both halves of the prediction, write the new state
    if op == "step_sde":
        c_x, c_p, c_n = _sde_coefficients()
        coeffs = dict(cfg=CFG, c_x=c_x, c_pred=c_p, c_noise=c_n)
        eager = lambda: eager_sde_step(x, out2b)  # noqa: E731
    elif op == "step_ode":
        coeffs = dict(cfg=CFG, c_x=1.0, c_pred=DT)
        eager = lambda: eager_ode_step(x, out2b)  # noqa: E731
    else:
        raise ValueError(f"op must be step_sde or step_ode, got {op!r}")
    cases = {
        "fastdiff": lambda: fastdiff.ops.guided_step(x, cond, uncond, seeds=seeds, stream=1, out=out, **coeffs),
        "eager": eager,
        "reference": lambda: fastdiff.ops.guided_step(x, cond, uncond, seeds=seeds, stream=1,
                                                      out=None if inplace else out, backend="reference", **coeffs),
    }
    if impls is None or "compile" in impls:
        step = eager_sde_step if op == "step_sde" else eager_ode_step
        compiled = _compiled(step)
        cases["compile"] = lambda: compiled(x, out2b)
    return [Case(op, k, n, dtype, f, nbytes) for k, f in cases.items() if impls is None or k in impls]


def loss_cases(n: int, dtype: str = "fp32", device="cpu", impls=None) -> list[Case]:
    import fastdiff

    dt_ = _dtype(dtype)
    g = torch.Generator(device="cpu").manual_seed(1)
    z = torch.randn((BATCH, n // BATCH), generator=g).to(device)
    pred = torch.randn((BATCH, n // BATCH), generator=g).to(device=device, dtype=dt_).requires_grad_()
    t = torch.rand(BATCH, generator=g, dtype=torch.float64).to(device)
    seeds = torch.arange(BATCH, dtype=torch.int64, device=device)

    def fused(backend=None, path="condot"):
        pred.grad = None
        x_t = fastdiff.ops.add_noise(z, t, seeds, 0, path, backend=backend)
        loss = fastdiff.ops.diffusion_loss(pred, z, t, seeds, 0, path, "velocity", backend=backend)
        loss.backward()
        return x_t, loss

    class CoefficientCondOT(fastdiff.paths.CondOT):
        """CondOT without a kernel path: the coefficients computed in Python around the kernels (the route
        before the ops at times; what a user path still takes)."""

    def eager(fn=eager_loss):
        pred.grad = None
        x_t, loss = fn(pred, z, t.float())
        loss.backward()
        return x_t, loss

    # add_noise: read z, write x_t; loss: read pred, z; backward: read pred, z, write grad
    nbytes = n * (4 + 4 + dt_.itemsize + 4 + dt_.itemsize + 4 + dt_.itemsize)
    cases = {"fastdiff": fused, "fastdiff-coefficients": lambda: fused(path=CoefficientCondOT()), "eager": eager,
             "reference": lambda: fused("reference")}
    if impls is None or "compile" in impls:
        compiled = _compiled(eager_loss)
        cases["compile"] = lambda: eager(compiled)
    return [Case("loss", k, n, dtype, f, nbytes) for k, f in cases.items() if impls is None or k in impls]


def eager_gram(p_null, p_y):
    """The CFG-rescale reduction in eager PyTorch: (1, p_null, p_y)'s per-sample sums and products in float64."""
    u = torch.stack([p_null.double(), p_y.double()], 1)  # [B, 2, n]
    sums = u.sum(-1)
    return sums, u @ u.transpose(1, 2)


def gram_cases(n: int, dtype: str = "fp32", device="cpu", impls=None) -> list[Case]:
    """The per-sample reduction pass over two branches (CFG rescale, APG, CFG-Zero*): one read of both."""
    import fastdiff

    dt_ = _dtype(dtype)
    g = torch.Generator(device="cpu").manual_seed(2)
    p_null, p_y = (torch.randn((BATCH, n // BATCH), generator=g).to(device=device, dtype=dt_) for _ in range(2))
    cases = {"fastdiff": lambda: fastdiff.ops.sample_gram([p_null, p_y]),
             "eager": lambda: eager_gram(p_null, p_y),
             "reference": lambda: fastdiff.ops.sample_gram([p_null, p_y], backend="reference")}
    if impls is None or "compile" in impls:
        compiled = _compiled(eager_gram)
        cases["compile"] = lambda: compiled(p_null, p_y)
    return [Case("gram", k, n, dtype, f, 2 * n * dt_.itemsize) for k, f in cases.items() if impls is None or k in impls]


def randn_cases(n: int, dtype: str = "fp32", device="cpu", impls=None) -> list[Case]:
    import fastdiff

    seeds = torch.arange(BATCH, dtype=torch.int64, device=device)
    shape = (n // BATCH,)
    cases = {
        "fastdiff": lambda: fastdiff.ops.randn(seeds, 0, shape),
        "torch": lambda: torch.randn((BATCH, *shape), device=device),
        "reference": lambda: fastdiff.ops.randn_reference(seeds, 0, shape),
    }
    return [Case("randn", k, n, "fp32", f, 4 * n) for k, f in cases.items() if impls is None or k in impls]


def copy_case(n: int, device="cpu") -> Case:
    src = torch.randn(n, device=device)
    dst = torch.empty_like(src)
    return Case("copy", "torch", n, "fp32", lambda: dst.copy_(src), 8 * n)


def cases(op: str, n: int, dtype: str = "fp32", device="cpu", impls=None) -> list[Case]:
    if op == "loop":
        return loop_cases(n, device, impls)
    if op in ("methods", "langevin"):
        return (method_cases if op == "methods" else langevin_cases)(n, device, impls)
    if op in ("step_sde", "step_ode"):
        return step_cases(op, n, dtype, device, impls)
    if op == "loss":
        return loss_cases(n, dtype, device, impls)
    if op == "randn":
        return randn_cases(n, dtype, device, impls)
    if op == "gram":
        return gram_cases(n, dtype, device, impls)
    if op in ("rescale", "apg"):
        return rescale_cases(n, dtype, device, impls, rule=op)
    if op == "latency":
        raise ValueError("latency's cases depend on the batch and cfg, not N: see fastdiff.bench.latency.subjects")
    raise ValueError(f"op must be one of {OPS}, got {op!r}")


# ---- the report: interleaved medians, ratios, CSV rows ------------------------------------------------

BASELINES = {"step_sde": "eager", "step_ode": "eager", "gram": "eager", "rescale": "eager", "apg": "eager",
             "loss": "eager", "randn": "torch", "loop": "diffusers", "methods": "euler", "langevin": "eager",
             "latency": "peer"}  # latency: each row against the peer it replaces (fastdiff.bench.latency)


def report(ops=OPS, log2_sizes=(22,), dtypes=("fp32",), device="cpu", repeat=15, compile: bool = True,
           csv_dir=None, log=print, latency: dict | None = None) -> list[dict]:
    """Time every case of ``ops`` at N = 2^k for k in ``log2_sizes``, print the comparison table, and
    write the rows to ``csv_dir/<device>-<date>.csv`` (when given) as they come: the file is rewritten after
    each group of cases, so a run stopped by a time limit leaves every row it measured. Returns the rows.
    ``latency``: keyword arguments of fastdiff.bench.latency.report (its device, threads, shape...; by default
    the CPU, 2 threads), which runs once after the sized ops."""
    import datetime
    import re

    import fastdiff

    device = torch.device(device)
    name = device_name(device)
    threads = torch.get_num_threads()
    rows = []
    path = None
    if csv_dir is not None:
        from pathlib import Path

        slug = re.sub(r"[^A-Za-z0-9]+", "-", name).strip("-").lower()
        path = Path(csv_dir) / f"{slug}-{datetime.datetime.now():%Y%m%d-%H%M%S}.csv"
    log(f"fastdiff {fastdiff.__version__}, torch {torch.__version__}, {name}, "
        f"{threads if device.type == 'cpu' else 'GPU'} threads; medians of {repeat} interleaved rounds")
    sized = [op for op in ops if op != "latency"]
    header = f"{'op':9s} {'dtype':5s} {'N':>9s} {'impl':13s} {'median ms':>10s} {'GB/s':>7s}"
    header += f" {'% copy':>7s}" if device.type == "cuda" else ""
    header += f" {'peak MiB':>8s}" if device.type == "cuda" else ""
    header += f" {'x base':>7s} {'x compile':>9s} {'fastdiff x':>10s}"
    if sized:
        log(header)
        log("(x base: speed relative to eager PyTorch; for randn to torch.randn, for loop to diffusers, for methods "
            "to euler's step. fastdiff x: how many times faster fastdiff is than this row)")
    for k in (log2_sizes if sized else ()):
        n = 1 << k
        copy_s = None
        if device.type == "cuda":
            copy_s = time_interleaved([copy_case(n, device)], repeat, device=device)["torch"]
        for op in sized:
            for dtype in (dtypes if op not in ("randn", "loop", "methods", "langevin") else ("fp32",)):
                impls = None if compile or op in ("loop", "methods") else ["fastdiff", "eager", "reference", "torch"]
                group = cases(op, n, dtype, device, impls)
                per_round: dict = {}
                med = time_interleaved(group, repeat, device=device, rounds=per_round,
                                       swap=LOOP_PARTS[:2] if {c.impl for c in group} >= set(LOOP_PARTS) else ())
                base, comp, ours = med.get(BASELINES[op]), med.get("compile"), med.get("fastdiff")
                for c in group:
                    s = med[c.impl]
                    row = {"date": datetime.datetime.now().isoformat(timespec="seconds"), "device": name,
                           "threads": threads, "op": op, "dtype": dtype, "N": n, "backend": c.impl,
                           "median_ms": _sig(s * 1e3), "GB/s": _sig(c.bytes / s / 1e9),
                           "pct_copy": None,
                           "x_vs_baseline": round(base / s, 3) if base else None,
                           "x_vs_compile": round(comp / s, 3) if comp else None,
                           "fastdiff_speedup": round(s / ours, 3) if ours else None,
                           "peak_mib": None, "note": c.note,
                           "torch": torch.__version__, "fastdiff": fastdiff.__version__}
                    peak = peak_memory(c.fn, device)
                    if peak is not None:
                        row["peak_mib"] = round(peak / 2**20, 1)
                    if copy_s is not None:
                        row["pct_copy"] = round(100 * (c.bytes / s) / (8 * n / copy_s), 1)
                    rows.append(row)
                    line = f"{op:9s} {dtype:5s} {n:9d} {c.impl:13s} {row['median_ms']:10.4g} {row['GB/s']:7.3g}"
                    if device.type == "cuda":
                        line += f" {row['pct_copy']:7.1f} {row['peak_mib']:8.1f}"
                    line += f" {_x(row['x_vs_baseline']):>7s} {_x(row['x_vs_compile']):>9s} {_x(row['fastdiff_speedup']):>10s}"
                    if c.note:
                        line += f"  {c.note}"
                    log(line)
                if op == "methods":  # the loops' own time per step: each loop over the kernel calls it makes
                    for impl, s in med.items():
                        if f"{impl} calls" in med:
                            log(f"{op:9s} {dtype:5s} {n:9d} {impl}: the loop's own time, its median over its "
                                f"calls': {s / med[f'{impl} calls']:.3f}x")
                if op == "loop" and all(k in med for k in ("fastdiff", *LOOP_PARTS)):
                    rows += loop_split_rows(med, per_round, rows[-1], log)
                write_rows(path, rows)
    if "latency" in ops:
        from fastdiff.bench import latency as latency_op

        rows += latency_op.report(repeat=repeat, log=log, **(latency or {}))
        write_rows(path, rows)
    if path is not None and rows:
        log(f"wrote {path}")
    return rows


def write_rows(path, rows: list[dict]) -> None:
    """The CSV of ``rows`` at ``path`` (None: nowhere), written whole to a temporary file and moved into place, so
    the file is always a complete table. Latency's rows add their own columns (batch, cfg, fixed_us, ...): the
    union, in order."""
    import csv
    import os

    if path is None or not rows:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".csv.tmp")
    with open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(dict.fromkeys(k for row in rows for k in row)))
        w.writeheader()
        w.writerows(rows)
    os.replace(tmp, path)


def _sig(v: float, digits: int = 4) -> float:
    return float(f"{v:.{digits}g}")


def _x(v) -> str:
    return "-" if v is None else f"{v:.2f}x"
