"""Generation throughput and the cost of sharding: ``fastdiff.generate`` against bare ``fastdiff.sample`` calls
over the same seeds and batches, with one process and with two (torchrun, gloo, CPU).

    python bench/generation.py [--samples 1024] [--batch 256] [--steps 20] [--rounds 3] [--out bench/results/x.md]

The model is the digits demo's UNet (104 k parameters, random weights: the cost is the same), conditional,
cfg 4, Heun. ``bare``: the batches' sample() calls alone (the work generate does, without the shards);
``generate``: into a fresh folder (shards, manifest, atomic writes); ``generate, 2 processes``: torchrun with
two processes of one thread each against one process of two threads (same cores). Medians of ``--rounds``
interleaved rounds.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import fastdiff  # noqa: E402
from fastdiff.demo.run import digits_model  # noqa: E402

SETTINGS = dict(cfg=4.0, method="heun", null_y=10)


def model():
    torch.manual_seed(0)
    return digits_model().eval()


def bare(args) -> float:
    m = model()
    y = torch.arange(args.num) % 10
    t0 = time.perf_counter()
    for b in range(0, args.num, args.batch):
        e = min(args.num, b + args.batch)
        fastdiff.sample(m, args.steps, shape=(1, 8, 8), y=y[b:e], seed=list(range(b, e)), batch_size=e - b,
                        **{k: v for k, v in SETTINGS.items()})
    return time.perf_counter() - t0


def generate(args, out) -> float:
    m = model()
    t0 = time.perf_counter()
    summary = fastdiff.generate(m, args.num, out, shape=(1, 8, 8), batch_size=args.batch, labels="balanced",
                                num_classes=10, steps=args.steps, progress=False, **SETTINGS)
    seconds = time.perf_counter() - t0
    if summary["world"] > 1:  # each worker's time inside the job, for the parent to read
        (Path(out) / f"seconds-{summary['rank']}").write_text(str(seconds))
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--samples", dest="num", type=int, default=1024)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", default=None, help="also write the table to this markdown file")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)  # a torchrun worker's folder
    args = parser.parse_args()
    if args.worker:
        torch.set_num_threads(1)
        generate(args, args.worker)
        return
    times = {"bare": [], "generate": [], "generate, 2 processes": [], "generate, 2 processes, in the job": []}
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    for _ in range(args.rounds):
        times["bare"].append(bare(args))
        with tempfile.TemporaryDirectory() as out:
            times["generate"].append(generate(args, out))
        with tempfile.TemporaryDirectory() as out:
            t0 = time.perf_counter()
            subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                            __file__, "--worker", out, "--samples", str(args.num), "--batch", str(args.batch),
                            "--steps", str(args.steps)], check=True, env=env, stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL)
            times["generate, 2 processes"].append(time.perf_counter() - t0)
            times["generate, 2 processes, in the job"].append(
                max(float(p.read_text()) for p in Path(out).glob("seconds-*")))
    med = {k: statistics.median(v) for k, v in times.items()}
    lines = [f"fastdiff {fastdiff.__version__}, torch {torch.__version__}, {platform.processor() or platform.machine()}, "
             f"{torch.get_num_threads()} threads; {args.num} digits (8x8, UNet), batch {args.batch}, {args.steps} "
             f"Heun steps, cfg 4; medians of {args.rounds} rounds", "",
             "| run | seconds | samples/s | vs bare |", "|---|---|---|---|"]
    for k, v in med.items():
        lines.append(f"| {k} | {v:.2f} | {args.num / v:.0f} | {v / med['bare']:.3f}x |")
    lines += ["", f"sharding and writing overhead (1 process): {100 * (med['generate'] / med['bare'] - 1):+.1f} %",
              "(2 processes: one thread each against one process of two threads on the same cores; the first row "
              "includes torchrun's launch and the workers' imports, the second is the job's own time)"]
    print("\n".join(lines))
    if args.out:
        Path(args.out).write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
