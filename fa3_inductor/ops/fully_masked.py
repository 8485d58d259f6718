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

from ..reference import group_heads, ungroup_heads
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
        return out.masked_fill(dead, float("nan"))
    # uniform weights over all keys: mean of V, taken on the kv heads
    hk = v.shape[1]
    vmean = v.mean(dim=2, keepdim=True, dtype=torch.float32).to(out.dtype).unsqueeze(2)   # [B, Hk, 1, 1, Dv]
    fixed = torch.where(group_heads(dead, hk, spec.gqa_mapping), vmean, group_heads(out, hk, spec.gqa_mapping))
    return ungroup_heads(fixed, spec.gqa_mapping)


def fix_backward(dout, q, k, v, lse, scale, spec: AttentionSpec, dq, dk, dv):
    """Adds the fully-masked rows' gradients (min_* semantics) to dq, dk, dv."""
    sq, sk = q.shape[2], k.shape[2]
    if spec.masked_value in ("neg_inf", "zero") or not dead_rows_possible(spec, sq, sk) or sk == 0:
        return dq, dk, dv
    # Runs on every call that may have dead rows (no host sync to ask whether it does), so it is
    # written for few launches: query heads are viewed as [B, Hk, G, ...] against K/V's kv heads
    # (no copies to query heads), group sums fold into the products, and the products run in
    # bf16 with fp32 accumulation for bf16 inputs (fp16 could overflow in sums over Sk: fp32).
    # Rows that are alive have dO_dead = 0, so they receive exactly nothing.
    hk, mp = k.shape[1], spec.gqa_mapping
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    lp = torch.bfloat16 if q.dtype == torch.bfloat16 else acc
    dead = group_heads(torch.isneginf(lse).unsqueeze(-1), hk, mp)               # [B, Hk, G, Sq, 1]
    do_dead = group_heads(dout, hk, mp) * dead                                 # [B, Hk, G, Sq, Dv]
    # dV_j += sum_{dead i} dO_i / Sk, the same for every key j.
    dv_add = do_dead.sum(dim=(2, 3), dtype=acc).unsqueeze(2)       # [B, Hk, 1, Dv]
    dv = dv.to(acc).add_(dv_add, alpha=1.0 / sk).to(dv.dtype)
    if spec.masked_value != "min_additive":
        return dq, dk, dv
    b, _, g = do_dead.shape[:3]
    do_lp = do_dead.to(lp)
    vmean = v.mean(dim=2, dtype=acc)                                # [B, Hk, Dv]
    d_row = torch.matmul(do_dead.to(acc), vmean[:, :, None, :, None])         # D_i = dO_i . vmean  [B, Hk, G, Sq, 1]
    kv = torch.matmul(k.transpose(-1, -2).to(lp), v.to(lp))                   # [B, Hk, D, Dv]
    ksum = k.sum(dim=2, dtype=acc)[:, :, None, None, :]             # [B, Hk, 1, 1, D]
    # dS_ij = (dO_i . v_j - D_i) / Sk  ->  dq_i = scale/Sk * (dO_i K^T V - D_i sum_j k_j)
    dq_add = torch.matmul(do_lp, kv.transpose(-1, -2).unsqueeze(2)).to(acc).sub_(d_row * ksum)
    dq = ungroup_heads(group_heads(dq, hk, mp).to(acc).add_(dq_add, alpha=scale / sk), mp).to(dq.dtype)
    # dk_j = scale/Sk * sum_{dead i} q_i (dO_i . v_j - D_i), summed over the group's query heads
    qd = (group_heads(q, hk, mp) * dead).to(lp).reshape(b, hk, g * sq, -1)      # [B, Hk, G*Sq, D]
    qdo = torch.matmul(qd.transpose(-1, -2), do_lp.reshape(b, hk, g * sq, -1))    # [B, Hk, D, Dv]
    qdsum = torch.matmul(qd.transpose(-1, -2).to(acc), d_row.reshape(b, hk, g * sq, 1))  # [B, Hk, D, 1]
    dk_add = torch.matmul(v.to(lp), qdo.transpose(-1, -2)).to(acc).sub_(qdsum.transpose(-1, -2))
    dk = dk.to(acc).add_(dk_add, alpha=scale / sk).to(dk.dtype)
    return dq, dk, dv
