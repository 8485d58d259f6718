"""Host side of the Gluon attention forward (kernels/triton/gluon_fwd.py.tmpl), the Triton
implementation's forward on sm_90 where triton_impl.gluon_supports() accepts the call.

The kernel (an FA3-style warp-specialised forward: TMA producer warp, two consumer warpgroups
in pingpong, async wgmma with the softmax under the PV GEMM) is described in its template.
Here: tiles, shared layouts, the 4-D TMA descriptors over the tensors' own strides, the launch,
and an AOT compile for sm_90a that needs no GPU (tests, scripts/gluon_fwd_proto.py).

Persistent variant (PERSISTENT constexpr; `persistent=` on prepare / forward / aot_compile; by
default for causal calls of >= 2048 query rows, persistent_default()): one CTA per SM, each
looping over a static list of tiles; tile_schedule() is the kernel's tile order in Python and
choose_schedule() picks the order and grid for a call (the reasons are in the template's header).

Launches go through FwdPlan (one per call signature, remembered by forward(); prepare() builds
one for benchmarks and tests), whose kernel launches directly after the first call
(ops/fast_launch.py).
"""
from __future__ import annotations

import functools

import torch

from .signature_cache import SignatureCache

LOG2E = 1.4426950408889634

# Tiles per head dim: (BLOCK_M, BLOCK_N, NUM_STAGES).  Shared memory (16-bit types):
#   d128: Q 2x16K + K 2x32K + V 2x32K = 160 KB
#   d256: Q 2x32K + K 2x32K + V 2x32K = 192 KB  (BLOCK_N 80 would need 224 KB + scratch)
CONFIGS = {128: (128, 128, 2), 256: (128, 64, 2)}
HEAD_DIMS = tuple(CONFIGS)
# Default (consumer WG0) partition warps; the CTA has 12 (WG1 and the producer padded to a
# warpgroup): 168 * 384 threads fills the 64K register file, setmaxnreg then gives the
# consumers 240 each and the producer 24 ((168 * 12 - 24 * 4) / 8 = 240).
NUM_WARPS = 4
MAXNREG = 168
DTYPES = {torch.float16: "fp16", torch.bfloat16: "bf16"}
# The persistent grid (one CTA per SM, looping over tiles) instead of one CTA per query tile:
# by default for causal calls with at least this many query rows.  Measured on the H100 (session
# 10 device run 3, scripts/gluon_fwd_proto.py, fp16, b*s = 16k, persistent / tile grid, medians
# of three interleaved rounds): causal +2..+7% at d128 1k-16k and +2..+9% at d256 2k-16k, but
# -6% at d256 causal 1k; non-causal -3..+3% at d128 and -2..-8% at d256 (no imbalance to win
# back, and the register stores of O cost more than the boundary overlap saves).
PERSISTENT_CAUSAL_MIN_SQ = 2048


def persistent_default(causal: bool, Sq: int) -> bool:
    """Whether prepare() takes the persistent grid when not told (the measured rule above)."""
    return bool(causal) and Sq >= PERSISTENT_CAUSAL_MIN_SQ

# Tile orders of the persistent kernel (its `sched` argument; the template's SCHED_*).
SCHED_HEAD, SCHED_PAIRS, SCHED_LPT = 0, 1, 2
SCHED_NAMES = {SCHED_HEAD: "head", SCHED_PAIRS: "pairs", SCHED_LPT: "lpt"}
# Causal LPT needs this many query tiles of one KV head in every wave of CTAs (they stream the
# same K/V blocks in lockstep, so L2 serves all but one), unless all of K and V fits L2 anyway.
LPT_MIN_TILES_PER_KV_HEAD = 4
L2_KV_BYTES = 24 << 20


def kernel_module():
    from ..codegen import triton_render
    return triton_render.load("gluon_fwd")


def _gl_dtype(name: str):
    from triton.experimental.gluon import language as gl
    return {"fp16": gl.float16, "bf16": gl.bfloat16}[name]


@functools.lru_cache(maxsize=None)
def layouts(D: int, dtype_name: str):
    """(Q/O layout, K/V layout): NVMMA shared layouts of the 4-D boxes [1, 1, rows, D] (128-byte
    swizzle for these head dims; the kernel reshapes the tiles to 2-D for wgmma)."""
    from triton.experimental.gluon import language as gl
    BM, BN, _ = CONFIGS[D]
    gdt = _gl_dtype(dtype_name)
    return (gl.NVMMASharedLayout.get_default_for([1, 1, BM // 2, D], gdt),
            gl.NVMMASharedLayout.get_default_for([1, 1, BN, D], gdt))


def tma_strides(t: torch.Tensor):
    """t's strides for a TMA descriptor, or None when TMA cannot read t: last dim contiguous,
    base 16-byte aligned, other strides positive 16-byte multiples.  The stride of a size-1 dim
    is never used to address; it is replaced by one that satisfies the rule."""
    if t.stride(-1) != 1 or t.data_ptr() % 16:
        return None
    es = t.element_size()
    out = list(t.stride())
    for i in reversed(range(t.dim() - 1)):   # inner dims first: a size-1 dim looks inward
        if t.shape[i] == 1:
            out[i] = max([out[j] * t.shape[j] for j in range(i + 1, t.dim())] + [16 // es])
        elif out[i] <= 0 or (out[i] * es) % 16:
            return None
    for i in range(t.dim() - 1):
        if (out[i] * es) % 16:
            return None
    return tuple(out)   # hashable: plans are keyed by it


def tile_schedule(num_m: int, num_bh: int, n_progs: int, sched: int):
    """The persistent kernel's tile order (_sched_iters / _sched_tile of the template, the same
    integer arithmetic): for each CTA pid < n_progs the list of (m_blk, bh) it runs, in order.
    Tiles are the num_m query tiles of each of the num_bh (batch, head) pairs; every tile appears
    exactly once over all CTAs (tests/test_gluon_fwd.py).

      SCHED_HEAD:  tile t = pid + i * n_progs, head-major (t // num_m is bh), the heavy end of a
                   head first.  Non-causal: every tile costs the same, so round robin is
                   balanced, and a wave of CTAs holds all tiles of a few heads, which stream the
                   same K/V blocks in lockstep (one DRAM read serves them all from L2).
      SCHED_PAIRS: unit u = pid + i * n_progs is (bh = u // P, i = u % P), P = ceil(num_m / 2);
                   a CTA runs the unit's heavy tile num_m - 1 - i, then its light tile i (absent
                   when they coincide, num_m odd).  Causal: a pair costs about the same as any
                   other (n + 1 key blocks of a square top-left head), so the static round robin
                   stays balanced, and units are head-major as above (K/V shared in L2).
      SCHED_LPT:   longest first over all heads: wave w holds tiles t = w * n_progs + pos,
                   m_blk = num_m - 1 - t // num_bh, bh = t % num_bh fastest, and the CTA at
                   position pos is pid on even waves, n_progs - 1 - pid on odd ones (snake: a
                   CTA that got one of the heavier tiles of a wave gets one of the lighter ones
                   of the next).  Best balance, but a wave holds every head: used when a wave
                   still keeps several tiles of each KV head together (choose_schedule)."""
    out = []
    n_tiles = num_m * num_bh
    for pid in range(n_progs):
        tiles = []
        if sched == SCHED_PAIRS:
            n_pairs = (num_m + 1) // 2
            n_units = num_bh * n_pairs
            n_iter = 2 * (-(-max(n_units - pid, 0) // n_progs))
        elif sched == SCHED_LPT:
            n_iter = -(-n_tiles // n_progs)
        else:
            n_iter = -(-max(n_tiles - pid, 0) // n_progs)
        for it in range(n_iter):
            if sched == SCHED_PAIRS:
                u = pid + (it // 2) * n_progs
                bh, i = divmod(u, n_pairs)
                heavy = num_m - 1 - i
                half = it % 2
                m_blk = heavy - half * (heavy - i)
                valid = i < heavy or half == 0
            elif sched == SCHED_LPT:
                pos = pid + (it % 2) * (n_progs - 1 - 2 * pid)
                t = it * n_progs + pos
                valid = t < n_tiles
                m_blk, bh = num_m - 1 - t // num_bh, t % num_bh
            else:
                t = pid + it * n_progs
                bh, m_blk = t // num_m, num_m - 1 - t % num_m
                valid = t < n_tiles
            if valid:
                tiles.append((m_blk, bh))
        out.append(tiles)
    return out


def choose_schedule(B: int, Hq: int, Hk: int, Sq: int, Sk: int, D: int, causal: bool,
                    elem_bytes: int, num_sms: int):
    """(sched, n_progs) of the persistent launch.  Never more CTAs than tiles (then each runs
    one).  Non-causal: SCHED_HEAD.  Causal: SCHED_LPT (longest first, snake) where it keeps L2
    reuse: each wave of n_progs tiles still holds >= LPT_MIN_TILES_PER_KV_HEAD tiles of every
    KV head, or all of K and V fits L2; else SCHED_PAIRS (balanced pairs, head-major)."""
    BM = CONFIGS[D][0]
    n_tiles = -(-Sq // BM) * B * Hq
    n_progs = max(1, min(int(num_sms), n_tiles))
    if not causal:
        return SCHED_HEAD, n_progs
    kv_bytes = B * Hk * Sk * D * elem_bytes * 2
    if n_tiles <= n_progs or B * Hk * LPT_MIN_TILES_PER_KV_HEAD <= n_progs or kv_bytes <= L2_KV_BYTES:
        return SCHED_LPT, n_progs
    return SCHED_PAIRS, n_progs


@functools.lru_cache(maxsize=None)
def _num_sms(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


class FwdPlan:
    """One forward call signature's launch, worked out once: the grid and schedule, the
    descriptors' shapes / strides / layouts and the kernel's scalars.  __call__ runs it for
    tensors of that signature (the kernel launched through fast_launch.Launch: the JIT on the
    first call, directly afterwards).  Arguments as prepare(); out_strides: the TMA strides
    of the out tensors the calls pass (None: a contiguous out, allocated per call)."""

    def __init__(self, q, k, v, scale: float, causal: bool, bottom_right: bool, persistent=None,
                 num_ctas=None, sched=None, strides=None, out_strides=None):
        from . import fast_launch
        B, Hq, Sq, D = q.shape
        Hk, Sk = k.shape[1], k.shape[2]
        BM, BN, NS = CONFIGS[D]
        if persistent is None:
            persistent = persistent_default(causal, Sq)
        self.out_shape, self.lse_shape = (B, Hq, Sq, D), (B, Hq, Sq)
        ql, kl = layouts(D, DTYPES[q.dtype])
        if strides is None:
            strides = tuple(tma_strides(t) for t in (q, k, v))
        if out_strides is None:
            out_strides = _contiguous_tma_strides(self.out_shape)
        # (shape, strides, box, layout) of the q, k, v and out descriptors
        self.descs = tuple((list(t.shape), list(st), [1, 1, rows, D], lay) for t, st, rows, lay in (
            (q, strides[0], BM // 2, ql), (k, strides[1], BN, kl), (v, strides[2], BN, kl)))
        self.descs += ((list(self.out_shape), list(out_strides), [1, 1, BM // 2, D], ql),)
        off = (Sk - Sq) if (causal and bottom_right) else 0
        # O's strides in units of 8 elements (16 bytes: the TMA rule guarantees the multiple),
        # for the persistent kernel's register stores of O.
        o_strides8 = [st // 8 for st in out_strides[:3]]
        if persistent:
            if num_ctas is None:
                dev = q.device.index if q.device.index is not None else torch.cuda.current_device()
                num_ctas = _num_sms(dev)
            auto_sched, n_progs = choose_schedule(B, Hq, Hk, Sq, Sk, D, causal, q.element_size(), num_ctas)
            sched = auto_sched if sched is None else int(sched)
            grid = (n_progs,)
        else:
            sched = SCHED_HEAD
            grid = ((Sq + BM - 1) // BM, B * Hq)
        self.grid, self.sched, self.persistent = grid, sched, bool(persistent)
        self.scalars = (float(scale) * LOG2E, Sq, Sk, Hq, Hq // Hk, off)
        self.tail = (o_strides8[0], o_strides8[1], o_strides8[2], B * Hq, sched,
                     D, BM, BN, NS, bool(causal), bool(persistent))
        self.kernel = fast_launch.Launch(kernel_module().attn_fwd_kernel, grid, num_warps=NUM_WARPS,
                                         maxnreg=MAXNREG)

    def __call__(self, q, k, v, out=None, lse=None):
        if out is None:
            out = torch.empty(self.out_shape, dtype=q.dtype, device=q.device)
        if lse is None:
            lse = torch.empty(self.lse_shape, dtype=torch.float32, device=q.device)
        kern = self.kernel
        kern(*kern.descriptors((q, k, v, out), self.descs), lse, *self.scalars, out, *self.tail)
        return out, lse


def _contiguous_tma_strides(shape) -> list:
    """tma_strides of a contiguous tensor of this shape (16-bit elements), without one."""
    st, acc = [], 1
    for n in reversed(shape):
        st.append(acc)
        acc *= n
    st = st[::-1]
    for i in reversed(range(len(shape) - 1)):   # size-1 dims: as tma_strides replaces them
        if shape[i] == 1:
            st[i] = max([st[j] * shape[j] for j in range(i + 1, len(shape))] + [8])
    return st


def prepare(q, k, v, scale: float, causal: bool, bottom_right: bool, out=None, lse=None,
            persistent=None, num_ctas=None, sched=None, strides=None):
    """Descriptors and outputs for one call (the caller has checked gluon_supports).  Returns
    (launch, out, lse): launch() runs the kernel into out [B, Hq, Sq, D] (q's dtype, TMA-
    writable strides; allocated contiguous when None) and lse [B, Hq, Sq] (fp32, natural log).
    Built once, launched many times by benchmarks.
    persistent: None -> persistent_default(causal, Sq).  num_ctas / sched (persistent only, tests and
    benchmarks): the grid (default: the device's SM count, at most the tile count) and the
    tile order (default: choose_schedule).  strides: tma_strides of (q, k, v) when the caller
    has them (triton_impl's check works them out once per call)."""
    B, Hq, Sq, D = q.shape
    if out is None:
        out = torch.empty(B, Hq, Sq, D, dtype=q.dtype, device=q.device)
    if lse is None:
        lse = torch.empty(B, Hq, Sq, dtype=torch.float32, device=q.device)
    out_strides = tma_strides(out)
    if out_strides is None:
        raise ValueError(f"out strides {tuple(out.stride())} / alignment not TMA-writable (needs the last dim "
                         "contiguous, other strides 16-byte multiples, a 16-byte aligned base)")
    plan = FwdPlan(q, k, v, scale, causal, bottom_right, persistent, num_ctas, sched, strides,
                   out_strides=out_strides)

    def launch():
        plan(q, k, v, out, lse)

    launch.grid, launch.sched, launch.persistent = plan.grid, plan.sched, plan.persistent
    return launch, out, lse


# FwdPlans by call signature (forward()): the host work of a repeated call is a dict lookup.
_PLANS = SignatureCache(1024)


def forward(q, k, v, scale: float, spec, persistent=None, strides=None):
    """out, lse of the contract for a call gluon_supports() accepted (persistent: None ->
    persistent_default(causal, Sq)).  strides: tma_strides of (q, k, v) when the caller has
    them.  The plan is remembered per call signature (shapes, TMA strides, dtype, device, scale,
    the spec's causal alignment, persistent)."""
    if strides is None:
        strides = tuple(tma_strides(t) for t in (q, k, v))
    causal, br = spec.causal, spec.align == "bottom_right"
    key = (q.shape, k.shape, v.shape, strides, q.dtype, q.device, float(scale), causal, br, persistent)
    plan = _PLANS.get_or_build(key, lambda: FwdPlan(q, k, v, scale, causal, br, persistent=persistent,
                                                    strides=strides))
    return plan(q, k, v)


def aot_compile(D: int, causal: bool, dtype_name: str = "fp16", persistent: bool = False, num_sms: int = 132):
    """Compile one instantiation for sm_90a without a GPU: the Gluon AST source built by hand (a
    Gluon tensor descriptor's signature string carries its NVMMASharedLayout) and
    triton.compile with an explicit GPUTarget.  The signature is the one the JIT launches.
    persistent: the persistent kernel (PERSISTENT constexpr).  num_sms: the persistent grid the launch would use
    (132 on an H100 SXM); the kernel reads its grid through gl.num_programs, so the binary does
    not depend on it and one compile serves any SM count: it is recorded on the result as
    `persistent_grid` (None for the tile grid) for reports."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.experimental.gluon._runtime import GluonASTSource
    BM, BN, NS = CONFIGS[D]
    ql, kl = layouts(D, dtype_name)
    fn = kernel_module().attn_fwd_kernel
    qd = f"tensordesc<{dtype_name}[1, 1, {BM // 2}, {D}],{ql!r}>"
    kd = f"tensordesc<{dtype_name}[1, 1, {BN}, {D}],{kl!r}>"
    sig = {"q_desc": qd, "k_desc": kd, "v_desc": kd, "o_desc": qd, "lse_ptr": "*fp32",
           "qk_scale": "fp32", "seq_q": "i32", "seq_k": "i32", "num_heads": "i32", "group": "i32",
           "causal_off": "i32", "o_ptr": f"*{dtype_name}", "o_stride_b8": "i32", "o_stride_h8": "i32",
           "o_stride_m8": "i32", "num_bh": "i32", "sched": "i32"}
    consts = dict(HEAD_DIM=D, BLOCK_M=BM, BLOCK_N=BN, NUM_STAGES=NS, CAUSAL=bool(causal),
                  PERSISTENT=bool(persistent), num_warps=NUM_WARPS)
    for name in consts:
        sig[name] = "constexpr"
    constexprs = {(fn.arg_names.index(n),): val for n, val in consts.items()}
    # the JIT's specialisation of the two pointers (torch allocations are 16-byte aligned)
    attrs = {(fn.arg_names.index(n),): [["tt.divisibility", 16]] for n in ("lse_ptr", "o_ptr")}
    src = GluonASTSource(fn, sig, constexprs=constexprs, attrs=attrs)
    ck = triton.compile(src, target=GPUTarget("cuda", 90, 32),
                        options={"num_warps": NUM_WARPS, "maxnreg": MAXNREG})
    ck.persistent_grid = int(num_sms) if persistent else None
    return ck


def ptxas_report(ptx: str) -> dict:
    """Assemble PTX for sm_90a with ptxas -v ($PTXAS or the one Triton ships) and read the SASS:
    regs (the launch bound, = MAXNREG), spill store/load bytes, static smem, the highest register
    the SASS touches + 1 (what the setmaxnreg'd consumers really use) and its local-memory
    instructions (LDL/STL), and the SASS text itself.  Compile evidence for tests and the
    scripts/gluon_*_proto.py compile checks."""
    import os
    import re
    import subprocess
    import tempfile
    import triton
    from triton.backends.nvidia.compiler import get_ptxas
    ptxas = os.environ.get("PTXAS") or get_ptxas(90).path
    cuobjdump = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.TemporaryDirectory() as d:
        src, cubin = os.path.join(d, "k.ptx"), os.path.join(d, "k.cubin")
        with open(src, "w") as f:
            f.write(ptx)
        r = subprocess.run([ptxas, "-arch=sm_90a", "-v", src, "-o", cubin], capture_output=True, text=True)
        sass = ""
        if r.returncode == 0 and os.path.exists(cuobjdump):
            sass = subprocess.run([cuobjdump, "-sass", cubin], capture_output=True, text=True).stdout
    log = r.stdout + r.stderr

    def num(pat):
        m = re.search(pat, log)
        return int(m.group(1)) if m else None
    sass_regs = [int(x) for x in re.findall(r"\bR(\d+)\b", sass)]
    return dict(ok=r.returncode == 0, log=log, ptxas=ptxas, regs=num(r"Used (\d+) registers"),
                spill_stores=num(r"(\d+) bytes spill stores"), spill_loads=num(r"(\d+) bytes spill loads"),
                stack=num(r"(\d+) bytes stack frame"), smem_static=num(r"(\d+) bytes smem"),
                sass_max_reg=(max(sass_regs) + 1) if sass_regs else None,
                sass_local=len(re.findall(r"\b(?:LDL|STL)(?:\.\w+)*\b", sass)) if sass else None,
                serialized_wgmma="serialized" in log, sass=sass)


def ptx_evidence(ptx: str) -> dict:
    """What the PTX shows of the FA3 structure: setmaxnreg (warp specialisation with register
    budgets), wgmma count, register-A wgmmas (P V from registers) and whether a wgmma group is
    committed while another is outstanding (S_j and P_{j-1} V_{j-1} in flight together)."""
    import re
    lines = [ln.strip() for ln in ptx.splitlines()]
    overlapped = pending = False
    for ln in lines:
        if ln.startswith("wgmma.commit_group"):
            overlapped |= pending
            pending = True
        elif ln.startswith("wgmma.wait_group"):
            pending = False
    return dict(
        setmaxnreg=sorted(set(re.findall(r"setmaxnreg\.(inc|dec)\.sync\.aligned\.u32\s+(\d+)", ptx))),
        wgmma=sum(1 for ln in lines if ln.startswith("wgmma.mma_async")),
        wgmma_reg_a=sum(1 for ln in lines if ln.startswith("wgmma.mma_async") and re.search(r"\},\s*\{", ln)),
        wait_group_args=sorted(set(re.findall(r"wgmma\.wait_group\.sync\.aligned\s+(\d+)", ptx))),
        two_groups_in_flight=overlapped,
        tma_4d=bool(re.search(r"cp\.async\.bulk\.tensor\.4d", ptx)))
