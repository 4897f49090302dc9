#!/usr/bin/env bash
# Fetches the peers' wheels into bench/wheels/ (git-ignored) for bench/gpu_check.sh: the device machine reaches
# no package index, so the loop, gram and langevin benchmarks' peers travel with the working tree (name
# bench/wheels in the device call's carry). Pure-Python wheels, no dependencies: what the GPU image lacks of
# theirs (numpy, scipy, tqdm) it must have; gpu_check.sh says when an install fails.
set -euo pipefail
cd "$(dirname "$0")"
mkdir -p wheels
${PYTHON:-python3} -m pip download --no-deps --only-binary=:all: -d wheels \
  diffusers k-diffusion torchsde trampoline torchdiffeq flow_matching huggingface-hub
du -sh wheels
