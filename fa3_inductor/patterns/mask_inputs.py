"""Structure of a mask that enters the graph as an input, read from its example and checked
on every call.

When the mask is built outside the compiled frame (FSDP2 compiles each block as its own
frame; users compile single decoder layers; an SDPA call gets attn_mask from the caller),
there is nothing in the graph to analyse.  The example tensor Dynamo compiled with is real,
though: if it is exactly "causal / sliding window / bidirectional, and'ed with a per-batch key
padding vector", the site takes the structural route, with

  * the key padding vector computed in the graph from the mask itself (keys no query sees), and
  * a run-time guard that the whole mask still equals that structure (a device-side assert
    naming this package: never a silent wrong answer).

Reading the mask twice per call costs far less than a fused kernel reading it per head, and
lets the kernel skip masked blocks.  `config.speculate_mask_inputs = False` turns it off (the
mask then stays a tensor).
"""
from __future__ import annotations

import weakref
from typing import Optional

import torch
import torch.fx as fx

from ..spec import BIAS_MASKED
from . import nodes as N
from .symbolic_mask import classify_additive, split_keep

# DDP's graph splitting (DDPOptimizer) compiles a model's graph piece by piece with fake inputs:
# transformers' mask is built in the first piece and read by attention in later ones, as a
# placeholder without data.  Pieces share the original nodes' FakeTensor objects, so the
# structure derived for a piece's output is remembered by that object and found again at the
# placeholder that receives it.
# id(FakeTensor) -> (weak reference, fields); tensors compare elementwise, so no WeakKeyDictionary.
_DERIVED: dict = {}
_DERIVED_MAX = 512


def _derived(t) -> Optional[dict]:
    hit = _DERIVED.get(id(t))
    return hit[1] if hit is not None and hit[0]() is t else None


GUARD_MESSAGE = ("fa3_inductor: an attention mask input no longer has the structure (causal / window / key "
                 "padding) its example had at compile time; set fa3_inductor.config.speculate_mask_inputs = "
                 "False to keep such masks as tensors")


def keep_of(mask: torch.Tensor, additive: bool) -> torch.Tensor:
    return (mask == 0) if additive else mask.bool()


def _pattern(sq: int, sk: int, device, align: str, window_left, window_right) -> torch.Tensor:
    """[Sq, Sk] keep pattern of the diagonal bounds (all True without any)."""
    i = torch.arange(sq, device=device)[:, None] + (sk - sq if align == "bottom_right" else 0)
    j = torch.arange(sk, device=device)[None, :]
    keep = torch.ones(sq, sk, dtype=torch.bool, device=device)
    if window_right is not None:
        keep = keep & (j <= i + window_right)
    if window_left is not None:
        keep = keep & (j >= i - window_left)
    return keep


def key_padding(keep: torch.Tensor, batch: int) -> torch.Tensor:
    """[B, Sk] keys that some query of the batch row may see (run time, in the graph)."""
    kp = keep.any(dim=-2)[:, 0, :]
    return kp.expand(batch, kp.shape[-1])


def structure_guard(mask: torch.Tensor, keep: torch.Tensor, kp: torch.Tensor, additive: bool, neg_inf: bool,
                    align: str, window_left: Optional[int], window_right: Optional[int]) -> None:
    """The mask's keep-pattern equals pattern & key padding (and, additive, the mask holds only 0
    and mask values of the compile-time kind); checked on the device without a host sync."""
    sq, sk = mask.shape[-2], mask.shape[-1]
    want = _pattern(sq, sk, mask.device, align, window_left, window_right)[None, None] & kp[:, None, None, :]
    ok = (keep == want).all()
    if additive:
        m = mask.float()
        if neg_inf:
            masked_ok = m == float("-inf")
        else:
            masked_ok = (m <= BIAS_MASKED) & (m > float("-inf"))
        ok = ok & ((m == 0) | masked_ok).all()
    torch._assert_async(ok, GUARD_MESSAGE)


def infer(example: torch.Tensor, additive: bool) -> Optional[dict]:
    """Spec fields (align, window_left, window_right, masked_value) if the example mask is exactly a
    diagonal pattern and'ed with per-batch key padding, else None.  Example: [B|1, 1, Sq, Sk]."""
    if example.dim() != 4 or example.shape[1] != 1 or example.numel() == 0:
        return None
    sq, sk = example.shape[-2], example.shape[-1]
    keep = keep_of(example, additive)
    masked_value = "neg_inf"
    if additive:
        if not example.is_floating_point():
            return None
        m = example.float()
        if not ((m == 0) | (m <= BIAS_MASKED)).all():
            return None  # a true bias
        dead = m[~keep]
        if dead.numel() and bool((dead == float("-inf")).all()):
            masked_value = "neg_inf"
        elif dead.numel() == 0 or bool((dead > float("-inf")).all()):
            masked_value = "min_additive"
        else:
            return None  # mixed -inf and finite minimums: fully masked rows would differ
    elif example.dtype != torch.bool:
        return None
    if not bool(keep.any()):
        return None  # everything masked: nothing tells the structure apart
    kp = keep.any(dim=-2)[:, 0, :]
    # bottom-right first when Sq != Sk: "j <= i + (Sk - Sq)" is then causal, which is what a
    # decoder with a KV prefix means (top-left with window_right = Sk - Sq reads the same)
    aligns = (["bottom_right"] if sq != sk else []) + ["top_left"]
    candidates = [("top_left", None, None)]
    for align in aligns:
        off = sk - sq if align == "bottom_right" else 0
        i = torch.arange(sq, device=keep.device)[:, None] + off
        j = torch.arange(sk, device=keep.device)[None, :]
        d = (i - j).expand_as(keep)[keep]
        if d.numel() == 0:
            continue
        right = int((-d).max())            # furthest kept key to the right of the diagonal
        left = int(d.max())                # and to the left
        wr = right if right < sk - 1 + off else None
        wl = left if left < sq - 1 + off else None
        candidates.append((align, wl, max(wr, 0) if wr is not None else None))
    for align, wl, wr in candidates:
        want = _pattern(sq, sk, keep.device, align, wl, wr)[None, None] & kp[:, None, None, :]
        if torch.equal(keep, want):
            return dict(align=align, window_left=wl, window_right=wr, masked_value=masked_value)
    return None


def remember_output_masks(gm: fx.GraphModule, ev) -> None:
    """Derive the structure of every 4-D head-independent mask this graph outputs."""
    out = next((n for n in gm.graph.nodes if n.op == "output"), None)
    if out is None:
        return
    for node in _flat_nodes(out.args):
        t = N.tensor_meta(node)
        if t is None or t.dim() != 4 or t.shape[1] != 1 or not (t.dtype == torch.bool or t.is_floating_point()):
            continue
        try:
            sym = ev.eval(node)
        except Exception:  # noqa: BLE001 - NotSymbolic or odd values: nothing to remember
            continue
        if t.dtype == torch.bool:
            keep, mv = (sym.expr if sym.is_bool else None), None
        else:
            got = classify_additive(sym.expr)
            keep, mv = (got if got is not None else (None, None))
        if keep is None:
            continue
        st = split_keep(keep, t.shape[-2], t.shape[-1])
        if st.explained:
            if len(_DERIVED) >= _DERIVED_MAX:
                _DERIVED.pop(next(iter(_DERIVED)))
            _DERIVED[id(t)] = (weakref.ref(t), dict(align=st.align, window_left=st.window_left,
                                                    window_right=st.window_right, masked_value=mv))


def _flat_nodes(args) -> list:
    found = []
    fx.graph.map_arg(args, found.append)
    return found


def try_speculate(site, biases, fills, ev, sq_shape, score_dtype) -> bool:
    """One mask input (an additive bias, or one keep/drop condition) whose example has structure."""
    from .. import config
    if not config.speculate_mask_inputs or not site.has_head_axis:
        return False
    if len(biases) + len(fills) != 1:
        return False
    if biases:
        node, negate, mult = biases[0]
        if negate or mult != 1.0:
            return False
        additive = True
    else:
        node, keep_is_cond, _ = fills[0]
        additive = False
        if not keep_is_cond:
            return False   # masked_fill(mask, -inf): the input marks dropped entries; not handled here
    example = ev.real_tensor(node) if node.op == "placeholder" else None
    fake = N.tensor_meta(node)
    derived = _derived(fake) if fake is not None and node.op == "placeholder" else None
    if example is None and derived is None:
        return False
    if (example is not None and example.requires_grad) or (fake is not None and fake.requires_grad):
        return False   # a learned mask/bias needs its gradient: the tensor route keeps it
    shape = N.shape(node)
    if shape is None or len(shape) != 4 or not N.same_size(shape[-2], sq_shape[-2]) \
            or not N.same_size(shape[-1], sq_shape[-1]):
        return False
    if N.static_int(shape[0]) not in (1, None) and not N.same_size(shape[0], sq_shape[0]):
        return False
    if not additive and fake is not None and fake.dtype != torch.bool:
        return False
    if example is not None and derived is None:
        if N.static_int(shape[-2]) is None or N.static_int(shape[-1]) is None:
            # Under dynamic shapes the graph serves other lengths than the example's, and a short
            # example hides structure a longer call has (a 4096-token sliding window in a
            # 300-token prompt): the guard would fail there.  Static shapes recompile per length.
            site.notes.append(("mask_not_speculated", f"{node.name}: dynamic sequence length"))
            return False
        with torch.no_grad():
            fields = infer(example.detach(), additive)
    else:
        fields = dict(derived)
        if additive and fields["masked_value"] is None:
            return False
    if fields is None:
        return False
    f = site.spec_fields
    for key in ("align", "window_left", "window_right"):
        f[key] = fields[key]
    if not additive:
        from .masks import fill_semantics
        fields["masked_value"] = fill_semantics(fills[0][2], score_dtype)
    f["masked_value"] = fields["masked_value"]
    f["key_padding"] = True
    site.speculated_mask = (node, additive, f["masked_value"] == "neg_inf")
    site.mask_route = "speculated"
    how = "read from the example" if example is not None else "derived in an earlier graph piece"
    site.notes.append(("mask_speculated", f"{node.name}: structure {how}, checked per call"))
    return True
