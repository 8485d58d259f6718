#!/usr/bin/env bash
# FP8 forward on an H100 in < 4 minutes: install, GPU tests, accuracy at GPU sizes, throughput rows.
# Run from the repository root:  bash scripts/gpu_fp8_check.sh
set -uo pipefail
OUT=${OUT:-bench_out}
mkdir -p "$OUT"
python3 -m pip install -q --no-deps --no-build-isolation . || exit 1
REPO=$(pwd)
cd /tmp  # import the installed wheel, not the checkout

echo "== compile check (PTX: FP8 WGMMA, ptxas spills)"
timeout 120 python3 -m fa3_inductor.fp8.compile_check 2>&1 | tail -12

echo "== tests/gpu/test_fp8_gpu.py"
timeout 150 python3 -m pytest -q -x -p no:cacheprovider "$REPO/tests/gpu/test_fp8_gpu.py" 2>&1 | tail -15
echo "pytest rc=${PIPESTATUS[0]}"

echo "== accuracy (GPU, fp64 reference)"
timeout 120 python3 "$REPO/scripts/fp8_accuracy.py" --device cuda --kernel --batch 1 --heads 4 \
    --seqlens 2048 4096 8192 --hdims 128 256 --json "$REPO/$OUT/fp8_accuracy.json" > "$REPO/$OUT/fp8_accuracy.md"
cat "$REPO/$OUT/fp8_accuracy.md"

echo "== FP8 forward rows (non-causal, then causal)"
timeout 120 python3 -m fa3_inductor.bench.fp8_rows --json "$REPO/$OUT/fp8_rows.json" > "$REPO/$OUT/fp8_rows.md"
timeout 90 python3 -m fa3_inductor.bench.fp8_rows --causal --json "$REPO/$OUT/fp8_rows_causal.json" > "$REPO/$OUT/fp8_rows_causal.md"
echo "== short table"
cat "$REPO/$OUT/fp8_rows.md" "$REPO/$OUT/fp8_rows_causal.md"
