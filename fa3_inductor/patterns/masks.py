"""From the masks and biases found on the scores to spec fields and op inputs.

First the structural route: every mask/bias is evaluated symbolically (symbolic_mask.py);
if the combined keep-condition is fully explained by diagonal bounds and a [B, Sk] key
padding vector, the spec says so and no mask tensor reaches the kernel.  Otherwise the
tensor route: the masks stay tensors (a bool keep-mask, or one additive bias), read by
tile with broadcast strides, which is always exact.
"""
from __future__ import annotations

import sympy
import torch

from . import mask_inputs
from . import nodes as N
from .scores import NoMatch
from .symbolic_mask import NotSymbolic, compare, classify_additive, split_keep




def is_min(val) -> bool:
    try:
        f = float(val)
    except (TypeError, ValueError):
        return False
    return f != float("-inf") and f <= -1e4


def fill_semantics(val: float, score_dtype) -> str | None:
    """masked_value for a fill constant, or None when the constant is not a mask value."""
    if val == float("-inf"):
        return "neg_inf"
    if is_min(val):
        # A constant too large for the scores' dtype becomes -inf there.
        if score_dtype is not None and score_dtype.is_floating_point and val < torch.finfo(score_dtype).min:
            return "neg_inf"
        return "min_fill"
    return None


def _broadcastable(mask_shape, sq_shape) -> bool:
    if mask_shape is None or len(mask_shape) > len(sq_shape):
        return False
    for m, s in zip(reversed(mask_shape), reversed(sq_shape)):
        if N.static_int(m) != 1 and not N.same_size(m, s):
            return False
    return True


def apply(site, biases: list, fills: list, ev, sq_shape: tuple, score_dtype):
    """sq_shape/score_dtype: the scores' shape [.., Sq, Sk] and dtype."""
    if not biases and not fills:
        return
    for b, _, _ in biases:
        if not _broadcastable(N.shape(b), sq_shape):
            raise NoMatch(f"the bias '{b.name}' of shape {N.shape(b)} does not broadcast to the scores "
                          f"{tuple(sq_shape)}")
    for cond, _, val in fills:
        if not _broadcastable(N.shape(cond), sq_shape):
            raise NoMatch(f"the mask '{getattr(cond, 'name', cond)}' does not broadcast to the scores")
        if fill_semantics(val, score_dtype) is None:
            raise NoMatch(f"masked_fill/where with value {val} is not a mask (-inf or a large negative)")
    if _structural(site, biases, fills, ev, sq_shape, score_dtype):
        return
    if mask_inputs.try_speculate(site, biases, fills, ev, sq_shape, score_dtype):
        return
    _tensor_route(site, biases, fills, score_dtype)


def _structural(site, biases, fills, ev, sq_shape, score_dtype) -> bool:
    keeps, kinds = [], set()
    try:
        for cond, keep_is_cond, val in fills:
            c = ev.eval(cond)
            if not c.is_bool:
                c_expr = compare(sympy.Ne, c.expr, sympy.Integer(0))
            else:
                c_expr = c.expr
            keeps.append(c_expr if keep_is_cond else sympy.Not(c_expr))
            kinds.add(fill_semantics(val, score_dtype))
        for b, negate, mult in biases:
            if negate or mult != 1.0:
                return False
            e = ev.eval(b)
            got = classify_additive(e.expr)
            if got is None:
                return False
            keeps.append(got[0])
            kinds.add(got[1])
    except NotSymbolic as exc:
        site.notes.append(("mask_not_symbolic", str(exc)))
        return False
    if "neg_inf" in kinds and len(kinds) > 1:
        return False
    keep = sympy.And(*keeps) if len(keeps) > 1 else keeps[0]
    st = split_keep(keep, sq_shape[-2], sq_shape[-1])
    if not st.explained:
        site.notes.append(("mask_residual", [str(r) for r in st.residual]))
        return False
    kp_node = None
    if st.key_padding is not None:
        if site.rank != 4:
            return False
        func = st.key_padding[0]
        leaf = next((lf for lf in ev.leaves.values() if lf.func == func), None)
        if leaf is None:
            return False
        ls = N.shape(leaf.node)
        if ls is None or len(ls) != 2 or not _same(ls[0], sq_shape[0]) or not _same(ls[1], sq_shape[-1]):
            site.notes.append(("key_padding_shape", ls))
            return False
        kp_node = leaf.node
    f = site.spec_fields
    f["align"] = st.align
    f["window_left"] = st.window_left
    f["window_right"] = st.window_right
    if kinds == {"neg_inf"}:
        f["masked_value"] = "neg_inf"
    elif "min_additive" in kinds:
        f["masked_value"] = "min_additive"
    else:
        f["masked_value"] = "min_fill"
    if kp_node is not None:
        f["key_padding"] = True
        site.key_padding = kp_node
    for lf in ev.leaves.values():
        site.guards.extend((lf.node, g) for g in lf.guards)
    site.mask_route = "structural"
    return True


def _same(a, b) -> bool:
    return N.same_size(a, b)


def _tensor_route(site, biases, fills, score_dtype):
    f = site.spec_fields
    kinds = {fill_semantics(val, score_dtype) for _, _, val in fills}
    if fills and not biases and len(kinds) == 1:
        f["mask_kind"] = "bool"
        f["masked_value"] = kinds.pop()
        site.bias = ("bool", [(cond, keep_is_cond) for cond, keep_is_cond, _ in fills])
    else:
        # One additive tensor: literal values, so fully masked rows behave exactly as in eager
        # (finite minimums give uniform rows, -inf gives NaN through the contract's dead rows).
        f["mask_kind"] = "additive"
        # Entries <= BIAS_MASKED are masks (spec.py); a row of finfo.min entries is uniform in
        # eager, a row of -inf entries NaN.  Fills say which; a bias tensor is taken as finfo.min
        # (what transformers and most code build); an all -inf additive row then differs.
        only_inf = bool(fills) and not biases and kinds == {"neg_inf"}
        f["masked_value"] = "neg_inf" if only_inf else "min_additive"
        site.bias = ("additive", list(biases), [(cond, keep_is_cond, val) for cond, keep_is_cond, val in fills])
    site.mask_route = "tensor"
