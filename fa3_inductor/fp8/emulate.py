"""Torch emulation of the FP8 forward: the kernel's arithmetic on any device.

Every rounding the kernel does is reproduced (Q/K/V to e4m3 with their scales, P * 448 to
e4m3), the rest runs in `acc` precision (fp32 like the kernel, or fp64 to isolate the FP8
error).  The key loop walks the same BLOCK_N tiles with the same online softmax, so the
P that gets quantised is the kernel's P (relative to the running max, not the final one).

Used by the accuracy experiment (scripts/fp8_accuracy.py), by CPU tests, and as the
kernel's reference in GPU tests.  `granularity="tensor"` gives the per-tensor-scale
baseline, `incoherent=False` switches the Hadamard rotation off.
"""
from __future__ import annotations

import math
from typing import Optional

import torch

from ..reference import expand_kv
from ..spec import AttentionSpec
from . import hadamard, quantize

P_SCALE = 448.0


def _quant(x, block, granularity, signs):
    """fp32 values the kernel multiplies: dequantised fp8 (x8 * scale), plus per-row scales."""
    if granularity == "tensor":
        x8, s = quantize.quantize_per_tensor(x, signs)
        return x8.to(torch.float32), s.expand(x.shape[0], x.shape[1], x.shape[2]).contiguous()
    x8, s = quantize.quantize_ref(x, block, signs)
    return x8.to(torch.float32), s.repeat_interleave(block, dim=2)[:, :, :x.shape[2]].contiguous()


def quantize_p(p: torch.Tensor) -> torch.Tensor:
    """P in [0, 1] as the kernel feeds it to the second GEMM: e4m3(P * 448) / 448."""
    return (p * P_SCALE).to(torch.float32).to(quantize.FP8).to(p.dtype) / P_SCALE


def attention(q, k, v, scale: float, spec: AttentionSpec, *, block_m: int = 128, block_n: int = 128,
              granularity: str = "block", incoherent: bool = True, signs: Optional[torch.Tensor] = None,
              quantize_probs: bool = True, acc=torch.float32, descending: bool = False):
    """(out [B,Hq,Sq,Dv] in `acc`, lse [B,Hq,Sq] natural log) of the FP8 forward.

    Supports causal (both aligns), GQA (spec.gqa_mapping) and nothing else of the spec.
    descending=True walks the key tiles from the last one down, as the CUDA template does (the
    quantised P depends on the running max, hence on the order).
    """
    D = q.shape[3]
    if incoherent and signs is None:
        signs = hadamard.random_signs(D, hadamard.site_seed(spec.semantic_json()), device=q.device)
    sg = signs if incoherent else None
    q8, qs = _quant(q, block_m, granularity, sg)
    k8, ks = _quant(k, block_n, granularity, sg)
    v8, vs = _quant(v, block_n, granularity, None)
    return _attend(q8, qs, k8, ks, v8, vs, scale, spec, block_n, quantize_probs, acc, descending)


def attention_quantized(qq: quantize.QuantizedQKV, scale: float, spec: AttentionSpec, sk: int, *,
                        permuted: bool = False, descending: bool = False, acc=torch.float32):
    """The same arithmetic on operands a kernel already got (quantize_qkv's output), so that a
    kernel can be compared with its emulation without the quantisation pass's own rounding
    differences (the fused pass and quantize_ref may differ in rare last bits).  permuted: V^T
    is in the CUDA template's key order (quantize.permute_keys)."""
    def rows(scales, block, n):
        return scales.repeat_interleave(block, dim=2)[:, :, :n].contiguous()
    vt = qq.vt8.float()
    v8 = (quantize.unpermute_keys(vt, sk) if permuted else vt[..., :sk]).transpose(2, 3)
    sq = qq.q8.shape[2]
    return _attend(qq.q8.float(), rows(qq.q_scale, qq.block_m, sq), qq.k8.float(),
                   rows(qq.k_scale, qq.block_n, sk), v8, rows(qq.v_scale, qq.block_n, sk),
                   scale, spec, qq.block_n, True, acc, descending)


def _attend(q8, qs, k8, ks, v8, vs, scale, spec, block_n, quantize_probs, acc, descending):
    """The kernel's loop over key tiles: fp8 values (as float) and their per-row scales."""
    B, Hq, Sq, _ = q8.shape
    Sk = k8.shape[2]
    k8, ks = expand_kv(k8, Hq, spec.gqa_mapping), expand_kv(ks, Hq, spec.gqa_mapping)
    v8, vs = expand_kv(v8, Hq, spec.gqa_mapping), expand_kv(vs, Hq, spec.gqa_mapping)
    q8, qs, k8, ks, v8, vs = (t.to(acc) for t in (q8, qs, k8, ks, v8, vs))

    log2e = 1.0 / math.log(2.0)
    rows = torch.arange(Sq, device=q8.device).view(-1, 1)
    off = (Sk - Sq) if spec.align == "bottom_right" else 0
    m = torch.full((B, Hq, Sq), float("-inf"), dtype=acc, device=q8.device)
    l = torch.zeros(B, Hq, Sq, dtype=acc, device=q8.device)
    o = torch.zeros(B, Hq, Sq, v8.shape[3], dtype=acc, device=q8.device)
    starts = list(range(0, Sk, block_n))
    for n0 in (reversed(starts) if descending else starts):
        n1 = min(Sk, n0 + block_n)
        s = torch.matmul(q8, k8[:, :, n0:n1].transpose(-1, -2))
        s = s * (qs.unsqueeze(-1) * ks[:, :, n0:n1].unsqueeze(-2) * (scale * log2e))
        if spec.causal:
            cols = torch.arange(n0, n1, device=q8.device).view(1, -1)
            s = s.masked_fill(~(cols <= rows + off), float("-inf"))
        m_new = torch.maximum(m, s.amax(-1))
        m_sub = torch.where(torch.isneginf(m_new), torch.zeros_like(m_new), m_new)
        p = torch.exp2(s - m_sub.unsqueeze(-1))
        alpha = torch.exp2(m - m_sub)
        l = l * alpha + p.sum(-1)
        pq = quantize_p(p) if quantize_probs else p
        # V's per-row scale is constant over the tile (block_n rows), as in the kernel.
        o = o * alpha.unsqueeze(-1) + torch.matmul(pq * vs[:, :, n0:n1].unsqueeze(-2), v8[:, :, n0:n1])
        m = m_new
    dead = l == 0
    l_safe = torch.where(dead, torch.ones_like(l), l)
    out = o / l_safe.unsqueeze(-1)
    lse = torch.where(dead, torch.full_like(l, float("-inf")), (m + torch.log2(l_safe)) * math.log(2.0))
    return out, lse.to(torch.float32)


__all__ = ["attention", "attention_quantized", "quantize_p", "P_SCALE"]
