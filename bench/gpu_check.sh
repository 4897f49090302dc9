#!/usr/bin/env bash
# One device call on a lent GPU machine (the device tool, 10 minutes a command): build fastdiff for this GPU's
# architecture, run the cuda- and the triton-marked tests, the GPU benchmarks and a compute-sanitizer pass, each
# stage under its own time limit and writing its files as it goes, so that the call returns what it measured
# even when a stage runs out of time:
#
#   bash bench/gpu_check.sh                      (from the repository root; OUT defaults to ./gpu-out)
#   device run: command "bash bench/gpu_check.sh", timeout_s 600, carry ["bench/wheels"] (the peers' wheels,
#   fetched here by bench/fetch_wheels.sh: the device machine reaches no package index)
#   GPU_CHECK_DRY=1 bash bench/gpu_check.sh      (no GPU: every stage on a small CPU selection; CI runs this)
#
# The device tool returns at most 8 files from $OUT; these are they:
#   summary.txt   environment, nvidia-smi, one line per stage (exit status, seconds), pass/fail counts
#   build.log     the pip build          tests.log       both pytest runs' output
#   cuda.xml      junit of -m cuda       triton.xml      junit of -m triton
#   bench.csv     one row per case, rewritten after each group of cases (fastdiff.bench.harness.write_rows)
#   bench.log     the benchmark table    sanitizer.log   compute-sanitizer memcheck + racecheck of small calls
# Stage limits (seconds; the defaults fill ~9.5 minutes): BUILD_S CUDA_S TRITON_S BENCH_S SANITIZER_S. Each stage
# runs under `timeout -s INT -k 30`: pytest and the benchmark stop on SIGINT with their files written.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/gpu-out}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
DRY=${GPU_CHECK_DRY:-0}
export PYTHONUNBUFFERED=1
export TRITON_CACHE_DIR=${TRITON_CACHE_DIR:-/tmp/fastdiff-triton-cache}  # kept while the machine stays warm
: > "$OUT/summary.txt"
say() { echo "== $* ($(date +%T))" | tee -a "$OUT/summary.txt"; }

# stage NAME LIMIT LOG COMMAND...: runs COMMAND under its limit with output to LOG; one summary line
stage() {
  local name=$1 limit=$2 log=$3
  shift 3
  local t0=$SECONDS
  timeout -s INT -k 30 "$limit" "$@" >> "$log" 2>&1
  local rc=$?
  local why=""
  [ $rc -eq 124 ] && why=" (stopped at its ${limit} s limit)"
  say "stage $name: exit $rc$why, $((SECONDS - t0)) s"
  return $rc
}

if [ "$DRY" = 1 ]; then
  say "dry run (GPU_CHECK_DRY=1): no GPU; each stage runs a small CPU selection"
  DEVICE=cpu
  CUDA_SELECT=(tests/test_step_call.py -k "cpu and B1-")
  TRITON_SELECT=(tests/test_step_call.py -k "triton and B1-")
  BENCH_ARGS=(--device cpu --ops randn --sizes 12 --repeat 1 --no-compile --threads 1)
else
  DEVICE=cuda
  CUDA_SELECT=(tests -m cuda)
  TRITON_SELECT=(tests -m triton)
  BENCH_ARGS=(--device cuda --ops step_sde,step_ode,rescale,apg,loss,randn,methods,gram,langevin,loop
              --sizes 20,24 --repeat 7)
fi
if command -v nvidia-smi > /dev/null; then nvidia-smi >> "$OUT/summary.txt" 2>&1; else
  echo "nvidia-smi: none" >> "$OUT/summary.txt"; fi
say "$($PY -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda,
  torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU")' 2>&1)"

: > "$OUT/build.log"
if [ "$DRY" = 1 ]; then
  stage build "${BUILD_S:-60}" "$OUT/build.log" $PY -c 'import fastdiff; print(fastdiff._native.status)'
else
  ARCH=$($PY -c 'import torch; print("%d.%d" % torch.cuda.get_device_capability())')
  say "build for TORCH_CUDA_ARCH_LIST=$ARCH"
  export FASTDIFF_CUDA=1 TORCH_CUDA_ARCH_LIST="$ARCH" MAX_JOBS=$(nproc)
  if ! stage build "${BUILD_S:-200}" "$OUT/build.log" $PY -m pip install --no-build-isolation --no-deps .; then
    tail -40 "$OUT/build.log"
    exit 1
  fi
  if compgen -G "bench/wheels/*.whl" > /dev/null; then  # the peers (diffusers, k-diffusion, torchsde, ...)
    $PY -m pip install --no-index --no-deps bench/wheels/*.whl >> "$OUT/build.log" 2>&1 \
      && say "peers installed from bench/wheels" || say "peers: install from bench/wheels failed (build.log)"
  else
    say "peers: no bench/wheels (bench/fetch_wheels.sh); the loop benchmark compares fewer peers"
  fi
fi
(cd /tmp && $PY -c 'import fastdiff; print(fastdiff.backends())') >> "$OUT/summary.txt" 2>&1

: > "$OUT/tests.log"
# from the checkout, as CI does: the sources import from here, _C from the install above
for kind in cuda triton; do
  if [ $kind = cuda ]; then select=("${CUDA_SELECT[@]}"); limit=${CUDA_S:-100}; else
    select=("${TRITON_SELECT[@]}"); limit=${TRITON_S:-130}; fi
  echo "---- $kind: pytest ${select[*]}" >> "$OUT/tests.log"
  stage "$kind tests" "$limit" "$OUT/tests.log" $PY -m pytest "${select[@]}" -q -p no:cacheprovider \
    --maxfail=25 --continue-on-collection-errors --junitxml="$OUT/$kind.xml"
  grep -E "^(FAILED|ERROR)|[0-9]+ (passed|failed)" "$OUT/tests.log" | tail -6 | sed "s/^/  $kind: /" \
    | tee -a "$OUT/summary.txt"
  [ -s "$OUT/$kind.xml" ] || echo '<testsuites/>' > "$OUT/$kind.xml"  # stopped before junit was written
done

: > "$OUT/bench.log"
rm -rf "$OUT/bench-rows" && mkdir -p "$OUT/bench-rows"
(cd /tmp && stage bench "${BENCH_S:-120}" "$OUT/bench.log" $PY -m fastdiff.cli bench "${BENCH_ARGS[@]}" \
  --csv-dir "$OUT/bench-rows")
csv=$(ls -t "$OUT"/bench-rows/*.csv 2>/dev/null | head -1)
if [ -n "$csv" ]; then mv "$csv" "$OUT/bench.csv"; else echo "no rows" > "$OUT/bench.csv"; fi
rm -rf "$OUT/bench-rows"
say "bench: $(($(wc -l < "$OUT/bench.csv") - 1)) rows"

: > "$OUT/sanitizer.log"
if [ "$DRY" = 1 ] || ! command -v compute-sanitizer > /dev/null; then
  say "sanitizer: skipped ($([ "$DRY" = 1 ] && echo "dry run" || echo "no compute-sanitizer on PATH"))" \
    | tee -a "$OUT/sanitizer.log" > /dev/null
  $PY bench/sanitizer_calls.py --device "$DEVICE" >> "$OUT/sanitizer.log" 2>&1  # the calls themselves still run
else
  for tool in memcheck racecheck; do
    echo "---- $tool" >> "$OUT/sanitizer.log"
    stage "sanitizer $tool" "$(( ${SANITIZER_S:-80} / 2 ))" "$OUT/sanitizer.log" \
      compute-sanitizer --tool $tool --error-exitcode 3 $PY bench/sanitizer_calls.py --device cuda
  done
fi
say "done"
tail -25 "$OUT/bench.log"
