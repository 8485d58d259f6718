"""Find attention: start at every softmax, walk up to Q K^T and down to P V.

`find_sites(gm, example_of)` returns (sites, unmatched): a Site per attention found and an
Unmatched (with its reason) per softmax left alone.  SDPA calls are read by sdpa.py.
"""
from __future__ import annotations


import torch.fx as fx

from . import masks
from . import nodes as N
from .operands import peel_last_transpose, peel_repeat_kv, peel_scale
from .products import read_pv, read_qk
from .scores import NoMatch, walk_scores
from .site import Site, Unmatched
from .symbolic_mask import Evaluator


def find_sites(gm: fx.GraphModule, example_of: dict) -> tuple[list, list]:
    ev = Evaluator(example_of)
    sites, unmatched = [], []
    from . import sdpa  # noqa: late import keeps the module graph acyclic
    from . import mask_inputs
    mask_inputs.remember_output_masks(gm, ev)
    for node in list(gm.graph.nodes):
        k = N.kind(node)
        if k == "softmax":
            try:
                sites.append(match_softmax(node, ev))
            except NoMatch as exc:
                unmatched.append(Unmatched(node, str(exc), N.source_line(node)))
        elif k == "sdpa":
            try:
                sites.append(sdpa.match_sdpa(node, ev))
            except NoMatch as exc:
                unmatched.append(Unmatched(node, str(exc), N.source_line(node)))
    return sites, unmatched


def _softmax_dim_dtype(sm: fx.Node):
    x = N.arg(sm, 0, "input")
    dim = N.arg(sm, 1, "dim")
    if sm.op == "call_method":
        dt = N.arg(sm, 2, "dtype")
    else:
        dt = sm.kwargs.get("dtype", sm.args[3] if len(sm.args) > 3 else None)
    return x, dim, dt


def _walk_probs(sm: fx.Node):
    """From the softmax down through casts and dropout to the P V product."""
    chain, dropout_p, cur = [], 0.0, sm
    while True:
        users = list(cur.users)
        if len(users) != 1:
            if not users:
                raise NoMatch("the probabilities are not used")
            raise NoMatch(f"the probabilities at '{cur.name}' have another use besides P V "
                          "(e.g. returned attention weights)")
        nxt = users[0]
        k = N.kind(nxt)
        if k in N.CASTS or k in N.VALUE_PRESERVING:
            chain.append(nxt)
            cur = nxt
            continue
        if k == "dropout":
            p = N.arg(nxt, 1, "p", 0.5)
            training = N.arg(nxt, 2, "training", True)
            if isinstance(p, fx.Node) or isinstance(training, fx.Node):
                raise NoMatch("dropout with a run-time probability or training flag")
            if N.arg(nxt, 3, "inplace", False):
                raise NoMatch("in-place dropout on the probabilities")
            if training and p > 0:
                if dropout_p:
                    raise NoMatch("two dropouts on the probabilities")
                dropout_p = float(p)
            chain.append(nxt)
            cur = nxt
            continue
        if k in ("matmul", "bmm", "einsum"):
            return nxt, cur, chain, dropout_p
        raise NoMatch(f"the probabilities go through '{getattr(nxt.target, '__name__', nxt.target)}' "
                      f"at '{nxt.name}' before any P V product")


def match_softmax(sm: fx.Node, ev: Evaluator) -> Site:
    x, dim, sm_dtype = _softmax_dim_dtype(sm)
    rank = N.ndim(x)
    if rank is None:
        raise NoMatch("softmax input has no recorded shape")
    if not isinstance(dim, int) or N.norm_dim(dim, rank) != rank - 1:
        raise NoMatch(f"softmax over dim {dim}, not the last (key) axis")
    if rank not in (3, 4):
        raise NoMatch(f"scores are {rank}-D; attention scores are [B, H, Sq, Sk] or [B*H, Sq, Sk]")
    pv, p_last, down_chain, dropout_p = _walk_probs(sm)
    qk, steps = walk_scores(x, sm)
    a, b_t, perm_a, perm_b = read_qk(qk)
    v, perm_v, out_perm = read_pv(pv, p_last)
    if N.ndim(qk) != rank:
        raise NoMatch("the Q K^T product and the softmax differ in rank")

    site = Site(anchor=sm, out_node=pv, q=a, k=b_t, v=v, rank=rank, scale_factors=[], spec_fields={},
                source=N.source_line(sm))
    site.chain = [pv, p_last, sm, qk] + down_chain
    site.out_permute = out_perm

    # q side: scalar factors on q become the scale.
    if perm_a is None:
        while (peeled := peel_scale(a)) is not None:
            a, c, is_div = peeled
            site.scale_factors.append((c, is_div))
    # k side: [.., D, Sk] -> k [.., Sk, D], with scales on k^T or on k.
    if perm_b is None:
        while (peeled := peel_scale(b_t)) is not None:
            b_t, c, is_div = peeled
            site.scale_factors.append((c, is_div))
        k_node = peel_last_transpose(b_t)
        k_needs_transpose = k_node is None
        if k_node is not None:
            while (peeled := peel_scale(k_node)) is not None:
                k_node, c, is_div = peeled
                site.scale_factors.append((c, is_div))
    else:
        k_node, k_needs_transpose = b_t, True
    site.k_transpose = k_needs_transpose
    site.perms = (perm_a, perm_b, perm_v)

    # GQA: native when K and V are repeated the same way.
    if perm_b is None and perm_v is None and not k_needs_transpose and rank == 4:
        rk, rv = peel_repeat_kv(k_node), peel_repeat_kv(v)
        if rk is not None and rv is not None and rk[1:] == rv[1:]:
            k_node, v = rk[0], rv[0]
            site.spec_fields["gqa_mapping"] = rk[2]
            site.gqa_group = rk[1]
    site.q, site.k, site.v = a, k_node, v

    views = [st[1] for st in steps if st[0] == "heads_view"]
    sq_shape = N.shape(qk)
    if views:
        site.heads, sq_shape = _heads_of(views, rank, N.shape(qk))
    _apply_steps(site, steps, ev, sq_shape, N.dtype(qk))
    site.spec_fields["dropout_p"] = dropout_p
    site.spec_fields["out_dtype"] = _dtype_name(N.dtype(pv))
    softmax_in = sm_dtype or N.dtype(x)
    site.spec_fields["softmax_dtype"] = _dtype_name(softmax_in)
    _check_shapes(site, qk)
    return site


def _dtype_name(dt) -> str:
    from ..spec import dtype_name
    return dtype_name(dt)


def _heads_of(views: list, rank: int, qk_shape) -> tuple:
    """MBart's form: bmm scores [B*H, Sq, Sk] viewed as [B, H, Sq, Sk] (masked there) and back.
    Returns ((B, H) as graph values, the 4-D scores shape)."""
    if rank != 3 or len(views) != 2 or len(N.shape(views[0]) or ()) != 4 or len(N.shape(views[1]) or ()) != 3:
        raise NoMatch("the scores are reshaped in a way other than [B*H, Sq, Sk] -> [B, H, Sq, Sk] -> back")
    split = views[0]
    sizes = list(split.args[1:])
    if len(sizes) == 1 and isinstance(sizes[0], (tuple, list)):
        sizes = list(sizes[0])
    if len(sizes) != 4 or any(isinstance(x, int) and x < 0 for x in sizes[:2]):
        raise NoMatch(f"the 4-D view of the scores at '{split.name}' does not name B and H explicitly")
    return (sizes[0], sizes[1]), N.shape(split)


def _apply_steps(site: Site, steps: list, ev: Evaluator, sq_shape, sq_dtype):
    """Turn the ordered score steps into spec fields: scale, softcap, masks, biases."""
    seen_mask = False
    biases, fills = [], []
    for st in steps:
        tag = st[0]
        if tag in ("cast", "heads_view"):
            continue
        if tag == "scale":
            c, is_div = st[1], st[2]
            if seen_mask:
                if isinstance(c, fx.Node) or (float(c) <= 0):
                    raise NoMatch("a scale applied after the mask that is not a positive constant")
                f = (1.0 / float(c)) if is_div else float(c)
                biases = [(b, neg, mult * f) for b, neg, mult in biases]
                if f > 1.0:
                    fills = [(cond, keep_is_cond, float("-inf") if masks.is_min(val) else val * f)
                             for cond, keep_is_cond, val in fills]
            site.scale_factors.append((c, is_div))
            continue
        if tag == "softcap":
            if seen_mask:
                raise NoMatch("softcap applied after a mask or bias")
            if site.spec_fields.get("softcap"):
                raise NoMatch("two softcaps")
            site.spec_fields["softcap"] = st[1]
            continue
        if tag == "bias":
            seen_mask = True
            biases.append((st[1], st[2], 1.0))
            continue
        if tag == "fill":
            seen_mask = True
            fills.append((st[1], st[2], st[3]))
            continue
    masks.apply(site, biases, fills, ev, sq_shape, sq_dtype)


def _check_shapes(site: Site, qk: fx.Node):
    sq_shape = N.shape(qk)
    if sq_shape is None:
        raise NoMatch("scores have no recorded shape")
    if site.rank == 4:
        qs, vs = N.shape(site.q), N.shape(site.v)
        perm_a, _, perm_v = site.perms
        if qs is not None and perm_a is not None:
            qs = tuple(qs[i] for i in perm_a)
        if vs is not None and perm_v is not None:
            vs = tuple(vs[i] for i in perm_v)
        if qs is not None and vs is not None and len(qs) == 4 and len(vs) == 4:
            hq, hk = qs[1], vs[1]
            ihq, ihk = N.static_int(hq), N.static_int(hk)
            if ihq is not None and ihk is not None and ihq % ihk != 0:
                raise NoMatch(f"query heads {hq} are not a multiple of key/value heads {hk}")


__all__ = ["find_sites", "match_softmax"]
