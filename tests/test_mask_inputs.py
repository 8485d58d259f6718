"""Masks that enter the graph as inputs (patterns/mask_inputs.py): the structure is read from
the compile-time example and checked on every call; anything else stays a tensor."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import fa3_inductor
from fa3_inductor.patterns import mask_inputs
from helpers import compile_fa3, explain, run_and_compare

B, H, S, D = 2, 4, 12, 16
MIN = torch.finfo(torch.float32).min


def qkv(sq=S, sk=S, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, H, n, D, generator=g) for n in (sq, sk, sk)]


def hf_mask(sq=S, sk=S, window=None, pad_left=(3, 0), causal=True, neg_inf=False):
    """transformers' eager 4-D mask: 0 where kept, finfo.min (or -inf) where masked."""
    i = torch.arange(sq)[:, None] + (sk - sq)
    j = torch.arange(sk)[None, :]
    keep = torch.ones(sq, sk, dtype=torch.bool)
    if causal:
        keep &= j <= i
    if window is not None:
        keep &= j > i - window
    pad = torch.ones(B, sk, dtype=torch.bool)
    for b, n in enumerate(pad_left):
        pad[b, :n] = False
    keep = keep[None, None] & pad[:, None, None, :]
    return torch.where(keep, 0.0, float("-inf") if neg_inf else MIN)


def attn_additive(q, k, v, mask):
    s = q @ k.transpose(-1, -2) * D ** -0.5 + mask
    return torch.softmax(s.float(), dim=-1).to(q.dtype) @ v


def attn_bool_sdpa(q, k, v, keep):
    return F.scaled_dot_product_attention(q, k, v, attn_mask=keep)


@pytest.mark.parametrize("kw,exp", [
    (dict(), dict(window_right=0, window_left=None, align="top_left")),
    (dict(window=4), dict(window_right=0, window_left=3)),
    (dict(causal=False), dict(window_right=None, window_left=None)),
    (dict(pad_left=(0, 0)), dict(window_right=0)),
    # -inf masks without fully masked rows (their backward differs from eager's NaN: docs/semantics.md)
    (dict(neg_inf=True, pad_left=(0, 0)), dict(window_right=0, masked_value="neg_inf")),
])
def test_additive_mask_input_structure(kw, exp):
    q, k, v = qkv()
    mask = hf_mask(**kw)
    rep = explain(attn_additive, q, k, v, mask)
    assert len(rep.matched) == 1, str(rep)
    spec = rep.matched[0].spec
    assert spec.mask_kind is None and spec.key_padding, spec.describe()
    for field, want in exp.items():
        assert getattr(spec, field) == want, (field, spec.describe())
    run_and_compare(attn_additive, (q, k, v), dict(mask=mask), n_rewritten=1)


def test_learned_bias_input_keeps_its_gradient():
    q, k, v = qkv()
    rep = explain(attn_additive, q, k, v, hf_mask().requires_grad_(True))
    assert rep.matched[0].spec.mask_kind == "additive", str(rep)


def test_bottom_right_mask_input():
    q, k, v = qkv(sq=5, sk=12)
    mask = hf_mask(sq=5, sk=12, pad_left=(2, 0))
    res = run_and_compare(attn_additive, (q, k, v), dict(mask=mask), n_rewritten=1)
    spec = res["rewritten"][0].spec
    assert spec.align == "bottom_right" and spec.window_right == 0 and spec.mask_kind is None


def test_fully_masked_rows_keep_eager_semantics():
    """Left padding longer than the causal prefix: fully masked rows (uniform under finfo.min)."""
    q, k, v = qkv()
    run_and_compare(attn_additive, (q, k, v), dict(mask=hf_mask(pad_left=(7, 2))), n_rewritten=1)


def test_bool_sdpa_mask_input():
    q, k, v = qkv()
    keep = hf_mask(pad_left=(0, 4)) == 0
    res = run_and_compare(attn_bool_sdpa, (q, k, v), dict(keep=keep), n_rewritten=1, config=dict(sdpa_rewrite="always"))
    spec = res["rewritten"][0].spec
    assert spec.mask_kind is None and spec.window_right == 0 and spec.key_padding


@pytest.mark.parametrize("what", ["bias", "head_dependent", "mixed_inf", "switched_off"])
def test_mask_inputs_that_stay_tensors(what):
    q, k, v = qkv()
    mask = hf_mask()
    cfg = {}
    if what == "bias":
        mask = mask + 0.5 * torch.randn(1, 1, S, S) * (mask == 0)   # a true bias on kept entries
    elif what == "head_dependent":
        mask = mask.expand(B, H, S, S).clone()
    elif what == "mixed_inf":
        mask[0, 0, -1, 0] = float("-inf")
    elif what == "switched_off":
        cfg = dict(speculate_mask_inputs=False)
    with fa3_inductor.config.patch(**cfg):
        rep = explain(attn_additive, q, k, v, mask)
    assert rep.matched[0].spec.mask_kind == "additive", str(rep)
    run_and_compare(attn_additive, (q, k, v), dict(mask=mask), n_rewritten=1, config=cfg)


def test_guard_catches_a_mask_with_other_structure():
    """Compiled with a causal example; a later call with a bidirectional mask must not run as causal."""
    q, k, v = qkv()
    with fa3_inductor.config.patch(force_rewrite=True):
        f = compile_fa3(attn_additive)
        torch.testing.assert_close(f(q, k, v, hf_mask()), attn_additive(q, k, v, hf_mask()), atol=1e-4, rtol=1e-4)
        # same structure, other padding: fine (the key padding vector is read per call)
        m2 = hf_mask(pad_left=(0, 6))
        torch.testing.assert_close(f(q, k, v, m2), attn_additive(q, k, v, m2), atol=1e-4, rtol=1e-4)
        with pytest.raises(RuntimeError, match="fa3_inductor: an attention mask input"):
            f(q, k, v, hf_mask(causal=False))
        with pytest.raises(RuntimeError, match="fa3_inductor: an attention mask input"):
            bias = hf_mask() + 0.25 * (hf_mask() == 0)
            f(q, k, v, bias)


def test_infer_unit():
    keep = hf_mask(window=3) == 0
    got = mask_inputs.infer(keep, additive=False)
    assert got == dict(align="top_left", window_left=2, window_right=0, masked_value="neg_inf")
    assert mask_inputs.infer(torch.zeros(B, 1, S, S, dtype=torch.bool), additive=False) is None
    scattered = hf_mask(causal=False)
    scattered[0, 0, 3, 7] = MIN
    assert mask_inputs.infer(scattered, additive=True) is None


def test_dynamic_lengths_are_not_speculated():
    """A dynamic graph serves other lengths than its example's; structure read from one example
    (e.g. a window longer than the prompt) could fail the guard later, so the mask stays a tensor."""
    q, k, v = qkv()
    mask = hf_mask()
    torch._dynamo.mark_dynamic(q, 2)
    torch._dynamo.mark_dynamic(k, 2)
    torch._dynamo.mark_dynamic(v, 2)
    torch._dynamo.mark_dynamic(mask, 2)
    torch._dynamo.mark_dynamic(mask, 3)
    rep = explain(attn_additive, q, k, v, mask)
    assert rep.matched[0].spec.mask_kind == "additive", str(rep)
