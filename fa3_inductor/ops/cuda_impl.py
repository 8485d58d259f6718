"""The CUDA (CuTe, sm_90a) forward behind the op; the backward is the Triton one.

`supports()` is where the kernel for a call's configuration is built (first use: one nvcc run,
then the on-disk cache), so that a missing toolchain or a failed compile turns into "not
supported" and dispatch falls back to Triton; such problems are logged once per reason.
FA3_DISABLE_CUDA=1 switches the template off (a kill switch while it is validated on hardware).
"""
from __future__ import annotations

import dataclasses
import functools
import logging
import math
import os

import torch

from ..codegen import cuda_jit
from ..spec import AttentionSpec, dtype_name

log = logging.getLogger("fa3_inductor")

_INT_MAX = 2**31 - 1
_WINDOW_CAP = 2**30            # windows wider than any sequence behave the same; keeps int32 maths safe
_failed: dict = {}             # KernelConfig -> reason its build failed
_logged: set = set()


def _log_once(reason: str) -> None:
    if reason not in _logged:
        _logged.add(reason)
        log.warning("fa3: CUDA template unavailable, using Triton instead: %s", reason.splitlines()[0])


def config_for_call(q: torch.Tensor, spec: AttentionSpec, head_dim_v: int | None = None,
                    **ablation) -> cuda_jit.KernelConfig:
    return cuda_jit.config_for(
        q.shape[-1], dtype_name(q.dtype), out_fp32=spec.out_torch_dtype == torch.float32,
        has_wl=spec.window_left is not None, has_wr=spec.window_right is not None,
        softcap=bool(spec.softcap), head_dim_v=head_dim_v, **ablation)


def _launch_config(q, k, v, spec: AttentionSpec, pack_gqa: bool = True, **ablation):
    """(KernelConfig, packed rows per head or 0) of a call, k/v after _shared_kv_head: what
    supports() builds is what forward() launches."""
    ablation = dict(ablation)
    want_cluster = ablation.pop("cluster", None)  # None: the launch policy decides
    cfg = config_for_call(q, spec, v.shape[-1], **ablation)
    pack = packed_gqa_rows(q, k.shape[1], spec, cfg.block_m) if pack_gqa else 0
    if pack:
        return dataclasses.replace(cfg, pack_gqa=True), pack
    mask = cuda_jit.mask_kind(spec.window_left is not None, spec.window_right is not None)
    bn, persistent, cluster = cuda_jit.launch_policy(q.shape[-1], k.shape[2], mask=mask, head_dim_v=v.shape[-1])
    if bn and not ({"block_n", "block_m", "stages"} & ablation.keys()):  # benchmark overrides win
        cfg = config_for_call(q, spec, v.shape[-1], block_n=bn, **ablation)
    # (fp32 output leaves from registers: no O staging to overlap, no measured gain there)
    if persistent and "persistent" not in ablation and not cfg.out_fp32:
        cfg = dataclasses.replace(cfg, persistent=True)
    # K/V multicast pairs m blocks 2c, 2c + 1 of one head: unmasked calls over an even number of
    # m blocks (otherwise the single-CTA kernel runs; the launcher refuses an odd count).
    if (cluster if want_cluster is None else want_cluster) and cuda_jit.cluster_fits(cfg, q.shape[2]):
        cfg = dataclasses.replace(cfg, cluster=True)
    return cfg, 0


def _tma_ok(t: torch.Tensor) -> str | None:
    """TMA needs a contiguous last dim, 16-byte aligned base and 16-byte multiple strides."""
    if t.stride(-1) != 1:
        return "last dim not contiguous"
    if t.data_ptr() % 16:
        return "base address not 16-byte aligned"
    es = t.element_size()
    for dim in range(3):
        if t.shape[dim] > 1 and (t.stride(dim) * es) % 16:
            return f"stride of dim {dim} not a multiple of 16 bytes"
        if t.shape[dim] > 1 and t.stride(dim) == 0:
            return f"zero stride on dim {dim}"
    return None


def platform_problem(q) -> str | None:
    """Why no CUDA template can run on q's device at all (the 16-bit and FP8 paths share it)."""
    if os.environ.get("FA3_DISABLE_CUDA", "0") not in ("", "0"):
        return "disabled by FA3_DISABLE_CUDA"
    if q.device.type != "cuda":
        return "not a CUDA tensor"
    if torch.cuda.get_device_capability(q.device) != (9, 0):
        return "needs sm_90 (Hopper)"
    return None


def size_problem(q, k) -> str | None:
    """The launcher's grid (batch, heads at most 65535) and int32 index limits."""
    B, Hq, Sq, _ = q.shape
    if B > 65535 or Hq > 65535 or Sq > _INT_MAX // 2 or k.shape[2] > _INT_MAX // 2:
        return "sizes beyond the grid/int32 limits"
    return None


def supports(q, k, v, bias, spec: AttentionSpec):
    why = platform_problem(q)
    if why:
        return why
    if q.dtype not in (torch.float16, torch.bfloat16) or k.dtype != q.dtype or v.dtype != q.dtype:
        return f"dtype {q.dtype}/{k.dtype}/{v.dtype} (fp16/bf16 only, all equal)"
    if q.shape[-1] not in cuda_jit.SUPPORTED_HEAD_DIMS:
        return f"head dim {q.shape[-1]} not in {cuda_jit.SUPPORTED_HEAD_DIMS}"
    if v.shape[-1] != q.shape[-1] and (q.shape[-1], v.shape[-1]) not in cuda_jit.SPLIT_HEAD_DIMS:
        return f"head dims q/k {q.shape[-1]}, v {v.shape[-1]}: equal, or one of {cuda_jit.SPLIT_HEAD_DIMS}"
    if spec.out_torch_dtype not in (q.dtype, torch.float32):
        return f"out dtype {spec.out_dtype} (input dtype or float32 only)"
    if bias is not None or spec.mask_kind is not None:
        return "bias/mask tensors not implemented in the CUDA template"
    if spec.key_padding:
        return "key_padding not implemented in the CUDA template"
    if spec.alibi:
        return "alibi not implemented in the CUDA template"
    if spec.dropout_p:
        return "dropout not implemented in the CUDA template"
    if q.shape[1] % k.shape[1]:
        return "Hq not a multiple of Hk"
    why = size_problem(q, k)
    if why:
        return why
    k, v = _shared_kv_head(k, v)
    for name, t in (("q", q), ("k", k), ("v", v)):
        why = _tma_ok(t)
        if why:
            return f"{name}: {why}"
    return build_problem(lambda: _launch_config(q, k, v, spec)[0])


def build_problem(make_cfg) -> str | None:
    """None once the instantiation make_cfg() names is built and loaded (first use: one nvcc
    run, then the disk cache), else why not: no toolchain, or a failed build (remembered, and
    logged once: dispatch then falls back to Triton).  The FP8 path shares it."""
    problem = cuda_jit.toolchain_problem()
    if problem:
        _log_once(problem)
        return problem
    cfg = make_cfg()
    if cfg in _failed:
        return _failed[cfg]
    try:
        cuda_jit.get_kernel(cfg)
    except (cuda_jit.CudaToolchainUnavailable, cuda_jit.CudaCompileError, OSError) as exc:
        reason = f"building {cfg.name()} failed: {exc}"
        _failed[cfg] = reason
        _log_once(reason)
        return reason
    return None


def _shared_kv_head(k, v):
    """A kv head broadcast by expand() (head stride 0) is one kv head shared by all query heads."""
    if k.shape[1] > 1 and k.stride(1) == 0 and v.stride(1) == 0:
        return k[:, :1], v[:, :1]
    return k, v


def tma_strides(t: torch.Tensor) -> list[int]:
    """(batch, head, seq) strides in elements; dims of extent 1 get a harmless 16-byte multiple
    (TMA rejects strides that are not, even on dims it never steps along)."""
    return [t.stride(dim) if t.shape[dim] > 1 else max(8, t.shape[-1]) for dim in range(3)]


# Half of the H100's 50 MB L2 for the K/V of the heads whose tiles run at the same time.
_L2_KV_BUDGET = 24 << 20


@functools.lru_cache(maxsize=1024)
def lpt_group(b: int, hq: int, hk: int, sk: int, d: int, elem_bytes: int) -> int:
    """(batch, head) pairs per longest-first group of the causal tile order (decode_tile in
    kernels/cuda/fa3_fwd_kernel.cuh): the largest divisor of B*Hq (whole groups keep the kernel's
    index math short) whose heads have K and V in the L2 budget together (query heads of one GQA
    group share theirs).  Measured on the H100 against one group of every head: causal d128 at
    2k 309 -> 421 TFLOP/s, d256 at 1k 245 -> 350 (docs/perf-notes.md)."""
    bh = b * hq
    kv_per_q_head = max(1, int(2 * sk * d * elem_bytes * hk / hq))
    cap = max(1, min(bh, _L2_KV_BUDGET // kv_per_q_head))
    best, i = 1, 1
    while i * i <= bh:
        if bh % i == 0:
            for x in (i, bh // i):
                if best < x <= cap:
                    best = x
        i += 1
    return best


def packed_gqa_rows(q, hk: int, spec: AttentionSpec, block_m: int) -> int:
    """Rows per head (Sq) when the launch packs each kv group's query heads into one head of
    group * Sq rows (Params::pack_sq in the kernel), else 0.

    It pays when Sq is short against the 128-row tile: unpacked, each query head takes a tile of
    mostly empty rows and sweeps its group's K/V on its own; packed, one tile holds the queries of
    several heads (decoding with Sq = 1 and 8 heads per group: 8 rows instead of 1) and the tile
    count drops by up to the group size, while each tile still sweeps K/V once.  Packing needs the
    group's heads to be consecutive ("div" mapping) and rows that one stride can walk: Sq = 1, or
    heads stored right after one another's queries (head stride = Sq x row stride)."""
    B, Hq, Sq, _ = q.shape
    group = Hq // hk
    if group <= 1 or spec.gqa_mapping != "div" or Sq > block_m or spec.fp8:
        return 0
    if -(-group * Sq // block_m) >= group:  # no fewer tiles than one per head
        return 0
    if Sq > 1 and q.stride(1) != Sq * q.stride(2):
        return 0
    return Sq


def _packed_view(t, hk: int, sq: int):
    """[B, Hq, Sq, D] -> [B, Hk, group * Sq, D] over the same memory (packed_gqa_rows checked
    that one row stride walks the group's queries)."""
    B, Hq, _, D = t.shape
    group = Hq // hk
    row = t.stride(2) if sq > 1 else t.stride(1)
    return t.as_strided((B, hk, group * sq, D), (t.stride(0), group * t.stride(1), row, t.stride(3)))


def new_outputs(q, k, v, spec: AttentionSpec):
    """(out, lse, final) of the op's contract: final when there is nothing for a kernel to do
    (no rows; or no keys: O = 0, LSE = -inf).  The FP8 path shares it."""
    B, Hq, Sq, _ = q.shape
    out = torch.empty(B, Hq, Sq, v.shape[-1], dtype=spec.out_torch_dtype, device=q.device)
    lse = torch.empty(B, Hq, Sq, dtype=torch.float32, device=q.device)
    if out.numel() == 0:
        return out, lse, True
    if k.shape[2] == 0:
        return out.zero_(), lse.fill_(float("-inf")), True
    return out, lse, False


def forward(q, k, v, bias, key_padding, alibi_slopes, seed, scale: float, spec: AttentionSpec,
            pack_gqa: bool = True, **ablation):
    """ablation: KernelConfig switches for benchmarks; pack_gqa=False launches one head per
    query head even where packed_gqa_rows would pack (benchmark baseline)."""
    B, Hq, Sq, D = q.shape
    Hk, Sk = k.shape[1], k.shape[2]
    out, lse, final = new_outputs(q, k, v, spec)
    if final:
        return out, lse
    if not (scale > 0 and math.isfinite(scale)):
        # The kernel takes the running max as (raw max) x scale: that needs a positive scale.
        from . import triton_impl
        return triton_impl.forward(q, k, v, bias, key_padding, alibi_slopes, seed, scale, spec)
    k, v = _shared_kv_head(k, v)
    Hk = k.shape[1]
    Dv = v.shape[-1]
    cfg, pack = _launch_config(q, k, v, spec, pack_gqa, **ablation)
    kern = cuda_jit.get_kernel(cfg)
    off = Sk - Sq if spec.align == "bottom_right" else 0
    wl = min(spec.window_left, _WINDOW_CAP) if spec.window_left is not None else 0
    wr = min(spec.window_right, _WINDOW_CAP) if spec.window_right is not None else 0
    qk, ok = q, out
    if pack:  # the kernel sees Hk heads of group * Sq rows (out and lse are fresh contiguous tensors,
        # so lse [B, Hq, Sq] already is [B, Hk, group * Sq]); one query head per kv head then
        qk, ok = _packed_view(q, Hk, Sq), _packed_view(out, Hk, Sq)
    Hq_k, Sq_k = qk.shape[1], qk.shape[2]
    qs, ks, vs = tma_strides(qk), tma_strides(k), tma_strides(v)
    os_ = tma_strides(ok)  # 16-bit outputs leave through a TMA store
    stream = torch.cuda.current_stream(q.device).cuda_stream
    with torch.cuda.device(q.device):
        rc = kern.launch(qk.data_ptr(), k.data_ptr(), v.data_ptr(), ok.data_ptr(), lse.data_ptr(),
                         B, Hq_k, Hk, Sq_k, Sk, D, Dv, *qs, *ks, *vs, *os_,
                         float(scale), off, wl, wr, int(spec.gqa_mapping == "div"),
                         lpt_group(B, Hq_k, Hk, Sk, D, q.element_size()) if spec.window_right is not None else 0,
                         float(spec.softcap or 0.0), Sk, pack, None, None, None, 0, 0, 0, 0,
                         stream)
    if rc != 0:
        raise RuntimeError(f"fa3 CUDA forward {kern.cfg.name()} failed to launch: status {rc} "
                           f"(cudaError_t, or 1001 = bad arguments)")
    return out, lse


def backward(dout, q, k, v, out, lse, bias, key_padding, alibi_slopes, seed, scale: float,
             spec: AttentionSpec, bias_requires_grad: bool):
    from . import triton_impl  # lazy: Triton is only needed once a backward runs
    return triton_impl.backward(dout, q, k, v, out, lse, bias, key_padding, alibi_slopes, seed,
                                scale, spec, bias_requires_grad)
