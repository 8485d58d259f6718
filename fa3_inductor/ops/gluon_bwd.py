"""Host side of the Gluon attention backward (kernels/triton/gluon_bwd.py.tmpl), the Triton
implementation's backward on sm_90 where triton_impl.gluon_bwd_supports() accepts the call.

The kernel (FA3-style, warp specialised: a TMA producer warp, two consumer warpgroups with the
dK/dV accumulators in registers, async wgmma, at d64 / d128 a 2-warp dQ writer doing the fp32
dQ atomics from a shared tile; one CTA per (key block, kv head), one shared fp32 dQ buffer) is
described in its template, with the barrier protocol and the deterministic mode (d64 / d128:
the writers add the tiles of each (b, query head, query block) in key-block order, passing a
per-tile turn counter; FA3's ordered accumulation).  Here: tiles, shared layouts, the 4-D TMA
descriptors over the tensors' own strides, the three launches (preprocess, main kernel, dQ
finish), and an AOT compile for sm_90a that needs no GPU (tests).  ptxas_report / ptx_evidence
/ tma_strides are the forward's (ops/gluon_fwd.py).
"""
from __future__ import annotations

import functools

import torch

from .gluon_fwd import DTYPES, _desc, _gl_dtype, ptx_evidence, ptxas_report, tma_strides

# ptx_evidence / ptxas_report: the forward's compile evidence, used on aot_compile's output.
__all__ = ["CONFIGS", "BWD_HEAD_DIMS", "DETERMINISTIC_HEAD_DIMS", "DTYPES", "query_blocks",
           "layouts", "prepare", "backward", "aot_compile", "ptx_evidence", "ptxas_report",
           "tma_strides"]

LOG2E = 1.4426950408889634

# Per head dim: (BLOCK_M query rows per step, BLOCK_N keys per key block, NUM_STAGES, WN);
# WN = 1: "rs" mode (warps [8, 1], P^T / dS^T from registers), WN = 2: "smem" mode (warps
# [4, 2], P^T / dS^T through shared memory).  Shared memory (16-bit types):
#   d64 : K 16K + V 16K + Q 2x8K  + dO 2x8K  + dS 16K + dQ tile 16K  =  96 KB
#   d128: K 32K + V 32K + Q 2x16K + dO 2x16K + dS 16K + dQ tile 32K  = 176 KB
#   d256: K 32K + V 32K + Q 2x32K + dO 2x32K + dS 8K + P 8K          = 208 KB
# (+ 4 x 256 B of LSE / D vectors and the barriers; metadata.shared: 97.5 / 177.5 / 209.4 KB
# of 227).
# The dQ tile (fp32 [BLOCK_M, D]) is the input of the dQ writer partition at d64 / d128 (rs
# mode, WN = 1); d256 has no room for its 64 KB and keeps the consumers' dQ atomics.
CONFIGS = {64: (64, 128, 2, 1), 128: (64, 128, 2, 1), 256: (64, 64, 2, 2)}
# Head dims the Gluon backward takes (q, k, v alike); all three AOT-compile for sm_90a with no
# spills (tests/test_gluon_bwd.py).
BWD_HEAD_DIMS = tuple(CONFIGS)
# Default (consumer) partition warps; the CTA has 12: the workers (the 1-warp producer, and at
# d64 / d128 the 2-warp dQ writer) are padded to one warpgroup (reqntid 384 either way):
# 168 * 384 threads fills the 64K register file (so one CTA per SM), setmaxnreg (per
# warpgroup, so the producer and the writer share one value) then gives the consumers 240 and
# the workers 24 ((168 * 12 - 24 * 4) / 8 = 240).
NUM_WARPS = 8
MAXNREG = 168
# Rows per program of the preprocess and of the dQ finish kernel (divides BLOCK_M).
PRE_BLOCK = 32
FIN_BLOCK = 32

# Head dims with a deterministic mode: the ordered ("turns") dQ adds are done by the dQ writer
# partition, which d256 lacks (no shared memory for its tile); backward(..., deterministic=True)
# at d256 raises (triton_impl routes those calls to the tl backward).
DETERMINISTIC_HEAD_DIMS = (64, 128)


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _check_deterministic(D: int, deterministic: bool) -> None:
    if deterministic and D not in DETERMINISTIC_HEAD_DIMS:
        raise ValueError(f"the Gluon backward has no deterministic mode at head dim {D} (only "
                         f"{DETERMINISTIC_HEAD_DIMS}: the ordered dQ adds live in the dQ writer partition, "
                         "which d256 has no shared memory for); use the tl backward")


def query_blocks(n0: int, num_m: int, causal_off: int, block_m: int, causal: bool) -> tuple:
    """(first query block that sees key n0, number of query blocks from there): the kernel's
    _query_blocks."""
    m_start = min(max(n0 - causal_off, 0) // block_m, num_m) if causal else 0
    return m_start, num_m - m_start


def kernel_module():
    from ..codegen import triton_render
    return triton_render.load("gluon_bwd")


@functools.lru_cache(maxsize=None)
def layouts(D: int, dtype_name: str):
    """(Q/dO layout, K/V layout, LSE/D vector layout): NVMMA shared layouts of the 4-D boxes
    [1, 1, rows, D] (the kernel reshapes them to 2-D for wgmma) and of the [1, 1, BLOCK_M] fp32
    boxes of the padded [B, Hq, Sq_pad] LSE*log2e / D vectors (no swizzle: a swizzled box row
    must fit the 128-byte span); those boxes take the same [b, h, m0] coordinates as Q / dO."""
    from triton.experimental.gluon import language as gl
    BM, BN, _, _ = CONFIGS[D]
    gdt = _gl_dtype(dtype_name)
    return (gl.NVMMASharedLayout.get_default_for([1, 1, BM, D], gdt),
            gl.NVMMASharedLayout.get_default_for([1, 1, BN, D], gdt),
            gl.NVMMASharedLayout(swizzle_byte_width=0, element_bitwidth=32, rank=3))


def prepare(dout, q, k, v, out, lse, scale: float, causal: bool, bottom_right: bool,
            deterministic: bool = True, *, strides=None):
    """Buffers, descriptors and launches for one call (the caller has checked
    gluon_bwd_supports; deterministic=True needs D in DETERMINISTIC_HEAD_DIMS, else ValueError).
    strides: tma_strides of (q, k, v, dout) when the caller has them.  Returns
    (launch, dq, dk, dv): launch() zeroes the fp32 dQ buffer (and, deterministic, the turn
    counters behind it: one memset) and runs the preprocess, the main kernel (grid
    launch.grid = (key blocks, B * Hk)) and the dQ finish into dq [B, Hq, Sq, D], dk, dv
    [B, Hk, Sk, D] (contiguous, the inputs' dtype).  Built once, launched many times by
    benchmarks."""
    B, Hq, Sq, D = q.shape
    Hk, Sk = k.shape[1], k.shape[2]
    _check_deterministic(D, deterministic)
    BM, BN, NS, WN = CONFIGS[D]
    dev = q.device
    num_m = _cdiv(Sq, BM)
    sq_pad = num_m * BM
    n_kv = _cdiv(Sk, BN)
    buf = B * Hq * sq_pad * D
    # fp32 dQ buffer [B, Hq, Sq_pad, D], then (deterministic) the int32 turns [B, Hq, num_m]
    n_turns = B * Hq * num_m if deterministic else 0
    dq_acc = torch.empty(buf + n_turns, dtype=torch.float32, device=dev)
    turns = dq_acc[buf:].view(torch.int32) if deterministic else dq_acc   # unused when not deterministic
    delta = torch.empty(B * Hq * sq_pad, dtype=torch.float32, device=dev)
    lse2 = torch.empty(B * Hq * sq_pad, dtype=torch.float32, device=dev)
    dq = torch.empty(B, Hq, Sq, D, dtype=q.dtype, device=dev)
    dk = torch.empty(B, Hk, Sk, D, dtype=k.dtype, device=dev)
    dv = torch.empty(B, Hk, Sk, D, dtype=v.dtype, device=dev)
    lse_c = lse.contiguous()

    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor
    ql, kl, vl = layouts(D, DTYPES[q.dtype])
    if strides is None:
        strides = tuple(tma_strides(t) for t in (q, k, v, dout))
    sq, sk, sv, sd = strides
    descs = (_desc(q, BM, ql, sq), _desc(k, BN, kl, sk), _desc(v, BN, kl, sv), _desc(dout, BM, ql, sd),
             TensorDescriptor.from_tensor(lse2.view(B, Hq, sq_pad), [1, 1, BM], vl),
             TensorDescriptor.from_tensor(delta.view(B, Hq, sq_pad), [1, 1, BM], vl))
    off = (Sk - Sq) if (causal and bottom_right) else 0
    mod = kernel_module()
    kern, pre, fin = mod.attn_bwd_kernel, mod.attn_bwd_preprocess, mod.attn_bwd_dq_finish
    # one CTA per key block; axis 0 (the key block) varies fastest in the dispatch order, which
    # the deterministic turn chain relies on (template docstring)
    grid = (n_kv, B * Hk)
    scale = float(scale)
    helper_warps = 4 if D <= 128 else 8      # preprocess / finish: 32 rows x D fp32 per program

    def launch():
        dq_acc.zero_()
        pre[(sq_pad // PRE_BLOCK, B * Hq)](
            out, dout, lse_c, delta, lse2, Sq, sq_pad, out.stride(0), out.stride(1), out.stride(2),
            dout.stride(0), dout.stride(1), dout.stride(2), Hq, HEAD_DIM=D, BLOCK=PRE_BLOCK, num_warps=helper_warps)
        kern[grid](*descs, dq_acc, turns, dk, dv, scale, scale * LOG2E, Sq, Sk, B, Hq, Hk, off,
                   D, BM, BN, NS, bool(causal), WN, bool(deterministic),
                   num_warps=NUM_WARPS, maxnreg=MAXNREG)
        fin[(_cdiv(Sq, FIN_BLOCK), B * Hq)](dq_acc, dq, Sq, sq_pad, scale,
                                            HEAD_DIM=D, BLOCK=FIN_BLOCK, num_warps=helper_warps)

    launch.grid = grid
    return launch, dq, dk, dv


def backward(dout, q, k, v, out, lse, scale: float, spec, deterministic: bool, *, strides=None):
    """dq, dk, dv of the contract for a call gluon_bwd_supports() accepted.  deterministic=True
    (ordered dQ adds, bit-identical dq run to run) only at DETERMINISTIC_HEAD_DIMS: ValueError
    at d256."""
    launch, dq, dk, dv = prepare(dout, q, k, v, out, lse, scale, spec.causal, spec.align == "bottom_right",
                                 deterministic, strides=strides)
    launch()
    return dq, dk, dv


def aot_compile(D: int, causal: bool, dtype_name: str = "fp16", deterministic: bool = True):
    """Compile the main kernel of one instantiation for sm_90a without a GPU: the Gluon AST
    source built by hand (a Gluon tensor descriptor's signature string carries its
    NVMMASharedLayout) and triton.compile with an explicit GPUTarget.  The signature is the one
    the JIT launches (pointers 16-byte aligned, no integer specialisation).  ValueError for a
    deterministic instantiation outside DETERMINISTIC_HEAD_DIMS."""
    _check_deterministic(D, deterministic)
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.experimental.gluon._runtime import GluonASTSource
    BM, BN, NS, WN = CONFIGS[D]
    ql, kl, vl = layouts(D, dtype_name)
    fn = kernel_module().attn_bwd_kernel
    qd = f"tensordesc<{dtype_name}[1, 1, {BM}, {D}],{ql!r}>"
    kd = f"tensordesc<{dtype_name}[1, 1, {BN}, {D}],{kl!r}>"
    vd = f"tensordesc<fp32[1, 1, {BM}],{vl!r}>"
    sig = {"q_desc": qd, "k_desc": kd, "v_desc": kd, "do_desc": qd, "lse_desc": vd, "dlt_desc": vd,
           "dq_ptr": "*fp32", "turn_ptr": "*i32", "dk_ptr": f"*{dtype_name}", "dv_ptr": f"*{dtype_name}",
           "sm_scale": "fp32", "qk_scale": "fp32", "seq_q": "i32", "seq_k": "i32", "batch": "i32",
           "num_heads": "i32", "kv_heads": "i32", "causal_off": "i32"}
    consts = dict(HEAD_DIM=D, BLOCK_M=BM, BLOCK_N=BN, NUM_STAGES=NS, CAUSAL=bool(causal), WN=WN,
                  DETERMINISTIC=bool(deterministic), num_warps=NUM_WARPS)
    for name in consts:
        sig[name] = "constexpr"
    constexprs = {(fn.arg_names.index(n),): val for n, val in consts.items()}
    attrs = {(fn.arg_names.index(n),): [["tt.divisibility", 16]] for n in ("dq_ptr", "turn_ptr", "dk_ptr", "dv_ptr")}
    src = GluonASTSource(fn, sig, constexprs=constexprs, attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", 90, 32),
                          options={"num_warps": NUM_WARPS, "maxnreg": MAXNREG})
