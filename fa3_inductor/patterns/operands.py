"""Peeling the operands of the two attention products back to q, k and v.

Each helper looks at one node and says what it means, or returns None:
  peel_scale     x * c, x / c with a scalar c       -> (x, factor)
  peel_last_transpose  x.transpose(-2, -1), x.mT, permute swapping the last two dims -> x
  peel_repeat_kv the GQA repeats: repeat_kv (expand + reshape), repeat_interleave, repeat
                 -> (base, group, mapping) where mapping "div" means head h reads kv head h // group
"""
from __future__ import annotations

from typing import Any, Optional

import torch.fx as fx

from . import nodes as N


def scalar_value(x: Any) -> Optional[Any]:
    """A scalar usable as a scale: python number, SymFloat/SymInt node, or a 0-d constant tensor."""
    if isinstance(x, (int, float)) and not isinstance(x, bool):
        return x
    if isinstance(x, fx.Node):
        if N.is_scalar(x):
            return x
        const = constant_scalar(x)
        if const is not None:
            return const
    return None


def constant_scalar(node: Any) -> Optional[float]:
    """torch.tensor(c) / torch.full([], c) / torch.finfo-based 0-d constants built in the graph."""
    if not isinstance(node, fx.Node):
        return None
    t = N.tensor_meta(node)
    if t is None or t.dim() != 0:
        return None
    k = N.kind(node)
    if k == "full":
        v = N.arg(node, 1, "fill_value")
        return v if isinstance(v, (int, float)) else None
    if node.op == "call_function" and getattr(node.target, "__name__", "") == "tensor":
        v = N.arg(node, 0, "data")
        return v if isinstance(v, (int, float)) else None
    if k in N.CASTS or k in N.VALUE_PRESERVING:
        return constant_scalar(N.arg(node, 0, "input"))
    return None


def peel_scale(x: fx.Node):
    """x = y * c or y / c (c scalar, x used once) -> (y, c, is_div)."""
    k = N.kind(x)
    if k not in ("mul", "div") or len(x.users) != 1:
        return None
    a, b = N.arg(x, 0, "input"), N.arg(x, 1, "other")
    if k == "div" and x.kwargs.get("rounding_mode") is not None:
        return None
    cb = scalar_value(b)
    if isinstance(a, fx.Node) and N.tensor_meta(a) is not None and cb is not None:
        return a, cb, k == "div"
    if k == "mul":
        ca = scalar_value(a)
        if isinstance(b, fx.Node) and N.tensor_meta(b) is not None and ca is not None:
            return b, ca, False
    return None


def peel_last_transpose(x: fx.Node) -> Optional[fx.Node]:
    r = N.ndim(x)
    k = N.kind(x)
    if k == "transpose":
        d0, d1 = N.arg(x, 1, "dim0"), N.arg(x, 2, "dim1")
        if isinstance(d0, int) and isinstance(d1, int) and \
                {N.norm_dim(d0, r), N.norm_dim(d1, r)} == {r - 2, r - 1}:
            return N.arg(x, 0, "input")
    if k == "permute":
        dims = x.args[1:] if len(x.args) > 2 else N.arg(x, 1, "dims")
        if len(dims) == 1 and isinstance(dims[0], (list, tuple)):
            dims = dims[0]
        dims = [N.norm_dim(d, r) for d in dims]
        if dims == list(range(r - 2)) + [r - 1, r - 2]:
            return N.arg(x, 0, "input")
    if k in ("t", "mT") and r >= 2:
        return N.arg(x, 0, "input")
    return None


def _int(x) -> Optional[int]:
    return N.static_int(x)


def peel_repeat_kv(x: fx.Node):
    """-> (base [B, Hk, S, D], group, mapping) for the GQA repeat forms, else None."""
    k = N.kind(x)
    out_shape = N.shape(x)
    if out_shape is None or len(out_shape) != 4:
        return None
    if k == "repeat_interleave":
        base = N.arg(x, 0, "input")
        reps = _int(N.arg(x, 1, "repeats"))
        dim = N.arg(x, 2, "dim")
        if reps is None or dim is None or N.norm_dim(dim, 4) != 1 or N.ndim(base) != 4:
            return None
        return base, reps, "div"
    if k == "repeat":
        base = N.arg(x, 0, "input")
        reps = list(x.args[1:]) if len(x.args) > 2 else N.arg(x, 1, "sizes")
        if isinstance(reps, (list, tuple)) and len(reps) == 1 and isinstance(reps[0], (list, tuple)):
            reps = list(reps[0])
        reps = [_int(r) for r in reps]
        if len(reps) != 4 or reps[0] != 1 or reps[2] != 1 or reps[3] != 1 or reps[1] is None:
            return None
        return base, reps[1], "mod"
    if k in ("reshape", "view"):
        ex = N.arg(x, 0, "input")
        if N.kind(ex) != "expand":
            return None
        ex_shape = N.shape(ex)
        src = N.arg(ex, 0, "input")
        src_shape = N.shape(src)
        if ex_shape is None or len(ex_shape) != 5 or src_shape is None or len(src_shape) != 5:
            return None
        # The inserted axis is where the source has size 1 and the expand does not.
        axis = [i for i in (1, 2) if _int(src_shape[i]) == 1 and _int(ex_shape[i]) != 1]
        if len(axis) != 1:
            return None
        axis = axis[0]
        base = _unsqueezed_base(src, axis)
        if base is None:
            return None
        group = _int(ex_shape[axis])
        return base, group, ("div" if axis == 2 else "mod")
    return None


def _unsqueezed_base(src: fx.Node, axis: int) -> Optional[fx.Node]:
    """src = base.unsqueeze(axis) or base[:, :, None] (axis 2) / base[:, None] (axis 1)."""
    k = N.kind(src)
    if k == "unsqueeze":
        d = N.arg(src, 1, "dim")
        if isinstance(d, int) and N.norm_dim(d, 5) == axis:
            return N.arg(src, 0, "input")
        return None
    if k == "getitem":
        base, idx = src.args
        if not isinstance(idx, tuple) or N.ndim(base) != 4:
            return None
        items = list(idx)
        if Ellipsis in items:
            return None
        nones = [i for i, it in enumerate(items) if it is None]
        full = all(it is None or (isinstance(it, slice) and it == slice(None)) for it in items)
        if full and nones == [axis]:
            return base
    return None
