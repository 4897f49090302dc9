"""Instructions per call of the CPU step kernel, for comparing two builds exactly (valgrind counts
instructions, so the figure does not drift with the machine's load as times do):

    valgrind --tool=callgrind --toggle-collect='*sampler_step_avx2*' --callgrind-out-file=/tmp/cg.%p \\
        python bench/step_instructions.py --op step_sde --dtype bf16 --log2n 20 --calls 5
    callgrind_annotate /tmp/cg.<pid> | head   # total Ir / calls = instructions per call

The step is fastdiff.ops.guided_step with cfg 4 on 2^log2n elements (8 samples), as `fastdiff bench` calls
it (step_sde: with noise; step_ode: without), in place, on one thread.
"""

import argparse

import torch

import fastdiff
from fastdiff.bench import harness


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--op", choices=("step_sde", "step_ode"), default="step_sde")
    p.add_argument("--dtype", choices=("fp32", "bf16", "fp16"), default="fp32")
    p.add_argument("--log2n", type=int, default=20)
    p.add_argument("--calls", type=int, default=5)
    args = p.parse_args()
    torch.set_num_threads(1)
    (case,) = harness.step_cases(args.op, 1 << args.log2n, args.dtype, impls=["fastdiff"])
    for _ in range(args.calls):
        case.fn()
    print(f"{args.op} {args.dtype} 2^{args.log2n}: {args.calls} calls, simd level {torch.ops.fastdiff.cpu_simd()}, "
          f"fastdiff {fastdiff.__file__}")


if __name__ == "__main__":
    main()
