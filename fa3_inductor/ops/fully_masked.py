"""Eager's semantics for rows in which every key is masked, applied on top of any
implementation that keeps the contract (such rows: out = 0, lse = -inf).

- "neg_inf": eager's softmax over all -inf is NaN, so those output rows become NaN.
- "zero": SDPA's rule, the contract's own (out = 0): nothing to do.
- "min_additive" / "min_fill": every score of the row equals the same finfo.min, so eager
  gives uniform weights over all Sk keys: out = mean_j v[j].  In the backward, dV gets
  dO / Sk for every key; with an additive mask the gradient also reaches q and k through
  dS_ij = (dO_i . v_j - dO_i . vmean) / Sk, which factorises into small matrix products
  (no Sq x Sk work).  With masked_fill the filled scores carry no gradient.

Everything here is O(B*H*(Sq+Sk)*D*Dv), small next to the attention itself.
Not covered (documented in docs/semantics.md): softcap combined with min_additive rows
(the (1 - tanh^2) factor of such rows is dropped) and dbias of fully masked rows.
"""
from __future__ import annotations

import torch

from ..reference import expand_kv, reduce_kv
from ..spec import AttentionSpec


def dead_rows_possible(spec: AttentionSpec, sq: int, sk: int) -> bool:
    """Can some query row have no unmasked key?  Exact for the window rule, conservative for tensors."""
    if spec.key_padding or spec.mask_kind == "bool" or spec.mask_kind == "additive":
        return True
    if sk == 0:
        return True
    if not spec.has_window:
        return False
    off = (sk - sq) if spec.align == "bottom_right" else 0
    # Row i keeps keys in [i+off-wl, i+off+wr] intersected with [0, sk); the interval slides
    # with i, so only the first and last rows can be empty.
    for i in (0, sq - 1):
        lo = 0 if spec.window_left is None else max(0, i + off - spec.window_left)
        hi = sk - 1 if spec.window_right is None else min(sk - 1, i + off + spec.window_right)
        if lo > hi:
            return True
    return False


def fix_forward(out: torch.Tensor, lse: torch.Tensor, v: torch.Tensor, spec: AttentionSpec) -> torch.Tensor:
    sq, sk = out.shape[2], v.shape[2]
    if spec.masked_value == "zero" or not dead_rows_possible(spec, sq, sk):
        return out
    dead = torch.isneginf(lse).unsqueeze(-1)
    if spec.masked_value == "neg_inf":
        fill = torch.full((), float("nan"), dtype=out.dtype, device=out.device)
    else:
        # mean over keys on the kv heads, then mapped to query heads: [B, Hq, 1, Dv], no [B, Hq, Sk, Dv] copy
        vmean = expand_kv(v.float().mean(dim=2, keepdim=True), out.shape[1], spec.gqa_mapping)
        fill = vmean.to(out.dtype)
    return torch.where(dead, fill, out)


def fix_backward(dout, q, k, v, lse, scale, spec: AttentionSpec, dq, dk, dv):
    """Adds the fully-masked rows' gradients (min_* semantics) to dq, dk, dv."""
    sq, sk = q.shape[2], k.shape[2]
    if spec.masked_value in ("neg_inf", "zero") or not dead_rows_possible(spec, sq, sk) or sk == 0:
        return dq, dk, dv
    hq, hk = q.shape[1], k.shape[1]
    # Runs on every call that may have dead rows (no host sync to ask whether it does), so it is
    # kept to kv-head-sized products: sums over keys are taken on K/V before mapping heads, and
    # the matrix products run in bf16 (fp32 accumulation) on tensor cores for bf16 inputs; fp16
    # could overflow in sums over Sk, so fp16 (and fp32) inputs use fp32 products.
    # Rows that are alive have dO_dead = 0, so they receive exactly nothing.
    lp = torch.bfloat16 if q.dtype == torch.bfloat16 else torch.float32
    dead = torch.isneginf(lse).unsqueeze(-1)                   # [B, Hq, Sq, 1]
    do_dead = torch.where(dead, dout, torch.zeros((), dtype=dout.dtype, device=dout.device))
    # dV_j += sum_{dead i} dO_i / Sk, the same for every key j.
    dv_add = reduce_kv(do_dead.float().sum(dim=2, keepdim=True), hk, spec.gqa_mapping) / sk   # [B, Hk, 1, Dv]
    dv = (dv.float() + dv_add).to(dv.dtype)
    if spec.masked_value == "min_additive":
        vmean = expand_kv(v.float().mean(dim=2, keepdim=True), hq, spec.gqa_mapping)     # [B, Hq, 1, Dv]
        d_row = (do_dead.float() * vmean).sum(-1, keepdim=True)                      # D_i = dO_i . vmean
        kv = expand_kv(torch.matmul(k.transpose(-1, -2).to(lp), v.to(lp)), hq, spec.gqa_mapping)  # [B, Hq, D, Dv]
        ksum = expand_kv(k.float().sum(dim=2, keepdim=True), hq, spec.gqa_mapping)    # [B, Hq, 1, D]
        dq_add = (torch.matmul(do_dead.to(lp), kv.transpose(-1, -2)).float() - d_row * ksum) * (scale / sk)
        qd = torch.where(dead, q, torch.zeros((), dtype=q.dtype, device=q.device))
        qdo = torch.matmul(qd.transpose(-1, -2).to(lp), do_dead.to(lp))               # [B, Hq, D, Dv]
        qdsum = (qd.float() * d_row).sum(dim=2, keepdim=True)                        # [B, Hq, 1, D]
        # the group's query heads are summed before the [Sk]-sized product: dk_add on kv heads
        qdo_k = reduce_kv(qdo.float(), hk, spec.gqa_mapping)                         # [B, Hk, D, Dv]
        dk_add = (torch.matmul(v.to(lp), qdo_k.transpose(-1, -2).to(lp)).float()
                  - reduce_kv(qdsum, hk, spec.gqa_mapping)) * (scale / sk)
        dq = (dq.float() + dq_add).to(dq.dtype)
        dk = (dk.float() + dk_add).to(dk.dtype)
    return dq, dk, dv
