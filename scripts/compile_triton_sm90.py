"""Compile the rendered Triton attention kernels for Hopper (sm_90a) without a GPU and report
registers / spills from `ptxas -v`.  Fails (exit 1) if a kernel does not compile; spills are
reported (the tables hold measured winners, some of which spill a little).

    PYTHONPATH=. python scripts/compile_triton_sm90.py [--all-specs] [--candidates] [--kinds bwd]
        [--dtypes fp16] [--dims 128] [--even off,on] [--bwd-tma off,on]

Main configs: the tuned table of codegen/triton_configs.py for head dims 64/128/256, fp16 and
bf16, causal and not.  --all-specs also compiles feature-rich specs (bias, alibi, softcap,
dropout, key padding, windows); --candidates compiles every autotune candidate (slow), including
the one-launch backward variants (BwdConfig.fused: one "fused" row, the kernel's registers being
the larger of its dK/dV and dQ halves).  --even picks the kernels' EVEN_M / EVEN_N constexprs
(seqlens that divide the tiles: no bound checks, as triton_impl launches them then): "off" (any
length), "on", or both (the default: one row each, labelled even0 / even1).  --bwd-tma off,on
compiles each backward config with pointer loads and with TMA descriptor loads (BwdConfig.tma,
key suffix _tma); without it each config is compiled as the table / candidate list has it.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import re
import shutil
import subprocess
import sys
import tempfile

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from fa3_inductor.codegen import triton_configs, triton_render
from fa3_inductor.ops import triton_impl
from fa3_inductor.spec import AttentionSpec

TARGET = GPUTarget("cuda", 90, 128)
PTXAS = os.environ.get("PTXAS", "/usr/local/cuda/bin/ptxas")
_TY = {"fp16": "*fp16", "bf16": "*bf16"}


def _signature(fn, ptrs: dict, constexprs: dict, floats=("sm_scale",)):
    """Every non-constexpr argument: pointer (from ptrs), fp32 scalar, or i32 (strides, sizes)."""
    sig, attrs = {}, {}
    for idx, name in enumerate(fn.arg_names):
        if name in constexprs:
            sig[name] = "constexpr"
        elif name in ptrs:
            sig[name] = ptrs[name]
            attrs[(idx,)] = [["tt.divisibility", 16]]
        elif name in floats:
            sig[name] = "fp32"
        else:
            sig[name] = "i32"
            # strides of contiguous [B,H,S,D] tensors with D % 16 == 0 are multiples of 16,
            # as Triton's launcher would specialise them; sizes (Sq/Sk/H) are not assumed.
            if name.startswith("s") and name not in ("sm_scale", "skpn", "sbn"):
                attrs[(idx,)] = [["tt.divisibility", 16]]
    return sig, attrs


def _ptxas(ptx: str, name: str):
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, f"{name}.ptx")
        with open(path, "w") as f:
            f.write(ptx)
        r = subprocess.run([PTXAS, "-arch=sm_90a", "-v", path, "-o", os.path.join(d, "out.cubin")],
                           capture_output=True, text=True)
    text = r.stdout + r.stderr
    regs = re.search(r"Used (\d+) registers", text)
    spill_st = re.search(r"(\d+) bytes spill stores", text)
    spill_ld = re.search(r"(\d+) bytes spill loads", text)
    smem = re.search(r"(\d+) bytes smem", text)
    if r.returncode != 0:
        return None, text
    return dict(regs=int(regs.group(1)) if regs else -1, spill_st=int(spill_st.group(1)) if spill_st else 0,
                spill_ld=int(spill_ld.group(1)) if spill_ld else 0,
                smem=int(smem.group(1)) if smem else 0), text


def _compile(fn, ptrs, constexprs, num_warps, num_stages, label):
    sig, attrs = _signature(fn, ptrs, constexprs)
    src = ASTSource(fn, sig, constexprs, attrs)
    try:
        k = triton.compile(src, target=TARGET, options=dict(num_warps=num_warps, num_stages=num_stages))
    except Exception as exc:
        return dict(label=label, error=f"triton: {str(exc).splitlines()[0][:200]}")
    info, text = _ptxas(k.asm["ptx"], fn.__name__)
    if info is None:
        return dict(label=label, error=f"ptxas: {text[-300:]}")
    # Triton's own shared-memory figure (dynamic smem) is what limits occupancy.
    info["tsmem"] = k.metadata.shared
    return dict(label=label, **info)


def _tensor_ptrs(dt, spec, names):
    p = {n: _TY[dt] for n in names}
    return p


def fwd_kernel(spec, dt, d, cfg, even=False):
    mod = triton_render.load("fwd", spec)
    dp = triton_configs.pad_head_dim(d)
    ptrs = _tensor_ptrs(dt, spec, ["Q", "K", "V", "Out"])
    ptrs["Lse"] = "*fp32"
    if cfg.tma:  # host-built 4-D descriptors, as triton_impl._descriptors makes them
        ty = _TY[dt][1:]
        for name, rows in (("Q", cfg.block_m), ("K", cfg.block_n), ("V", cfg.block_n)):
            ptrs[name] = f"tensordesc<{ty}[1,1,{rows},{dp}]>"
    ce = dict(HEAD_D=d, HEAD_DV=d, D_PAD=dp, DV_PAD=dp, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n,
              USE_TMA=cfg.tma, LPT=cfg.lpt, EVEN_M=even, EVEN_N=even,
              FOLD_SCALE=triton_impl.fold_scale(spec, 1.0, dp))  # as triton_impl launches it
    _optional(spec, ptrs, ce)
    return _compile(mod.attn_fwd, ptrs, ce, cfg.num_warps, cfg.num_stages,
                    f"fwd {dt} d{d} {spec.describe()[:40]:40s} {cfg.key()} even{int(even)}")


def _bwd_descs(dt, dp, block_m, block_n, suffix=""):
    """Descriptor types of Q, K, V, DO for one kernel (half) with BwdConfig.tma, as
    triton_impl._bwd_descriptors builds them (suffix "2": the fused kernel's dQ half)."""
    ty = _TY[dt][1:]
    return {f"{name}{suffix}": f"tensordesc<{ty}[1,1,{rows},{dp}]>"
            for name, rows in (("Q", block_m), ("K", block_n), ("V", block_n), ("DO", block_m))}


def bwd_kernels(spec, dt, d, cfg, atomic_dq=False, even=False):
    mod = triton_render.load("bwd", spec, dbias=spec.mask_kind == "additive")
    dp = triton_configs.pad_head_dim(d)
    out = []
    ptrs = _tensor_ptrs(dt, spec, ["Q", "K", "V", "DO", "DK", "DV", "DQ"])
    ptrs.update(Lse="*fp32", Delta="*fp32")
    base = dict(HEAD_D=d, HEAD_DV=d, D_PAD=dp, DV_PAD=dp, EVEN_M=even, EVEN_N=even, USE_TMA=cfg.tma)
    if cfg.fused and not atomic_dq:
        return [fused_kernel(mod, spec, dt, d, cfg, ptrs, base)]
    ce = dict(base, BLOCK_M=cfg.block_m1, BLOCK_N=cfg.block_n1, ATOMIC_DQ=atomic_dq)
    if cfg.tma:
        ptrs = dict(ptrs, **_bwd_descs(dt, dp, cfg.block_m1, cfg.block_n1))
    if atomic_dq:
        ptrs["DQacc"] = "*fp32"
    else:
        ce["DQacc"] = None
    _optional(spec, ptrs, ce)
    out.append(_compile(mod.attn_bwd_dkdv, ptrs, ce, cfg.num_warps, cfg.num_stages,
                        f"dkdv {dt} d{d} {spec.describe()[:40]:40s} {cfg.key()} even{int(even)}"))
    ce = dict(base, BLOCK_M=cfg.block_m2, BLOCK_N=cfg.block_n2)
    if cfg.tma:
        ptrs = dict(ptrs, **_bwd_descs(dt, dp, cfg.block_m2, cfg.block_n2))
    _optional(spec, ptrs, ce)
    if spec.mask_kind == "additive":
        ptrs["DBias"] = "*fp32"
    else:
        ce["DBias"] = None
    out.append(_compile(mod.attn_bwd_dq, ptrs, ce, cfg.num_warps, cfg.num_stages,
                        f"dq   {dt} d{d} {spec.describe()[:40]:40s} {cfg.key()} even{int(even)}"))
    return out


def fused_kernel(mod, spec, dt, d, cfg, ptrs, base):
    """The one-launch backward (BwdConfig.fused): its registers are the larger half's."""
    ce = dict(base, BLOCK_M1=cfg.block_m1, BLOCK_N1=cfg.block_n1, BLOCK_M2=cfg.block_m2, BLOCK_N2=cfg.block_n2)
    ptrs = dict(ptrs)
    dp = base["D_PAD"]
    if cfg.tma:   # two descriptor sets: the dK/dV half's tiles, then the dQ half's
        ptrs.update(_bwd_descs(dt, dp, cfg.block_m1, cfg.block_n1))
        ptrs.update(_bwd_descs(dt, dp, cfg.block_m2, cfg.block_n2, "2"))
    else:
        ce.update(Q2=None, K2=None, V2=None, DO2=None)
    _optional(spec, ptrs, ce)
    if spec.mask_kind == "additive":
        ptrs["DBias"] = "*fp32"
    else:
        ce["DBias"] = None
    return _compile(mod.attn_bwd_fused, ptrs, ce, cfg.num_warps, cfg.num_stages,
                    f"fused {dt} d{d} {spec.describe()[:40]:40s} {cfg.key()} even{base['EVEN_M']:d}")


def _optional(spec, ptrs, ce):
    """Absent optional tensors are constexpr None, exactly as triton_impl launches them."""
    if spec.mask_kind == "additive":
        ptrs["Bias"] = "*fp32"
    elif spec.mask_kind == "bool":
        ptrs["Bias"] = "*u8"
    else:
        ce["Bias"] = None
    if spec.key_padding:
        ptrs["KP"] = "*u8"
    else:
        ce["KP"] = None
    if spec.alibi:
        ptrs["Slopes"] = "*fp32"
    else:
        ce["Slopes"] = None
    if spec.dropout_p > 0:
        ptrs["Seed"] = "*i64"
    else:
        ce["Seed"] = None


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--all-specs", action="store_true")
    ap.add_argument("--candidates", action="store_true")
    ap.add_argument("--dims", default="64,128,256")
    ap.add_argument("--kinds", default="fwd,bwd", help="which kernels: fwd, bwd or both")
    ap.add_argument("--dtypes", default="fp16,bf16")
    ap.add_argument("--even", default="off,on", help="EVEN_M/EVEN_N constexprs: off, on or both")
    ap.add_argument("--bwd-tma", default="", help="BwdConfig.tma of the backward configs: off, on or "
                    "both (default: as configured)")
    args = ap.parse_args(argv)
    kinds = set(args.kinds.split(","))
    evens = [{"off": False, "on": True}[e] for e in args.even.split(",")]
    bwd_tmas = [{"off": False, "on": True}[t] for t in args.bwd_tma.split(",") if t]
    if not shutil.which(PTXAS) and not os.path.exists(PTXAS):
        print(f"ptxas not found at {PTXAS}", file=sys.stderr)
        return 2
    specs = [AttentionSpec(), AttentionSpec(window_right=0)]
    if args.all_specs:
        specs += [AttentionSpec(window_right=0, window_left=255, align="bottom_right", key_padding=True),
                  AttentionSpec(mask_kind="additive"), AttentionSpec(mask_kind="bool"),
                  AttentionSpec(alibi="linear", softcap=30.0, window_right=0),
                  AttentionSpec(dropout_p=0.1, gqa_mapping="mod")]
    rows, main_spills = [], 0
    for d in (int(x) for x in args.dims.split(",")):
        for dt in args.dtypes.split(","):
            for spec in specs:
                is_main = spec.mask_kind is None and not spec.dropout_p and not spec.alibi and not spec.key_padding
                fcfgs = [triton_configs.for_spec(triton_configs.default_fwd(d, d, spec.causal), spec)]
                bcfgs = [triton_configs.for_spec(triton_configs.default_bwd(d, d, spec.causal), spec)]
                if args.candidates:
                    fcfgs = triton_configs.fwd_candidates(d, d, spec.causal)
                    bcfgs = triton_configs.bwd_candidates(d, d, spec.causal)
                fcfgs = fcfgs if "fwd" in kinds else []
                bcfgs = bcfgs if "bwd" in kinds else []
                if bwd_tmas:
                    bcfgs = list(dict.fromkeys(dataclasses.replace(c, tma=t) for c in bcfgs for t in bwd_tmas))
                for cfg in fcfgs:
                    for even in evens:
                        rows.append(fwd_kernel(spec, dt, d, cfg, even))
                        main_spills += is_main and cfg in fcfgs[:1] and rows[-1].get("spill_st", 0) > 0
                        _print(rows[-1])
                for cfg in bcfgs:
                    for even in evens:
                        for r in bwd_kernels(spec, dt, d, cfg, even=even):
                            rows.append(r)
                            main_spills += is_main and cfg in bcfgs[:1] and r.get("spill_st", 0) > 0
                            _print(r)
    errors = [r for r in rows if "error" in r]
    print(f"\n{len(rows)} kernels compiled, {len(errors)} errors, {main_spills} main configs spilling")
    return 1 if errors else 0


def _print(r):
    if "error" in r:
        print(f"{r['label']}  ERROR {r['error']}", flush=True)
    else:
        print(f"{r['label']}  regs={r['regs']:3d} spill_st={r['spill_st']:5d} spill_ld={r['spill_ld']:5d} "
              f"smem={r['tsmem']}", flush=True)


if __name__ == "__main__":
    sys.exit(main())
