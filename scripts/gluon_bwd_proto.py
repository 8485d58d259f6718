"""FA3-style attention BACKWARD for Hopper (sm_90a) written in Gluon (Triton 3.6), a prototype.

Standalone: nothing here is imported by fa3_inductor.  Companion of scripts/gluon_fwd_proto.py
(same AOT-compile technique: GluonASTSource + triton.compile(GPUTarget("cuda", 90, 32)) and
ptxas -v, so it can be checked on a machine without a GPU).

Why Gluon: the tl-level Triton backward waits for every wgmma at once and has no warp
specialisation; it reaches ~0.72x cuDNN at d128.  Gluon gives async wgmma (issue, wait later
for <= N outstanding groups), TMA, mbarriers and gl.warp_specialize with setmaxnreg budgets.

Math (per (batch, head); S = scale * Q K^T, P = softmax(S), O = P V; LSE natural log):
  D   = rowsum(dO * O)                               (preprocess, one tl kernel)
  P   = exp2(S_raw * scale*log2e - LSE*log2e)        (LSE*log2e also made by the preprocess)
  dP  = dO V^T ;  dS = P * (dP - D)
  dV += P^T dO ;  dK += dS^T Q  (* scale at the end) ;  dQ += dS K (* scale in the cast kernel)

Structure: one CTA = one key block (BLOCK_N keys) of one (batch, head); it loops over query
blocks of BLOCK_M rows.  Everything is computed TRANSPOSED (S^T = K Q^T, dP^T = V dO^T, shape
[BLOCK_N, BLOCK_M]) so that P^T and dS^T come out of the wgmma in accumulator layout with the
key index as the row, i.e. exactly the register-A operand layout of dV += P^T dO and
dK += dS^T Q (a register-only shuffle for 16-bit types, as P in the forward).  Partitions:
  * worker, 1 warp, 24 registers (setmaxnreg): the producer.  Loads K and V once (one-shot
    kv_bar) and then streams Q_i and dO_i by TMA into rings of NUM_STAGES buffers (separate
    Q and dO rings with their own ready/empty barriers, so S^T_i can start before dO_i lands).
  * default partition, 8 warps = 2 consumer warpgroups, 240 registers each:
      - "rs" mode (d64, d128; BLOCK_N = 128, BLOCK_M = 64): wgmma layout warps [8, 1]: warp
        group g owns keys [64g, 64g+64) of the block: its S^T / dP^T rows, its rows of the
        dK, dV accumulators (fp32 in registers, 64 + 64 regs/thread at d128).  P^T and dS^T
        stay in registers as the A operand of the dV / dK GEMMs.
      - "smem" mode (d256; BLOCK_N = 64, BLOCK_M = 64): dK, dV [64, 256] fp32 do not fit one
        warpgroup (256 regs), so the layouts are warps [4, 2]: both warpgroups own all 64 keys
        and split the N dim (the query columns of S^T/dP^T, the head dim of dK/dV/dQ).  The A
        operand of dV/dK then needs all query columns in each warpgroup, so P^T and dS^T go
        through shared memory (as FA3 does at d256).
    dQ_i = dS K is a 64 x D GEMM with warps [4, 2] (each warpgroup half of the head dim), A =
    dS^T from shared memory read transposed, B = K; its fp32 result is added to a zeroed
    global fp32 buffer with gl.atomic_add (relaxed, masked to rows < S; ptxas emits
    REDG.ADD.F32x2, 8 rows x 32 B per warp instruction); a small tl kernel scales and casts it
    at the end.  --dq-vec4 (not d256: smem) first re-lays dQ out through shared memory so a
    warp covers whole 512-byte rows with REDG.ADD.F32x4 -- fewer, fully coalesced reductions
    for one extra shared-memory round trip; which is faster is a GPU question.
  * One step of the consumer loop (commit groups retire in order):
        issue S^T_i = K Q_i^T            [group a]
        issue dP^T_i = V dO_i^T          [group b]
        wait(1)  -> S^T_i ready; P^T = exp2(...)  (dP^T GEMM still running under the exps)
        issue dV += P^T dO_i             [group c]          (rs: P^T from registers)
        wait(1)  -> dP^T ready; dS^T = P^T (dP^T - D)  (dV GEMM running under it)
        store dS^T to shared memory, fence
        issue dQ_i = dS K                [group d]
        issue dK += dS^T Q_i             [group e]
        wait(1)  -> dV, dQ ready; release dO slot; atomics of dQ_i run under the dK GEMM
        wait(0)  -> dK ready; release Q slot
    so the exps overlap dP^T, dS overlaps dV and the dQ atomics overlap dK.  Not overlapped
    (unlike FA3's full schedule): the next step's S^T / dP^T do not start before this step's
    dK is done, and there is no separate dQ-writer warp (Gluon 3.6 on Hopper has no TMA
    reduce-add, see LIMITATIONS).
  * LSE*log2e and D are read by the consumers with plain (masked) global loads issued at the
    top of the step: 64 fp32 each, their latency hides under the S^T / dP^T GEMMs, and it
    avoids a 1-D TMA descriptor (64 fp32 = 256 B, with a non-swizzled layout) for a tiny
    gain.  Rows >= S read LSE = +inf and D = 0, so P = exp2(s - inf) = 0 and dS = 0 there:
    no explicit query-row mask is needed in the GEMM path (only the dQ atomics are masked).
  * causal: key block n0 starts at query block n0 // BLOCK_M (the first one that sees it);
    the (causal | key-tail) mask is applied only to query blocks with m0 < n0 + BLOCK_N (the
    diagonal ones) or, in the last key block when S % BLOCK_N != 0, to every step (keys >= S
    read the next head's K/V rows through the 2-D view and must give P = dS = 0 so that they
    do not pollute dQ; their dK/dV rows are never stored).  Heaviest key blocks (n0 = 0)
    are launched first.
  * tails: Q/dO/K/V descriptors are 2-D views [B*H*S, D]; rows past the head come from the
    next head (finite) or are zero-filled by TMA at the tensor end; see masks above.
    dK / dV are stored from registers with a row mask (once per CTA).

mbarrier protocol (phases are parities; a fresh barrier counts as if its parity-1 phase had
completed, so wait(parity=1) on it returns at once):
  * kv_bar (count 1): one-shot; the producer's expect(K bytes + V bytes) is the arrival, the two
    TMAs complete the transaction.  Consumers wait parity 0 once.
  * q_ready[s] / do_ready[s] (count 1): the producer's expect(bytes of one block) is the single
    arrival, the TMA completes the bytes (TMA always delivers the full box, zero-filled out of
    bounds, so the byte count is exact for a partial last block).  Consumers wait parity
    (i // NUM_STAGES) & 1 for step i.
  * q_empty[s] / do_empty[s] (count 1: one consumer partition): the consumer partition arrives
    once per use, after the wgmma groups that read the slot have been waited for (dO: after
    dP^T and dV; Q: after S^T and dK).  Gluon lowers an arrive in a multi-warp partition to a
    partition-wide bar.sync and one elected thread's arrive, so the arrival means both
    warpgroups are done with the slot.  The producer waits parity ((i // NUM_STAGES) & 1) ^ 1
    before refilling for step i (the first NUM_STAGES fills pass on fresh barriers).
  * Deadlock freedom: the producer issues Q_0 dO_0 Q_1 dO_1 ...; consumer step i needs Q_i and
    dO_i; to issue them the producer needs slots released in step i - NUM_STAGES, which the
    consumer completes without waiting for anything but its own wgmmas.
  * The shared dS^T buffer (rs and smem mode) and P^T buffer (smem mode) are written by both
    warpgroups and read by wgmmas of both: the compiler's membar pass puts a CTA-partition
    bar.sync between the stores (+ fence.proxy.async) and the wgmma that reads them, and the
    next step's overwrite comes after every warp has waited on those wgmmas and passed the
    q_empty arrive's bar.sync.

Speed variants (--variants a,b,c; see VARIANTS; the default kernel above is "base" and is
unchanged -- same PTX -- when no variant is named):
  * pipe (PIPE=1 at d128, 2 at d256): the dK_i wgmma stays in flight across the loop back edge;
    step i+1 issues S^T_{i+1} right behind it (no tensor-core drain + refill between steps),
    then retires dK_i (Q_i free) and issues dP^T_{i+1}.  dQ_i's atomics stay under dK_i, as in
    base.  d256 peels step 0 (PIPE=2).  The more aggressive forms (S^T_{i+1} or dP^T_{i+1}
    issued before step i's dQ atomics, or the atomics moved into step i+1) either do not fit
    240 registers at d128 or are serialized by ptxas (C7512/C7514/C7515/C7517/C7518, details in
    _consumer_v).
  * pipe_ns3: pipe with 3-deep Q/dO rings (d64/d128: 178 KB), more slack for the Q_{i+1} load.
  * dqw / dqw1 (d64/d128): dQ writer partition (DQW): consumers store dQ_i (fp32) to a shared
    buffer (swizzled, conflict-free) and go on; a worker (2 warps / 1 warp, 24 registers, in the
    producer's padding warpgroup) does v4 atomics over whole rows; dq_full / dq_empty mbarriers.
    d256: no shared memory left for the 64 KB buffer.
  * vec4 (d64/d128): base with --dq-vec4.
  * wide (d256, opt-in: 36-44 B of spills): BLOCK_M 128 / BLOCK_N 64 / 1 stage, S^T and dP^T
    as m64n64 per warpgroup (half the shared-memory operand traffic of base's m64n32), dQ in two
    head-dim halves; 226 KB of shared memory.
  * pipe_dqw (opt-in): serialized by ptxas, kept to show it.
  All pipe / dqw / wide variants use a dQ accumulator padded to whole BLOCK_M blocks per head, so
  their atomics carry no row mask (ptxas turns a masked atomic into a branch around each REDG,
  and a branch with a wgmma in flight can serialize every wgmma).

Usage:
  python scripts/gluon_bwd_proto.py --compile-only   # no GPU: AOT compile for sm_90a + ptxas -v
  python scripts/gluon_bwd_proto.py                  # GPU: check + time vs cuDNN (< 200 s)
  python scripts/gluon_bwd_proto.py --compile-only --variants all    # ptxas figures per variant
  python scripts/gluon_bwd_proto.py --variants all --quick --budget 240
      # GPU: one child per (D, causal) checks every variant and times them interleaved on the
      # same inputs (median of 3 rounds), then prints variant x (D, causal, S) TFLOP/s + ratio
"""
from __future__ import annotations

import argparse
import math
import os
import re
import sys
import time

import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon._runtime import GluonASTSource
from triton.experimental.gluon.language.nvidia.hopper import (
    fence_async_shared,
    mbarrier,
    tma,
    warpgroup_mma,
    warpgroup_mma_wait,
)
from triton.experimental.gluon.language.nvidia.hopper import warpgroup_mma_init  # noqa: E402
from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

import proto_child  # scripts/: the child-process runner both prototypes share

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from fa3_inductor.bench import kernels as kernel_grid  # noqa: E402  (the benchmarks' FLOP count)
from fa3_inductor.ops import gluon_fwd  # noqa: E402  (ptxas_report: the compile evidence)

LOG2E = 1.4426950408889634

# Per head dim: (BLOCK_M query rows per step, BLOCK_N keys per CTA, NUM_STAGES, WN)
#   WN = 1: "rs" mode (warps [8, 1]), WN = 2: "smem" mode (warps [4, 2]).
# Shared memory (fp16):
#   d64 : K 16K + V 16K + Q 2x8K  + dO 2x8K  + dS 16K             =  80 KB
#   d128: K 32K + V 32K + Q 2x16K + dO 2x16K + dS 16K             = 144 KB
#   d256: K 32K + V 32K + Q 2x32K + dO 2x32K + dS 8K + P 8K       = 208 KB
# Registers/thread (consumer, fp32 accumulators): d128 dK 64 + dV 64 + S^T 32 + dP^T 32 (+16
# P^T operand); d256 dK 64 + dV 64 + dQ 64 + S^T 16 + dP^T 16.
CONFIGS = {64: (64, 128, 2, 1), 128: (64, 128, 2, 1), 256: (64, 64, 2, 2)}
NUM_WARPS = 8           # consumer (default) partition: 2 warpgroups
PRODUCER_WARPS = gl.constexpr(1)
PRODUCER_REGS = gl.constexpr(24)
# 12 warps (the 1-warp producer is padded to a warpgroup): maxnreg 168 * 12 warps fits the 64K
# register file; the default partition gets (168*12 - 24*4) / 8 = 240 after setmaxnreg.
MAXNREG = 168

LIMITATIONS = """\
- No TMA reduce-add (cp.reduce.async.bulk) in Gluon 3.6's Hopper TMA module (only
  async_copy_global_to_shared / async_copy_shared_to_global / store_wait): dQ is accumulated
  with register gl.atomic_add (relaxed) from the consumer warps instead of FA3's dedicated
  dQ-writer warp doing TMA reduce-adds from shared memory.
- Worker partitions take no tensor arguments and the default partition keeps maxnreg * warps
  minus the workers': the consumers are the 8-warp default partition (240 regs), the producer
  a 1-warp worker (24 regs).  Two consumer partitions (pingpong-style) would need a turn
  protocol and split the dK/dV accumulators differently; not tried.
- No named barriers: the dS^T (and P^T) shared buffers written by both consumer warpgroups
  rely on the compiler-inserted partition-wide bar.sync before the wgmma that reads them.
- Not done: persistent scheduler, deterministic dQ, TMA store of dK/dV, GQA, Sq != Sk, fp8,
  two consumer partitions.  Cross-step overlap only in the form ptxas keeps pipelined (the
  "pipe" variant).  bf16 is supported by the kernel but only fp16 is checked."""


# Speed variants (--variants a,b,c; "base" = the default kernel above).  Each entry: options
#   pipe  : cross-step pipelining (_consumer_v, PIPE; True = 1 at WN 1, 2 = step 0 peeled at
#           WN 2): dK_i stays in flight over the loop back edge, S^T_{i+1} queues behind it.
#   dqw   : dQ writer worker partition (_dq_writer, DQW): consumers store dQ_i to a shared fp32
#           buffer and go on; a worker (dqw_warps warps) does the v4 atomics over whole rows.
#   wide  : d256 BLOCK_M 128 / BLOCK_N 64 / 1 stage, _consumer_wide (cfg: the tile override).
#   vec4  : dQ re-laid out through shared memory for v4 atomics from the consumers (DQ_VEC4).
#   ns    : NUM_STAGES override (Q and dO rings);  dims: head dims the variant applies to.
#   pad   : (pipe/dqw, default on) fp32 dQ accumulator padded to whole BLOCK_M blocks per head, so
#           the atomics carry no row mask (DQ_PAD; see _dq_out).
#   dqw_warps / dqw_regs / dqw_rows: the writer's warps, setmaxnreg and rows per atomic chunk.
VARIANTS = {
    "base": dict(),
    "vec4": dict(vec4=True, dims=(64, 128)),
    "pipe": dict(pipe=True),
    "pipe_ns3": dict(pipe=True, ns=3, dims=(64, 128)),
    "dqw": dict(dqw=True, dqw_warps=2, dims=(64, 128)),
    "dqw1": dict(dqw=True, dqw_warps=1, dims=(64, 128)),
    # not in the default list: wide spills 36-44 B (scalars reloaded in the loop; dK, dV and a
    # dQ half are 192 accumulator registers), pipe_dqw is serialized by ptxas (C7515)
    "wide": dict(wide=True, cfg={256: (128, 64, 1, 2)}, dims=(256,)),
    "pipe_dqw": dict(pipe=True, dqw=True, dqw_warps=2, dims=(64, 128)),
}
DEFAULT_VARIANTS = "base,pipe,pipe_ns3,dqw,vec4"


def variant_config(D, name):
    """(BLOCK_M, BLOCK_N, NUM_STAGES, WN, extra constexprs) of a variant at head dim D; raises
    KeyError for an unknown name and ValueError where the variant does not apply to D."""
    v = VARIANTS[name]
    if D not in v.get("dims", (64, 128, 256)):
        raise ValueError(f"variant {name} does not apply to d{D}")
    BM, BN, NS, WN = v.get("cfg", {}).get(D, CONFIGS[D])
    NS = v.get("ns", NS)
    extra = dict(DQ_VEC4=bool(v.get("vec4", False)))
    if v.get("pipe") or v.get("dqw"):
        pipe = v.get("pipe", 0)
        if pipe is True:             # the shape ptxas keeps pipelined (see _consumer_v)
            pipe = 2 if CONFIGS[D][3] == 2 else 1
        extra.update(PIPE=int(pipe), DQW=bool(v.get("dqw", False)),
                     DQ_PAD=bool(v.get("pad", True)))
    if v.get("wide"):
        extra.update(WIDE=True, DQ_PAD=True)
    if v.get("dqw"):
        extra.update(DQW_WARPS=v.get("dqw_warps", 1), DQW_REGS=v.get("dqw_regs", 24),
                     DQW_ROWS=v.get("dqw_rows", 8))
    return BM, BN, NS, WN, extra


# --------------------------------------------------------------------------------------------
# Gluon kernel
# --------------------------------------------------------------------------------------------
@gluon.jit
def _producer(q_desc, do_desc, k_desc, v_desc, lse_desc, dlt_desc, q_bufs, do_bufs, k_smem, v_smem,
              lse_bufs, dlt_bufs, kv_bar, q_ready, q_empty, do_ready, do_empty,
              row0, vrow0, n0, m_start, n_steps,
              BLOCK_M: gl.constexpr, NUM_STAGES: gl.constexpr):
    # K, V of this CTA's key block: loaded once.
    mbarrier.expect(kv_bar, k_desc.block_type.nbytes + v_desc.block_type.nbytes)
    tma.async_copy_global_to_shared(k_desc, [row0 + n0, 0], kv_bar, k_smem)
    tma.async_copy_global_to_shared(v_desc, [row0 + n0, 0], kv_bar, v_smem)
    for i in range(n_steps):
        s = i % NUM_STAGES
        ph = ((i // NUM_STAGES) & 1) ^ 1      # "slot released by its previous use"
        row = row0 + (m_start + i) * BLOCK_M
        mbarrier.wait(q_empty.index(s), ph)
        # Q_i and LSE_i*log2e ride on one barrier, dO_i and D_i on another.
        mbarrier.expect(q_ready.index(s), q_desc.block_type.nbytes + lse_desc.block_type.nbytes)
        tma.async_copy_global_to_shared(q_desc, [row, 0], q_ready.index(s), q_bufs.index(s))
        tma.async_copy_global_to_shared(lse_desc, [vrow0 + m_start + i, 0], q_ready.index(s),
                                        lse_bufs.index(s))
        mbarrier.wait(do_empty.index(s), ph)
        mbarrier.expect(do_ready.index(s), do_desc.block_type.nbytes + dlt_desc.block_type.nbytes)
        tma.async_copy_global_to_shared(do_desc, [row, 0], do_ready.index(s), do_bufs.index(s))
        tma.async_copy_global_to_shared(dlt_desc, [vrow0 + m_start + i, 0], do_ready.index(s),
                                        dlt_bufs.index(s))


@gluon.jit
def _consumer(q_bufs, do_bufs, k_smem, v_smem, ds_smem, p_smem, lse_bufs, dlt_bufs, kv_bar,
              q_ready, q_empty, do_ready, do_empty,
              dq_ptr, dk_ptr, dv_ptr, sm_scale, qk_scale, seq_len,
              row0, n0, m_start, n_steps,
              HEAD_DIM: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr,
              NUM_STAGES: gl.constexpr, CAUSAL: gl.constexpr, WN: gl.constexpr,
              DQ_VEC4: gl.constexpr, NW: gl.constexpr):
    dtype: gl.constexpr = k_smem.dtype
    # S^T, dP^T: [BLOCK_N keys, BLOCK_M queries]; dK, dV: [BLOCK_N, HEAD_DIM]; dQ: [BLOCK_M, D]
    st_layout: gl.constexpr = gl.NVMMADistributedLayout(
        version=[3, 0], warps_per_cta=[NW // WN, WN], instr_shape=[16, BLOCK_M // WN, 16])
    kv_layout: gl.constexpr = gl.NVMMADistributedLayout(
        version=[3, 0], warps_per_cta=[NW // WN, WN], instr_shape=[16, HEAD_DIM // WN, 16])
    dq_layout: gl.constexpr = gl.NVMMADistributedLayout(
        version=[3, 0], warps_per_cta=[4, NW // 4], instr_shape=[16, HEAD_DIM // (NW // 4), 16])
    a_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=kv_layout, k_width=2)
    col_st: gl.constexpr = gl.SliceLayout(0, st_layout)
    row_st: gl.constexpr = gl.SliceLayout(1, st_layout)

    st_zero = gl.zeros([BLOCK_N, BLOCK_M], gl.float32, st_layout)
    dq_zero = gl.zeros([BLOCK_M, HEAD_DIM], gl.float32, dq_layout)
    dk = gl.zeros([BLOCK_N, HEAD_DIM], gl.float32, kv_layout)
    dv = gl.zeros([BLOCK_N, HEAD_DIM], gl.float32, kv_layout)

    keys = n0 + gl.arange(0, BLOCK_N, layout=row_st)
    keys2 = gl.expand_dims(keys, 1)
    key_tail = n0 + BLOCK_N > seq_len
    dq_rows0 = gl.arange(0, BLOCK_M, layout=gl.SliceLayout(1, dq_layout))
    dq_cols = gl.arange(0, HEAD_DIM, layout=gl.SliceLayout(0, dq_layout))
    # [NUM_STAGES, 1, BLOCK_M] fp32 TMA boxes (no swizzle) seen as plain [NUM_STAGES, BLOCK_M]
    vec_layout: gl.constexpr = gl.SwizzledSharedLayout(1, 1, 1, [0])

    mbarrier.wait(kv_bar, 0)
    for i in range(n_steps):
        s = i % NUM_STAGES
        ph = (i // NUM_STAGES) & 1
        m0 = (m_start + i) * BLOCK_M
        q_buf = q_bufs.index(s)
        do_buf = do_bufs.index(s)

        mbarrier.wait(q_ready.index(s), ph)
        st_tok = warpgroup_mma(k_smem, q_buf.permute((1, 0)), st_zero, use_acc=False, is_async=True)
        mbarrier.wait(do_ready.index(s), ph)
        dpt_tok = warpgroup_mma(v_smem, do_buf.permute((1, 0)), st_zero, use_acc=False, is_async=True)

        # ---- P^T (dP^T GEMM still running) ----
        st, _, _ = warpgroup_mma_wait(1, deps=[st_tok, k_smem, q_buf])
        # LSE*log2e of the step's queries from shared memory, read at the point of use (16
        # values/thread in this layout: keeping them live across the waits costs spills).
        lse2 = lse_bufs.index(s)._reinterpret(gl.float32, [BLOCK_M], vec_layout).load(col_st)
        pt = gl.exp2(st * qk_scale - gl.expand_dims(lse2, 0))
        masked = key_tail
        if CAUSAL:
            masked = masked | (m0 < n0 + BLOCK_N)
        if masked:
            valid = keys2 < seq_len
            if CAUSAL:
                cols = m0 + gl.arange(0, BLOCK_M, layout=col_st)
                valid = valid & (gl.expand_dims(cols, 0) >= keys2)
            pt = gl.where(valid, pt, 0.0)
        pt16 = pt.to(dtype)
        if WN == 1:
            p_op = gl.convert_layout(pt16, a_layout)
            dv_tok = warpgroup_mma(p_op, do_buf, dv, is_async=True)
        else:
            p_smem.store(pt16)
            fence_async_shared()
            dv_tok = warpgroup_mma(p_smem, do_buf, dv, is_async=True)

        # ---- dS^T (dV GEMM running) ----
        dpt, _, _ = warpgroup_mma_wait(1, deps=[dpt_tok, v_smem, do_buf])
        dlt = dlt_bufs.index(s)._reinterpret(gl.float32, [BLOCK_M], vec_layout).load(col_st)
        # dS from the fp16-rounded P (same registers as the wgmma A operand) rather than the fp32
        # P: frees 32 registers/thread across the dP^T wait; dS is rounded to fp16 anyway.
        dst = pt16.to(gl.float32) * (dpt - gl.expand_dims(dlt, 0))
        ds16 = dst.to(dtype)
        ds_smem.store(ds16)
        fence_async_shared()
        dq_tok = warpgroup_mma(ds_smem.permute((1, 0)), k_smem, dq_zero, use_acc=False, is_async=True)
        if WN == 1:
            ds_op = gl.convert_layout(ds16, a_layout)
            dk_tok = warpgroup_mma(ds_op, q_buf, dk, is_async=True)
            dv, dq, p_op = warpgroup_mma_wait(1, deps=[dv_tok, dq_tok, p_op])
        else:
            dk_tok = warpgroup_mma(ds_smem, q_buf, dk, is_async=True)
            dv, dq = warpgroup_mma_wait(1, deps=[dv_tok, dq_tok])
        mbarrier.arrive(do_empty.index(s))

        # ---- dQ atomics (dK GEMM running) ----
        if DQ_VEC4:
            # Optional: re-layout through shared memory so that a warp covers whole 512-byte
            # rows with v4 atomics (the wgmma layout gives v2 atomics over 8 rows x 32 B).
            dq_bl: gl.constexpr = gl.BlockedLayout([1, 4], [1, 32], [NW, 1], [1, 0])
            dqb = gl.convert_layout(dq, dq_bl)
            b_rows = m0 + gl.arange(0, BLOCK_M, layout=gl.SliceLayout(1, dq_bl))
            b_cols = gl.arange(0, HEAD_DIM, layout=gl.SliceLayout(0, dq_bl))
            offs = gl.expand_dims((row0 + b_rows) * HEAD_DIM, 1) + gl.expand_dims(b_cols, 0)
            gl.atomic_add(dq_ptr + offs, dqb, mask=gl.expand_dims(b_rows < seq_len, 1), sem="relaxed")
        else:
            dq_rows = m0 + dq_rows0
            offs = gl.expand_dims((row0 + dq_rows) * HEAD_DIM, 1) + gl.expand_dims(dq_cols, 0)
            gl.atomic_add(dq_ptr + offs, dq, mask=gl.expand_dims(dq_rows < seq_len, 1), sem="relaxed")

        if WN == 1:
            dk, ds_op = warpgroup_mma_wait(0, deps=[dk_tok, ds_op])
        else:
            dk = warpgroup_mma_wait(0, deps=[dk_tok])
        mbarrier.arrive(q_empty.index(s))

    # ---- epilogue: dK * scale, dV; rows >= S not stored ----
    kv_rows = n0 + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(1, kv_layout))
    kv_cols = gl.arange(0, HEAD_DIM, layout=gl.SliceLayout(0, kv_layout))
    offs = gl.expand_dims((row0 + kv_rows) * HEAD_DIM, 1) + gl.expand_dims(kv_cols, 0)
    kv_mask = gl.expand_dims(kv_rows < seq_len, 1)
    gl.store(dk_ptr + offs, (dk * sm_scale).to(dtype), mask=kv_mask)
    gl.store(dv_ptr + offs, dv.to(dtype), mask=kv_mask)


# --------------------------------------------------------------------------------------------
# Speed variants (--variants): a second consumer with the same math, selected by constexprs.
# The default (no variant) kernel still runs _consumer above, unchanged.
# --------------------------------------------------------------------------------------------
@gluon.jit
def _pt_of(st, lse_bufs, s, m0, n0, keys2, key_tail, seq_len, qk_scale,
           BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, CAUSAL: gl.constexpr,
           col_st: gl.constexpr, dtype: gl.constexpr):
    """P^T = exp2(S^T * scale*log2e - LSE*log2e) (masked), rounded to the input type."""
    vec_layout: gl.constexpr = gl.SwizzledSharedLayout(1, 1, 1, [0])
    lse2 = lse_bufs.index(s)._reinterpret(gl.float32, [BLOCK_M], vec_layout).load(col_st)
    pt = gl.exp2(st * qk_scale - gl.expand_dims(lse2, 0))
    masked = key_tail
    if CAUSAL:
        masked = masked | (m0 < n0 + BLOCK_N)
    if masked:
        valid = keys2 < seq_len
        if CAUSAL:
            cols = m0 + gl.arange(0, BLOCK_M, layout=col_st)
            valid = valid & (gl.expand_dims(cols, 0) >= keys2)
        pt = gl.where(valid, pt, 0.0)
    return pt.to(dtype)


@gluon.jit
def _ds_of(pt16, dpt, dlt_bufs, s, BLOCK_M: gl.constexpr, col_st: gl.constexpr, dtype: gl.constexpr):
    """dS^T = P^T (dP^T - D), from the rounded P^T (as _consumer)."""
    vec_layout: gl.constexpr = gl.SwizzledSharedLayout(1, 1, 1, [0])
    dlt = dlt_bufs.index(s)._reinterpret(gl.float32, [BLOCK_M], vec_layout).load(col_st)
    return (pt16.to(gl.float32) * (dpt - gl.expand_dims(dlt, 0))).to(dtype)


@gluon.jit
def _dq_out(dq, j, m0, dq_ptr, dq_row0, seq_len, dq_smem, dq_full, dq_empty,
            HEAD_DIM: gl.constexpr, BLOCK_M: gl.constexpr, NW: gl.constexpr,
            DQ_VEC4: gl.constexpr, DQW: gl.constexpr, DQ_PAD: gl.constexpr, dq_layout: gl.constexpr):
    """dQ_j (fp32 [BLOCK_M, D] in registers) out: to the dQ writer's shared buffer (DQW) or by
    fp32 atomics from here (wgmma layout: v2; DQ_VEC4: whole rows, v4).  DQ_PAD: the fp32
    accumulator has num_m * BLOCK_M rows per head (dq_row0 = bh * that), so the atomics need no
    row mask -- ptxas turns a masked atomic into a branch around each REDG, and a branch with a
    wgmma in flight can make it serialize every wgmma (C7518)."""
    if DQW:
        # single buffer: wait until the writer has read dQ_{j-1} (fresh barrier: passes at j = 0)
        mbarrier.wait(dq_empty, (j & 1) ^ 1)
        dq_smem.store(dq)
        # partition-wide bar.sync + one arrive (release): the writer's wait acquires the stores
        mbarrier.arrive(dq_full)
    elif DQ_VEC4:
        dq_bl: gl.constexpr = gl.BlockedLayout([1, 4], [1, 32], [NW, 1], [1, 0])
        dqb = gl.convert_layout(dq, dq_bl)
        b_rows = m0 + gl.arange(0, BLOCK_M, layout=gl.SliceLayout(1, dq_bl))
        b_cols = gl.arange(0, HEAD_DIM, layout=gl.SliceLayout(0, dq_bl))
        offs = gl.expand_dims((dq_row0 + b_rows) * HEAD_DIM, 1) + gl.expand_dims(b_cols, 0)
        if DQ_PAD:
            gl.atomic_add(dq_ptr + offs, dqb, sem="relaxed")
        else:
            gl.atomic_add(dq_ptr + offs, dqb, mask=gl.expand_dims(b_rows < seq_len, 1), sem="relaxed")
    else:
        dq_rows = m0 + gl.arange(0, BLOCK_M, layout=gl.SliceLayout(1, dq_layout))
        dq_cols = gl.arange(0, HEAD_DIM, layout=gl.SliceLayout(0, dq_layout))
        offs = gl.expand_dims((dq_row0 + dq_rows) * HEAD_DIM, 1) + gl.expand_dims(dq_cols, 0)
        if DQ_PAD:
            gl.atomic_add(dq_ptr + offs, dq, sem="relaxed")
        else:
            gl.atomic_add(dq_ptr + offs, dq, mask=gl.expand_dims(dq_rows < seq_len, 1), sem="relaxed")


@gluon.jit
def _dq_writer(dq_smem, dq_full, dq_empty, dq_ptr, dq_row0, seq_len, m_start, n_steps,
               HEAD_DIM: gl.constexpr, BLOCK_M: gl.constexpr, ROWS: gl.constexpr, WW: gl.constexpr,
               DQ_PAD: gl.constexpr):
    """DQW worker (WW warps): dQ_j from shared memory to the global fp32 accumulator with v4
    atomics over whole rows, ROWS rows at a time; then frees the buffer for dQ_{j+1}."""
    # ROWS x COLS chunks (COLS <= 128), full addresses per chunk.  (Tried: constant chunk
    # offsets as immediates, padded rows, a runtime loop over row groups -- ptxas then hoists
    # loads or keeps more addresses and spills at the writer's 24 registers.)
    COLS: gl.constexpr = HEAD_DIM if HEAD_DIM < 128 else 128
    TPC: gl.constexpr = COLS // 4 if COLS // 4 < 32 else 32
    bl: gl.constexpr = gl.BlockedLayout([1, 4], [32 // TPC, TPC], [WW, 1], [1, 0])
    rows0 = gl.arange(0, ROWS, layout=gl.SliceLayout(1, bl))
    cols0 = gl.arange(0, COLS, layout=gl.SliceLayout(0, bl))
    for j in range(n_steps):
        mbarrier.wait(dq_full, j & 1)
        m0 = (m_start + j) * BLOCK_M
        for c in gl.static_range(BLOCK_M // ROWS):
            for h in gl.static_range(HEAD_DIM // COLS):
                x = dq_smem.slice(c * ROWS, ROWS, dim=0).slice(h * COLS, COLS, dim=1).load(bl)
                r = m0 + c * ROWS + rows0
                offs = gl.expand_dims((dq_row0 + r) * HEAD_DIM, 1) + gl.expand_dims(h * COLS + cols0, 0)
                if DQ_PAD:
                    gl.atomic_add(dq_ptr + offs, x, sem="relaxed")
                else:
                    gl.atomic_add(dq_ptr + offs, x, mask=gl.expand_dims(r < seq_len, 1), sem="relaxed")
        mbarrier.arrive(dq_empty)


@gluon.jit
def _pipe_step(i, dk_in, ds_op, dv, q_bufs, do_bufs, k_smem, v_smem, ds_smem, p_smem, lse_bufs,
               dlt_bufs, q_ready, q_empty, do_ready, do_empty, dq_smem, dq_full, dq_empty,
               dq_ptr, dq_row0, seq_len, qk_scale, n0, m_start, keys2, key_tail,
               HEAD_DIM: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr,
               NUM_STAGES: gl.constexpr, CAUSAL: gl.constexpr, WN: gl.constexpr,
               DQ_VEC4: gl.constexpr, NW: gl.constexpr, DQW: gl.constexpr, DQ_PAD: gl.constexpr,
               st_layout: gl.constexpr, dq_layout: gl.constexpr, a_layout: gl.constexpr,
               FIRST: gl.constexpr):
    """One step of _consumer_v's PIPE loop.  dk_in: the dK accumulator (FIRST) or the token of
    dK_{i-1} still in flight; returns (token of dK_i, in flight; its register A operand; dV)."""
    dtype: gl.constexpr = k_smem.dtype
    col_st: gl.constexpr = gl.SliceLayout(0, st_layout)
    st_zero = gl.zeros([BLOCK_N, BLOCK_M], gl.float32, st_layout)
    dq_zero = gl.zeros([BLOCK_M, HEAD_DIM], gl.float32, dq_layout)
    s = i % NUM_STAGES
    ph = (i // NUM_STAGES) & 1
    m0 = (m_start + i) * BLOCK_M
    q_buf = q_bufs.index(s)
    do_buf = do_bufs.index(s)

    mbarrier.wait(q_ready.index(s), ph)
    st_tok = warpgroup_mma(k_smem, q_buf.permute((1, 0)), st_zero, use_acc=False, is_async=True)
    if FIRST:
        dk = dk_in
    else:
        # ---- dK_{i-1} done (S^T_i running): Q_{i-1} free ----
        if WN == 1:
            dk, ds_op = warpgroup_mma_wait(1, deps=[dk_in, ds_op])
        else:
            dk = warpgroup_mma_wait(1, deps=[dk_in])
        # (its bar.sync also orders every warp's dQ_{i-1} / dK_{i-1} wgmmas, which read dS^T,
        # before this step's dS^T (and P^T) stores)
        mbarrier.arrive(q_empty.index((i + NUM_STAGES - 1) % NUM_STAGES), pred=i > 0)
    # dP^T_i only now: with dK_{i-1}, its A operand, S^T_i and dP^T_i all live, causal d128 runs
    # out of registers (C7512).  S^T_i still queues behind dK_{i-1}: no drain.
    mbarrier.wait(do_ready.index(s), ph)
    dpt_tok = warpgroup_mma(v_smem, do_buf.permute((1, 0)), st_zero, use_acc=False, is_async=True)
    st = warpgroup_mma_wait(1, deps=[st_tok])

    # ---- P^T (dP^T running) ----
    pt16 = _pt_of(st, lse_bufs, s, m0, n0, keys2, key_tail, seq_len, qk_scale,
                  BLOCK_M, BLOCK_N, CAUSAL, col_st, dtype)
    if WN == 1:
        p_op = gl.convert_layout(pt16, a_layout)
        dv_tok = warpgroup_mma(p_op, do_buf, dv, is_async=True)
    else:
        p_smem.store(pt16)
        fence_async_shared()
        dv_tok = warpgroup_mma(p_smem, do_buf, dv, is_async=True)
    # ---- dS^T (dV running) ----
    dpt = warpgroup_mma_wait(1, deps=[dpt_tok])
    ds16 = _ds_of(pt16, dpt, dlt_bufs, s, BLOCK_M, col_st, dtype)
    ds_smem.store(ds16)
    fence_async_shared()
    dq_tok = warpgroup_mma(ds_smem.permute((1, 0)), k_smem, dq_zero, use_acc=False, is_async=True)
    if WN == 1:
        ds_op = gl.convert_layout(ds16, a_layout)
        dk_tok = warpgroup_mma(ds_op, q_buf, dk, is_async=True)
        dv, dq, p_op = warpgroup_mma_wait(1, deps=[dv_tok, dq_tok, p_op])
    else:
        dk_tok = warpgroup_mma(ds_smem, q_buf, dk, is_async=True)
        dv, dq = warpgroup_mma_wait(1, deps=[dv_tok, dq_tok])
    mbarrier.arrive(do_empty.index(s))
    # ---- dQ_i out (dK_i running, and stays in flight into step i+1) ----
    _dq_out(dq, i, m0, dq_ptr, dq_row0, seq_len, dq_smem, dq_full, dq_empty,
            HEAD_DIM, BLOCK_M, NW, DQ_VEC4, DQW, DQ_PAD, dq_layout)
    return dk_tok, ds_op, dv


@gluon.jit
def _consumer_v(q_bufs, do_bufs, k_smem, v_smem, ds_smem, p_smem, lse_bufs, dlt_bufs, kv_bar,
                q_ready, q_empty, do_ready, do_empty, dq_smem, dq_full, dq_empty,
                dq_ptr, dk_ptr, dv_ptr, sm_scale, qk_scale, seq_len,
                row0, n0, m_start, n_steps,
                HEAD_DIM: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr,
                NUM_STAGES: gl.constexpr, CAUSAL: gl.constexpr, WN: gl.constexpr,
                DQ_VEC4: gl.constexpr, NW: gl.constexpr, PIPE: gl.constexpr, DQW: gl.constexpr,
                DQ_PAD: gl.constexpr, dq_row0):
    dtype: gl.constexpr = k_smem.dtype
    st_layout: gl.constexpr = gl.NVMMADistributedLayout(
        version=[3, 0], warps_per_cta=[NW // WN, WN], instr_shape=[16, BLOCK_M // WN, 16])
    kv_layout: gl.constexpr = gl.NVMMADistributedLayout(
        version=[3, 0], warps_per_cta=[NW // WN, WN], instr_shape=[16, HEAD_DIM // WN, 16])
    dq_layout: gl.constexpr = gl.NVMMADistributedLayout(
        version=[3, 0], warps_per_cta=[4, NW // 4], instr_shape=[16, HEAD_DIM // (NW // 4), 16])
    a_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=kv_layout, k_width=2)
    col_st: gl.constexpr = gl.SliceLayout(0, st_layout)
    row_st: gl.constexpr = gl.SliceLayout(1, st_layout)

    st_zero = gl.zeros([BLOCK_N, BLOCK_M], gl.float32, st_layout)
    dq_zero = gl.zeros([BLOCK_M, HEAD_DIM], gl.float32, dq_layout)
    dk = gl.zeros([BLOCK_N, HEAD_DIM], gl.float32, kv_layout)
    dv = gl.zeros([BLOCK_N, HEAD_DIM], gl.float32, kv_layout)
    keys2 = gl.expand_dims(n0 + gl.arange(0, BLOCK_N, layout=row_st), 1)
    key_tail = n0 + BLOCK_N > seq_len

    mbarrier.wait(kv_bar, 0)
    if PIPE:
        # dK_i stays in flight across the loop back edge: step i+1 issues S^T_{i+1} right behind
        # it (no drain + refill of the tensor cores between steps), then retires dK_i (Q_i free)
        # and issues dP^T_{i+1}.  dQ_i leaves at the end of step i, under dK_i, as in _consumer.
        # Commit groups: ... dK_{i-1} | S^T_i dP^T_i dV_i dQ_i dK_i | S^T_{i+1} ...
        # PIPE == 1 (d64/d128): a zero dK "token" enters the loop.  PIPE == 2 (d256): step 0 is
        # peeled, so that both edges into the loop carry a dK wgmma in flight -- unpeeled, ptxas
        # serializes every wgmma at d256 (C7515); peeled, d128 runs out of registers (C7512).
        # With DQW neither form stays pipelined (pipe_dqw).  Shapes tried and dropped: S^T_{i+1}
        # in flight over the back edge (C7514: LLVM duplicates the loop body, ptxas sees the
        # accumulators read), dQ_{i-1}'s atomics in step i (C7517/C7515/C7518), S^T_{i+1} under
        # the dQ_i atomics inside one step (C7512 at d128: out of registers).
        if WN == 1:
            ds_op = gl.zeros([BLOCK_N, BLOCK_M], dtype, a_layout)
        else:
            ds_op = 0
        if PIPE == 2:
            dk_tok, ds_op, dv = _pipe_step(
                0, dk, ds_op, dv, q_bufs, do_bufs, k_smem, v_smem, ds_smem, p_smem, lse_bufs, dlt_bufs,
                q_ready, q_empty, do_ready, do_empty, dq_smem, dq_full, dq_empty,
                dq_ptr, dq_row0, seq_len, qk_scale, n0, m_start, keys2, key_tail,
                HEAD_DIM, BLOCK_M, BLOCK_N, NUM_STAGES, CAUSAL, WN, DQ_VEC4, NW, DQW, DQ_PAD,
                st_layout, dq_layout, a_layout, True)
            i_start = 1
        else:
            dk_tok = warpgroup_mma_init(dk)
            i_start = 0
        for i in range(i_start, n_steps):
            dk_tok, ds_op, dv = _pipe_step(
                i, dk_tok, ds_op, dv, q_bufs, do_bufs, k_smem, v_smem, ds_smem, p_smem, lse_bufs,
                dlt_bufs, q_ready, q_empty, do_ready, do_empty, dq_smem, dq_full, dq_empty,
                dq_ptr, dq_row0, seq_len, qk_scale, n0, m_start, keys2, key_tail,
                HEAD_DIM, BLOCK_M, BLOCK_N, NUM_STAGES, CAUSAL, WN, DQ_VEC4, NW, DQW, DQ_PAD,
                st_layout, dq_layout, a_layout, False)
        if WN == 1:
            dk, ds_op = warpgroup_mma_wait(0, deps=[dk_tok, ds_op])
        else:
            dk = warpgroup_mma_wait(0, deps=[dk_tok])
    else:
        # _consumer's schedule, dQ output through _dq_out (for DQW without PIPE)
        for i in range(n_steps):
            s = i % NUM_STAGES
            ph = (i // NUM_STAGES) & 1
            m0 = (m_start + i) * BLOCK_M
            q_buf = q_bufs.index(s)
            do_buf = do_bufs.index(s)
            mbarrier.wait(q_ready.index(s), ph)
            st_tok = warpgroup_mma(k_smem, q_buf.permute((1, 0)), st_zero, use_acc=False, is_async=True)
            mbarrier.wait(do_ready.index(s), ph)
            dpt_tok = warpgroup_mma(v_smem, do_buf.permute((1, 0)), st_zero, use_acc=False, is_async=True)
            st = warpgroup_mma_wait(1, deps=[st_tok])
            pt16 = _pt_of(st, lse_bufs, s, m0, n0, keys2, key_tail, seq_len, qk_scale,
                          BLOCK_M, BLOCK_N, CAUSAL, col_st, dtype)
            if WN == 1:
                p_op = gl.convert_layout(pt16, a_layout)
                dv_tok = warpgroup_mma(p_op, do_buf, dv, is_async=True)
            else:
                p_smem.store(pt16)
                fence_async_shared()
                dv_tok = warpgroup_mma(p_smem, do_buf, dv, is_async=True)
            dpt = warpgroup_mma_wait(1, deps=[dpt_tok])
            ds16 = _ds_of(pt16, dpt, dlt_bufs, s, BLOCK_M, col_st, dtype)
            ds_smem.store(ds16)
            fence_async_shared()
            dq_tok = warpgroup_mma(ds_smem.permute((1, 0)), k_smem, dq_zero, use_acc=False, is_async=True)
            if WN == 1:
                ds_op = gl.convert_layout(ds16, a_layout)
                dk_tok = warpgroup_mma(ds_op, q_buf, dk, is_async=True)
                dv, dq, p_op = warpgroup_mma_wait(1, deps=[dv_tok, dq_tok, p_op])
            else:
                dk_tok = warpgroup_mma(ds_smem, q_buf, dk, is_async=True)
                dv, dq = warpgroup_mma_wait(1, deps=[dv_tok, dq_tok])
            mbarrier.arrive(do_empty.index(s))
            _dq_out(dq, i, m0, dq_ptr, dq_row0, seq_len, dq_smem, dq_full, dq_empty,
                    HEAD_DIM, BLOCK_M, NW, DQ_VEC4, DQW, DQ_PAD, dq_layout)
            if WN == 1:
                dk, ds_op = warpgroup_mma_wait(0, deps=[dk_tok, ds_op])
            else:
                dk = warpgroup_mma_wait(0, deps=[dk_tok])
            mbarrier.arrive(q_empty.index(s))

    kv_rows = n0 + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(1, kv_layout))
    kv_cols = gl.arange(0, HEAD_DIM, layout=gl.SliceLayout(0, kv_layout))
    offs = gl.expand_dims((row0 + kv_rows) * HEAD_DIM, 1) + gl.expand_dims(kv_cols, 0)
    kv_mask = gl.expand_dims(kv_rows < seq_len, 1)
    gl.store(dk_ptr + offs, (dk * sm_scale).to(dtype), mask=kv_mask)
    gl.store(dv_ptr + offs, dv.to(dtype), mask=kv_mask)


@gluon.jit
def _consumer_wide(q_bufs, do_bufs, k_smem, v_smem, ds_smem, p_smem, lse_bufs, dlt_bufs, kv_bar,
                   q_ready, q_empty, do_ready, do_empty,
                   dq_ptr, dk_ptr, dv_ptr, sm_scale, qk_scale, seq_len,
                   row0, n0, m_start, n_steps, dq_row0,
                   HEAD_DIM: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr,
                   NUM_STAGES: gl.constexpr, CAUSAL: gl.constexpr, NW: gl.constexpr):
    """WIDE (d256): BLOCK_M = 128 query rows a step, BLOCK_N = 64 keys, both warpgroups own all
    keys and split the queries of S^T / dP^T (m64n64 per warpgroup instead of m64n32: half
    the shared-memory operand traffic per FLOP of those GEMMs) and the head dim of dK / dV
    (as the smem mode).  dQ_i [128, 256] fp32 would take 128 registers a thread: it is done in
    two head-dim halves [128, 128] with warps [8, 1] (each warpgroup its own 64 queries),
    the first half's atomics under the dK GEMM, the second's after it.  Shared memory (Q, dO
    64 KB a stage) allows one stage: Q_{i+1} loads under dQ_i, dO_{i+1} under dK_i / dQ_i.
    Needs the padded dQ accumulator (no row masks)."""
    dtype: gl.constexpr = k_smem.dtype
    HALF: gl.constexpr = HEAD_DIM // 2
    st_layout: gl.constexpr = gl.NVMMADistributedLayout(
        version=[3, 0], warps_per_cta=[NW // 2, 2], instr_shape=[16, BLOCK_M // 2, 16])
    kv_layout: gl.constexpr = gl.NVMMADistributedLayout(
        version=[3, 0], warps_per_cta=[NW // 2, 2], instr_shape=[16, HEAD_DIM // 2, 16])
    dqh_layout: gl.constexpr = gl.NVMMADistributedLayout(
        version=[3, 0], warps_per_cta=[NW, 1], instr_shape=[16, HALF, 16])
    col_st: gl.constexpr = gl.SliceLayout(0, st_layout)
    row_st: gl.constexpr = gl.SliceLayout(1, st_layout)

    st_zero = gl.zeros([BLOCK_N, BLOCK_M], gl.float32, st_layout)
    dqh_zero = gl.zeros([BLOCK_M, HALF], gl.float32, dqh_layout)
    dk = gl.zeros([BLOCK_N, HEAD_DIM], gl.float32, kv_layout)
    dv = gl.zeros([BLOCK_N, HEAD_DIM], gl.float32, kv_layout)
    keys2 = gl.expand_dims(n0 + gl.arange(0, BLOCK_N, layout=row_st), 1)
    key_tail = n0 + BLOCK_N > seq_len
    k_lo = k_smem.slice(0, HALF, dim=1)
    k_hi = k_smem.slice(HALF, HALF, dim=1)

    mbarrier.wait(kv_bar, 0)
    for i in range(n_steps):
        s = i % NUM_STAGES
        ph = (i // NUM_STAGES) & 1
        m0 = (m_start + i) * BLOCK_M
        q_buf = q_bufs.index(s)
        do_buf = do_bufs.index(s)
        # (offsets built here, not hoisted: a loop-invariant [128, 128] int32 tensor would hold
        # 64 registers a thread)
        dq_rows = dq_row0 + m0 + gl.arange(0, BLOCK_M, layout=gl.SliceLayout(1, dqh_layout))
        dq_cols = gl.arange(0, HALF, layout=gl.SliceLayout(0, dqh_layout))
        dq_offs = gl.expand_dims(dq_rows * HEAD_DIM, 1) + gl.expand_dims(dq_cols, 0)

        mbarrier.wait(q_ready.index(s), ph)
        st_tok = warpgroup_mma(k_smem, q_buf.permute((1, 0)), st_zero, use_acc=False, is_async=True)
        mbarrier.wait(do_ready.index(s), ph)
        dpt_tok = warpgroup_mma(v_smem, do_buf.permute((1, 0)), st_zero, use_acc=False, is_async=True)
        st = warpgroup_mma_wait(1, deps=[st_tok])
        pt16 = _pt_of(st, lse_bufs, s, m0, n0, keys2, key_tail, seq_len, qk_scale,
                      BLOCK_M, BLOCK_N, CAUSAL, col_st, dtype)
        p_smem.store(pt16)
        fence_async_shared()
        dv_tok = warpgroup_mma(p_smem, do_buf, dv, is_async=True)
        dpt = warpgroup_mma_wait(1, deps=[dpt_tok])
        ds16 = _ds_of(pt16, dpt, dlt_bufs, s, BLOCK_M, col_st, dtype)
        ds_smem.store(ds16)
        fence_async_shared()
        dq_tok = warpgroup_mma(ds_smem.permute((1, 0)), k_lo, dqh_zero, use_acc=False, is_async=True)
        dk_tok = warpgroup_mma(ds_smem, q_buf, dk, is_async=True)
        # ---- dV, dQ[:, :D/2] done (dK running): dO free, first half's atomics ----
        dv, dq = warpgroup_mma_wait(1, deps=[dv_tok, dq_tok])
        mbarrier.arrive(do_empty.index(s))
        gl.atomic_add(dq_ptr + dq_offs, dq, sem="relaxed")
        dq_tok = warpgroup_mma(ds_smem.permute((1, 0)), k_hi, dqh_zero, use_acc=False, is_async=True)
        # ---- dK done (dQ[:, D/2:] running): Q free, so Q_{i+1} loads under it ----
        dk = warpgroup_mma_wait(1, deps=[dk_tok])
        mbarrier.arrive(q_empty.index(s))
        dq = warpgroup_mma_wait(0, deps=[dq_tok])
        # every warp is past its waits on the wgmmas reading dS^T before the next step's stores
        gl.thread_barrier()
        gl.atomic_add(dq_ptr + HALF + dq_offs, dq, sem="relaxed")

    kv_rows = n0 + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(1, kv_layout))
    kv_cols = gl.arange(0, HEAD_DIM, layout=gl.SliceLayout(0, kv_layout))
    offs = gl.expand_dims((row0 + kv_rows) * HEAD_DIM, 1) + gl.expand_dims(kv_cols, 0)
    kv_mask = gl.expand_dims(kv_rows < seq_len, 1)
    gl.store(dk_ptr + offs, (dk * sm_scale).to(dtype), mask=kv_mask)
    gl.store(dv_ptr + offs, dv.to(dtype), mask=kv_mask)


@gluon.jit(do_not_specialize=["seq_len"])
def attn_bwd_kernel(q_desc, k_desc, v_desc, do_desc, lse_desc, dlt_desc, dq_ptr, dk_ptr, dv_ptr,
                    sm_scale, qk_scale, seq_len,
                    HEAD_DIM: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr,
                    NUM_STAGES: gl.constexpr, CAUSAL: gl.constexpr, WN: gl.constexpr,
                    DQ_VEC4: gl.constexpr, num_warps: gl.constexpr,
                    PIPE: gl.constexpr = 0, DQW: gl.constexpr = False,
                    DQW_WARPS: gl.constexpr = 1, DQW_REGS: gl.constexpr = 24, DQW_ROWS: gl.constexpr = 8,
                    DQ_PAD: gl.constexpr = False, WIDE: gl.constexpr = False):
    n0 = gl.program_id(0) * BLOCK_N        # pid 0 = key block 0 = heaviest when causal
    bh = gl.program_id(1)
    row0 = bh * seq_len
    num_m = gl.cdiv(seq_len, BLOCK_M)
    if CAUSAL:
        m_start = n0 // BLOCK_M            # first query block that sees key n0
    else:
        m_start = 0
    n_steps = num_m - m_start
    vrow0 = bh * num_m                     # row of this head's first block in the LSE/D views

    dtype: gl.constexpr = q_desc.dtype
    q_bufs = gl.allocate_shared_memory(dtype, [NUM_STAGES] + q_desc.block_type.shape, q_desc.layout)
    do_bufs = gl.allocate_shared_memory(dtype, [NUM_STAGES] + do_desc.block_type.shape, do_desc.layout)
    k_smem = gl.allocate_shared_memory(dtype, k_desc.block_type.shape, k_desc.layout)
    v_smem = gl.allocate_shared_memory(dtype, v_desc.block_type.shape, v_desc.layout)
    st_smem_layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BLOCK_N, BLOCK_M], dtype)
    ds_smem = gl.allocate_shared_memory(dtype, [BLOCK_N, BLOCK_M], st_smem_layout)
    if WN == 1:
        p_smem = ds_smem                   # unused in rs mode
    else:
        p_smem = gl.allocate_shared_memory(dtype, [BLOCK_N, BLOCK_M], st_smem_layout)
    lse_bufs = gl.allocate_shared_memory(gl.float32, [NUM_STAGES] + lse_desc.block_type.shape, lse_desc.layout)
    dlt_bufs = gl.allocate_shared_memory(gl.float32, [NUM_STAGES] + dlt_desc.block_type.shape, dlt_desc.layout)
    kv_bar = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
    q_ready = gl.allocate_shared_memory(gl.int64, [NUM_STAGES, 1], mbarrier.MBarrierLayout())
    q_empty = gl.allocate_shared_memory(gl.int64, [NUM_STAGES, 1], mbarrier.MBarrierLayout())
    do_ready = gl.allocate_shared_memory(gl.int64, [NUM_STAGES, 1], mbarrier.MBarrierLayout())
    do_empty = gl.allocate_shared_memory(gl.int64, [NUM_STAGES, 1], mbarrier.MBarrierLayout())
    mbarrier.init(kv_bar, count=1)
    for i in gl.static_range(NUM_STAGES):
        mbarrier.init(q_ready.index(i), count=1)
        mbarrier.init(q_empty.index(i), count=1)
        mbarrier.init(do_ready.index(i), count=1)
        mbarrier.init(do_empty.index(i), count=1)

    if WIDE:
        gl.warp_specialize([
            (_consumer_wide, (q_bufs, do_bufs, k_smem, v_smem, ds_smem, p_smem, lse_bufs, dlt_bufs, kv_bar,
                              q_ready, q_empty, do_ready, do_empty,
                              dq_ptr, dk_ptr, dv_ptr, sm_scale, qk_scale, seq_len,
                              row0, n0, m_start, n_steps, bh * (num_m * BLOCK_M),
                              HEAD_DIM, BLOCK_M, BLOCK_N, NUM_STAGES, CAUSAL, num_warps)),
            (_producer, (q_desc, do_desc, k_desc, v_desc, lse_desc, dlt_desc, q_bufs, do_bufs,
                         k_smem, v_smem, lse_bufs, dlt_bufs, kv_bar, q_ready, q_empty, do_ready, do_empty,
                         row0, vrow0, n0, m_start, n_steps,
                         BLOCK_M, NUM_STAGES)),
        ], [PRODUCER_WARPS], [PRODUCER_REGS])
    elif PIPE or DQW:
        if DQ_PAD:
            dq_row0 = bh * (num_m * BLOCK_M)   # padded fp32 dQ accumulator: no row masks
        else:
            dq_row0 = row0
        if DQW:
            # 16-B units swizzled over 8-row periods: the consumers' v2 stores (8 rows x 32 B a
            # warp) and the writer's v4 row loads are both conflict-free
            dq_layout_s: gl.constexpr = gl.SwizzledSharedLayout(4, 1, 8, [1, 0])
            dq_smem = gl.allocate_shared_memory(gl.float32, [BLOCK_M, HEAD_DIM], dq_layout_s)
            dq_full = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
            dq_empty = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
            mbarrier.init(dq_full, count=1)
            mbarrier.init(dq_empty, count=1)
        else:
            dq_smem = ds_smem              # unused
            dq_full = kv_bar
            dq_empty = kv_bar
        # (argument tuples written out in each call: a tuple held in a variable turns the
        # constexprs in it into tensors)
        if DQW:
            gl.warp_specialize([
                (_consumer_v, (q_bufs, do_bufs, k_smem, v_smem, ds_smem, p_smem, lse_bufs, dlt_bufs, kv_bar,
                               q_ready, q_empty, do_ready, do_empty, dq_smem, dq_full, dq_empty,
                               dq_ptr, dk_ptr, dv_ptr, sm_scale, qk_scale, seq_len,
                               row0, n0, m_start, n_steps,
                               HEAD_DIM, BLOCK_M, BLOCK_N, NUM_STAGES, CAUSAL, WN, DQ_VEC4, num_warps,
                               PIPE, DQW, DQ_PAD, dq_row0)),
                (_producer, (q_desc, do_desc, k_desc, v_desc, lse_desc, dlt_desc, q_bufs, do_bufs,
                             k_smem, v_smem, lse_bufs, dlt_bufs, kv_bar, q_ready, q_empty, do_ready,
                             do_empty, row0, vrow0, n0, m_start, n_steps,
                             BLOCK_M, NUM_STAGES)),
                (_dq_writer, (dq_smem, dq_full, dq_empty, dq_ptr, dq_row0, seq_len, m_start, n_steps,
                              HEAD_DIM, BLOCK_M, DQW_ROWS, DQW_WARPS, DQ_PAD)),
            ], [PRODUCER_WARPS, DQW_WARPS], [PRODUCER_REGS, DQW_REGS])
        else:
            gl.warp_specialize([
                (_consumer_v, (q_bufs, do_bufs, k_smem, v_smem, ds_smem, p_smem, lse_bufs, dlt_bufs, kv_bar,
                               q_ready, q_empty, do_ready, do_empty, dq_smem, dq_full, dq_empty,
                               dq_ptr, dk_ptr, dv_ptr, sm_scale, qk_scale, seq_len,
                               row0, n0, m_start, n_steps,
                               HEAD_DIM, BLOCK_M, BLOCK_N, NUM_STAGES, CAUSAL, WN, DQ_VEC4, num_warps,
                               PIPE, DQW, DQ_PAD, dq_row0)),
                (_producer, (q_desc, do_desc, k_desc, v_desc, lse_desc, dlt_desc, q_bufs, do_bufs,
                             k_smem, v_smem, lse_bufs, dlt_bufs, kv_bar, q_ready, q_empty, do_ready,
                             do_empty, row0, vrow0, n0, m_start, n_steps,
                             BLOCK_M, NUM_STAGES)),
            ], [PRODUCER_WARPS], [PRODUCER_REGS])
    else:
        gl.warp_specialize([
            (_consumer, (q_bufs, do_bufs, k_smem, v_smem, ds_smem, p_smem, lse_bufs, dlt_bufs, kv_bar,
                         q_ready, q_empty, do_ready, do_empty,
                         dq_ptr, dk_ptr, dv_ptr, sm_scale, qk_scale, seq_len,
                         row0, n0, m_start, n_steps,
                         HEAD_DIM, BLOCK_M, BLOCK_N, NUM_STAGES, CAUSAL, WN, DQ_VEC4, num_warps)),
            (_producer, (q_desc, do_desc, k_desc, v_desc, lse_desc, dlt_desc, q_bufs, do_bufs,
                         k_smem, v_smem, lse_bufs, dlt_bufs, kv_bar, q_ready, q_empty, do_ready, do_empty,
                         row0, vrow0, n0, m_start, n_steps,
                         BLOCK_M, NUM_STAGES)),
        ], [PRODUCER_WARPS], [PRODUCER_REGS])


# --------------------------------------------------------------------------------------------
# tl helper kernels: preprocess (D, LSE*log2e) and dQ scale + cast
# --------------------------------------------------------------------------------------------
@triton.jit
def _bwd_preprocess(o_ptr, do_ptr, lse_ptr, delta_ptr, lse2_ptr, seq_len, seq_pad,
                    HEAD_DIM: tl.constexpr, BLOCK: tl.constexpr):
    # Outputs are per-head padded to seq_pad (a multiple of BLOCK_M): rows >= S get
    # LSE*log2e = +inf (=> P = 0) and D = 0 (=> dS = 0), so the main kernel's TMA boxes of
    # BLOCK_M values never cross heads and need no row mask.
    bh = tl.program_id(1)
    m = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    cols = tl.arange(0, HEAD_DIM)
    valid = m < seq_len
    src = bh.to(tl.int64) * seq_len + m
    offs = src[:, None] * HEAD_DIM + cols[None, :]
    o = tl.load(o_ptr + offs, mask=valid[:, None], other=0.0).to(tl.float32)
    do = tl.load(do_ptr + offs, mask=valid[:, None], other=0.0).to(tl.float32)
    dst = bh.to(tl.int64) * seq_pad + m
    pmask = m < seq_pad
    tl.store(delta_ptr + dst, tl.sum(o * do, axis=1), mask=pmask)
    lse = tl.load(lse_ptr + src, mask=valid, other=float("inf"))
    tl.store(lse2_ptr + dst, lse * 1.4426950408889634, mask=pmask)


@triton.jit
def _dq_cast_pad(dq_acc_ptr, dq_ptr, seq_len, seq_pad, scale, HEAD_DIM: tl.constexpr, ROWS: tl.constexpr):
    # DQ_PAD variants: the fp32 accumulator has seq_pad rows per head
    bh = tl.program_id(1).to(tl.int64)
    r = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    c = tl.arange(0, HEAD_DIM)
    m = (r < seq_len)[:, None]
    x = tl.load(dq_acc_ptr + (bh * seq_pad + r)[:, None] * HEAD_DIM + c[None, :], mask=m, other=0.0)
    tl.store(dq_ptr + (bh * seq_len + r)[:, None] * HEAD_DIM + c[None, :],
             (x * scale).to(dq_ptr.dtype.element_ty), mask=m)


@triton.jit
def _dq_cast(dq_acc_ptr, dq_ptr, n, scale, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    m = offs < n
    x = tl.load(dq_acc_ptr + offs, mask=m, other=0.0)
    tl.store(dq_ptr + offs, (x * scale).to(dq_ptr.dtype.element_ty), mask=m)


# --------------------------------------------------------------------------------------------
# Host side
# --------------------------------------------------------------------------------------------
def _gl_dtype(torch_dtype):
    import torch
    return {torch.float16: gl.float16, torch.bfloat16: gl.bfloat16}[torch_dtype]


def _vec_layout():
    # LSE / D boxes: [1, BLOCK_M] fp32 = 256 B rows, no swizzle (a swizzled box row must fit
    # the swizzle span, 128 B at most).
    return gl.NVMMASharedLayout(swizzle_byte_width=0, element_bitwidth=32, rank=2)


def _layouts(D, BM, BN, gdt):
    return (gl.NVMMASharedLayout.get_default_for([BM, D], gdt),
            gl.NVMMASharedLayout.get_default_for([BN, D], gdt))


def make_gluon_attention_bwd(q, k, v, o, do, lse, causal=False, sm_scale=None, dq_vec4=False,
                             variant=None):
    """q, k, v, o, do: [B, H, S, D] contiguous fp16/bf16; lse [B, H, S] fp32 natural log.
    Returns (launch, dq, dk, dv); launch() runs the whole backward (zero dQ accumulator,
    preprocess, main kernel, dQ cast) into dq, dk, dv.  variant: a VARIANTS name (None: the
    default kernel, as before; dq_vec4 only applies then)."""
    import torch
    B, H, S, D = q.shape
    assert all(t.shape == q.shape and t.is_contiguous() for t in (k, v, o, do)), "Sq == Sk, no GQA"
    assert D in CONFIGS, D
    assert B * H * S * D < 2 ** 31, "int32 offsets in the prototype"
    if variant is None or variant == "base":
        BM, BN, NS, WN = CONFIGS[D]
        extra = {}
        dq_pad = False
    else:
        BM, BN, NS, WN, extra = variant_config(D, variant)
        dq_vec4 = extra.pop("DQ_VEC4")
        dq_pad = bool(extra.get("DQ_PAD", False))
    sm_scale = 1.0 / math.sqrt(D) if sm_scale is None else sm_scale
    dev = q.device
    n_rows = B * H * S
    dq = torch.empty_like(q)
    dk = torch.empty_like(k)
    dv = torch.empty_like(v)
    num_m = triton.cdiv(S, BM)
    # DQ_PAD: num_m * BM rows per head, so that the kernel's dQ atomics need no row mask
    dq_acc = torch.empty((B * H * num_m * BM if dq_pad else n_rows, D), device=dev, dtype=torch.float32)
    delta = torch.empty(B * H * num_m * BM, device=dev, dtype=torch.float32)
    lse2 = torch.empty(B * H * num_m * BM, device=dev, dtype=torch.float32)
    lse_c = lse.contiguous()
    q_layout, kv_layout = _layouts(D, BM, BN, _gl_dtype(q.dtype))
    vec_layout = _vec_layout()
    lse_desc = TensorDescriptor.from_tensor(lse2.view(-1, BM), [1, BM], vec_layout)
    dlt_desc = TensorDescriptor.from_tensor(delta.view(-1, BM), [1, BM], vec_layout)
    q2, k2, v2, do2 = (t.view(n_rows, D) for t in (q, k, v, do))
    q_desc = TensorDescriptor.from_tensor(q2, [BM, D], q_layout)
    do_desc = TensorDescriptor.from_tensor(do2, [BM, D], q_layout)
    k_desc = TensorDescriptor.from_tensor(k2, [BN, D], kv_layout)
    v_desc = TensorDescriptor.from_tensor(v2, [BN, D], kv_layout)
    grid = (triton.cdiv(S, BN), B * H)
    PB = 32
    n_el = n_rows * D
    CR = max(1, 4096 // D)                 # rows per program of the padded cast

    def launch():
        dq_acc.zero_()
        _bwd_preprocess[(triton.cdiv(num_m * BM, PB), B * H)](o, do, lse_c, delta, lse2, S, num_m * BM,
                                                               HEAD_DIM=D, BLOCK=PB, num_warps=4)
        attn_bwd_kernel[grid](q_desc, k_desc, v_desc, do_desc, lse_desc, dlt_desc, dq_acc, dk, dv,
                              sm_scale, sm_scale * LOG2E, S,
                              D, BM, BN, NS, bool(causal), WN, bool(dq_vec4),
                              num_warps=NUM_WARPS, maxnreg=MAXNREG, **extra)
        if dq_pad:
            _dq_cast_pad[(triton.cdiv(S, CR), B * H)](dq_acc, dq, S, num_m * BM, sm_scale,
                                                      HEAD_DIM=D, ROWS=CR, num_warps=8)
        else:
            _dq_cast[(triton.cdiv(n_el, 4096),)](dq_acc, dq, n_el, sm_scale, BLOCK=4096, num_warps=8)

    return launch, dq, dk, dv


# --------------------------------------------------------------------------------------------
# CPU emulation of the kernel's blocking (no GPU): same 2-D views (rows past a head read the
# next head or TMA zeros), padded LSE*log2e / D, causal start block and masks, fp16 rounding
# of P^T / dS^T, dQ accumulated per key block.  Checks the index logic, not the Gluon code.
# --------------------------------------------------------------------------------------------
def emulate_bwd(q, k, v, o, do, lse, causal, scale):
    import torch
    B, H, S, D = q.shape
    BM, BN, _, _ = CONFIGS[D]
    f = torch.float32
    n_rows = B * H * S
    num_m = triton.cdiv(S, BM)

    def rows2d(t, start, n):           # TMA box of a 2-D [B*H*S, D] view, zero fill at the end
        out = torch.zeros(n, D, dtype=t.dtype)
        flat = t.reshape(n_rows, D)
        hi = min(start + n, n_rows)
        out[:hi - start] = flat[start:hi]
        return out.to(f)
    lse2 = torch.full((B * H, num_m * BM), float("inf"))
    delta = torch.zeros(B * H, num_m * BM)
    lse2[:, :S] = lse.reshape(B * H, S) * LOG2E
    delta[:, :S] = (o.to(f) * do.to(f)).sum(-1).reshape(B * H, S)
    dq_acc = torch.zeros(n_rows, D)
    dk = torch.zeros(n_rows, D)
    dv = torch.zeros(n_rows, D)
    for bh in range(B * H):
        row0 = bh * S
        for n0 in range(0, S, BN):
            K = rows2d(k, row0 + n0, BN)
            V = rows2d(v, row0 + n0, BN)
            m_start = n0 // BM if causal else 0
            keys = n0 + torch.arange(BN)
            dK = torch.zeros(BN, D)
            dV = torch.zeros(BN, D)
            for mb in range(m_start, num_m):
                m0 = mb * BM
                Q = rows2d(q, row0 + m0, BM)
                dO = rows2d(do, row0 + m0, BM)
                l2 = lse2[bh, m0:m0 + BM]
                dl = delta[bh, m0:m0 + BM]
                st = K @ Q.T
                pt = torch.exp2(st * (scale * LOG2E) - l2[None, :])
                if (n0 + BN > S) or (causal and m0 < n0 + BN):
                    valid = (keys[:, None] < S).expand(BN, BM)
                    if causal:
                        valid = valid & ((m0 + torch.arange(BM))[None, :] >= keys[:, None])
                    pt = torch.where(valid, pt, torch.zeros(()))
                pt16 = pt.to(q.dtype).to(f)
                dV += pt16 @ dO
                dpt = V @ dO.T
                ds16 = (pt16 * (dpt - dl[None, :])).to(q.dtype).to(f)
                dK += ds16 @ Q
                dq = ds16.T @ K
                rows = m0 + torch.arange(BM)
                ok = rows < S
                dq_acc[row0 + rows[ok]] += dq[ok]
            kr = keys[keys < S]
            dk[row0 + kr] = dK[:len(kr)] * scale
            dv[row0 + kr] = dV[:len(kr)]
    shp = (B, H, S, D)
    return (dq_acc * scale).reshape(shp), dk.reshape(shp), dv.reshape(shp)


def emulate_check():
    import torch
    torch.manual_seed(0)
    ok_all = True
    for D in (64, 128, 256):
        for causal in (False, True):
            for S in (1, 70, 128, 200):
                B, H = 2, 2
                scale = 1.0 / math.sqrt(D)
                q, k, v, do = (torch.randn(B, H, S, D, dtype=torch.float64) for _ in range(4))
                q64, k64, v64 = (t.clone().requires_grad_() for t in (q, k, v))
                s = (q64 @ k64.transpose(-1, -2)) * scale
                if causal:
                    s = s.masked_fill(~torch.ones(S, S, dtype=torch.bool).tril(), float("-inf"))
                o64 = torch.softmax(s, -1) @ v64
                ref = torch.autograd.grad(o64, (q64, k64, v64), do)
                lse = torch.logsumexp(s.detach(), -1).float()
                h = lambda t: t.to(torch.float16)  # noqa: E731
                got = emulate_bwd(h(q), h(k), h(v), h(o64.detach()), h(do), lse, causal, scale)
                errs = [((g.double() - r).abs().max() / r.abs().max().clamp_min(1.0)).item()
                        for g, r in zip(got, ref)]
                ok = all(e < 2e-2 for e in errs)
                ok_all &= ok
                if not ok or S == 200:
                    print(f"emulate D={D} causal={int(causal)} S={S}: err/max(1,|ref|) dq/dk/dv "
                          + " ".join(f"{e:.1e}" for e in errs) + (" ok" if ok else " FAIL"))
    print("emulation", "PASS" if ok_all else "FAIL")
    return ok_all


# --------------------------------------------------------------------------------------------
# AOT compile check (no GPU needed)
# --------------------------------------------------------------------------------------------
def _compile(D, causal, dtype_str="fp16", dq_vec4=False, variant=None):
    if variant is not None:
        BM, BN, NS, WN, extra = variant_config(D, variant)
    else:
        BM, BN, NS, WN = CONFIGS[D]
        extra = dict(DQ_VEC4=bool(dq_vec4))
    gdt = {"fp16": gl.float16, "bf16": gl.bfloat16}[dtype_str]
    q_layout, kv_layout = _layouts(D, BM, BN, gdt)
    fn = attn_bwd_kernel
    qd = f"tensordesc<{dtype_str}[{BM}, {D}],{q_layout!r}>"
    kd = f"tensordesc<{dtype_str}[{BN}, {D}],{kv_layout!r}>"
    vd = f"tensordesc<fp32[1, {BM}],{_vec_layout()!r}>"
    sig = {"q_desc": qd, "k_desc": kd, "v_desc": kd, "do_desc": qd, "lse_desc": vd, "dlt_desc": vd,
           "dq_ptr": "*fp32", "dk_ptr": f"*{dtype_str}", "dv_ptr": f"*{dtype_str}",
           "sm_scale": "fp32", "qk_scale": "fp32", "seq_len": "i32"}
    consts = dict(HEAD_DIM=D, BLOCK_M=BM, BLOCK_N=BN, NUM_STAGES=NS, CAUSAL=bool(causal), WN=WN,
                  num_warps=NUM_WARPS, **extra)
    for name in consts:
        sig[name] = "constexpr"
    constexprs = {(fn.arg_names.index(n),): v for n, v in consts.items()}
    # torch allocations are 16-byte aligned: matches the JIT's specialisation on the GPU.
    attrs = {(fn.arg_names.index(n),): [["tt.divisibility", 16]]
             for n in ("dq_ptr", "dk_ptr", "dv_ptr")}
    src = GluonASTSource(fn, sig, constexprs=constexprs, attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", 90, 32),
                          options={"num_warps": NUM_WARPS, "maxnreg": MAXNREG})


def _ptx_evidence(ptx: str):
    lines = [ln.strip() for ln in ptx.splitlines()]
    setmax = sorted(set(re.findall(r"setmaxnreg\.(inc|dec)\.sync\.aligned\.u32\s+(\d+)", ptx)))
    wg = [ln for ln in lines if ln.startswith("wgmma.mma_async")]
    reg_a = sum(1 for ln in wg if re.search(r"\},\s*\{", ln))
    wait_args = sorted(set(re.findall(r"wgmma\.wait_group\.sync\.aligned\s+(\d+)", ptx)))
    # max number of commit groups outstanding at once (straight-line scan; loops aside)
    pending = maxpend = 0
    for ln in lines:
        if ln.startswith("wgmma.commit_group"):
            pending += 1
            maxpend = max(maxpend, pending)
        elif ln.startswith("wgmma.wait_group"):
            n = int(re.search(r"(\d+)", ln.split()[-1]).group(1))
            pending = min(pending, n)
    return dict(setmaxnreg=setmax, wgmma=len(wg), wgmma_reg_a=reg_a,
                wgmma_shapes=sorted(set(re.findall(r"wgmma\.mma_async\.sync\.aligned\.(m\d+n\d+k\d+)", ptx))),
                wait_args=wait_args, max_groups_in_flight=maxpend,
                atom=len(re.findall(r"\batom\.[^\s]*add", ptx)),
                red=len(re.findall(r"\bred\.[^\s]*add", ptx)),
                bar_sync=sum(1 for ln in lines if ln.startswith(("bar.sync", "barrier.sync"))),
                fence_proxy=sum(1 for ln in lines if ln.startswith("fence.proxy.async")))


def compile_check(dump_dir=None, dims=(64, 128, 256), causals=(False, True), extras=True) -> bool:
    """Compile every instantiation; d128 fp16 (causal and not) must pass, the others are
    reported.  extras: also d128 with the v4-atomic dQ re-layout and d128 bf16."""
    ok_required = True
    if dump_dir:
        os.makedirs(dump_dir, exist_ok=True)
    print(f"Gluon FA3-style backward, AOT for sm_90a (triton {triton.__version__})")
    print(f"{'D':>6} {'causal':>6} {'BM/BN/st/WN':>12} {'regs':>5} {'spill st/ld':>12} {'smem KB':>8} "
          f"{'SASS regs':>9} {'setmaxnreg':>20} {'wgmma':>6} {'regA':>5} {'shapes':>24} {'waits':>6} "
          f"{'inflight':>8} {'SASS dQ red':>12} {'bar':>4}")
    insts = [(D, c, "fp16", False) for D in dims for c in causals]
    if extras and 128 in dims:
        insts += [(128, c, "fp16", True) for c in causals] + [(128, True, "bf16", False)]
    for D, causal, dts, vec4 in insts:
        BM, BN, NS, WN = CONFIGS[D]
        tag = f"d{D}_c{int(causal)}" + ("_bf16" if dts == "bf16" else "") + ("_dqv4" if vec4 else "")
        label = f"{D:>4}{'b' if dts == 'bf16' else ' '}{'v' if vec4 else ' '}"
        t0 = time.time()
        try:
            ck = _compile(D, causal, dts, vec4)
        except Exception as e:  # noqa: BLE001 -- report and go on
            root = e
            while root.__cause__ is not None or root.__context__ is not None:
                root = root.__cause__ or root.__context__
            lines = str(root).strip().splitlines()
            print(f"{label} {int(causal):>6} COMPILE ERROR: {type(root).__name__}: "
                  f"{(lines[-1] if lines else '')[:300]}")
            if dump_dir:
                with open(os.path.join(dump_dir, f"err_{tag}.txt"), "w") as f:
                    f.write(str(e))
            if D == 128 and dts == "fp16" and not vec4:
                ok_required = False
            continue
        ptx = ck.asm["ptx"]
        if dump_dir:
            for ext in ("ptx", "ttgir"):
                with open(os.path.join(dump_dir, f"{tag}.{ext}"), "w") as f:
                    f.write(ck.asm[ext])
        pa = gluon_fwd.ptxas_report(ptx)
        sass_red = re.findall(r"\bREDG\.\S*?(F32x\d|F32)\b", pa["sass"])
        ev = _ptx_evidence(ptx)
        ok = pa["ok"] and ev["wgmma"] > 0 and bool(ev["setmaxnreg"])
        if D == 128 and dts == "fp16" and not vec4:
            ok_required &= ok
        spill = f"{pa['spill_stores']}/{pa['spill_loads']}" + (" SERIALIZED" if pa["serialized_wgmma"] else "")
        sass_regs = "?" if pa["sass_max_reg"] is None else f"{pa['sass_max_reg']}" + (
            f" L{pa['sass_local']}" if pa["sass_local"] else "")
        print(f"{label} {int(causal):>6} {f'{BM}/{BN}/{NS}/{WN}':>12} {pa['regs']!s:>5} {spill:>12} "
              f"{ck.metadata.shared / 1024:>8.1f} {sass_regs:>9} "
              f"{','.join(f'{a}{n}' for a, n in ev['setmaxnreg']):>20} {ev['wgmma']:>6} "
              f"{ev['wgmma_reg_a']:>5} {','.join(ev['wgmma_shapes']):>24} "
              f"{','.join(ev['wait_args']):>6} {ev['max_groups_in_flight']:>8} "
              f"{(str(len(sass_red)) + 'x' + ','.join(sorted(set(sass_red)))):>12} {ev['bar_sync']:>4}  ({time.time() - t0:.0f}s)"
              + ("" if pa["ok"] else "  PTXAS FAILED: " + pa["log"][-400:]))
    print("D suffix: b = bf16, v = dQ re-laid out for v4 atomics (--dq-vec4).  "
          "regs: ptxas's kernel-level count (launch bound = maxnreg %d); setmaxnreg then gives the "
          "consumers 240 and the producer 24.  SASS regs: highest register index + 1 in the SASS "
          "('L<n>' = number of LDL/STL local-memory instructions).  regA: wgmmas with a register A "
          "operand (P^T, dS^T).  inflight: max wgmma commit groups outstanding in straight-line "
          "PTX order.  SASS dQ red: REDG.ADD instructions (ptxas turns the unused-result PTX atom "
          "into a fire-and-forget reduction) and their vector width.  bar: bar.sync/barrier.sync "
          "in the PTX." % MAXNREG)
    print("Limitations:\n" + LIMITATIONS)
    return ok_required


def compile_check_variants(names, dims=(128, 256), dump_dir=None) -> bool:
    """--compile-only --variants: AOT-compile every applicable (variant, D, causal) for sm_90a and
    print its ptxas figures.  True when every one compiled with no spills and no serialized
    wgmma (ptxas C75xx)."""
    ok_all = True
    if dump_dir:
        os.makedirs(dump_dir, exist_ok=True)
    print(f"Gluon FA3-style backward variants, AOT for sm_90a (triton {triton.__version__})")
    print(f"{'variant':>12} {'D':>4} {'c':>2} {'BM/BN/st/WN':>12} {'flags':>22} {'regs':>5} {'spill st/ld':>11} "
          f"{'SASS regs':>9} {'smem KB':>8} {'wgmma':>6} {'waits':>6} {'SASS dQ red':>12} {'bar':>4} {'serialized':>10}")
    for name in names:
        for D in dims:
            try:
                BM, BN, NS, WN, extra = variant_config(D, name)
            except ValueError:
                continue
            flags = ",".join(f"{k}={int(v) if isinstance(v, bool) else v}" for k, v in extra.items()
                             if k in ("PIPE", "DQW", "DQ_VEC4", "DQW_WARPS", "WIDE") and v)
            for causal in (False, True):
                t0 = time.time()
                try:
                    ck = _compile(D, causal, variant=name)
                except Exception as e:  # noqa: BLE001
                    root = e
                    while root.__cause__ is not None or root.__context__ is not None:
                        root = root.__cause__ or root.__context__
                    lines = str(root).strip().splitlines()
                    print(f"{name:>12} {D:>4} {int(causal):>2} COMPILE ERROR: {type(root).__name__}: "
                          f"{(lines[-1] if lines else '')[:200]}")
                    ok_all = False
                    continue
                ptx = ck.asm["ptx"]
                if dump_dir:
                    for ext in ("ptx", "ttgir"):
                        with open(os.path.join(dump_dir, f"{name}_d{D}_c{int(causal)}.{ext}"), "w") as f:
                            f.write(ck.asm[ext])
                pa = gluon_fwd.ptxas_report(ptx)
                ev = _ptx_evidence(ptx)
                codes = sorted(set(re.findall(r"\((C75\d\d)\)", pa["log"])))
                sass_red = re.findall(r"\bREDG\.\S*?(F32x\d|F32)\b", pa["sass"])
                good = pa["ok"] and not pa["serialized_wgmma"] and not codes and \
                    not pa["spill_stores"] and not pa["spill_loads"]
                ok_all &= good
                sass_regs = "?" if pa["sass_max_reg"] is None else f"{pa['sass_max_reg']}" + (
                    f" L{pa['sass_local']}" if pa["sass_local"] else "")
                spill = f"{pa['spill_stores']}/{pa['spill_loads']}"
                print(f"{name:>12} {D:>4} {int(causal):>2} {f'{BM}/{BN}/{NS}/{WN}':>12} {flags:>22} "
                      f"{pa['regs']!s:>5} {spill:>11} "
                      f"{sass_regs:>9} {ck.metadata.shared / 1024:>8.1f} {ev['wgmma']:>6} "
                      f"{','.join(ev['wait_args']):>6} "
                      f"{(str(len(sass_red)) + 'x' + ','.join(sorted(set(sass_red)))):>12} {ev['bar_sync']:>4} "
                      f"{(','.join(codes) or 'no'):>10}  ({time.time() - t0:.0f}s)"
                      + ("" if pa["ok"] else "  PTXAS FAILED: " + pa["log"][-300:]))
    print("regs: ptxas's kernel-level count (launch bound, maxnreg %d; setmaxnreg gives the consumers "
          "240, the producer (and DQW writer) 24).  SASS regs: highest register + 1 ('L<n>': "
          "local-memory instructions).  serialized: ptxas 'wgmma serialized' diagnostics (C7510-C7519): "
          "such a build runs every wgmma synchronously." % MAXNREG)
    return ok_all


# --------------------------------------------------------------------------------------------
# GPU check + benchmark
# --------------------------------------------------------------------------------------------
def _one_instantiation(D, causal, sizes, time_sizes, deadline, dq_vec4=False):
    """Child process: correctness (B=2, H=4) against float64 autograd, with torch's fp16 eager
    gradient error as the yardstick, then timings next to cuDNN.  One 'RESULT {json}' a line."""
    import torch
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    dev, dt = "cuda", torch.float16

    emit = proto_child.emit

    def attn(q, k, v, scale, upcast_softmax):
        s = (q @ k.transpose(-1, -2)) * scale
        if causal:
            S = q.shape[-2]
            s = s.masked_fill(~torch.ones(S, S, device=dev, dtype=torch.bool).tril(), float("-inf"))
        p = torch.softmax(s.float(), -1).to(q.dtype) if upcast_softmax else torch.softmax(s, -1)
        return p @ v, s

    torch.manual_seed(0)
    ok_all = True
    for S in sizes:
        if time.time() > deadline:
            print(f"check D={D} causal={int(causal)} S={S}: SKIPPED (time budget)", flush=True)
            continue
        B, H = 2, 4
        scale = 1.0 / math.sqrt(D)
        q, k, v, do = (torch.randn(B, H, S, D, device=dev, dtype=dt) for _ in range(4))
        # float64 reference: O, LSE and gradients
        q64, k64, v64 = (t.double().requires_grad_() for t in (q, k, v))
        o64, s64 = attn(q64, k64, v64, scale, False)
        lse = torch.logsumexp(s64.detach(), -1).float()
        ref = torch.autograd.grad(o64, (q64, k64, v64), do.double())
        o = o64.detach().to(dt).contiguous()
        del o64, s64, q64, k64, v64
        # fp16 eager (fp16 matmuls, fp32 softmax) gradients: the error yardstick
        qh, kh, vh = (t.clone().requires_grad_() for t in (q, k, v))
        oh, _ = attn(qh, kh, vh, scale, True)
        eager = torch.autograd.grad(oh, (qh, kh, vh), do)
        del oh, qh, kh, vh
        try:
            launch, dq, dk, dv = make_gluon_attention_bwd(q, k, v, o, do, lse, causal, scale, dq_vec4)
            proto_child.guarded_first_call(launch, f"D={D} causal={int(causal)} S={S}")
            torch.cuda.synchronize()
        except Exception as e:  # noqa: BLE001
            msg = str(e).strip().splitlines()
            emit(kind="error", D=D, causal=causal, S=S, msg=f"{type(e).__name__}: {msg[-1][:200] if msg else ''}")
            return
        res = dict(kind="check", D=D, causal=causal, S=S)
        ok = True
        for name, ours, r, e16 in zip(("dq", "dk", "dv"), (dq, dk, dv), ref, eager):
            mag = r.abs().max().item()
            err = (ours.double() - r).abs().max().item()
            err16 = (e16.double() - r).abs().max().item()
            nan = bool(torch.isnan(ours).any().item() or torch.isinf(ours).any().item())
            tol = 2 * err16 + 1e-3 * mag
            good = (not nan) and err <= tol
            ok &= good
            res[name] = dict(err=err, eager=err16, mag=mag, tol=tol, nan=nan, ok=good)
        res["ok"] = ok
        ok_all &= ok
        emit(**res)
        del ref, eager, dq, dk, dv, q, k, v, do, o, lse
        torch.cuda.empty_cache()
    if not ok_all:
        return

    # ---- timing: b*s = 16k tokens, hidden 2048 (H = 2048 / D) ----
    H = 2048 // D
    for S in time_sizes:
        if time.time() > deadline:
            print(f"time D={D} causal={int(causal)} S={S}: SKIPPED (time budget)", flush=True)
            continue
        B = 16384 // S
        scale = 1.0 / math.sqrt(D)
        q, k, v, do = (torch.randn(B, H, S, D, device=dev, dtype=dt) for _ in range(4))
        flops = kernel_grid.flops(B, H, S, D, causal, "bwd")
        res = dict(kind="time", D=D, causal=causal, S=S)
        # cuDNN: forward once (graph kept), then time torch.autograd.grad(out, (q, k, v), do,
        # retain_graph=True) -- i.e. the cuDNN backward call alone (incl. its own preprocessing).
        try:
            qc, kc, vc = (t.clone().requires_grad_() for t in (q, k, v))
            with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
                out = F.scaled_dot_product_attention(qc, kc, vc, is_causal=causal, scale=scale)
            ms_ref = triton.testing.do_bench(
                lambda out=out, qc=qc, kc=kc, vc=vc, do=do: torch.autograd.grad(
                    out, (qc, kc, vc), do, retain_graph=True), warmup=10, rep=40)
            res["cudnn"] = flops / ms_ref * 1e-9
            o = out.detach().contiguous()
            del out, qc, kc, vc
        except Exception as e:  # noqa: BLE001
            print(f"cuDNN SDPA failed at S={S}: {type(e).__name__}: {str(e).splitlines()[0][:120]}", flush=True)
            res["cudnn"] = float("nan")
            o = torch.randn_like(q)
        # Timing only: the kernel does the same work for any finite LSE (no data-dependent
        # branches), so log(S) stands in for the real one (which would need an O(S^2) pass).
        lse = torch.full((B, H, S), math.log(S), device=dev, dtype=torch.float32)
        try:
            launch, _, _, _ = make_gluon_attention_bwd(q, k, v, o, do, lse, causal, scale, dq_vec4)
            ms = triton.testing.do_bench(launch, warmup=10, rep=40)
            res["ours"] = flops / ms * 1e-9
        except Exception as e:  # noqa: BLE001
            print(f"timing failed at S={S}: {type(e).__name__}: {(str(e).strip().splitlines() or [''])[-1][:120]}",
                  flush=True)
        emit(**res)
        del q, k, v, do, o, lse
        torch.cuda.empty_cache()


def run_gpu(dims=(128, 64, 256), budget_s=200.0, first_call_timeout=60.0, quick=False, dq_vec4=False):
    """One child process per (D, causal).  The child's first kernel call is hang-guarded (CUDA
    event polling, 20 s); the child as a whole gets a timeout here, and the total stays under
    budget_s (instantiations that no longer fit are skipped, not started)."""
    t_start = time.time()
    insts = [(D, c) for D in dims for c in (False, True)]
    rows = []
    for idx, (D, causal) in enumerate(insts):
        left = budget_s - (time.time() - t_start)
        n_left = len(insts) - idx
        if left < 15:
            print(f"D={D} causal={int(causal)}: SKIPPED (time budget spent)")
            continue
        # fair share of what is left, at least the first-call guard + checks, at most 60 s
        timeout = min(max(first_call_timeout, left / n_left), left - 2, 60.0 if not quick else 45.0)
        deadline_in_child = timeout - 8      # child stops starting new work before the kill
        cmd = [sys.executable, os.path.abspath(__file__), "--one", str(D), str(int(causal)),
               "--child-budget", str(deadline_in_child)] + (["--quick"] if quick else []) + (
                   ["--dq-vec4"] if dq_vec4 and D != 256 else [])
        results, out, err, rc = proto_child.run(cmd, timeout)
        for res in results:
            if res["kind"] == "check":
                parts = " ".join(f"{n} {res[n]['err']:.2e}/{res[n]['eager']:.2e}(tol {res[n]['tol']:.1e},|ref| {res[n]['mag']:.1e})"
                                 + ("NaN" if res[n]["nan"] else "") for n in ("dq", "dk", "dv"))
                print(f"check D={D} causal={int(causal)} S={res['S']:>5}: ours/eager-fp16 {parts} "
                      f"-> {'PASS' if res['ok'] else 'FAIL'}")
            elif res["kind"] == "error":
                print(f"check D={D} causal={int(causal)} S={res['S']}: ERROR {res['msg']}")
            elif res["kind"] == "hang":
                print(f"HANG: {res['what']} did not finish in {res['seconds']:.0f}s (mbarrier deadlock?)")
            else:
                rows.append(res)
        proto_child.report_end(D, causal, results, out, err, rc, timeout)
    print("\nbackward TFLOP/s (2.5 x 4*B*H*S^2*D, /2 causal); ours = dQ zero + preprocess + main + "
          "dQ cast; cuDNN = torch.autograd.grad on the cuDNN SDPA output (retain_graph)")
    print(f"{'D':>4} {'causal':>6} {'S':>6} {'ours':>8} {'cuDNN':>8} {'ratio':>6}")
    for r in rows:
        ours, ref = r.get("ours", float("nan")), r.get("cudnn", float("nan"))
        print(f"{r['D']:>4} {int(r['causal']):>6} {r['S']:>6} {ours:>8.1f} {ref:>8.1f} {ours / ref:>6.2f}")
    print(f"total {time.time() - t_start:.0f}s")


# --------------------------------------------------------------------------------------------
# Speed variants on the GPU: one child per (D, causal) checks every variant and times them all,
# interleaved, on the same inputs (--variants a,b,c)
# --------------------------------------------------------------------------------------------
def variants_for(D, names):
    """The names of `names` that apply to head dim D (unknown names raise KeyError)."""
    out = []
    for n in names:
        try:
            variant_config(D, n)
        except ValueError:
            continue
        out.append(n)
    return out


def _variants_child(D, causal, names, sizes, time_sizes, deadline, rounds, warmup, rep):
    """Child process: gradient check of every variant (B=2, H=4, float64 reference, torch's fp16
    eager error as the yardstick, as _one_instantiation), then timings: per S, `rounds` rounds
    of do_bench over cuDNN and every variant that passed, in an order rotated each round; the
    medians are reported.  One 'RESULT {json}' a line; kind="begin" marks the variant whose
    first call / timing is under way, so that the parent can name the one that hung."""
    import torch
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    dev, dt = "cuda", torch.float16
    emit = proto_child.emit

    def attn(q, k, v, scale, upcast_softmax):
        s = (q @ k.transpose(-1, -2)) * scale
        if causal:
            S = q.shape[-2]
            s = s.masked_fill(~torch.ones(S, S, device=dev, dtype=torch.bool).tril(), float("-inf"))
        p = torch.softmax(s.float(), -1).to(q.dtype) if upcast_softmax else torch.softmax(s, -1)
        return p @ v, s

    def guarded(name, launch, what):
        emit(kind="begin", variant=name, what=what)
        proto_child.guarded_first_call(launch, f"{name} D={D} causal={int(causal)} {what}")
        torch.cuda.synchronize()

    def context_alive():
        """After a variant's exception: a sticky CUDA error (illegal address...) would fail every
        later variant, so exit and let the parent rerun the others without this one."""
        try:
            torch.cuda.synchronize()
            torch.zeros(1, device=dev).add_(1).item()
        except Exception:  # noqa: BLE001
            print("CUDA context unusable after the error above: exiting", flush=True)
            os._exit(4)

    torch.manual_seed(0)
    alive = list(names)
    for S in sizes:
        if time.time() > deadline:
            print(f"check D={D} causal={int(causal)} S={S}: SKIPPED (time budget)", flush=True)
            continue
        B, H = 2, 4
        scale = 1.0 / math.sqrt(D)
        q, k, v, do = (torch.randn(B, H, S, D, device=dev, dtype=dt) for _ in range(4))
        q64, k64, v64 = (t.double().requires_grad_() for t in (q, k, v))
        o64, s64 = attn(q64, k64, v64, scale, False)
        lse = torch.logsumexp(s64.detach(), -1).float()
        ref = torch.autograd.grad(o64, (q64, k64, v64), do.double())
        o = o64.detach().to(dt).contiguous()
        del o64, s64, q64, k64, v64
        qh, kh, vh = (t.clone().requires_grad_() for t in (q, k, v))
        oh, _ = attn(qh, kh, vh, scale, True)
        eager = torch.autograd.grad(oh, (qh, kh, vh), do)
        del oh, qh, kh, vh
        for name in list(alive):
            try:
                launch, dq, dk, dv = make_gluon_attention_bwd(q, k, v, o, do, lse, causal, scale, variant=name)
                guarded(name, launch, f"check S={S}")
            except Exception as e:  # noqa: BLE001 -- compile error etc.: this variant only
                msg = str(e).strip().splitlines()
                emit(kind="error", variant=name, D=D, causal=causal, S=S,
                     msg=f"{type(e).__name__}: {msg[-1][:200] if msg else ''}")
                context_alive()
                alive.remove(name)
                continue
            res = dict(kind="check", variant=name, D=D, causal=causal, S=S)
            ok = True
            for gname, ours, r, e16 in zip(("dq", "dk", "dv"), (dq, dk, dv), ref, eager):
                mag = r.abs().max().item()
                err = (ours.double() - r).abs().max().item()
                err16 = (e16.double() - r).abs().max().item()
                nan = bool(torch.isnan(ours).any().item() or torch.isinf(ours).any().item())
                tol = 2 * err16 + 1e-3 * mag
                good = (not nan) and err <= tol
                ok &= good
                res[gname] = dict(err=err, eager=err16, mag=mag, tol=tol, nan=nan, ok=good)
            res["ok"] = ok
            emit(**res)
            if not ok:
                alive.remove(name)
            del launch, dq, dk, dv
        del ref, eager, q, k, v, do, o, lse
        torch.cuda.empty_cache()

    H = 2048 // D
    for S in time_sizes:
        if time.time() > deadline:
            print(f"time D={D} causal={int(causal)} S={S}: SKIPPED (time budget)", flush=True)
            continue
        B = 16384 // S
        scale = 1.0 / math.sqrt(D)
        q, k, v, do = (torch.randn(B, H, S, D, device=dev, dtype=dt) for _ in range(4))
        flops = kernel_grid.flops(B, H, S, D, causal, "bwd")
        fns = {}
        try:
            qc, kc, vc = (t.clone().requires_grad_() for t in (q, k, v))
            with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
                out = F.scaled_dot_product_attention(qc, kc, vc, is_causal=causal, scale=scale)
            fns["cudnn"] = (lambda out=out, qc=qc, kc=kc, vc=vc, do=do: torch.autograd.grad(
                out, (qc, kc, vc), do, retain_graph=True))
            o = out.detach().contiguous()
        except Exception as e:  # noqa: BLE001
            print(f"cuDNN SDPA failed at S={S}: {type(e).__name__}: {str(e).splitlines()[0][:120]}", flush=True)
            o = torch.randn_like(q)
        # the kernel does the same work for any finite LSE (see _one_instantiation)
        lse = torch.full((B, H, S), math.log(S), device=dev, dtype=torch.float32)
        for name in list(alive):
            try:
                launch, _, _, _ = make_gluon_attention_bwd(q, k, v, o, do, lse, causal, scale, variant=name)
                guarded(name, launch, f"time S={S}")
                fns[name] = launch
            except Exception as e:  # noqa: BLE001
                msg = str(e).strip().splitlines()
                emit(kind="error", variant=name, D=D, causal=causal, S=S,
                     msg=f"{type(e).__name__}: {msg[-1][:200] if msg else ''}")
                context_alive()
                alive.remove(name)
        emit(kind="begin", variant="(timing)", what=f"time S={S}")
        times = {n: [] for n in fns}
        order = list(fns)
        for r in range(rounds):
            if time.time() > deadline and r > 0:
                break
            rot = order[r % len(order):] + order[:r % len(order)]
            for n in rot:
                times[n].append(triton.testing.do_bench(fns[n], warmup=warmup, rep=rep))
        for n, ts in times.items():
            ts = sorted(ts)
            med = ts[len(ts) // 2]
            emit(kind="time", variant=n, D=D, causal=causal, S=S, tflops=flops / med * 1e-9,
                 spread=(ts[-1] - ts[0]) / med, rounds=len(ts))
        del fns, q, k, v, do, o, lse
        torch.cuda.empty_cache()


def run_gpu_variants(names, dims=(128, 256), budget_s=240.0, quick=False, rounds=None):
    """One child per (D, causal), all applicable variants in it; a child that hangs or dies is
    rerun without the variant it was busy with (while the budget allows).  Prints a per-variant
    check summary and a table variant x (D, causal, S) -> TFLOP/s and ratio to cuDNN."""
    t_start = time.time()
    insts = [(D, c) for D in dims for c in (False, True)]
    weights = [len(variants_for(D, names)) + 2 for D, _ in insts]
    rows = {}          # (D, causal) -> {variant: {S: tflops}}
    checks = {}        # (D, causal, variant) -> "PASS" / "FAIL ..." / "ERROR ..." / "HANG ..."
    for idx, (D, causal) in enumerate(insts):
        todo = variants_for(D, names)
        key = (D, causal)
        rows[key] = {}
        while todo:
            left = budget_s - (time.time() - t_start)
            w_left = sum(weights[idx:])
            if left < 20:
                print(f"D={D} causal={int(causal)}: SKIPPED (time budget spent) {todo}")
                for n in todo:
                    checks.setdefault((D, causal, n), "SKIPPED (budget)")
                break
            timeout = min(left - 2, max(40.0, left * weights[idx] / w_left), 150.0)
            cmd = [sys.executable, os.path.abspath(__file__), "--vchild", str(D), str(int(causal)),
                   "--variants", ",".join(todo), "--child-budget", str(timeout - 10),
                   "--rounds", str(rounds)] + (["--quick"] if quick else [])
            results, out, err, rc = proto_child.run(cmd, timeout)
            busy = None
            for res in results:
                kind = res["kind"]
                n = res.get("variant")
                if kind == "begin":
                    busy = n
                elif kind == "check":
                    parts = " ".join(f"{g} {res[g]['err']:.1e}/{res[g]['eager']:.1e}" for g in ("dq", "dk", "dv"))
                    print(f"check D={D} c={int(causal)} S={res['S']:>5} {n:>12}: ours/eager {parts} "
                          f"-> {'PASS' if res['ok'] else 'FAIL'}")
                    prev = checks.get((D, causal, n), "PASS")
                    checks[(D, causal, n)] = prev if res["ok"] else f"FAIL S={res['S']}"
                elif kind == "error":
                    print(f"D={D} c={int(causal)} {n}: ERROR at S={res['S']}: {res['msg']}")
                    checks[(D, causal, n)] = "ERROR " + res["msg"][:60]
                elif kind == "hang":
                    print(f"HANG: {res['what']} did not finish in {res['seconds']:.0f}s (mbarrier deadlock?)")
                elif kind == "time":
                    rows[key].setdefault(n, {})[res["S"]] = res["tflops"]
            proto_child.report_end(D, causal, results, out, err, rc, timeout)
            if rc in (0,):
                break
            # the child died: blame the variant it was busy with, rerun the others
            if busy is None or busy == "(timing)" or busy not in todo:
                print(f"D={D} causal={int(causal)}: child failed (rc={rc}) outside a variant's first call; "
                      f"not rerun")
                break
            checks[(D, causal, busy)] = "HANG/CRASH" if rc in ("timeout", 3) else f"CRASH rc={rc}"
            todo = [n for n in todo if n != busy]
            rows[key] = {}          # timings only from one process: rerun the rest together
            print(f"D={D} causal={int(causal)}: dropping {busy}, rerunning {todo}")

    print("\nbackward TFLOP/s (2.5 x 4*B*H*S^2*D, /2 causal; b*s = 16k, hidden 2048), median of the "
          "rounds, and (ratio to cuDNN).  ours = dQ zero + preprocess + main + dQ cast")
    all_names = [n for n in names]
    for (D, causal), per in rows.items():
        sizes = sorted({S for d in per.values() for S in d})
        if not sizes:
            continue
        ref = per.get("cudnn", {})
        print(f"\nD={D} causal={int(causal)}")
        print(f"{'variant':>12} {'check':>10} " + " ".join(f"{f'S={S}':>16}" for S in sizes))
        for n in ["cudnn"] + [n for n in all_names if n in per or (D, causal, n) in checks]:
            d = per.get(n, {})
            cells = []
            for S in sizes:
                if S in d:
                    r = d[S] / ref[S] if S in ref and ref[S] > 0 else float("nan")
                    cells.append(f"{d[S]:>8.1f} ({r:4.2f})" if n != "cudnn" else f"{d[S]:>8.1f}       ")
                else:
                    cells.append(f"{'-':>16}")
            chk = "" if n == "cudnn" else checks.get((D, causal, n), "?")
            print(f"{n:>12} {chk[:10]:>10} " + " ".join(cells))
    print(f"total {time.time() - t_start:.0f}s")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--compile-only", action="store_true")
    ap.add_argument("--emulate", action="store_true", help="CPU emulation of the blocking/masks")
    ap.add_argument("--dims", default=None, help="head dims (comma list; default 64,128,256, "
                    "with --variants 128,256)")
    ap.add_argument("--dump", default=None, help="with --compile-only: write PTX/TTGIR here")
    ap.add_argument("--quick", action="store_true",
                    help="check S=128,1000 only; time S=2048,16384 (with --variants: 2048,8192)")
    ap.add_argument("--dq-vec4", action="store_true",
                    help="GPU mode: dQ atomics as v4 over whole rows (smem re-layout; not d256)")
    ap.add_argument("--variants", default=None,
                    help="speed variants to check + time side by side (comma list of %s; 'all' = "
                         "%s, e.g. all,wide); with --compile-only: their ptxas figures" % (",".join(VARIANTS), DEFAULT_VARIANTS))
    ap.add_argument("--rounds", type=int, default=None, help="--variants: timing rounds (3 quick, 5)")
    ap.add_argument("--one", nargs=2, type=int, metavar=("D", "CAUSAL"), help=argparse.SUPPRESS)
    ap.add_argument("--vchild", nargs=2, type=int, metavar=("D", "CAUSAL"), help=argparse.SUPPRESS)
    ap.add_argument("--child-budget", type=float, default=50.0, help=argparse.SUPPRESS)
    ap.add_argument("--budget", type=float, default=None, help="seconds for the whole GPU run "
                    "(default 200; with --variants 240)")
    args = ap.parse_args()
    names = None
    if args.variants:
        names = []
        for n in args.variants.split(","):
            for m in (DEFAULT_VARIANTS.split(",") if n == "all" else [n]):
                if m and m not in names:
                    names.append(m)
        for n in names:
            if n not in VARIANTS:
                ap.error(f"unknown variant {n!r} (known: {', '.join(VARIANTS)})")
    dims = tuple(int(x) for x in (args.dims or ("128,256" if names else "64,128,256")).split(",") if x)
    if args.emulate:
        sys.exit(0 if emulate_check() else 1)
    if args.compile_only:
        if names:
            sys.exit(0 if compile_check_variants(names, dims, args.dump) else 1)
        sys.exit(0 if compile_check(args.dump, dims) else 1)
    if args.vchild:
        sizes = (128, 1000) if args.quick else (128, 1000, 4097)
        tsizes = (2048, 8192) if args.quick else (2048, 4096, 8192, 16384)
        rounds = args.rounds or (3 if args.quick else 5)
        _variants_child(args.vchild[0], bool(args.vchild[1]), names, sizes, tsizes,
                        time.time() + args.child_budget, rounds,
                        warmup=5 if args.quick else 10, rep=20 if args.quick else 40)
        return
    if args.one:
        sizes = (128, 1000) if args.quick else (128, 1000, 4097)
        tsizes = (2048, 16384) if args.quick else (2048, 4096, 8192, 16384)
        _one_instantiation(args.one[0], bool(args.one[1]), sizes, tsizes, time.time() + args.child_budget,
                           dq_vec4=args.dq_vec4)
        return
    if names:
        run_gpu_variants(names, dims=tuple(sorted(dims, key=lambda d: (d != 128, d))),
                         budget_s=args.budget or 240.0, quick=args.quick,
                         rounds=args.rounds or (3 if args.quick else 5))
        return
    # d128 first (the one that matters), then d64, then d256
    run_gpu(dims=tuple(sorted(dims, key=lambda d: (d != 128, d))), budget_s=args.budget or 200.0,
            quick=args.quick, dq_vec4=args.dq_vec4)


if __name__ == "__main__":
    main()
