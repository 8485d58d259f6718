"""F.scaled_dot_product_attention calls as attention sites.

SDPA's own semantics: is_causal is top-left aligned; a bool attn_mask keeps True; a float
mask is added; scale defaults to 1/sqrt(E); rows with every key masked give 0 (SDPA's
safe softmax); enable_gqa maps query head h to kv head h // group.
Whether a site is then rewritten depends on the measured table (sdpa_policy.py).
"""
from __future__ import annotations

import math

import torch.fx as fx

from . import masks
from . import nodes as N
from .operands import peel_repeat_kv
from .scores import NoMatch
from .site import Site


def match_sdpa(node: fx.Node, ev) -> Site:
    q, k, v = N.arg(node, 0, "query"), N.arg(node, 1, "key"), N.arg(node, 2, "value")
    attn_mask = N.arg(node, 3, "attn_mask")
    dropout_p = N.arg(node, 4, "dropout_p", 0.0)
    is_causal = N.arg(node, 5, "is_causal", False)
    scale = node.kwargs.get("scale", node.args[6] if len(node.args) > 6 else None)
    enable_gqa = node.kwargs.get("enable_gqa", False)
    for name, x in (("dropout_p", dropout_p), ("is_causal", is_causal), ("enable_gqa", enable_gqa)):
        if isinstance(x, fx.Node):
            raise NoMatch(f"SDPA argument {name} is only known at run time")
    qs, ks, vs = N.shape(q), N.shape(k), N.shape(v)
    if qs is None or len(qs) != 4 or len(ks) != 4 or len(vs) != 4:
        raise NoMatch("SDPA inputs are not 4-D [B, H, S, D]")
    if not enable_gqa and str(qs[1]) != str(ks[1]):
        raise NoMatch("SDPA with different head counts but enable_gqa=False")
    site = Site(anchor=node, out_node=node, q=q, k=k, v=v, rank=4, scale_factors=[], spec_fields={},
                source=N.source_line(node))
    # transformers repeats K/V before SDPA: read through it to native GQA.
    rk, rv = peel_repeat_kv(k), peel_repeat_kv(v)
    if rk is not None and rv is not None and rk[1:] == rv[1:] and not enable_gqa:
        site.k, site.v = rk[0], rv[0]
        site.spec_fields["gqa_mapping"] = rk[2]
        site.gqa_group = rk[1]
    site.chain = [node]
    site.is_sdpa = True
    if scale is None:
        # The head dim is specialised (a guard on it alone): head dims do not vary between
        # calls, sequence lengths and batch sizes stay dynamic.
        site.scale_factors.append((1.0 / math.sqrt(int(qs[-1])), False))
    else:
        site.scale_factors.append((scale, False))
    if enable_gqa:
        hq, hk = N.static_int(qs[1]), N.static_int(ks[1])
        if hq and hk and hq != hk:
            site.gqa_group = hq // hk
    f = site.spec_fields
    f["dropout_p"] = float(dropout_p)
    f["masked_value"] = "zero"
    f["out_dtype"] = _name(N.dtype(node))
    f["softmax_dtype"] = "float32"
    if is_causal:
        if attn_mask is not None:
            raise NoMatch("SDPA with both attn_mask and is_causal")
        f["align"], f["window_right"] = "top_left", 0
    if attn_mask is not None:
        sq_shape = (qs[0], qs[1], qs[2], ks[2])
        if N.dtype(attn_mask) is not None and N.dtype(attn_mask).is_floating_point:
            biases, fills = [(attn_mask, False, 1.0)], []
        else:
            biases, fills = [], [(attn_mask, True, float("-inf"))]
        masks.apply(site, biases, fills, ev, sq_shape, N.dtype(q))
        if f.get("masked_value") in ("neg_inf",) and fills:
            f["masked_value"] = "zero"
    return site


def _name(dt):
    from ..spec import dtype_name
    return dtype_name(dt)
