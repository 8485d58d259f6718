"""FP8 attention forward, keeping the contract of ops/contract.py.

forward() = quantize_qkv (one fused Triton pass over Q, K and V in one launch: Hadamard on Q
and K, block scales, V written transposed) + an e4m3 attention kernel: the CUDA template
(fp8/cuda_attention.py) where it runs, else the Triton one (fp8_fwd.tmpl); kernel_for()
says which, following the call's kernel setting (dispatch.kernel_setting: the site's
AttentionSpec.kernel, else config.kernel; "triton" / "cuda" pin one, "auto" prefers CUDA).
Only the forward exists: the backward of an FP8 forward is the bf16/fp16 backward, chosen by
the dispatch (ops/dispatch.py).  `emulated_forward` runs the same arithmetic in torch (CPU,
tests), with the tiles and key order of the kernel kernel_for() picks.
"""
from __future__ import annotations

import math
from typing import Optional

import torch

from ..spec import AttentionSpec
from . import cuda_attention, emulate, hadamard, quantize, templates

# Tile sizes per head dim: (BLOCK_M, BLOCK_N, num_warps, num_stages).  They are also the
# quantisation blocks (one scale per BLOCK_M rows of Q, per BLOCK_N rows of K/V).  Chosen
# by `ptxas -v` without a GPU (compile_check.py): BLOCK_N = 128 spills at every hdim, 64
# does not at hdim 64/128; no config tried at hdim 256 is spill-free (64x64x8 warps: 96 B,
# the least).  Not timed on a GPU yet (bench/fp8_rows.py --sweep times the candidates).
TILES = {
    64: (128, 64, 8, 3),
    128: (128, 64, 8, 3),
    256: (64, 64, 8, 2),
}


def tiles_for(d: int, tiles=None):
    return tuple(tiles) if tiles is not None else TILES[d]


def supports(q, k, v, bias, spec: AttentionSpec) -> Optional[str]:
    """None if the FP8 kernel runs this call, else the reason it does not."""
    if q.device.type != "cuda":
        return "fp8: needs a CUDA device"
    if torch.cuda.get_device_capability(q.device) != (9, 0):
        return "fp8: needs sm_90 (Hopper)"
    if q.dtype not in (torch.float16, torch.bfloat16) or k.dtype != q.dtype or v.dtype != q.dtype:
        return f"fp8: inputs must be fp16/bf16 of one dtype (got {q.dtype}, {k.dtype}, {v.dtype})"
    if spec.out_dtype not in ("float16", "bfloat16"):
        return f"fp8: out_dtype {spec.out_dtype} (fp16/bf16 only)"
    d, dv = q.shape[3], v.shape[3]
    if d not in TILES or dv != d:
        return f"fp8: head dims q/k {d}, v {dv} (needs equal dims in {sorted(TILES)})"
    if spec.mask_kind is not None:
        return f"fp8: {spec.mask_kind} mask tensor"
    if spec.key_padding:
        return "fp8: key padding"
    if spec.alibi:
        return "fp8: alibi"
    if spec.softcap:
        return "fp8: softcap"
    if spec.dropout_p:
        return "fp8: dropout"
    if spec.window_left is not None or spec.window_right not in (None, 0):
        return "fp8: sliding window (causal only)"
    if spec.gqa_mapping != "div" and q.shape[1] != k.shape[1]:
        return "fp8: GQA mapping 'mod'"
    if q.shape[1] % k.shape[1]:
        return "fp8: query heads not a multiple of kv heads"
    return None


def kernel_for(q, k, v, bias, spec: AttentionSpec) -> str:
    """"cuda" or "triton": the FP8 kernel forward() runs for this call (supports() passed).
    Remembered per call signature like every dispatch decision (it runs on every forward)."""
    from ..ops import dispatch

    kernel = dispatch.kernel_setting(spec)

    def decide():
        cuda = kernel != "triton" and cuda_attention.supports(q, k, v, bias, spec) is None
        return "cuda" if cuda else "triton"
    return dispatch.remembered("fp8-kernel", q, k, v, bias, spec, kernel, decide)


def _kernel(kernel, tiles, q, k, v, bias, scale, spec) -> str:
    """The kernel forward() / emulated_forward() use: `kernel` if given, Triton when its tiles are
    overridden, else kernel_for(); the CUDA template's exp2-domain running max needs scale > 0."""
    kernel = kernel or (kernel_for(q, k, v, bias, spec) if tiles is None else "triton")
    return kernel if kernel != "cuda" or (scale > 0 and math.isfinite(scale)) else "triton"


def signs_for(spec: AttentionSpec, d: int, device) -> torch.Tensor:
    # Deterministic per site: the spec (with its scale_repr) stands for the site.
    return hadamard.random_signs(d, hadamard.site_seed(spec.semantic_json()), device=device)


def forward(q, k, v, bias, key_padding, alibi_slopes, seed, scale: float, spec: AttentionSpec,
            *, incoherent: bool = True, quantized: Optional[quantize.QuantizedQKV] = None, tiles=None,
            kernel: Optional[str] = None):
    """out [B,Hq,Sq,Dv] (spec.out_dtype), lse [B,Hq,Sq] fp32 natural log.

    bias/key_padding/alibi_slopes/seed are unused (supports() refuses specs that need them).
    `quantized` lets the benchmark time the attention kernel alone; `tiles` (BLOCK_M, BLOCK_N,
    warps, stages) overrides TILES of the Triton kernel (tests, tuning sweeps); `kernel`
    ("cuda" / "triton") overrides kernel_for().
    """
    if _kernel(kernel, tiles, q, k, v, bias, scale, spec) == "cuda":
        signs = signs_for(spec, q.shape[3], q.device) if incoherent else None
        return cuda_attention.forward(q, k, v, scale, spec, signs, quantized=quantized)
    B, Hq, Sq, D = q.shape
    Hk, Sk = k.shape[1], k.shape[2]
    bm, bn, warps, stages = tiles_for(D, tiles)
    qq = quantized or quantize.quantize_qkv(q, k, v, bm, bn, signs_for(spec, D, q.device) if incoherent else None)
    out = torch.empty(B, Hq, Sq, v.shape[3], dtype=spec.out_torch_dtype, device=q.device)
    lse = torch.empty(B, Hq, Sq, dtype=torch.float32, device=q.device)
    mod = templates.load("fp8_fwd")
    grid = (-(-Sq // bm), B * Hq)
    mod.fp8_attn_fwd_kernel[grid](
        qq.q8, qq.k8, qq.vt8, qq.q_scale, qq.k_scale, qq.v_scale, out, lse,
        scale / math.log(2.0), Sq, Sk, Hq, Hq // Hk,
        qq.q8.stride(0), qq.q8.stride(1), qq.q8.stride(2),
        qq.k8.stride(0), qq.k8.stride(1), qq.k8.stride(2),
        qq.vt8.stride(0), qq.vt8.stride(1), qq.vt8.stride(2),
        qq.q_scale.stride(0), qq.q_scale.stride(1), qq.k_scale.stride(0), qq.k_scale.stride(1),
        out.stride(0), out.stride(1), out.stride(2),
        lse.stride(0), lse.stride(1),
        BLOCK_M=bm, BLOCK_N=bn, HEAD_DIM=D, HEAD_DIM_V=v.shape[3],
        CAUSAL=spec.causal, BOTTOM_RIGHT=spec.align == "bottom_right", P_SCALE=emulate.P_SCALE,
        INTERPRET=templates.interpreting(),
        num_warps=warps, num_stages=stages,
    )
    return out, lse


def emulated_forward(q, k, v, bias, key_padding, alibi_slopes, seed, scale: float, spec: AttentionSpec,
                     *, tiles=None, kernel: Optional[str] = None):
    """Contract-shaped torch emulation with the tiles and key order of the kernel forward() runs
    (`kernel` as in forward; CPU fallback and tests)."""
    if _kernel(kernel, tiles, q, k, v, bias, scale, spec) == "cuda":
        (bm, bn), descending = cuda_attention.tiles_for(q.shape[3], spec.window_right is not None), True
    else:
        (bm, bn, _, _), descending = tiles_for(q.shape[3], tiles), False
    out, lse = emulate.attention(q, k, v, scale, spec, block_m=bm, block_n=bn,
                                 signs=signs_for(spec, q.shape[3], q.device), descending=descending)
    return out.to(spec.out_torch_dtype).contiguous(), lse.contiguous()


__all__ = ["supports", "forward", "emulated_forward", "kernel_for", "TILES", "tiles_for", "signs_for"]
