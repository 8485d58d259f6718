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
        vmean = expand_kv(v, out.shape[1], spec.gqa_mapping).float().mean(dim=2, keepdim=True)
        fill = vmean.to(out.dtype)
    return torch.where(dead, fill, out)


def fix_backward(dout, q, k, v, lse, scale, spec: AttentionSpec, dq, dk, dv):
    """Adds the fully-masked rows' gradients (min_* semantics) to dq, dk, dv."""
    sq, sk = q.shape[2], k.shape[2]
    if spec.masked_value in ("neg_inf", "zero") or not dead_rows_possible(spec, sq, sk) or sk == 0:
        return dq, dk, dv
    hq, hk = q.shape[1], k.shape[1]
    dead = torch.isneginf(lse).unsqueeze(-1).float()          # [B, Hq, Sq, 1]
    do_dead = dout.float() * dead                               # dO of dead rows only
    vx = expand_kv(v, hq, spec.gqa_mapping).float()
    # dV_j += sum_{dead i} dO_i / Sk, the same for every key j.
    dv_add = do_dead.sum(dim=2, keepdim=True) / sk              # [B, Hq, 1, Dv]
    dv = (dv.float() + reduce_kv(dv_add.expand(-1, -1, sk, -1), hk, spec.gqa_mapping)).to(dv.dtype)
    if spec.masked_value == "min_additive":
        kx = expand_kv(k, hq, spec.gqa_mapping).float()
        vmean = vx.mean(dim=2, keepdim=True)                    # [B, Hq, 1, Dv]
        d_row = (do_dead * vmean).sum(-1, keepdim=True)         # D_i = dO_i . vmean
        kv = torch.matmul(kx.transpose(-1, -2), vx)             # [B, Hq, D, Dv]
        ksum = kx.sum(dim=2, keepdim=True)                      # [B, Hq, 1, D]
        dq_add = (torch.matmul(do_dead, kv.transpose(-1, -2)) - d_row * ksum) * (scale / sk)
        qd = q.float() * dead
        qdo = torch.matmul(qd.transpose(-1, -2), do_dead)       # [B, Hq, D, Dv]
        qdsum = (qd * d_row).sum(dim=2, keepdim=True)           # [B, Hq, 1, D]
        dk_add = (torch.matmul(vx, qdo.transpose(-1, -2)) - qdsum) * (scale / sk)
        dq = (dq.float() + dq_add).to(dq.dtype)
        dk = (dk.float() + reduce_kv(dk_add, hk, spec.gqa_mapping)).to(dk.dtype)
    return dq, dk, dv
