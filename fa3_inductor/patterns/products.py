"""The two products of attention, read in any spelling: matmul/@, bmm, einsum.

`read_qk(node)` -> (a, b_t, perm_a, perm_b) with a = [batch.., Sq, D] and b_t = [batch.., D, Sk]
after the optional permutes (einsum operands can come in any letter order).
`read_pv(node, p)` -> (v, perm_v, out_perm) with v = [batch.., Sk, Dv].
Permutations are lists to apply with Tensor.permute, or None when the operand is already in order.
"""
from __future__ import annotations

from typing import Optional

import torch.fx as fx

from . import nodes as N
from .scores import NoMatch


def _parse_einsum(node: fx.Node):
    eq = node.args[0]
    operands = node.args[1:]
    if len(operands) == 1 and isinstance(operands[0], (list, tuple)):
        operands = operands[0]
    if not isinstance(eq, str) or len(operands) != 2 or "..." in eq or "->" not in eq:
        raise NoMatch(f"einsum '{eq}' is not a two-operand explicit equation")
    lhs, out = eq.replace(" ", "").split("->")
    ins = lhs.split(",")
    if len(ins) != 2:
        raise NoMatch(f"einsum '{eq}' does not have two operands")
    return ins[0], ins[1], out, operands[0], operands[1]


def _perm(src: str, dst: str) -> Optional[list]:
    p = [src.index(c) for c in dst]
    return None if p == list(range(len(src))) else p


def read_qk(node: fx.Node):
    k = N.kind(node)
    if k in ("matmul", "bmm"):
        a, b = N.arg(node, 0, "input"), N.arg(node, 1, "other" if k == "matmul" else "mat2")
        sa, sb = N.shape(a), N.shape(b)
        if sa is None or sb is None or len(sa) != len(sb) or len(sa) not in (3, 4):
            raise NoMatch("Q K^T operands are not both 3-D or both 4-D")
        return a, b, None, None
    ea, eb, eo, a, b = _parse_einsum(node)
    contracted = [c for c in ea if c in eb and c not in eo]
    batch = [c for c in eo if c in ea and c in eb]
    qf = [c for c in ea if c not in eb]
    kf = [c for c in eb if c not in ea]
    if len(contracted) != 1 or len(qf) != 1 or len(kf) != 1 or len(eo) not in (3, 4) \
            or eo != "".join(batch) + qf[0] + kf[0] or len(ea) != len(eo) or len(eb) != len(eo):
        raise NoMatch(f"einsum '{node.args[0]}' is not a batched Q K^T with scores [batch.., q, k]")
    d = contracted[0]
    pa = _perm(ea, "".join(batch) + qf[0] + d)
    pb = _perm(eb, "".join(batch) + d + kf[0])
    return a, b, pa, pb


def read_pv(node: fx.Node, p: fx.Node):
    k = N.kind(node)
    if k in ("matmul", "bmm"):
        a, b = N.arg(node, 0, "input"), N.arg(node, 1, "other" if k == "matmul" else "mat2")
        if a is not p:
            raise NoMatch("the probabilities are not the left operand of the P V product")
        if N.ndim(b) != N.ndim(a):
            raise NoMatch("P and V differ in rank")
        return b, None, None
    ea, eb, eo, a, b = _parse_einsum(node)
    if a is not p:
        raise NoMatch("the probabilities are not the first einsum operand of the P V product")
    batch, qf, kf = ea[:-2], ea[-2], ea[-1]
    df = [c for c in eb if c not in ea]
    if len(df) != 1 or sorted(eb) != sorted(batch + kf + df[0]) or sorted(eo) != sorted(batch + qf + df[0]):
        raise NoMatch(f"einsum '{node.args[0]}' is not P V contracting the key axis")
    pv = _perm(eb, batch + kf + df[0])
    out_perm = _perm(batch + qf + df[0], eo)
    return b, pv, out_perm
