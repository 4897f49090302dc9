"""fastdiff.ops.randn (spec-v1 stream) vs torch.randn."""

import pytest

from conftest import DEVICE, SIZES
from fastdiff.bench.harness import copy_case, randn_cases


@pytest.mark.parametrize("impl", ["fastdiff", "torch", "reference"])
@pytest.mark.parametrize("log2n", SIZES)
def test_randn(run_case, log2n, impl):
    if impl == "reference" and log2n > 22:
        pytest.skip("the reference op is an oracle, not a contender, at this size")
    (case,) = randn_cases(1 << log2n, "fp32", DEVICE, impls=[impl])
    run_case(case)


@pytest.mark.parametrize("log2n", SIZES)
def test_copy(run_case, log2n):
    run_case(copy_case(1 << log2n, DEVICE))
