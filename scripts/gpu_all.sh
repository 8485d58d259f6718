#!/usr/bin/env bash
# Everything the H100 checks in one call (< 9.5 minutes): install, GPU tests of the Triton,
# CUDA and FP8 kernels, the kernel grid (ours next to cuDNN, flash SDPA, FlexAttention) and,
# with MODELS=1, the model grid (backend="fa3" next to "inductor" and eager).
# Only 8 files come back from the device, so every log lands in one tarball plus run.log.
#   PARTS="ddp cudaforced triton gluon bwdproto fwdproto cuda fp8 gpumodels diag tune cudadiag against schedules ablation ncu ncusrc compiletime models bench" bash scripts/gpu_all.sh
# PACK_CACHE=1 returns the kernel cache (cat the parts into .carry/fa3_cache.tgz).
# NO_FP8ROWS=1 skips the FP8 throughput rows; CUDA_ROWS="--decode --split" picks other CUDA rows,
# CUDA_ROWS=none none (default: the forward grid next to SDPA, with the ablation table).
# (ddp needs the 2-GPU kind; each part has its own T_<PART> timeout)
set -u
cd "$(dirname "$0")/.."
FINAL=${OUT:-$PWD/bench_out}
W=/tmp/fa3_run
rm -rf "$W"; mkdir -p "$W" "$FINAL"
PARTS=${PARTS:-"triton cuda fp8 bench"}
T0=$(date +%s)
LOG="$FINAL/run.log"
export PYTHONUNBUFFERED=1
export FA3_CUTLASS_INCLUDE="${FA3_CUTLASS_INCLUDE:-$PWD/.carry/cutlass_include}"
# The prebuilt CUDA kernels travel as one tarball (.carry/fa3_cache.tgz, from PACK_CACHE=1 of an
# earlier run): the unpacked libraries are bigger than the 64 MiB the working tree may carry.
if [ -f .carry/fa3_cache.tgz ]; then
  mkdir -p /tmp/fa3_cache && tar xzf .carry/fa3_cache.tgz -C /tmp/fa3_cache && export FA3_INDUCTOR_CACHE=/tmp/fa3_cache
elif [ -d .carry/fa3_cache ]; then export FA3_INDUCTOR_CACHE="$PWD/.carry/fa3_cache"; else export FA3_INDUCTOR_CACHE=$W/cache; fi
touch /tmp/fa3_run_start
say() { echo "[$(( $(date +%s) - T0 ))s] $*" | tee -a "$LOG"; }
has() { case " $PARTS " in *" $1 "*) return 0;; esac; return 1; }

say "device: $(nvidia-smi --query-gpu=name,clocks.max.sm --format=csv,noheader 2>&1)"
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" 2>&1 | tee -a "$LOG"
python3 -m pip install -q --no-deps --no-build-isolation . > "$W/pip.log" 2>&1 || { say "pip install failed"; tail -20 "$W/pip.log" | tee -a "$LOG"; }
# cuDNN's FP8 SDPA (the FP8 rows' peer) through the cuDNN frontend, when its wheel is carried.
for whl in .carry/nvidia_cudnn_frontend-*-cp312-*.whl; do
  [ -f "$whl" ] && { python3 -m pip install -q --no-deps "$whl" >> "$W/pip.log" 2>&1 || say "cudnn frontend install failed"; }
done

if has ddp; then
  say "== 2-GPU DDP/FSDP2 tests + DDP throughput (issue 7)"
  OUT=$W/ddp TORCHINDUCTOR_CACHE_DIR=/tmp/fa3_ddp_inductor timeout ${T_DDP:-240} bash scripts/gpu_ddp.sh > "$W/ddp_driver.log" 2>&1
  say "ddp rc=$?"; grep -v '^== device' "$W/ddp/run.log" | tail -30 | tee -a "$LOG"
fi
if has cudaforced; then
  say "== the CPU suite's real-model tests on CUDA tensors with force_rewrite"
  FA3_TEST_DEVICE=cuda timeout ${T_CUDAFORCED:-90} python3 -m pytest -q -p no:cacheprovider \
      tests/test_models_transformers.py -k "forced or sdpa or inductor" > "$W/pytest_cudaforced.log" 2>&1
  say "cuda forced model tests rc=$?"; tail -12 "$W/pytest_cudaforced.log" | tee -a "$LOG"
fi
if has triton; then
  say "== triton GPU tests"
  timeout ${T_TRITON:-400} python3 -m pytest -m gpu -q -p no:cacheprovider tests/gpu/test_triton_gpu.py > "$W/pytest_triton.log" 2>&1
  say "triton tests rc=$?"; tail -15 "$W/pytest_triton.log" | tee -a "$LOG"
fi
if has cuda; then
  say "== cuda GPU tests + rows"
  timeout ${T_CUDA:-120} bash scripts/gpu_cuda_check.sh > "$W/cuda.log" 2>&1
  say "cuda rc=$?"; tail -40 "$W/cuda.log" | tee -a "$LOG"
fi
if has fp8; then
  say "== fp8 GPU tests + rows"
  timeout ${T_FP8:-150} python3 -m pytest -q --maxfail=10 -p no:cacheprovider tests/gpu/test_fp8_gpu.py > "$W/pytest_fp8.log" 2>&1
  say "fp8 tests rc=$?"; tail -12 "$W/pytest_fp8.log" | tee -a "$LOG"
  python3 -c "import torch; print('aten attention ops:', [n for n in dir(torch.ops.aten) if 'attention' in n])" 2>&1 | tee -a "$LOG"
  if [ -z "${NO_FP8ROWS:-}" ]; then
    timeout ${T_FP8ROWS:-150} python3 -m fa3_inductor.bench.fp8_rows --both --kernels ${FP8_KERNELS:-cuda triton} \
        --json "$W/fp8_rows.json" > "$W/fp8_rows.md" 2>&1
    cat "$W/fp8_rows.md" | tail -40 | tee -a "$LOG"
  fi
  if [ -n "${FP8_SWEEP:-}" ]; then
    timeout ${T_FP8SWEEP:-90} python3 -m fa3_inductor.bench.fp8_rows --sweep --both --kernels cuda \
        --hdims ${FP8_SWEEP_HDIMS:-128} --seqlens ${FP8_SWEEP_SEQLENS:-8192} \
        --json "$W/fp8_sweep.json" > "$W/fp8_sweep.md" 2>&1
    cat "$W/fp8_sweep.md" | tail -30 | tee -a "$LOG"
  fi
fi
if has gpumodels; then
  say "== real models on the GPU through backend=fa3"
  timeout ${T_GPUMODELS:-300} python3 -m pytest -m gpu -v -p no:cacheprovider -o faulthandler_timeout=${FAULT_S:-240} --durations=0 tests/gpu/test_models_gpu.py tests/gpu/test_patterns_gpu.py > "$W/pytest_models.log" 2>&1
  say "gpu model tests rc=$?"; grep -E "passed|failed|PASSED|FAILED|Error|^[0-9.]+s call" "$W/pytest_models.log" | tail -40 | tee -a "$LOG"
fi
if has diag; then
  say "== one Llama attention, fwd+bwd, per mask route (fa3 vs inductor, kernel profile)"
  timeout ${T_DIAG:-90} python3 scripts/diag_llama_attn.py > "$W/diag_llama_attn.log" 2>&1
  say "diag rc=$?"; grep -v "Warning\|warn" "$W/diag_llama_attn.log" | tail -12 | tee -a "$LOG"
fi
if has tune; then
  say "== Triton tile candidates vs cuDNN (scripts/tune_triton.py)"
  timeout ${T_TUNE:-300} python3 scripts/tune_triton.py --dims ${TUNE_DIMS:-64,128,256} --seqlens ${TUNE_SEQLENS:-4096} \
      --json "$W/tune.json" > "$W/tune.log" 2>&1
  say "tune rc=$?"; sed -n '/== best per cell/,$p' "$W/tune.log" | tee -a "$LOG"; grep -E "^compiled|failed:" "$W/tune.log" | head -20 | tee -a "$LOG"
fi
if has cudadiag; then
  say "== CUDA forward variants at d256 + ncu of the default d256 / d128 kernels"
  timeout ${T_CUDADIAG:-200} python3 scripts/diag_cuda_fwd.py --seqlen 8192 --jobs 8 > "$W/cudadiag.log" 2>&1
  say "cudadiag rc=$?"; tail -12 "$W/cudadiag.log" | tee -a "$LOG"
  for d in 256 128; do
    timeout 90 ncu --clock-control none --profile-from-start off --section SpeedOfLight --section WarpStateStats \
        --section ComputeWorkloadAnalysis --section Occupancy --section LaunchStats \
        python3 scripts/diag_cuda_fwd.py --ncu-target $d > "$W/ncu_d$d.log" 2>&1
    say "ncu d$d rc=$?"; grep -E "Duration|Compute \(SM\) Throughput|Memory Throughput|Issue Slots Busy|Stall|No Eligible|Active Warps Per|Registers Per|Executed Ipc|Tensor|Warp Cycles Per Issued" "$W/ncu_d$d.log" | head -24 | tee -a "$LOG"
  done
fi
if has against; then
  # This build vs the earlier one (.carry/fa3_cache_earlier.tgz: the previous sources' builds of the
  # benchmark's instantiations) vs cuDNN, interleaved in one run (bench/other_build.py).
  say "== CUDA forward: this build vs the earlier build vs cuDNN (16-bit, then FP8)"
  mkdir -p /tmp/fa3_cache_earlier && tar xzf .carry/fa3_cache_earlier.tgz -C /tmp/fa3_cache_earlier
  timeout ${T_AGAINST:-200} python3 -m fa3_inductor.bench.cuda_rows --against /tmp/fa3_cache_earlier > "$W/against.md" 2>&1
  say "against rc=$?"; tail -80 "$W/against.md" | tee -a "$LOG"
  timeout ${T_AGAINST8:-200} python3 -m fa3_inductor.bench.fp8_rows --both --kernels cuda --against /tmp/fa3_cache_earlier \
      --json "$W/fp8_against.json" > "$W/fp8_against.md" 2>&1
  say "fp8 against rc=$?"; tail -30 "$W/fp8_against.md" | tee -a "$LOG"
fi
if has schedules; then
  # Schedule / softmax variants of this build (persistent grid, exp_poly) at the default tiles, each
  # also on the earlier build where it has one, and cuDNN, interleaved; then the FP8 variants.
  say "== CUDA schedule variants vs the earlier build vs cuDNN (d${SCHED_D:-128}), FP8 variants"
  # SCHED_AGAINST=none: this build only (no earlier-build rows); =self: this build's own cache as the
  # "earlier" one (identical kernels: what the interleaving reads as noise)
  AGAINST=""
  if [ "${SCHED_AGAINST:-}" = "self" ]; then AGAINST="--against $FA3_INDUCTOR_CACHE"
  elif [ "${SCHED_AGAINST:-}" != "none" ]; then
    mkdir -p /tmp/fa3_cache_earlier && tar xzf .carry/fa3_cache_earlier.tgz -C /tmp/fa3_cache_earlier
    AGAINST="--against /tmp/fa3_cache_earlier"
  fi
  # SCHED_SPECS: items hdim[:causal yes|no[:variant,variant...]] (default: d128, all variants;
  # none: only the FP8 variants)
  for item in ${SCHED_SPECS:-128}; do
    [ "$item" = none ] && break
    IFS=: read -r d c only <<< "$item"
    timeout ${T_SCHED:-200} python3 -m fa3_inductor.bench.cuda_rows --schedules $d ${c:+--causal $c} \
        ${only:+--only ${only//,/ }} ${SCHED_SEQLENS:+--seqlens $SCHED_SEQLENS} \
        --rounds ${SCHED_ROUNDS:-3} --iters ${SCHED_ITERS:-10} \
        $AGAINST > "$W/schedules_$d${c:+_$c}.md" 2>&1
    say "schedules $item rc=$?"; tail -60 "$W/schedules_$d${c:+_$c}.md" | tee -a "$LOG"
  done
  # FP8VAR_SPECS: items hdim[:causal yes|no|both[:variant,variant...]] (fp8_rows.VARIANTS; default
  # d128 and d256, both, all variants); FP8VAR_SEQLENS.  FP8VAR_SPECS=none skips them.
  for item in ${FP8VAR_SPECS:-128 256}; do
    [ "$item" = none ] && break
    IFS=: read -r d c only <<< "$item"
    case "${c:-both}" in yes) cs=(--causal);; no) cs=();; *) cs=(--both);; esac
    name="fp8_variants_$d${c:+_$c}"
    timeout ${T_FP8VAR:-150} python3 -m fa3_inductor.bench.fp8_rows --variants ${only//,/ } "${cs[@]}" --kernels cuda \
        --hdims $d ${FP8VAR_SEQLENS:+--seqlens $FP8VAR_SEQLENS} --json "$W/$name.json" > "$W/$name.md" 2>&1
    say "fp8 variants $item rc=$?"; tail -24 "$W/$name.md" | tee -a "$LOG"
  done
fi
if has ablation; then
  say "== CUDA ablation (d128, 8k) and the d128 tile candidates, interleaved"
  timeout ${T_ABLATION:-150} python3 -c "from fa3_inductor.bench import cuda_rows as c; print(c.format_rows(c.ablation_rows(), key_cols=('variant', 'hdim', 'seqlen')))" > "$W/ablation.md" 2>&1
  say "ablation rc=$?"; tail -10 "$W/ablation.md" | tee -a "$LOG"
  timeout ${T_TILES:-150} python3 -m fa3_inductor.bench.cuda_rows --tiles ${TILES_D:-128} ${TILES_ARGS:-} > "$W/tiles.md" 2>&1
  say "tiles rc=$?"; tail -32 "$W/tiles.md" | tee -a "$LOG"
fi
if has ncu; then
  # NCU_TARGETS: hdim:impl[:causal[:grid]] items, impl cuda (our forward), cudnn (the peer on the
  # same inputs, 8k) or triton (the Triton forward + backward at 4k, scripts/ncu_triton.py); grid
  # (cuda) p or t forces the persistent grid or one CTA per tile.  NCU_SECTIONS adds sections;
  # NCU_SEQLEN: the sequence length of the cuda / cudnn targets (default 8k).
  for t in ${NCU_TARGETS:-128:cuda 128:cudnn}; do
    IFS=: read -r d impl c g <<< "$t"
    say "== ncu d$d $impl ${c:-} ${g:-}"
    grid=(); [ "${g:-}" = p ] && grid=(--persistent yes); [ "${g:-}" = t ] && grid=(--persistent no)
    if [ "$impl" = triton ]; then prog=(scripts/ncu_triton.py --d "$d" ${c:+--causal})
    else prog=(scripts/diag_cuda_fwd.py --ncu-target "$d" --ncu-impl "$impl" ${c:+--causal} "${grid[@]}" \
               ${NCU_SEQLEN:+--seqlen $NCU_SEQLEN}); fi
    extra=(); for sec in ${NCU_SECTIONS:-}; do extra+=(--section "$sec"); done
    name="ncu_d${d}_${impl}${c:+_causal}${g:+_$g}"
    timeout ${T_NCU:-90} ncu --clock-control none --profile-from-start off --section SpeedOfLight \
        --section ComputeWorkloadAnalysis --section WarpStateStats --section InstructionStats --section SchedulerStats \
        "${extra[@]}" --print-details all python3 "${prog[@]}" > "$W/$name.log" 2>&1
    say "ncu rc=$?"; grep -E "^  [a-zA-Z_]|Duration|Compute \(SM\) Throughput|Issue Slots Busy|Executed Ipc A|No Eligible|SM: Pipe Tensor Cycles Active|Pipe Xu|Pipe Alu Cycles|Pipe Fma Cycles Active|Stall (Long|Barrier|Wait|Math|Short|Not Sel|Dispatch|Branch|Sleep|MIO|GMMA)|Warp Cycles Per Issued|Registers Per|${NCU_GREP:-Grid Size}" \
        "$W/$name.log" | grep -v "^    INF\|^    OPT" | head -${NCU_LINES:-40} | tee -a "$LOG"
  done
fi
if has ncusrc; then
  # Per-instruction stall sampling (ncu's source page, SASS) of our d128 forward and cuDNN's on the
  # same inputs (8k, non-causal): where the fixed-latency waits sit.  CSVs come back in the tarball.
  for impl in ${NCUSRC_IMPLS:-cuda cudnn}; do
    say "== ncu source counters d128 $impl"
    timeout ${T_NCUSRC:-120} ncu --clock-control none --profile-from-start off --section SourceCounters \
        --section WarpStateStats -o "$W/src_$impl" python3 scripts/diag_cuda_fwd.py --ncu-target 128 --ncu-impl "$impl" \
        > "$W/ncusrc_$impl.log" 2>&1
    say "ncu rc=$?"; tail -3 "$W/ncusrc_$impl.log" | tee -a "$LOG"
    ncu -i "$W/src_$impl.ncu-rep" --page source --print-source sass --csv > "$W/src_$impl.csv" 2> "$W/src_${impl}_err.log"
    say "source page rc=$? lines=$(wc -l < "$W/src_$impl.csv")"; head -c 600 "$W/src_$impl.csv" | tee -a "$LOG"; echo | tee -a "$LOG"
    ncu -i "$W/src_$impl.ncu-rep" --page details --print-details all > "$W/src_${impl}_details.txt" 2>&1
    rm -f "$W/src_$impl.ncu-rep"
  done
fi
if has compiletime; then
  say "== first-use build time, one instantiation at a time, empty cache"
  timeout ${T_COMPILETIME:-200} python3 scripts/compile_time.py ${COMPILETIME_ARGS:-} > "$W/compile_time.log" 2>&1
  say "compiletime rc=$?"; tail -6 "$W/compile_time.log" | tee -a "$LOG"
fi
if has gluon; then
  say "== Gluon GPU tests (backward, persistent forward)"
  timeout ${T_GLUON:-200} python3 -m pytest -m gpu -q -p no:cacheprovider ${GLUON_TESTS:-tests/gpu/test_gluon_bwd_gpu.py tests/gpu/test_gluon_fwd_persistent_gpu.py} > "$W/pytest_gluon.log" 2>&1
  say "gluon tests rc=$?"; tail -25 "$W/pytest_gluon.log" | tee -a "$LOG"
fi
if has bwdproto; then
  say "== Gluon backward prototype variants"
  timeout ${T_BWDPROTO:-270} python3 scripts/gluon_bwd_proto.py ${BWDPROTO_ARGS:---quick} > "$W/bwdproto.log" 2>&1
  say "bwdproto rc=$?"; tail -40 "$W/bwdproto.log" | tee -a "$LOG"
fi
if has fwdproto; then
  say "== Gluon forward: persistent vs one CTA per tile"
  timeout ${T_FWDPROTO:-200} python3 scripts/gluon_fwd_proto.py ${FWDPROTO_ARGS:---quick} > "$W/fwdproto.log" 2>&1
  say "fwdproto rc=$?"; tail -40 "$W/fwdproto.log" | tee -a "$LOG"
fi
if has models; then
  say "== model grid"
  timeout ${T_MODELS:-240} python3 -m fa3_inductor.bench --models --quick --out "$W" --budget-s ${MODELS_BUDGET:-180} --cases ${MODEL_CASES:-all} > "$W/models.log" 2> "$W/models_progress.log"
  say "models rc=$?"; tail -30 "$W/models.log" | tee -a "$LOG"
fi
if has bench; then
  say "== kernel grid"
  timeout ${T_BENCH:-200} python3 -m fa3_inductor.bench --kernels --quick --out "$W" --budget-s ${BENCH_BUDGET:-120} \
      > "$W/bench.log" 2> "$W/bench_progress.log"
  say "bench rc=$?"
fi
tar czf "$FINAL/results.tgz" -C "$W" --exclude=cache . 2>/dev/null
if [ -n "${PACK_CACHE:-}" ]; then  # the whole kernel cache, in parts under the 16 MiB a file may have
  tar czf /tmp/fa3_cache_all.tgz -C "$FA3_INDUCTOR_CACHE" cuda && split -b 15M /tmp/fa3_cache_all.tgz "$FINAL/fa3_cache.tgz.part_"
fi
say "== summary"
[ -s "$W/models.log" ] && tee -a "$LOG" < "$W/models.log"
[ -s "$W/models.log" ] || { tail -20 "$W/models_progress.log" 2>/dev/null | tee -a "$LOG"; }
[ -s "$W/bench.log" ] && tee -a "$LOG" < "$W/bench.log"
[ -s "$W/bench.log" ] || { tail -30 "$W/bench_progress.log" 2>/dev/null | tee -a "$LOG"; }
