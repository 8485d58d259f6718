"""Masks as functions of indices.

A mask or bias built inside the graph (arange comparisons, tril/triu, and/or/not, where,
lookups of a padding mask, a registered tril buffer) is evaluated abstractly: every
tensor becomes a sympy expression of its positional indices E1 (last dim), E2, ...
(right-aligned, so broadcasting never renames them), and tensors we cannot see through
become uninterpreted lookups L_k(E_r, ..., E1) of that tensor.

`analyse_keep(node, ...)` then splits the final boolean keep-condition of a
[B, H, Sq, Sk] mask into the structure kernels understand (window bounds relative to the
diagonal, a [B, Sk] key-padding vector) and reports anything left over.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Optional

import sympy
import torch
import torch.fx as fx

from . import nodes as N

E = [sympy.Symbol(f"E{i}", integer=True, nonnegative=True) for i in range(0, 9)]  # E[1] = last dim
MIN_SENTINEL = sympy.Symbol("MASK_MIN", negative=True)   # stands for any finfo(...).min (< 0)
NEG_INF = -sympy.oo


class NotSymbolic(Exception):
    """The subgraph uses something the abstract evaluation does not model."""


@dataclasses.dataclass
class Sym:
    expr: Any          # sympy expression (Boolean for bool tensors)
    rank: int
    is_bool: bool


@dataclasses.dataclass
class Leaf:
    node: fx.Node      # the tensor looked up
    func: Any          # sympy Function class standing for it
    guards: list = dataclasses.field(default_factory=list)


def sympify_size(x) -> Any:
    v = N.val(x)
    if isinstance(v, (torch.SymInt, torch.SymFloat)):
        return v.node.expr
    if isinstance(v, (int, float)) and not isinstance(v, bool):
        return sympy.Integer(v) if isinstance(v, int) else sympy.Float(v)
    if isinstance(x, (int, float)) and not isinstance(x, bool):
        return sympy.Integer(x) if isinstance(x, int) else sympy.Float(x)
    raise NotSymbolic(f"size {x!r} is not a number or size expression")


def _is_min(value) -> bool:
    try:
        f = float(value)
    except (TypeError, ValueError):
        return False
    return f in (torch.finfo(torch.float32).min, torch.finfo(torch.float16).min,
                 torch.finfo(torch.bfloat16).min, torch.finfo(torch.float64).min)


def scalar_expr(x) -> Any:
    if isinstance(x, bool):
        return sympy.true if x else sympy.false
    if isinstance(x, (int, float)):
        if x == float("-inf"):
            return NEG_INF
        if _is_min(x):
            return MIN_SENTINEL
        return sympy.Integer(x) if isinstance(x, int) or float(x).is_integer() else sympy.Float(x)
    return sympify_size(x)


class Evaluator:
    """Evaluates mask-producing subgraphs; one per graph (leaves are shared across masks)."""

    def __init__(self, example_of: dict):
        self.example_of = example_of          # placeholder node -> real example tensor, if known
        self.leaves: dict = {}                # fx.Node -> Leaf
        self.memo: dict = {}

    # ---- leaves -------------------------------------------------------------------
    def leaf(self, node: fx.Node) -> Sym:
        t = N.tensor_meta(node)
        if t is None:
            raise NotSymbolic(f"{node.name} is not a tensor")
        lf = self.leaves.get(node)
        if lf is None:
            lf = Leaf(node, sympy.Function(f"L_{node.name}"))
            self.leaves[node] = lf
        rank = t.dim()
        args = [E[rank - d] for d in range(rank)]
        if rank == 0:
            raise NotSymbolic(f"{node.name} is a 0-d tensor of unknown value")
        call = lf.func(*args)
        if t.dtype == torch.bool:
            return Sym(sympy.Ne(call, 0), rank, True)
        return Sym(call, rank, False)

    def real_tensor(self, node: fx.Node) -> Optional[torch.Tensor]:
        """The real tensor (with data) Dynamo compiled with for a graph input or constant, or None."""
        from torch._subclasses.fake_tensor import FakeTensor
        real = self.example_of.get(node)
        if real is None or isinstance(real, FakeTensor):
            # DDP's graph splitting (DDPOptimizer) compiles each piece with fake inputs; Dynamo's
            # GraphArg on the placeholder still holds the real tensor.
            real = _grapharg_example(node)
        if not isinstance(real, torch.Tensor) or isinstance(real, FakeTensor) or real.device.type == "meta":
            return None
        return real

    def constant_tril(self, node: fx.Node) -> Optional[Sym]:
        """A real constant buffer (e.g. nanoGPT's registered tril) that is tril/triu of ones."""
        real = self.real_tensor(node)
        if real is None or real.dim() < 2:
            return None
        r, c = real.shape[-2], real.shape[-1]
        if real.numel() != r * c or r * c > (1 << 26):
            return None
        flat = real.reshape(r, c).detach().cpu() != 0
        ones = torch.ones(r, c, dtype=torch.bool)
        if torch.equal(flat, ones.tril()):
            kind, expr = "tril", sympy.Le(E[1] - E[2], 0)
        elif torch.equal(flat, ones.triu()):
            kind, expr = "triu", sympy.Ge(E[1] - E[2], 0)
        else:
            return None
        lf = self.leaves.setdefault(node, Leaf(node, sympy.Function(f"L_{node.name}")))
        if kind not in lf.guards:
            lf.guards.append(kind)  # checked again at run time by rewrite.tril_guard
        if real.dtype == torch.bool:
            return Sym(expr, real.dim(), True)
        return Sym(sympy.Piecewise((1, expr), (0, True)), real.dim(), False)

    # ---- evaluation ---------------------------------------------------------------
    def eval(self, x) -> Sym:
        if not isinstance(x, fx.Node):
            e = scalar_expr(x)
            return Sym(e, 0, isinstance(x, bool))
        if x in self.memo:
            return self.memo[x]
        out = self._eval(x)
        self.memo[x] = out
        return out

    def _eval(self, n: fx.Node) -> Sym:
        v = N.val(n)
        if isinstance(v, (torch.SymInt, torch.SymFloat)):
            return Sym(v.node.expr, 0, False)
        k = N.kind(n)
        if n.op == "placeholder" or n.op == "get_attr":
            const = self.constant_tril(n) if n.op == "placeholder" else None
            if n.op == "get_attr":
                self.example_of.setdefault(n, _get_attr(n))
                const = self.constant_tril(n)
            return const if const is not None else self.leaf(n)
        if k == "arange":
            return self._arange(n)
        if k in ("add", "sub", "mul", "div"):
            a, b = self.eval(N.arg(n, 0, "input")), self.eval(N.arg(n, 1, "other"))
            if k == "add" and N.arg(n, 2, "alpha", 1) != 1:
                raise NotSymbolic("add with alpha")
            ea, eb = _num(a), _num(b)
            e = {"add": ea + eb, "sub": ea - eb, "mul": ea * eb, "div": ea / eb}[k]
            return Sym(e, max(a.rank, b.rank), False)
        if k in ("rsub", "rdiv"):
            a, b = self.eval(N.arg(n, 0, "input")), self.eval(N.arg(n, 1, "other"))
            e = _num(b) - _num(a) if k == "rsub" else _num(b) / _num(a)
            return Sym(e, max(a.rank, b.rank), False)
        if k == "tensor":
            data = N.arg(n, 0, "data")
            if isinstance(data, fx.Node) or not isinstance(data, (int, float, bool)):
                raise NotSymbolic("torch.tensor of non-scalar data")
            if isinstance(data, bool):
                return Sym(sympy.true if data else sympy.false, 0, True)
            return Sym(scalar_expr(data), 0, False)
        if k == "neg":
            a = self.eval(N.arg(n, 0, "input"))
            return Sym(-_num(a), a.rank, False)
        if k == "abs":
            a = self.eval(N.arg(n, 0, "input"))
            return Sym(sympy.Abs(_num(a)), a.rank, False)
        if k in ("eq", "ne", "le", "lt", "ge", "gt"):
            a, b = self.eval(N.arg(n, 0, "input")), self.eval(N.arg(n, 1, "other"))
            rel = {"eq": sympy.Eq, "ne": sympy.Ne, "le": sympy.Le, "lt": sympy.Lt,
                   "ge": sympy.Ge, "gt": sympy.Gt}[k]
            return Sym(compare(rel, _num(a), _num(b)), max(a.rank, b.rank), True)
        if k in ("and", "or"):
            a, b = self.eval(N.arg(n, 0, "input")), self.eval(N.arg(n, 1, "other"))
            if not (a.is_bool and b.is_bool):
                raise NotSymbolic("bitwise and/or of non-boolean tensors")
            e = sympy.And(a.expr, b.expr) if k == "and" else sympy.Or(a.expr, b.expr)
            return Sym(e, max(a.rank, b.rank), True)
        if k == "not":
            a = self.eval(N.arg(n, 0, "input"))
            if not a.is_bool:
                raise NotSymbolic("bitwise not of a non-boolean tensor")
            return Sym(sympy.Not(a.expr), a.rank, True)
        if k in N.CASTS or k in ("bool", "int", "long") or k in N.VALUE_PRESERVING:
            a = self.eval(N.arg(n, 0, "input"))
            out_dtype = N.dtype(n)
            if out_dtype == torch.bool and not a.is_bool:
                return Sym(compare(sympy.Ne, a.expr, sympy.Integer(0)), a.rank, True)
            if out_dtype is not None and out_dtype != torch.bool and a.is_bool:
                return Sym(sympy.Piecewise((1, a.expr), (0, True)), a.rank, False)
            return a
        if k == "where":
            c = self.eval(N.arg(n, 0, "condition"))
            a, b = self.eval(N.arg(n, 1, "input")), self.eval(N.arg(n, 2, "other"))
            if a.is_bool and b.is_bool:
                e = sympy.Or(sympy.And(c.expr, a.expr), sympy.And(sympy.Not(c.expr), b.expr))
                return Sym(e, max(c.rank, a.rank, b.rank), True)
            e = sympy.Piecewise((_num(a), c.expr), (_num(b), True))
            return Sym(e, max(c.rank, a.rank, b.rank), False)
        if k == "masked_fill":
            x = self.eval(N.arg(n, 0, "input"))
            c = self.eval(N.arg(n, 1, "mask"))
            fill = self.eval(N.arg(n, 2, "value"))
            if x.is_bool:
                e = sympy.Or(sympy.And(c.expr, fill.expr), sympy.And(sympy.Not(c.expr), x.expr))
                return Sym(e, max(x.rank, c.rank), True)
            return Sym(sympy.Piecewise((_num(fill), c.expr), (_num(x), True)), max(x.rank, c.rank), False)
        if k in ("tril", "triu"):
            x = self.eval(N.arg(n, 0, "input"))
            diag = int(N.arg(n, 1, "diagonal", 0))
            cond = sympy.Le(E[1] - E[2], diag) if k == "tril" else sympy.Ge(E[1] - E[2], diag)
            if x.is_bool:
                return Sym(sympy.And(cond, x.expr), x.rank, True)
            return Sym(sympy.Piecewise((_num(x), cond), (0, True)), x.rank, False)
        if k in ("ones", "zeros", "full", "new_ones", "new_zeros", "new_full", "ones_like", "zeros_like",
                 "full_like"):
            return self._constant(n, k)
        if k in ("expand", "expand_as", "contiguous"):
            a = self.eval(N.arg(n, 0, "input"))
            return Sym(a.expr, N.ndim(n), a.is_bool)
        if k in ("view", "reshape", "unsqueeze", "squeeze"):
            return self._reshape(n)
        if k == "getitem":
            return self._getitem(n)
        if k == "cat":
            return self._cat(n)
        if k == "diff":
            return self._diff(n)
        if k == "cumsum":
            return self._cumsum(n)
        raise NotSymbolic(f"{n.name} ({n.op} {getattr(n.target, '__name__', n.target)}) is not modelled")

    def _arange(self, n: fx.Node) -> Sym:
        args = list(n.args)
        if len(args) == 1:
            start, step = 0, 1
        else:
            start = args[0]
            step = args[2] if len(args) > 2 else n.kwargs.get("step", 1)
        return Sym(scalar_expr_or_size(start) + scalar_expr_or_size(step) * E[1], 1, False)

    def _constant(self, n: fx.Node, k: str) -> Sym:
        t = N.tensor_meta(n)
        if k in ("ones", "new_ones", "ones_like"):
            value = 1
        elif k in ("zeros", "new_zeros", "zeros_like"):
            value = 0
        else:
            value = n.args[-1] if k == "full_like" or k == "new_full" else N.arg(n, 1, "fill_value")
            if isinstance(value, fx.Node):
                raise NotSymbolic("full() with a tensor fill value")
        if t is not None and t.dtype == torch.bool:
            return Sym(sympy.true if value else sympy.false, t.dim(), True)
        return Sym(scalar_expr(value), 0 if t is None else t.dim(), False)

    def _reshape(self, n: fx.Node) -> Sym:
        """Only reshapes that add or drop size-1 dims: positions map one to one."""
        src = N.arg(n, 0, "input")
        a = self.eval(src)
        in_shape, out_shape = N.shape(src), N.shape(n)
        if in_shape is None or out_shape is None:
            raise NotSymbolic("reshape without shapes")
        kept_in = [i for i, s in enumerate(in_shape) if not _is_one(s)]
        kept_out = [i for i, s in enumerate(out_shape) if not _is_one(s)]
        if len(kept_in) != len(kept_out) or any(
                not N.same_size(in_shape[i], out_shape[o]) for i, o in zip(kept_in, kept_out)):
            raise NotSymbolic("reshape that merges or splits dims")
        subs = {}
        rin, rout = len(in_shape), len(out_shape)
        for i, o in zip(kept_in, kept_out):
            subs[E[rin - i]] = E[rout - o]
        for i, s in enumerate(in_shape):
            if _is_one(s):
                subs.setdefault(E[rin - i], 0)
        return Sym(_subs(a.expr, subs), rout, a.is_bool)

    def _getitem(self, n: fx.Node) -> Sym:
        src, idx = n.args
        if not isinstance(idx, tuple):
            idx = (idx,)
        if any(isinstance(i, fx.Node) and N.tensor_meta(i) is not None for i in idx):
            return self._advanced_index(n, src, idx)
        a = self.eval(src)
        in_shape = N.shape(src)
        rin = len(in_shape)
        rout = N.ndim(n)
        # Expand Ellipsis.
        n_real = sum(1 for i in idx if i is not None and i is not Ellipsis)
        items = []
        for i in idx:
            if i is Ellipsis:
                items.extend([slice(None)] * (rin - n_real))
            else:
                items.append(i)
        items.extend([slice(None)] * (rin - sum(1 for i in items if i is not None)))
        subs, d_in, d_out = {}, 0, 0
        for it in items:
            if it is None:
                d_out += 1
                continue
            if isinstance(it, slice):
                start = 0 if it.start is None else it.start
                step = 1 if it.step is None else it.step
                if isinstance(start, fx.Node) or isinstance(step, fx.Node) or (isinstance(start, int) and start < 0):
                    raise NotSymbolic("slice with a symbolic or negative start")
                subs[E[rin - d_in]] = start + step * E[rout - d_out]
                d_in += 1
                d_out += 1
                continue
            if isinstance(it, int):
                subs[E[rin - d_in]] = it if it >= 0 else in_shape[d_in] + it
                d_in += 1
                continue
            raise NotSymbolic(f"index item {it!r}")
        return Sym(_subs(a.expr, subs), rout, a.is_bool)

    def _advanced_index(self, n: fx.Node, src, idx) -> Sym:
        """x[i0, i1, ...] with every item an index tensor: a lookup of x at those indices."""
        if not all(isinstance(i, fx.Node) for i in idx):
            raise NotSymbolic("mixed basic/advanced indexing")
        t = N.tensor_meta(src)
        if t is None or len(idx) != t.dim():
            raise NotSymbolic("advanced indexing that does not index every dim")
        items = [self.eval(i) for i in idx]
        base = self.eval(src)
        rank = N.ndim(n)
        subs = {E[t.dim() - d]: _num(items[d]) for d in range(t.dim())}
        return Sym(_subs(base.expr, subs), rank, base.is_bool)

    def _last_dim(self, n: fx.Node, dim) -> None:
        nd = N.ndim(n)
        if not isinstance(dim, int) or dim not in (-1, nd - 1):
            raise NotSymbolic(f"{n.name}: only the last dim is modelled")

    def _diff(self, n: fx.Node) -> Sym:
        """torch.diff(x, n=1, dim=-1, prepend=p): out[j] = x[j] - (p[0] if j == 0 else x[j-1]).
        transformers (<= 5.17) finds packed sequences as (diff(position_ids) != 1).cumsum(-1); for
        arange positions this is identically 0, which is what lets a causal mask stay structural."""
        x = self.eval(N.arg(n, 0, "input"))
        self._last_dim(n, N.arg(n, 2, "dim", -1))
        if N.arg(n, 1, "n", 1) != 1 or N.arg(n, 4, "append", None) is not None:
            raise NotSymbolic("diff with n != 1 or append")
        pre = N.arg(n, 3, "prepend", None)
        xe, j = _num(x), E[1]
        if pre is None:
            return Sym(sympy.expand(_subs(xe, {j: j + 1}) - xe), x.rank, False)
        p = self.eval(pre)
        first = sympy.expand(_subs(xe, {j: 0}) - _subs(_num(p), {j: 0}))
        rest = sympy.expand(xe - _subs(xe, {j: j - 1}))
        e = rest if sympy.simplify(first - rest) == 0 else sympy.Piecewise((first, sympy.Eq(j, 0)), (rest, True))
        return Sym(e, max(x.rank, p.rank), False)

    def _cumsum(self, n: fx.Node) -> Sym:
        """Only a cumulative sum of zeros (see _diff) is modelled."""
        x = self.eval(N.arg(n, 0, "input"))
        self._last_dim(n, N.arg(n, 1, "dim", None))
        xe = _num(x)
        if xe == 0 or xe is sympy.false:
            return Sym(sympy.Integer(0), x.rank, False)
        raise NotSymbolic(f"{n.name}: cumsum of a non-zero tensor is not modelled")

    def _cat(self, n: fx.Node) -> Sym:
        parts = N.arg(n, 0, "tensors")
        dim = N.arg(n, 1, "dim", 0)
        live = []
        for p in parts:
            s = N.shape(p)
            if s is None:
                raise NotSymbolic("cat of non-tensors")
            if not N.same_size(s[dim], 0):
                live.append(p)
        if len(live) != 1:
            raise NotSymbolic("cat of several non-empty tensors")
        return self.eval(live[0])


def compare(rel, a, b):
    """rel(a, b), distributing over Piecewise branches so that e.g.
    Ne(Piecewise((1, C), (0, True)), 0) becomes C."""
    for side in (0, 1):
        pw = (a, b)[side]
        other = (a, b)[1 - side]
        if isinstance(pw, sympy.Piecewise):
            terms, covered = [], sympy.false
            for value, cond in pw.args:
                this = sympy.And(cond, sympy.Not(covered))
                r = compare(rel, value, other) if side == 0 else compare(rel, other, value)
                terms.append(sympy.And(this, r))
                covered = sympy.Or(covered, cond)
            return sympy.simplify_logic(sympy.Or(*terms)) if len(terms) < 6 else sympy.Or(*terms)
    return rel(a, b)


def scalar_expr_or_size(x):
    if isinstance(x, fx.Node):
        return sympify_size(x)
    return scalar_expr(x)


def _grapharg_example(n: fx.Node):
    ga = n.meta.get("grapharg")
    try:
        return None if ga is None else ga.example
    except Exception:  # noqa: BLE001 - a released weak reference: nothing to inspect
        return None


def _get_attr(n: fx.Node):
    obj = n.graph.owning_module
    for part in n.target.split("."):
        obj = getattr(obj, part)
    return obj


def _num(s: Sym):
    if s.is_bool:
        return sympy.Piecewise((1, s.expr), (0, True))
    return s.expr


def _subs(expr, subs: dict):
    if not subs:
        return expr
    return expr.xreplace({k: sympy.sympify(v) for k, v in subs.items()})


def _is_one(s) -> bool:
    return N.static_int(s) == 1


# ---- structure of a keep-condition ---------------------------------------------------

@dataclasses.dataclass
class Structure:
    align: str = "top_left"
    window_left: Optional[int] = None
    window_right: Optional[int] = None
    key_padding: Optional[tuple] = None        # (leaf node, needs "!= 0")
    residual: list = dataclasses.field(default_factory=list)

    @property
    def explained(self) -> bool:
        return not self.residual


def split_keep(cond, sq, sk) -> Structure:
    """Split a boolean keep-condition over (E4=b, E3=h, E2=i, E1=j) into kernel structure."""
    st = Structure()
    if cond is sympy.true:
        return st
    cond = _normalise_keep(cond)
    atoms = list(cond.args) if isinstance(cond, sympy.And) else [cond]
    rights, lefts = [], []
    sq_e, sk_e = sympify_size(sq), sympify_size(sk)
    for atom in atoms:
        bound = _diag_bound(atom)
        if bound is not None:
            (rights if bound[0] == "right" else lefts).append(bound[1])
            continue
        kp = _key_padding_atom(atom)
        if kp is not None and st.key_padding is None:
            st.key_padding = kp
            continue
        st.residual.append(atom)
    if len(rights) > 1 or len(lefts) > 1:
        st.residual.append("several diagonal bounds")
        return st
    # Right bound j <= i + c fixes the alignment: c == 0 -> top-left, c == sk - sq -> bottom-right.
    off = 0
    if rights:
        c = rights[0]
        if sympy.simplify(c - (sk_e - sq_e)) == 0 and sympy.simplify(c) != 0:
            st.align, off, st.window_right = "bottom_right", c, 0
        elif c.is_Integer and int(c) >= 0:
            st.window_right = int(c)
        else:
            st.residual.append(f"diagonal bound j <= i + {c}")
            return st
    if lefts:
        # Left bound j >= i + c  ->  window_left = off - c.
        c = lefts[0]
        w = sympy.simplify(off - c)
        if not rights and sympy.simplify(-c - (sq_e - sk_e)) != 0 and not w.is_Integer:
            w2 = sympy.simplify((sk_e - sq_e) - c)
            if w2.is_Integer:
                st.align, w = "bottom_right", w2
        if w.is_Integer and int(w) >= 0:
            st.window_left = int(w)
        else:
            st.residual.append(f"diagonal bound j >= i + {c}")
    return st


def _normalise_keep(cond):
    """Push negations into the relations (Not(j > i) -> j <= i), split |j - i| <= w into two
    bounds, and put the condition in conjunctive form so its atoms can be read one by one."""
    def expand_abs(e):
        if isinstance(e, (sympy.Le, sympy.Lt)) and isinstance(e.lhs, sympy.Abs):
            x = e.lhs.args[0]
            return sympy.And(type(e)(x, e.rhs), type(e)(-x, e.rhs))
        if isinstance(e, (sympy.Ge, sympy.Gt)) and isinstance(e.rhs, sympy.Abs):
            x = e.rhs.args[0]
            rel = sympy.Le if isinstance(e, sympy.Ge) else sympy.Lt
            return sympy.And(rel(x, e.lhs), rel(-x, e.lhs))
        return e
    try:
        c = sympy.to_cnf(cond, simplify=False)
        c = c.replace(lambda e: isinstance(e, sympy.Rel), expand_abs)
        return sympy.to_cnf(c, simplify=False)
    except Exception:  # noqa: BLE001 - an odd expression is simply not structural
        return cond


def _diag_bound(atom):
    """`j - i <= c` -> ("right", c); `j - i >= c` -> ("left", c); else None."""
    if not isinstance(atom, (sympy.Le, sympy.Lt, sympy.Ge, sympy.Gt)):
        return None
    f = sympy.expand(atom.lhs - atom.rhs)
    ci, cj = f.coeff(E[2]), f.coeff(E[1])
    rest = sympy.expand(f - ci * E[2] - cj * E[1])
    if rest.has(E[1], E[2], E[3], E[4]) or rest.atoms(sympy.core.function.AppliedUndef):
        return None
    if not ((ci == -1 and cj == 1) or (ci == 1 and cj == -1)):
        return None
    # Normalise to g = j - i  (op)  c.
    if ci == 1:  # f = i - j + rest: flip
        rel = {sympy.Le: sympy.Ge, sympy.Lt: sympy.Gt, sympy.Ge: sympy.Le, sympy.Gt: sympy.Lt}[type(atom)]
        c = rest
    else:
        rel = type(atom)
        c = -rest
    if rel is sympy.Le:
        return ("right", c)
    if rel is sympy.Lt:
        return ("right", c - 1)
    if rel is sympy.Ge:
        return ("left", c)
    return ("left", c + 1)


def _key_padding_atom(atom):
    """Ne(L(E4, E1), 0) (or Eq(L, 1) for a 0/1 leaf, guarded) -> (function, needs_guard)."""
    if isinstance(atom, sympy.Ne) and atom.rhs == 0:
        call = atom.lhs
    elif isinstance(atom, sympy.Ne) and atom.lhs == 0:
        call = atom.rhs
    else:
        return None
    if not isinstance(call, sympy.core.function.AppliedUndef):
        return None
    if tuple(call.args) != (E[4], E[1]) and tuple(call.args) != (E[2], E[1]):
        return None
    return (call.func, tuple(call.args))


def classify_additive(expr):
    """An additive mask value expression -> (keep_condition, masked_value) or None for a true bias."""
    if not isinstance(expr, sympy.Piecewise):
        try:  # (1 - Piecewise((1, c), (0, True))) * MIN  ->  Piecewise((0, c), (MIN, True))
            expr = sympy.piecewise_fold(sympy.expand(expr))
        except Exception:  # noqa: BLE001
            return None
        if isinstance(expr, sympy.Piecewise):
            expr = sympy.Piecewise(*[(sympy.simplify(v), c) for v, c in expr.args])
    if expr == 0:
        # Every entry kept: transformers <= 5.17 materialises `where(q_idx >= 0, 0, min)` under
        # torch.compile for an encoder without padding (ViT), which folds to 0 here.
        return sympy.true, "min_additive"
    if isinstance(expr, sympy.Piecewise) and len(expr.args) == 2:
        (v1, c1), (v2, c2) = expr.args
        if c2 is sympy.true:
            if v1 == 0 and v2 in (MIN_SENTINEL, NEG_INF):
                return c1, ("neg_inf" if v2 == NEG_INF else "min_additive")
            if v2 == 0 and v1 in (MIN_SENTINEL, NEG_INF):
                return sympy.Not(c1), ("neg_inf" if v1 == NEG_INF else "min_additive")
    return None


def assume_zero_one(expr, ev: "Evaluator"):
    """Read every non-boolean leaf L in `expr` as the 0/1 mask it is used as: L -> [L != 0].
    Returns (new expression, leaves assumed); the caller guards those leaves at run time
    ("01": every value is 0 or 1), since their values are not known at compile time.
    This is what `(1 - attention_mask) * finfo.min` on an integer [B, Sk] mask needs."""
    used = []
    repl = {}
    for lf in ev.leaves.values():
        t = N.tensor_meta(lf.node)
        if t is None or t.dtype == torch.bool or t.dtype.is_complex:
            continue
        for call in expr.atoms(sympy.core.function.AppliedUndef):
            if call.func == lf.func:
                repl[call] = sympy.Piecewise((1, sympy.Ne(call, 0)), (0, True))
                if lf not in used:
                    used.append(lf)
    if not repl:
        return expr, []
    return expr.xreplace(repl), used


__all__ = ["Evaluator", "NotSymbolic", "split_keep", "classify_additive", "E", "MIN_SENTINEL", "NEG_INF"]
