#!/usr/bin/env bash
# One call on a lent GPU machine (the device tool): build fastdiff for this GPU's architecture, run the
# cuda- and triton-marked tests, then the GPU benchmarks, writing everything under $OUT:
#   bash bench/gpu_check.sh          (from the repository root; OUT defaults to ./gpu-out)
# Files: summary.txt (what ran, pass/fail counts), nvidia-smi.txt, build.log, tests.log, tests.xml,
# bench.log and the benchmark CSV. Stage time limits (BUILD_S, TESTS_S, BENCH_S) keep one call
# inside a device command's 10 minutes.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/gpu-out}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
say() { echo "== $* ($(date +%T))" | tee -a "$OUT/summary.txt"; }

nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1 || true
say "$($PY -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda, torch.cuda.get_device_name())')"
ARCH=$($PY -c 'import torch; print("%d.%d" % torch.cuda.get_device_capability())')
say "build for TORCH_CUDA_ARCH_LIST=$ARCH"
if ! FASTDIFF_CUDA=1 TORCH_CUDA_ARCH_LIST="$ARCH" MAX_JOBS=$(nproc) timeout "${BUILD_S:-240}" \
    $PY -m pip install --no-build-isolation --no-deps . > "$OUT/build.log" 2>&1; then
  say "build FAILED (tail of build.log follows)"; tail -40 "$OUT/build.log"; exit 1
fi
(cd /tmp && $PY -c 'import fastdiff; print(fastdiff.backends())') 2>&1 | tee -a "$OUT/summary.txt"

say "cuda and triton tests"
# from the checkout, as CI does: the sources import from here, _C from the install above; modules
# whose optional peers are missing here are skipped, not fatal
timeout "${TESTS_S:-180}" $PY -m pytest tests -m "cuda or triton" -q -p no:cacheprovider --maxfail=25 \
  --continue-on-collection-errors --junitxml="$OUT/tests.xml" > "$OUT/tests.log" 2>&1
echo "pytest exit $?" | tee -a "$OUT/summary.txt"
grep -E "^(FAILED|ERROR)|passed|failed" "$OUT/tests.log" | tail -15 | tee -a "$OUT/summary.txt"

say "benchmarks"
(cd /tmp && timeout "${BENCH_S:-150}" $PY -m fastdiff.cli bench --device cuda --ops step_sde,step_ode,rescale,apg,loss,randn,methods \
  --sizes 20,24 --repeat 7 --csv-dir "$OUT") > "$OUT/bench.log" 2>&1
echo "bench exit $?" | tee -a "$OUT/summary.txt"
tail -45 "$OUT/bench.log"
