"""Host side of the Gluon attention forward (kernels/triton/gluon_fwd.py.tmpl), the Triton
implementation's forward on sm_90 where triton_impl.gluon_supports() accepts the call.

The kernel (an FA3-style warp-specialised forward: TMA producer warp, two consumer warpgroups
in pingpong, async wgmma with the softmax under the PV GEMM) is described in its template.
Here: tiles, shared layouts, the 4-D TMA descriptors over the tensors' own strides, the launch,
and an AOT compile for sm_90a that needs no GPU (tests, scripts/gluon_fwd_proto.py).
"""
from __future__ import annotations

import functools

import torch

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
    return out


def _desc(t: torch.Tensor, rows: int, layout):
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor
    return TensorDescriptor(t, list(t.shape), tma_strides(t), [1, 1, rows, t.shape[-1]], layout)


def prepare(q, k, v, scale: float, causal: bool, bottom_right: bool, out=None, lse=None):
    """Descriptors and outputs for one call (the caller has checked gluon_supports).  Returns
    (launch, out, lse): launch() runs the kernel into out [B, Hq, Sq, D] (contiguous, q's dtype)
    and lse [B, Hq, Sq] (fp32, natural log).  Built once, launched many times by benchmarks."""
    B, Hq, Sq, D = q.shape
    Hk, Sk = k.shape[1], k.shape[2]
    BM, BN, NS = CONFIGS[D]
    if out is None:
        out = torch.empty(B, Hq, Sq, D, dtype=q.dtype, device=q.device)
    if lse is None:
        lse = torch.empty(B, Hq, Sq, dtype=torch.float32, device=q.device)
    ql, kl = layouts(D, DTYPES[q.dtype])
    descs = (_desc(q, BM // 2, ql), _desc(k, BN, kl), _desc(v, BN, kl), _desc(out, BM // 2, ql))
    off = (Sk - Sq) if (causal and bottom_right) else 0
    grid = ((Sq + BM - 1) // BM, B * Hq)
    kern = kernel_module().attn_fwd_kernel
    qk_scale = float(scale) * LOG2E

    def launch():
        kern[grid](*descs, lse, qk_scale, Sq, Sk, Hq, Hq // Hk, off,
                   D, BM, BN, NS, bool(causal), num_warps=NUM_WARPS, maxnreg=MAXNREG)

    return launch, out, lse


def forward(q, k, v, scale: float, spec):
    """out, lse of the contract for a call gluon_supports() accepted."""
    launch, out, lse = prepare(q, k, v, scale, spec.causal, spec.align == "bottom_right")
    launch()
    return out, lse


def aot_compile(D: int, causal: bool, dtype_name: str = "fp16"):
    """Compile one instantiation for sm_90a without a GPU: the Gluon AST source built by hand (a
    Gluon tensor descriptor's signature string carries its NVMMASharedLayout) and
    triton.compile with an explicit GPUTarget.  The signature is the one the JIT launches."""
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
           "causal_off": "i32"}
    consts = dict(HEAD_DIM=D, BLOCK_M=BM, BLOCK_N=BN, NUM_STAGES=NS, CAUSAL=bool(causal),
                  num_warps=NUM_WARPS)
    for name in consts:
        sig[name] = "constexpr"
    constexprs = {(fn.arg_names.index(n),): val for n, val in consts.items()}
    attrs = {(fn.arg_names.index("lse_ptr"),): [["tt.divisibility", 16]]}
    src = GluonASTSource(fn, sig, constexprs=constexprs, attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", 90, 32),
                          options={"num_warps": NUM_WARPS, "maxnreg": MAXNREG})


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
