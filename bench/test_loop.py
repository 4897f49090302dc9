"""Whole 50-step SDE sampling loops with cfg 4 and a cheap model: fastdiff vs diffusers' scheduler
loop, torchsde's sdeint (Euler) and flow_matching's ODESolver (Euler, ODE). Peers not installed are
skipped (pip install ".[bench]")."""

import pytest

from conftest import DEVICE, SIZES
from fastdiff.bench.loops import METHOD_ROWS, PEERS, loop_cases


@pytest.mark.parametrize("impl", ["fastdiff", "fastdiff_ode", *PEERS, *METHOD_ROWS])
@pytest.mark.parametrize("log2n", [k for k in SIZES if k >= 12])
def test_loop(run_case, log2n, impl):
    found = loop_cases(1 << log2n, DEVICE, impls=[impl])
    if not found:
        pytest.skip(f"{impl} is not installed")
    run_case(found[0])
