#!/usr/bin/env bash
# CUDA template check on an H100 (< 5 minutes): install, prebuild the kernels in parallel,
# run the GPU tests, then the forward rows + ablation table (printed last).
#   FA3_CUTLASS_INCLUDE: CUTLASS include/ dir (default: the carried copy in .carry/cutlass_include)
#   FA3_INDUCTOR_CACHE:  kernel cache (default .carry/fa3_cache if carried, else /tmp/fa3_cache)
set -uo pipefail
cd "$(dirname "$0")/.."
export FA3_CUTLASS_INCLUDE="${FA3_CUTLASS_INCLUDE:-$PWD/.carry/cutlass_include}"
if [ -z "${FA3_INDUCTOR_CACHE:-}" ]; then
  if [ -f .carry/fa3_cache.tgz ]; then
    mkdir -p /tmp/fa3_cache && tar xzf .carry/fa3_cache.tgz -C /tmp/fa3_cache && export FA3_INDUCTOR_CACHE=/tmp/fa3_cache
  elif [ -d .carry/fa3_cache ]; then export FA3_INDUCTOR_CACHE="$PWD/.carry/fa3_cache"; else export FA3_INDUCTOR_CACHE=/tmp/fa3_cache; fi
fi
PY=${PY:-python3}
echo "== install"; $PY -m pip install -q --no-deps --no-build-isolation . || exit 1
nvidia-smi --query-gpu=name,clocks.max.sm --format=csv,noheader || true
echo "== build (sm_90a, parallel)"
$PY scripts/compile_cuda_sm90.py --ablations --jobs 14 2>&1 | tail -40
echo "== GPU tests"
$PY -m pytest -q --maxfail=10 -m gpu tests/gpu/test_cuda_fa3.py -p no:cacheprovider 2>&1 | tail -25
if [ "${CUDA_ROWS:-}" != "none" ]; then
  echo "== forward rows: ${CUDA_ROWS:---impls cuda sdpa (fp16) + ablation}"
  $PY -m fa3_inductor.bench.cuda_rows ${CUDA_ROWS:---impls cuda sdpa} 2>&1 | tail -150
fi
