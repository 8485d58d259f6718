"""Host side of the Gluon attention backward (kernels/triton/gluon_bwd.py.tmpl), the Triton
implementation's backward on sm_90 where triton_impl.gluon_bwd_supports() accepts the call.

The kernel (FA3-style, warp specialised: a TMA producer warp, two consumer warpgroups with the
dK/dV accumulators in registers, async wgmma, dQ writer partitions doing the fp32 dQ atomics
from shared tiles (d64 / d128: two 1-warp writers on alternate steps' tiles; d256: one 2-warp
writer on a half tile, handed over twice per step); one CTA per (key block, kv head), one
shared fp32 dQ buffer) is described in its template, with the barrier protocol and the
deterministic mode (every head dim: the writers add the tiles of each (b, query head, query
block) in key-block order within 2-3 chains of key blocks, passing a per-tile turn counter;
FA3's ordered accumulation).  Here: tiles, shared layouts, the 4-D TMA descriptors over the
tensors' own strides, the three launches (preprocess, main kernel, dQ finish; BwdPlan, one per
call signature, remembered by backward(), launching directly after the first call:
ops/fast_launch.py), and an AOT compile for sm_90a that needs no GPU (tests).  ptxas_report /
ptx_evidence / tma_strides are the forward's (ops/gluon_fwd.py).
"""
from __future__ import annotations

import functools

import torch

from .gluon_fwd import DTYPES, _gl_dtype, ptx_evidence, ptxas_report, tma_strides
from .signature_cache import SignatureCache

# ptx_evidence / ptxas_report: the forward's compile evidence, used on aot_compile's output.
__all__ = ["CONFIGS", "DO_STAGES", "BWD_HEAD_DIMS", "DETERMINISTIC_HEAD_DIMS", "DTYPES", "query_blocks",
           "layouts", "prepare", "backward", "aot_compile", "ptx_evidence", "ptxas_report",
           "tma_strides"]

LOG2E = 1.4426950408889634

# Per head dim: (BLOCK_M query rows per step, BLOCK_N keys per key block, NUM_STAGES, WN);
# WN = 1: "rs" mode (warps [8, 1], P^T / dS^T from registers), WN = 2: "smem" mode (warps
# [4, 2], P^T / dS^T through shared memory).  Shared memory (16-bit types):
#   d64 : K 16K + V 16K + Q 2x8K  + dO 2x8K  + dS 16K + dQ tiles 2x16K = 112 KB
#   d128: K 32K + V 32K + Q 2x16K + dO 2x16K + dS 16K + dQ tiles 2x32K = 208 KB
#   d256: K 32K + V 32K + Q 2x32K + dO 1x32K + dS 8K + P 8K + dQ half tile 32K = 208 KB
# (+ the LSE / D vectors (256 B a stage), the barriers and at d256 deterministic 8 B of writer
# constants; metadata.shared: 113.5 / 209.5 / 209.2-209.4 KB of 227).
# The dQ tiles (fp32) are the input of the dQ writer partitions: two [BLOCK_M, D] at d64 / d128
# (rs mode, WN = 1), one per writer; at d256 the whole 64 KB has no room (with two dO stages: 208 KB without it),
# so dO gets one stage (DO_STAGES) and the writer one column half [64, 128] of 32 KB, which
# the consumers fill twice per step (dQ = dS K as two GEMMs over the halves of K's columns).
CONFIGS = {64: (64, 128, 2, 1), 128: (64, 128, 2, 1), 256: (64, 64, 2, 2)}
# Stages of the dO ring (NUM_STAGES above is the Q ring's): one at d256, as FA3 runs its d256
# backward, which frees the 32 KB of the dQ writer's half tile (the producer refills dO while
# the step's dQ / dK GEMMs run: the consumers release it after the dV wait).
DO_STAGES = {64: 2, 128: 2, 256: 1}
# Head dims the Gluon backward takes (q, k, v alike); all three AOT-compile for sm_90a with no
# spills but 8 bytes at d128 causal deterministic (tests/test_gluon_bwd.py).
BWD_HEAD_DIMS = tuple(CONFIGS)
# Default (consumer) partition warps; the CTA has 12: the workers (the 1-warp producer and the
# dQ writers: 2 x 1 warp, or 2 warps at d256) are padded to one warpgroup (reqntid 384):
# 168 * 384 threads fills the 64K register file (so one CTA per SM), setmaxnreg (per
# warpgroup, so the producer and the writer share one value) then gives the consumers 240 and
# the workers 24 ((168 * 12 - 24 * 4) / 8 = 240).
NUM_WARPS = 8
MAXNREG = 168
# Rows per program of the preprocess and of the dQ finish kernel (divides BLOCK_M).
PRE_BLOCK = 32
FIN_BLOCK = 32

# Head dims with a deterministic mode: the ordered ("turns") dQ adds are done by the dQ writer
# partition, which every head dim has (d256 since its dO ring went to one stage, freeing the
# shared memory for a half tile).  Outside this set backward(..., deterministic=True) raises.
DETERMINISTIC_HEAD_DIMS = (64, 128, 256)
# Head dims whose deterministic dQ writers STORE a chain's tile at rank 0 (its first
# contributor) instead of adding it, so the fp32 buffers need no zeroing (only the turns): the
# whole-tile writers of rs mode (WN = 1; the template's TILES == 1 branch).  The d256 writer
# (two half tiles a step, at its register limit) adds, into a zeroed buffer.  Derived from
# CONFIGS so the host's memset and the template's stores cannot disagree.
FIRST_RANK_STORES = tuple(D for D, cfg in CONFIGS.items() if cfg[3] == 1)
# Chains of the deterministic dQ: key block n adds into fp32 buffer n % chains, ranked n //
# chains there, and the finish kernel sums the buffers in order (bit-identical still).  With one
# chain CTA n waits for CTA n - 1 on every tile, so the CTAs of a kv head form a pipeline that
# fills once (~n_kv hand-offs of idling per head); c chains are c pipelines of n_kv / c ranks,
# for c - 1 more buffers for the finish to read (and, at d256, to zero).  Measured on the H100
# (docs/perf-notes.md "Session 11", device run 3): 2 chains over 1 -1..+28%, 3 over 2 up to +7%
# from 4k keys and -4..+1% at 1k.
CHAINS_SHORT, CHAINS_LONG = 2, 3
CHAINS_LONG_KEY_BLOCKS = 32                  # 4k keys at d64 / d128, 2k at d256
CHAINS_MAX = 8


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _check_deterministic(D: int, deterministic: bool) -> None:
    if deterministic and D not in DETERMINISTIC_HEAD_DIMS:
        raise ValueError(f"the Gluon backward has no deterministic mode at head dim {D} (only "
                         f"{DETERMINISTIC_HEAD_DIMS}: the ordered dQ adds live in the dQ writer partition); "
                         "use the tl backward")


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


def deterministic_chains(n_kv: int) -> int:
    """Chains of the deterministic dQ for a call with n_kv key blocks (one key block: one)."""
    if n_kv < 2:
        return 1
    return CHAINS_LONG if n_kv >= CHAINS_LONG_KEY_BLOCKS else CHAINS_SHORT


def _check_chains(chains) -> int:
    if isinstance(chains, bool) or not isinstance(chains, int) or not 1 <= chains <= CHAINS_MAX:
        raise ValueError(f"chains must be an int in 1..{CHAINS_MAX} (deterministic dQ buffers), got {chains!r}")
    return chains


class BwdPlan:
    """One backward call signature's launches, worked out once: the chains, the grids, the
    descriptors' shapes / strides / layouts and the kernels' scalars.  buffers() allocates a
    call's outputs and scratch; run() zeroes what the mode needs and launches the preprocess,
    the main kernel and the dQ finish (each through fast_launch.Launch: the JIT on the first
    call, directly afterwards).  Arguments as prepare()."""

    def __init__(self, dout, q, k, v, out, lse, scale: float, causal: bool, bottom_right: bool,
                 deterministic: bool = True, *, strides=None, chains=None):
        from . import fast_launch
        B, Hq, Sq, D = q.shape
        Hk, Sk = k.shape[1], k.shape[2]
        _check_deterministic(D, deterministic)
        BM, BN, NS, WN = CONFIGS[D]
        num_m = _cdiv(Sq, BM)
        sq_pad = num_m * BM
        n_kv = _cdiv(Sk, BN)
        if not deterministic:
            if chains not in (None, 1):
                raise ValueError(f"chains={chains!r} needs deterministic=True (the atomic mode has one dQ buffer)")
            chains = 1
        else:
            chains = deterministic_chains(n_kv) if chains is None else _check_chains(chains)
        self.chains, self.deterministic = chains, bool(deterministic)
        # One fp32 scratch allocation per call: the delta and LSE*log2e vectors [B, Hq, Sq_pad]
        # each, then the dQ buffers [chains, B, Hq, Sq_pad, D], then (deterministic) the int32
        # turns [chains, B, Hq, num_m].  Every part starts at a multiple of 64 floats (TMA:
        # 16-byte aligned bases).
        self.n_vec = B * Hq * sq_pad
        self.buf = chains * B * Hq * sq_pad * D
        n_turns = chains * B * Hq * num_m if deterministic else 0
        self.scratch_len = 2 * self.n_vec + self.buf + n_turns
        self.shapes = (tuple(q.shape), tuple(k.shape))
        ql, kl, vl = layouts(D, DTYPES[q.dtype])
        if strides is None:
            strides = tuple(tma_strides(t) for t in (q, k, v, dout))
        vec = ([B, Hq, sq_pad], [Hq * sq_pad, sq_pad, 1], [1, 1, BM], vl)
        # (shape, strides, box, layout) of the q, k, v, dout, lse2 and delta descriptors
        self.descs = tuple((list(t.shape), list(st), [1, 1, rows, D], lay) for t, st, rows, lay in (
            (q, strides[0], BM, ql), (k, strides[1], BN, kl), (v, strides[2], BN, kl), (dout, strides[3], BM, ql)))
        self.descs += (vec, vec)
        off = (Sk - Sq) if (causal and bottom_right) else 0
        mod = kernel_module()
        helper_warps = 4 if D <= 128 else 8      # preprocess / finish: 32 rows x D fp32 per program
        # memset: deterministic at FIRST_RANK_STORES only the turns (the first rank of each
        # chain stores its tiles, the finish skips tiles whose turn never moved); otherwise the
        # buffers the adds go into (and the turns behind them)
        self.zero_from = 2 * self.n_vec + (self.buf if deterministic and D in FIRST_RANK_STORES else 0)
        self.pre_args = (Sq, sq_pad, out.stride(0), out.stride(1), out.stride(2),
                         dout.stride(0), dout.stride(1), dout.stride(2), Hq, D, PRE_BLOCK)
        self.pre = fast_launch.Launch(mod.attn_bwd_preprocess, (sq_pad // PRE_BLOCK, B * Hq), num_warps=helper_warps)
        # one CTA per key block; axis 0 (the key block) varies fastest in the dispatch order, which
        # the deterministic turn chain relies on (template docstring)
        self.grid = (n_kv, B * Hk)
        scale = float(scale)
        # (p_num_m, p_gn = num_m, group * num_m: for the d256 dQ writer, template)
        self.main_args = (scale, scale * LOG2E, Sq, Sk, B, Hq, Hk, off, chains, num_m, Hq // Hk * num_m,
                          D, BM, BN, NS, DO_STAGES[D], bool(causal), WN, bool(deterministic))
        self.main = fast_launch.Launch(mod.attn_bwd_kernel, self.grid, num_warps=NUM_WARPS, maxnreg=MAXNREG)
        self.fin_args = (Sq, sq_pad, scale, self.buf // chains, chains, B * Hq, D, FIN_BLOCK, BM, bool(deterministic))
        self.fin = fast_launch.Launch(mod.attn_bwd_dq_finish, (_cdiv(Sq, FIN_BLOCK), B * Hq), num_warps=helper_warps)

    def buffers(self, device, dtype):
        """(scratch, dq, dk, dv) for one call: fp32 scratch of scratch_len, the gradients
        contiguous in the inputs' dtype."""
        (B, Hq, Sq, D), (_, Hk, Sk, _) = self.shapes
        return (torch.empty(self.scratch_len, dtype=torch.float32, device=device),
                torch.empty(B, Hq, Sq, D, dtype=dtype, device=device),
                torch.empty(B, Hk, Sk, D, dtype=dtype, device=device),
                torch.empty(B, Hk, Sk, D, dtype=dtype, device=device))

    def run(self, dout, q, k, v, out, lse, scratch, dq, dk, dv):
        n_vec, buf = self.n_vec, self.buf
        delta, lse2 = scratch[:n_vec], scratch[n_vec:2 * n_vec]
        dq_acc = scratch[2 * n_vec:]
        turns = scratch[2 * n_vec + buf:].view(torch.int32) if self.deterministic else dq_acc
        scratch[self.zero_from:].zero_()
        lse_c = lse.contiguous()
        self.pre(out, dout, lse_c, delta, lse2, *self.pre_args)
        kern = self.main
        kern(*kern.descriptors((q, k, v, dout, lse2, delta), self.descs), dq_acc, turns, dk, dv, *self.main_args)
        self.fin(dq_acc, turns, dq, *self.fin_args)

    def __call__(self, dout, q, k, v, out, lse):
        scratch, dq, dk, dv = self.buffers(q.device, q.dtype)
        self.run(dout, q, k, v, out, lse, scratch, dq, dk, dv)
        return dq, dk, dv


def prepare(dout, q, k, v, out, lse, scale: float, causal: bool, bottom_right: bool,
            deterministic: bool = True, *, strides=None, chains=None):
    """Buffers, descriptors and launches for one call (the caller has checked
    gluon_bwd_supports; deterministic=True needs D in DETERMINISTIC_HEAD_DIMS, else ValueError).
    strides: tma_strides of (q, k, v, dout) when the caller has them.  chains (deterministic
    only; None: deterministic_chains): key block n adds its dQ tiles into buffer n % chains in
    the order n // chains, and the finish sums the buffers in a fixed order.  Returns
    (launch, dq, dk, dv): launch() zeroes the fp32 dQ buffer (deterministic: the turn
    counters behind the buffers, and the buffers too at d256; one memset) and runs the
    preprocess, the main kernel (grid launch.grid = (key blocks, B * Hk)) and the dQ finish
    into dq [B, Hq, Sq, D], dk, dv [B, Hk, Sk, D] (contiguous, the inputs' dtype).  Built
    once, launched many times by benchmarks."""
    plan = BwdPlan(dout, q, k, v, out, lse, scale, causal, bottom_right, deterministic, strides=strides,
                   chains=chains)
    scratch, dq, dk, dv = plan.buffers(q.device, q.dtype)

    def launch():
        plan.run(dout, q, k, v, out, lse, scratch, dq, dk, dv)

    launch.grid = plan.grid
    launch.chains = plan.chains
    launch.dq_acc = scratch[2 * plan.n_vec:]     # the fp32 buffers + turns (tests poison them)
    return launch, dq, dk, dv


# BwdPlans by call signature (backward()): the host work of a repeated call is a dict lookup.
_PLANS = SignatureCache(1024)


def backward(dout, q, k, v, out, lse, scale: float, spec, deterministic: bool, *, strides=None, chains=None):
    """dq, dk, dv of the contract for a call gluon_bwd_supports() accepted.  deterministic=True
    (ordered dQ adds, bit-identical dq run to run) at DETERMINISTIC_HEAD_DIMS (every head dim
    the kernel takes), else ValueError.  The plan is remembered per call signature (shapes,
    TMA strides, out's strides, dtype, device, the alignment of out and lse, scale, causal
    alignment, mode, chains)."""
    if strides is None:
        strides = tuple(tma_strides(t) for t in (q, k, v, dout))
    causal, br = spec.causal, spec.align == "bottom_right"
    key = (q.shape, k.shape, v.shape, strides, out.stride(), lse.stride(), out.data_ptr() % 16,
           lse.data_ptr() % 16, q.dtype, q.device, float(scale), causal, br, bool(deterministic), chains)
    plan = _PLANS.get_or_build(key, lambda: BwdPlan(dout, q, k, v, out, lse, scale, causal, br, deterministic,
                                                    strides=strides, chains=chains))
    return plan(dout, q, k, v, out, lse)


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
           "num_heads": "i32", "kv_heads": "i32", "causal_off": "i32", "chains": "i32",
           "p_num_m": "i32", "p_gn": "i32"}
    consts = dict(HEAD_DIM=D, BLOCK_M=BM, BLOCK_N=BN, NUM_STAGES=NS, DO_STAGES=DO_STAGES[D], CAUSAL=bool(causal),
                  WN=WN, DETERMINISTIC=bool(deterministic), num_warps=NUM_WARPS)
    for name in consts:
        sig[name] = "constexpr"
    constexprs = {(fn.arg_names.index(n),): val for n, val in consts.items()}
    attrs = {(fn.arg_names.index(n),): [["tt.divisibility", 16]] for n in ("dq_ptr", "turn_ptr", "dk_ptr", "dv_ptr")}
    src = GluonASTSource(fn, sig, constexprs=constexprs, attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", 90, 32),
                          options={"num_warps": NUM_WARPS, "maxnreg": MAXNREG})
