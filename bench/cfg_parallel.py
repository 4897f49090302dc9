"""CFG-parallel sampling on the CPU: wall time per step of a guided fastdiff.sample with the branches on two
processes (torchrun, gloo, fastdiff.cfg_parallel) against one process.

    python bench/cfg_parallel.py [--batch 64] [--dim 256] [--width 2048] [--depth 4] [--steps 8] [--rounds 3]

The model: a conditional MLP of ``--depth`` wide layers (compute-bound: the model is > 90 % of a step, printed),
cfg 3, Euler, so each step is one call of 2B rows. Rows: ``1 process, 1 thread`` (each of the two processes
has one thread, as torchrun gives them), ``1 process, 2 threads`` (the same two cores as the two processes),
``2 processes (cfg_parallel)``. The best and the median of ``--rounds`` rounds, each after a warm-up call (on a
shared machine the best is the better estimate of what the run costs). A network's matrix multiplies may round
differently for B and 2B rows, so the samples may differ by float rounding (a row-wise model is bit-identical:
tests/test_cfg_parallel.py); the max difference from one process is printed.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import fastdiff  # noqa: E402


class MLP(torch.nn.Module):
    """x [B, dim], t [B], y [B] (class 0 … 9, 10 the null label) -> a velocity [B, dim]."""

    def __init__(self, dim: int, width: int, depth: int):
        super().__init__()
        self.inp = torch.nn.Linear(dim + 1, width)
        self.emb = torch.nn.Embedding(11, width)
        self.hidden = torch.nn.ModuleList(torch.nn.Linear(width, width) for _ in range(depth - 1))
        self.out = torch.nn.Linear(width, dim)

    def forward(self, x, t, y):
        h = torch.nn.functional.silu(self.inp(torch.cat([x, t[:, None]], 1)) + self.emb(y))
        for layer in self.hidden:
            h = torch.nn.functional.silu(layer(h))
        return self.out(h)


def model(args) -> MLP:
    torch.manual_seed(0)
    return MLP(args.dim, args.width, args.depth).eval()


def run(args, m) -> tuple[list[float], torch.Tensor]:
    """Seconds per step of each round, and the last round's samples."""
    y = torch.arange(args.batch) % 10
    kw = dict(shape=(args.dim,), y=y, null_y=10, seed=0, method="euler")
    x = fastdiff.sample(m, args.steps, 3.0, **kw)  # warm-up (plan, allocations)
    times = []
    for _ in range(args.rounds):
        t0 = time.perf_counter()
        x = fastdiff.sample(m, args.steps, 3.0, **kw)
        times.append((time.perf_counter() - t0) / args.steps)
    return times, x


def worker(args) -> None:
    """One measurement, printed as JSON: --threads N in one process, or a rank of the torchrun job."""
    if args.parallel:
        import torch.distributed as dist

        torch.set_num_threads(1)
        dist.init_process_group("gloo")
        times, x = run(args, fastdiff.cfg_parallel(model(args)))
        if dist.get_rank() == 0:
            torch.save(x, args.samples)
            print(json.dumps({"step_s": min(times), "median_s": statistics.median(times)}))
        dist.destroy_process_group()
        return
    torch.set_num_threads(args.threads)
    m = model(args)
    times, x = run(args, m)
    timed = Timed(m)  # the model's share of the steps, measured inside the same calls
    shares = []
    for _ in range(args.rounds):
        timed.seconds = 0.0
        t0 = time.perf_counter()
        fastdiff.sample(timed, args.steps, 3.0, shape=(args.dim,), y=torch.arange(args.batch) % 10, null_y=10,
                        seed=0, method="euler")
        shares.append(timed.seconds / (time.perf_counter() - t0))
    if args.samples:
        torch.save(x, args.samples)
    print(json.dumps({"step_s": min(times), "median_s": statistics.median(times), "model_share": max(shares)}))


class Timed:
    """The model, with the seconds spent in its calls."""

    def __init__(self, m):
        self.m, self.seconds = m, 0.0

    def __call__(self, x, t, y):
        t0 = time.perf_counter()
        out = self.m(x, t, y)
        self.seconds += time.perf_counter() - t0
        return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--width", type=int, default=2048)
    parser.add_argument("--depth", type=int, default=4)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=0, help=argparse.SUPPRESS)  # worker: one process
    parser.add_argument("--parallel", action="store_true", help=argparse.SUPPRESS)  # worker: a torchrun rank
    parser.add_argument("--samples", default="", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.threads or args.parallel:
        worker(args)
        return
    common = [f"--{k}={getattr(args, k)}" for k in ("batch", "dim", "width", "depth", "steps", "rounds")]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    results, load = {}, os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        runs = {"1 process, 1 thread": [sys.executable, __file__, "--threads=1"],
                "1 process, 2 threads": [sys.executable, __file__, "--threads=2"],
                "2 processes (cfg_parallel)": [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                               "--nproc_per_node", "2", __file__, "--parallel"]}
        for name, cmd in runs.items():
            samples = f"{tmp}/{len(results)}.pt"
            out = subprocess.run(cmd + common + [f"--samples={samples}"], env=env, check=True, capture_output=True,
                                 text=True).stdout
            results[name] = (json.loads(out.strip().splitlines()[-1]), torch.load(samples))
    base, _ = results["1 process, 1 thread"]
    ref = results["1 process, 1 thread"][1]
    print(f"MLP {args.depth} x {args.width}, dim {args.dim}, batch {args.batch} (calls of {2 * args.batch} rows), "
          f"{args.steps} Euler steps, cfg 3; {os.cpu_count()} CPUs; best (median) of {args.rounds} rounds")
    print(f"the model's share of a step (1 process, 1 thread): {base['model_share']:.1%}; load average before "
          f"and after: {load[0]:.1f}, {os.getloadavg()[0]:.1f} (other work on these cores slows the runs unevenly)")
    for name, (r, x) in results.items():
        print(f"{name:28s} {r['step_s'] * 1e3:8.1f} ms/step ({r['median_s'] * 1e3:.1f})  "
              f"x{base['step_s'] / r['step_s']:.2f}  max |x - x_1 process| = {(x - ref).abs().max().item():.1e}")


if __name__ == "__main__":
    main()
