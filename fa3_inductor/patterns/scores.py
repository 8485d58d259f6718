"""Walking from a softmax's input up to the Q K^T product.

Every step between the product and the softmax is one of:
  ("cast",)                     dtype casts, contiguous/clone
  ("scale", value, is_div)      x * c, x / c with a scalar c
  ("softcap", c)                tanh(x / c) * c
  ("bias", node, negate)        x + b, x - b  (b does not depend on the scores)
  ("fill", cond_node, keep_is_cond, value)   masked_fill / where with a scalar
  ("heads_view", node)          a view/reshape that splits [B*H, Sq, Sk] into [B, H, Sq, Sk] or
                                merges it back (MBart adds its mask in a 4-D view of bmm scores)
The walk returns the product node and the steps in the order they are applied
(innermost first), or raises NoMatch with the reason.
"""
from __future__ import annotations

import math
from typing import Any

import torch.fx as fx

from . import nodes as N
from .operands import constant_scalar, scalar_value

PRODUCTS = ("matmul", "bmm", "einsum")


class NoMatch(Exception):
    pass


def _fill_value(x: Any):
    if isinstance(x, (int, float)) and not isinstance(x, bool):
        return float(x)
    c = constant_scalar(x)
    return None if c is None else float(c)


def walk_scores(start: fx.Node, softmax: fx.Node):
    steps = []
    cur = start
    while True:
        k = N.kind(cur)
        others = [u for u in N.value_users(cur) if u is not softmax] if cur is start else N.value_users(cur)
        if (cur is start and others) or (cur is not start and len(others) > 1):
            raise NoMatch(f"the scores at '{cur.name}' have another use besides the softmax")
        if k in PRODUCTS:
            steps.reverse()
            return cur, steps
        if k in N.CASTS or k in N.VALUE_PRESERVING:
            steps.append(("cast",))
            cur = N.arg(cur, 0, "input")
            continue
        if k in ("mul", "div"):
            a, b = N.arg(cur, 0, "input"), N.arg(cur, 1, "other")
            cb, ca = scalar_value(b), (scalar_value(a) if k == "mul" else None)
            tensor_side = a if cb is not None else (b if ca is not None else None)
            c = cb if cb is not None else ca
            if tensor_side is None or not isinstance(tensor_side, fx.Node):
                raise NoMatch(f"the scores are multiplied by a tensor at '{cur.name}' (not a scalar scale)")
            if k == "div" and cur.kwargs.get("rounding_mode") is not None:
                raise NoMatch(f"the scores are divided with rounding at '{cur.name}'")
            if k == "mul" and N.kind(tensor_side) == "tanh":
                inner = N.arg(tensor_side, 0, "input")
                cap = _softcap_inner(inner, c)
                if cap is not None:
                    steps.append(("softcap", cap))
                    cur = N.arg(inner, 0, "input")
                    continue
            steps.append(("scale", c, k == "div"))
            cur = tensor_side
            continue
        if k in ("add", "sub"):
            a, b = N.arg(cur, 0, "input"), N.arg(cur, 1, "other")
            if N.arg(cur, 2, "alpha", 1) != 1:
                raise NoMatch(f"add with alpha at '{cur.name}'")
            side, other = _scores_side(a, b)
            if side is None:
                raise NoMatch(f"neither operand of '{cur.name}' leads to a Q K^T product")
            if k == "sub" and side is b:
                raise NoMatch(f"the scores are subtracted from a tensor at '{cur.name}'")
            negate = k == "sub"
            if not isinstance(other, fx.Node) or N.tensor_meta(other) is None:
                if isinstance(other, (int, float)):
                    steps.append(("cast",))  # adding a constant to every score changes nothing
                    cur = side
                    continue
                raise NoMatch(f"the scores are offset by a non-tensor at '{cur.name}'")
            steps.append(("bias", other, negate))
            cur = side
            continue
        if k == "masked_fill":
            x, cond, value = N.arg(cur, 0, "input"), N.arg(cur, 1, "mask"), N.arg(cur, 2, "value")
            fv = _fill_value(value)
            if fv is None:
                raise NoMatch(f"masked_fill with a non-constant value at '{cur.name}'")
            steps.append(("fill", cond, False, fv))
            cur = x
            continue
        if k == "where":
            cond, a, b = N.arg(cur, 0, "condition"), N.arg(cur, 1, "input"), N.arg(cur, 2, "other")
            fa, fb = _fill_value(a), _fill_value(b)
            if fb is not None and isinstance(a, fx.Node) and N.tensor_meta(a) is not None and fa is None:
                steps.append(("fill", cond, True, fb))
                cur = a
                continue
            if fa is not None and isinstance(b, fx.Node) and N.tensor_meta(b) is not None and fb is None:
                steps.append(("fill", cond, False, fa))
                cur = b
                continue
            raise NoMatch(f"torch.where at '{cur.name}' does not choose between the scores and a constant")
        if k in ("view", "reshape"):
            src = N.arg(cur, 0, "input")
            if _heads_view(N.shape(src), N.shape(cur)):
                steps.append(("heads_view", cur))
                cur = src
                continue
        what = cur.target if cur.op != "call_function" else getattr(cur.target, "__name__", cur.target)
        raise NoMatch(f"the scores go through '{what}' at '{cur.name}', which AttentionSpec cannot express")


def _heads_view(a, b) -> bool:
    """[N, Sq, Sk] <-> [B, H, Sq, Sk] with N = B * H: only the leading dims are split or merged."""
    if a is None or b is None or {len(a), len(b)} != {3, 4}:
        return False
    three, four = (a, b) if len(a) == 3 else (b, a)
    return (N.same_size(three[1], four[2]) and N.same_size(three[2], four[3])
            and N.same_size(three[0], four[0] * four[1]))


def _softcap_inner(inner: Any, c_out):
    """inner = x / c or x * (1/c) with the same c as the outer multiply -> c."""
    if not isinstance(inner, fx.Node) or len(inner.users) != 1:
        return None
    k = N.kind(inner)
    if k not in ("div", "mul"):
        return None
    c_in = scalar_value(N.arg(inner, 1, "other"))
    if c_in is None or isinstance(c_in, fx.Node) or isinstance(c_out, fx.Node):
        return None
    c_in = float(c_in) if k == "div" else 1.0 / float(c_in)
    if c_in > 0 and math.isclose(c_in, float(c_out), rel_tol=1e-6):
        return float(c_out)
    return None


def _reaches_product(x: Any, depth: int = 64) -> bool:
    """Does x lead (through unary steps and adds) to a matmul/bmm/einsum?"""
    seen = 0
    stack = [x]
    while stack and seen < 4 * depth:
        n = stack.pop()
        seen += 1
        if not isinstance(n, fx.Node):
            continue
        if N.kind(n) in PRODUCTS:
            return True
        if N.kind(n) is None:
            continue
        stack.extend(a for a in n.all_input_nodes)
    return False


def _scores_side(a, b):
    ra, rb = _reaches_product(a), _reaches_product(b)
    if ra and not rb:
        return a, b
    if rb and not ra:
        return b, a
    if ra and rb:
        # Both reach a product (e.g. a bias computed with its own matmul): the scores are the
        # side whose shape is the add's shape and which is used only here.
        for side, other in ((a, b), (b, a)):
            if isinstance(side, fx.Node) and len(side.users) == 1 and N.kind(side) in PRODUCTS + ("mul", "div"):
                return side, other
    return None, None
