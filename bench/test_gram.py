"""fastdiff.ops.sample_gram (the per-sample reduction pass of CFG rescale, APG, CFG-Zero*) vs eager PyTorch."""

import pytest

from conftest import DEVICE, SIZES
from fastdiff.bench.harness import gram_cases


@pytest.mark.parametrize("impl", ["fastdiff", "eager", "compile", "reference"])
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
@pytest.mark.parametrize("log2n", SIZES)
def test_gram(run_case, log2n, dtype, impl):
    if impl == "reference" and log2n > 22:
        pytest.skip("the reference op is an oracle, not a contender, at this size")
    (case,) = gram_cases(1 << log2n, dtype, DEVICE, impls=[impl])
    run_case(case)
