"""``fastdiff bench``: the fused ops timed against eager PyTorch and torch.compile (fastdiff.bench.harness).

Its lists (--ops, --sizes, --dtypes) are checked whole at the argument parse, and the sizes against the
memory of the device, so that a typo fails at once instead of after minutes of other cases (or as a
terabyte allocation)."""

from __future__ import annotations

import argparse
import math

from fastdiff.cli_sampler import device_option, int_in

MIN_LOG2, MAX_LOG2 = 4, 30  # the cases split N over 16 samples; 2^30 fp32 elements are 4 GiB per tensor
DTYPES = ("fp32", "bf16", "fp16")  # fastdiff.bench.case._dtype's names
MAX_LATENCY_ELEMENTS = 1 << 24  # batch x per-sample shape of a latency case: overhead is timed at small sizes
# peak bytes per element of N of each op's cases (CPU peak RSS at N = 2^22 with bf16 and fp32 predictions, rounded
# up; loop: estimated): a size whose cases would not fit in the free memory is refused before it swaps or aborts
BYTES_PER_ELEMENT = {"step_sde": 128, "step_ode": 64, "gram": 128, "rescale": 160, "apg": 192, "loss": 128,
                     "randn": 64, "loop": 256, "methods": 288, "langevin": 128,
                     "latency": 0}  # latency: small fixed batches, whatever --sizes says


def comma_list(kind, choices=None):
    """A comma-separated list, each item parsed by ``kind`` (an argparse type) or one of ``choices``."""
    def parse(text: str) -> list:
        items = text.split(",")
        if not all(item.strip() for item in items):
            raise argparse.ArgumentTypeError(f"must be a comma-separated list without empty items, got {text!r}")
        out = []
        for item in (i.strip() for i in items):
            if choices is not None and item not in choices:
                raise argparse.ArgumentTypeError(f"unknown item {item!r} (choose from {', '.join(choices)})")
            try:
                out.append(item if kind is None else kind(item))
            except argparse.ArgumentTypeError as e:
                raise argparse.ArgumentTypeError(f"{item!r}: {e}") from None
        return out

    parse.__name__ = "list"
    return parse


def available_memory(device) -> int | None:
    """Free bytes on ``device`` (fastdiff._checks.available_bytes), None if unknown."""
    from fastdiff import _checks

    return _checks.available_bytes(device)


def _check_memory(ops, log2_sizes, device) -> None:
    free = available_memory(device)
    if free is None:
        return
    op = max(ops, key=lambda o: BYTES_PER_ELEMENT.get(o, 128))
    for k in log2_sizes:
        need = BYTES_PER_ELEMENT.get(op, 128) << k
        if need > free:
            raise ValueError(f"--sizes {k}: the {op} cases at N = 2^{k} need about {need / 2**30:.1f} GiB, but "
                             f"{device} has {free / 2**30:.1f} GiB free (give smaller --sizes or other --ops)")


def _latency_options(args: argparse.Namespace) -> dict:
    """fastdiff.bench.latency.report's keywords: the CPU unless --device says otherwise (as a robot's policy
    loop runs), 2 threads unless --threads says otherwise; refused before any work when they cannot run."""
    if "latency" in args.ops:
        if len(set(args.latency_steps)) < 2:
            raise ValueError(f"--latency-steps {','.join(map(str, args.latency_steps))}: give two or more distinct "
                             "step counts (the per-step cost is the slope between them)")
        elements = max(args.latency_batches) * math.prod(args.latency_shape)
        if elements > MAX_LATENCY_ELEMENTS:
            raise ValueError(f"--latency-shape / --latency-batches: {elements} elements per batch; latency times "
                             f"the loops' overhead at small sizes (at most 2^{MAX_LATENCY_ELEMENTS.bit_length() - 1})")
    return {"device": args.device or "cpu", "threads": args.threads or 2, "shape": args.latency_shape,
            "batches": args.latency_batches, "steps": args.latency_steps}


def _bench(args: argparse.Namespace) -> int:
    import torch

    from fastdiff.bench import harness

    if args.threads:
        torch.set_num_threads(args.threads)
    latency = _latency_options(args)
    only_latency = set(args.ops) == {"latency"}
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() and not only_latency else "cpu"))
    _check_memory(args.ops, args.sizes, device)
    if not args.no_csv:  # before the runs, not after them: their rows would be lost
        from fastdiff.training.checkpoint import check_writable

        check_writable(args.csv_dir, f"--csv-dir {args.csv_dir}")
    harness.report(ops=args.ops, log2_sizes=args.sizes, dtypes=args.dtypes, device=device, repeat=args.repeat,
                   compile=not args.no_compile, csv_dir=None if args.no_csv else args.csv_dir, latency=latency)
    return 0


def add_command(sub) -> None:
    from fastdiff.bench.harness import OPS  # torch, not the peers: they load with their cases

    p = sub.add_parser("bench", help="time the fused ops against eager PyTorch and torch.compile; "
                                     "print ratios and write CSV rows")
    p.add_argument("--ops", type=comma_list(None, OPS), default=",".join(OPS),
                   help="rescale / apg: a CFG-rescale / APG step, fused vs diffusers' formula; loop: 50-step SDE "
                        "sampling with cfg 4 vs diffusers / torchsde / flow_matching / k-diffusion; methods: each "
                        "sampling method's fused step per model evaluation vs euler's; latency: sampling loops' "
                        "fixed and per-step overhead on a free model, fastdiff and its adapters vs the peers "
                        "(default: %(default)s)")
    p.add_argument("--sizes", type=comma_list(int_in(MIN_LOG2, MAX_LOG2)), default="20,22",
                   help=f"log2 of N in [{MIN_LOG2}, {MAX_LOG2}], comma-separated (default: %(default)s)")
    p.add_argument("--dtypes", type=comma_list(None, DTYPES), default="fp32,bf16",
                   help=f"prediction dtypes, of {', '.join(DTYPES)} (default: %(default)s)")
    p.add_argument("--repeat", type=int_in(1, 1000), default=15, help="interleaved rounds (median)")
    p.add_argument("--device", type=device_option, default=None, help="cpu or cuda (default: cuda when available; latency: cpu)")
    p.add_argument("--threads", type=int_in(0, 1024), default=0, help="CPU threads (default: torch's; latency: 2)")
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile baseline")
    p.add_argument("--latency-shape", type=comma_list(int_in(1, 4096)), default="16,2",
                   help="latency: the per-sample shape (default: %(default)s, an action chunk)")
    p.add_argument("--latency-batches", type=comma_list(int_in(1, 4096)), default="1,64",
                   help="latency: batch sizes (default: %(default)s)")
    p.add_argument("--latency-steps", type=comma_list(int_in(1, 100)), default="10,50",
                   help="latency: two or more step counts, <= 100 (lerobot's schedules have 100 training "
                        "timesteps); per step = the slope (default: %(default)s)")
    p.add_argument("--csv-dir", default="bench/results")
    p.add_argument("--no-csv", action="store_true")
    p.set_defaults(func=_bench)
