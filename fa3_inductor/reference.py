"""Pure-PyTorch reference of every AttentionSpec, forward and backward.

Used on CPU, in tests, and when `config.kernel == "reference"`.  It follows the kernel
contract exactly (see `ops/contract.py`): fp32 accumulation, rows with no unmasked key
give out = 0 and lse = -inf (the fully-masked-row semantics of eager are applied on top
by `ops/fully_masked.py`, shared with the kernels).  Memory stays bounded: queries are
processed in chunks so a 16k x 16k fp32 score matrix never exists at once.
"""
from __future__ import annotations

from typing import Optional

import torch

from .spec import BIAS_MASKED, AttentionSpec
from .ops import rng

# Rows per chunk: chunk * sk fp32 scores per (b, h) slice stay near 64 MiB.
_CHUNK_ELEMS = 1 << 24


def _acc_dtype(x: torch.Tensor) -> torch.dtype:
    """fp32 accumulation, or fp64 for fp64 inputs (tests compare against fp64)."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _chunk_rows(b: int, h: int, sk: int) -> int:
    return max(1, _CHUNK_ELEMS // max(1, b * h * sk))


def kv_head_index(hq: int, hk: int, mapping: str, device) -> torch.Tensor:
    if hq % hk != 0:
        raise ValueError(f"query heads ({hq}) must be a multiple of key/value heads ({hk})")
    h = torch.arange(hq, device=device)
    return h // (hq // hk) if mapping == "div" else h % hk


def expand_kv(x: torch.Tensor, hq: int, mapping: str) -> torch.Tensor:
    hk = x.shape[1]
    if hk == hq:
        return x
    return x.index_select(1, kv_head_index(hq, hk, mapping, x.device))


def keep_mask(spec: AttentionSpec, rows: torch.Tensor, sq: int, sk: int, device,
              key_padding: Optional[torch.Tensor], bool_mask: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """Boolean keep-mask broadcastable to [B, H, len(rows), Sk], or None for 'keep all'."""
    keep = None
    off = (sk - sq) if spec.align == "bottom_right" else 0
    if spec.window_left is not None or spec.window_right is not None:
        i = rows.view(-1, 1) + off
        j = torch.arange(sk, device=device).view(1, -1)
        keep = torch.ones(len(rows), sk, dtype=torch.bool, device=device)
        if spec.window_right is not None:
            keep &= j <= i + spec.window_right
        if spec.window_left is not None:
            keep &= j >= i - spec.window_left
        keep = keep.view(1, 1, len(rows), sk)
    if spec.key_padding:
        kp = key_padding.to(torch.bool).view(key_padding.shape[0], 1, 1, sk)
        keep = kp if keep is None else keep & kp
    if spec.mask_kind == "bool":
        bm = bool_mask.to(torch.bool)  # already the rows of this chunk
        keep = bm if keep is None else keep & bm
    return keep


def _scores(spec, q, k, scale, rows, sk, bias, alibi_slopes):
    """Scores of one query chunk after every transform but masking; also d(score)/d(raw) for softcap."""
    acc = _acc_dtype(q)
    s = torch.matmul(q.to(acc), k.to(acc).transpose(-1, -2)) * scale
    tanh = None
    if spec.softcap:
        tanh = torch.tanh(s / spec.softcap)
        s = tanh * spec.softcap
    if spec.alibi:
        off_rows = rows.view(-1, 1).to(s.dtype)
        j = torch.arange(sk, device=s.device, dtype=s.dtype).view(1, -1)
        rel = j - off_rows
        slopes = alibi_slopes.to(s.dtype).view(1, -1, 1, 1)
        s = s + (slopes * rel if spec.alibi == "linear" else -slopes * rel.abs())
    if spec.mask_kind == "additive":
        b = bias.to(s.dtype)  # already the rows of this chunk
        s = torch.where(b <= BIAS_MASKED, torch.full((), float("-inf"), dtype=s.dtype, device=s.device), s + b)
    return s, tanh


def _alibi_rows(spec, rows, sq, sk):
    off = (sk - sq) if spec.align == "bottom_right" else 0
    return rows + off


def forward(q, k, v, bias, key_padding, alibi_slopes, seed, scale: float, spec: AttentionSpec):
    """out [B,Hq,Sq,Dv] in spec.out_dtype (contiguous) and lse [B,Hq,Sq] fp32."""
    B, Hq, Sq, _ = q.shape
    Sk = k.shape[2]
    Dv = v.shape[3]
    kx = expand_kv(k, Hq, spec.gqa_mapping)
    vx = expand_kv(v, Hq, spec.gqa_mapping)
    out = torch.empty(B, Hq, Sq, Dv, dtype=spec.out_torch_dtype, device=q.device)
    lse = torch.empty(B, Hq, Sq, dtype=torch.float32, device=q.device)
    acc = _acc_dtype(q)
    step = _chunk_rows(B, Hq, Sk)
    for r0 in range(0, Sq, step):
        rows = torch.arange(r0, min(Sq, r0 + step), device=q.device)
        s, _ = _scores(spec, q[:, :, r0:r0 + len(rows)], kx, scale,
                       _alibi_rows(spec, rows, Sq, Sk), Sk, bias_rows(bias, r0, len(rows)), alibi_slopes)
        keep = keep_mask(spec, rows, Sq, Sk, q.device, key_padding, bool_rows(spec, bias, r0, len(rows)))
        if keep is not None:
            s = s.masked_fill(~keep, float("-inf"))
        m = s.amax(dim=-1, keepdim=True)
        dead = torch.isneginf(m)
        m = torch.where(dead, torch.zeros_like(m), m)
        p = torch.exp(s - m)
        l = p.sum(dim=-1, keepdim=True)
        row_lse = torch.where(dead, torch.full_like(m, float("-inf")), m + torch.log(l))
        p = p / torch.where(dead, torch.ones_like(l), l)
        if spec.dropout_p:
            p = p * rng.dropout_scale(seed, spec.dropout_p, B, Hq, rows, Sk, q.device).to(acc)
        o = torch.matmul(p, vx.to(p.dtype))
        out[:, :, r0:r0 + len(rows)] = o.to(out.dtype)
        lse[:, :, r0:r0 + len(rows)] = row_lse.squeeze(-1)
    return out, lse


def bias_rows(bias, r0, n):
    # The bias argument is already broadcast (expand) to [B, H, Sq, Sk]; slicing rows is a view.
    if bias is None:
        return None
    return bias[:, :, r0:r0 + n] if bias.shape[2] != 1 else bias


def bool_rows(spec, bias, r0, n):
    if spec.mask_kind != "bool":
        return None
    return bias_rows(bias, r0, n)


def backward(dout, q, k, v, out, lse, bias, key_padding, alibi_slopes, seed, scale: float,
             spec: AttentionSpec, bias_requires_grad: bool):
    """dq, dk, dv (input dtypes and shapes; GQA reduced onto the kv heads) and dbias ([B,H,Sq,Sk] fp32
    before reduction to the bias' broadcast shape, done by the caller) or an empty tensor."""
    B, Hq, Sq, D = q.shape
    Hk, Sk = k.shape[1], k.shape[2]
    acc = _acc_dtype(q)
    kx = expand_kv(k, Hq, spec.gqa_mapping).to(acc)
    vx = expand_kv(v, Hq, spec.gqa_mapping).to(acc)
    dq = torch.zeros(B, Hq, Sq, D, dtype=acc, device=q.device)
    dkx = torch.zeros(B, Hq, Sk, D, dtype=acc, device=q.device)
    dvx = torch.zeros(B, Hq, Sk, v.shape[3], dtype=acc, device=q.device)
    want_dbias = bias_requires_grad and spec.mask_kind == "additive"
    dbias = torch.zeros(B, Hq, Sq, Sk, dtype=acc, device=q.device) if want_dbias else None
    delta = (dout.to(acc) * out.to(acc)).sum(-1)  # D = rowsum(dO * O)
    step = _chunk_rows(B, Hq, Sk)
    for r0 in range(0, Sq, step):
        n = min(Sq, r0 + step) - r0
        rows = torch.arange(r0, r0 + n, device=q.device)
        qc = q[:, :, r0:r0 + n].to(acc)
        s, tanh = _scores(spec, qc, kx, scale, _alibi_rows(spec, rows, Sq, Sk), Sk,
                          bias_rows(bias, r0, n), alibi_slopes)
        keep = keep_mask(spec, rows, Sq, Sk, q.device, key_padding, bool_rows(spec, bias, r0, n))
        if keep is not None:
            s = s.masked_fill(~keep, float("-inf"))
        lse_c = lse[:, :, r0:r0 + n].unsqueeze(-1)
        dead = torch.isneginf(lse_c)
        p = torch.exp(s - torch.where(dead, torch.zeros_like(lse_c), lse_c))
        p = torch.where(dead, torch.zeros_like(p), p)
        do = dout[:, :, r0:r0 + n].to(acc)
        if spec.dropout_p:
            drop = rng.dropout_scale(seed, spec.dropout_p, B, Hq, rows, Sk, q.device).to(acc)
            pd = p * drop
        else:
            drop, pd = None, p
        dvx += torch.matmul(pd.transpose(-1, -2), do)
        dp = torch.matmul(do, vx.transpose(-1, -2))
        if drop is not None:
            dp = dp * drop
        ds = p * (dp - delta[:, :, r0:r0 + n].unsqueeze(-1))
        if dbias is not None:
            dbias[:, :, r0:r0 + n] = ds
        if tanh is not None:
            ds = ds * (1.0 - tanh * tanh)
        dq[:, :, r0:r0 + n] = torch.matmul(ds, kx) * scale
        dkx += torch.matmul(ds.transpose(-1, -2), qc) * scale
    dk = reduce_kv(dkx, Hk, spec.gqa_mapping)
    dv = reduce_kv(dvx, Hk, spec.gqa_mapping)
    empty = torch.empty(0, device=q.device, dtype=torch.float32)
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), (dbias.float() if dbias is not None else empty)


def group_heads(x: torch.Tensor, hk: int, mapping: str) -> torch.Tensor:
    """[B, Hq, ...] -> [B, Hk, G, ...] (a view): query head h of kv head h // G ("div") or h % Hk
    ("mod"), so kv-head tensors [B, Hk, 1, ...] broadcast against it without copies."""
    b, hq = x.shape[:2]
    g = hq // hk
    if mapping == "div":
        return x.view(b, hk, g, *x.shape[2:])
    return x.view(b, g, hk, *x.shape[2:]).transpose(1, 2)


def ungroup_heads(x: torch.Tensor, mapping: str) -> torch.Tensor:
    """Inverse of group_heads: [B, Hk, G, ...] -> [B, Hq, ...]."""
    b, hk, g = x.shape[:3]
    if mapping != "div":
        x = x.transpose(1, 2)
    return x.reshape(b, hk * g, *x.shape[3:])


def reduce_kv(dx: torch.Tensor, hk: int, mapping: str) -> torch.Tensor:
    if dx.shape[1] == hk:
        return dx
    return group_heads(dx, hk, mapping).sum(2)


def naive_eager(q, k, v, scale, spec: AttentionSpec, bias=None, key_padding=None, alibi_slopes=None):
    """Straightforward eager formulation (materialised masks, no dropout), for tests only."""
    Hq, Sq, Sk = q.shape[1], q.shape[2], k.shape[2]
    rows = torch.arange(Sq, device=q.device)
    kx = expand_kv(k, Hq, spec.gqa_mapping)
    vx = expand_kv(v, Hq, spec.gqa_mapping)
    s, _ = _scores(spec, q, kx, scale, _alibi_rows(spec, rows, Sq, Sk), Sk, bias, alibi_slopes)
    keep = keep_mask(spec, rows, Sq, Sk, q.device, key_padding, bias if spec.mask_kind == "bool" else None)
    if keep is not None:
        s = s.masked_fill(~keep, float("-inf"))
    p = torch.softmax(s, dim=-1)
    return torch.matmul(p, vx.to(p.dtype))


__all__ = ["forward", "backward", "naive_eager", "expand_kv", "reduce_kv", "group_heads", "ungroup_heads",
           "kv_head_index", "keep_mask"]
