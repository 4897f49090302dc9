"""pytest-benchmark suites: ``pytest bench/ --benchmark-only`` (add ``--benchmark-columns=median``).

Sizes: FASTDIFF_BENCH_SIZES (log2 of N, default "16,20,22,24"); device: FASTDIFF_BENCH_DEVICE
(default cuda when available). The comparison tables with ratios come from ``fastdiff bench``.
"""

import os

import pytest
import torch

SIZES = [int(k) for k in os.environ.get("FASTDIFF_BENCH_SIZES", "16,20,22,24").split(",")]
DEVICE = os.environ.get("FASTDIFF_BENCH_DEVICE", "cuda" if torch.cuda.is_available() else "cpu")


@pytest.fixture
def run_case(benchmark):
    """benchmark(case.fn) with the case's size and bandwidth in the report's extra_info."""
    from fastdiff.bench.harness import _sync

    def run(case):
        case.fn()  # warm up (and compile)
        benchmark.extra_info.update(op=case.op, impl=case.impl, N=case.n, dtype=case.dtype, bytes=case.bytes,
                                    device=DEVICE, threads=torch.get_num_threads())

        def call():
            case.fn()
            _sync(DEVICE)

        benchmark(call)
    return run
