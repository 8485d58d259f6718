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
import torch.fx as fx
from sympy.core.function import AppliedUndef

from . import mask_inputs
from . import nodes as N
from .scores import NoMatch
from .symbolic_mask import E, NotSymbolic, assume_zero_one, compare, classify_additive, split_keep




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
    zero_one = []   # leaves read as 0/1 masks: guarded only if the structural route is taken
    alibi = None    # (kind, slopes node, sign): one bias that is slopes[h] * (j - i) or -|j - i|
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
            ab = alibi_of(b, ev, sq_shape) if mult == 1.0 and alibi is None else None
            if ab is not None:
                alibi = (ab[0], ab[1], -ab[2] if negate else ab[2])   # scores - bias: slopes change sign
                continue
            if negate or mult != 1.0:
                return False
            e = ev.eval(b)
            got = classify_additive(e.expr)
            if got is None:
                # (1 - mask) * finfo.min with an integer/float 0/1 mask: structural under a
                # run-time check that the mask holds only 0 and 1
                e01, leaves01 = assume_zero_one(e.expr, ev)
                got = classify_additive(e01) if leaves01 else None
                if got is None:
                    return False
                zero_one.extend(leaves01)
            keeps.append(got[0])
            kinds.add(got[1])
    except NotSymbolic as exc:
        site.notes.append(("mask_not_symbolic", str(exc)))
        return False
    if "neg_inf" in kinds and len(kinds) > 1:
        return False
    keep = sympy.And(*keeps) if len(keeps) > 1 else (keeps[0] if keeps else sympy.true)
    st = split_keep(keep, sq_shape[-2], sq_shape[-1])
    if not st.explained:
        site.notes.append(("mask_residual", [str(r) for r in st.residual]))
        return False
    if alibi is not None and alibi[0] == "abs" and st.align != "top_left":
        return False   # |j - i| as written is measured from the top-left diagonal
    kp_node = None
    if st.key_padding is not None:
        if not site.has_head_axis:
            return False
        func = st.key_padding[0]
        leaf = next((lf for lf in ev.leaves.values() if lf.func == func), None)
        if leaf is None:
            return False
        ls = N.shape(leaf.node)
        if ls is None or len(ls) != 2 or not N.same_size(ls[0], sq_shape[0]) or not N.same_size(ls[1], sq_shape[-1]):
            site.notes.append(("key_padding_shape", ls))
            return False
        kp_node = leaf.node
    f = site.spec_fields
    if alibi is not None:
        f["alibi"] = alibi[0]
        site.alibi_slopes = (alibi[1], alibi[2])
    f["align"] = st.align
    f["window_left"] = st.window_left
    f["window_right"] = st.window_right
    if kinds <= {"neg_inf"}:            # -inf masks, or nothing masked (an ALiBi bias alone)
        f["masked_value"] = "neg_inf"
    elif "min_additive" in kinds:
        f["masked_value"] = "min_additive"
    else:
        f["masked_value"] = "min_fill"
    if kp_node is not None:
        f["key_padding"] = True
        site.key_padding = kp_node
    for lf in zero_one:
        if "01" not in lf.guards:
            lf.guards.append("01")
    for lf in ev.leaves.values():
        site.guards.extend((lf.node, g) for g in lf.guards)
    site.mask_route = "structural"
    return True


_PLACE_KEEPING = {"squeeze", "unsqueeze", "contiguous"}   # ops that move no element


def _through_layout(b):
    """Step back from the bias added to the scores through casts and layout-only ops that keep
    each element at its (head, query, key) place: squeeze/unsqueeze of size-1 axes and slices
    with step 1 (HF MPT builds ALiBi for max_seq_len, squeezes the batch axis and slices the
    last Sq x Sk corner).  Returns (node, shifted): shifted when a slice may start past 0."""
    node, shifted = b, False
    while True:
        k = N.kind(node)
        if k in N.CASTS or k in _PLACE_KEEPING:
            node = N.arg(node, 0, "input")
        elif k == "getitem" and isinstance(node.args[0], fx.Node) and isinstance(node.args[1], tuple):
            for idx in node.args[1]:
                if idx is Ellipsis or (isinstance(idx, slice) and idx.step in (None, 1)):
                    shifted = shifted or (isinstance(idx, slice) and idx.start not in (None, 0))
                else:
                    return node, shifted
            node = node.args[0]
        else:
            return node, shifted


def _same_alignment(bias, inner) -> bool:
    """The layout ops between inner and bias moved no axis: right-aligned and without leading 1s
    the shapes have the same rank, the same heads axis, and keys/queries only cut by slices."""
    def trim(node):
        sh = N.shape(node)
        if sh is None:
            return None
        sh = list(sh)
        while sh and N.static_int(sh[0]) == 1:
            sh.pop(0)
        return sh
    a, c = trim(bias), trim(inner)
    if a is None or c is None or len(a) != len(c) or len(a) > 4:
        return False
    for pos, (x, y) in enumerate(zip(a, c)):
        if N.same_size(x, y):
            continue
        if len(a) - pos > 2:         # heads or batch axis: must be untouched
            return False
        xs, ys = N.static_int(x), N.static_int(y)
        if xs is None or ys is None or xs > ys:
            return False
    return True


def alibi_of(b, ev, sq_shape):
    """ALiBi written in the graph: bias = slopes * rel (or -(slopes * rel)) where `slopes` varies
    only along the head axis and rel evaluates to j - i (+ anything per row: softmax ignores it)
    -> ("linear", slopes, sign), or to -|j - i| / |j - i| -> ("abs", slopes, sign).
    sign is +1 or -1 (the slopes passed to the op are sign * slopes)."""
    sign = 1.0
    node, shifted = _through_layout(b)
    if N.kind(node) == "neg":
        sign, node = -1.0, N.arg(node, 0, "input")
    if N.kind(node) != "mul" or len(sq_shape) != 4 or not _same_alignment(b, node):
        return None
    x, y = N.arg(node, 0, "input"), N.arg(node, 1, "other")
    for slopes, rel in ((x, y), (y, x)):
        if not isinstance(slopes, fx.Node) or not isinstance(rel, fx.Node) or not _heads_only(slopes, sq_shape):
            continue
        t = N.tensor_meta(slopes)
        if t is None or t.requires_grad or not t.is_floating_point():
            continue
        try:
            r = ev.eval(rel)
        except NotSymbolic:
            continue
        if r.is_bool:
            continue
        e = sympy.expand(r.expr)
        j, i = E[1], E[2]
        if e.coeff(j) == 1 and not sympy.expand(e - j).has(j, E[3], E[4]) and not e.atoms(AppliedUndef):
            return ("linear", slopes, sign)      # a sliced-off key/query offset only shifts rows
        if shifted:
            continue                             # |j - i| with an offset is another bias
        for a_sign, expr in ((-1.0, -e), (1.0, e)):
            if isinstance(expr, sympy.Abs) and sympy.expand(expr.args[0] ** 2 - (j - i) ** 2) == 0:
                # bias = a_sign * slopes * |j - i|; the spec's "abs" is -slope * |j - i|
                return ("abs", slopes, -a_sign * sign)
    return None


def _heads_only(x, sq_shape) -> bool:
    sh = N.shape(x)
    if sh is None or len(sh) > 4:
        return False
    sh = (1,) * (4 - len(sh)) + tuple(sh)
    return (all(N.static_int(sh[d]) == 1 for d in (0, 2, 3)) and N.same_size(sh[1], sq_shape[1])
            and N.static_int(sq_shape[1]) != 1)


def _tensor_route(site, biases, fills, score_dtype):
    f = site.spec_fields
    kinds = {fill_semantics(val, score_dtype) for _, _, val in fills}
    if fills and biases and "min_fill" in kinds:
        # GPT-2 before transformers 4.40: where(causal, s, finfo.min) + additive mask.  In a row
        # masked by both, eager's weights depend on rounding (finfo.min + finfo.min overflows to
        # -inf, finfo.min + s rounds to finfo.min) and its gradient flows through the added
        # entries only; no mask kind reproduces that (docs/semantics.md).
        raise NoMatch("where(mask, scores, finfo.min) combined with an additive mask: eager's fully masked "
                      "rows (uniform over the entries that did not overflow to -inf, gradient through the "
                      "added entries only) cannot be reproduced exactly; left to Inductor")
    if fills and not biases and len(kinds) == 1:
        f["mask_kind"] = "bool"
        f["masked_value"] = kinds.pop()
        site.bias = ("bool", [(cond, keep_is_cond) for cond, keep_is_cond, _ in fills])
    else:
        # One additive tensor: a bias (taken as finfo.min where it masks, which is what
        # transformers and most code build), or fills of mixed kinds.  Entries <= BIAS_MASKED are
        # masks (spec.py), and a fully masked row is uniform, as in eager with finfo.min; an
        # all -inf additive row (NaN in eager) differs.  Fills alone of one kind took the bool route.
        f["mask_kind"] = "additive"
        f["masked_value"] = "min_additive"
        site.bias = ("additive", list(biases), [(cond, keep_is_cond, val) for cond, keep_is_cond, val in fills])
    site.mask_route = "tensor"
