"""The fused sampler step vs eager PyTorch, torch.compile and the reference op."""

import pytest

from conftest import DEVICE, SIZES
from fastdiff.bench.harness import step_cases

IMPLS = ["fastdiff", "eager", "compile", "reference"]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
@pytest.mark.parametrize("log2n", SIZES)
@pytest.mark.parametrize("op", ["step_sde", "step_ode"])
def test_step(run_case, op, log2n, dtype, impl):
    if impl == "reference" and log2n > 22:
        pytest.skip("the reference op is an oracle, not a contender, at this size")
    (case,) = step_cases(op, 1 << log2n, dtype, DEVICE, impls=[impl])
    run_case(case)
