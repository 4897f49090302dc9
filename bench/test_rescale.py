"""One Euler step with a per-sample guidance rule — CFG rescale (diffusers' guidance_rescale) and adaptive
projected guidance (diffusers' AdaptiveProjectedGuidance, no momentum): fastdiff's fused reduction pass +
per-sample weights + step vs diffusers' formula in eager PyTorch and torch.compile of it."""

import pytest

from conftest import DEVICE, SIZES
from fastdiff.bench.harness import rescale_cases


@pytest.mark.parametrize("impl", ["fastdiff", "eager", "compile", "reference"])
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
@pytest.mark.parametrize("log2n", SIZES)
@pytest.mark.parametrize("rule", ["rescale", "apg"])
def test_guidance_rule(run_case, rule, log2n, dtype, impl):
    if impl == "reference" and log2n > 22:
        pytest.skip("the reference op is an oracle, not a contender, at this size")
    (case,) = rescale_cases(1 << log2n, dtype, DEVICE, impls=[impl], rule=rule)
    run_case(case)
