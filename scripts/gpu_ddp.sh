#!/usr/bin/env bash
# 2-GPU H100 run for issue 7: DDP/FSDP2 with backend="fa3" (tests), then DDP throughput
# fa3 vs inductor.   OUT=/some/dir bash scripts/gpu_ddp.sh        (< 4 minutes)
# Budget: tests 200 s (the worker's own limit), throughput 150 s (hard stops).
set -u
OUT=${OUT:-$PWD/ddp_out}
mkdir -p "$OUT"
cd "$(dirname "$0")/.."
T0=$(date +%s)
export TORCHINDUCTOR_CACHE_DIR=${TORCHINDUCTOR_CACHE_DIR:-$OUT/inductor_cache}

echo "== device" | tee "$OUT/run.log"
nvidia-smi --query-gpu=index,name,clocks.sm,power.limit --format=csv 2>&1 | tee -a "$OUT/run.log"
python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'gpus', torch.cuda.device_count())" 2>&1 | tee -a "$OUT/run.log"
python3 -m pip install -q --no-deps --no-build-isolation . > "$OUT/pip.log" 2>&1 || echo "pip install failed (see pip.log)"

echo "== pytest tests/gpu/test_distributed_gpu.py" | tee -a "$OUT/run.log"
timeout 215 python3 -m pytest -q -m gpu tests/gpu/test_distributed_gpu.py -p no:cacheprovider > "$OUT/pytest_ddp.log" 2>&1
TEST_RC=$?
tail -25 "$OUT/pytest_ddp.log" | tee -a "$OUT/run.log"
echo "pytest rc=$TEST_RC ($(( $(date +%s) - T0 )) s so far)" | tee -a "$OUT/run.log"

echo "== throughput (DDP x2, Llama h1024 L4 H8/2 seq 2048 bf16)" | tee -a "$OUT/run.log"
REMAIN=$(( 230 - ($(date +%s) - T0) ))
[ $REMAIN -gt 150 ] && REMAIN=150
[ $REMAIN -lt 60 ] && REMAIN=60
timeout $REMAIN python3 scripts/ddp_throughput.py --steps 30 --warmup 3 --variants inductor,fa3,fa3-all > "$OUT/throughput.log" 2> "$OUT/throughput.err"
BENCH_RC=$?
grep -v '^\[' "$OUT/throughput.log" | tee -a "$OUT/run.log"
[ $BENCH_RC -ne 0 ] && tail -20 "$OUT/throughput.err" | tee -a "$OUT/run.log"
echo "== done ($(( $(date +%s) - T0 )) s; pytest rc=$TEST_RC, throughput rc=$BENCH_RC)" | tee -a "$OUT/run.log"
