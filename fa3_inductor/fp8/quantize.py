"""FP8 (e4m3) quantisation of Q, K, V: one fp32 scale per tile of rows per (batch, head).

scale = amax(tile) / 448 (448 = largest finite e4m3), 1.0 for an all-zero tile, and the
stored value is round_to_nearest_even(x / scale) in float8_e4m3fn, so x ~= fp8 * scale.
Tiles are BLOCK_M rows for Q and BLOCK_N rows for K and V: the attention kernel's tiles,
so that each score tile needs exactly one scale of each operand, folded into the softmax
scale for free.

Two implementations with the same results: `quantize_ref` (torch, any device; the
specification) and `quantize_qkv(impl="triton")` (kernels/triton/fp8_quant.tmpl: one read of
the input, rotation, amax, one write of the fp8 tile and its scale; the launchers are in
quantize_launch.py).
"""
from __future__ import annotations

import dataclasses
from typing import Optional

import torch

from . import hadamard

E4M3_MAX = 448.0
FP8 = torch.float8_e4m3fn
# Rows of V^T are padded to this many keys so that each row starts 16-byte aligned
# (cp.async / TMA need it); the pad is never read unmasked.
VT_ALIGN = 16
# The CUDA template's V^T has its keys permuted within each group of 32 (PERMUTE_GROUP) and is
# padded with zeros to whole groups: see permute_keys.
PERMUTE_GROUP = 32


def key_permutation(device=None) -> torch.Tensor:
    """pi[c] = the key stored at position c of each group of 32 in the CUDA template's V^T.

    The template feeds P to the 8-bit PV WGMMA straight from the S accumulator's registers
    (kernels/cuda/fa3_utils.cuh, acc_to_fp8_operand_a): GEMM key c = 16 u2 + 4 q + u0 then
    multiplies P's key 16 u2 + 8 (u0 >> 1) + 2 q + (u0 & 1).  Storing V's keys in that order
    makes the products pair up without moving P between lanes.
    """
    c = torch.arange(PERMUTE_GROUP, device=device)
    return 16 * (c >> 4) + 8 * ((c & 3) >> 1) + 2 * ((c >> 2) & 3) + (c & 1)


def permute_keys(vt: torch.Tensor) -> torch.Tensor:
    """V^T [..., S] -> [..., S_pad] with S_pad = S rounded up to 32, zero-padded, then the keys of
    each group of 32 reordered by key_permutation (out[..., 32 g + c] = vt[..., 32 g + pi[c]])."""
    s = vt.shape[-1]
    s_pad = -(-s // PERMUTE_GROUP) * PERMUTE_GROUP
    x = torch.nn.functional.pad(vt, (0, s_pad - s)) if s_pad != s else vt
    idx = (torch.arange(0, s_pad, PERMUTE_GROUP, device=vt.device).view(-1, 1)
           + key_permutation(vt.device).view(1, -1)).reshape(-1)
    return x.index_select(-1, idx)


def unpermute_keys(vt: torch.Tensor, s: int) -> torch.Tensor:
    """The inverse of permute_keys: [..., S_pad] in the CUDA template's key order -> [..., s]."""
    inv = torch.argsort(key_permutation(vt.device))
    return vt.unflatten(-1, (-1, PERMUTE_GROUP))[..., inv].flatten(-2)[..., :s]


def _scale_from_amax(amax: torch.Tensor) -> torch.Tensor:
    return torch.where(amax > 0, amax / E4M3_MAX, torch.ones_like(amax))


def to_fp8(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """round(x / scale) to e4m3; the clamp keeps a value one rounding step above 448 finite
    (torch's cast is not saturating: 464 and up would become NaN)."""
    return (x / scale).clamp(-E4M3_MAX, E4M3_MAX).to(FP8)


def quantize_ref(x: torch.Tensor, block: int, signs: Optional[torch.Tensor] = None):
    """x [B, H, S, D] -> (x8 [B, H, S, D] float8_e4m3fn, scales [B, H, ceil(S/block)] fp32).

    With `signs`, x is first rotated by M = diag(signs) H / sqrt(D) (hadamard.rotate).
    """
    B, H, S, D = x.shape
    xf = hadamard.rotate(x, signs) if signs is not None else x.to(torch.float32)
    xf = xf.to(torch.float32)
    nblk = -(-S // block)
    pad = nblk * block - S
    tiles = torch.nn.functional.pad(xf, (0, 0, 0, pad)).view(B, H, nblk, block * D)
    scales = _scale_from_amax(tiles.abs().amax(dim=-1))
    rows_scale = scales.repeat_interleave(block, dim=2)[:, :, :S].unsqueeze(-1)
    return to_fp8(xf, rows_scale), scales.contiguous()


def quantize_per_tensor(x: torch.Tensor, signs: Optional[torch.Tensor] = None):
    """Baseline: one scale for the whole tensor.  Returns (x8, scale as a 0-d fp32 tensor)."""
    xf = hadamard.rotate(x, signs) if signs is not None else x.to(torch.float32)
    xf = xf.to(torch.float32)
    scale = _scale_from_amax(xf.abs().amax())
    return to_fp8(xf, scale), scale


def dequantize(x8: torch.Tensor, scales: torch.Tensor, block: int) -> torch.Tensor:
    """fp32 values represented by (x8, per-block scales) (a 0-d scale: per-tensor)."""
    if scales.dim() == 0:
        return x8.to(torch.float32) * scales
    S = x8.shape[2]
    return x8.to(torch.float32) * scales.repeat_interleave(block, dim=2)[:, :, :S].unsqueeze(-1)


@dataclasses.dataclass
class QuantizedQKV:
    """Operands of the FP8 attention kernel.  vt8 is V transposed: [B, Hk, Dv, Sk_pad]."""
    q8: torch.Tensor
    q_scale: torch.Tensor   # [B, Hq, cdiv(Sq, block_m)]
    k8: torch.Tensor
    k_scale: torch.Tensor   # [B, Hk, cdiv(Sk, block_n)]
    vt8: torch.Tensor
    v_scale: torch.Tensor   # [B, Hk, cdiv(Sk, block_n)]
    block_m: int
    block_n: int


def quantize_qkv(q, k, v, block_m: int, block_n: int, signs: Optional[torch.Tensor],
                 impl: str = "triton", permute: bool = False, kernel: Optional[str] = None,
                 num_warps: Optional[int] = None) -> QuantizedQKV:
    """Quantise Q (rotated), K (rotated) and V (not rotated, transposed; permute=True: in the
    CUDA template's key order, permute_keys) for the kernel.  impl="triton": one launch of the
    persistent kernel for the three (kernel="legacy" or FA3_FP8_QUANT=legacy: three launches of
    the per-tile kernel); num_warps overrides the Triton kernel's."""
    if impl == "triton":
        from .quantize_launch import quantize_qkv_triton
        q8, qs, k8, ks, vt8, vs = quantize_qkv_triton(q, k, v, block_m, block_n, signs, permute, kernel, num_warps)
    else:
        q8, qs = quantize_ref(q, block_m, signs)
        k8, ks = quantize_ref(k, block_n, signs)
        v8, vs = quantize_ref(v, block_n, None)
        vt8 = v8.transpose(2, 3)
        # permute_keys works on the raw bytes: index_select of float8 is not implemented everywhere.
        vt8 = (permute_keys(vt8.view(torch.uint8)).view(FP8) if permute else vt8).contiguous()
    return QuantizedQKV(q8, qs, k8, ks, vt8, vs, block_m, block_n)


__all__ = ["E4M3_MAX", "FP8", "PERMUTE_GROUP", "key_permutation", "permute_keys", "unpermute_keys", "quantize_ref",
           "quantize_per_tensor", "dequantize", "quantize_qkv", "QuantizedQKV", "to_fp8"]
