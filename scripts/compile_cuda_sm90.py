#!/usr/bin/env python3
"""Build every CUDA forward instantiation for sm_90a (no GPU needed) and check the results:
ptxas registers / spills / stack (must be 0 spills, 0 local memory), SASS has HGMMA and no
local loads/stores, and ptxas did not warn about serialised wgmma.

    python scripts/compile_cuda_sm90.py                 # hdim 64/128/256 x fp16/bf16 x causal/not
    python scripts/compile_cuda_sm90.py --hdims 96 192  # other head dims
    python scripts/compile_cuda_sm90.py --ablations     # also what the GPU tests + ablation table use
    python scripts/compile_cuda_sm90.py --jobs 2
    python scripts/compile_cuda_sm90.py --fp8-sweep     # only the FP8 candidates (fp8_rows --sweep / --variants)

Exit status 1 when any build or check fails.  Builds land in the normal kernel cache, so a
later run of the kernels reuses them.
"""
from __future__ import annotations

import argparse
import concurrent.futures as cf
import pathlib
import re
import subprocess
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from fa3_inductor.codegen import cuda_jit  # noqa: E402


# Spills accepted where measurement chose the spilling tile: (hdim, fp8, block_n) -> bytes.
# d256 FP8 128x128 spills 12 bytes and beats the spill-free 128x96 under causal masks
# (1086 vs 955 TFLOP/s at 8k on the H100; equal non-causal).
# d256 16-bit 128x80 with the TMA-store epilogue spills 24 bytes (non-causal; causal none) and
# measured no slower than the spill-free direct-store epilogue of the run before (device run 2
# of session 5: 656 / 699 / 728 / 730 vs 638 / 694 / 731 / 714 TFLOP/s at 2k / 4k / 8k / 16k).
# d64 192 x 128 (three consumer warpgroups of 160 registers) keeps up to 60 bytes of the tile's
# loop-invariant values in local memory: stored before the main loop, read back in the epilogue
# (no STL/LDL between the first and the last GMMA; checked below), and measured +12-15% over the
# spill-free 128 x 128 at 4k-16k non-causal (session 5, device run 3).
# FP8 d128 128 x 224 (non-causal) keeps 12 bytes in local memory outside the GMMA loop since the
# one-CTA-per-tile loop went back to its pre-session-8 form (built spill-free in between, when it
# measured +5% over 128 x 192 at 4k-16k; session 8, device run 2).
# K/V multicast (cluster) builds: the producer warpgroup (24 registers) keeps its cluster slice
# offsets in local memory (60-64 bytes at d128, read by the one loader thread; its code sits after
# the consumers', outside the GMMA loop); d256's consumers also keep the single-CTA build's 24 bytes.
# (hdim, fp8, block_n, cluster) -> (bytes, whether the spill may sit inside the GMMA loop)
SPILL_ALLOWANCE = {(256, True, 128, False): (16, True), (256, False, 80, False): (24, True),
                   (64, False, 128, False): (60, False), (128, True, 224, False): (12, False),
                   (128, False, 160, True): (64, False), (128, False, 128, True): (64, False),
                   (256, False, 80, True): (96, True)}


def _tile_key(cfg):
    return (cfg.head_dim, cfg.fp8, cfg.block_n, cfg.cluster)


def _local_memory_in_loop(sass: str) -> bool:
    """STL/LDL between the first and the last GMMA instruction: a spill inside the main loop
    (allowed spills must stay in the prologue and the epilogue)."""
    lines = sass.splitlines()
    gmma = [i for i, ln in enumerate(lines) if re.search(r"\b[HQ]GMMA\.", ln)]
    return bool(gmma) and any(re.search(r"\b(STL|LDL)\b", ln) for ln in lines[gmma[0]:gmma[-1]])


def configs(hdims, extras):
    return cuda_jit.standard_configs(tuple(hdims), extras=extras)


def check(cfg):
    t0 = time.perf_counter()
    cached = (cuda_jit.cache_dir() / f"{cfg.name()}_{cuda_jit.cache_key(cfg)}.so").is_file()
    so = cuda_jit.compile_config(cfg)
    dt = time.perf_counter() - t0
    rep = cuda_jit.ptxas_report(cfg)
    problems = []
    allowance, in_loop_ok = SPILL_ALLOWANCE.get(_tile_key(cfg), (0, False))
    if (rep["spill_stores"] or 0) > allowance or (rep["spill_loads"] or 0) > allowance:
        problems.append(f"spills {rep['spill_stores']}/{rep['spill_loads']}")
    stack_allowed = max(16, allowance) if allowance else 0  # an allowed spill comes with its frame
    if (rep["stack"] or 0) > stack_allowed:
        problems.append(f"stack {rep['stack']}")
    if rep["wgmma_serialized"]:
        problems.append("wgmma serialized: " + "; ".join(
            line for line in rep["log"].splitlines() if "wgmma" in line.lower())[:300])
    n_hgmma = None
    tool = cuda_jit.find_cuobjdump()
    if tool:
        sass = subprocess.run([tool, "-sass", str(so)], capture_output=True, text=True).stdout
        # 16-bit WGMMA is HGMMA in SASS, 8-bit (e4m3) is QGMMA.
        n_hgmma = len(re.findall(r"\b[HQ]GMMA\.", sass))
        if n_hgmma == 0:
            problems.append("no HGMMA/QGMMA in SASS")
        if not allowance and re.search(r"\b(STL|LDL)\b", sass):
            problems.append("local memory (STL/LDL) in SASS")
        elif allowance and not in_loop_ok and _local_memory_in_loop(sass):
            problems.append("local memory (STL/LDL) between the GMMAs of the main loop")
    return dict(name=cfg.name(), seconds=dt, cached=cached, registers=rep["registers"],
                spills=f"{rep['spill_stores']}/{rep['spill_loads']}", hgmma=n_hgmma, problems=problems)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hdims", type=int, nargs="+", default=[64, 128, 256])
    ap.add_argument("--ablations", action="store_true",
                    help="also the ablation / persistent / window / fp32-out variants the GPU tests use")
    ap.add_argument("--jobs", type=int, default=1)
    ap.add_argument("--fp8-sweep", action="store_true",
                    help="build only the FP8 key-tile candidates timed by fa3_inductor.bench.fp8_rows --sweep")
    args = ap.parse_args(argv)
    problem = cuda_jit.toolchain_problem()
    if problem:
        print(f"toolchain unavailable: {problem}")
        return 1
    print(f"nvcc: {cuda_jit.find_nvcc()} ({cuda_jit.nvcc_version()})\ncutlass: {cuda_jit.cutlass_include()}")
    if args.fp8_sweep:
        from fa3_inductor.bench.fp8_rows import CUDA_SWEEP, CUDA_VARIANTS
        cfgs = [cuda_jit.config_for(d, "bfloat16", has_wr=causal, fp8=True, **c)
                for d, cands in CUDA_SWEEP.items() if d in args.hdims for c in cands for causal in (False, True)]
        cfgs += [cuda_jit.config_for(d, "bfloat16", has_wr=causal, fp8=True, **v)
                 for d in args.hdims for v in CUDA_VARIANTS for causal in (False, True)]
    else:
        cfgs = configs(args.hdims, args.ablations)
    failed = 0
    with cf.ThreadPoolExecutor(max_workers=args.jobs) as ex:
        futs = {ex.submit(check, c): c for c in cfgs}
        for fut in cf.as_completed(futs):
            cfg = futs[fut]
            try:
                r = fut.result()
            except Exception as exc:  # compile error: print the tail of nvcc's output
                failed += 1
                print(f"FAIL {cfg.name()}: {str(exc)[-3000:]}", flush=True)
                continue
            ok = not r["problems"]
            failed += not ok
            when = "(cached)" if r["cached"] else f"{r['seconds']:.0f}s"
            extra = ("  " + "; ".join(r["problems"])) if r["problems"] else ""
            print(f"{'ok  ' if ok else 'FAIL'} {r['name']:<44} regs={r['registers']} spills={r['spills']} "
                  f"hgmma={r['hgmma']} {when}{extra}", flush=True)
    print(f"{len(cfgs) - failed}/{len(cfgs)} instantiations ok")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
