"""Noising + loss forward + backward: fused (the ops at times; and with the coefficients computed in Python, the
route of a user path) vs eager (stored ε from randn_like), compile, reference."""

import pytest

from conftest import DEVICE, SIZES
from fastdiff.bench.harness import loss_cases


@pytest.mark.parametrize("impl", ["fastdiff", "fastdiff-coefficients", "eager", "compile", "reference"])
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
@pytest.mark.parametrize("log2n", SIZES)
def test_loss(run_case, log2n, dtype, impl):
    if impl == "reference" and log2n > 22:
        pytest.skip("the reference op is an oracle, not a contender, at this size")
    (case,) = loss_cases(1 << log2n, dtype, DEVICE, impls=[impl])
    run_case(case)
