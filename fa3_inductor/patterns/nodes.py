"""A canonical view of Dynamo FX nodes.

Dynamo keeps the user's spelling: `a @ b` is operator.matmul, `torch.matmul`, or the
method call `a.matmul(b)`; softmax is F.softmax, torch.softmax or `x.softmax(...)`.
`kind(node)` maps every spelling to one name so the matcher reads like the math, and
`arg(node, i, name)` fetches an argument wherever it was passed (positional or keyword;
for method calls, argument 0 is the tensor itself, as for the functions).
"""
from __future__ import annotations

import operator
from typing import Any, Optional

import torch
import torch.fx as fx
import torch.nn.functional as F

_FUNCTIONS = {
    operator.matmul: "matmul", torch.matmul: "matmul", torch.bmm: "bmm", torch.einsum: "einsum",
    F.softmax: "softmax", torch.softmax: "softmax", torch.Tensor.softmax: "softmax",
    torch.nn.functional.log_softmax: "log_softmax",
    operator.mul: "mul", torch.mul: "mul", operator.truediv: "div", torch.div: "div",
    torch.true_divide: "div",
    operator.add: "add", torch.add: "add", operator.sub: "sub", torch.sub: "sub",
    operator.neg: "neg", torch.neg: "neg",
    torch.where: "where", torch.masked_fill: "masked_fill",
    torch.tanh: "tanh", F.tanh: "tanh",
    F.dropout: "dropout", torch.dropout: "dropout",
    torch.transpose: "transpose", torch.permute: "permute", torch.repeat_interleave: "repeat_interleave",
    torch.reshape: "reshape", torch.unsqueeze: "unsqueeze", torch.squeeze: "squeeze",
    operator.getitem: "getitem",
    operator.eq: "eq", torch.eq: "eq", operator.ne: "ne", torch.ne: "ne",
    operator.le: "le", torch.le: "le", operator.lt: "lt", torch.lt: "lt",
    operator.ge: "ge", torch.ge: "ge", operator.gt: "gt", torch.gt: "gt",
    operator.and_: "and", torch.logical_and: "and", torch.bitwise_and: "and",
    operator.or_: "or", torch.logical_or: "or", torch.bitwise_or: "or",
    operator.invert: "not", torch.logical_not: "not", torch.bitwise_not: "not",
    torch.arange: "arange", torch.tril: "tril", torch.triu: "triu",
    torch.ones: "ones", torch.zeros: "zeros", torch.full: "full", torch.ones_like: "ones_like",
    torch.zeros_like: "zeros_like", torch.full_like: "full_like",
    torch.abs: "abs", operator.abs: "abs",
    torch.cat: "cat", torch.broadcast_to: "expand",
    F.scaled_dot_product_attention: "sdpa",
    torch.clone: "clone",
    torch.tensor: "tensor", torch.scalar_tensor: "tensor",
    torch.diff: "diff", torch.cumsum: "cumsum",
}

_METHODS = {
    "matmul": "matmul", "bmm": "bmm", "softmax": "softmax", "log_softmax": "log_softmax",
    "mul": "mul", "mul_": None, "div": "div", "add": "add", "sub": "sub", "neg": "neg",
    "masked_fill": "masked_fill", "tanh": "tanh",
    "transpose": "transpose", "permute": "permute", "view": "view", "reshape": "reshape",
    "expand": "expand", "expand_as": "expand_as", "repeat": "repeat",
    "repeat_interleave": "repeat_interleave",
    "contiguous": "contiguous", "clone": "clone", "unsqueeze": "unsqueeze", "squeeze": "squeeze",
    "to": "to", "float": "float", "half": "half", "bfloat16": "bfloat16", "double": "double",
    "type_as": "type_as", "type": "type",
    "bool": "bool", "int": "int", "long": "long",
    "eq": "eq", "ne": "ne", "le": "le", "lt": "lt", "ge": "ge", "gt": "gt",
    "logical_and": "and", "logical_or": "or", "logical_not": "not", "bitwise_not": "not",
    "__and__": "and", "__or__": "or", "__invert__": "not",
    "tril": "tril", "triu": "triu", "new_ones": "new_ones", "new_zeros": "new_zeros",
    "new_full": "new_full", "abs": "abs", "t": "t", "mT": "mT", "diff": "diff", "cumsum": "cumsum",
    # Dynamo (torch 2.11 at least) records some operators on tensors as dunder method calls.
    "__eq__": "eq", "__ne__": "ne", "__le__": "le", "__lt__": "lt", "__ge__": "ge", "__gt__": "gt",
    "__add__": "add", "__radd__": "add", "__mul__": "mul", "__rmul__": "mul", "__sub__": "sub",
    "__truediv__": "div", "__neg__": "neg", "__matmul__": "matmul", "__getitem__": "getitem",
    "__rsub__": "rsub", "__rtruediv__": "rdiv", "__rand__": "and", "__ror__": "or", "__xor__": None,
}

# Ops that only reinterpret or copy a tensor without changing any value.
VALUE_PRESERVING = {"contiguous", "clone"}
CASTS = {"to", "float", "half", "bfloat16", "double", "type_as", "type"}


def kind(node: Any) -> Optional[str]:
    if not isinstance(node, fx.Node):
        return None
    if node.op == "call_function":
        return _FUNCTIONS.get(node.target)
    if node.op == "call_method":
        return _METHODS.get(node.target)
    return None


def arg(node: fx.Node, index: int, name: str, default: Any = None) -> Any:
    if len(node.args) > index:
        return node.args[index]
    return node.kwargs.get(name, default)


def val(node: Any) -> Any:
    """The example value Dynamo recorded for a node (a FakeTensor, SymInt, ...), or the constant."""
    if isinstance(node, fx.Node):
        return node.meta.get("example_value", node.meta.get("val"))
    return node


def tensor_meta(node: Any) -> Optional[torch.Tensor]:
    v = val(node)
    return v if isinstance(v, torch.Tensor) else None


def shape(node: Any) -> Optional[tuple]:
    t = tensor_meta(node)
    return None if t is None else tuple(t.shape)


def ndim(node: Any) -> Optional[int]:
    t = tensor_meta(node)
    return None if t is None else t.dim()


def dtype(node: Any) -> Optional[torch.dtype]:
    t = tensor_meta(node)
    return None if t is None else t.dtype


def static_int(x: Any) -> Optional[int]:
    """A size as a python int when it is one at compile time, else None -- without adding a
    guard (int() on a SymInt would specialise the graph to today's size)."""
    v = val(x) if isinstance(x, fx.Node) else x
    if isinstance(v, bool):
        return None
    if isinstance(v, int):
        return v
    if isinstance(v, torch.SymInt):
        expr = v.node.expr
        return int(expr) if getattr(expr, "is_Integer", False) else None
    return None


def same_size(a: Any, b: Any) -> bool:
    """Are two sizes provably equal (ints, or equal symbolic expressions)? Adds no guard."""
    ia, ib = static_int(a), static_int(b)
    if ia is not None and ib is not None:
        return ia == ib
    ea = a.node.expr if isinstance(a, torch.SymInt) else a
    eb = b.node.expr if isinstance(b, torch.SymInt) else b
    try:
        import sympy
        return sympy.simplify(sympy.sympify(ea) - sympy.sympify(eb)) == 0
    except Exception:  # noqa: BLE001
        return False


_SHAPE_ONLY_METHODS = {"size", "dim", "expand_as", "view_as", "reshape_as", "new_empty", "new_zeros",
                       "new_ones", "new_full", "type_as"}


def value_users(node: fx.Node) -> list:
    """Users that read the node's values; `mask.expand_as(scores)`, `scores.size()` and
    friends read only its shape or dtype (x.type_as(node) reads only node's dtype)."""
    out = []
    for u in node.users:
        if u.op == "call_method" and u.target in _SHAPE_ONLY_METHODS and (
                u.target in ("size", "dim") or (len(u.args) > 1 and u.args[0] is not node)):
            continue
        if u.op == "call_function" and getattr(u.target, "__name__", "") in ("sym_size", "sym_numel"):
            continue
        out.append(u)
    return out


def norm_dim(d: int, rank: int) -> int:
    return d + rank if d < 0 else d


def is_scalar(x: Any) -> bool:
    """A python number, or a graph value that is a SymInt/SymFloat (a size expression)."""
    if isinstance(x, (int, float)) and not isinstance(x, bool):
        return True
    v = val(x)
    return isinstance(v, (torch.SymInt, torch.SymFloat, int, float)) and not isinstance(v, bool) \
        and isinstance(x, fx.Node)


def cast_target_dtype(node: fx.Node) -> Optional[torch.dtype]:
    """For a cast node, the dtype it produces (from the recorded example value)."""
    return dtype(node)


def depends_on(node: Any, target: fx.Node, limit: int = 4000) -> bool:
    """Does `node` (transitively) read `target`?"""
    if not isinstance(node, fx.Node):
        return False
    seen, stack = set(), [node]
    while stack and len(seen) < limit:
        n = stack.pop()
        if n is target:
            return True
        if n in seen:
            continue
        seen.add(n)
        stack.extend(n.all_input_nodes)
    return False


def source_line(node: fx.Node) -> str:
    """The user's source line for a node, from Dynamo's stack trace (last frame)."""
    trace = node.meta.get("stack_trace") or ""
    lines = [ln.strip() for ln in trace.strip().splitlines() if ln.strip()]
    location, code = "", ""
    for ln in lines:
        if ln.startswith("File "):
            location = ln
        elif set(ln) <= set("^~ "):
            continue  # Python 3.11+ caret lines under the code
        else:
            code = ln
    if location:
        # 'File "/path/x.py", line 12, in forward' -> 'x.py:12'
        try:
            path = location.split('"')[1]
            lineno = location.split("line ")[1].split(",")[0]
            location = f"{path.rsplit('/', 1)[-1]}:{lineno}"
        except IndexError:
            pass
    return f"{location} {code}".strip()
