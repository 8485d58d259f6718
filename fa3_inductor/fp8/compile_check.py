"""Compile the FP8 Triton kernels for Hopper without a GPU and check what came out.

    python -m fa3_inductor.fp8.compile_check          # prints one line per kernel/config

For each kernel (the attention kernel, the per-tile quantisation kernel, and the persistent
one-launch quantisation of each FP8 path's Q/K/V tiles): triton.compile(ASTSource) for
GPUTarget("cuda", 90, 128), then
  - the PTX must contain FP8 WGMMA (`wgmma.mma_async...e4m3.e4m3`) for the attention GEMMs,
  - `ptxas -arch=sm_90a -v` must report 0 bytes of spill stores/loads.
Pointer and stride arguments get the divisibility-by-16 hints a real launch would give
them (Triton specialises those at launch; without them it would not vectorise).
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile

from . import templates

_DIV16 = [["tt.divisibility", 16]]


def _ptxas() -> str:
    for cand in ("/usr/local/cuda/bin/ptxas", shutil.which("ptxas")):
        if cand and os.path.exists(cand):
            return cand
    import triton
    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")


def _compile(fn, signature: dict, constexprs: dict, div16: list, num_warps: int, num_stages: int):
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    names = list(signature)
    attrs = {(names.index(n),): _DIV16 for n in div16}
    src = ASTSource(fn, signature, constexprs=constexprs, attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", 90, 128),
                          options={"num_warps": num_warps, "num_stages": num_stages})


def ptxas_report(ptx: str) -> dict:
    """Registers and spill bytes per ptxas -v (summed over the kernels in the PTX)."""
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "k.ptx")
        with open(path, "w") as f:
            f.write(ptx)
        res = subprocess.run([_ptxas(), "-arch=sm_90a", "-v", path, "-o", os.path.join(tmp, "k.cubin")],
                             capture_output=True, text=True)
    text = res.stdout + res.stderr
    if res.returncode != 0:
        raise RuntimeError(f"ptxas failed:\n{text}")
    spills = sum(int(a) + int(b) for a, b in re.findall(r"(\d+) bytes spill stores, (\d+) bytes spill loads", text))
    regs = [int(r) for r in re.findall(r"Used (\d+) registers", text)]
    return {"spill_bytes": spills, "registers": max(regs) if regs else None, "log": text}


def wgmma_kinds(ptx: str) -> set:
    return set(re.findall(r"wgmma\.mma_async[\w.]*", ptx))


def check_attention(d: int, causal: bool = True, out: str = "bf16", tiles=None) -> dict:
    from .attention import tiles_for
    bm, bn, warps, stages = tiles_for(d, tiles)
    mod = templates.load("fp8_fwd")
    sig = {"Q8": "*fp8e4nv", "K8": "*fp8e4nv", "VT8": "*fp8e4nv", "QS": "*fp32", "KS": "*fp32", "VS": "*fp32",
           "OUT": f"*{out}", "LSE": "*fp32", "sm_scale_log2": "fp32", "seqlen_q": "i32", "seqlen_k": "i32",
           "n_heads": "i32", "kv_group": "i32"}
    strides = ["stride_qb", "stride_qh", "stride_qs", "stride_kb", "stride_kh", "stride_ks",
               "stride_vb", "stride_vh", "stride_vd", "stride_qsb", "stride_qsh", "stride_ksb", "stride_ksh",
               "stride_ob", "stride_oh", "stride_os", "stride_lb", "stride_lh"]
    sig.update({s: "i32" for s in strides})
    const = dict(BLOCK_M=bm, BLOCK_N=bn, HEAD_DIM=d, HEAD_DIM_V=d, CAUSAL=causal, BOTTOM_RIGHT=False,
                 P_SCALE=448.0, INTERPRET=False)
    sig.update({c: "constexpr" for c in const})
    div16 = ["Q8", "K8", "VT8", "QS", "KS", "VS", "OUT", "LSE", "stride_qb", "stride_qh", "stride_qs",
             "stride_kb", "stride_kh", "stride_ks", "stride_vb", "stride_vh", "stride_vd",
             "stride_ob", "stride_oh", "stride_os"]
    cc = _compile(mod.fp8_attn_fwd_kernel, sig, const, div16, warps, stages)
    ptx = cc.asm["ptx"]
    rep = ptxas_report(ptx)
    return {"kernel": f"fp8_fwd d={d} causal={causal} tiles={bm}x{bn} w{warps} s{stages}",
            "wgmma": wgmma_kinds(ptx), "cp_async": ptx.count("cp.async"), **rep, "ptx": ptx}


def check_quant(d: int, block: int, hadamard: bool, transpose: bool, dtype: str = "bf16",
                num_warps: int | None = None, permute: bool = False) -> dict:
    mod = templates.load("fp8_quant")
    if num_warps is None:
        num_warps = 8 if block * d >= 128 * 128 else 4  # as quantize_launch._quantize_legacy
    sig = {"X": f"*{dtype}", "Y": "*fp8e4nv", "SCALES": "*fp32", "SIGNS": "*fp32", "seqlen": "i32", "s_store": "i32",
           "n_heads": "i32"}
    strides = ["stride_xb", "stride_xh", "stride_xs", "stride_xd", "stride_yb", "stride_yh", "stride_ys",
               "stride_yd", "stride_sb", "stride_sh"]
    sig.update({s: "i32" for s in strides})
    const = dict(BLOCK=block, BLOCK_P2=1 << (block - 1).bit_length(), D=d, LOG2_D=d.bit_length() - 1,
                 HADAMARD=hadamard, PERMUTE=transpose and permute, INTERPRET=False)
    sig.update({c: "constexpr" for c in const})
    # The unit stride (d for Q/K, s for V^T) is specialised to the constant 1 at launch.
    if transpose:
        const["stride_ys"] = 1
        sig["stride_ys"] = "constexpr"
    else:
        const["stride_yd"] = 1
        sig["stride_yd"] = "constexpr"
    const["stride_xd"] = 1
    sig["stride_xd"] = "constexpr"
    div16 = ["X", "Y", "SCALES", "SIGNS", "stride_xb", "stride_xh", "stride_xs", "stride_yb", "stride_yh",
             "stride_yd" if transpose else "stride_ys"]
    cc = _compile(mod.fp8_quant_kernel, sig, const, div16, num_warps, 1)
    ptx = cc.asm["ptx"]
    rep = ptxas_report(ptx)
    return {"kernel": f"fp8_quant d={d} block={block} hadamard={hadamard} transpose={transpose} w{num_warps}",
            "wgmma": wgmma_kinds(ptx), **rep, "ptx": ptx}


_SLOT_ARGS = ["X", "Y", "SC", "RM", "seqlen", "s_store", "n_heads", "n_tiles", "sxb", "sxh", "sxs", "sxd",
              "syb", "syh", "sys", "syd", "ssb", "ssh"]


def check_quant_qkv(d: int, slots, dtype: str = "bf16", stages: int | None = None, num_warps: int | None = None,
                    sass: bool = False) -> dict:
    """The persistent kernel (fp8_quant_qkv_kernel) for one launch: `slots` = [(block, rotate, transpose,
    permute)] (Q, K, V), specialised as quantize_launch._launch_persistent launches it on contiguous inputs
    whose lengths are multiples of 16.  sass=True adds the SASS and the tile loop's instruction count."""
    from . import quantize_launch
    mod = templates.load("fp8_quant")
    fn = mod.fp8_quant_qkv_kernel
    cfg = quantize_launch.persistent_config(d, [(b, r) for b, r, _, _ in slots])
    stages = stages or cfg["STAGES"]
    num_warps = num_warps or quantize_launch.QUANT_WARPS
    types, const, div16 = {}, dict(cfg, STAGES=stages, N_SLOTS=len(slots), INTERPRET=False), []
    for i in range(3):
        if i >= len(slots):  # an unused slot: constexpr zeros (the launcher passes slot 0's tensors)
            const.update({f"{n}{i}": 0 for n in _SLOT_ARGS})
            const.update({f"{k}{i}": v for k, v in quantize_launch.slot_constexprs(16, False, False, False).items()})
            continue
        block, rot, tr, perm = slots[i]
        const.update({f"{k}{i}": v for k, v in quantize_launch.slot_constexprs(block, rot, tr, perm).items()})
        unit = {"sxd", "sys" if tr else "syd"}
        for n in _SLOT_ARGS:
            name = f"{n}{i}"
            if n in unit:
                const[name] = 1  # Triton specialises a stride of 1 into the constant
            elif n in ("X", "RM"):
                types[name] = f"*{dtype}"
            elif n == "Y":
                types[name] = "*fp8e4nv"
            elif n == "SC":
                types[name] = "*fp32"
            else:
                types[name] = "i32"
            if n not in unit and n not in ("n_heads", "n_tiles", "ssb", "ssh"):
                div16.append(name)
    sig = {n: (types[n] if n in types else "constexpr") for n in fn.arg_names}
    cc = _compile(fn, sig, const, div16, num_warps, stages)
    ptx = cc.asm["ptx"]
    rep = ptxas_report(ptx)
    label = " ".join(f"{b}{'r' if r else ''}{'t' if t else ''}{'p' if p else ''}" for b, r, t, p in slots)
    out = {"kernel": f"fp8_quant_qkv d={d} [{label}] s{stages} w{num_warps}", "smem": cc.metadata.shared,
           "wgmma": wgmma_kinds(ptx), "st_global_b8": len(re.findall(r"st\.global(\.\w+)*\.b8", ptx)), **rep,
           "ptx": ptx}
    if sass:
        out["sass"] = _sass(cc.asm["cubin"])
        out["loop_instructions"] = loop_instructions(out["sass"])
    return out


def _sass(cubin: bytes) -> str:
    import triton
    nvdisasm = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "nvdisasm")
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "k.cubin")
        with open(path, "wb") as f:
            f.write(cubin)
        return subprocess.run([nvdisasm, "-c", path], capture_output=True, text=True).stdout


def loop_instructions(sass: str) -> list:
    """SASS instruction counts of the outermost loops (backward-branch spans), in program order:
    the tile loops of the persistent kernel."""
    labels, ops, pending = {}, [], []
    for line in sass.splitlines():
        lab = re.match(r"^(\.L_x_\d+):", line)
        if lab:
            pending.append(lab.group(1))
            continue
        m = re.match(r"\s*/\*([0-9a-f]+)\*/\s+(@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)(.*)", line)
        if m:
            addr = int(m.group(1), 16)
            for name in pending:
                labels[name] = addr
            pending = []
            ops.append((addr, m.group(3), m.group(4)))
    spans = []
    for addr, op, rest in ops:
        t = re.search(r"\(([.\w]+)\)", rest) if op.startswith("BRA") else None
        if t and labels.get(t.group(1), addr + 1) < addr:
            spans.append((labels[t.group(1)], addr))
    outer = [sp for sp in spans if not any(o != sp and o[0] <= sp[0] and sp[1] <= o[1] for o in spans)]
    return [sum(1 for a, _, _ in ops if lo <= a <= hi) for lo, hi in sorted(outer)]


# Quantisation launches of the FP8 paths: name -> (head dim, [(block, rotate, transpose, permute)]).
QUANT_LAUNCHES = {
    "cuda d64": (64, [(128, True, False, False), (128, True, False, False), (128, False, True, True)]),
    "cuda d128": (128, [(128, True, False, False), (192, True, False, False), (192, False, True, True)]),
    "cuda d128 causal": (128, [(128, True, False, False), (160, True, False, False), (160, False, True, True)]),
    "cuda d256": (256, [(128, True, False, False), (128, True, False, False), (128, False, True, True)]),
    "cuda d256 bn96": (256, [(128, True, False, False), (96, True, False, False), (96, False, True, True)]),
    "triton d64": (64, [(128, True, False, False), (64, True, False, False), (64, False, True, False)]),
    "triton d128": (128, [(128, True, False, False), (64, True, False, False), (64, False, True, False)]),
    "triton d256": (256, [(64, True, False, False), (64, True, False, False), (64, False, True, False)]),
}


def main():
    from .attention import TILES
    rows = []
    for d, (bm, bn, _, _) in TILES.items():
        for causal in (False, True):
            rows.append(check_attention(d, causal))
        rows.append(check_quant(d, bm, True, False))
        rows.append(check_quant(d, bn, True, False))
        rows.append(check_quant(d, bn, False, True))
    for r in rows:
        fp8 = any("e4m3" in w for w in r["wgmma"])
        print(f"{r['kernel']:60s} regs={r['registers']} spill={r['spill_bytes']}B "
              f"wgmma={sorted(r['wgmma'])} fp8_wgmma={fp8}")
    for name, (d, slots) in QUANT_LAUNCHES.items():
        r = check_quant_qkv(d, slots)
        print(f"{name:17s} {r['kernel']:60s} regs={r['registers']} spill={r['spill_bytes']}B smem={r['smem']} "
              f"byte_stores={r['st_global_b8']}")


if __name__ == "__main__":
    main()
