"""Write a matched Site into the graph as one call of torch.ops.fa3.attention_fwd.

The new nodes go right before the P V product (every operand is defined by then); the
product's users read the op's output instead; the nodes that only fed the old
attention become dead and are removed.
"""
from __future__ import annotations

import operator

import torch
import torch.fx as fx

from ..ops import attention_op  # noqa: F401  (registers torch.ops.fa3.*)
from ..ops.rng import make_seed
from ..spec import AttentionSpec
from . import mask_inputs
from . import nodes as N

FP32_MIN = torch.finfo(torch.float32).min


def tril_guard(buf: torch.Tensor, lower: bool) -> None:
    """The registered mask buffer was tril/triu of ones at compile time; check it still is."""
    keep = buf.reshape(buf.shape[-2], buf.shape[-1]) != 0
    ref = torch.ones_like(keep)
    ref = ref.tril() if lower else ref.triu()
    torch._assert_async((keep == ref).all(), "fa3_inductor: a causal mask buffer changed after compilation")


def zero_one_guard(mask: torch.Tensor) -> None:
    """A mask used as (1 - mask) * finfo.min was read as key padding: check it holds only 0 and 1."""
    torch._assert_async(((mask == 0) | (mask == 1)).all(),
                        "fa3_inductor: an attention mask used as (1 - mask) * finfo.min holds values other "
                        "than 0 and 1; it was compiled as a key-padding mask")


def build_spec(site) -> AttentionSpec:
    fields = dict(site.spec_fields)
    static = site.static_scale()
    fields["scale_repr"] = f"{static:.6g}" if static is not None else "symbolic"
    return AttentionSpec(**fields)


def rewrite_site(gm: fx.GraphModule, site, guarded: set) -> fx.Node:
    g = gm.graph
    spec = site.spec or build_spec(site)
    site.spec = spec
    perm_a, perm_b, perm_v = site.perms
    with g.inserting_before(site.out_node):
        q = site.q if perm_a is None else g.call_method("permute", (site.q, *perm_a))
        k = site.k
        if perm_b is not None:
            # perm_b orders b as [batch.., d, k]; k wants [batch.., k, d].
            pk = list(perm_b[:-2]) + [perm_b[-1], perm_b[-2]]
            k = g.call_method("permute", (k, *pk))
        elif site.k_transpose:
            k = g.call_function(torch.transpose, (k, -2, -1))
        v = site.v if perm_v is None else g.call_method("permute", (site.v, *perm_v))
        if site.heads is not None:   # [B*H, S, D] -> [B, H, S, D]: the mask lives in that view
            q, k, v = (g.call_function(torch.unflatten, (x, 0, tuple(site.heads))) for x in (q, k, v))
        elif site.rank == 3:
            q, k, v = (g.call_function(torch.unsqueeze, (x, 1)) for x in (q, k, v))
        scale = _scale_node(g, site)
        bias = _bias_node(g, site)
        kp = None
        if site.key_padding is not None:
            kp = site.key_padding
            if N.dtype(kp) != torch.bool:
                kp = g.call_function(torch.ne, (kp, 0))
        if site.speculated_mask is not None:
            mask, additive, neg_inf = site.speculated_mask
            bsz = g.call_method("size", (q, 0))   # q is [B, H, Sq, D] here (rank 4 only)
            keep = g.call_function(mask_inputs.keep_of, (mask, additive))   # read once, used twice
            kp = g.call_function(mask_inputs.key_padding, (keep, bsz))
            g.call_function(mask_inputs.structure_guard,
                            (mask, keep, kp, additive, neg_inf, spec.align, spec.window_left, spec.window_right))
        slopes = None
        if site.alibi_slopes is not None:
            node, sign = site.alibi_slopes
            slopes = g.call_method("float", (g.call_method("reshape", (node, -1)),))
            if sign != 1.0:
                slopes = g.call_function(operator.mul, (slopes, sign))
        seed = None
        if spec.dropout_p:
            seed = g.call_function(make_seed, (N.tensor_meta(site.q).device,))
        for leaf, guard in site.guards:
            if (leaf, guard) in guarded:
                continue
            guarded.add((leaf, guard))
            if guard == "01":
                g.call_function(zero_one_guard, (leaf,))
            else:
                g.call_function(tril_guard, (leaf, guard == "tril"))
        call = g.call_function(torch.ops.fa3.attention_fwd.default,
                               (q, k, v, bias, kp, slopes, seed, scale, spec.to_json()))
        out = g.call_function(operator.getitem, (call, 0))
        if site.heads is not None:
            out = g.call_function(torch.flatten, (out, 0, 1))
        elif site.rank == 3:
            out = g.call_function(torch.squeeze, (out, 1))
        if site.out_permute is not None:
            out = g.call_method("permute", (out, *site.out_permute))
    site.out_node.replace_all_uses_with(out)
    return call


def _scale_node(g, site):
    static = site.static_scale()
    if static is not None:
        return float(static)
    cur = 1.0
    for value, is_div in site.scale_factors:
        cur = g.call_function(operator.truediv if is_div else operator.mul, (cur, value))
    return cur


def _bias_node(g, site):
    if site.bias is None:
        return None
    kind = site.bias[0]
    if kind == "bool":
        keep = None
        for cond, keep_is_cond in site.bias[1]:
            term = cond if keep_is_cond else g.call_function(torch.logical_not, (cond,))
            if N.dtype(cond) != torch.bool and keep_is_cond:
                term = g.call_function(torch.ne, (cond, 0))
            keep = term if keep is None else g.call_function(torch.logical_and, (keep, term))
        out = keep
    else:
        total = None
        for b, negate, mult in site.bias[1]:
            term = g.call_method("float", (b,))
            if negate:
                term = g.call_function(operator.neg, (term,))
            if mult != 1.0:
                term = g.call_function(operator.mul, (term, mult))
            total = term if total is None else g.call_function(operator.add, (total, term))
        for cond, keep_is_cond, val in site.bias[2]:
            keep = cond if keep_is_cond else g.call_function(torch.logical_not, (cond,))
            fill = float("-inf") if val == float("-inf") else FP32_MIN
            term = g.call_function(torch.where, (keep, 0.0, fill))
            total = term if total is None else g.call_function(operator.add, (total, term))
        out = total
    if site.rank == 3 and site.heads is None:
        out = g.call_function(torch.unsqueeze, (out, 1))
    return out


def remove_dead(gm: fx.GraphModule, dead_before: set):
    """Erase nodes left without users by the rewrites (and only those)."""
    g = gm.graph
    changed = True
    while changed:
        changed = False
        for node in reversed(list(g.nodes)):
            if node.op in ("placeholder", "output") or node.users or node in dead_before:
                continue
            if node.op == "call_function" and node.target in (tril_guard, zero_one_guard,
                                                              mask_inputs.structure_guard, torch._assert_async):
                continue
            g.erase_node(node)
            changed = True
