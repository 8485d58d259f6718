"""Positive matcher tests: one tiny module/function per attention form, written the way real code
writes it (every form of Inductor's fuse_attention.py, plus the forms of real models).  Each test
checks the spec explain() reports and the forced-rewrite numerics (outputs and gradients) vs eager."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import fa3_inductor
from helpers import assert_within_2x, compile_fa3, explain, flatten, rewritten_sites, run_and_compare, \
    describe_reports, clear_reports

B, H, S, D = 2, 2, 8, 8
FMIN = torch.finfo(torch.float32).min


def rnd(*shape, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g).to(dtype)


def bhsd(sq=S, sk=S, h=H, hk=None, d=D, dtype=torch.float32):
    """q [B, H, Sq, D], k/v [B, Hk, Sk, D]."""
    hk = hk or h
    return rnd(B, h, sq, d, dtype=dtype, seed=1), rnd(B, hk, sk, d, dtype=dtype, seed=2), \
        rnd(B, hk, sk, d, dtype=dtype, seed=3)


def bshd(sq=S, sk=S, dtype=torch.float32):
    """q/k/v [B, S, H, D] (Inductor's permuted patterns)."""
    return rnd(B, sq, H, D, dtype=dtype, seed=1), rnd(B, sk, H, D, dtype=dtype, seed=2), \
        rnd(B, sk, H, D, dtype=dtype, seed=3)


def check(fn, args, *, n=1, expect=None, kwargs=None, atol=1e-4, rtol=1e-4, grads=True, config=None,
          gqa=None, k_heads=None, inductor=False):
    """explain() finds n sites with the expected spec fields; the forced rewrite matches eager."""
    kwargs = kwargs or {}
    cfg = dict(config or {})
    with fa3_inductor.config.patch(**cfg):
        rep = explain(fn, *args, **kwargs)
    assert len(rep.matched) == n, f"expected {n} matched site(s):\n{rep}"
    for m in rep.matched:
        for field, want in (expect or {}).items():
            if field == "scale":
                assert math.isclose(float(m.spec.scale_repr), want, rel_tol=1e-5), (m.spec.scale_repr, want)
            else:
                got = getattr(m.spec, field)
                assert got == want, f"spec.{field} = {got!r}, expected {want!r}\n{rep}"
        if gqa is not None:
            assert m.gqa_group == gqa, f"gqa_group {m.gqa_group} != {gqa}\n{rep}"
        if k_heads is not None:
            assert m.k_shape[1] == k_heads and m.v_shape[1] == k_heads, (m.k_shape, m.v_shape)
    run_and_compare(fn, args, kwargs, n_rewritten=n, grads=grads, atol=atol, rtol=rtol, config=cfg,
                    inductor=inductor)
    return rep


def check_low_precision(fn, args, *, n=1, dtype=torch.bfloat16, config=None):
    """Low-precision inputs: our output and input grads are within 2x eager's error vs float64 eager."""
    cfg = {"force_rewrite": True, **(config or {})}
    lp = [a.to(dtype).requires_grad_(True) for a in args]
    ep = [a.to(dtype).requires_grad_(True) for a in args]
    rf = [a.double().requires_grad_(True) for a in args]
    clear_reports()
    with fa3_inductor.config.patch(**cfg):
        ours = compile_fa3(fn)(*lp)
    assert len(rewritten_sites()) == n, describe_reports()
    eager = fn(*ep)
    ref = fn(*rf)
    assert ours.dtype == eager.dtype == dtype
    assert_within_2x(ours, eager, ref, what="output")
    g = rnd(*ref.shape, seed=5, dtype=torch.float64)
    with fa3_inductor.config.patch(**cfg):
        (ours.double() * g).sum().backward()
    (eager.double() * g).sum().backward()
    (ref * g).sum().backward()
    for i, (a, b, c) in enumerate(zip(lp, ep, rf)):
        assert_within_2x(a.grad, b.grad, c.grad, what=f"grad {i}")


# =============================================================================================
# Inductor fuse_attention.py forms
# =============================================================================================
def sfdp1(q, k, v):
    return torch.matmul(q, k.transpose(-2, -1)).div(math.sqrt(D)).softmax(dim=-1).matmul(v)


def sfdp2(q, k, v):
    return torch.matmul(q, k.transpose(-2, -1)).mul(0.3).softmax(dim=-1).matmul(v)


def test_sfdp1_div():
    check(sfdp1, bhsd(), expect=dict(scale=1 / math.sqrt(D), window_right=None, mask_kind=None, dropout_p=0.0))


def test_sfdp2_mul():
    check(sfdp2, bhsd(), expect=dict(scale=0.3))


class DropoutAttn(nn.Module):
    """sfdp 3/4/6: F.dropout / torch.dropout on the probabilities."""

    def __init__(self, p=0.1, style="F", scale_div=True):
        super().__init__()
        self.p, self.style, self.scale_div = p, style, scale_div

    def forward(self, q, k, v):
        s = torch.matmul(q, k.transpose(-2, -1))
        s = s.div(math.sqrt(D)) if self.scale_div else s.mul(1 / math.sqrt(D))
        p = s.softmax(dim=-1)
        if self.style == "F":
            p = F.dropout(p, p=self.p, training=self.training)
        else:
            p = torch.dropout(p, self.p, self.training)
        return p.matmul(v)


@pytest.mark.parametrize("style,scale_div", [("F", True), ("F", False), ("torch", True)])
def test_sfdp3_4_dropout_eval(style, scale_div):
    m = DropoutAttn(0.1, style, scale_div).eval()
    check(m, bhsd(), expect=dict(dropout_p=0.0, scale=1 / math.sqrt(D)))


@pytest.mark.parametrize("style", ["F", "torch"])
def test_sfdp3_4_dropout_training(style):
    m = DropoutAttn(0.25, style).train()
    rep = explain(m, *bhsd())
    assert len(rep.matched) == 1 and rep.matched[0].spec.dropout_p == 0.25, str(rep)
    q, k, v = (t.requires_grad_(True) for t in bhsd(sq=32, sk=32))
    clear_reports()
    with fa3_inductor.config.patch(force_rewrite=True):
        out = compile_fa3(m)(q, k, v)
        assert len(rewritten_sites()) == 1, describe_reports()
        out.sum().backward()
    nodrop = (q @ k.transpose(-1, -2) / math.sqrt(D)).softmax(-1) @ v
    assert torch.isfinite(out).all() and torch.isfinite(q.grad).all()
    assert not torch.allclose(out, nodrop, atol=1e-3), "dropout was not applied"
    # in expectation dropout keeps the output: the mean over many rows stays close
    assert abs(out.mean().item() - nodrop.mean().item()) < 0.1


def sfdp5(q, k, v, mask):
    w = torch.softmax((q @ k.transpose(-2, -1) / math.sqrt(D)) + mask, dim=-1)
    return w @ v


@pytest.mark.parametrize("mshape", [(B, 1, S, S), (1, 1, S, S), (S, S), (B, H, S, S)])
def test_sfdp5_additive_mask_input(mshape):
    mask = rnd(*mshape, seed=9)
    check(sfdp5, bhsd() + (mask,), expect=dict(mask_kind="additive"))


def sfdp6(q, k, v, mask):
    w = torch.softmax((q @ k.transpose(-2, -1) / math.sqrt(D)) + mask, dim=-1)
    w = torch.dropout(w, 0.0, True)
    return w @ v


def test_sfdp6_mask_dropout_p0():
    check(sfdp6, bhsd() + (rnd(B, 1, S, S, seed=9),), expect=dict(mask_kind="additive", dropout_p=0.0))


def sfdp7_8(query, key, value):
    q = query.permute(0, 2, 1, 3)
    k = key.permute(0, 2, 1, 3)
    v = value.permute(0, 2, 1, 3)
    div = q @ k.transpose(-2, -1) / math.sqrt(D)
    div = div.to(torch.float32)
    w = torch.softmax(div, dim=-1)
    w = torch.dropout(w, 0.0, True)
    w = w.to(query.dtype)
    v = v.to(w.dtype)
    return w @ v


def sfdp9_10(query, key, value):
    q = query.permute(0, 2, 1, 3)
    k = key.permute(0, 2, 1, 3)
    v = value.permute(0, 2, 1, 3)
    q = q / math.sqrt(D)
    div = q @ k.transpose(-2, -1)
    div = div.to(torch.float32)
    w = torch.softmax(div, dim=-1)
    w = w.to(query.dtype)
    v = v.to(w.dtype)
    return w @ v


@pytest.mark.parametrize("fn", [sfdp7_8, sfdp9_10])
def test_sfdp7_to_10_permuted_fp32_softmax(fn):
    check(fn, bshd(), expect=dict(scale=1 / math.sqrt(D), softmax_dtype="float32"))


@pytest.mark.parametrize("fn", [sfdp7_8, sfdp9_10])
def test_sfdp7_to_10_bf16(fn):
    check_low_precision(fn, bshd())


def sfdp11(query, key, value):
    q = query.permute(0, 2, 1, 3)
    k = key.permute(0, 2, 1, 3)
    v = value.permute(0, 2, 1, 3)
    return torch.matmul(q, k.transpose(-2, -1)).div(2.0).softmax(dim=-1).matmul(v)


def test_sfdp11_permuted():
    check(sfdp11, bshd(), expect=dict(scale=0.5))


def sfdp13(q, k, v):
    w = torch.bmm(q, k.transpose(1, 2)).softmax(dim=-1)
    w = F.dropout(w, p=0.0)
    return torch.bmm(w, v)


def test_sfdp13_bmm_3d():
    q, k, v = (t.reshape(B * H, S, D) for t in bhsd())
    check(sfdp13, (q, k, v), expect=dict(scale=1.0))


def test_bmm_3d_scaled_cross():
    def fn(q, k, v):
        return torch.bmm(q * 0.5, k.transpose(1, 2)).softmax(-1).bmm(v)
    q, k, v = bhsd(sq=5, sk=11)
    check(fn, (q.reshape(B * H, 5, D), k.reshape(B * H, 11, D), v.reshape(B * H, 11, D)), expect=dict(scale=0.5))


def sfdp14(query, key, value, mask):
    q = query.permute([0, 2, 1, 3])
    k = key.permute([0, 2, 1, 3])
    v = value.permute([0, 2, 1, 3])
    return (torch.matmul(q, k.transpose(-2, -1)).div(math.sqrt(D)) + mask).softmax(dim=-1).matmul(v)


def test_sfdp14_bert_additive():
    check(sfdp14, bshd() + (rnd(B, 1, 1, S, seed=4),), expect=dict(mask_kind="additive"))


def sfdp15(query, key, value, attn_mask):
    q = query.permute([0, 2, 1, 3])
    k = key.permute([0, 2, 1, 3])
    v = value.permute([0, 2, 1, 3])
    bs = q.size(0)
    k_len = k.size(-2)
    scores = q @ k.transpose(-2, -1)
    scores = scores.div(math.sqrt(D))
    fill_value = torch.full((), -float("inf"), dtype=query.dtype, device=query.device)
    attn_mask = (attn_mask == 0).view((bs, 1, 1, k_len)).expand_as(scores)
    return torch.softmax(scores.masked_fill(attn_mask, fill_value), dim=-1) @ v


def padding_mask(dtype=torch.long, sk=S):
    m = torch.ones(B, sk, dtype=dtype)
    m[0, -3:] = 0
    return m


def test_sfdp15_distilbert_padding():
    check(sfdp15, bshd() + (padding_mask(),),
          expect=dict(key_padding=True, mask_kind=None, masked_value="neg_inf", window_right=None))


class BertDropout(nn.Module):
    """sfdp 16/17/20 (dropout with BERT-style masks), eval mode for exact numerics."""

    def __init__(self, form):
        super().__init__()
        self.form = form
        self.drop = nn.Dropout(0.1)

    def forward(self, query, key, value, mask):
        q = query.permute([0, 2, 1, 3])
        k = key.permute([0, 2, 1, 3])
        v = value.permute([0, 2, 1, 3])
        if self.form == 16:
            w = (torch.matmul(q, k.transpose(-2, -1)).div(math.sqrt(D)) + mask).softmax(dim=-1)
            return self.drop(w).to(dtype=query.dtype).matmul(v)
        if self.form == 20:
            q = q.div(math.sqrt(D))
        scores = q @ k.transpose(-2, -1)
        if self.form == 17:
            scores = scores.div(math.sqrt(D))
        fill_value = torch.full((), -float("inf"), dtype=query.dtype, device=query.device)
        m = (mask == 0).view((q.size(0), 1, 1, k.size(-2))).expand_as(scores)
        return self.drop(torch.softmax(scores.masked_fill(m, fill_value), dim=-1)) @ v


def test_sfdp16_bert_dropout():
    check(BertDropout(16).eval(), bshd() + (rnd(B, 1, 1, S, seed=4),), expect=dict(mask_kind="additive"))


@pytest.mark.parametrize("form", [17, 20])
def test_sfdp17_20_distilbert_dropout(form):
    check(BertDropout(form).eval(), bshd() + (padding_mask(),),
          expect=dict(key_padding=True, mask_kind=None, scale=1 / math.sqrt(D)))


def test_sfdp17_training_dropout_spec():
    rep = explain(BertDropout(17).train(), *bshd(), padding_mask())
    assert len(rep.matched) == 1 and rep.matched[0].spec.dropout_p == pytest.approx(0.1), str(rep)
    assert rep.matched[0].spec.key_padding


class GPT2Old(nn.Module):
    """sfdp 18/19: HF GPT-2 (<4.40) with a registered bool tril buffer, torch.full inv scale,
    where(causal_mask, w, finfo.min), optional additive attention mask, returns key and value."""

    def __init__(self, with_mask, max_pos=16):
        super().__init__()
        self.with_mask = with_mask
        self.register_buffer("bias", torch.tril(torch.ones((max_pos, max_pos), dtype=torch.bool))
                             .view(1, 1, max_pos, max_pos), persistent=False)
        self.drop = nn.Dropout(0.1)

    def forward(self, query, key, value, attn_mask=None):
        query = query.permute([0, 2, 1, 3])
        key = key.permute([0, 2, 1, 3])
        value = value.permute([0, 2, 1, 3])
        w = torch.matmul(query, key.permute(0, 1, 3, 2))
        inv_scale = torch.full([], value.size(-1) ** 0.5, dtype=w.dtype, device=w.device)
        w = w.div(inv_scale)
        q_len, k_len = query.size(-2), key.size(-2)
        causal_mask = self.bias[:, :, k_len - q_len:k_len, :k_len]
        mask_value = torch.full((), torch.finfo(query.dtype).min, dtype=query.dtype, device=query.device)
        w = torch.where(causal_mask, w, mask_value)
        if self.with_mask:
            w = w + attn_mask
        w = self.drop(w.softmax(dim=-1).type(value.dtype))
        return w.matmul(value), key, value


def test_sfdp18_gpt2_causal_buffer():
    check(GPT2Old(False).eval(), bshd(),
          expect=dict(window_right=0, align="top_left", mask_kind=None, masked_value="min_fill",
                      scale=1 / math.sqrt(D)))


def test_sfdp19_gpt2_causal_plus_additive():
    """where(causal, s, finfo.min) + additive mask: eager's fully masked rows depend on overflow
    (min + min = -inf) and route gradients through the added entries only; no rewrite is exact,
    so the site is left alone with that reason (GPT-2 before transformers 4.40)."""
    am = torch.zeros(B, 1, 1, S)
    am[0, ..., :2] = FMIN
    rep = explain(GPT2Old(True).eval(), *bshd(), am)
    assert not rep.matched and "fully masked rows" in rep.unmatched[0].reason, str(rep)


def sfdp21_25(query, key, value, attn_mask):
    """T5: no scale, position bias added, fp32 softmax, type_as."""
    query = query.permute([0, 2, 1, 3])
    key = key.permute([0, 2, 1, 3])
    value = value.permute([0, 2, 1, 3])
    score = torch.matmul(query, key.permute(0, 1, 3, 2))
    masked_score = score + attn_mask
    score = masked_score.type_as(query)
    w = score.float().softmax(dim=-1).type_as(query)
    w = F.dropout(w, 0.0)
    return w.matmul(value), key, value


def test_sfdp21_to_26_t5_bias():
    check(sfdp21_25, bshd() + (rnd(1, H, S, S, seed=6),), expect=dict(scale=1.0, mask_kind="additive"))


def sfdp23_27(query, key, value):
    query = query.permute([0, 2, 1, 3])
    key = key.permute([0, 2, 1, 3])
    value = value.permute([0, 2, 1, 3])
    score = torch.matmul(query, key.permute(0, 1, 3, 2))
    score = score.float().type_as(query)
    return score.float().softmax(dim=-1).type_as(query).matmul(value), key, value


def test_sfdp23_27_t5_no_mask():
    check(sfdp23_27, bshd(), expect=dict(scale=1.0, mask_kind=None))


def sfdp24(query, key, value, attention_mask):
    """MBart: bmm on [B*H, S, D] with the mask added in a 4-D view."""
    bs, n_head, seq_len, head_size = query.shape
    q = query.view(bs * n_head, -1, head_size)
    k = key.reshape(bs * n_head, -1, head_size)
    v = value.reshape(bs * n_head, -1, head_size)
    w = torch.bmm(q, k.transpose(1, 2))
    w = w.view(bs, n_head, seq_len, -1) + attention_mask
    w = w.view(bs * n_head, seq_len, -1)
    w = F.softmax(w, dim=-1)
    out = torch.bmm(w, v)
    return out.view(bs, n_head, seq_len, head_size)


def test_sfdp24_mbart_bmm_view_mask():
    check(sfdp24, bhsd() + (rnd(B, 1, S, S, seed=6),), expect=dict(mask_kind="additive", scale=1.0))


def sfdp24_causal_padding(query, key, value, am):
    """MBart's view form with a mask built in the graph: the structure is derived in the 4-D view."""
    bs, n_head, seq_len, head_size = query.shape
    i = torch.arange(seq_len, device=query.device)[:, None]
    j = torch.arange(seq_len, device=query.device)[None, :]
    keep = (j <= i)[None, None] & (am[:, None, None, :] != 0)
    mask = torch.where(keep, torch.zeros((), dtype=query.dtype, device=query.device), torch.finfo(query.dtype).min)
    w = torch.bmm(query.reshape(bs * n_head, -1, head_size), key.reshape(bs * n_head, -1, head_size).transpose(1, 2))
    w = (w * head_size ** -0.5).view(bs, n_head, seq_len, -1) + mask
    w = F.softmax(w.view(bs * n_head, seq_len, -1), dim=-1)
    return torch.bmm(w, value.reshape(bs * n_head, -1, head_size)).view(bs, n_head, seq_len, head_size)


def test_sfdp24_view_form_structural_mask():
    check(sfdp24_causal_padding, bhsd() + (padding_mask(torch.long),),
          expect=dict(mask_kind=None, key_padding=True, window_right=0))


def test_bmm_scores_reshaped_otherwise_left_alone():
    def fn(q, k, v):
        b, h, s, d = q.shape
        w = torch.bmm(q.reshape(b * h, s, d), k.reshape(b * h, s, d).transpose(1, 2))
        w = w.view(b, h * s, s).view(b * h, s, s)    # not a [B, H, Sq, Sk] view
        return torch.bmm(F.softmax(w, dim=-1), v.reshape(b * h, s, d))
    rep = explain(fn, *bhsd())
    assert not rep.matched and rep.unmatched, str(rep)


def test_sfdp28_noncontiguous():
    def fn(q, k, v):
        return F.dropout(torch.matmul(q, k.transpose(-2, -1)).mul(0.25).softmax(dim=-1), p=0.0).matmul(v)
    q, k, v = (t.transpose(2, 3).contiguous().transpose(2, 3) for t in bhsd())
    qkv = rnd(B, S, 3, H, D, seed=3).permute(2, 0, 3, 1, 4)  # views of one packed tensor
    check(fn, (qkv[0], qkv[1], qkv[2]), expect=dict(scale=0.25))
    check(fn, (q, k, v), expect=dict(scale=0.25))


def sfdp29(query, key, value, attn_mask):
    q = query.permute([0, 2, 1, 3])
    k = key.permute([0, 2, 1, 3])
    v = value.permute([0, 2, 1, 3])
    s = D ** -0.25
    q = q * s
    k = k.transpose(-2, -1) * s
    return F.softmax((q @ k) + attn_mask, dim=-1) @ v


def test_sfdp29_30_split_scale():
    check(sfdp29, bshd() + (rnd(B, 1, 1, S, seed=2),), expect=dict(scale=1 / math.sqrt(D), mask_kind="additive"))


# =============================================================================================
# real-code forms
# =============================================================================================
class NanoGPT(nn.Module):
    def __init__(self, C=32, nh=4, T=16, dropout=0.0):
        super().__init__()
        self.c_attn = nn.Linear(C, 3 * C)
        self.c_proj = nn.Linear(C, C)
        self.nh = nh
        self.attn_dropout = nn.Dropout(dropout)
        self.register_buffer("bias", torch.tril(torch.ones(T, T)).view(1, 1, T, T))

    def forward(self, x):
        Bx, T, C = x.size()
        q, k, v = self.c_attn(x).split(C, dim=2)
        k = k.view(Bx, T, self.nh, C // self.nh).transpose(1, 2)
        q = q.view(Bx, T, self.nh, C // self.nh).transpose(1, 2)
        v = v.view(Bx, T, self.nh, C // self.nh).transpose(1, 2)
        att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(k.size(-1)))
        att = att.masked_fill(self.bias[:, :, :T, :T] == 0, float("-inf"))
        att = F.softmax(att, dim=-1)
        att = self.attn_dropout(att)
        y = att @ v
        y = y.transpose(1, 2).contiguous().view(Bx, T, C)
        return self.c_proj(y)


def test_nanogpt_causal_buffer():
    rep = check(NanoGPT(), (rnd(2, 12, 32),),
                expect=dict(window_right=0, window_left=None, align="top_left", mask_kind=None,
                            key_padding=False, masked_value="neg_inf", scale=1 / math.sqrt(8)))
    assert "F.softmax(att, dim=-1)" in rep.matched[0].source


def test_nanogpt_inductor_end_to_end():
    """The one positive test through real Inductor code generation (fwd + bwd)."""
    run_and_compare(NanoGPT(), (rnd(2, 12, 32),), n_rewritten=1, inductor=True)


def test_nanogpt_buffer_changed_after_compile_is_detected():
    """The causal structure was read from the buffer's value: a changed buffer must not be silently ignored."""
    m = NanoGPT()
    x = rnd(2, 12, 32)
    with fa3_inductor.config.patch(force_rewrite=True):
        c = compile_fa3(m)
        c(x)
        m.bias.copy_(torch.ones_like(m.bias))  # no longer causal
        try:
            out = c(x)
        except Exception:
            return  # detected (tril_guard)
    ref = m(x)
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)


class GenericMask(nn.Module):
    """Self-attention with a mask built in the graph by `self.build(T, Sk)`."""

    def __init__(self, kind, C=32, nh=4, w=3, fill=float("-inf")):
        super().__init__()
        self.qkv = nn.Linear(C, 3 * C)
        self.nh, self.kind, self.w, self.fill = nh, kind, w, fill

    def forward(self, x):
        Bx, T, C = x.shape
        q, k, v = self.qkv(x).view(Bx, T, 3, self.nh, C // self.nh).permute(2, 0, 3, 1, 4)
        s = q @ k.transpose(-1, -2) / math.sqrt(C // self.nh)
        i = torch.arange(T, device=x.device)[:, None]
        j = torch.arange(T, device=x.device)[None, :]
        if self.kind == "triu":
            mask = torch.triu(torch.ones(T, T, device=x.device), diagonal=1).bool()
            s = s.masked_fill(mask, self.fill)
        elif self.kind == "tril_keep":
            keep = torch.tril(torch.ones(T, T, dtype=torch.bool, device=x.device))
            s = s.masked_fill(~keep, self.fill)
        elif self.kind == "arange":
            s = s.masked_fill(j > i, self.fill)
        elif self.kind == "arange_where":
            s = torch.where(j <= i, s, torch.tensor(self.fill))
        elif self.kind == "window":
            s = s.masked_fill((j > i) | (j < i - self.w), self.fill)
        elif self.kind == "window_sym":
            s = s.masked_fill((j - i).abs() > self.w, self.fill)
        elif self.kind == "additive_min":
            bias = torch.full((T, T), torch.finfo(x.dtype).min, device=x.device).triu(1)
            s = s + bias[None, None]
        elif self.kind == "additive_window_min":
            keep = (j <= i) & (j > i - self.w)
            s = s + torch.where(keep, 0.0, torch.finfo(x.dtype).min)
        elif self.kind == "hf517_packed_causal":
            # transformers <= 5.17 under torch.compile, no attention_mask: a packed-sequence check on
            # arange position ids, and-ed into the causal mask (identically true for arange)
            pos = torch.arange(T, device=x.device).unsqueeze(0).expand(Bx, -1)
            packed = (torch.diff(pos, prepend=pos[:, :1] - 1, dim=-1) != 1).cumsum(-1)
            b = torch.arange(Bx, device=x.device)[:, None, None, None]
            qi = torch.arange(T, device=x.device)[None, None, :, None]
            kj = torch.arange(T, device=x.device)[None, None, None, :]
            keep = (kj <= qi) & (packed[b, qi] == packed[b, kj])
            s = s + torch.where(keep, torch.tensor(0.0, dtype=x.dtype), torch.finfo(x.dtype).min)
        elif self.kind == "hf517_bidirectional":
            # transformers <= 5.17 under torch.compile for an encoder without padding (ViT)
            qi = torch.arange(T, device=x.device)[None, None, :, None]
            keep = (qi >= 0).expand(Bx, -1, T, T)
            s = s + torch.where(keep, torch.tensor(0.0, dtype=x.dtype), torch.finfo(x.dtype).min)
        p = s.softmax(-1)
        return (p @ v).transpose(1, 2).reshape(Bx, T, C)


@pytest.mark.parametrize("kind,fill,exp", [
    pytest.param("triu", float("-inf"), dict(window_right=0, window_left=None, masked_value="neg_inf")),
    ("tril_keep", float("-inf"), dict(window_right=0, masked_value="neg_inf")),
    pytest.param("triu", FMIN, dict(window_right=0, masked_value="min_fill")),
    ("arange", float("-inf"), dict(window_right=0, window_left=None)),
    ("arange_where", FMIN, dict(window_right=0, masked_value="min_fill")),
    pytest.param("window", float("-inf"), dict(window_right=0, window_left=3)),
    pytest.param("window_sym", float("-inf"), dict(window_right=3, window_left=3)),
    ("additive_min", None, dict(window_right=0, masked_value="min_additive")),
    ("additive_window_min", None, dict(window_right=0, window_left=2, masked_value="min_additive")),
    ("hf517_packed_causal", None, dict(window_right=0, window_left=None, masked_value="min_additive")),
    ("hf517_bidirectional", None, dict(window_right=None, window_left=None)),
])
def test_in_graph_structural_masks(kind, fill, exp):
    m = GenericMask(kind, fill=fill if fill is not None else float("-inf"))
    check(m, (rnd(2, 12, 32),), expect=dict(exp, mask_kind=None, key_padding=False, align="top_left"))


class PackedPositions(nn.Module):
    """Real packed sequences: position ids from an input restart per document, so
    (diff(pos) != 1).cumsum(-1) is data; the mask must stay a tensor (never a silent causal)."""

    def forward(self, q, k, v, pos):
        T = q.shape[-2]
        packed = (torch.diff(pos, prepend=pos[:, :1] - 1, dim=-1) != 1).cumsum(-1)
        b = torch.arange(q.shape[0])[:, None, None, None]
        qi = torch.arange(T)[None, None, :, None]
        kj = torch.arange(T)[None, None, None, :]
        keep = (kj <= qi) & (packed[b, qi] == packed[b, kj])
        s = (q @ k.transpose(-1, -2)) * 0.35 + torch.where(keep, 0.0, torch.finfo(q.dtype).min)
        return s.softmax(-1) @ v


def test_packed_sequence_positions_stay_a_mask():
    q, k, v = bhsd(sq=10, sk=10)
    pos = torch.tensor([[0, 1, 2, 3, 0, 1, 2, 0, 1, 2], list(range(10))])
    m = PackedPositions()
    res = run_and_compare(m, (q, k, v, pos), n_rewritten=1, atol=2e-4, rtol=2e-4)
    spec = res["rewritten"][0].spec
    assert spec.mask_kind == "additive" and spec.window_right is None, spec.describe()


class CrossCausalArange(nn.Module):
    """Chunked prefill / speculative decoding: sq < sk, causal aligned bottom-right by arange."""

    def forward(self, q, k, v):
        sq, sk = q.shape[-2], k.shape[-2]
        i = torch.arange(sq)[:, None] + (sk - sq)
        j = torch.arange(sk)[None, :]
        s = (q @ k.transpose(-1, -2)) * 0.35
        s = s.masked_fill(j > i, float("-inf"))
        return s.softmax(-1) @ v


def test_bottom_right_causal_arange():
    check(CrossCausalArange(), bhsd(sq=3, sk=10), expect=dict(align="bottom_right", window_right=0))


class PaddingMask(nn.Module):
    def __init__(self, style):
        super().__init__()
        self.style = style

    def forward(self, q, k, v, am):
        s = q @ k.transpose(-1, -2) / math.sqrt(D)
        if self.style == "bool_none":
            s = s.masked_fill(~am[:, None, None, :], float("-inf"))
        elif self.style == "int_eq0":
            s = s.masked_fill(am[:, None, None, :] == 0, float("-inf"))
        elif self.style == "additive_min":
            ext = (1.0 - am[:, None, None, :].to(s.dtype)) * torch.finfo(s.dtype).min
            s = s + ext
        elif self.style == "inverted_min":   # near-miss: mask * finfo.min (1 marks a dropped key)
            s = s + am[:, None, None, :].to(s.dtype) * torch.finfo(s.dtype).min
        elif self.style == "unsqueeze":
            s = s.masked_fill(am.unsqueeze(1).unsqueeze(2) == 0, torch.finfo(s.dtype).min)
        elif self.style == "causal_and_pad":
            Tq, Tk = q.shape[-2], k.shape[-2]
            causal = torch.ones(Tq, Tk, dtype=torch.bool).tril()
            keep = causal[None, None] & am[:, None, None, :].bool()
            s = s.masked_fill(~keep, float("-inf"))
        return s.softmax(-1) @ v


@pytest.mark.parametrize("style,dtype,exp", [
    ("bool_none", torch.bool, dict(masked_value="neg_inf")),
    ("int_eq0", torch.long, dict(masked_value="neg_inf")),
    ("additive_min", torch.long, dict(masked_value="min_additive")),   # 0/1 values guarded at run time
    ("unsqueeze", torch.int32, dict(masked_value="min_fill")),
    ("causal_and_pad", torch.long, dict(masked_value="neg_inf", window_right=0)),
])
def test_padding_masks(style, dtype, exp):
    check(PaddingMask(style), bhsd() + (padding_mask(dtype),), expect=dict(exp, key_padding=True, mask_kind=None))


def test_inverted_zero_one_mask_stays_a_bias():
    """mask * finfo.min (not 1 - mask): no key-padding reading, no 0/1 guard; exact as a bias."""
    args = bhsd() + (padding_mask(torch.long),)
    rep = explain(PaddingMask("inverted_min"), *args)
    assert rep.matched[0].spec.mask_kind == "additive" and not rep.matched[0].spec.key_padding, str(rep)
    run_and_compare(PaddingMask("inverted_min"), args, n_rewritten=1)


def test_zero_one_mask_guard():
    """(1 - mask) * finfo.min was compiled as key padding; a mask with other values must not run as one."""
    m = PaddingMask("additive_min")
    q, k, v = bhsd()
    am = padding_mask(torch.long)
    with fa3_inductor.config.patch(force_rewrite=True):
        f = compile_fa3(m)
        torch.testing.assert_close(f(q, k, v, am), m(q, k, v, am), atol=1e-4, rtol=1e-4)
        with pytest.raises(RuntimeError, match="other than 0 and 1"):
            f(q, k, v, am * 2)


def test_fully_padded_batch_row_semantics():
    """A batch whose keys are all padding: neg_inf -> NaN like eager, min -> uniform like eager."""
    am = padding_mask(torch.long)
    am[1] = 0
    for style in ("int_eq0", "additive_min", "unsqueeze"):
        clear_reports()
        run_and_compare(PaddingMask(style), bhsd() + (am,), n_rewritten=1, grads=style != "int_eq0")


def fp32_upcast(q, k, v):
    s = torch.matmul(q, k.transpose(2, 3)) / math.sqrt(D)
    p = F.softmax(s, dim=-1, dtype=torch.float32).to(q.dtype)
    return torch.matmul(p, v)


def test_fp32_softmax_upcast_fp32_inputs():
    check(fp32_upcast, bhsd(), expect=dict(softmax_dtype="float32"))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_fp32_softmax_upcast_low_precision(dtype):
    rep = explain(fp32_upcast, *bhsd(dtype=dtype))
    assert len(rep.matched) == 1 and rep.matched[0].spec.out_dtype == str(dtype).split(".")[1], str(rep)
    check_low_precision(fp32_upcast, bhsd(), dtype=dtype)


def causal_arange(q, k, v):
    T = q.shape[-2]
    i = torch.arange(T)[:, None]
    j = torch.arange(T)[None, :]
    s = (q @ k.transpose(-1, -2)) / math.sqrt(q.shape[-1])
    return s.masked_fill(j > i, float("-inf")).softmax(-1) @ v


def test_causal_bf16_within_2x():
    check_low_precision(causal_arange, bhsd(sq=16, sk=16))


def repeat_kv(x, n_rep):
    b, hk, s, d = x.shape
    if n_rep == 1:
        return x
    x = x[:, :, None, :, :].expand(b, hk, n_rep, s, d)
    return x.reshape(b, hk * n_rep, s, d)


def gqa_repeat_kv(q, k, v):
    g = q.shape[1] // k.shape[1]
    k, v = repeat_kv(k, g), repeat_kv(v, g)
    return (q @ k.transpose(2, 3) * 0.3).softmax(-1) @ v


def gqa_unsqueeze_expand(q, k, v):
    g = q.shape[1] // k.shape[1]
    b, hk, s, d = k.shape
    k = k.unsqueeze(2).expand(b, hk, g, s, d).reshape(b, hk * g, s, d)
    v = v.unsqueeze(2).expand(b, hk, g, s, d).reshape(b, hk * g, s, d)
    return (q @ k.transpose(2, 3) * 0.3).softmax(-1) @ v


def gqa_repeat_interleave(q, k, v):
    g = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(g, dim=1), v.repeat_interleave(g, dim=1)
    return (q @ k.transpose(-1, -2) * 0.3).softmax(-1) @ v


def gqa_repeat(q, k, v):
    g = q.shape[1] // k.shape[1]
    k, v = k.repeat(1, g, 1, 1), v.repeat(1, g, 1, 1)
    return (q @ k.transpose(-1, -2) * 0.3).softmax(-1) @ v


@pytest.mark.parametrize("fn,mapping", [(gqa_repeat_kv, "div"), (gqa_unsqueeze_expand, "div"),
                                        (gqa_repeat_interleave, "div"), (gqa_repeat, "mod")])
def test_gqa_native(fn, mapping):
    check(fn, bhsd(h=8, hk=2), expect=dict(gqa_mapping=mapping), gqa=4, k_heads=2)


class LlamaLikeGQA(nn.Module):
    def __init__(self, C=32, nh=4, nkv=1):
        super().__init__()
        self.nh, self.nkv, self.hd = nh, nkv, C // nh
        self.q = nn.Linear(C, C, bias=False)
        self.k = nn.Linear(C, nkv * self.hd, bias=False)
        self.v = nn.Linear(C, nkv * self.hd, bias=False)

    def forward(self, x):
        b, t, _ = x.shape
        q = self.q(x).view(b, t, self.nh, self.hd).transpose(1, 2)
        k = self.k(x).view(b, t, self.nkv, self.hd).transpose(1, 2)
        v = self.v(x).view(b, t, self.nkv, self.hd).transpose(1, 2)
        k, v = repeat_kv(k, self.nh // self.nkv), repeat_kv(v, self.nh // self.nkv)
        s = torch.matmul(q, k.transpose(2, 3)) * self.hd ** -0.5
        causal = torch.full((t, t), torch.finfo(x.dtype).min).triu(1)
        s = s + causal[None, None]
        p = F.softmax(s, dim=-1, dtype=torch.float32).to(q.dtype)
        return torch.matmul(p, v).transpose(1, 2).reshape(b, t, -1)


def test_gqa_llama_like_module_param_grads():
    check(LlamaLikeGQA(), (rnd(2, 10, 32),), expect=dict(window_right=0, masked_value="min_additive"),
          gqa=4, k_heads=1)


class DropoutTrain(nn.Module):
    def forward(self, q, k, v):
        p = (q @ k.transpose(-1, -2) / 4).softmax(-1)
        return F.dropout(p, 0.2, self.training) @ v


def test_dropout_training_spec():
    rep = explain(DropoutTrain().train(), *bhsd())
    assert rep.matched and rep.matched[0].spec.dropout_p == pytest.approx(0.2), str(rep)
    rep = explain(DropoutTrain().eval(), *bhsd())
    assert rep.matched and rep.matched[0].spec.dropout_p == 0.0, str(rep)


def softcap_fn(q, k, v):
    s = (q @ k.transpose(-1, -2)) * 0.5
    s = torch.tanh(s / 5.0) * 5.0
    return s.softmax(-1) @ v


def softcap_causal(q, k, v):
    s = (q @ k.transpose(-1, -2)) * 0.5
    s = s / 5.0
    s = torch.tanh(s)
    s = s * 5.0
    T = q.shape[-2]
    s = s.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), float("-inf"))
    return s.softmax(-1) @ v


@pytest.mark.parametrize("fn,exp", [(softcap_fn, dict(softcap=5.0, scale=0.5)),
                                    (softcap_causal, dict(softcap=5.0, window_right=0))])
def test_softcap(fn, exp):
    q, k, v = bhsd()
    check(fn, (q * 3, k * 3, v), expect=exp)


def einsum_bhqd(q, k, v):
    s = torch.einsum("bhqd,bhkd->bhqk", q, k) / math.sqrt(D)
    return torch.einsum("bhqk,bhkd->bhqd", s.softmax(-1), v)


def einsum_bqhd(q, k, v):
    s = torch.einsum("bqhd,bkhd->bhqk", q, k) * D ** -0.5
    return torch.einsum("bhqk,bkhd->bqhd", s.softmax(dim=-1), v)


def test_einsum_bhqd():
    check(einsum_bhqd, bhsd(), expect=dict(scale=1 / math.sqrt(D)))


def test_einsum_bqhd():
    check(einsum_bqhd, bshd(sq=6, sk=10), expect=dict(scale=1 / math.sqrt(D)))


class CrossAttention(nn.Module):
    def __init__(self, C=32, nh=4):
        super().__init__()
        self.q = nn.Linear(C, C)
        self.kv = nn.Linear(C, 2 * C)
        self.nh = nh

    def forward(self, x, mem):
        b, t, c = x.shape
        s_mem = mem.shape[1]
        q = self.q(x).view(b, t, self.nh, -1).transpose(1, 2)
        k, v = self.kv(mem).view(b, s_mem, 2, self.nh, -1).permute(2, 0, 3, 1, 4)
        w = torch.matmul(q, k.transpose(-1, -2)) / math.sqrt(c // self.nh)
        return torch.matmul(w.softmax(-1), v).transpose(1, 2).reshape(b, t, c)


def test_cross_attention():
    rep = check(CrossAttention(), (rnd(2, 5, 32), rnd(2, 13, 32, seed=1)), expect=dict(window_right=None))
    assert rep.matched[0].q_shape[2] == 5 and rep.matched[0].k_shape[2] == 13


class KVCacheDecode(nn.Module):
    def forward(self, q, k_new, v_new, past_k, past_v):
        k = torch.cat([past_k, k_new], dim=2)
        v = torch.cat([past_v, v_new], dim=2)
        s = torch.matmul(q, k.transpose(-1, -2)) / math.sqrt(D)
        return torch.matmul(F.softmax(s, dim=-1), v)


def test_kv_cache_decode():
    q, kn, vn = bhsd(sq=1, sk=1)
    _, pk, pv = bhsd(sq=1, sk=11)
    rep = check(KVCacheDecode(), (q, kn, vn, pk, pv))
    assert rep.matched[0].q_shape[2] == 1 and rep.matched[0].k_shape[2] == 12


# =============================================================================================
# F.scaled_dot_product_attention
# =============================================================================================
SDPA_CFG = dict(sdpa_rewrite="always")


def sdpa_causal(q, k, v):
    return F.scaled_dot_product_attention(q, k, v, is_causal=True)


def sdpa_scale(q, k, v):
    return F.scaled_dot_product_attention(q, k, v, scale=0.2)


def sdpa_float_mask(q, k, v, m):
    return F.scaled_dot_product_attention(q, k, v, attn_mask=m)


def sdpa_bool_mask(q, k, v, m):
    return F.scaled_dot_product_attention(q, k, v, attn_mask=m)


def sdpa_gqa(q, k, v):
    return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)


def test_sdpa_is_causal():
    check(sdpa_causal, bhsd(), config=SDPA_CFG, expect=dict(window_right=0, align="top_left",
                                                           scale=1 / math.sqrt(D)))


def test_sdpa_scale():
    check(sdpa_scale, bhsd(sq=5, sk=9), config=SDPA_CFG, expect=dict(scale=0.2))


def test_sdpa_float_mask():
    check(sdpa_float_mask, bhsd() + (rnd(B, 1, S, S, seed=8),), config=SDPA_CFG, expect=dict(mask_kind="additive"))


def test_sdpa_bool_mask_input():
    m = torch.rand(B, 1, S, S, generator=torch.Generator().manual_seed(2)) > 0.3
    m[..., 0] = True
    check(sdpa_bool_mask, bhsd() + (m,), config=SDPA_CFG, expect=dict(mask_kind="bool"))


def test_sdpa_bool_mask_fully_masked_rows_zero():
    m = torch.ones(B, 1, S, S, dtype=torch.bool)
    m[0, :, 2] = False  # row 2 of batch 0 sees no key: SDPA gives 0 there
    check(sdpa_bool_mask, bhsd() + (m,), config=SDPA_CFG, expect=dict(masked_value="zero"))


def test_sdpa_enable_gqa():
    check(sdpa_gqa, bhsd(h=4, hk=2), config=SDPA_CFG, gqa=2, k_heads=2, expect=dict(window_right=0))


class SdpaPaddingMask(nn.Module):
    def forward(self, q, k, v, am):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=am[:, None, None, :].bool())


def test_sdpa_padding_mask_structural():
    check(SdpaPaddingMask(), bhsd() + (padding_mask(),), config=SDPA_CFG,
          expect=dict(key_padding=True, mask_kind=None, masked_value="zero"))


def test_sdpa_not_rewritten_with_measured_policy():
    """Default sdpa_rewrite='measured' with an empty measurement table: SDPA stays."""
    clear_reports()
    with fa3_inductor.config.patch(force_rewrite=True):
        out = compile_fa3(sdpa_causal)(*bhsd())
    torch.testing.assert_close(out, sdpa_causal(*bhsd()))
    # force_rewrite overrides hardware conditions only, or the policy too: either way the report says so
    entries = [(s, done, why) for r in __import__("helpers").reports() for s, done, why in r.matched]
    assert len(entries) == 1


def test_sdpa_never():
    clear_reports()
    with fa3_inductor.config.patch(force_rewrite=True, sdpa_rewrite="never"):
        compile_fa3(sdpa_causal)(*bhsd())
    assert len(rewritten_sites()) == 0


def test_two_sites_in_one_graph():
    def fn(q, k, v):
        a = (q @ k.transpose(-1, -2) * 0.3).softmax(-1) @ v
        return (a @ k.transpose(-1, -2) * 0.2).softmax(-1) @ v
    check(fn, bhsd(), n=2)


def test_flatten_helper_sanity():
    assert len(flatten((torch.ones(1), [torch.ones(2)], {"a": torch.ones(3)}))) == 3


# ---------------------------------------------------------------------------------------------
# ALiBi written in the graph
# ---------------------------------------------------------------------------------------------
def _slopes(h):
    return torch.tensor([2.0 ** (-8.0 * (n + 1) / h) for n in range(h)])


class AlibiAttention(nn.Module):
    """Self-attention with an ALiBi bias built in the graph (fairseq / MPT / BLOOM styles)."""

    def __init__(self, style, causal=True, nh=H):
        super().__init__()
        self.style, self.causal = style, causal
        self.register_buffer("slopes", _slopes(nh))

    def forward(self, q, k, v):
        T, dev = q.shape[-2], q.device
        i = torch.arange(T, device=dev)[:, None]
        j = torch.arange(T, device=dev)[None, :]
        s = q @ k.transpose(-1, -2) / math.sqrt(D)
        if self.style == "relative":        # slopes[h] * (j - i), in the scores' dtype
            s = s + (self.slopes[:, None, None] * (j - i)[None]).to(s.dtype)
        elif self.style == "positions":     # BLOOM: slopes[h] * j (the per-row shift is irrelevant)
            s = s + self.slopes.view(1, -1, 1, 1) * torch.arange(T, device=dev).view(1, 1, 1, T)
        elif self.style == "symmetric":     # -slopes[h] * |j - i|
            s = s - (self.slopes.view(-1, 1, 1) * (j - i).abs()).to(s.dtype)
        elif self.style == "per_query":     # near-miss: "slopes" that vary along the queries
            s = s + torch.arange(T, dtype=q.dtype, device=dev).view(1, 1, T, 1) * (j - i)
        if self.causal:
            s = s.masked_fill(j > i, float("-inf"))
        return s.softmax(-1) @ v


@pytest.mark.parametrize("style,causal,kind", [("relative", True, "linear"), ("positions", True, "linear"),
                                               ("symmetric", False, "abs"), ("relative", False, "linear")])
def test_alibi_from_graph(style, causal, kind):
    exp = dict(alibi=kind, mask_kind=None, window_right=0 if causal else None)
    check(AlibiAttention(style, causal), bhsd(), expect=exp)


def test_alibi_like_bias_varying_by_query_stays_a_bias():
    rep = explain(AlibiAttention("per_query"), *bhsd())
    assert rep.matched[0].spec.alibi is None and rep.matched[0].spec.mask_kind == "additive", str(rep)


class SlicedAlibiAttention(nn.Module):
    """HF MPT's form: ALiBi built once for a longer max length, the batch axis squeezed away and
    the last [Sq, Sk] corner sliced off, added to the scores, then masked_fill(finfo.min)."""

    def __init__(self, style="positions", max_len=40, nh=H):
        super().__init__()
        self.style, self.max_len = style, max_len
        self.register_buffer("slopes", _slopes(nh))

    def forward(self, q, k, v):
        T, dev = q.shape[-2], q.device
        if self.style == "positions":     # slopes[h] * (j - (max_len - 1)), MPT
            rel = torch.arange(1 - self.max_len, 1, device=dev, dtype=torch.int32).view(1, 1, 1, self.max_len)
        else:                             # near-miss: -|j - i| on the long grid, rows and keys cut at different offsets
            pos = torch.arange(self.max_len, device=dev)
            rel = -(pos[None, :] - pos[:, None]).abs().view(1, 1, self.max_len, self.max_len)
        bias = (rel * self.slopes.view(1, -1, 1, 1)).squeeze(0)
        bias = bias[:, :T, -T:] if self.style != "positions" else bias[:, :, -T:]
        s = q @ k.transpose(-1, -2) / math.sqrt(D) + bias
        i = torch.arange(T, device=dev)[:, None]
        j = torch.arange(T, device=dev)[None, :]
        fill = torch.finfo(s.dtype).min if self.style == "positions" else float("-inf")
        s = s.masked_fill(j > i, fill)
        return s.softmax(-1) @ v


def test_alibi_through_squeeze_and_slice():
    check(SlicedAlibiAttention(), bhsd(),
          expect=dict(alibi="linear", mask_kind=None, window_right=0, masked_value="min_fill"))


def test_abs_alibi_sliced_off_its_diagonal_stays_a_bias():
    # -|j - i| on a longer grid, cut with keys offset against queries, is -|j + o - i|: not ALiBi.
    rep = explain(SlicedAlibiAttention(style="abs"), *bhsd())
    assert len(rep.matched) == 1 and rep.matched[0].spec.alibi is None, str(rep)
    assert rep.matched[0].spec.mask_kind == "additive", str(rep)
