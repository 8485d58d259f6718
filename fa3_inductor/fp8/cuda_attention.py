"""FP8 forward through the CUDA template (kernels/cuda with FA3_FP8): the quantisation pass
writes Q and K rotated with per-tile scales and V^T in the template's key order
(quantize.permute_keys), then one launch of the warp-specialised e4m3 kernel.

The quantisation tiles are the template's tiles (one scale per BLOCK_M query rows and per
BLOCK_N keys), so every score tile needs one scale of each operand.  Key blocks are visited
from the last one down, as in the 16-bit template: `emulate.attention(..., descending=True)`
reproduces its arithmetic.
"""
from __future__ import annotations

import math
from typing import Optional

import torch

from ..codegen import cuda_jit
from ..spec import AttentionSpec
from . import quantize


def config_for_call(q: torch.Tensor, spec: AttentionSpec, sk: int, block_n: Optional[int] = None,
                    **variant) -> cuda_jit.KernelConfig:
    """The instantiation for a call over sk keys: the grid from cuda_jit.fp8_persistent_grid.
    variant: config_for's overrides (block_m, stages, persistent, ...) of benchmark candidates."""
    mask = cuda_jit.mask_kind(spec.window_left is not None, spec.window_right is not None)
    variant.setdefault("persistent", cuda_jit.fp8_persistent_grid(q.shape[-1], sk, mask=mask))
    return cuda_jit.config_for(q.shape[-1], spec.out_dtype, has_wr=spec.window_right is not None, fp8=True,
                               block_n=block_n, **variant)


def tiles_for(d: int, causal: bool, block_n: Optional[int] = None, **variant) -> tuple[int, int]:
    """(BLOCK_M, BLOCK_N) of the instantiation: the quantisation blocks its operands need.
    variant: config_for's overrides (block_m, stages, intra_wg, ...) of a benchmark candidate."""
    cfg = cuda_jit.config_for(d, "bfloat16", has_wr=causal, fp8=True, block_n=block_n, **variant)
    return cfg.block_m, cfg.block_n


def supports(q, k, v, bias, spec: AttentionSpec) -> Optional[str]:
    """None if the CUDA FP8 kernel runs this call (the spec checks shared with the Triton FP8
    kernel have passed already: fp8/attention.supports), else the reason."""
    from ..ops import cuda_impl
    d = q.shape[-1]
    problem = (cuda_impl.platform_problem(q)
               or (f"head dim {d} not in {cuda_jit.FP8_HEAD_DIMS}" if d not in cuda_jit.FP8_HEAD_DIMS else None)
               or cuda_impl.size_problem(q, k)
               or cuda_impl.build_problem(lambda: config_for_call(q, spec, k.shape[2])))
    return f"fp8 cuda: {problem}" if problem else None


def forward(q, k, v, scale: float, spec: AttentionSpec, signs: Optional[torch.Tensor], *,
            quantized: Optional[quantize.QuantizedQKV] = None, block_n: Optional[int] = None, **variant):
    """out [B, Hq, Sq, D] (spec.out_dtype), lse [B, Hq, Sq] fp32 natural log.  `quantized`
    (from quantize_qkv(..., *tiles_for(d, causal, block_n), permute=True)) lets the benchmark time the
    kernel alone; block_n / variant (stages, persistent) pick a benchmark candidate."""
    from ..ops.cuda_impl import lpt_group, tma_strides, new_outputs
    B, Hq, Sq, D = q.shape
    Hk, Sk = k.shape[1], k.shape[2]
    out, lse, final = new_outputs(q, k, v, spec)
    if final:
        return out, lse
    if not (scale > 0 and math.isfinite(scale)):
        raise ValueError(f"fp8 cuda forward: scale must be positive and finite (got {scale})")
    kern = cuda_jit.get_kernel(config_for_call(q, spec, Sk, block_n, **variant))
    bm, bn = kern.block_m, kern.block_n
    qq = quantized or quantize.quantize_qkv(q, k, v, bm, bn, signs, permute=True)
    if (qq.block_m, qq.block_n) != (bm, bn) or qq.vt8.shape[-1] % quantize.PERMUTE_GROUP:
        raise ValueError(f"fp8 cuda forward: operands quantised with tiles {(qq.block_m, qq.block_n)} "
                         f"and V^T length {qq.vt8.shape[-1]}; the kernel needs {(bm, bn)}, permuted keys")
    off = Sk - Sq if spec.align == "bottom_right" else 0
    stream = torch.cuda.current_stream(q.device).cuda_stream
    with torch.cuda.device(q.device):
        rc = kern.launch(qq.q8.data_ptr(), qq.k8.data_ptr(), qq.vt8.data_ptr(), out.data_ptr(), lse.data_ptr(),
                         B, Hq, Hk, Sq, Sk, D, D, *tma_strides(qq.q8), *tma_strides(qq.k8), *tma_strides(qq.vt8),
                         *tma_strides(out), float(scale), off, 0, 0, 1,
                         lpt_group(B, Hq, Hk, Sk, D, 1) if spec.window_right is not None else 0,
                         0.0, qq.vt8.shape[-1], 0,
                         qq.q_scale.data_ptr(), qq.k_scale.data_ptr(), qq.v_scale.data_ptr(),
                         qq.q_scale.stride(0), qq.q_scale.stride(1), qq.k_scale.stride(0), qq.k_scale.stride(1),
                         stream)
    if rc != 0:
        raise RuntimeError(f"fa3 CUDA fp8 forward {kern.cfg.name()} failed to launch: status {rc} "
                           f"(cudaError_t, or 1001 = bad arguments)")
    return out, lse


__all__ = ["supports", "forward", "config_for_call", "tiles_for"]
